"""FAISS search structures over a :class:`~verl_search_r3.env.store.VectorStore`.

Every backend finds the top-k *keys* (stable int64 ids the store gives each document) by inner
product. The store owns the authoritative vectors; a backend holds only what its search needs.

* :class:`FlatBackend` — exact. It keeps no copy: it runs FAISS's brute-force inner-product
  kernel (``faiss.knn``) directly on the store's dense vector matrix, so an upsert is an
  in-place write of the changed rows. float16 storage is converted to float32 one chunk of
  ``search_chunk_rows`` at a time into one reused buffer, and the chunks' top-k are merged.
  bfloat16 storage is searched without conversion by torch's bfloat16 matrix product (on CPUs
  with AVX512-BF16 or AMX several times faster than converting float16 for FAISS); its
  bfloat16 products only rank candidates, which the store re-scores exactly.
* :class:`IVFBackend` — ``IVF<nlist>,<codes>`` with ids = keys and a hash-table direct map (a
  replaced vector is removed and re-assigned in O(1)), trained on ``ann_train_size`` sampled
  vectors.
* :class:`HNSWBackend` — ``HNSW<M>,<codes>``. A replaced vector that
  moved little (cosine with its previous version >= ``hnsw_update_min_cosine``, the usual case
  for a policy step) is overwritten in place in the HNSW storage: its links stay as routing
  edges and the update costs no insertion. One that moved more is tombstoned and inserted
  again, like a removed one is tombstoned; tombstones are filtered during search
  (``IDSelectorBitmap``).

IVF and HNSW keep their own compact copy of the vectors (``ann_codes``: SQ8 by default,
a quarter of float32) only to find candidates; the store re-scores what they return with the
stored vectors, so scores are exact whatever the codes. Both are rebuilt from the store once the vectors replaced or removed since
their last build exceed ``ann_rebuild_fraction`` of it: IVF's quantiser was trained on the old
vectors and its lists grow unbalanced as the policy drifts; HNSW's links age and tombstones
accumulate. A build converts the store's vectors to float32 one chunk at a time and frees the
old structure first, so memory never holds two structures or a float32 copy of the corpus.

Approximate backends are built lazily (``built`` is False until the store calls :meth:`build`)
and are never saved in snapshots: they are rebuilt from the vectors after a load.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol

import faiss
import numpy as np

from .arrays import VectorCodec, grow_rows
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


def float32_chunks(vectors: np.ndarray, chunk_rows: int, codec: VectorCodec) -> Iterator[tuple[int, np.ndarray]]:
    """``(start, (m, d) float32)`` for consecutive row chunks of stored ``vectors``.

    float32 storage is yielded as views; other dtypes are decoded into one reused buffer (valid
    until the next chunk), so no float32 copy of the whole matrix is ever made.
    """
    n = len(vectors)
    if codec.storage == np.float32:
        for start in range(0, n, chunk_rows):
            yield start, vectors[start : start + chunk_rows]
        return
    buffer = np.empty((min(chunk_rows, n), vectors.shape[1]), np.float32)
    for start in range(0, n, chunk_rows):
        m = min(chunk_rows, n - start)
        yield start, codec.decode(vectors[start : start + m], out=buffer[:m])


class SearchBackend(Protocol):
    """What the store needs from a search structure. ``keys`` are int64 document keys."""

    built: bool
    approximate: bool
    """True when results are approximate candidates (the store re-scores them exactly)."""

    def build(self, keys: np.ndarray, vectors: np.ndarray) -> None:
        """(Re)create the structure from all ``(n,)`` keys and ``(n, d)`` vectors (store dtype)."""

    def add(self, keys: np.ndarray, vectors: np.ndarray) -> None:
        """Insert new keys with ``(m, d)`` float32 vectors (only called when ``built``)."""

    def update(self, keys: np.ndarray, vectors: np.ndarray) -> None:
        """Replace the vectors of present keys with ``(m, d)`` float32 ones (only called when ``built``)."""

    def remove(self, keys: np.ndarray) -> None:
        """Delete keys (only called when ``built``)."""

    def search(self, queries: np.ndarray, k: int, vectors: np.ndarray, row_keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Top-k of ``(Q, d)`` float32 queries -> ``(Q, k)`` float32 scores (-inf pad), int64 keys (-1 pad).

        ``vectors``/``row_keys`` are the store's live ``(n, d)`` rows and their keys (used by flat).
        """

    @property
    def needs_rebuild(self) -> bool:
        """True when the structure has degraded enough that the store should call :meth:`build`."""

    def memory_bytes(self) -> int:
        """Bytes of the structure's arrays (codes, ids, links, centroids; allocator overhead excluded)."""


def exact_search(queries: np.ndarray, k: int, vectors: np.ndarray, row_keys: np.ndarray, chunk_rows: int,
                 codec: VectorCodec) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k keys by inner product over stored ``(n, d)`` ``vectors`` (decoded to float32
    one chunk at a time) with row keys ``(n,)``; results padded to ``k`` with -inf / -1."""
    n, q = len(vectors), len(queries)
    kk = min(k, n)
    scores, rows = np.full((q, 0), -np.inf, np.float32), np.zeros((q, 0), np.int64)
    if kk and q:
        for start, chunk in float32_chunks(vectors, chunk_rows, codec):
            s, r = _clean(*faiss.knn(queries, chunk, min(kk, len(chunk)), metric=faiss.METRIC_INNER_PRODUCT))
            scores, rows = _merge(scores, rows, s, np.where(r >= 0, r + start, NO_KEY), kk)
    return _pad(scores, _keys_of(rows, row_keys), k)


def bfloat16_search(queries: np.ndarray, k: int, vectors: np.ndarray, row_keys: np.ndarray,
                    chunk_rows: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-k keys by a bfloat16 matrix product (torch; AVX512-BF16/AMX kernels where the CPU has
    them) over bfloat16-stored ``(n, d)`` ``vectors``, with as many threads as FAISS's OpenMP.

    Queries are rounded to bfloat16 and the products come out in bfloat16 (about 3 significant
    digits), so the result is a candidate list: callers re-score it with the stored vectors.
    """
    import torch

    torch.set_num_threads(faiss.omp_get_max_threads())
    n, q = len(vectors), len(queries)
    kk = min(k, n)
    scores, rows = np.full((q, 0), -np.inf, np.float32), np.zeros((q, 0), np.int64)
    if kk and q:
        matrix = torch.from_numpy(np.ascontiguousarray(vectors)).view(torch.bfloat16)
        qb = torch.from_numpy(np.ascontiguousarray(queries, dtype=np.float32)).to(torch.bfloat16)
        for start in range(0, n, chunk_rows):
            s, r = torch.topk(qb @ matrix[start : start + chunk_rows].T, min(kk, min(chunk_rows, n - start)), dim=1)
            scores, rows = _merge(scores, rows, s.float().numpy(), r.numpy() + start, kk)
    return _pad(scores, _keys_of(rows, row_keys), k)


def _merge(scores: np.ndarray, rows: np.ndarray, s: np.ndarray, r: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` best of two ``(Q, .)`` result sets."""
    scores, rows = np.concatenate([scores, s], axis=1), np.concatenate([rows, r], axis=1)
    if scores.shape[1] > k:
        best = topk_merge(scores, k)
        scores, rows = np.take_along_axis(scores, best, axis=1), np.take_along_axis(rows, best, axis=1)
    return scores, rows


def _keys_of(rows: np.ndarray, row_keys: np.ndarray) -> np.ndarray:
    return np.where(rows >= 0, row_keys[np.maximum(rows, 0)], NO_KEY) if rows.size else rows


class FlatBackend:
    """Exact inner product on the store's own matrix (no copy): FAISS's brute-force kernel on
    float32/float16 storage; for bfloat16 storage, torch's bfloat16 matrix product, whose
    candidates the store re-scores (``approximate``)."""

    built = True
    needs_rebuild = False

    def __init__(self, config: EnvConfig) -> None:
        self.chunk_rows = config.search_chunk_rows
        self.codec = VectorCodec(config.dtype)
        self.approximate = config.dtype == "bfloat16"

    def build(self, keys: np.ndarray, vectors: np.ndarray) -> None:
        pass

    def add(self, keys: np.ndarray, vectors: np.ndarray) -> None:
        pass

    def update(self, keys: np.ndarray, vectors: np.ndarray) -> None:
        pass

    def remove(self, keys: np.ndarray) -> None:
        pass

    def search(self, queries: np.ndarray, k: int, vectors: np.ndarray, row_keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if self.approximate:
            return bfloat16_search(queries, k, vectors, row_keys, self.chunk_rows)
        return exact_search(queries, k, vectors, row_keys, self.chunk_rows, self.codec)

    def memory_bytes(self) -> int:
        return 0


def _pad(scores: np.ndarray, keys: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Pad ``(Q, m)`` results to ``(Q, k)`` with -inf / -1."""
    missing = k - scores.shape[1]
    if missing <= 0:
        return scores, keys
    q = scores.shape[0]
    return (np.concatenate([scores, np.full((q, missing), -np.inf, np.float32)], axis=1),
            np.concatenate([keys, np.full((q, missing), NO_KEY, np.int64)], axis=1))


def _codes(config: EnvConfig) -> str:
    """FAISS factory suffix of the structure's vector codes."""
    return {"sq8": "SQ8", "fp16": "SQfp16", "flat": "Flat"}[config.ann_codes]


def _training_sample(vectors: np.ndarray, size: int, codec: VectorCodec) -> np.ndarray:
    """``(min(n, size), d)`` float32 rows of stored ``vectors`` sampled with a fixed seed."""
    n = len(vectors)
    rows = np.sort(np.random.default_rng(0).choice(n, size, replace=False)) if size < n else slice(None)
    return codec.decode(vectors[rows])


def _id_selector(keys: np.ndarray) -> tuple[faiss.IDSelectorArray, np.ndarray]:
    """An ``IDSelectorArray`` over ``keys`` (the array is returned too: it must outlive the call)."""
    keys = np.ascontiguousarray(keys, dtype=np.int64)
    return faiss.IDSelectorArray(len(keys), faiss.swig_ptr(keys)), keys


class _Rebuilding:
    """Counts vectors replaced or removed since the last build (shared by IVF and HNSW)."""

    approximate = True

    def __init__(self, config: EnvConfig) -> None:
        self.config = config
        self.codec = VectorCodec(config.dtype)
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

    def _add_chunks(self, keys: np.ndarray, vectors: np.ndarray) -> None:
        for start, chunk in float32_chunks(vectors, self.config.search_chunk_rows, self.codec):
            self.add(keys[start : start + len(chunk)], chunk)


class IVFBackend(_Rebuilding):
    """Inverted-file index (``IVF<nlist>,<codes>``) with FAISS ids = store keys."""

    def build(self, keys: np.ndarray, vectors: np.ndarray) -> None:
        cfg = self.config
        n = len(vectors)
        if n < cfg.ivf_nlist:
            raise ValueError(
                f"index_type='ivf' needs at least ivf_nlist={cfg.ivf_nlist} vectors to train, the store has "
                f"{n}; lower ivf_nlist or use index_type='flat'"
            )
        self.index = None  # free the old structure before building the new one
        index = faiss.index_factory(vectors.shape[1], f"IVF{cfg.ivf_nlist},{_codes(cfg)}", faiss.METRIC_INNER_PRODUCT)
        index.train(_training_sample(vectors, cfg.ann_train_size, self.codec))
        index.set_direct_map_type(faiss.DirectMap.Hashtable)
        index.nprobe = cfg.ivf_nprobe
        self.index = index
        self._add_chunks(keys, vectors)
        self._mark_built(n)

    def add(self, keys: np.ndarray, vectors: np.ndarray) -> None:
        self.index.add_with_ids(np.ascontiguousarray(vectors, dtype=np.float32), np.ascontiguousarray(keys, dtype=np.int64))

    def update(self, keys: np.ndarray, vectors: np.ndarray) -> None:
        self.remove(keys)  # re-assigned to the nearest list of the (fixed) quantiser
        self.add(keys, vectors)

    def remove(self, keys: np.ndarray) -> None:
        selector, _keep_alive = _id_selector(keys)
        self._changed += int(self.index.remove_ids(selector))

    def search(self, queries: np.ndarray, k: int, vectors: np.ndarray, row_keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return _clean(*self.index.search(queries, k))

    def memory_bytes(self) -> int:
        if self.index is None:
            return 0
        ivf = faiss.extract_index_ivf(self.index)
        n, d = ivf.ntotal, ivf.d
        # codes + ids per vector, centroids, direct-map entries (key and list/offset)
        return int(n * (ivf.code_size + 8) + ivf.nlist * d * 4 + n * 16)


class HNSWBackend(_Rebuilding):
    """HNSW graph (``HNSW<M>,<codes>``): replaced vectors that moved little are overwritten in
    place, others and removed ones tombstoned."""

    def __init__(self, config: EnvConfig) -> None:
        super().__init__(config)
        self._row_key = np.zeros(0, np.int64)  # HNSW node -> key
        self._alive = np.zeros(0, bool)  # HNSW node -> not tombstoned
        self._node_of = np.zeros(0, np.int64)  # key -> live HNSW node, -1 if none

    def build(self, keys: np.ndarray, vectors: np.ndarray) -> None:
        cfg = self.config
        self.index = None  # free the old structure before building the new one
        index = faiss.index_factory(vectors.shape[1], f"HNSW{cfg.hnsw_m},{_codes(cfg)}", faiss.METRIC_INNER_PRODUCT)
        if not index.is_trained:  # SQ8 learns its value ranges
            index.train(_training_sample(vectors, cfg.ann_train_size, self.codec))
        index.hnsw.efConstruction = cfg.hnsw_ef_construction
        index.hnsw.efSearch = cfg.hnsw_ef_search
        self.index = index
        self._row_key = np.zeros(0, np.int64)
        self._alive = np.zeros(0, bool)
        self._node_of = np.full(int(keys.max()) + 1 if len(keys) else 0, -1, np.int64)
        self._add_chunks(keys, vectors)
        self._mark_built(len(keys))

    def add(self, keys: np.ndarray, vectors: np.ndarray) -> None:
        start = self.index.ntotal
        self.index.add(np.ascontiguousarray(vectors, dtype=np.float32))
        self._row_key = np.concatenate([self._row_key, keys.astype(np.int64)])
        self._alive = np.concatenate([self._alive, np.ones(len(keys), bool)])
        if len(keys):
            self._node_of = grow_rows(self._node_of, int(keys.max()) + 1, fill=-1)
            self._node_of[keys] = np.arange(start, start + len(keys))

    def _nodes(self, keys: np.ndarray) -> np.ndarray:
        keys = np.asarray(keys, dtype=np.int64)
        nodes = np.full(len(keys), -1, np.int64)
        inside = (keys >= 0) & (keys < len(self._node_of))
        nodes[inside] = self._node_of[keys[inside]]
        return nodes

    def update(self, keys: np.ndarray, vectors: np.ndarray) -> None:
        keys = np.asarray(keys, dtype=np.int64)
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        nodes = self._nodes(keys)
        storage = faiss.downcast_index(self.index.storage)
        codes = faiss.rev_swig_ptr(storage.codes.data(), storage.codes.size()).reshape(-1, storage.code_size)
        known = np.flatnonzero(nodes >= 0)
        old = storage.sa_decode(np.ascontiguousarray(codes[nodes[known]]))
        cosine = np.einsum("ij,ij->i", old, vectors[known]) / np.maximum(
            np.linalg.norm(old, axis=1) * np.linalg.norm(vectors[known], axis=1), 1e-12)
        in_place = known[cosine >= self.config.hnsw_update_min_cosine]
        codes[nodes[in_place]] = storage.sa_encode(vectors[in_place])
        self._changed += len(in_place)
        moved = np.setdiff1d(np.arange(len(keys)), in_place)
        self.remove(keys[moved])
        self.add(keys[moved], vectors[moved])

    def remove(self, keys: np.ndarray) -> None:
        nodes = self._nodes(keys)
        nodes = nodes[nodes >= 0]
        self._alive[nodes] = False
        self._node_of[self._row_key[nodes]] = -1
        self._changed += len(nodes)

    def search(self, queries: np.ndarray, k: int, vectors: np.ndarray, row_keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        params = faiss.SearchParametersHNSW()
        params.efSearch = max(self.config.hnsw_ef_search, k)
        bitmap = np.packbits(self._alive, bitorder="little")  # referenced until the search returns
        if not self._alive.all():
            params.sel = faiss.IDSelectorBitmap(len(self._alive), faiss.swig_ptr(bitmap))
        scores, nodes = _clean(*self.index.search(queries, k, params=params))
        return scores, np.where(nodes >= 0, self._row_key[np.maximum(nodes, 0)], NO_KEY)

    def memory_bytes(self) -> int:
        if self.index is None:
            return 0
        storage = faiss.downcast_index(self.index.storage)
        hnsw = self.index.hnsw
        return int(storage.codes.size() + hnsw.neighbors.size() * 4 + hnsw.offsets.size() * 8 + hnsw.levels.size() * 4
                   + self._row_key.nbytes + self._alive.nbytes + self._node_of.nbytes)


def make_backend(config: EnvConfig) -> FlatBackend | IVFBackend | HNSWBackend:
    """The backend named by ``config.index_type``."""
    return {"flat": FlatBackend, "ivf": IVFBackend, "hnsw": HNSWBackend}[config.index_type](config)
