"""Search over a built index: :class:`Retrieval`, its Ray actor, and the async client the tool uses.

:class:`Retrieval` opens an index folder (:mod:`.index_layout`) and answers
``search(queries, k) -> [[Passage, ...], ...]``:

* **BM25**: ``bm25s`` ranks the ids; the texts come from the corpus index.
* **sentence-transformers / Search-R3**: the query encoder embeds the queries, the corpus index
  (:mod:`verl_search_r3.env`: FAISS, float16 or float32, flat/IVF/HNSW, sharded across Ray
  actors) returns the top-k ids and scores, then their texts.
* **Search-R3, ``model: policy``**: as above, but the encoder follows the policy being trained
  (:class:`PolicyFollower`): when the trainer writes a new Hugging Face checkpoint, the encoder
  is reloaded from it and every document is re-encoded (documents and queries always come from
  the same weights).

The corpus index is the environment's: one shard in-process (``placement: local`` with a
one-shard index) or the named shard actors, restored from the folder's snapshot by the first
retriever that finds them empty. With ``placement: ray`` (training) one named Ray actor per index
holds the retriever and serves every agent-loop worker: query encodes run one call at a time,
index searches (fanned out to the shards) run concurrently.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from ..env import CorpusIndex, full_encode
from ..prompts import format_document
from .config import POLICY_MODEL, RetrieverConfig
from .index_layout import BM25_DIR, SNAPSHOT_DIR, IndexManifest
from .models import DenseModel, DenseModelOptions, load_dense_model
from .observation import Passage, split_contents

logger = logging.getLogger(__name__)

__all__ = ["Retrieval", "PolicyFollower", "RetrieverClient", "latest_policy_checkpoint", "retrieval_actor", "dense_options"]

#: Sub-folder of a verl checkpoint step holding the actor's Hugging Face weights.
HF_SUBDIR = os.path.join("actor", "huggingface")


def dense_options(config: RetrieverConfig, manifest: IndexManifest) -> DenseModelOptions:
    """Encoder options for queries of ``manifest``'s index (prefixes and lengths as built)."""
    return DenseModelOptions(
        device=config.device,
        dtype=config.dtype,
        backend=config.backend,
        batch_size=config.batch_size,
        max_length=config.max_query_length if config.max_query_length is not None else manifest.max_length,
        reasoning=config.reasoning,
        max_new_tokens=config.max_new_tokens,
        query_prefix=manifest.query_prefix,
        document_prefix=manifest.document_prefix,
    )


def latest_policy_checkpoint(checkpoint_dir: str) -> tuple[int, str] | None:
    """``(step, hf_folder)`` of the newest finished verl checkpoint under ``checkpoint_dir``, or None.

    verl writes ``latest_checkpointed_iteration.txt`` after a checkpoint is complete; the weights
    are in ``global_step_N/actor/huggingface`` when ``actor.checkpoint.save_contents`` includes
    ``hf_model`` (a clear error otherwise).
    """
    from verl.utils.checkpoint.checkpoint_manager import find_latest_ckpt_path

    step_dir = find_latest_ckpt_path(checkpoint_dir)
    if step_dir is None:
        return None
    hf = os.path.join(step_dir, HF_SUBDIR)
    has_weights = os.path.isdir(hf) and any(f.endswith((".safetensors", ".bin")) for f in os.listdir(hf))
    if not has_weights:
        raise FileNotFoundError(
            f"{hf}: no Hugging Face weights in the policy checkpoint; a 'policy' retriever needs "
            "actor_rollout_ref.actor.checkpoint.save_contents to include 'hf_model'"
        )
    return int(os.path.basename(os.path.normpath(step_dir)).split("global_step_")[-1]), hf


class PolicyFollower:
    """The encoder of a ``policy`` index: the newest policy checkpoint, the index re-encoded with it.

    Args:
        checkpoint_dir: the trainer's ``default_local_dir``.
        initial: the model the index was built with (the initial policy), version 0.
        load: loads a checkpoint folder as a :class:`DenseModel`.
        index: the corpus index (re-encoded in place, versioned by training step).
        poll_seconds: least time between two looks for a newer checkpoint.
        batch_size: documents per encode call when re-encoding.
        clock: time source (tests).
    """

    def __init__(
        self,
        checkpoint_dir: str,
        initial: DenseModel,
        load: Callable[[str], DenseModel],
        index: Any,
        poll_seconds: float,
        batch_size: int,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.checkpoint_dir, self.model, self.load, self.index = checkpoint_dir, initial, load, index
        self.poll_seconds, self.batch_size, self.clock = poll_seconds, batch_size, clock
        self.step = 0
        self._last_poll: float | None = None

    def current(self) -> DenseModel:
        """The encoder to use now (reloads and re-encodes first when a newer checkpoint exists)."""
        now = self.clock()
        if self._last_poll is not None and now - self._last_poll < self.poll_seconds:
            return self.model
        self._last_poll = now
        latest = latest_policy_checkpoint(self.checkpoint_dir)
        if latest is not None and latest[0] > self.step:
            step, folder = latest
            logger.info("search_r1 retriever: policy checkpoint step %d, re-encoding the corpus", step)
            model = self.load(folder)
            full_encode(self.index, lambda contents: model.encode_documents([format_document(*split_contents(c)) for c in contents]),
                        version=step, batch_size=self.batch_size, progress=False)
            self.model, self.step = model, step
        return self.model


class Retrieval:
    """A searchable index folder (see the module docstring).

    Args:
        config: the retriever config (``index_dir`` required) or its dict.
    """

    def __init__(self, config: RetrieverConfig | Mapping[str, Any]):
        self.config = config if isinstance(config, RetrieverConfig) else RetrieverConfig.from_dict(config)
        if not self.config.index_dir:
            raise ValueError("search_r1.retriever.index_dir is required (a folder written by build_index)")
        self.manifest = IndexManifest.load(self.config.index_dir)
        self._lock = threading.Lock()
        self._bm25 = None
        self._model: DenseModel | None = None
        self._policy: PolicyFollower | None = None
        m, cfg = self.manifest, self.config
        policy = cfg.model == POLICY_MODEL
        if policy and m.kind != "search_r3":
            raise ValueError(f"search_r1.retriever.model=policy needs a search_r3 index; {cfg.index_dir!r} is {m.kind}")
        if m.dense:  # the query model is loaded and checked before any index actor is started
            options = dense_options(cfg, m)
            path = m.model if cfg.model is None or policy else cfg.model
            if path is None:
                raise ValueError(f"{cfg.index_dir}: the index records no model; set search_r1.retriever.model")
            self._model = load_dense_model(m.kind, path, options)
            if self._model.fingerprint != m.model_fingerprint:
                raise ValueError(f"query model {path!r} is not the model {cfg.index_dir!r} was built with "
                                 f"(weights fingerprint {self._model.fingerprint[:12]} != {str(m.model_fingerprint)[:12]})")
        else:
            from ..retrieval.bm25 import BM25Retriever

            self._bm25 = BM25Retriever.load(os.path.join(cfg.index_dir, BM25_DIR))
        self.index = self._open_index()
        if policy:
            self._policy = PolicyFollower(cfg.policy_checkpoint_dir, self._model, lambda p: load_dense_model(m.kind, p, options),
                                          self.index, cfg.policy_poll_seconds, cfg.batch_size)

    def _open_index(self) -> Any:
        m, cfg = self.manifest, self.config
        snapshot = os.path.join(cfg.index_dir, SNAPSHOT_DIR)
        if cfg.placement == "local" and m.num_shards == 1:
            from ..env.actor import _shard_dir  # the shard layout of CorpusIndexClient.snapshot

            return CorpusIndex.load(os.path.join(snapshot, _shard_dir(0, 1)))
        from ..env.actor import CorpusIndexClient

        client = CorpusIndexClient(m.env_config(cfg.namespace, cfg.index_num_cpus, cfg.detached))
        if sum(info["n_texts"] for info in client.info()) == 0:
            logger.info("search_r1 retriever: restoring %s into %d shard actor(s)", snapshot, m.num_shards)
            client.restore(snapshot)
        return client

    def describe(self) -> dict[str, Any]:
        """Kind, model, sizes and (``policy``) the checkpoint step in use."""
        m = self.manifest
        return {"index_id": m.index_id, "kind": m.kind, "model": m.model, "num_docs": m.num_docs, "num_shards": m.num_shards,
                "policy_step": self._policy.step if self._policy is not None else None}

    def _rank(self, queries: list[str], k: int) -> tuple[list[list[str]], np.ndarray]:
        # the encoder (and bm25s) run one call at a time; the corpus index serves concurrent searches
        with self._lock:
            if self._bm25 is not None:
                ids, scores = self._bm25.search(queries, k)
                # a query without any indexed term (empty, only stop words) matches nothing: no
                # passages, rather than k arbitrary ones at score 0
                return [[d for d, s in zip(row, srow) if s > 0] for row, srow in zip(ids, scores)], scores
            model = self._policy.current() if self._policy is not None else self._model
            vectors = model.encode_queries(queries)
        return self.index.search(vectors, k)

    def search(self, queries: Sequence[str], k: int) -> list[list[Passage]]:
        """Top-``k`` passages per query, best first; BM25 returns none for a query that has no
        indexed term (empty, or only stop words)."""
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        queries = [str(q) for q in queries]
        if not queries:
            return []
        ids, scores = self._rank(queries, k)
        flat = [d for row in ids for d in row]
        contents = dict(zip(flat, self.index.texts(flat))) if flat else {}
        return [[Passage.from_contents(d, contents[d], s) for d, s in zip(row, score_row)] for row, score_row in zip(ids, scores)]


def retrieval_actor(config: RetrieverConfig) -> Any:
    """The named Ray actor serving ``config.index_dir`` (created on first use, shared afterwards)."""
    import ray

    manifest = IndexManifest.load(config.index_dir)
    options: dict[str, Any] = dict(
        name=f"{config.actor_name}-{manifest.index_id[:12]}", namespace=config.namespace, get_if_exists=True,
        num_cpus=config.num_cpus, num_gpus=config.num_gpus, max_concurrency=config.max_concurrency,
    )
    if config.detached:
        options["lifetime"] = "detached"
    return ray.remote(Retrieval).options(**options).remote(config.to_dict())


class RetrieverClient:
    """Async access to a :class:`Retrieval` in this process (``local``) or its Ray actor (``ray``),
    with the configured timeout (``asyncio.TimeoutError`` past it)."""

    def __init__(self, config: RetrieverConfig):
        self.config = config
        self._local = Retrieval(config) if config.placement == "local" else None
        self._actor = retrieval_actor(config) if config.placement == "ray" else None

    async def search(self, queries: Sequence[str], k: int) -> list[list[Passage]]:
        if self._local is not None:
            call = asyncio.get_running_loop().run_in_executor(None, self._local.search, list(queries), k)
        else:
            call = self._actor.search.remote(list(queries), k)
        return await asyncio.wait_for(call, timeout=self.config.timeout_seconds)
