"""``CorpusIndex``: the environment's document index (plain Python, FAISS, no Ray).

It holds, for each document id: the text it is embedded from, its current vector with the
policy version that produced it, and its row in the neighbour graph. It is thread-safe: reads
(``search``, ``get``, ``texts``, ``staleness``, ``save``) share a readers-writer lock, and every
write (``upsert``, ``remove``, ``restore``, ...) applies *all* its changes — vectors, versions,
search structure, graph — under the exclusive lock, so a concurrent reader sees each write
either entirely or not at all.

The refresh logic lives in :mod:`verl_search_r3.env.planner`; it drives any object with this
class's read/write methods, including the sharded Ray client.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from .arrays import VectorCodec
from .backends import NO_KEY, topk_merge
from .config import EnvConfig
from .graph import NeighbourGraph
from .locking import RWLock
from .snapshot import (
    MANIFEST,
    SnapshotError,
    decode_strings,
    encode_strings,
    read_manifest,
    read_snapshot,
    write_snapshot,
)
from .store import StalenessStats, VectorStore

__all__ = ["CorpusIndex"]


class CorpusIndex:
    """Versioned document vectors with exact (or IVF/HNSW) search, texts and a neighbour graph.

    Args:
        config: the environment config (index, graph and snapshot knobs are used here).
    """

    def __init__(self, config: EnvConfig | None = None) -> None:
        self.config = config or EnvConfig()
        self._lock = RWLock()
        self._store = VectorStore(self.config)
        self._graph = NeighbourGraph(self.config.graph_k)
        self._texts: dict[str, str] = {}

    # ------------------------------------------------------------------ texts
    def add_texts(self, ids: Sequence[str], texts: Sequence[str]) -> None:
        """Register (or replace) the texts documents are embedded from."""
        if len(ids) != len(texts):
            raise ValueError(f"{len(ids)} ids but {len(texts)} texts")
        with self._lock.write():
            self._texts.update(zip(map(str, ids), texts))
            self._store.reserve(len(self._texts))  # every document with a text gets a vector

    def texts(self, ids: Sequence[str]) -> list[str]:
        """Texts of ``ids``; a ``KeyError`` names the ids without a text."""
        with self._lock.read():
            missing = [i for i in ids if i not in self._texts]
            if missing:
                raise KeyError(f"{len(missing)} doc id(s) have no text in the index, e.g. {missing[:5]}")
            return [self._texts[i] for i in ids]

    @property
    def num_texts(self) -> int:
        """Number of documents with a text (the corpus size)."""
        return len(self._texts)

    def doc_ids(self) -> list[str]:
        """Ids of all documents with a text (the corpus), in insertion order."""
        with self._lock.read():
            return list(self._texts)

    # ------------------------------------------------------------------ reads
    def __len__(self) -> int:
        """Number of documents with a vector."""
        return len(self._store)

    @property
    def dim(self) -> int:
        """Vector dimension (0 until the first upsert when the config leaves it open)."""
        return self._store.dim

    def search(self, query_vecs: np.ndarray, k: int, exact: bool = False) -> tuple[list[list[str]], np.ndarray]:
        """Top-k documents per query by inner product (cosine when ``normalize``).

        Args:
            query_vecs: ``(Q, dim)``. A degenerate query (NaN/inf, or all zero) is not searched:
                it gets an empty list and ``-inf`` scores.
            k: results per query.
            exact: brute force over the stored vectors whatever ``index_type`` (e.g. to measure
                the recall of an approximate index against exact search).

        Returns:
            ``ids``: Q lists of ``min(k, len(self))`` doc ids, best first; ``scores``: ``(Q, k)``
            float32, ``-inf`` past the end of each list.
        """
        while True:
            with self._lock.read():
                if exact or self._store.search_structure_ready:
                    scores, rows = self._store.search(query_vecs, k, exact=exact)
                    return [self._store.ids_of_rows(r[r >= 0]) for r in rows], scores
            with self._lock.write():  # building an IVF/HNSW structure is a write
                self._store.ensure_search_structure()

    def memory_bytes(self) -> dict[str, int]:
        """Bytes of the index's arrays: ``vectors``, ``versions_keys``, ``ann`` (approximate
        structure), ``graph`` and their ``total`` (Python objects — ids, texts — not counted)."""
        with self._lock.read():
            out = {**self._store.memory_bytes(), "graph": self._graph.memory_bytes()}
        out["total"] = sum(out.values())
        return out

    def get(self, ids: Sequence[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(vecs (n, dim) float32, versions (n,) int64, found (n,) bool)``; -1/zeros where not found."""
        with self._lock.read():
            return self._store.get(ids)

    def staleness(self, version: int, tolerance: int | None = None) -> StalenessStats:
        """Staleness histogram at ``version`` (tolerance defaults to ``staleness_tolerance``)."""
        with self._lock.read():
            tol = self.config.staleness_tolerance if tolerance is None else tolerance
            return self._store.staleness(version, tol)

    def neighbours(self, ids: Sequence[str], vecs: np.ndarray | None = None, version: int | None = None) -> list[list[str]]:
        """Graph neighbours of each id, best first (empty for unknown ids or ``graph_k == 0``).

        Rows are computed on demand: a row that is missing, or (when ``version`` is given) at
        least ``graph_refresh_age`` versions older than ``version``, is computed now by a search
        of the index and kept, stamped with ``version`` (else with the stored vector's version).

        Args:
            ids: ``(n,)`` doc ids (known to the index).
            vecs: optional ``(n, dim)`` vectors of ``ids`` at ``version`` to compute rows from
                (e.g. just re-encoded, not yet written); default: the stored vectors.
            version: the current policy version (enables age-based recomputation).
        """
        if self.config.graph_k == 0:
            return [[] for _ in ids]
        if vecs is not None and (version is None or np.shape(vecs)[0] != len(ids)):
            raise ValueError(f"neighbours needs one vector per id ({len(ids)}) and their version; got "
                             f"{np.shape(vecs)[0]} vectors, version={version}")
        with self._lock.read():
            keys = self._store.keys_of(ids)
            if not self._rows_due(keys, version).any():
                return self._neighbour_ids(keys)
        with self._lock.write():
            keys = self._store.keys_of(ids)
            due = np.flatnonzero(self._rows_due(keys, version))
            due = due[np.unique(keys[due], return_index=True)[1]]  # one row per document
            if vecs is None:
                rows = self._store.rows_of_keys(keys[due])
                self._compute_rows(keys[due], self._store.vectors_of_rows(rows),
                                   self._store.versions_of_rows(rows) if version is None else version)
            else:
                self._compute_rows(keys[due], self._store.prepare_queries(np.asarray(vecs)[due]), version)
            return self._neighbour_ids(keys)

    def _rows_due(self, keys: np.ndarray, version: int | None) -> np.ndarray:
        """Known keys whose graph row is missing or (given ``version``) too old."""
        row_versions = self._graph.row_versions(keys)
        due = (keys >= 0) & (row_versions < 0)
        if version is not None:
            due |= (keys >= 0) & (version - row_versions >= self.config.graph_refresh_age)
        return due

    def _neighbour_ids(self, keys: np.ndarray) -> list[list[str]]:
        rows = self._store.rows_of_keys(self._graph.rows(keys))
        return [self._store.ids_of_rows(r[r >= 0]) for r in rows]

    # ------------------------------------------------------------------ writes
    def upsert(self, ids: Sequence[str], vecs: np.ndarray, version: int, update_graph: bool = True) -> None:
        """Insert or replace the vectors of ``ids`` as produced by policy ``version``.

        Args:
            ids: ``(n,)`` unique doc ids.
            vecs: ``(n, dim)`` vectors (normalised and cast to the storage dtype here).
            version: policy version that encoded them.
            update_graph: maintain the neighbour graph: documents that already have a row at
                least ``graph_refresh_age`` versions old get it recomputed from the new vector,
                and are offered as reverse edges to their new neighbours. Documents without a
                row get one when :meth:`neighbours` first asks for it.
        """
        with self._lock.write():
            keys = self._store.upsert(ids, vecs, version)
            if update_graph and self.config.graph_k:
                row_versions = self._graph.row_versions(keys)
                due = (row_versions >= 0) & (version - row_versions >= self.config.graph_refresh_age)
                self._compute_rows(keys[due], self._store.vectors_of_rows(self._store.rows_of_keys(keys[due])), version)

    def remove(self, ids: Sequence[str]) -> int:
        """Delete documents (vector, graph row and text); unknown ids are ignored. Returns the count."""
        with self._lock.write():
            present = [i for i in dict.fromkeys(ids) if i in self._store or i in self._texts]
            self._graph.drop(self._store.remove(present))
            for i in present:
                self._texts.pop(i, None)
            return len(present)

    def _compute_rows(self, keys: np.ndarray, vecs: np.ndarray, version: int | np.ndarray) -> None:
        """Set the graph rows of ``(m,)`` keys to the top ``graph_k`` other documents for their
        ``(m, dim)`` vectors, stamped with ``version`` (scalar or per key), and offer the reverse
        edges. The caller holds the write lock."""
        k = self.config.graph_k
        if not len(keys) or len(self._store) < 2:
            return
        scores, rows = self._store.search(vecs, k + 1)
        nbr = self._store.keys_of_rows(rows)
        scores = np.where((nbr == keys[:, None]) | (nbr == NO_KEY), -np.inf, scores)
        best = topk_merge(scores, k)
        nbr = np.take_along_axis(nbr, best, axis=1)
        sims = np.take_along_axis(scores, best, axis=1)
        nbr[~np.isfinite(sims)] = NO_KEY
        self._graph.set_rows(keys, nbr, sims, version)
        self._graph.offer(nbr.ravel(), np.repeat(keys, k), sims.ravel())

    # ------------------------------------------------------------------ snapshots
    def save(self, path: str, meta: dict[str, Any] | None = None) -> None:
        """Write the whole state (texts, vectors, versions, graph, config) atomically to ``path``.

        ``meta`` (JSON-serialisable) is stored alongside and checked by :meth:`restore`'s
        ``expect_meta``. Approximate search structures are not saved; they are rebuilt on load.
        """
        with self._lock.read():
            ids, vectors, versions, keys = self._store.state()
            id_blob, id_off = encode_strings(ids)
            text_ids = list(self._texts)
            tid_blob, tid_off = encode_strings(text_ids)
            txt_blob, txt_off = encode_strings([self._texts[i] for i in text_ids])
            arrays = {
                "ids_blob": id_blob, "ids_offsets": id_off, "vectors": vectors, "versions": versions, "keys": keys,
                "text_ids_blob": tid_blob, "text_ids_offsets": tid_off, "texts_blob": txt_blob, "texts_offsets": txt_off,
                **self._graph.state(self._store.next_key),
            }
            info = {"config": self.config.to_dict(), "dim": self._store.dim, "dtype": self.config.dtype,
                    "n_vectors": len(ids), "n_texts": len(text_ids), "next_key": self._store.next_key,
                    "graph_k": self.config.graph_k, "normalize": self.config.normalize, "extra": meta or {}}
            write_snapshot(path, arrays, info)

    def restore(self, path: str, expect_meta: dict[str, Any] | None = None) -> None:
        """Replace the whole state with the snapshot at ``path``.

        Raises:
            SnapshotError: the snapshot is corrupted (checksum, size, manifest) or does not fit
                this index (dimension, dtype, normalisation, graph width, ``expect_meta``).
        """
        arrays, meta = read_snapshot(path, verify=self.config.verify_checksums)
        where = os.path.join(path, MANIFEST)
        cfg = self.config
        checks = [("dtype", cfg.dtype, meta.get("dtype")), ("graph_k", cfg.graph_k, meta.get("graph_k")),
                  ("normalize", cfg.normalize, meta.get("normalize"))]
        if cfg.dim:
            checks.append(("dim", cfg.dim, meta.get("dim")))
        checks += [(f"meta[{k!r}]", v, meta.get("extra", {}).get(k)) for k, v in (expect_meta or {}).items()]
        for name, want, got in checks:
            if want != got:
                raise SnapshotError(f"{where}: snapshot has {name}={got!r}, this index needs {name}={want!r}")
        names = ("ids_blob", "ids_offsets", "vectors", "versions", "keys", "text_ids_blob", "text_ids_offsets",
                 "texts_blob", "texts_offsets", "graph_nbrs", "graph_sims", "graph_row_version", "graph_has_row")
        missing = [n for n in names if n not in arrays]
        if missing:
            raise SnapshotError(f"{where}: snapshot lacks array(s) {missing}")
        vec_path = os.path.join(path, "vectors.npy")
        if arrays["vectors"].dtype != VectorCodec(cfg.dtype).storage or arrays["vectors"].shape != (meta["n_vectors"], meta["dim"]):
            raise SnapshotError(f"{vec_path}: vectors {arrays['vectors'].dtype}{arrays['vectors'].shape} do not match "
                                f"the manifest ({cfg.dtype}, ({meta['n_vectors']}, {meta['dim']}))")
        store = VectorStore(cfg)
        graph = NeighbourGraph(cfg.graph_k)
        try:
            store.load_state(decode_strings(arrays["ids_blob"], arrays["ids_offsets"]), arrays["vectors"],
                             arrays["versions"], arrays["keys"], meta["next_key"])
            graph.load_state(arrays)
            texts = dict(zip(decode_strings(arrays["text_ids_blob"], arrays["text_ids_offsets"]),
                             decode_strings(arrays["texts_blob"], arrays["texts_offsets"])))
        except (ValueError, UnicodeDecodeError) as e:
            raise SnapshotError(f"{where}: inconsistent snapshot ({e})") from None
        with self._lock.write():
            self._store, self._graph, self._texts = store, graph, texts

    @classmethod
    def load(cls, path: str, config: EnvConfig | None = None) -> CorpusIndex:
        """A new index from a snapshot; ``config`` defaults to the one saved in it."""
        if config is None:
            meta = read_manifest(path)["meta"]
            if "config" not in meta:  # e.g. the top folder of a sharded snapshot (CorpusIndexClient.snapshot)
                raise SnapshotError(f"{os.path.join(path, MANIFEST)}: not a single-index snapshot (a sharded snapshot of "
                                    f"{meta.get('num_shards')} shards?); load one of its shard folders, or restore it with "
                                    "CorpusIndexClient.restore")
            config = EnvConfig.from_dict(meta["config"])
        index = cls(config)
        index.restore(path)
        return index
