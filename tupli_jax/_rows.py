"""Index arithmetic on packed rows (host side, numpy only).

Shared by the flush's cut (``tupli_jax._cut``), the vector Gymnasium recorder
(``tupli_jax._gym_vector``) and the dataset's columnar load (``tupli_jax._dataset_columns``):
each turns per-episode ``(start, count)`` runs into the row indices of all episodes at once;
the cut and the dataset then copy those rows with ``take_rows``.

Example:
    >>> ranges(np.array([5, 1]), np.array([2, 3])).tolist()
    [5, 6, 1, 2, 3]
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["ranges", "take_rows"]


def ranges(starts: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Concatenation of ``arange(s, s + c)`` for each pair, vectorised. int64 ``[sum(counts)]``.

    Example:
        >>> ranges(np.array([0, 10, 3]), np.array([2, 0, 1])).tolist()
        [0, 1, 3]
    """
    total = int(counts.sum())
    offsets = np.cumsum(counts) - counts
    return np.repeat(starts - offsets, counts) + np.arange(total, dtype=np.int64)


def _row_view(array: np.ndarray) -> np.ndarray | None:
    """A 1-D view with one opaque ``void`` item per row (``take`` on it is ~2x faster than on a
    ``[N, k]`` array), or None when a row's bytes are not contiguous or rows are empty. Rows
    may be strided (e.g. one leaf of packed words): ``take`` reads them in place, 2.5x faster
    than making the array contiguous first (rows of 4 float32 in 36-byte words)."""
    row_bytes = array.itemsize * math.prod(array.shape[1:])
    if array.ndim < 2 or row_bytes == 0 or not len(array) or not array[0].flags.c_contiguous:
        return None
    rows = array.reshape(array.shape[0], -1)  # a view: each row is contiguous
    return rows.view(np.dtype((np.void, row_bytes)))[:, 0]


def take_rows(
    source: np.ndarray, rows: np.ndarray, out: np.ndarray, dst: slice | np.ndarray
) -> None:
    """``out[dst] = source[rows]`` with the fewest copies. ``rows`` must be in range (the caller
    checks): ``np.take`` runs with ``mode="clip"``, which needs no temporary buffer.

    Example:
        >>> out = np.zeros((3, 2), np.int64)
        >>> take_rows(np.arange(8).reshape(4, 2), np.array([3, 0]), out, slice(1, 3))
        >>> out.tolist()
        [[0, 0], [6, 7], [0, 1]]
    """
    if source.dtype != out.dtype or not isinstance(dst, slice):
        out[dst] = source.take(rows, axis=0)
        return
    target = out[dst]
    if source.ndim == 1:
        np.take(source, rows, out=target, mode="clip")
        return
    source_rows, target_rows = _row_view(source), _row_view(target)
    if source_rows is not None and target_rows is not None:
        np.take(source_rows, rows, out=target_rows, mode="clip")
    elif target.size:
        target[...] = source.take(rows, axis=0)
