"""Index arithmetic on packed rows (host side, numpy only).

Shared by the flush's cut (``tupli_jax._cut``), the vector Gymnasium recorder
(``tupli_jax._gym_vector``) and the dataset's columnar load (``tupli_jax._dataset_columns``):
each turns per-episode ``(start, count)`` runs into the row indices of all episodes at once.

Example:
    >>> ranges(np.array([5, 1]), np.array([2, 3])).tolist()
    [5, 6, 1, 2, 3]
"""

from __future__ import annotations

import numpy as np

__all__ = ["ranges"]


def ranges(starts: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Concatenation of ``arange(s, s + c)`` for each pair, vectorised. int64 ``[sum(counts)]``.

    Example:
        >>> ranges(np.array([0, 10, 3]), np.array([2, 0, 1])).tolist()
        [0, 1, 3]
    """
    total = int(counts.sum())
    offsets = np.cumsum(counts) - counts
    return np.repeat(starts - offsets, counts) + np.arange(total, dtype=np.int64)
