"""FAISS search structures over a :class:`~verl_search_r3.env.store.VectorStore`.

Every backend finds the top-k *keys* (stable int64 ids the store gives each document) by inner
product. The store owns the authoritative vectors; a backend holds only what its search needs.

* :class:`FlatBackend` — exact. It keeps no copy: it runs FAISS's brute-force inner-product
  kernel (``faiss.knn``) directly on the store's dense vector matrix, so an upsert is an
  in-place write of the changed rows. float16 storage is searched in float32 chunks.
* :class:`IVFBackend` — ``IndexIVFFlat`` / ``IndexIVFScalarQuantizer(fp16)`` with ids = keys;
  trained on the full store at the first search after a (re)build, updated incrementally after.
* :class:`HNSWBackend` — ``IndexHNSWFlat`` / ``IndexHNSWSQ(fp16)``. HNSW cannot delete, so a
  replaced or removed vector is tombstoned and filtered during search (``IDSelectorBitmap``).

Both approximate backends are rebuilt from the store once the vectors replaced or removed since
their last build exceed ``ann_rebuild_fraction`` of it: IVF's coarse quantiser was trained on
the old vectors and loses recall as the policy drifts; HNSW accumulates tombstones.

Approximate backends are built lazily (``built`` is False until the store calls :meth:`build`)
and are never saved in snapshots: they are rebuilt from the vectors after a load.
"""

from __future__ import annotations

from typing import Protocol

import faiss
import numpy as np

from .config import EnvConfig

__all__ = ["SearchBackend", "FlatBackend", "IVFBackend", "HNSWBackend", "make_backend", "topk_merge", "NO_KEY"]

NO_KEY = -1
"""Key of an empty result slot (fewer than k vectors)."""


def topk_merge(scores: np.ndarray, k: int) -> np.ndarray:
    """Column indices of the ``k`` best scores per row, best first. ``scores``: (Q, M) -> (Q, min(k, M))."""
    k = min(k, scores.shape[1])
    if k == 0:
        return np.zeros((scores.shape[0], 0), dtype=np.int64)
    part = np.argpartition(-scores, k - 1, axis=1)[:, :k] if k < scores.shape[1] else np.tile(np.arange(k), (len(scores), 1))
    order = np.argsort(-np.take_along_axis(scores, part, axis=1), axis=1, kind="stable")
    return np.take_along_axis(part, order, axis=1)


def _clean(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """FAISS pads missing results with label -1 and the lowest float; make those -inf."""
    scores = np.asarray(scores, dtype=np.float32)
    labels = np.asarray(labels, dtype=np.int64)
    scores[labels < 0] = -np.inf
    return scores, labels


class SearchBackend(Protocol):
    """What the store needs from a search structure. ``keys`` are int64 document keys."""

    built: bool

    def build(self, keys: np.ndarray, vectors: np.ndarray) -> None:
        """(Re)create the structure from all ``(n,)`` keys and ``(n, d)`` vectors."""

    def add(self, keys: np.ndarray, vectors: np.ndarray) -> None:
        """Insert new keys (only called when ``built``)."""

    def remove(self, keys: np.ndarray) -> None:
        """Delete keys (only called when ``built``)."""

    def search(self, queries: np.ndarray, k: int, vectors: np.ndarray, row_keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Top-k of ``(Q, d)`` float32 queries -> ``(Q, k)`` float32 scores (-inf pad), int64 keys (-1 pad).

        ``vectors``/``row_keys`` are the store's live ``(n, d)`` rows and their keys (used by flat).
        """

    @property
    def needs_rebuild(self) -> bool:
        """True when the structure has degraded enough that the store should call :meth:`build`."""


class FlatBackend:
    """Exact inner product with FAISS's brute-force kernel on the store's own matrix (no copy)."""

    built = True
    needs_rebuild = False

    def __init__(self, config: EnvConfig) -> None:
        self.chunk_rows = config.search_chunk_rows

    def build(self, keys: np.ndarray, vectors: np.ndarray) -> None:
        pass

    def add(self, keys: np.ndarray, vectors: np.ndarray) -> None:
        pass

    def remove(self, keys: np.ndarray) -> None:
        pass

    def search(self, queries: np.ndarray, k: int, vectors: np.ndarray, row_keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        n = len(vectors)
        kk = min(k, n)
        if kk == 0:
            scores, rows = np.full((len(queries), 0), -np.inf, np.float32), np.zeros((len(queries), 0), np.int64)
        elif vectors.dtype == np.float32:
            scores, rows = _clean(*faiss.knn(queries, vectors, kk, metric=faiss.METRIC_INNER_PRODUCT))
        else:  # float16 storage: exact search over float32 copies of one chunk at a time
            parts_s, parts_r = [], []
            for start in range(0, n, self.chunk_rows):
                chunk = np.ascontiguousarray(vectors[start : start + self.chunk_rows], dtype=np.float32)
                s, r = _clean(*faiss.knn(queries, chunk, min(kk, len(chunk)), metric=faiss.METRIC_INNER_PRODUCT))
                parts_s.append(s)
                parts_r.append(np.where(r >= 0, r + start, NO_KEY))
            all_s, all_r = np.concatenate(parts_s, axis=1), np.concatenate(parts_r, axis=1)
            best = topk_merge(all_s, kk)
            scores, rows = np.take_along_axis(all_s, best, axis=1), np.take_along_axis(all_r, best, axis=1)
        keys = np.where(rows >= 0, row_keys[np.maximum(rows, 0)], NO_KEY) if rows.size else rows
        return _pad(scores, keys, k)


def _pad(scores: np.ndarray, keys: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Pad ``(Q, m)`` results to ``(Q, k)`` with -inf / -1."""
    missing = k - scores.shape[1]
    if missing <= 0:
        return scores, keys
    q = scores.shape[0]
    return (np.concatenate([scores, np.full((q, missing), -np.inf, np.float32)], axis=1),
            np.concatenate([keys, np.full((q, missing), NO_KEY, np.int64)], axis=1))


def _storage(config: EnvConfig) -> str:
    return "SQfp16" if config.dtype == "float16" else "Flat"


class _Rebuilding:
    """Counts vectors replaced or removed since the last build (shared by IVF and HNSW)."""

    def __init__(self, config: EnvConfig) -> None:
        self.config = config
        self.index: faiss.Index | None = None
        self._built_size = 0
        self._changed = 0

    @property
    def built(self) -> bool:
        return self.index is not None

    @property
    def needs_rebuild(self) -> bool:
        return self._changed > self.config.ann_rebuild_fraction * max(self._built_size, 1)

    def _mark_built(self, n: int) -> None:
        self._built_size, self._changed = n, 0


class IVFBackend(_Rebuilding):
    """Inverted-file index (``IVF<nlist>,Flat`` or ``,SQfp16``) with FAISS ids = store keys."""

    def build(self, keys: np.ndarray, vectors: np.ndarray) -> None:
        cfg = self.config
        if len(vectors) < cfg.ivf_nlist:
            raise ValueError(
                f"index_type='ivf' needs at least ivf_nlist={cfg.ivf_nlist} vectors to train, the store has "
                f"{len(vectors)}; lower ivf_nlist or use index_type='flat'"
            )
        index = faiss.index_factory(vectors.shape[1], f"IVF{cfg.ivf_nlist},{_storage(cfg)}", faiss.METRIC_INNER_PRODUCT)
        index.train(vectors)
        index.add_with_ids(vectors, keys)
        index.nprobe = cfg.ivf_nprobe
        self.index = index
        self._mark_built(len(keys))

    def add(self, keys: np.ndarray, vectors: np.ndarray) -> None:
        self.index.add_with_ids(vectors, keys)

    def remove(self, keys: np.ndarray) -> None:
        self._changed += int(self.index.remove_ids(np.ascontiguousarray(keys, dtype=np.int64)))

    def search(self, queries: np.ndarray, k: int, vectors: np.ndarray, row_keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return _clean(*self.index.search(queries, k))


class HNSWBackend(_Rebuilding):
    """HNSW graph (``HNSW<M>,Flat`` or ``,SQfp16``) with tombstones for deleted vectors."""

    def __init__(self, config: EnvConfig) -> None:
        super().__init__(config)
        self._row_key = np.zeros(0, np.int64)  # HNSW node -> key
        self._alive = np.zeros(0, bool)  # HNSW node -> not tombstoned
        self._node_of: dict[int, int] = {}  # key -> live HNSW node

    def build(self, keys: np.ndarray, vectors: np.ndarray) -> None:
        cfg = self.config
        index = faiss.index_factory(vectors.shape[1], f"HNSW{cfg.hnsw_m},{_storage(cfg)}", faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = cfg.hnsw_ef_construction
        index.hnsw.efSearch = cfg.hnsw_ef_search
        self.index = index
        self._row_key = np.zeros(0, np.int64)
        self._alive = np.zeros(0, bool)
        self._node_of = {}
        self.add(keys, vectors)
        self._mark_built(len(keys))

    def add(self, keys: np.ndarray, vectors: np.ndarray) -> None:
        start = self.index.ntotal
        self.index.add(vectors)
        self._row_key = np.concatenate([self._row_key, keys.astype(np.int64)])
        self._alive = np.concatenate([self._alive, np.ones(len(keys), bool)])
        self._node_of.update(zip(keys.tolist(), range(start, start + len(keys))))

    def remove(self, keys: np.ndarray) -> None:
        nodes = [self._node_of.pop(int(key)) for key in keys if int(key) in self._node_of]
        self._alive[nodes] = False
        self._changed += len(nodes)

    def search(self, queries: np.ndarray, k: int, vectors: np.ndarray, row_keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        params = faiss.SearchParametersHNSW()
        params.efSearch = max(self.config.hnsw_ef_search, k)
        bitmap = np.packbits(self._alive, bitorder="little")  # referenced until the search returns
        if not self._alive.all():
            params.sel = faiss.IDSelectorBitmap(len(self._alive), faiss.swig_ptr(bitmap))
        scores, nodes = _clean(*self.index.search(queries, k, params=params))
        return scores, np.where(nodes >= 0, self._row_key[np.maximum(nodes, 0)], NO_KEY)


def make_backend(config: EnvConfig) -> FlatBackend | IVFBackend | HNSWBackend:
    """The backend named by ``config.index_type``."""
    return {"flat": FlatBackend, "ivf": IVFBackend, "hnsw": HNSWBackend}[config.index_type](config)
