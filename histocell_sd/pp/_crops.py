"""Square crops around nuclei."""

from __future__ import annotations

import numpy as np


def nucleus_crops(image: np.ndarray, xy: np.ndarray, size: int) -> np.ndarray:
    """(n, 3, size, size) uint8 crops of an (h, w, 3) image centred on ``xy`` (x, y px), zero-padded at the borders."""
    half = size // 2
    padded = np.pad(image, ((half, half + 1), (half, half + 1), (0, 0)))
    xy = np.asarray(xy, dtype=np.float64).reshape(-1, 2)
    # a crop centred on x starts at x - half, i.e. at x in the padded image
    x0 = np.clip(np.round(xy[:, 0]).astype(int), 0, padded.shape[1] - size)
    y0 = np.clip(np.round(xy[:, 1]).astype(int), 0, padded.shape[0] - size)
    offs = np.arange(size)
    rows = y0[:, None, None] + offs[None, :, None]
    cols = x0[:, None, None] + offs[None, None, :]
    return padded[rows, cols].transpose(0, 3, 1, 2)
