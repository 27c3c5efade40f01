"""Shared pieces of the RL-environment benchmarks (``env_refresh.py``, ``env_scale.py``).

* :func:`synthetic_task` — a clustered synthetic corpus with prompts and relevant documents,
  generated in chunks (a million documents fit in memory as low-dimensional features).
* :class:`DriftingEncoder` — a document/query encoder whose weights take momentum random steps,
  the way a policy's embeddings drift during RL: ``f -> normalize(P f + W2 tanh(W1 f))`` where
  ``f`` is a document's feature vector (``--feature-dim``), ``P`` a fixed orthonormal lift to the
  embedding dimension (identity when the two are equal) and the adapter ``W1, W2`` drifts.
  Real embeddings have a low intrinsic dimension; the lift lets a 1536- or 3584-dim benchmark
  keep the ranking difficulty of the feature space instead of drowning it in isotropic noise.
* :class:`Simulation` — the task plus the encoder: the ``encode`` callback, the rollouts'
  query vectors of a step.
* :func:`corpus_rewards` — the reference reward of each query with the whole corpus
  re-encoded, streamed in chunks (never a full corpus matrix in memory);
  :func:`pool_rewards` — the reward over a refresh pool (what the reward manager receives).

The reward is the project's: nDCG@k of the relevant docs among the candidates ranked by cosine
(``verl_search_r3.rl.reward.score_ranking``).
"""

from __future__ import annotations

import argparse
import functools
import logging
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import faiss
import numpy as np

from verl_search_r3.env.arrays import l2_normalize
from verl_search_r3.env.backends import topk_merge

__all__ = ["Task", "DriftingEncoder", "Simulation", "add_data_args", "add_policy_args", "synthetic_task",
           "corpus_rewards", "pool_rewards", "ndcg", "set_threads", "peak_rss_reset", "peak_rss_bytes"]

GENERATE_ROWS = 16384
"""Documents generated (and re-encoded by the reference) per chunk."""


def add_data_args(p: argparse.ArgumentParser, corpus_size: int, dim: int, topics: int | None) -> argparse._ArgumentGroup:
    """The synthetic-corpus options (defaults differ per benchmark)."""
    g = p.add_argument_group("synthetic data")
    g.add_argument("--corpus-size", type=int, default=corpus_size, help="synthetic: number of documents (default: %(default)s)")
    g.add_argument("--dim", type=int, default=dim, help="embedding dimension (default: %(default)s)")
    g.add_argument("--feature-dim", type=int, default=None,
                   help="dimension of the documents' semantic features, lifted to --dim by a fixed orthonormal map "
                        "(default: --dim, no lift)")
    g.add_argument("--topics", type=int, default=topics,
                   help="topic clusters the documents fall into (default: %s)" % (topics or "corpus size / 50"))
    g.add_argument("--topic-spread", type=float, default=0.6, help="within-topic noise relative to the centre (default: %(default)s)")
    g.add_argument("--relevant-per-query", type=int, default=3, help="relevant documents per prompt (default: %(default)s)")
    g.add_argument("--query-noise", type=float, default=1.0, help="prompt feature = relevant mean + this much noise (default: %(default)s)")
    g.add_argument("--num-prompts", type=int, default=2000, help="distinct prompts to sample steps from (default: %(default)s)")
    return g


def add_policy_args(p: argparse.ArgumentParser, steps: int, prompts: int, rollouts: int, adapter_hidden: int) -> argparse._ArgumentGroup:
    """The simulated-policy options (defaults differ per benchmark)."""
    g = p.add_argument_group("simulated policy")
    g.add_argument("--steps", type=int, default=steps, help="training steps (policy versions 1..steps) (default: %(default)s)")
    g.add_argument("--prompts", type=int, default=prompts, help="prompts per step (default: %(default)s)")
    g.add_argument("--rollouts", type=int, default=rollouts, help="rollouts per prompt = query vectors per prompt (default: %(default)s)")
    g.add_argument("--rollout-noise", type=float, default=0.15, help="relative noise of a rollout's query feature (default: %(default)s)")
    g.add_argument("--adapter-hidden", type=int, default=adapter_hidden, help="hidden width of the drifting encoder (its cost) (default: %(default)s)")
    g.add_argument("--adapter-scale", type=float, default=1.0, help="initial output scale of the adapter branch (default: %(default)s)")
    g.add_argument("--drift", type=float, default=0.03, help="relative weight change of the encoder per step (default: %(default)s)")
    g.add_argument("--momentum", type=float, default=0.9, help="momentum of the encoder's random weight steps (default: %(default)s)")
    g.add_argument("--reward-k", type=int, default=10, help="nDCG cut-off of the reward (default: %(default)s)")
    return g


class DriftingEncoder:
    """``f -> normalize(P f + W2 tanh(W1 f))`` with adapter weights that take momentum random steps.

    Args:
        feature_dim: dimension of ``f``.
        dim: output (embedding) dimension; ``P`` is the identity when equal to ``feature_dim``,
            else a fixed random map with orthonormal rows (``|P f| = |f|``).
        hidden: adapter width (sets the encoding cost).
        scale: initial norm scale of the adapter branch relative to ``f``.
        drift: relative Frobenius-norm change of each weight matrix per :meth:`step`.
        momentum: momentum of the random step direction (a training run's steps correlate).
        rng: random generator.
    """

    def __init__(self, feature_dim: int, dim: int, hidden: int, scale: float, drift: float, momentum: float,
                 rng: np.random.Generator):
        self.w = [rng.standard_normal((feature_dim, hidden)).astype(np.float32) / np.sqrt(feature_dim),
                  rng.standard_normal((hidden, dim)).astype(np.float32) * (scale / np.sqrt(hidden))]
        self.v = [np.zeros_like(w) for w in self.w]
        self.drift, self.momentum, self.rng = drift, momentum, rng
        self.lift = None
        if feature_dim != dim:
            q, _ = np.linalg.qr(rng.standard_normal((dim, feature_dim)))
            self.lift = np.ascontiguousarray(q.T, dtype=np.float32)  # (feature_dim, dim), orthonormal rows

    def step(self) -> None:
        for i, w in enumerate(self.w):
            self.v[i] = self.momentum * self.v[i] + self.rng.standard_normal(w.shape).astype(np.float32)
            self.w[i] = w + self.drift * np.linalg.norm(w) * self.v[i] / np.linalg.norm(self.v[i])

    def __call__(self, feats: np.ndarray) -> np.ndarray:
        base = feats if self.lift is None else feats @ self.lift
        return l2_normalize(base + np.tanh(feats @ self.w[0]) @ self.w[1])


@dataclass
class Task:
    """Documents (ids, texts, features), prompts (query feature, relevance grades) and the
    embedding dimension the encoder maps features to."""

    dim: int
    doc_ids: list[str]
    doc_texts: list[str]
    doc_feats: np.ndarray
    prompt_feats: np.ndarray
    prompt_relevance: list[dict[str, int]]
    info: dict


def synthetic_task(args: argparse.Namespace, rng: np.random.Generator) -> Task:
    """Documents around ``--topics`` random centres in ``--feature-dim`` dims; a prompt's feature is
    the mean of its ``--relevant-per-query`` documents (one topic) plus ``--query-noise``."""
    n, d = args.corpus_size, args.feature_dim or args.dim
    topics = args.topics or max(1, n // 50)
    centres = l2_normalize(rng.standard_normal((topics, d)).astype(np.float32))
    topic = rng.integers(0, topics, n)
    feats = np.empty((n, d), np.float32)
    for start in range(0, n, GENERATE_ROWS):  # the same random stream as one call, in bounded memory
        m = min(GENERATE_ROWS, n - start)
        noise = l2_normalize(rng.standard_normal((m, d)).astype(np.float32))
        feats[start : start + m] = l2_normalize(centres[topic[start : start + m]] + args.topic_spread * noise)
    ids = [f"doc{i}" for i in range(n)]
    order = np.argsort(topic, kind="stable")
    by_topic = np.split(order, np.searchsorted(topic[order], np.arange(1, topics)))
    prompt_feats, relevance = [], []
    while len(relevance) < args.num_prompts:
        members = by_topic[rng.integers(topics)]
        if len(members) < args.relevant_per_query:
            continue
        rel = rng.choice(members, args.relevant_per_query, replace=False)
        intent = l2_normalize(feats[rel].mean(axis=0, keepdims=True))[0]
        prompt_feats.append(intent + args.query_noise * l2_normalize(rng.standard_normal((1, d)).astype(np.float32))[0])
        relevance.append({ids[j]: 1 for j in rel})
    return Task(args.dim, ids, ids, feats, l2_normalize(np.stack(prompt_feats)), relevance, {"topics": topics, "feature_dim": d})


class Simulation:
    """The task plus the drifting encoder: document encoding and per-step rollout queries.

    Args:
        args: the parsed options (policy group).
        task: the corpus and prompts.
        rng: random generator of the encoder's drift and the rollouts (seed it to replay a run).
    """

    def __init__(self, args: argparse.Namespace, task: Task, rng: np.random.Generator):
        self.args, self.task, self.rng = args, task, rng
        self.enc = DriftingEncoder(task.doc_feats.shape[1], task.dim, args.adapter_hidden, args.adapter_scale,
                                   args.drift, args.momentum, rng)
        self.row_of = {d: i for i, d in enumerate(task.doc_ids)}
        self.row_of_text = self.row_of if task.doc_texts is task.doc_ids else {t: i for i, t in enumerate(task.doc_texts)}

    def encode(self, texts: list[str]) -> np.ndarray:
        """The ``encode`` callback: current encoder on the documents with these texts."""
        return self.encode_rows(np.fromiter((self.row_of_text[t] for t in texts), np.int64, len(texts)))

    def encode_rows(self, rows: np.ndarray | slice) -> np.ndarray:
        """Current encoder on the documents at ``rows`` of the corpus."""
        return self.enc(self.task.doc_feats[rows])

    def encode_all(self, batch_size: int) -> np.ndarray:
        """``(n_docs, dim)``: every document, ``batch_size`` at a time (small corpora only)."""
        n = len(self.task.doc_ids)
        return np.concatenate([self.encode_rows(slice(i, min(i + batch_size, n))) for i in range(0, n, batch_size)])

    def queries(self, prompts: int, rollouts: int | None = None) -> tuple[np.ndarray, list[dict[str, int]]]:
        """``prompts x rollouts`` query vectors (rollouts = noisy copies; default ``--rollouts``)
        and their relevance."""
        task, a = self.task, self.args
        rollouts = rollouts or a.rollouts
        chosen = self.rng.choice(len(task.prompt_relevance), prompts, replace=len(task.prompt_relevance) < prompts)
        feats = np.repeat(task.prompt_feats[chosen], rollouts, axis=0)
        noise = l2_normalize(self.rng.standard_normal(feats.shape).astype(np.float32))
        return self.enc(l2_normalize(feats + a.rollout_noise * noise)), [task.prompt_relevance[p] for p in chosen for _ in range(rollouts)]


@functools.cache
def _score_ranking():
    """The reward module (it imports verl, whose start-up warnings would clutter the progress)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        level = logging.root.manager.disable
        logging.disable(logging.WARNING)
        try:
            from verl_search_r3.rl.reward import RewardConfig, score_ranking
        finally:
            logging.disable(level)
    return RewardConfig, score_ranking


def ndcg(ids: list[str], scores: np.ndarray, relevance: dict[str, int], k: int) -> float:
    """The project's reward: nDCG@k of the relevant docs among the ranked candidates."""
    reward_config, score_ranking = _score_ranking()
    return score_ranking(ids, scores.tolist(), relevance, reward_config(k=k)).ndcg


def corpus_rewards(queries: np.ndarray, vectors_of: Callable[[np.ndarray | slice], np.ndarray], n_docs: int,
                   doc_ids: list[str], row_of: dict[str, int], relevance: list[dict[str, int]], k: int,
                   chunk_rows: int = GENERATE_ROWS) -> list[float]:
    """nDCG@k of each query over the whole corpus: its exact top-k plus its relevant docs.

    ``vectors_of(rows)`` gives the corpus vectors at ``rows`` (a slice or an index array): the
    corpus is scanned in chunks of ``chunk_rows`` (the top-k merged), then the candidates' vectors
    are fetched again to score them, so no corpus-sized matrix is held.
    """
    best_s = np.full((len(queries), 0), -np.inf, np.float32)
    best_r = np.zeros((len(queries), 0), np.int64)
    for start in range(0, n_docs, chunk_rows):
        vecs = np.ascontiguousarray(vectors_of(slice(start, min(start + chunk_rows, n_docs))), dtype=np.float32)
        s, r = faiss.knn(queries, vecs, min(k, len(vecs)), metric=faiss.METRIC_INNER_PRODUCT)
        best_s, best_r = np.concatenate([best_s, s], axis=1), np.concatenate([best_r, r + start], axis=1)
        top = topk_merge(best_s, k)
        best_s, best_r = np.take_along_axis(best_s, top, axis=1), np.take_along_axis(best_r, top, axis=1)
    out = []
    for q, row, rel in zip(queries, best_r, relevance):
        rows = np.array(list(dict.fromkeys(row.tolist() + [row_of[d] for d in rel])))
        out.append(ndcg([doc_ids[r] for r in rows], vectors_of(rows) @ q, rel, k))
    return out


def pool_rewards(result, relevance: list[dict[str, int]], k: int) -> list[float]:
    """nDCG@k of each query over its refresh pool (what the reward manager receives)."""
    out = []
    for i, rel in enumerate(relevance):
        field = result.candidates_field(i)
        out.append(ndcg(field["doc_ids"], np.asarray(field["scores"]), rel, k))
    return out


def set_threads(threads: int) -> int:
    """FAISS OpenMP threads: ``threads`` > 0, else the CPUs this process may run on. Returns it."""
    n = threads or len(os.sched_getaffinity(0))
    faiss.omp_set_num_threads(n)
    return n


def peak_rss_reset() -> None:
    """Reset the kernel's peak-RSS mark of this process (Linux ``clear_refs``; no-op elsewhere)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def peak_rss_bytes() -> int:
    """Peak resident set size of this process since start or the last :func:`peak_rss_reset`."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
