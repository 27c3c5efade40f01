"""The corpus index on Ray: named shard actors and a client that hides the sharding.

* :class:`CorpusIndexShard` — one :class:`~verl_search_r3.env.index.CorpusIndex` in a threaded
  Ray actor named ``<name>-<i>-of-<n>`` in namespace ``config.namespace`` (default
  ``verl_search_r3``), created with ``get_if_exists=True`` so any process may create-or-get it.
  Calls run concurrently (``max_concurrency``); the index's readers-writer lock makes every
  write (one ``upsert`` = one refresh's vectors for this shard) visible whole or not at all.
  It reserves ``num_cpus`` CPUs and no GPU (verl's placement groups hold the GPUs).
* :class:`CorpusIndexClient` — routes each doc id to shard ``crc32(id) % n``; ``search`` fans
  out to every shard and merges the top-k; it implements the planner's index interface, so
  :meth:`CorpusIndexClient.refresh` runs the selective refresh against the shards, calling the
  ``encode`` callback in the caller's process (e.g. the trainer, which owns the actor workers).

A crashed shard is never lost silently. Ray restarts it (``max_restarts``); it reloads the last
snapshot recorded in ``state_dir`` (the trainer defaults it to a folder under its checkpoint
folder, :func:`default_state_dir`) — writes after that snapshot are lost, i.e. those vectors are
back at the snapshot's (older) versions and count as stale — or, with no snapshot recorded yet
or an unreadable pointer or snapshot, it starts empty. Either way it keeps a restart report until
a client repairs it: :meth:`CorpusIndexClient.recover` (run at the start of every ``refresh``,
``full_encode`` and ``snapshot``) logs the restart as an error, re-adds the texts an empty shard
lost (from the client's ``texts_source``) and re-encodes every document of the shard that has
no vector with the current policy — or, with ``on_shard_restart: refuse``, raises
:class:`ShardLostError`. The repairs are counted (:meth:`CorpusIndexClient.recovery_metrics`:
per call, for the trainer's per-step ``env/`` metrics).

Consistency across shards: a refresh writes each shard atomically, one shard after the other.
A search that runs during a multi-shard refresh may see shard A after and shard B before the
refresh; every document it returns is still consistent (vector, version and graph row from one
write). That mixed-version state is the normal state of the environment anyway.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import warnings
import zlib
from collections.abc import Callable, Mapping, Sequence
import dataclasses
from dataclasses import asdict, dataclass
from typing import Any

import faiss
import numpy as np
import ray

from ..atomic import atomic_write_text
from .backends import topk_merge
from .config import EnvConfig
from .corpus import load_corpus_texts
from .index import CorpusIndex
from .planner import EncodeFn, RefreshPlanner, RefreshResult, encode_texts, full_encode
from .snapshot import SnapshotError, atomic_directory, read_manifest, write_snapshot_files
from .store import StalenessStats

__all__ = [
    "CorpusIndexShard",
    "CorpusIndexClient",
    "ShardLostError",
    "RecoveryStats",
    "TextsSource",
    "default_state_dir",
    "training_client",
    "shard_of",
    "shard_name",
    "SHARD_KEYS",
    "ON_SHARD_RESTART",
]

logger = logging.getLogger(__name__)

#: ``EnvConfig.on_shard_restart`` values: repair a restarted shard, or stop with an error.
ON_SHARD_RESTART = ("reencode", "refuse")
#: Sub-folder of the trainer's checkpoint folder where shards record their last snapshot.
STATE_SUBDIR = "search_r3_env_state"

TextsSource = Callable[..., tuple[list[str], list[str]]]
"""``texts_source(keep=predicate) -> (doc_ids, texts)``: the corpus documents whose id passes
``predicate`` (e.g. ``functools.partial(load_corpus_texts, corpus_path)``)."""

SHARD_KEYS = ("dim", "dtype", "normalize", "index_type", "ivf_nlist", "ivf_nprobe", "hnsw_m", "hnsw_ef_construction",
              "hnsw_ef_search", "ann_rebuild_fraction", "search_chunk_rows", "graph_k", "graph_refresh_age",
              "staleness_tolerance", "verify_checksums", "search_threads", "state_dir", "hnsw_update_min_cosine", "ann_codes",
              "rescore_factor", "ann_train_size")
"""Config keys the shard actors act on: a client must agree with existing actors on all of them."""


def shard_of(ids: Sequence[str], num_shards: int) -> np.ndarray:
    """``(n,)`` shard of each doc id: a stable hash (CRC-32 of the UTF-8 id) modulo ``num_shards``."""
    return np.fromiter((_shard_of_id(i, num_shards) for i in ids), dtype=np.int64, count=len(ids))


def _shard_of_id(doc_id: str, num_shards: int) -> int:
    return zlib.crc32(doc_id.encode("utf-8")) % num_shards


def shard_name(config: EnvConfig, shard: int) -> str:
    """Ray actor name of shard ``shard``."""
    return f"{config.name}-{shard}-of-{config.num_shards}"


def _shard_dir(shard: int, num_shards: int) -> str:
    return f"shard-{shard:05d}-of-{num_shards:05d}"


def default_state_dir(checkpoint_dir: str) -> str:
    """Where the trainer's shards record their last snapshot when ``state_dir`` is null: a folder
    under the checkpoint folder (absolute, so shard actors with another working directory agree)."""
    return os.path.join(os.path.abspath(checkpoint_dir), STATE_SUBDIR)


def training_client(config: EnvConfig, checkpoint_dir: str, corpus_path: str, encode: EncodeFn) -> CorpusIndexClient:
    """The environment client of a training run: ``state_dir`` null becomes
    :func:`default_state_dir` of ``checkpoint_dir`` (a crashed shard reloads the last checkpoint's
    environment), an empty restarted shard re-reads its texts from ``corpus_path`` and lost
    vectors are re-encoded with ``encode`` (see :meth:`CorpusIndexClient.recover`)."""
    if config.state_dir is None:
        config = config.replace(state_dir=default_state_dir(checkpoint_dir))
    return CorpusIndexClient(config, texts_source=functools.partial(load_corpus_texts, corpus_path), encode=encode)


class ShardLostError(RuntimeError):
    """A shard crashed and lost documents, and the client may not (or cannot) repair it."""


@dataclass
class RecoveryStats:
    """Shard restarts repaired by a client (running totals in :attr:`CorpusIndexClient.recovery`).

    Attributes:
        shard_restarts: restarts seen (each logged as an error).
        restarts_empty: of those, shards that came back without any state (no snapshot recorded
            yet, or an unreadable pointer or snapshot).
        texts_reloaded: document texts re-added from the texts source.
        vectors_reencoded: documents re-encoded because their shard lost their vector.
    """

    shard_restarts: int = 0
    restarts_empty: int = 0
    texts_reloaded: int = 0
    vectors_reencoded: int = 0

    def to_metrics(self, prefix: str = "env/") -> dict[str, float]:
        return {f"{prefix}{k}": float(v) for k, v in asdict(self).items()}


class CorpusIndexShard:
    """One shard of the corpus index (wrapped with ``ray.remote`` by :class:`CorpusIndexClient`).

    Args:
        config: :meth:`EnvConfig.to_dict` of the environment config.
        shard: this shard's number.
        num_shards: how many shards the corpus is split across.
    """

    def __init__(self, config: dict[str, Any], shard: int, num_shards: int) -> None:
        self.config = EnvConfig.from_dict(config)
        self.shard, self.num_shards = shard, num_shards
        faiss.omp_set_num_threads(self.config.search_threads or max(1, math.ceil(self.config.num_cpus)))
        self.index = CorpusIndex(self.config)
        self.restored_from: str | None = None
        self.restart: dict[str, Any] | None = None
        with warnings.catch_warnings():  # Ray's own property implementation warns about a deprecated call
            warnings.simplefilter("ignore", DeprecationWarning)
            reconstructed = ray.get_runtime_context().was_current_actor_reconstructed
        if reconstructed:
            self.restart = self._reload()

    def _meta(self) -> dict[str, int]:
        return {"shard": self.shard, "num_shards": self.num_shards}

    def _pointer(self) -> str | None:
        if self.config.state_dir is None:
            return None
        return os.path.join(self.config.state_dir, f"{shard_name(self.config, self.shard)}.json")

    def _reload(self) -> dict[str, Any]:
        """After a crash: reload the snapshot the pointer names; never fails (a missing or
        unreadable pointer or snapshot leaves the shard empty, said in the report)."""
        report: dict[str, Any] = {"pid": os.getpid(), "restored_from": None, "error": None}
        pointer = self._pointer()
        if pointer is None:
            report["error"] = "no state_dir is set, so no snapshot to reload"
        elif not os.path.isfile(pointer):
            report["error"] = f"no snapshot was recorded yet ({pointer} does not exist)"
        else:
            try:
                with open(pointer, encoding="utf-8") as f:
                    path = json.load(f)["snapshot"]
                self.index.restore(path, expect_meta=self._meta())
                report["restored_from"] = self.restored_from = path
            except (OSError, ValueError, KeyError, TypeError) as e:  # SnapshotError is a ValueError
                self.index = CorpusIndex(self.config)
                report["error"] = f"cannot reload the snapshot named by {pointer}: {type(e).__name__}: {e}"
        logger.error("corpus index shard %s restarted (pid %d): %s", shard_name(self.config, self.shard), os.getpid(),
                     f"reloaded {report['restored_from']}" if report["error"] is None else f"started empty: {report['error']}")
        return report

    def restart_report(self) -> dict[str, Any] | None:
        """After a crash until :meth:`acknowledge_restart`: ``{pid, restored_from, error}``
        (``error`` set when the shard restarted empty); None otherwise."""
        return self.restart

    def acknowledge_restart(self, texts_only: bool = False) -> None:
        """The restart has been repaired (see :meth:`CorpusIndexClient.recover`); ``texts_only``:
        the lost texts are back, vectors are still to be re-encoded."""
        if texts_only and self.restart is not None:
            self.restart["texts_restored"] = True
        else:
            self.restart = None

    def without_vector(self, batch: int = 8192) -> list[str]:
        """Ids of documents with a text but no vector (after a restart: what must be re-encoded)."""
        ids = self.index.doc_ids()
        if len(self.index) >= len(ids):
            return []
        return [d for start in range(0, len(ids), batch)
                for d, found in zip(ids[start : start + batch], self.index.get(ids[start : start + batch])[2]) if not found]

    def info(self) -> dict[str, Any]:
        """Shard number, sizes (vectors, texts), dimension, the snapshot it was restored from after a
        restart, process id and config."""
        return {"shard": self.shard, "num_shards": self.num_shards, "n_vectors": len(self.index),
                "n_texts": self.index.num_texts, "dim": self.index.dim, "restored_from": self.restored_from,
                "restart": self.restart, "pid": os.getpid(), "config": self.config.to_dict()}

    def search(self, query_vecs: np.ndarray, k: int) -> tuple[list[list[str]], np.ndarray]:
        return self.index.search(query_vecs, k)

    def get(self, ids: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return self.index.get(ids)

    def upsert(self, ids: list[str], vecs: np.ndarray, version: int, update_graph: bool = True) -> None:
        self.index.upsert(ids, vecs, version, update_graph)

    def remove(self, ids: list[str]) -> int:
        return self.index.remove(ids)

    def neighbours(self, ids: list[str], vecs: np.ndarray | None = None, version: int | None = None) -> list[list[str]]:
        return self.index.neighbours(ids, vecs, version)

    def add_texts(self, ids: list[str], texts: list[str]) -> None:
        self.index.add_texts(ids, texts)

    def texts(self, ids: list[str]) -> list[str]:
        return self.index.texts(ids)

    def doc_ids(self) -> list[str]:
        return self.index.doc_ids()

    def staleness(self, version: int, tolerance: int | None = None) -> StalenessStats:
        return self.index.staleness(version, tolerance)

    def save(self, path: str) -> None:
        """Snapshot this shard to ``path`` (atomic)."""
        self.index.save(path, meta=self._meta())

    def restore(self, path: str) -> None:
        """Load the snapshot at ``path`` (refused unless written by this shard number of the
        same shard count) and record it as the restart point."""
        self.index.restore(path, expect_meta=self._meta())
        self.record_restore_point(path)

    def record_restore_point(self, path: str) -> None:
        """Remember ``path`` in ``state_dir`` as the snapshot to reload after a restart."""
        pointer = self._pointer()
        if pointer is not None:
            atomic_write_text(pointer, json.dumps({"snapshot": os.path.abspath(path)}))


class CorpusIndexClient:
    """The sharded corpus index, usable from any Ray worker: same read/write methods as
    :class:`CorpusIndex` plus :meth:`refresh`, :meth:`full_encode`, :meth:`snapshot` and
    :meth:`restore`. Picklable (it holds actor handles), so it can be passed to Ray tasks.

    Detached actors (the default) outlive the job that created them, state included: a later
    client with the same ``name`` and ``namespace`` attaches to them. The client refuses actors
    whose index settings (:data:`SHARD_KEYS`) differ from its config; call :meth:`shutdown` when
    done, or give each run its own ``name``.

    Args:
        config: the environment config (or a mapping for :meth:`EnvConfig.from_dict`).
        create: create missing shard actors (``get_if_exists``); False only connects and raises
            if a shard does not exist.
        texts_source: the corpus, to re-add the texts of a shard that restarted empty (see
            :data:`TextsSource`); without it such a shard is a :class:`ShardLostError`.
        encode: the encoder callback used to re-encode lost vectors when the call at hand has
            none (:meth:`snapshot`); :meth:`refresh` and :meth:`full_encode` use their own.
    """

    def __init__(
        self,
        config: EnvConfig | Mapping[str, Any],
        create: bool = True,
        texts_source: TextsSource | None = None,
        encode: EncodeFn | None = None,
    ) -> None:
        self.config = config if isinstance(config, EnvConfig) else EnvConfig.from_dict(config)
        if not ray.is_initialized():
            raise RuntimeError("CorpusIndexClient needs a Ray session: call ray.init() first")
        self.texts_source, self.encode = texts_source, encode
        self.recovery = RecoveryStats()
        self._reported = RecoveryStats()
        self._seen_restarts: set[tuple[int, int]] = set()
        self._version = 0
        cfg = self.config
        self.shards = []
        for i in range(cfg.num_shards):
            name = shard_name(cfg, i)
            if create:
                options = dict(name=name, namespace=cfg.namespace, get_if_exists=True, num_cpus=cfg.num_cpus,
                               max_concurrency=cfg.max_concurrency, max_restarts=cfg.max_restarts,
                               max_task_retries=cfg.max_task_retries)
                if cfg.detached:
                    options["lifetime"] = "detached"
                handle = ray.remote(CorpusIndexShard).options(**options).remote(cfg.to_dict(), i, cfg.num_shards)
            else:
                try:
                    handle = ray.get_actor(name, namespace=cfg.namespace)
                except ValueError:
                    raise ValueError(f"no corpus index shard {name!r} in Ray namespace {cfg.namespace!r}; "
                                     "create the index first (CorpusIndexClient(config, create=True))") from None
            self.shards.append(handle)
        for info in self.info():
            theirs = info["config"]
            differ = [k for k in SHARD_KEYS if theirs[k] != getattr(cfg, k)]
            if differ:
                raise ValueError(
                    f"shard actor {shard_name(cfg, info['shard'])!r} runs with "
                    f"{ {k: theirs[k] for k in differ} }, this client's config has "
                    f"{ {k: getattr(cfg, k) for k in differ} }; use another name or shut the old actors down"
                )

    @classmethod
    def connect(cls, config: EnvConfig | Mapping[str, Any]) -> CorpusIndexClient:
        """Attach to shards another process created."""
        return cls(config, create=False)

    def __getstate__(self) -> dict[str, Any]:
        # the encoder callback belongs to the creating process (e.g. the trainer's workers)
        return {**self.__dict__, "encode": None}

    # ------------------------------------------------------------------ crashed shards
    def recover(self, encode: EncodeFn | None = None, version: int | None = None) -> RecoveryStats:
        """Repair every shard that restarted since the last repair (see the module docstring).

        Args:
            encode: encoder for lost vectors (default: the client's ``encode``); with neither, the
                texts are re-added and the shard stays pending until a call that has one.
            version: policy version of ``encode`` (default: the last version this client saw).

        Returns:
            The cumulative :attr:`recovery` counts.

        Raises:
            ShardLostError: ``on_shard_restart`` is ``refuse``, or an empty shard's texts cannot
                be re-added (no ``texts_source``).
        """
        encode = encode or self.encode
        version = self._version if version is None else version
        reports = ray.get([s.restart_report.remote() for s in self.shards])
        for i, report in enumerate(reports):
            if report is not None:
                self._repair(i, report, encode, version)
        return self.recovery

    def _repair(self, i: int, report: dict[str, Any], encode: EncodeFn | None, version: int) -> None:
        shard, name, n = self.shards[i], shard_name(self.config, i), len(self.shards)
        empty = report["error"] is not None
        how = f"it reloaded {report['restored_from']} (later writes are lost)" if not empty else f"it started EMPTY: {report['error']}"
        empty &= not report.get("texts_restored", False)
        if (i, report["pid"]) not in self._seen_restarts:
            self._seen_restarts.add((i, report["pid"]))
            self.recovery.shard_restarts += 1
            self.recovery.restarts_empty += int(empty)
            logger.error("corpus index shard %s crashed and restarted (pid %d); %s", name, report["pid"], how)
        if self.config.on_shard_restart == "refuse":
            raise ShardLostError(f"corpus index shard {name} crashed and restarted; {how}. on_shard_restart=refuse: stopping "
                                 "(resume from the last checkpoint, or set on_shard_restart=reencode to repair it in place)")
        if empty:
            if self.texts_source is None:
                raise ShardLostError(f"corpus index shard {name} crashed and restarted empty ({report['error']}) and this client "
                                     "has no texts_source to re-add its documents from")
            ids, texts = self.texts_source(keep=lambda d: _shard_of_id(d, n) == i)
            ray.get(shard.add_texts.remote(list(ids), list(texts)))
            self.recovery.texts_reloaded += len(ids)
            logger.error("corpus index shard %s: re-added %d document texts", name, len(ids))
            ray.get(shard.acknowledge_restart.remote(texts_only=True))  # a second pass only re-encodes
        lost = ray.get(shard.without_vector.remote())
        if lost:
            if encode is None:
                logger.error("corpus index shard %s: %d documents have no vector; they are re-encoded at the next refresh",
                             name, len(lost))
                return
            texts = ray.get(shard.texts.remote(lost))
            vecs = encode_texts(encode, texts, self.config.encode_batch_size)
            ray.get(shard.upsert.remote(lost, vecs, version, False))
            self.recovery.vectors_reencoded += len(lost)
            logger.error("corpus index shard %s: re-encoded %d documents that lost their vector (version %d)", name, len(lost), version)
        ray.get(shard.acknowledge_restart.remote())

    def recovery_metrics(self, prefix: str = "env/") -> dict[str, float]:
        """Repairs since the previous call (:class:`RecoveryStats` fields) as tracking metrics, so
        a step logs the restarts it repaired and the sum over steps is the run's total
        (:attr:`recovery` keeps the running totals)."""
        now, before = self.recovery.to_metrics(prefix), self._reported.to_metrics(prefix)
        self._reported = dataclasses.replace(self.recovery)
        return {k: now[k] - before[k] for k in now}

    # ------------------------------------------------------------------ routing
    def _route(self, ids: Sequence[str]) -> list[np.ndarray]:
        """Positions of ``ids`` owned by each shard."""
        owner = shard_of(ids, len(self.shards))
        return [np.flatnonzero(owner == s) for s in range(len(self.shards))]

    def _scatter(self, method: str, ids: Sequence[str], *per_id: np.ndarray | None, **kwargs: Any) -> list[tuple[np.ndarray, Any]]:
        """Call ``method`` on every shard owning some of ``ids`` (with the matching rows of each
        ``per_id`` array); returns ``(positions, result)`` per called shard."""
        calls = []
        for shard, pos in zip(self.shards, self._route(ids)):
            if len(pos):
                args = [[ids[j] for j in pos]] + [None if a is None else np.asarray(a)[pos] for a in per_id]
                calls.append((pos, getattr(shard, method).remote(*args, **kwargs)))
        results = ray.get([ref for _, ref in calls])
        return [(pos, res) for (pos, _), res in zip(calls, results)]

    # ------------------------------------------------------------------ reads
    def search(self, query_vecs: np.ndarray, k: int) -> tuple[list[list[str]], np.ndarray]:
        """Top-k over all shards (see :meth:`CorpusIndex.search`)."""
        q = np.ascontiguousarray(query_vecs, dtype=np.float32)
        parts = ray.get([s.search.remote(q, k) for s in self.shards])
        if len(parts) == 1:
            return parts[0]
        scores = np.concatenate([p[1] for p in parts], axis=1)  # (Q, shards * k), -inf padded
        ids = np.full(scores.shape, None, dtype=object)
        for j, (shard_ids, _) in enumerate(parts):
            for i, row in enumerate(shard_ids):
                ids[i, j * k : j * k + len(row)] = row
        best = topk_merge(scores, k)
        return ([[d for d in ids[i, row] if d is not None] for i, row in enumerate(best)],
                np.take_along_axis(scores, best, axis=1))

    def get(self, ids: Sequence[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """See :meth:`CorpusIndex.get`."""
        parts = self._scatter("get", ids)
        dims = {res[0].shape[1] for _, res in parts} - {0}  # a shard without vectors (e.g. restarted empty) has dim 0
        if len(dims) > 1:
            raise ValueError(f"the shards hold vectors of different dimensions {sorted(dims)}")
        vecs = np.zeros((len(ids), dims.pop() if dims else 0), np.float32)
        versions = np.full(len(ids), -1, np.int64)
        found = np.zeros(len(ids), bool)
        for pos, (v, ver, f) in parts:
            versions[pos], found[pos] = ver, f
            if v.shape[1] == vecs.shape[1]:
                vecs[pos] = v
        return vecs, versions, found

    def neighbours(self, ids: Sequence[str], vecs: np.ndarray | None = None, version: int | None = None) -> list[list[str]]:
        """See :meth:`CorpusIndex.neighbours`; each shard's graph links documents of that shard."""
        out: list[list[str]] = [[] for _ in ids]
        for pos, res in self._scatter("neighbours", ids, vecs, version=version):
            for j, nb in zip(pos, res):
                out[j] = nb
        return out

    def texts(self, ids: Sequence[str]) -> list[str]:
        out: list[str] = [""] * len(ids)
        for pos, res in self._scatter("texts", ids):
            for j, t in zip(pos, res):
                out[j] = t
        return out

    def doc_ids(self) -> list[str]:
        """Ids of all documents with a text, shard by shard."""
        return [i for part in ray.get([s.doc_ids.remote() for s in self.shards]) for i in part]

    def staleness(self, version: int, tolerance: int | None = None) -> StalenessStats:
        return StalenessStats.merge(ray.get([s.staleness.remote(version, tolerance) for s in self.shards]))

    def info(self) -> list[dict[str, Any]]:
        """Per-shard :meth:`CorpusIndexShard.info` (sizes, dimension, restart restore point, config)."""
        return ray.get([s.info.remote() for s in self.shards])

    # ------------------------------------------------------------------ writes
    def add_texts(self, ids: Sequence[str], texts: Sequence[str]) -> None:
        if len(ids) != len(texts):
            raise ValueError(f"{len(ids)} ids but {len(texts)} texts")
        self._scatter("add_texts", ids, np.asarray(texts, dtype=object))

    def upsert(self, ids: Sequence[str], vecs: np.ndarray, version: int, update_graph: bool = True) -> None:
        """See :meth:`CorpusIndex.upsert` (each shard applies its part atomically)."""
        self._version = max(self._version, version)
        vecs = np.asarray(vecs, dtype=np.float32)
        if len(vecs) != len(ids):
            raise ValueError(f"{len(ids)} ids but {len(vecs)} vectors")
        self._scatter("upsert", ids, vecs, version=version, update_graph=update_graph)

    def remove(self, ids: Sequence[str]) -> int:
        return sum(res for _, res in self._scatter("remove", ids))

    # ------------------------------------------------------------------ environment
    def refresh(self, query_vecs: np.ndarray, relevant_ids: Sequence[Sequence[str]], version: int, encode: EncodeFn) -> RefreshResult:
        """One step's selective refresh over the shards (see :meth:`RefreshPlanner.refresh`),
        after repairing restarted shards; a shard that crashes during the refresh is repaired and
        the refresh run once more."""
        self._version = max(self._version, version)
        self.recover(encode, version)
        try:
            return RefreshPlanner(self.config).refresh(self, query_vecs, relevant_ids, version, encode)
        except Exception:
            if not any(ray.get([s.restart_report.remote() for s in self.shards])):
                raise
            logger.error("a corpus index shard restarted during the refresh: repairing it and refreshing again")
            self.recover(encode, version)
            return RefreshPlanner(self.config).refresh(self, query_vecs, relevant_ids, version, encode)

    def full_encode(self, encode: EncodeFn, version: int) -> int:
        """Encode the whole corpus (see :func:`verl_search_r3.env.planner.full_encode`), after
        repairing restarted shards."""
        self._version = max(self._version, version)
        self.recover(encode, version)
        return full_encode(self, encode, version, self.config.encode_batch_size, self.config.progress)

    def snapshot(self, path: str) -> None:
        """Atomically snapshot every shard into ``path/shard-XXXXX-of-XXXXX`` plus a manifest, and
        make it the snapshot each shard reloads after a restart. ``path`` must be on a file
        system every shard can reach. Restarted shards are repaired first (see :meth:`recover`)."""
        n = len(self.shards)
        self.recover()
        with atomic_directory(path) as tmp:
            ray.get([s.save.remote(os.path.join(tmp, _shard_dir(i, n))) for i, s in enumerate(self.shards)])
            write_snapshot_files(tmp, {}, {"num_shards": n, "shards": [_shard_dir(i, n) for i in range(n)]})
        ray.get([s.record_restore_point.remote(os.path.join(path, _shard_dir(i, n))) for i, s in enumerate(self.shards)])

    def restore(self, path: str) -> None:
        """Load a snapshot written by :meth:`snapshot` with the same number of shards."""
        meta = read_manifest(path)["meta"]
        n = len(self.shards)
        if meta.get("num_shards") != n:
            raise SnapshotError(f"{os.path.join(path, 'manifest.json')}: snapshot has {meta.get('num_shards')} shards, "
                                f"this index has {n}")
        ray.get([s.restore.remote(os.path.join(path, _shard_dir(i, n))) for i, s in enumerate(self.shards)])

    def shutdown(self) -> None:
        """Kill the shard actors (needed for ``detached`` ones, which outlive their creator)."""
        for s in self.shards:
            ray.kill(s, no_restart=True)
