"""Pooling of low-count square bins (Visium HD) with their neighbours before deconvolution."""

from __future__ import annotations

import numpy as np
from scipy import sparse

from ..._errors import InvalidInputError
from ...io._spots import SQUARE, SpotGeometry

MAX_POOL_RINGS = 3
"""Largest pool: the bin and 3 rings of neighbours (7 × 7 bins; 56 µm of 8 µm bins, about a Visium spot)."""
_CHUNK = 65536


def pool_low_counts(counts: sparse.spmatrix, geometry: SpotGeometry, min_counts: float,
                    max_rings: int = MAX_POOL_RINGS) -> tuple[sparse.csr_matrix, np.ndarray]:
    """Counts of each bin, or of the smallest square window around it that holds ``min_counts`` when the bin alone does not.

    A bin with at least ``min_counts`` counts keeps its own row. A bin with fewer takes the summed counts of the
    ``(2r + 1) × (2r + 1)`` bins centred on it (neighbours along the bins' own grid, missing ones skipped), ``r``
    the fewest rings (1 .. ``max_rings``) that reach ``min_counts`` (``max_rings`` when none does). The windows
    overlap: the result is a smoothing of the low bins only, never of the others, and the matrix stays sparse.

    Returns
    -------
    tuple
        ``(pooled counts (bins × genes, CSR), bins pooled per row)``, rows in the order of ``counts``.
    """
    if geometry.shape != SQUARE:
        raise InvalidInputError("Pooling low-count spots needs square bins (Visium HD); Visium spots are deconvolved one by one.")
    if not (np.isfinite(min_counts) and min_counts >= 0):
        raise InvalidInputError(f"min_counts must be a non-negative number of counts, got {min_counts!r}.")
    counts = sparse.csr_matrix(counts)
    n = counts.shape[0]
    totals = np.asarray(counts.sum(axis=1)).ravel()
    low = np.flatnonzero(totals < min_counts)
    if not len(low):
        return counts, np.ones(n, np.int64)
    cell = _grid_cells(geometry)
    origin = cell.min(axis=0)
    cell -= origin
    grid = np.full(tuple(cell.max(axis=0) + 1), -1, dtype=np.int64)
    grid[cell[:, 0], cell[:, 1]] = np.arange(n)
    rings = np.zeros(n, np.int64)
    todo = low
    for r in range(1, max_rings + 1):
        members = _window(grid, cell[todo], r)
        pooled = np.where(members >= 0, totals[np.maximum(members, 0)], 0).sum(axis=1)
        done = (pooled >= min_counts) | (r == max_rings)
        rings[todo[done]] = r
        todo = todo[~done]
        if not len(todo):
            break
    rows, cols = [np.arange(n)[rings == 0]], [np.arange(n)[rings == 0]]
    for r in np.unique(rings[rings > 0]):
        these = np.flatnonzero(rings == r)
        for start in range(0, len(these), _CHUNK):
            chunk = these[start : start + _CHUNK]
            members = _window(grid, cell[chunk], r)
            present = members >= 0
            rows.append(np.broadcast_to(chunk[:, None], members.shape)[present])
            cols.append(members[present])
    rows, cols = np.concatenate(rows), np.concatenate(cols)
    pool = sparse.csr_matrix((np.ones(len(rows), counts.dtype), (rows, cols)), shape=(n, n))
    return (pool @ counts).tocsr(), np.diff(pool.indptr).astype(np.int64)


def _grid_cells(geometry: SpotGeometry) -> np.ndarray:
    """Integer (column, row) of each bin along the bins' own frame (their centres are one side apart)."""
    frame = np.einsum("nj,nkj->nk", geometry.centers, geometry.axes) / geometry.size[:, None]
    turn = 2 * np.pi * frame
    phase = np.arctan2(np.sin(turn).mean(axis=0), np.cos(turn).mean(axis=0)) / (2 * np.pi)  # the grid's offset, circular mean
    cell = np.round(frame - phase).astype(np.int64)
    if np.abs(frame - phase - cell).max(initial=0.0) > 0.05:
        raise InvalidInputError("The square bins do not lie on one grid (centres one side apart); they cannot be pooled.")
    return cell


def _window(grid: np.ndarray, cells: np.ndarray, r: int) -> np.ndarray:
    """Bin rows of the ``(2r + 1)²`` window around each cell (-1 where no bin)."""
    offsets = np.arange(-r, r + 1)
    dc, dr = np.meshgrid(offsets, offsets, indexing="ij")
    c = cells[:, :1] + dc.ravel()[None]
    rr = cells[:, 1:] + dr.ravel()[None]
    inside = (c >= 0) & (rr >= 0) & (c < grid.shape[0]) & (rr < grid.shape[1])
    return np.where(inside, grid[np.clip(c, 0, grid.shape[0] - 1), np.clip(rr, 0, grid.shape[1] - 1)], -1)
