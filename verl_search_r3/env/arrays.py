"""Small numpy helpers shared by the environment modules."""

from __future__ import annotations

import numpy as np

__all__ = ["l2_normalize", "grow_rows"]


def l2_normalize(x: np.ndarray) -> np.ndarray:
    """Row-wise L2 normalisation of ``(n, d)`` float32; all-zero rows stay zero."""
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.where(norms > 0, norms, 1.0).astype(x.dtype)


def grow_rows(array: np.ndarray, rows: int, fill: float | int = 0) -> np.ndarray:
    """``array`` with at least ``rows`` rows; new rows hold ``fill``. Capacity doubles, so
    appending one row at a time costs amortised O(1)."""
    if len(array) >= rows:
        return array
    out = np.full((max(rows, 2 * len(array)),) + array.shape[1:], fill, dtype=array.dtype)
    out[: len(array)] = array
    return out
