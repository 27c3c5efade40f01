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
  every verl checkpoint folder (``global_step_N/search_r3_env``) before verl marks the step as
  the latest checkpoint; restored on resume (``trainer.resume_mode`` auto or ``resume_path``),
  pruned with the actor checkpoints (``trainer.max_actor_ckpt_to_keep``);
* only real rollouts whose response has the embed token reach the environment: verl's padding
  rows (tag ``is_padding``) get no reward and no contrastive documents, rollouts without the
  token get the missing-token score. ``search_r3/score`` and ``search_r3/format_ok`` average
  over all real rollouts, the ranking figures (``ndcg``, ``recall_at_k``, ...) over those with
  the token;
* validation (after the step's update and weight sync, so at policy version ``global_steps``)
  pads the batch to the actor's data-parallel split, ranks the validation queries the same way
  and reports ``val-search_r3/*`` and ``val-env/*`` next to verl's ``val-core``/``val-aux``
  figures (the reward extras go to verl in ``extra_fields["reward_extra_info"]``).

verl options the step cannot honour are refused at construction (:func:`check_verl_options`).
Every knob is under the ``search_r3`` config block (see ``recipes/README.md``).
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
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
from verl.trainer.ppo.padding_utils import upsample_batch_to_divisible_size
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
from .agent_loop import FORCED_KEY
from .engine import DOC_IDS_KEY, DOC_MASK_KEY, DOC_TOKEN_LENGTHS_KEY, DOC_TOKENS_KEY, DOCS_KEY, EMBEDDING_KEY, dense
from .reward import CANDIDATES_KEY, RewardConfig, relevance_from_ground_truth
from .workers import ContrastiveConfig, SearchR3ActorRolloutRefWorker, document_batch

logger = logging.getLogger(__name__)

__all__ = [
    "SearchR3Settings",
    "SearchR3Trainer",
    "StepFigures",
    "check_verl_options",
    "contrastive_documents",
    "pool_grades",
    "document_prompt_fields",
    "reward_candidates",
    "doc_key",
]

ENV_SNAPSHOT_DIR = "search_r3_env"
ALL_ROLLOUT_EXTRAS = ("score", "format_ok")
"""Reward extras averaged over every real rollout; the other (ranking) extras only over rollouts with the token."""


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


def check_verl_options(config: DictConfig) -> None:
    """Refuse verl options the Search-R3 step cannot honour, naming the key and the reason."""
    algorithm = config.get("algorithm", {}) or {}
    rollout_correction = algorithm.get("rollout_correction", None) or {}
    if rollout_correction.get("bypass_mode", False):
        raise ValueError(
            "search_r3 does not support algorithm.rollout_correction.bypass_mode=True: bypass mode skips the "
            "actor's old-log-prob pass, which is the forward that produces the query embeddings the reward ranks "
            "with; set algorithm.rollout_correction.bypass_mode=False"
        )
    filter_groups = algorithm.get("filter_groups", None) or {}
    if filter_groups.get("enable", False):
        raise ValueError(
            "search_r3 does not support algorithm.filter_groups.enable=True: group filtering needs the rewards at "
            "sampling time, but the search_r3 reward ranks with the embeddings of the old-log-prob pass, after "
            "sampling; set algorithm.filter_groups.enable=False"
        )


def _merge_env_metric(name: str, values: list[float]) -> float:
    """One validation figure from the per-batch refresh figures: the index's state is the last
    batch's, maxima and flags take the maximum, means and fractions the mean, counts and seconds add up."""
    if name.startswith("index_"):
        return float(values[-1])
    if "max" in name or name in ("budget_hit", "full_refresh"):
        return float(max(values))
    if "mean" in name or "fraction" in name:
        return float(np.mean(values))
    return float(sum(values))


@dataclass
class StepFigures:
    """The figures of one ranking call (one step, or one validation batch).

    Attributes:
        rollouts: reward extra -> its values over the rollouts it is reported on (see
            :data:`ALL_ROLLOUT_EXTRAS`).
        env: the environment's refresh figures (:meth:`RefreshStats.to_metrics` without prefix).
    """

    rollouts: dict[str, np.ndarray] = field(default_factory=dict)
    env: dict[str, float] = field(default_factory=dict)

    def metrics(self, validation: bool = False) -> dict[str, float]:
        """``search_r3/*`` (means) and ``env/*``; ``val-`` prefixed for validation. Empty extras are left out."""
        rollout_prefix, env_prefix = ("val-search_r3/", "val-env/") if validation else ("search_r3/", "env/")
        out = {f"{rollout_prefix}{k}": float(np.mean(v)) for k, v in self.rollouts.items() if len(v)}
        out.update({f"{env_prefix}{k}": v for k, v in self.env.items()})
        return out

    @staticmethod
    def merge(parts: list[StepFigures]) -> StepFigures:
        """The figures of several validation batches as one (see :func:`_merge_env_metric`)."""
        rollouts: dict[str, list[np.ndarray]] = {}
        env: dict[str, list[float]] = {}
        for part in parts:
            for k, v in part.rollouts.items():
                rollouts.setdefault(k, []).append(v)
            for k, v in part.env.items():
                env.setdefault(k, []).append(v)
        return StepFigures(
            rollouts={k: np.concatenate(v) for k, v in rollouts.items()},
            env={k: _merge_env_metric(k, v) for k, v in env.items()},
        )


@register_trainer("search_r3")
class SearchR3Trainer(PPOTrainerSync):
    """verl's synchronous V1 trainer with the Search-R3 step (see the module docstring)."""

    def __init__(self, config: DictConfig):
        check_verl_options(config)  # before verl builds anything
        self._val_figures: list[StepFigures] = []
        self._saved_env_snapshots: list[str] = []
        super().__init__(config)

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
        self._resume_env_snapshot = None
        if self.global_steps == 0:
            return
        trainer = self.config.trainer
        if trainer.resume_mode == "resume_path":  # verl resumed from this folder (relative = to the working dir)
            folder = os.path.abspath(trainer.resume_from_path)
        else:
            folder = os.path.abspath(os.path.join(trainer.default_local_dir, f"global_step_{self.global_steps}"))
        snapshot = os.path.join(folder, ENV_SNAPSHOT_DIR)
        if os.path.isdir(snapshot):
            self._resume_env_snapshot = snapshot
        else:
            logger.warning("search_r3: %s has no %s: the resumed policy re-encodes the corpus", folder, ENV_SNAPSHOT_DIR)

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
        folder = os.path.join(self.config.trainer.default_local_dir, f"global_step_{self.global_steps}")
        snapshot = os.path.join(folder, ENV_SNAPSHOT_DIR)
        # first: verl's last act is writing latest_checkpointed_iteration.txt, so a crash before it
        # leaves the previous (complete) checkpoint as the one resumed
        self.env.snapshot(snapshot)
        super()._save_checkpoint()
        self._prune_env_snapshots(snapshot)

    def _prune_env_snapshots(self, saved: str) -> None:
        """Keep the snapshots of the last ``max_actor_ckpt_to_keep`` checkpoints saved by this run,
        as verl's checkpoint manager does for ``global_step_N/actor``."""
        trainer = self.config.trainer
        keep = 1 if trainer.get("remove_previous_ckpt_in_save", False) else trainer.get("max_actor_ckpt_to_keep", None)
        self._saved_env_snapshots.append(saved)
        if not (isinstance(keep, int) and keep > 0):
            return
        while len(self._saved_env_snapshots) > keep:
            shutil.rmtree(self._saved_env_snapshots.pop(0), ignore_errors=True)

    # ------------------------------------------------------------------ encode callback
    def _actor_dp_size(self) -> int:
        wg = self.actor_rollout_wg
        if "actor" not in wg._dispatch_info:
            wg._dispatch_info["actor"] = wg._query_dispatch_info("actor")
        return max(wg._dispatch_info["actor"]) + 1

    def _log_prob_batch_multiple(self) -> int:
        """Batch sizes the actor's forward-only passes split evenly: data-parallel size × fixed micro-batch size."""
        rollout = self.config.actor_rollout_ref.rollout
        micro = 1 if rollout.log_prob_use_dynamic_bsz else int(rollout.log_prob_micro_batch_size_per_gpu)
        return self._actor_dp_size() * micro

    def _encode_documents(self, texts: list[str]) -> np.ndarray:
        """The environment's ``encode`` callback: document prompts through the actor, ``(n, H)``."""
        ids = [embed_prompt_ids(self.tokenizer, t, "document", self.search_r3.doc_max_length) for t in texts]
        batch = document_batch(ids, pad_to_multiple=self._log_prob_batch_multiple())
        output = self.actor_rollout_wg.encode_documents(batch)
        return dense(output[EMBEDDING_KEY])[: len(texts)].float().numpy()

    # ------------------------------------------------------------------ the step
    @property
    def policy_version(self) -> int:
        """Actor updates behind the weights of the current training step: verl runs step N with
        the weights of N - 1 updates (validation runs after step N's update: version N)."""
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
            figures = self._rank_and_reward(batch, refresh=True, version=self.policy_version, training=True)
            metrics.update(figures.metrics())
        if self.use_reference_policy:
            with marked_timer("ref", timing_raw, color="olive"):
                batch = self._compute_ref_log_prob(batch, metrics=metrics)
        with marked_timer("adv", timing_raw, color="brown"):
            batch = self._compute_advantage(batch, metrics=metrics)
        if self.config.trainer.critic_warmup <= self.global_steps:
            with marked_timer("update_actor", timing_raw, color="red"):
                batch = self._update_actor(batch, metrics=metrics)
        return batch

    def _validate(self) -> dict[str, float]:
        """verl's validation plus the Search-R3 figures of its batches (``val-search_r3/*``, ``val-env/*``)."""
        self._val_figures = []
        try:
            metrics = super()._validate()
            figures = StepFigures.merge(self._val_figures)
        finally:
            self._val_figures = []
        return {**metrics, **figures.metrics(validation=True)}

    def _compute_reward_colocate(self, batch, metrics: dict | None = None):
        """Validation path. verl calls it with the rollout replicas asleep, after the step's update
        and weight sync and before ``global_steps += 1``: the policy version is ``global_steps``.
        One embedding pass over the batch padded to the actor's split, then the ranking."""
        padded = upsample_batch_to_divisible_size(batch, self._log_prob_batch_multiple(), self.tokenizer.eos_token_id)
        padded.extra_info.update(
            {"calculate_entropy": False, "compute_loss": False, "temperature": self.config.actor_rollout_ref.rollout.temperature}
        )
        self.actor_rollout_wg.compute_log_prob(padded)
        figures = self._rank_and_reward(padded, refresh=self.search_r3.val_refresh, version=self.global_steps, training=False)
        if len(padded) > len(batch):
            tq.kv_clear(keys=padded.keys[len(batch):], partition_id=padded.partition_id)
        self._val_figures.append(figures)
        if metrics is not None:
            metrics.update(figures.metrics(validation=True))
        return batch

    def _rank_and_reward(self, batch, refresh: bool, version: int, training: bool) -> StepFigures:
        """Environment refresh + candidate ranking, the ``search_r3`` reward, and the contrastive documents.

        Only real rows (not tagged ``is_padding``) whose response has the embed token (a non-zero
        embedding row) are sent to the environment; padding rows get a zero reward and no
        documents. Validation also writes the reward extras into ``extra_fields`` for verl.
        """
        s = self.search_r3
        fields = [EMBEDDING_KEY, "prompts", "responses", "reward_model", "data_source", "extra_fields"]
        data = tq.kv_batch_get(keys=batch.keys, partition_id=batch.partition_id, select_fields=fields)
        query_vecs = dense(data[EMBEDDING_KEY]).float().numpy()
        n = len(batch)
        real = np.array([not tag.get("is_padding", False) for tag in batch.tags], dtype=bool)
        found = real & (query_vecs != 0).any(axis=1)  # a zero row: no embed token (NaN rows are the env's to judge)
        real_rows, found_rows = np.flatnonzero(real), np.flatnonzero(found)
        reward_models, data_sources = list(data["reward_model"]), list(data["data_source"])
        relevance = [relevance_from_ground_truth(reward_models[i]["ground_truth"]) for i in found_rows]
        relevant_ids = [[d for d, g in rel.items() if g >= s.reward.min_grade] for rel in relevance]

        if refresh:
            result = self.env.refresh(query_vecs[found_rows], relevant_ids, version, self._encode_documents)
        else:
            result = self._rank_without_refresh(query_vecs[found_rows], relevant_ids, version)

        doc_index = {d: u for u, d in enumerate(result.doc_ids)}
        grades = {i: pool_grades(result, relevance[j], doc_index) for j, i in enumerate(found_rows)}
        query_row = {i: j for j, i in enumerate(found_rows)}  # batch row -> row of result.scores
        candidates = np.empty(len(real_rows), dtype=object)
        candidates[:] = [
            reward_candidates(result, query_row[i], grades[i], s.reward_candidates) if found[i] else {"doc_ids": [], "scores": []}
            for i in real_rows
        ]
        prompt_lengths = data["prompts"].offsets().diff()
        response_lengths = data["responses"].offsets().diff()
        prompts = data["prompts"].to_padded_tensor(padding=self.tokenizer.pad_token_id)[real_rows]
        responses = data["responses"].to_padded_tensor(padding=self.tokenizer.pad_token_id)[real_rows]
        attention_mask = torch.cat(
            [
                self._lengths_to_mask(prompt_lengths[real_rows], prompts.size(1)),
                self._lengths_to_mask(response_lengths[real_rows], responses.size(1)),
            ],
            dim=1,
        )
        rm_input = DataProto(
            batch=TensorDict({"prompts": prompts, "responses": responses, "attention_mask": attention_mask}, batch_size=len(real_rows)),
            non_tensor_batch={
                "reward_model": _object_array([reward_models[i] for i in real_rows]),
                "data_source": _object_array([data_sources[i] for i in real_rows]),
                CANDIDATES_KEY: candidates,
            },
        )
        rm_output = self.reward_loop_manager.compute_rm_score(rm_input)
        scores = torch.zeros(n, rm_output.batch["rm_scores"].shape[1])
        scores[real_rows] = rm_output.batch["rm_scores"].float()
        write_back: dict[str, Any] = {
            "rm_scores": torch.nested.as_nested_tensor([scores[i, : response_lengths[i]] for i in range(n)], layout=torch.jagged)
        }
        figures = StepFigures(env={**result.stats.to_metrics(""), **self.env.recovery_metrics("")})
        extra_fields = [dict(f) if isinstance(f, dict) else {} for f in data["extra_fields"]]
        # rollouts whose token search_r3_agent appended (on_missing_token=force): format_ok counts them as written
        figures.rollouts["forced"] = np.array([float(bool(extra_fields[i].get(FORCED_KEY, False))) for i in real_rows])
        found_among_real = found[real_rows]
        extras: dict[str, np.ndarray] = {}
        for key in rm_output.meta_info.get("reward_extra_keys", []):
            values = np.asarray(rm_output.non_tensor_batch[key], dtype=np.float64)
            extras[key] = np.zeros(n)
            extras[key][real_rows] = values
            write_back[key] = extras[key]
            figures.rollouts[key] = values if key in ALL_ROLLOUT_EXTRAS else values[found_among_real]
        if not training:  # verl's _validate reads the reward extras from extra_fields
            for i, f in enumerate(extra_fields):
                f["reward_extra_info"] = {k: float(v[i]) for k, v in extras.items()}
            write_back["extra_fields"] = extra_fields
        if training and s.contrastive.coef:
            k = 1 + s.num_negatives
            none = (np.zeros((k, query_vecs.shape[1]), np.float32), [""] * k, np.zeros(k, bool))  # all rows masked
            trains = found & np.isfinite(query_vecs).all(axis=1)  # the loss skips a NaN/inf query anyway
            docs = [contrastive_documents(result, query_row[i], grades[i], s.num_negatives) if trains[i] else none for i in range(n)]
            write_back[DOCS_KEY] = torch.from_numpy(np.stack([d[0] for d in docs]))
            write_back[DOC_IDS_KEY] = torch.tensor([[doc_key(x) if x else -1 - j for j, x in enumerate(d[1])] for d in docs])
            write_back[DOC_MASK_KEY] = torch.from_numpy(np.stack([d[2] for d in docs]).astype(np.int64))
            if s.contrastive.doc_grad:
                write_back.update(document_prompt_fields([d[1] for d in docs], self.env.texts, self.tokenizer, s.doc_max_length))
        tq.kv_batch_put(keys=batch.keys, partition_id=batch.partition_id, fields=tu.get_tensordict(write_back))
        return figures

    def _rank_without_refresh(self, query_vecs: np.ndarray, relevant_ids: list[list[str]], version: int) -> RefreshResult:
        """Rank against the stored (possibly stale) vectors: candidates plus relevant docs, no encoding."""
        from ..env.planner import RefreshPlanner

        planner = RefreshPlanner(self.search_r3.env.replace(budget=0, staleness_tolerance=1 << 30, full_refresh_every=0))
        return planner.refresh(self.env, query_vecs, relevant_ids, version, self._encode_documents)


class _RewardAfterLogProb(RewardLoopManager):
    """verl's reward-loop manager, never handed to the agent loop: the reward runs after the log-prob pass."""

    @property
    def reward_loop_worker_handles(self):
        return None


def _object_array(items: list) -> np.ndarray:
    arr = np.empty(len(items), dtype=object)
    arr[:] = items
    return arr
