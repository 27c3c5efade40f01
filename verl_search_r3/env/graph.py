"""Document neighbour graph: for each document key, its ``k`` nearest documents by cosine.

The graph is maintained incrementally by :class:`~verl_search_r3.env.index.CorpusIndex`: when a
document is upserted its row is recomputed by a search with its new vector, and the document
is *offered* to each of its new neighbours (it replaces their weakest neighbour when it is
closer — the reverse-edge update of incremental kNN-graph construction). Rows remember the
policy version they were computed at, so a refresh can skip rows that are recent enough.
Similarities are those at computation time; they age with the vectors.
"""

from __future__ import annotations

import numpy as np

from .arrays import grow_rows
from .backends import NO_KEY

__all__ = ["NeighbourGraph"]


class NeighbourGraph:
    """Rows indexed by int64 document key: ``(k,)`` neighbour keys (-1 = empty) and similarities.

    Args:
        k: neighbours per row.
    """

    def __init__(self, k: int) -> None:
        self.k = k
        self._nbrs = np.full((0, k), NO_KEY, np.int64)
        self._sims = np.full((0, k), -np.inf, np.float32)
        self._row_version = np.zeros(0, np.int64)  # version the row was computed at
        self._has_row = np.zeros(0, bool)

    def _fit(self, n_keys: int) -> None:
        self._nbrs = grow_rows(self._nbrs, n_keys, fill=NO_KEY)
        self._sims = grow_rows(self._sims, n_keys, fill=-np.inf)
        self._row_version = grow_rows(self._row_version, n_keys)
        self._has_row = grow_rows(self._has_row, n_keys, fill=False)

    def has_row(self, keys: np.ndarray) -> np.ndarray:
        """``(m,)`` bool: a row has been computed for each key."""
        keys = np.asarray(keys, dtype=np.int64)
        out = np.zeros(keys.shape, bool)
        inside = (keys >= 0) & (keys < len(self._has_row))
        out[inside] = self._has_row[keys[inside]]
        return out

    def row_versions(self, keys: np.ndarray) -> np.ndarray:
        """``(m,)`` version each row was computed at (-1 without a row)."""
        keys = np.asarray(keys, dtype=np.int64)
        has = self.has_row(keys)
        out = np.full(keys.shape, -1, np.int64)
        out[has] = self._row_version[keys[has]]
        return out

    def rows(self, keys: np.ndarray) -> np.ndarray:
        """``(m, k)`` neighbour keys, best first (-1 pads and rows never computed)."""
        keys = np.asarray(keys, dtype=np.int64)
        has = self.has_row(keys)
        out = np.full((len(keys), self.k), NO_KEY, np.int64)
        out[has] = self._nbrs[keys[has]]
        return out

    def set_rows(self, keys: np.ndarray, nbrs: np.ndarray, sims: np.ndarray, version: int | np.ndarray) -> None:
        """Replace the rows of ``(m,)`` keys with ``(m, k)`` neighbour keys and similarities (best
        first), computed at ``version`` (scalar or ``(m,)``)."""
        keys = np.asarray(keys, dtype=np.int64)
        if nbrs.shape != (len(keys), self.k) or sims.shape != nbrs.shape:
            raise ValueError(f"rows must have shape ({len(keys)}, {self.k}), got {nbrs.shape} and {sims.shape}")
        self._fit(int(keys.max()) + 1 if len(keys) else 0)
        self._nbrs[keys] = nbrs
        self._sims[keys] = np.where(nbrs >= 0, sims, -np.inf)
        self._row_version[keys] = version
        self._has_row[keys] = True

    def offer(self, targets: np.ndarray, sources: np.ndarray, sims: np.ndarray) -> int:
        """Reverse edges: put ``sources[i]`` into the row of ``targets[i]`` when that row exists,
        does not hold it yet and its weakest similarity is below ``sims[i]``. Returns edges added."""
        targets, sources = np.asarray(targets, np.int64), np.asarray(sources, np.int64)
        sims = np.asarray(sims, np.float32)
        keep = self.has_row(targets) & (sources >= 0) & (targets != sources)
        targets, sources, sims = targets[keep], sources[keep], sims[keep]
        keep = sims > self._sims[targets].min(axis=1)  # cheap filter; re-checked one by one below
        added = 0
        for t, s, sim in zip(targets[keep].tolist(), sources[keep].tolist(), sims[keep].tolist()):
            row_n, row_s = self._nbrs[t], self._sims[t]
            weakest = int(np.argmin(row_s))
            if sim > row_s[weakest] and s not in row_n:
                row_n[weakest], row_s[weakest] = s, sim
                order = np.argsort(-row_s, kind="stable")
                self._nbrs[t], self._sims[t] = row_n[order], row_s[order]
                added += 1
        return added

    def drop(self, keys: np.ndarray) -> None:
        """Forget the rows of removed keys (edges pointing at them are filtered by the reader)."""
        keys = np.asarray(keys, dtype=np.int64)
        keys = keys[(keys >= 0) & (keys < len(self._has_row))]
        self._has_row[keys] = False
        self._nbrs[keys] = NO_KEY
        self._sims[keys] = -np.inf

    def memory_bytes(self) -> int:
        """Bytes of the row arrays."""
        return int(self._nbrs.nbytes + self._sims.nbytes + self._row_version.nbytes + self._has_row.nbytes)

    def state(self, n_keys: int) -> dict[str, np.ndarray]:
        """Arrays for a snapshot, covering keys ``0..n_keys-1``."""
        self._fit(n_keys)
        return {"graph_nbrs": self._nbrs[:n_keys], "graph_sims": self._sims[:n_keys],
                "graph_row_version": self._row_version[:n_keys], "graph_has_row": self._has_row[:n_keys]}

    def load_state(self, arrays: dict[str, np.ndarray]) -> None:
        """Inverse of :meth:`state`."""
        nbrs = arrays["graph_nbrs"]
        if nbrs.ndim != 2 or nbrs.shape[1] != self.k:
            raise ValueError(f"graph rows have shape {nbrs.shape}, expected (n, {self.k})")
        self._nbrs = np.array(nbrs, np.int64)
        self._sims = np.array(arrays["graph_sims"], np.float32)
        self._row_version = np.array(arrays["graph_row_version"], np.int64)
        self._has_row = np.array(arrays["graph_has_row"], bool)
