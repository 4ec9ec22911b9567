"""Bilinear, anti-aliased resampling of RGB images as two sparse matrix products.

Computes what ``skimage.transform.rescale(img, scale, order=1, anti_aliasing=scale < 1,
preserve_range=True, channel_axis=-1)`` computes (mirror boundaries, Gaussian sigma
``(1 / scale - 1) / 2``, values equal to ~1e-13), but evaluates the Gaussian only where the
interpolation reads it: each axis becomes one banded matrix, Gaussian and interpolation merged.
Downsampling 8× this is ~5× faster than filtering the whole image first, and it runs over blocks of
output rows, so a wide band of a whole slide is never converted to float64 at once.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

__all__ = ["rescale_rgb", "rescale_uint8"]


def _mirror(index: np.ndarray, n: int) -> np.ndarray:
    """Indices reflected about the first and last pixel (``scipy.ndimage`` mode ``"mirror"``)."""
    if n == 1:
        return np.zeros_like(index)
    period = 2 * (n - 1)
    index = np.abs(index) % period
    return np.where(index >= n, period - index, index)


def _axis_operator(n_in: int, n_out: int, anti_aliasing: bool) -> sp.csr_matrix:
    """(n_out, n_in) matrix: Gaussian anti-aliasing (if asked) then linear interpolation."""
    factor = n_in / n_out
    coord = (np.arange(n_out) + 0.5) * factor - 0.5
    left = np.floor(coord).astype(np.int64)
    t = coord - left
    rows = np.arange(n_out)
    operator = sp.csr_matrix(
        (np.r_[1 - t, t], (np.r_[rows, rows], np.r_[_mirror(left, n_in), _mirror(left + 1, n_in)])), shape=(n_out, n_in)
    )
    sigma = max(0.0, (factor - 1) / 2)
    if not anti_aliasing or sigma == 0:
        return operator
    radius = int(4.0 * sigma + 0.5)  # scipy.ndimage.gaussian_filter's default truncation
    offsets = np.arange(-radius, radius + 1)
    weights = np.exp(-0.5 * offsets**2 / sigma**2)
    weights /= weights.sum()
    pixels = np.arange(n_in)
    gaussian = sp.csr_matrix(
        (np.tile(weights, n_in), (np.repeat(pixels, len(offsets)), _mirror((pixels[:, None] + offsets).ravel(), n_in))),
        shape=(n_in, n_in),
    )
    return (operator @ gaussian).tocsr()


def _output_shape(image: np.ndarray, scale: float) -> tuple[int, int, int]:
    h, w, c = image.shape
    return max(int(np.round(scale * h)), 1), max(int(np.round(scale * w)), 1), c


def _rescaled_blocks(image: np.ndarray, scale: float, block_bytes: int):
    """Yield ``(first output row, float64 block of output rows)``; each block reads only the input rows it needs,
    so memory stays near ``block_bytes`` however wide the image (every output value is computed as in one pass)."""
    h, w, c = image.shape
    out_h, out_w, _ = _output_shape(image, scale)
    vertical, horizontal = _axis_operator(h, out_h, scale < 1), _axis_operator(w, out_w, scale < 1)
    rows_per_block = max(1, int(block_bytes / (w * c * 8) * min(scale, 1.0)))
    for first in range(0, out_h, rows_per_block):
        part = vertical[first : first + rows_per_block]
        lo, hi = int(part.indices.min()), int(part.indices.max()) + 1
        part = sp.csr_matrix((part.data, part.indices - lo, part.indptr), shape=(part.shape[0], hi - lo))
        rows = part @ image[lo:hi].reshape(hi - lo, w * c).astype(np.float64)
        columns = rows.reshape(-1, w, c).transpose(1, 0, 2).reshape(w, -1)
        yield first, (horizontal @ columns).reshape(out_w, -1, c).transpose(1, 0, 2)


def _rescale(image: np.ndarray, scale: float, block_bytes: int, dtype) -> np.ndarray:
    image = np.asarray(image)
    low, high = float(image.min()), float(image.max())
    out = np.empty(_output_shape(image, scale), dtype=dtype)
    for first, block in _rescaled_blocks(image, scale, block_bytes):
        block = np.clip(block, low, high)
        out[first : first + len(block)] = np.round(block) if dtype == np.uint8 else block
    return out


def rescale_rgb(image: np.ndarray, scale: float, *, block_bytes: int = 2**26) -> np.ndarray:
    """Resample an ``(h, w, c)`` image by ``scale`` (bilinear; Gaussian anti-aliasing when ``scale < 1``).

    Parameters
    ----------
    image
        ``(h, w, c)`` array, any real dtype; values are kept in their range.
    scale
        Output size over input size, the same for both axes; the output is
        ``round(scale * h) × round(scale * w)`` (at least 1 × 1).
    block_bytes
        About how much float64 input is converted at a time (the result does not depend on it).

    Returns
    -------
    ``float64`` array of shape ``(round(scale * h), round(scale * w), c)``, clipped to the input's range.
    """
    return _rescale(image, scale, block_bytes, np.float64)


def rescale_uint8(image: np.ndarray, scale: float, *, block_bytes: int = 2**26) -> np.ndarray:
    """:func:`rescale_rgb` of a uint8 image, rounded back to uint8 block by block."""
    return _rescale(image, scale, block_bytes, np.uint8)
