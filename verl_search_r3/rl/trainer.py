"""The ``search_r3`` trainer: verl's V1 synchronous GRPO trainer with a reason-then-embed step.

Selected with ``trainer.v1.trainer_mode=search_r3``. It is :class:`PPOTrainerSync` with:

* the actor worker swapped for :class:`~verl_search_r3.rl.workers.SearchR3ActorRolloutRefWorker`;
* rewards computed *after* the old-log-prob pass (no streaming reward from the agent loop), so
  each step runs: rollout → old log-prob (+ query embeddings, same forward) → environment
  refresh and candidate ranking → reward → reference → GRPO advantages → actor update
  (PPO + InfoNCE against the fresh documents);
* the RL environment (:mod:`verl_search_r3.env`, Ray shard actors) started or attached in
  ``on_init_end``, filled from ``search_r3.corpus_path`` and encoded by the policy (or restored
  from ``search_r3.init_snapshot``, e.g. vectors of the Stage-1 model), and snapshotted into
  every verl checkpoint folder (``global_step_N/search_r3_env``), restored on resume;
* validation ranks the validation queries the same way: the reported ``reward`` and the
  ``ndcg`` extra are the retrieval nDCG@k of the validation queries under the current policy.

Every knob is under the ``search_r3`` config block (see ``recipes/README.md``).
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import ray
import torch
import transfer_queue as tq
from omegaconf import DictConfig, OmegaConf
from tensordict import TensorDict
from torch import Tensor
from verl import DataProto
from verl.experimental.reward_loop.reward_loop import RewardLoopManager
from verl.trainer.ppo.utils import Role
from verl.trainer.ppo.v1.trainer_base import register_trainer
from verl.trainer.ppo.v1.trainer_sync import PPOTrainerSync
from verl.utils import tensordict_utils as tu
from verl.utils.debug import marked_timer

from ..config_utils import dataclass_from_dict
from ..env import EnvConfig, RefreshResult
from ..env.actor import training_client
from ..env.corpus import load_corpus_texts
from ..prompts import embed_prompt_ids
from ..tokens import embed_token_id
from .engine import DOC_IDS_KEY, DOC_MASK_KEY, DOC_TOKEN_LENGTHS_KEY, DOC_TOKENS_KEY, DOCS_KEY, EMBEDDING_KEY, dense
from .reward import CANDIDATES_KEY, RewardConfig, relevance_from_ground_truth
from .workers import ContrastiveConfig, SearchR3ActorRolloutRefWorker, document_batch

logger = logging.getLogger(__name__)

__all__ = [
    "SearchR3Settings",
    "SearchR3Trainer",
    "contrastive_documents",
    "pool_grades",
    "document_prompt_fields",
    "reward_candidates",
    "doc_key",
]

ENV_SNAPSHOT_DIR = "search_r3_env"


@dataclass
class SearchR3Settings:
    """The ``search_r3`` config block.

    Attributes:
        corpus_path: ``corpus.parquet`` (``doc_id, title, text``) from ``data_prep/build_pairs.py``.
        doc_max_length: longest document prompt (tokens) the actor encodes.
        init_snapshot: environment snapshot to start from (e.g. Stage-1 vectors); None = encode
            the corpus with the initial policy.
        reward_candidates: per rollout, the best this-many pool documents (plus all its relevant
            documents) are passed to the reward manager; nDCG@k and the margin are exact for any
            value >= k, ranks beyond it are reported as just past it.
        val_refresh: refresh candidates with the current policy before ranking validation queries.
        reward, rollout, contrastive, env: sub-blocks (:class:`RewardConfig`,
            :class:`~verl_search_r3.rl.agent_loop.RolloutConfig`, :class:`ContrastiveConfig`
            + ``num_negatives``, :class:`EnvConfig`).
    """

    corpus_path: str
    doc_max_length: int = 512
    init_snapshot: str | None = None
    reward_candidates: int = 100
    val_refresh: bool = True
    num_negatives: int = 7
    reward: RewardConfig = field(default_factory=RewardConfig)
    contrastive: ContrastiveConfig = field(default_factory=ContrastiveConfig)
    env: EnvConfig = field(default_factory=EnvConfig)

    @classmethod
    def from_config(cls, config: DictConfig) -> SearchR3Settings:
        block = OmegaConf.select(config, "search_r3", default=None)
        if block is None:
            raise ValueError("the search_r3 trainer needs a `search_r3:` config block (see recipes/config/search_r3_grpo.yaml)")
        values: dict[str, Any] = OmegaConf.to_container(block, resolve=True)
        contrastive = dict(values.pop("contrastive", None) or {})
        values["num_negatives"] = int(contrastive.pop("num_negatives", cls.num_negatives))
        values.pop("rollout", None)  # read by the agent loop
        values["reward"] = dataclass_from_dict(RewardConfig, values.get("reward"), "search_r3.reward")
        values["contrastive"] = dataclass_from_dict(ContrastiveConfig, contrastive, "search_r3.contrastive")
        values["env"] = EnvConfig.from_dict(values.get("env"))
        return dataclass_from_dict(cls, values, "search_r3")


def doc_key(doc_id: str) -> int:
    """Stable non-negative int64 key of a document id (equal ids, equal keys), for the contrastive masks."""
    return int.from_bytes(hashlib.blake2b(doc_id.encode("utf-8"), digest_size=8).digest(), "little") >> 1


def pool_grades(result: RefreshResult, relevance: dict[str, int], doc_index: dict[str, int] | None = None) -> np.ndarray:
    """``(U,)`` grade of each pool document for one query (0 = not relevant).

    ``doc_index`` (pool doc id -> row) can be built once per step and shared by all rollouts;
    the cost is then O(relevant documents), not O(pool).
    """
    if doc_index is None:
        doc_index = {d: u for u, d in enumerate(result.doc_ids)}
    grades = np.zeros(len(result.doc_ids), dtype=np.int64)
    for doc, grade in relevance.items():
        row = doc_index.get(doc)
        if row is not None:
            grades[row] = grade
    return grades


def reward_candidates(result: RefreshResult, query: int, grades: np.ndarray, top: int) -> dict[str, list]:
    """The reward manager's candidate field for one rollout: its ``top`` best pool documents plus
    every relevant pool document (``grades > 0``, see :func:`pool_grades`), with their cosine
    scores (see :data:`CANDIDATES_KEY`)."""
    scores = result.scores[query]
    best = np.argpartition(-scores, top - 1)[:top] if top < len(scores) else np.arange(len(scores))
    keep = np.union1d(best, np.flatnonzero(grades > 0))
    return {"doc_ids": [result.doc_ids[u] for u in keep], "scores": scores[keep].tolist()}


def contrastive_documents(
    result: RefreshResult, query: int, grades: np.ndarray, num_negatives: int
) -> tuple[np.ndarray, list[str], np.ndarray]:
    """Fresh documents for one rollout's InfoNCE term (``grades`` from :func:`pool_grades`).

    Row 0 is the positive: the best-graded relevant document (ties: the one this rollout ranks
    highest). Rows 1..N are hard negatives: the non-relevant pool documents with fresh vectors
    this rollout ranks highest (over-budget stale candidates rank but never train). Returns
    ``(vectors (1 + N, H), ids, mask (1 + N,))``; padding rows are masked.
    """
    scores = result.scores[query]
    relevant = np.flatnonzero(grades > 0)
    if not relevant.size:
        raise ValueError(f"rollout {query}: none of its relevant documents is in the environment")
    positive = relevant[np.lexsort((-scores[relevant], -grades[relevant]))[0]]
    candidates = np.flatnonzero((grades <= 0) & result.fresh)
    negatives = candidates[np.argsort(-scores[candidates], kind="stable")[:num_negatives]]
    rows = np.concatenate([[positive], negatives])
    vecs = np.zeros((1 + num_negatives, result.doc_vecs.shape[1]), dtype=np.float32)
    vecs[: len(rows)] = result.doc_vecs[rows]
    mask = np.zeros(1 + num_negatives, dtype=bool)
    mask[: len(rows)] = True
    ids = [result.doc_ids[u] for u in rows] + [""] * (1 + num_negatives - len(rows))
    return vecs, ids, mask


def document_prompt_fields(
    id_lists: list[list[str]], texts_of: Callable[[list[str]], list[str]], tokenizer: Any, max_length: int
) -> dict[str, Tensor]:
    """The per-sample document prompts the actor re-encodes with gradient (``contrastive.doc_grad``).

    Args:
        id_lists: per sample, its contrastive document ids ("" = padding row).
        texts_of: document ids -> texts (the environment's ``texts``).
        tokenizer, max_length: document prompts as :func:`~verl_search_r3.prompts.embed_prompt_ids` builds them.

    Returns:
        :data:`DOC_TOKENS_KEY` nested ``(B, j)`` and :data:`DOC_TOKEN_LENGTHS_KEY` ``(B, K)``.
    """
    distinct = sorted({d for ids in id_lists for d in ids if d})
    prompts = dict(zip(distinct, (embed_prompt_ids(tokenizer, t, "document", max_length) for t in texts_of(distinct))))
    rows = [[prompts[d] if d else [] for d in ids] for ids in id_lists]
    tokens = torch.nested.as_nested_tensor(
        [torch.tensor([t for p in row for t in p], dtype=torch.long) for row in rows], layout=torch.jagged
    )
    return {DOC_TOKENS_KEY: tokens, DOC_TOKEN_LENGTHS_KEY: torch.tensor([[len(p) for p in row] for row in rows])}


@register_trainer("search_r3")
class SearchR3Trainer(PPOTrainerSync):
    """verl's synchronous V1 trainer with the Search-R3 step (see the module docstring)."""

    # ------------------------------------------------------------------ setup
    def _build_replay_buffer(self):
        # this trainer is the synchronous trainer: the base class branches on the mode name
        self.trainer_mode = "sync"
        return super()._build_replay_buffer()

    def _init_resource_pool_mgr(self):
        super()._init_resource_pool_mgr()
        for role in (Role.ActorRollout, Role.ActorRolloutRef, Role.Actor):
            if role in self.role_worker_mapping:
                self.role_worker_mapping[role] = ray.remote(SearchR3ActorRolloutRefWorker)

    def _load_checkpoint(self):
        super()._load_checkpoint()
        folder = os.path.join(self.config.trainer.default_local_dir, f"global_step_{self.global_steps}")
        snapshot = os.path.join(folder, ENV_SNAPSHOT_DIR)
        self._resume_env_snapshot = snapshot if self.global_steps > 0 and os.path.isdir(snapshot) else None

    def on_init_end(self):
        # rewards need the embeddings of the log-prob pass: never stream them from the rollout
        self.reward_loop_manager.__class__ = _RewardAfterLogProb
        self.search_r3 = SearchR3Settings.from_config(self.config)
        embed_token_id(self.tokenizer)  # fail early, with the fix in the message, if the model lacks the token
        self.actor_rollout_wg.configure_search_r3(contrastive=vars(self.search_r3.contrastive))
        # a crashed shard reloads the last checkpoint's environment and is repaired (texts, vectors) by the client
        self.env = training_client(self.search_r3.env, self.config.trainer.default_local_dir, self.search_r3.corpus_path,
                                   self._encode_documents)
        self._start_environment()
        super().on_init_end()

    def _start_environment(self) -> None:
        """Fill the index with the corpus texts and vectors (restored, or encoded by the policy)."""
        s = self.search_r3
        ids, texts = load_corpus_texts(s.corpus_path, progress=True)
        self.env.add_texts(ids, texts)
        snapshot = getattr(self, "_resume_env_snapshot", None) or s.init_snapshot
        if snapshot:
            logger.info("search_r3: restoring the environment from %s", snapshot)
            self.env.restore(snapshot)
        else:
            logger.info("search_r3: encoding %d documents with the initial policy", len(ids))
            self.env.full_encode(self._encode_documents, version=self.global_steps)

    def _save_checkpoint(self):
        super()._save_checkpoint()
        folder = os.path.join(self.config.trainer.default_local_dir, f"global_step_{self.global_steps}")
        self.env.snapshot(os.path.join(folder, ENV_SNAPSHOT_DIR))

    # ------------------------------------------------------------------ encode callback
    def _actor_dp_size(self) -> int:
        wg = self.actor_rollout_wg
        if "actor" not in wg._dispatch_info:
            wg._dispatch_info["actor"] = wg._query_dispatch_info("actor")
        return max(wg._dispatch_info["actor"]) + 1

    def _encode_documents(self, texts: list[str]) -> np.ndarray:
        """The environment's ``encode`` callback: document prompts through the actor, ``(n, H)``."""
        ids = [embed_prompt_ids(self.tokenizer, t, "document", self.search_r3.doc_max_length) for t in texts]
        rollout = self.config.actor_rollout_ref.rollout
        micro = 1 if rollout.log_prob_use_dynamic_bsz else int(rollout.log_prob_micro_batch_size_per_gpu)
        batch = document_batch(ids, pad_to_multiple=self._actor_dp_size() * micro)
        output = self.actor_rollout_wg.encode_documents(batch)
        return dense(output[EMBEDDING_KEY])[: len(texts)].float().numpy()

    # ------------------------------------------------------------------ the step
    @property
    def policy_version(self) -> int:
        """Number of actor updates behind the current weights (global step 1 runs version 0)."""
        return max(self.global_steps - 1, 0)

    def _step_once(self, metrics: dict, timing_raw: dict, sample_batch_size: int):
        with marked_timer("gen", timing_raw, color="red"):
            self.on_sample_begin()
            batch, off_policy_metrics = self.replay_buffer.sample(
                global_steps=self.global_steps, partition_id="train", batch_size=sample_batch_size
            )
            metrics.update(off_policy_metrics)
            batch.extra_info["temperature"] = self.config.actor_rollout_ref.rollout.temperature
            self.on_sample_end()
        batch = self._balance_batch(batch, metrics=metrics)
        with marked_timer("old_log_prob", timing_raw, color="blue"):
            batch = self._compute_old_log_prob(batch, metrics=metrics)
        with marked_timer("reward", timing_raw, color="yellow"):
            batch = self._rank_and_reward(batch, metrics, refresh=True, training=True)
        if self.use_reference_policy:
            with marked_timer("ref", timing_raw, color="olive"):
                batch = self._compute_ref_log_prob(batch, metrics=metrics)
        with marked_timer("adv", timing_raw, color="brown"):
            batch = self._compute_advantage(batch, metrics=metrics)
        if self.config.trainer.critic_warmup <= self.global_steps:
            with marked_timer("update_actor", timing_raw, color="red"):
                batch = self._update_actor(batch, metrics=metrics)
        return batch

    def _compute_reward_colocate(self, batch, metrics: dict | None = None):
        """Validation path (verl calls this with the rollout replicas asleep): one embedding pass, then rank."""
        batch.extra_info.update(
            {"calculate_entropy": False, "compute_loss": False, "temperature": self.config.actor_rollout_ref.rollout.temperature}
        )
        self.actor_rollout_wg.compute_log_prob(batch)
        return self._rank_and_reward(batch, metrics if metrics is not None else {}, refresh=self.search_r3.val_refresh, training=False)

    def _rank_and_reward(self, batch, metrics: dict, refresh: bool, training: bool):
        """Environment refresh + candidate ranking, the ``search_r3`` reward, and the contrastive documents."""
        s = self.search_r3
        fields = [EMBEDDING_KEY, "prompts", "responses", "reward_model", "data_source"]
        data = tq.kv_batch_get(keys=batch.keys, partition_id=batch.partition_id, select_fields=fields)
        query_vecs = dense(data[EMBEDDING_KEY]).float().numpy()
        reward_models = list(data["reward_model"])
        relevance = [relevance_from_ground_truth(rm["ground_truth"]) for rm in reward_models]
        relevant_ids = [[d for d, g in rel.items() if g >= s.reward.min_grade] for rel in relevance]

        if refresh:
            result = self.env.refresh(query_vecs, relevant_ids, self.policy_version, self._encode_documents)
        else:
            result = self._rank_without_refresh(query_vecs, relevant_ids)
        prefix = "env/" if training else "val-env/"
        metrics.update(result.stats.to_metrics(prefix))
        metrics.update(self.env.recovery_metrics(prefix))  # crashed shards repaired so far

        n = len(batch)
        doc_index = {d: u for u, d in enumerate(result.doc_ids)}
        grades = [pool_grades(result, relevance[i], doc_index) for i in range(n)]
        candidates = np.empty(n, dtype=object)
        candidates[:] = [reward_candidates(result, i, grades[i], s.reward_candidates) for i in range(n)]
        prompt_lengths = data["prompts"].offsets().diff()
        response_lengths = data["responses"].offsets().diff()
        prompts = data["prompts"].to_padded_tensor(padding=self.tokenizer.pad_token_id)
        responses = data["responses"].to_padded_tensor(padding=self.tokenizer.pad_token_id)
        attention_mask = torch.cat(
            [self._lengths_to_mask(prompt_lengths, prompts.size(1)), self._lengths_to_mask(response_lengths, responses.size(1))],
            dim=1,
        )
        rm_input = DataProto(
            batch=TensorDict({"prompts": prompts, "responses": responses, "attention_mask": attention_mask}, batch_size=n),
            non_tensor_batch={
                "reward_model": _object_array(reward_models),
                "data_source": _object_array(list(data["data_source"])),
                CANDIDATES_KEY: candidates,
            },
        )
        rm_output = self.reward_loop_manager.compute_rm_score(rm_input)
        padded = rm_output.batch["rm_scores"]
        write_back: dict[str, Any] = {
            "rm_scores": torch.nested.as_nested_tensor([padded[i, : response_lengths[i]] for i in range(n)], layout=torch.jagged)
        }
        for key in rm_output.meta_info.get("reward_extra_keys", []):
            write_back[key] = rm_output.non_tensor_batch[key]
            values = np.asarray(rm_output.non_tensor_batch[key], dtype=np.float64)
            metrics[f"{'search_r3' if training else 'val-search_r3'}/{key}"] = float(values.mean())
        if training and s.contrastive.coef:
            docs = [contrastive_documents(result, i, grades[i], s.num_negatives) for i in range(n)]
            write_back[DOCS_KEY] = torch.from_numpy(np.stack([d[0] for d in docs]))
            write_back[DOC_IDS_KEY] = torch.tensor([[doc_key(x) if x else -1 - j for j, x in enumerate(d[1])] for d in docs])
            write_back[DOC_MASK_KEY] = torch.from_numpy(np.stack([d[2] for d in docs]).astype(np.int64))
            if s.contrastive.doc_grad:
                write_back.update(document_prompt_fields([d[1] for d in docs], self.env.texts, self.tokenizer, s.doc_max_length))
        tq.kv_batch_put(keys=batch.keys, partition_id=batch.partition_id, fields=tu.get_tensordict(write_back))
        return batch

    def _rank_without_refresh(self, query_vecs: np.ndarray, relevant_ids: list[list[str]]) -> RefreshResult:
        """Rank against the stored (possibly stale) vectors: candidates plus relevant docs, no encoding."""
        from ..env.planner import RefreshPlanner

        planner = RefreshPlanner(self.search_r3.env.replace(budget=0, staleness_tolerance=1 << 30, full_refresh_every=0))
        return planner.refresh(self.env, query_vecs, relevant_ids, self.policy_version, self._encode_documents)


class _RewardAfterLogProb(RewardLoopManager):
    """verl's reward-loop manager, never handed to the agent loop: the reward runs after the log-prob pass."""

    @property
    def reward_loop_worker_handles(self):
        return None


def _object_array(items: list) -> np.ndarray:
    arr = np.empty(len(items), dtype=object)
    arr[:] = items
    return arr
