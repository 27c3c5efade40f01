"""Small numpy helpers shared by the environment modules."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["l2_normalize", "grow_rows", "degenerate_rows", "check_vectors", "VectorCodec"]


def l2_normalize(x: np.ndarray) -> np.ndarray:
    """Row-wise L2 normalisation of ``(n, d)`` float32; all-zero rows stay zero."""
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.where(norms > 0, norms, 1.0).astype(x.dtype)


def degenerate_rows(x: np.ndarray, allow_zero: bool = False) -> np.ndarray:
    """``(n,)`` bool: rows of ``(n, d)`` ``x`` that hold a NaN or inf, or (unless ``allow_zero``)
    are all zero (no direction, so no cosine with anything)."""
    x = np.asarray(x)
    if x.ndim != 2:
        raise ValueError(f"expected a (n, d) array, got shape {x.shape}")
    bad = ~np.isfinite(x).all(axis=1)
    return bad if allow_zero else bad | ~x.any(axis=1)


def check_vectors(ids: Sequence[str], vecs: np.ndarray, dim: int, source: str, allow_zero: bool = False) -> None:
    """Refuse ``(n, dim)`` document vectors from ``source`` (e.g. "encode") that have the wrong
    shape, or rows that are non-finite or (unless ``allow_zero``) all zero; the error names how
    many and which ids."""
    v = np.asarray(vecs)
    if v.ndim != 2 or len(v) != len(ids):
        raise ValueError(f"{source} returned shape {v.shape} for {len(ids)} documents; expected ({len(ids)}, {dim or 'dim'})")
    if dim and v.shape[1] != dim:
        raise ValueError(f"{source} returned vectors of dimension {v.shape[1]}; the environment holds dimension {dim}")
    bad = np.flatnonzero(degenerate_rows(v, allow_zero))
    if len(bad):
        nonfinite = int((~np.isfinite(v[bad]).all(axis=1)).sum())
        raise ValueError(
            f"{source} returned {len(bad)} degenerate document vector(s) ({nonfinite} with NaN/inf, "
            f"{len(bad) - nonfinite} all zero), ids {[ids[j] for j in bad[:10]]}{' ...' if len(bad) > 10 else ''}; "
            "refusing to store them (check the encoder: a NaN/inf or zero embedding ranks arbitrarily)"
        )


def grow_rows(array: np.ndarray, rows: int, fill: float | int = 0, reserve: int = 0) -> np.ndarray:
    """``array`` with at least ``rows`` rows; new rows hold ``fill``. Capacity doubles, so
    appending one row at a time costs amortised O(1); a ``reserve`` >= ``rows`` (the expected
    final size) is allocated at once instead, so a known corpus size is never over-allocated."""
    if len(array) >= rows:
        return array
    size = reserve if reserve >= rows else max(rows, 2 * len(array))
    out = np.full((size,) + array.shape[1:], fill, dtype=array.dtype)
    out[: len(array)] = array
    return out


class VectorCodec:
    """Storage of float vectors as ``dtype`` (``"float32"``, ``"float16"`` or ``"bfloat16"``).

    numpy has no bfloat16: it is stored as the upper 16 bits of the float32 pattern (``uint16``,
    rounded to nearest even), which torch reads without a copy as ``torch.bfloat16``.
    """

    def __init__(self, dtype: str) -> None:
        self.name = dtype
        self.storage = np.dtype(np.uint16 if dtype == "bfloat16" else dtype)

    def encode(self, x: np.ndarray) -> np.ndarray:
        """float32 ``x`` (finite) in the storage dtype."""
        if self.name != "bfloat16":
            return np.asarray(x).astype(self.storage, copy=False)
        bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
        return ((bits + (0x7FFF + ((bits >> 16) & 1))) >> 16).astype(np.uint16)

    def decode(self, a: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """float32 copy of stored ``a`` (written into ``out`` when given)."""
        if out is None:
            out = np.empty(a.shape, np.float32)
        if self.name == "bfloat16":
            out.view(np.uint32)[...] = a.astype(np.uint32) << 16
        else:
            np.copyto(out, a, casting="unsafe")
        return out
