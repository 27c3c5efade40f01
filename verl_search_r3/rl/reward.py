"""Search-R3 ranking reward: pure scoring functions and the ``search_r3`` reward manager.

A rollout's query embedding is compared (cosine) with the environment's candidate documents,
whose vectors are *fresh* (re-encoded by the current policy, see :mod:`verl_search_r3.env`).
The score is a DCG-based measure of where the query's relevant documents land in that ranking.
The paper calls its reward "DCG-scaled" without publishing the formula; ours:

* ``mode="ndcg"`` (default): nDCG@k with *linear graded gains* and ``log2(rank + 1)`` discount,
  the trec_eval / pytrec_eval definition, so the reward of a query equals the evaluation
  metric of that query. The ideal DCG uses all known relevant documents of the query.
* ``mode="rr"``: reciprocal rank of the first relevant document (0 beyond ``k``).
* ``margin_weight > 0`` adds ``margin_weight · (best relevant cosine − best non-relevant
  cosine)``: a continuous term that keeps a signal once the top ranks saturate (the criticism
  of rank-only rewards raised by ELVA, Liu et al.).

Ties are broken *against* the relevant documents (pessimistic): a collapsed embedding that
scores every candidate equally earns the minimum, never a lucky rank. A response without an
embed token scores ``missing_token_score`` with ``format_ok = 0``.

Degenerate input has a defined result: a rollout whose query embedding was refused by the
environment (NaN/inf or all zero: no candidates) or gave only non-finite scores scores
``missing_token_score`` too, with ``invalid_embedding = 1`` (logged as a metric); a single
non-finite candidate score ranks that candidate last; a candidate id given twice counts once,
with its best score. Grades must be whole numbers: anything else in the ground truth is an error
naming the document.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np
from omegaconf import OmegaConf
from verl.experimental.reward_loop.reward_manager import register
from verl.experimental.reward_loop.reward_manager.base import RewardManagerBase

from ..config_utils import dataclass_from_dict
from ..data.collection import parse_grade
from ..tokens import embed_token_id

__all__ = [
    "RewardConfig",
    "RankingScore",
    "dcg",
    "rank_candidates",
    "relevance_from_ground_truth",
    "score_ranking",
    "missing_token_score",
    "SearchR3RewardManager",
    "CANDIDATES_KEY",
]

CANDIDATES_KEY = "search_r3_candidates"
"""Non-tensor batch field the trainer fills per rollout: ``{"doc_ids": [...], "scores": [...]}``;
empty lists for a query the environment refused (see :func:`score_ranking`)."""


@dataclass(frozen=True)
class RewardConfig:
    """Knobs of the ranking reward (the ``search_r3.reward`` block of the verl config).

    Attributes:
        mode: ``"ndcg"`` or ``"rr"``.
        k: rank cut-off of the measure.
        margin_weight: weight of the continuous similarity margin (0 disables it).
        missing_token_score: score of a response without ``<|embed_token|>``; below every
            reachable score so GRPO always prefers emitting the token.
        min_grade: grades >= this count as relevant.
    """

    mode: Literal["ndcg", "rr"] = "ndcg"
    k: int = 10
    margin_weight: float = 0.0
    missing_token_score: float = -1.0
    min_grade: int = 1

    def __post_init__(self) -> None:
        if self.mode not in ("ndcg", "rr"):
            raise ValueError(f"reward mode must be 'ndcg' or 'rr', got {self.mode!r}")
        if self.k < 1:
            raise ValueError("reward k must be >= 1")


@dataclass(frozen=True)
class RankingScore:
    """Score of one rollout and the per-sample extras logged with it.

    ``first_relevant_rank`` is 1-based; ``len(candidates) + 1`` when no relevant document is
    among the candidates (or the response has no embed token). ``invalid_embedding`` is 1 when the
    query embedding gave no finite score (then the score is the missing-token score).
    """

    score: float
    format_ok: int
    ndcg: float
    reciprocal_rank: float
    first_relevant_rank: int
    recall_at_k: float
    margin: float
    invalid_embedding: int = 0

    def as_dict(self) -> dict[str, float]:
        return {k: float(v) for k, v in asdict(self).items()}


def dcg(gains: Sequence[float]) -> float:
    """``Σ_i gains[i] / log2(i + 2)`` over the given (already ranked and cut) gains."""
    return float(sum(g / math.log2(i + 2) for i, g in enumerate(gains)))


def rank_candidates(scores: Sequence[float], relevant: Sequence[bool]) -> np.ndarray:
    """Candidate order by descending score; on equal scores non-relevant documents come first."""
    s = np.asarray(scores, dtype=np.float64)
    rel = np.asarray(relevant, dtype=bool)
    return np.lexsort((rel, -s))  # last key is primary: score desc, then relevant after non-relevant


def relevance_from_ground_truth(ground_truth: Any) -> dict[str, int]:
    """Normalise ``reward_model.ground_truth`` into ``{doc_id: grade}``.

    Accepted shapes: ``{"doc_ids": [...], "grades": [...]}`` (what ``data_prep`` writes), a
    mapping ``{doc_id: grade}``, or a list of doc ids (grade 1 each).
    """
    if isinstance(ground_truth, Mapping) and "doc_ids" in ground_truth:
        ids, grades = ground_truth["doc_ids"], ground_truth.get("grades")
        if not isinstance(ids, (list, tuple, np.ndarray)):
            raise ValueError(f"ground_truth doc_ids must be a list of ids, got {type(ids).__name__}")
        if grades is not None and not isinstance(grades, (list, tuple, np.ndarray)):
            raise ValueError(f"ground_truth grades must be a list of whole numbers, got {type(grades).__name__}")
        ids = list(ids)
        grades = [1] * len(ids) if grades is None else list(grades)
        if len(grades) != len(ids):
            raise ValueError(f"ground_truth has {len(ids)} doc_ids but {len(grades)} grades")
        return {str(d): _grade(d, g) for d, g in zip(ids, grades)}
    if isinstance(ground_truth, Mapping):
        return {str(d): _grade(d, g) for d, g in ground_truth.items()}
    if isinstance(ground_truth, (list, tuple, np.ndarray)):
        return {str(d): 1 for d in ground_truth}
    raise ValueError(f"unsupported ground_truth {type(ground_truth).__name__}: expected doc ids with grades")


def _grade(doc_id: Any, grade: Any) -> int:
    g = parse_grade(grade)
    if g is None:
        raise ValueError(f"ground_truth grade of document {str(doc_id)!r} is {grade!r}; grades must be whole numbers")
    return g


def missing_token_score(n_candidates: int, config: RewardConfig, invalid_embedding: bool = False) -> RankingScore:
    """The defined score of a response that has no embed token (or, ``invalid_embedding``, whose
    embedding gave no finite score)."""
    return RankingScore(config.missing_token_score, 0, 0.0, 0.0, n_candidates + 1, 0.0, 0.0, int(invalid_embedding))


def _merge_duplicates(ids: Sequence[str], scores: np.ndarray) -> tuple[list[str], np.ndarray]:
    """Each id once, in order of first appearance, with its best score (non-finite ones count
    only when the id has no finite score)."""
    ids = [str(d) for d in ids]
    if len(set(ids)) == len(ids):
        return ids, scores
    best: dict[str, float] = {}
    for d, s in zip(ids, scores):
        old = best.get(d)
        if old is None or (np.isfinite(s) and (not np.isfinite(old) or s > old)):
            best[d] = s
    return list(best), np.array(list(best.values()), dtype=np.float64)


def score_ranking(
    candidate_ids: Sequence[str],
    candidate_scores: Sequence[float],
    relevance: Mapping[str, int],
    config: RewardConfig = RewardConfig(),
) -> RankingScore:
    """Score one query's ranking.

    Args:
        candidate_ids: ``(C,)`` candidate document ids (should include the relevant ones); an id
            given twice counts once, with its best score.
        candidate_scores: ``(C,)`` cosine similarities of the query embedding with the candidates;
            none, or all non-finite = an invalid embedding (the missing-token score); some
            non-finite = those candidates rank last.
        relevance: ``{doc_id: grade}`` of the query (grades < ``min_grade`` are ignored).
        config: reward knobs.
    """
    if len(candidate_ids) != len(candidate_scores):
        raise ValueError(f"{len(candidate_ids)} candidate ids but {len(candidate_scores)} scores")
    candidate_ids, s = _merge_duplicates(candidate_ids, np.asarray(candidate_scores, dtype=np.float64))
    finite = np.isfinite(s)
    if not finite.any():  # no candidate at all (the query was not searched) or only NaN/inf scores
        return missing_token_score(len(candidate_ids), config, invalid_embedding=True)
    s = np.where(finite, s, -np.inf)  # a non-finite score (a NaN/inf vector) ranks its candidate last
    grades = {d: g for d, g in relevance.items() if g >= config.min_grade}
    gains = np.array([grades.get(d, 0) for d in candidate_ids], dtype=np.float64)
    is_rel = gains > 0
    order = rank_candidates(s, is_rel)
    ranked_gains = gains[order]
    k = config.k

    ideal = dcg(sorted(grades.values(), reverse=True)[:k])
    ndcg = dcg(ranked_gains[:k]) / ideal if ideal > 0 else 0.0
    hits = np.flatnonzero(ranked_gains > 0)
    first = int(hits[0]) + 1 if hits.size else len(candidate_ids) + 1
    rr = 1.0 / first if first <= k else 0.0
    recall = float((ranked_gains[:k] > 0).sum() / len(grades)) if grades else 0.0

    rel_ok, other_ok = is_rel & finite, ~is_rel & finite
    margin = float(s[rel_ok].max() - s[other_ok].max()) if rel_ok.any() and other_ok.any() else 0.0
    base = ndcg if config.mode == "ndcg" else rr
    return RankingScore(base + config.margin_weight * margin, 1, ndcg, rr, first, recall, margin)


@register("search_r3")
class SearchR3RewardManager(RewardManagerBase):
    """verl reward-loop manager ``search_r3``: DCG-based ranking reward of a query embedding.

    Select with ``reward.reward_manager.name=search_r3`` (entry-point registration) or
    ``reward.reward_manager.source=importlib
    reward.reward_manager.module.path=pkg://verl_search_r3.rl.reward
    reward.reward_manager.name=SearchR3RewardManager``. Knobs come from the config block
    ``search_r3.reward`` (:class:`RewardConfig` fields).

    Per sample it reads the response tokens (is there an ``<|embed_token|>``?),
    ``reward_model.ground_truth`` (relevant ids and grades) and the non-tensor field
    :data:`CANDIDATES_KEY`, which the ``search_r3`` trainer fills after the environment refresh
    with the candidate ids and their cosine similarity to this rollout's query embedding.
    """

    def __init__(self, config, tokenizer, compute_score=None, reward_router_address=None, reward_model_tokenizer=None, **kwargs):
        super().__init__(config, tokenizer, compute_score)
        knobs = OmegaConf.select(config, "search_r3.reward", default=None) if config is not None else None
        self.reward_config = dataclass_from_dict(RewardConfig, knobs, "search_r3.reward")
        self.embed_token_id = embed_token_id(tokenizer)

    async def run_single(self, data) -> dict:
        item = data[-1]
        responses = item.batch["responses"]
        valid = int(item.batch["attention_mask"][-responses.shape[-1]:].sum())
        has_token = bool((responses[:valid] == self.embed_token_id).any())
        candidates = item.non_tensor_batch.get(CANDIDATES_KEY)
        if candidates is None:
            raise KeyError(
                f"the search_r3 reward needs the {CANDIDATES_KEY!r} field filled by the search_r3 trainer "
                "(trainer.v1.trainer_mode=search_r3)"
            )
        ids, scores = list(candidates["doc_ids"]), list(candidates["scores"])
        if has_token:
            relevance = relevance_from_ground_truth(item.non_tensor_batch["reward_model"]["ground_truth"])
            result = score_ranking(ids, scores, relevance, self.reward_config)
        else:
            result = missing_token_score(len(ids), self.reward_config)
        return {"reward_score": result.score, "reward_extra_info": result.as_dict()}
