"""Document vectors keyed by string ids, each stamped with the policy version that produced it.

Layout: the live documents occupy dense rows ``0..n-1`` of a ``(capacity, dim)`` matrix in the
configured dtype (float32 or float16), with a parallel ``(n,)`` int64 version column. Each
document also gets a *key*: an int64 assigned at first insert and never reused, which is the
FAISS id of approximate backends and the node id of the neighbour graph, so neither has to be
renumbered when rows move. Removing documents compacts the rows (O(n), rare).

Not thread-safe on its own; :class:`~verl_search_r3.env.index.CorpusIndex` adds the lock.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np

from .arrays import VectorCodec, check_vectors, degenerate_rows, grow_rows, l2_normalize
from .backends import NO_KEY, exact_search, make_backend
from .config import EnvConfig

__all__ = ["VectorStore", "StalenessStats"]


@dataclass
class StalenessStats:
    """How old the stored vectors are relative to ``version`` (age = version - vector version).

    Attributes:
        version: the current policy version the ages are measured against.
        tolerance: ages ``<= tolerance`` count as fresh.
        n_vectors: documents with a vector.
        n_stale: documents whose age exceeds ``tolerance``.
        age_counts: ``{age: number of documents}`` (the staleness histogram).
    """

    version: int
    tolerance: int
    n_vectors: int
    n_stale: int
    age_counts: dict[int, int] = field(default_factory=dict)

    @property
    def fraction_stale(self) -> float:
        return self.n_stale / self.n_vectors if self.n_vectors else 0.0

    @property
    def mean_age(self) -> float:
        return sum(a * c for a, c in self.age_counts.items()) / self.n_vectors if self.n_vectors else 0.0

    @property
    def max_age(self) -> int:
        return max(self.age_counts, default=0)

    @classmethod
    def merge(cls, parts: Sequence[StalenessStats]) -> StalenessStats:
        """Combine the statistics of disjoint shards (same version and tolerance)."""
        if not parts:
            raise ValueError("merge needs at least one StalenessStats")
        counts: dict[int, int] = {}
        for p in parts:
            if (p.version, p.tolerance) != (parts[0].version, parts[0].tolerance):
                raise ValueError("cannot merge staleness measured at different versions or tolerances")
            for age, c in p.age_counts.items():
                counts[age] = counts.get(age, 0) + c
        return cls(parts[0].version, parts[0].tolerance, sum(p.n_vectors for p in parts),
                   sum(p.n_stale for p in parts), dict(sorted(counts.items())))

    def to_dict(self) -> dict:
        return {**asdict(self), "age_counts": {str(a): c for a, c in self.age_counts.items()}}

    def to_metrics(self, prefix: str = "env/") -> dict[str, float]:
        """Scalars for verl's tracking."""
        return {f"{prefix}n_vectors": float(self.n_vectors), f"{prefix}fraction_stale": self.fraction_stale,
                f"{prefix}mean_age": self.mean_age, f"{prefix}max_age": float(self.max_age)}


class VectorStore:
    """Vectors, versions and FAISS search for a set of string document ids.

    Args:
        config: uses ``dim``, ``dtype``, ``normalize`` and the index knobs.
    """

    def __init__(self, config: EnvConfig) -> None:
        self.config = config
        self.codec = VectorCodec(config.dtype)
        self.dtype = self.codec.storage
        self.dim = config.dim
        self._ids: list[str] = []
        self._slot_of: dict[str, int] = {}
        self._vectors = np.zeros((0, self.dim), self.dtype)
        self._versions = np.zeros(0, np.int64)
        self._keys = np.zeros(0, np.int64)  # row -> key
        self._key_row = np.zeros(0, np.int64)  # key -> row, -1 once removed
        self._next_key = 0
        self._reserve = 0  # expected number of documents (capacity allocated at once)
        self._backend = make_backend(config)

    # ------------------------------------------------------------------ queries
    def __len__(self) -> int:
        return len(self._ids)

    def __contains__(self, doc_id: str) -> bool:
        return doc_id in self._slot_of

    @property
    def next_key(self) -> int:
        """One past the largest key ever assigned (size of key-indexed arrays)."""
        return self._next_key

    def ids(self) -> list[str]:
        """All document ids with a vector, in row order."""
        return list(self._ids)

    def rows_of(self, ids: Sequence[str]) -> np.ndarray:
        """``(n,)`` rows of ``ids``; -1 where unknown."""
        return np.fromiter((self._slot_of.get(i, -1) for i in ids), dtype=np.int64, count=len(ids))

    def keys_of(self, ids: Sequence[str]) -> np.ndarray:
        """``(n,)`` keys of ``ids``; -1 where unknown."""
        return self.keys_of_rows(self.rows_of(ids))

    def rows_of_keys(self, keys: np.ndarray) -> np.ndarray:
        """Rows of int64 ``keys`` (any shape); -1 for -1 or removed keys."""
        keys = np.asarray(keys, dtype=np.int64)
        valid = (keys >= 0) & (keys < self._next_key)
        rows = np.full(keys.shape, -1, np.int64)
        rows[valid] = self._key_row[keys[valid]]
        return rows

    def keys_of_rows(self, rows: np.ndarray) -> np.ndarray:
        """Keys of ``rows`` (any shape); -1 for row -1."""
        rows = np.asarray(rows, dtype=np.int64)
        keys = np.full(rows.shape, NO_KEY, np.int64)
        keys[rows >= 0] = self._keys[rows[rows >= 0]]
        return keys

    def ids_of_rows(self, rows: Iterable[int]) -> list[str]:
        return [self._ids[r] for r in rows]

    def vectors_of_rows(self, rows: np.ndarray) -> np.ndarray:
        """``(m, dim)`` float32 copies of the stored vectors of ``rows``."""
        return self.codec.decode(self._vectors[rows])

    def versions_of_rows(self, rows: np.ndarray) -> np.ndarray:
        """``(m,)`` int64 versions of ``rows``."""
        return self._versions[rows].copy()

    def get(self, ids: Sequence[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Stored vectors of ``ids``.

        Returns:
            ``vecs (n, dim) float32`` (zeros where not found), ``versions (n,) int64`` (-1 where
            not found) and ``found (n,) bool``.
        """
        rows = self.rows_of(ids)
        found = rows >= 0
        vecs = np.zeros((len(ids), self.dim), np.float32)
        versions = np.full(len(ids), -1, np.int64)
        vecs[found] = self.codec.decode(self._vectors[rows[found]])
        versions[found] = self._versions[rows[found]]
        return vecs, versions, found

    def prepare_queries(self, queries: np.ndarray) -> np.ndarray:
        """``(Q, dim)`` float32, L2-normalised when ``normalize``."""
        q = np.ascontiguousarray(queries, dtype=np.float32)
        if q.ndim != 2 or (self.dim and q.shape[1] != self.dim):
            raise ValueError(f"queries must have shape (Q, {self.dim or 'dim'}), got {q.shape}")
        return l2_normalize(q) if self.config.normalize else q

    def search(self, queries: np.ndarray, k: int, exact: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """Top-k rows by inner product (cosine when ``normalize``).

        Args:
            queries: ``(Q, dim)``. Degenerate rows (NaN/inf, or all zero) are not searched: they
                get no results.
            k: results per query.
            exact: brute force over the stored vectors whatever the index type (for recall checks).

        Returns:
            ``scores (Q, k) float32`` and ``rows (Q, k) int64``, best first; when the store holds
            fewer than ``k`` vectors (or the query is degenerate) the tail is padded with ``-inf`` / ``-1``.
        """
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        q = np.asarray(queries, dtype=np.float32)
        valid = np.flatnonzero(~degenerate_rows(q)) if q.ndim == 2 else None
        q = self.prepare_queries(q[valid] if valid is not None else q)
        scores, rows = np.full((len(queries), k), -np.inf, np.float32), np.full((len(queries), k), -1, np.int64)
        n = len(self._ids)
        if n == 0 or not len(valid):
            return scores, rows
        if exact or not self._backend.approximate:
            s, keys = exact_search(q, k, self._vectors[:n], self._keys[:n], self.config.search_chunk_rows, self.codec)
            scores[valid], rows[valid] = s, self.rows_of_keys(keys)
            return scores, rows
        self.ensure_search_structure()
        fetch = max(k, math.ceil(k * self.config.rescore_factor))
        _, keys = self._backend.search(q, fetch, self._vectors[:n], self._keys[:n])
        s, r = self._rescore(q, self.rows_of_keys(keys))
        scores[valid], rows[valid] = s[:, :k], r[:, :k]
        return scores, rows

    def _rescore(self, q: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Exact scores of ``(Q, m)`` candidate rows (-1 = none) with the stored vectors, best first."""
        s = np.einsum("qd,qkd->qk", q, self.codec.decode(self._vectors[np.maximum(rows, 0)]))
        s[rows < 0] = -np.inf
        order = np.argsort(-s, axis=1, kind="stable")
        return np.take_along_axis(s, order, axis=1), np.take_along_axis(rows, order, axis=1)

    def reserve(self, rows: int) -> None:
        """Expect ``rows`` documents: the vector matrix grows to that capacity at once (not by doubling)."""
        self._reserve = max(self._reserve, int(rows))

    def memory_bytes(self) -> dict[str, int]:
        """Bytes held: ``vectors`` (matrix capacity), ``versions_keys`` (per-row/key int64 columns)
        and ``ann`` (the approximate search structure's arrays)."""
        return {"vectors": int(self._vectors.nbytes),
                "versions_keys": int(self._versions.nbytes + self._keys.nbytes + self._key_row.nbytes),
                "ann": self._backend.memory_bytes()}

    @property
    def search_structure_ready(self) -> bool:
        """False while an approximate backend still has to be built (the first search builds it)."""
        return self._backend.built or not self._ids

    def ensure_search_structure(self) -> None:
        """Build the approximate backend from the stored vectors if it is not built yet (a write)."""
        if not self.search_structure_ready:
            n = len(self._ids)
            self._backend.build(self._keys[:n].copy(), self._vectors[:n])

    def staleness(self, version: int, tolerance: int = 0) -> StalenessStats:
        """Age histogram of all stored vectors relative to ``version``."""
        ages = version - self._versions[: len(self._ids)]
        values, counts = np.unique(ages, return_counts=True)
        return StalenessStats(version, tolerance, len(ages), int((ages > tolerance).sum()),
                              {int(a): int(c) for a, c in zip(values, counts)})

    # ------------------------------------------------------------------ updates
    def _prepare_vectors(self, ids: Sequence[str], vecs: np.ndarray) -> np.ndarray:
        """Validate ``(n, dim)`` input and return it normalised and cast to the storage dtype.
        Non-finite rows are refused, and all-zero rows too when ``normalize`` (no direction)."""
        v = np.asarray(vecs, dtype=np.float32)
        if v.ndim != 2 or len(v) != len(ids):
            raise ValueError(f"expected vectors of shape ({len(ids)}, dim), got {v.shape}")
        if self.dim == 0:
            self.dim = v.shape[1]
            self._vectors = np.zeros((0, self.dim), self.dtype)
        if v.shape[1] != self.dim:
            raise ValueError(f"upsert got vectors of dimension {v.shape[1]}; the environment holds dimension {self.dim}")
        check_vectors(ids, v, self.dim, "upsert", allow_zero=not self.config.normalize)
        if self.config.normalize:
            v = l2_normalize(v)
        return self.codec.encode(v)

    def upsert(self, ids: Sequence[str], vecs: np.ndarray, version: int) -> np.ndarray:
        """Insert or replace the vectors of ``ids`` (all at ``version``); returns their ``(n,)`` keys."""
        ids = [str(i) for i in ids]
        if len(set(ids)) != len(ids):
            raise ValueError("upsert ids contain duplicates")
        stored = self._prepare_vectors(ids, vecs)
        rows = self.rows_of(ids)
        old = rows >= 0
        if old.any():
            r = rows[old]
            self._vectors[r] = stored[old]
            self._versions[r] = version
            if self._backend.built:
                self._backend.update(self._keys[r], self.codec.decode(stored[old]))
        new = np.flatnonzero(~old)
        if len(new):
            n, m = len(self._ids), len(new)
            keys = np.arange(self._next_key, self._next_key + m, dtype=np.int64)
            self._vectors = grow_rows(self._vectors, n + m, reserve=self._reserve)
            self._versions = grow_rows(self._versions, n + m)
            self._keys = grow_rows(self._keys, n + m)
            self._key_row = grow_rows(self._key_row, self._next_key + m, fill=-1)
            self._vectors[n : n + m] = stored[new]
            self._versions[n : n + m] = version
            self._keys[n : n + m] = keys
            self._key_row[keys] = np.arange(n, n + m)
            self._next_key += m
            for j, i in enumerate(new):
                self._slot_of[ids[i]] = n + j
                self._ids.append(ids[i])
            rows[new] = np.arange(n, n + m)
            if self._backend.built:
                self._backend.add(keys, self.codec.decode(stored[new]))
        self._rebuild_if_needed()
        return self._keys[rows]

    def remove(self, ids: Sequence[str]) -> np.ndarray:
        """Delete ``ids`` (unknown ids are ignored); returns the keys removed."""
        rows = self.rows_of(ids)
        rows = np.unique(rows[rows >= 0])
        if not len(rows):
            return np.zeros(0, np.int64)
        n = len(self._ids)
        removed = self._keys[rows].copy()
        keep = np.ones(n, bool)
        keep[rows] = False
        m = int(keep.sum())
        self._vectors[:m] = self._vectors[:n][keep]
        self._versions[:m] = self._versions[:n][keep]
        self._keys[:m] = self._keys[:n][keep]
        self._key_row[removed] = -1
        self._key_row[self._keys[:m]] = np.arange(m)
        self._ids = [i for i, k in zip(self._ids, keep) if k]
        self._slot_of = {i: r for r, i in enumerate(self._ids)}
        if self._backend.built:
            self._backend.remove(removed)
        self._rebuild_if_needed()
        return removed

    def _rebuild_if_needed(self) -> None:
        if self._backend.built and self._backend.needs_rebuild:
            n = len(self._ids)
            self._backend.build(self._keys[:n].copy(), self._vectors[:n])

    # ------------------------------------------------------------------ state
    def state(self) -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray]:
        """``(ids, vectors (n, dim), versions (n,), keys (n,))`` of the live rows (views)."""
        n = len(self._ids)
        return list(self._ids), self._vectors[:n], self._versions[:n], self._keys[:n]

    def load_state(self, ids: list[str], vectors: np.ndarray, versions: np.ndarray, keys: np.ndarray, next_key: int) -> None:
        """Replace everything with a saved state (as returned by :meth:`state`)."""
        n = len(ids)
        if vectors.shape[0] != n or versions.shape != (n,) or keys.shape != (n,):
            raise ValueError(f"inconsistent state: {n} ids, vectors {vectors.shape}, versions {versions.shape}, keys {keys.shape}")
        if n and (keys.min() < 0 or keys.max() >= next_key):
            raise ValueError(f"state keys must lie in [0, next_key={next_key})")
        self.dim = vectors.shape[1]
        self._ids = list(ids)
        self._slot_of = {i: r for r, i in enumerate(self._ids)}
        if len(self._slot_of) != n:
            raise ValueError("state ids contain duplicates")
        self._vectors = np.array(vectors, dtype=self.dtype)
        self._versions = np.array(versions, dtype=np.int64)
        self._keys = np.array(keys, dtype=np.int64)
        self._next_key = int(next_key)
        self._key_row = np.full(self._next_key, -1, np.int64)
        self._key_row[self._keys] = np.arange(n)
        self._backend = make_backend(self.config)
