"""Square crops around nuclei."""

from __future__ import annotations

import numpy as np


def nucleus_crops(image: np.ndarray, xy: np.ndarray, *, size: int) -> np.ndarray:
    """Square crops of an image centred on nuclei, zero-padded at the borders.

    Parameters
    ----------
    image
        (h, w, 3) array (e.g. the H&E as uint8).
    xy
        (n, 2) crop centres, x and y in pixels of ``image``.
    size
        Side of the crops in pixels.

    Returns
    -------
    numpy.ndarray
        (n, 3, size, size) crops, of ``image``'s dtype.
    """
    half = size // 2
    padded = np.pad(image, ((half, half + 1), (half, half + 1), (0, 0)))
    xy = np.asarray(xy, dtype=np.float64).reshape(-1, 2)
    # a crop centred on x starts at x - half, i.e. at x in the padded image
    x0 = np.clip(np.round(xy[:, 0]).astype(int), 0, padded.shape[1] - size)
    y0 = np.clip(np.round(xy[:, 1]).astype(int), 0, padded.shape[0] - size)
    windows = np.lib.stride_tricks.sliding_window_view(padded, (size, size), axis=(0, 1))  # (h', w', c, size, size), a view
    return windows[y0, x0]
