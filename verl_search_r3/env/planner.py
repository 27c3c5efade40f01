"""Selective refresh: re-encode only the document vectors that can change this step's rewards.

One GRPO step gives query embeddings (one per rollout) from the current policy (version ``v``)
and each query's relevant doc ids. :meth:`RefreshPlanner.refresh` then

1. searches the index (whose vectors may be stale) for each query's top ``candidates_k``, one
   batched search for all queries; degenerate query vectors (NaN/inf, all zero) are left out
   (no search, no re-encode on their account, ``-inf`` scores, ``RefreshResult.valid`` False);
2. makes sure the relevant docs and those candidates have a *fresh* vector — version
   ``>= v - staleness_tolerance`` — re-encoding the others with the ``encode`` callback
   (relevant docs always; candidates best-rank first, at most ``budget`` and
   ``budget_per_query * Q`` of them; candidates past the budget stay in the pool with their
   stored, stale vector and ``fresh=False``); what ``encode`` returns is checked (shape,
   dimension, no NaN/inf or all-zero vector) before anything is written;
3. with the neighbour graph on (``graph_k > 0``, off by default): ranks the fresh pool by
   cosine and takes, per query, the ``expand_top`` best docs plus the relevant ones; their
   neighbours in the index's document graph join the pool (encoded under what is left of the
   budget) — they catch documents the stale index ranked too low;
4. writes every new vector back in **one** ``upsert`` (readers see the refresh whole or not at
   all; the upsert also updates the neighbour graph), and
5. returns the pool with its stored vectors and the cosine of every query with every pool doc.

Everything goes through the index's public methods, so the same planner drives a local
:class:`~verl_search_r3.env.index.CorpusIndex` and the sharded Ray
:class:`~verl_search_r3.env.actor.CorpusIndexClient`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Protocol

import numpy as np
from tqdm.auto import tqdm

from .arrays import check_vectors, degenerate_rows, l2_normalize
from .config import EnvConfig
from .store import StalenessStats

__all__ = ["EncodeFn", "IndexLike", "RefreshPlanner", "RefreshResult", "RefreshStats", "encode_texts", "full_encode"]

EncodeFn = Callable[[list[str]], np.ndarray]
"""``encode(texts) -> (len(texts), dim)`` document vectors from the current policy. ``texts`` are
``format_document(title, text)`` strings; the callback wraps them in the document prompt."""


class IndexLike(Protocol):
    """The index operations the planner uses (``CorpusIndex`` and ``CorpusIndexClient`` have them)."""

    def search(self, query_vecs: np.ndarray, k: int) -> tuple[list[list[str]], np.ndarray]: ...

    def get(self, ids: Sequence[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]: ...

    def upsert(self, ids: Sequence[str], vecs: np.ndarray, version: int, update_graph: bool = True) -> None: ...

    def neighbours(self, ids: Sequence[str], vecs: np.ndarray | None = None, version: int | None = None) -> list[list[str]]: ...

    def texts(self, ids: Sequence[str]) -> list[str]: ...

    def doc_ids(self) -> list[str]: ...

    def staleness(self, version: int, tolerance: int | None = None) -> StalenessStats: ...


def encode_texts(encode: EncodeFn, texts: Sequence[str], batch_size: int, dim: int = 0) -> np.ndarray:
    """``(n, dim)`` float32 vectors of ``texts``, calling ``encode`` on ``batch_size`` texts at a
    time and checking the shape of what it returns (``dim`` 0 = whatever the first batch has)."""
    parts = []
    for start in range(0, len(texts), batch_size):
        batch = list(texts[start : start + batch_size])
        out = np.asarray(encode(batch), dtype=np.float32)
        if out.ndim != 2 or len(out) != len(batch):
            raise ValueError(f"encode returned shape {out.shape} for {len(batch)} texts; expected ({len(batch)}, dim)")
        dim = dim or out.shape[1]
        if out.shape[1] != dim:
            raise ValueError(f"encode returned vectors of dimension {out.shape[1]}; the environment holds dimension {dim}")
        parts.append(out)
    return np.concatenate(parts) if parts else np.zeros((0, dim), np.float32)


def full_encode(
    index: IndexLike,
    encode: EncodeFn,
    version: int,
    batch_size: int = 256,
    progress: bool = True,
) -> int:
    """Encode every document of the corpus with ``encode`` and store the vectors at ``version``.

    Used for the first encode (e.g. by the Stage-1 model) and the periodic full refresh.

    Args:
        index: the index; its ``doc_ids()`` are the documents encoded.
        encode: the encoder callback.
        version: policy version of ``encode``.
        batch_size: documents per ``encode`` call and per ``upsert``.
        progress: show a tqdm progress bar.

    Returns:
        The number of documents encoded.
    """
    ids = index.doc_ids()
    with tqdm(total=len(ids), unit="doc", desc=f"full encode v{version}", disable=not progress) as bar:
        for start in range(0, len(ids), batch_size):
            batch = ids[start : start + batch_size]
            # graph rows are left to age: recomputing every row is O(N^2 dim); stale ones are
            # recomputed when the planner next asks for them
            vecs = encode_texts(encode, index.texts(batch), batch_size)
            check_vectors(batch, vecs, 0, "encode")
            index.upsert(batch, vecs, version, update_graph=False)
            bar.update(len(batch))
    return len(ids)


@dataclass
class RefreshStats:
    """What one refresh did (log with :meth:`to_metrics`).

    Attributes:
        version: the policy version refreshed to.
        n_queries: query vectors in the step.
        n_invalid_queries: of those, degenerate ones (NaN/inf or all zero): not searched, their
            relevant docs not refreshed, no scores (see :attr:`RefreshResult.valid`).
        n_requested: distinct docs considered: relevant, candidates and graph neighbours.
        n_neighbours: of those, docs that only the graph expansion brought in.
        n_encoded: docs re-encoded (the encoder's work this step).
        n_inserted: relevant docs that had no vector before (now encoded and inserted).
        n_skipped_fresh: requested docs whose stored vector was already fresh enough.
        n_over_budget: requested docs the budget left stale (in the pool with ``fresh=False``).
        budget_hit: ``n_over_budget > 0``.
        full_refresh: a periodic full re-encode ran at the start of this call.
        requested_mean_age / requested_max_age: age (versions) of the requested docs' stored
            vectors before the refresh (docs without a vector not counted).
        index: staleness of the whole index after the refresh.
        seconds: wall time of ``search`` (index search and get calls), ``graph`` (neighbour
            lookups, including rows computed on demand), ``encode`` (the callback),
            ``write`` (the upsert, with ANN and graph maintenance), ``score`` (pool cosines)
            and ``total``; ``total - encode`` is the environment's own cost.
    """

    version: int
    n_queries: int
    n_invalid_queries: int = 0
    n_requested: int = 0
    n_neighbours: int = 0
    n_encoded: int = 0
    n_inserted: int = 0
    n_skipped_fresh: int = 0
    n_over_budget: int = 0
    budget_hit: bool = False
    full_refresh: bool = False
    requested_mean_age: float = 0.0
    requested_max_age: int = 0
    index: StalenessStats | None = None
    seconds: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict:
        out = asdict(self)
        out["index"] = self.index.to_dict() if self.index is not None else None
        return out

    def to_metrics(self, prefix: str = "env/") -> dict[str, float]:
        """Flat float metrics for verl's tracking."""
        out = {f"{prefix}{name}": float(getattr(self, name)) for name in (
            "n_invalid_queries", "n_requested", "n_neighbours", "n_encoded", "n_inserted", "n_skipped_fresh", "n_over_budget",
            "budget_hit", "full_refresh", "requested_mean_age", "requested_max_age")}
        out.update({f"{prefix}seconds_{k}": v for k, v in self.seconds.items()})
        if self.index is not None:
            out.update(self.index.to_metrics(f"{prefix}index_"))
        return out


@dataclass
class RefreshResult:
    """The step's candidate pool with fresh vectors: what the reward manager ranks.

    The pool holds the documents this step's rewards depend on: each query's top-K under the
    index, the relevant docs of all queries and the graph neighbours of the best candidates.
    Their vectors are fresh (version >= ``stats.version - staleness_tolerance``) unless a
    ``budget`` ran out: candidates it could not pay for keep their stored, stale vector
    (``fresh[u] == False``) rather than vanish, since dropping strong competitors would inflate
    the reward. With no budget (the default) every pool vector is fresh. Every query is scored
    against the whole pool — a document retrieved for one rollout is a real corpus document for
    all of them, and a larger pool only brings the ranking closer to a full-corpus ranking.

    Attributes:
        doc_ids: ``(U,)`` pool doc ids.
        doc_vecs: ``(U, dim)`` float32 vectors as stored (L2-normalised when ``normalize``).
        doc_versions: ``(U,)`` int64 policy version of each vector.
        fresh: ``(U,)`` bool, the vector is within the staleness tolerance.
        scores: ``(Q, U)`` float32 cosine similarity of query ``i`` with pool doc ``u``
            (``-inf`` rows for invalid queries).
        valid: ``(Q,)`` bool; False for a degenerate query vector (NaN/inf or all zero, e.g. a
            broken forward pass): it was not searched and has no ranking — give that rollout the
            reward of a missing embedding.
        stats: what the refresh did.
    """

    doc_ids: list[str]
    doc_vecs: np.ndarray
    doc_versions: np.ndarray
    fresh: np.ndarray
    scores: np.ndarray
    valid: np.ndarray
    stats: RefreshStats

    def ranking(self, query: int, k: int | None = None) -> tuple[list[str], np.ndarray]:
        """Pool doc ids of ``query`` by descending cosine (the first ``k``) and their scores
        (empty for an invalid query)."""
        if not self.valid[query]:
            return [], np.zeros(0, np.float32)
        order = np.argsort(-self.scores[query], kind="stable")[:k]
        return [self.doc_ids[u] for u in order], self.scores[query, order]

    def candidates_field(self, query: int) -> dict[str, list]:
        """``{"doc_ids": [...], "scores": [...]}`` for ``query``: the per-rollout value of the
        reward manager's ``verl_search_r3.rl.reward.CANDIDATES_KEY`` field (empty lists for an
        invalid query)."""
        if not self.valid[query]:
            return {"doc_ids": [], "scores": []}
        return {"doc_ids": list(self.doc_ids), "scores": self.scores[query].tolist()}


def _unique(items: Iterable[str], exclude: Iterable[str] = ()) -> list[str]:
    """Items in first-seen order without duplicates or excluded ones."""
    seen = set(exclude)
    out = []
    for x in items:
        if x not in seen:
            seen.add(x)
            out.append(x)
    return out


def _rank_major(lists: Sequence[Sequence[str]]) -> Iterable[str]:
    """All queries' rank-1 items, then all rank-2 items, ... (a fair priority across queries)."""
    for r in range(max((len(x) for x in lists), default=0)):
        for x in lists:
            if r < len(x):
                yield x[r]


class RefreshPlanner:
    """Decides and performs the selective refresh of one step (see the module docstring).

    Args:
        config: uses ``candidates_k``, ``expand_top``, ``staleness_tolerance``, ``budget``,
            ``budget_per_query``, ``full_refresh_every``, ``encode_batch_size``, ``graph_k``,
            ``progress``.
    """

    def __init__(self, config: EnvConfig | None = None) -> None:
        self.config = config or EnvConfig()

    def full_refresh_due(self, index: IndexLike, version: int) -> bool:
        """Periodic full refresh: ``version`` is a multiple of ``full_refresh_every`` and some vector is stale."""
        every = self.config.full_refresh_every
        return bool(every) and version % every == 0 and index.staleness(version).n_stale > 0

    def refresh(
        self,
        index: IndexLike,
        query_vecs: np.ndarray,
        relevant_ids: Sequence[Sequence[str]],
        version: int,
        encode: EncodeFn,
    ) -> RefreshResult:
        """Refresh what this step's rewards depend on and return the fresh candidate pool.

        Args:
            index: the corpus index (local or Ray client).
            query_vecs: ``(Q, dim)`` query embeddings of the step (one per rollout).
            relevant_ids: Q lists of relevant doc ids (they must have a text in the index).
            version: current policy version (vectors encoded now are stamped with it).
            encode: document encoder of the current policy.

        Returns:
            The pool, its fresh vectors, the ``(Q, U)`` cosine scores and the refresh statistics.
        """
        cfg = self.config
        t_start = time.perf_counter()
        q = np.asarray(query_vecs, dtype=np.float32)
        if q.ndim != 2:
            raise ValueError(f"query_vecs must be (Q, dim), got shape {q.shape}")
        if len(relevant_ids) != len(q):
            raise ValueError(f"{len(q)} query vectors but {len(relevant_ids)} relevant-id lists")
        valid = ~degenerate_rows(q)
        stats = RefreshStats(version=version, n_queries=len(q), n_invalid_queries=int((~valid).sum()))
        seconds = dict.fromkeys(("search", "graph", "encode", "write", "score"), 0.0)
        if not valid.any():  # nothing to rank: no search, no encode, no write
            stats.index = index.staleness(version)
            seconds["total"] = time.perf_counter() - t_start
            stats.seconds = seconds
            return RefreshResult([], np.zeros((0, q.shape[1]), np.float32), np.zeros(0, np.int64), np.zeros(0, bool),
                                 np.full((len(q), 0), -np.inf, np.float32), valid, stats)
        qv = l2_normalize(q[valid])
        if self.full_refresh_due(index, version):
            full_encode(index, encode, version, cfg.encode_batch_size, cfg.progress)
            stats.full_refresh = True

        min_version = version - cfg.staleness_tolerance
        caps = [c for c in (cfg.budget, None if cfg.budget_per_query is None else cfg.budget_per_query * len(qv)) if c is not None]
        budget = min(caps, default=np.inf)
        relevant = _unique(str(d) for i, ids in enumerate(relevant_ids) if valid[i] for d in ids)
        pool: dict[str, np.ndarray] = {}  # doc id -> float32 vector (normalised)
        stale: set[str] = set()  # pool docs the budget left stale
        encoded_ids: list[str] = []
        encoded_vecs: list[np.ndarray] = []
        ages: list[np.ndarray] = []

        def make_fresh(ids: list[str], must: int) -> None:
            """Put ``ids`` into the pool, fresh; the first ``must`` ignore the budget, the rest
            spend it (over budget: with the stored vector, stale)."""
            nonlocal budget
            if not ids:
                return
            t = time.perf_counter()
            vecs, versions, found = index.get(ids)
            seconds["search"] += time.perf_counter() - t
            ages.append(version - versions[found])
            fresh = found & (versions >= min_version)
            stats.n_requested += len(ids)
            stats.n_skipped_fresh += int(fresh.sum())
            stats.n_inserted += int((~found[:must]).sum())
            todo = []
            for j, doc in enumerate(ids):
                if fresh[j]:
                    pool[doc] = vecs[j]
                elif j < must:
                    todo.append(j)
                elif budget > 0:
                    todo.append(j)
                    budget -= 1
                else:
                    stats.n_over_budget += 1
                    pool[doc] = vecs[j]  # only relevant docs can lack a vector, and they are `must`
                    stale.add(doc)
            if todo:
                t = time.perf_counter()
                todo_ids = [ids[j] for j in todo]
                new = encode_texts(encode, index.texts(todo_ids), cfg.encode_batch_size, dim=q.shape[1])
                check_vectors(todo_ids, new, q.shape[1], "encode")
                new = l2_normalize(new)
                seconds["encode"] += time.perf_counter() - t
                pool.update(zip(todo_ids, new))
                encoded_ids.extend(todo_ids)
                encoded_vecs.append(new)

        # 1-2. relevant docs and the index's top-K candidates (one batched search for all queries)
        t = time.perf_counter()
        candidates, _ = index.search(qv, cfg.candidates_k)
        seconds["search"] += time.perf_counter() - t
        first = relevant + _unique(_rank_major(candidates), exclude=relevant)
        make_fresh(first, must=len(relevant))

        # 3. graph neighbours of each query's best fresh candidates and of the relevant docs
        if cfg.expand_top and cfg.graph_k and len(pool) > len(stale):
            pool_ids = [d for d in pool if d not in stale]
            sims = qv @ l2_normalize(np.stack([pool[d] for d in pool_ids])).T
            best = np.argsort(-sims, axis=1, kind="stable")[:, : cfg.expand_top]
            seeds = _unique(list(_rank_major([[pool_ids[u] for u in row] for row in best])) + relevant)
            t = time.perf_counter()
            neighbours = index.neighbours(seeds, np.stack([pool[d] for d in seeds]), version)
            seconds["graph"] += time.perf_counter() - t
            second = _unique(_rank_major(neighbours), exclude=first)
            stats.n_neighbours = len(second)
            make_fresh(second, must=0)

        # 4. one write
        stats.n_encoded = len(encoded_ids)
        if encoded_ids:
            t = time.perf_counter()
            index.upsert(encoded_ids, np.concatenate(encoded_vecs), version)
            seconds["write"] = time.perf_counter() - t

        # 5. the pool as stored
        doc_ids = list(pool)
        t = time.perf_counter()
        doc_vecs, doc_versions, found = index.get(doc_ids)
        seconds["search"] += time.perf_counter() - t
        if not found.all():
            missing = [d for d, f in zip(doc_ids, found) if not f]
            raise RuntimeError(f"{len(missing)} pool docs vanished from the index during the refresh, e.g. {missing[:5]}")
        all_ages = np.concatenate(ages) if ages else np.zeros(0, np.int64)
        stats.requested_mean_age = float(all_ages.mean()) if len(all_ages) else 0.0
        stats.requested_max_age = int(all_ages.max()) if len(all_ages) else 0
        stats.budget_hit = stats.n_over_budget > 0
        stats.index = index.staleness(version)
        t = time.perf_counter()
        scores = np.full((len(q), len(doc_ids)), -np.inf, np.float32)
        scores[valid] = qv @ l2_normalize(doc_vecs).T
        seconds["score"] = time.perf_counter() - t
        seconds["total"] = time.perf_counter() - t_start
        stats.seconds = seconds
        fresh = doc_versions >= min_version
        return RefreshResult(doc_ids, doc_vecs, doc_versions, fresh, scores, valid, stats)
