"""Rasterise parsed nucleus polygons, or load an instance label mask, into the image's ``global`` pixels."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
from skimage.draw import polygon as draw_polygon
from skimage.draw import polygon_perimeter

from .._errors import InvalidInputError
from .._utils import user_stacklevel
from ._nuclei_parse import BORDER_TOLERANCE_PX, Parsed

_NPZ_KEYS = ("inst_map", "labels", "label", "mask", "masks", "instances")


def _fill(polygons, names, window: tuple[int, int], outline: bool, source: str, ids=None) -> np.ndarray:
    """Instance raster of polygons given in the window's pixel indices (x, y); ids are ``ids`` or 1 + position.

    A later polygon never overwrites an earlier one; nuclei left without a pixel are reported.
    """
    labels = np.zeros(window, dtype=np.int32)
    empty = []
    for i, poly in enumerate(polygons, start=1):
        value = i if ids is None else ids[i - 1]
        rows, cols = poly[:, 1], poly[:, 0]
        rr, cc = draw_polygon(rows, cols, shape=window)
        if outline:  # vertices are the nucleus' boundary pixels
            pr, pc = polygon_perimeter(np.round(rows), np.round(cols), shape=window, clip=False)
            keep = (pr >= 0) & (pr < window[0]) & (pc >= 0) & (pc < window[1])
            rr, cc = np.concatenate([rr, pr[keep]]), np.concatenate([cc, pc[keep]])
        free = labels[rr, cc] == 0
        labels[rr[free], cc[free]] = value
        if not free.any():
            empty.append(names[i - 1])
    if empty:
        warnings.warn(
            f"{len(empty)} nuclei of {source} have no pixel of their own (too small, outside the image or "
            f"covered by earlier nuclei) and were dropped, e.g. {empty[:3]}.",
            stacklevel=user_stacklevel(),
        )
    return labels


def rasterise_corners(corners: list, parsed: Parsed, shape: tuple[int, int]):
    """Rasterise pixel-corner polygons (global px) over their bounding window: ``(labels, (y0, x0))``.

    A pixel belongs to a polygon when its centre does. Raster ids are ``parsed.ids`` when set, else 1 + position.
    """
    height, width = shape
    centres = [poly - 0.5 for poly in corners]  # pixel (i, j) has its centre at index (i, j)
    lo = np.min([p.min(axis=0) for p in centres], axis=0)
    hi = np.max([p.max(axis=0) for p in centres], axis=0)
    x0, y0 = min(max(int(np.floor(lo[0])), 0), width - 1), min(max(int(np.floor(lo[1])), 0), height - 1)
    x1, y1 = max(min(int(np.ceil(hi[0])) + 1, width), x0 + 1), max(min(int(np.ceil(hi[1])) + 1, height), y0 + 1)
    local = [poly - [x0, y0] for poly in centres]
    return _fill(local, parsed.names, (y1 - y0, x1 - x0), False, parsed.source, parsed.ids), (y0, x0)


def rasterise_indices(parsed: Parsed):
    """Rasterise pixel-index contours on the file's grid: ``(labels, (fy0, fx0))`` in file pixels."""
    lo = np.floor(np.min([p.min(axis=0) for p in parsed.polygons], axis=0)).astype(int)
    hi = np.ceil(np.max([p.max(axis=0) for p in parsed.polygons], axis=0)).astype(int)
    local = [poly - lo for poly in parsed.polygons]
    window = (hi[1] - lo[1] + 1, hi[0] - lo[0] + 1)
    return _fill(local, parsed.names, window, True, parsed.source, parsed.ids), (lo[1], lo[0])


def upsample(window: np.ndarray, file_origin, scale: float, offset, shape: tuple[int, int]):
    """Map a raster on the file's pixel grid to image pixels (nearest neighbour): ``(labels, (y0, x0))``.

    Image pixel ``X`` takes file pixel ``floor((X + 0.5 - offset_x) / scale)``; the result covers
    the window's footprint clipped to the image.
    """
    (fy0, fx0), (h, w) = file_origin, window.shape
    offx, offy = offset
    height, width = shape

    def axis(f0, n, off, size):
        g0 = min(max(int(np.floor(f0 * scale + off)), 0), size - 1)
        g1 = max(min(int(np.ceil((f0 + n) * scale + off)), size), g0 + 1)
        src = np.floor((np.arange(g0, g1) + 0.5 - off) / scale).astype(np.int64) - f0
        return g0, src, (src >= 0) & (src < n)

    y0, rows, vr = axis(fy0, h, offy, height)
    x0, cols, vc = axis(fx0, w, offx, width)
    if scale == 1.0 and vr.all() and vc.all() and len(rows) == h and len(cols) == w and rows[0] == 0 and cols[0] == 0:
        return window, (y0, x0)
    out = np.zeros((len(rows), len(cols)), dtype=np.int32)
    out[np.ix_(vr, vc)] = window[np.ix_(rows[vr], cols[vc])]
    return out, (y0, x0)


def read_label_mask(path, shape: tuple[int, int], scale: float, offset):
    """The instance mask as an int32 raster in image pixels: ``(labels, (y0, x0))``."""
    if isinstance(path, (str, os.PathLike)):
        source = f"label mask {str(path)!r}"
        mask = _load_mask_file(Path(path), source)
    else:
        source = "the label mask"
        mask = path
    if not hasattr(mask, "shape") or not hasattr(mask, "dtype"):
        raise InvalidInputError(f"{source} must be an integer array or a .npy/.npz/.tif/.png path, got {type(mask).__name__}.")
    mask = np.asarray(mask)
    if mask.ndim == 3 and mask.shape[-1] == 1:
        mask = mask[..., 0]
    if mask.ndim != 2:
        raise InvalidInputError(f"{source} must be 2D (H, W), got shape {mask.shape}.")
    if mask.dtype == bool or not np.issubdtype(mask.dtype, np.integer):
        raise InvalidInputError(
            f"{source} must be an integer instance mask (0 = background, one id per nucleus), got {mask.dtype}; "
            "label a binary mask first, e.g. with skimage.measure.label."
        )
    if mask.size and mask.min() < 0:
        raise InvalidInputError(f"{source} has negative ids.")
    if mask.size and mask.max() > np.iinfo(np.int32).max:
        raise InvalidInputError(f"{source} has ids beyond the int32 range.")
    if not mask.any():
        raise InvalidInputError(f"{source}: no nuclei in the mask (every pixel is 0, the background); nothing was imported.")
    height, width = shape
    if scale == 1.0 and offset == (0.0, 0.0):
        if mask.shape != shape:
            raise InvalidInputError(
                f"{source} has shape {mask.shape} but the image is {shape} (H, W); for a mask of a downsampled "
                "level or a crop set scale and offset."
            )
        return mask.astype(np.int32, copy=False), (0, 0)
    x0, y0 = offset
    x1, y1 = x0 + mask.shape[1] * scale, y0 + mask.shape[0] * scale
    tol = BORDER_TOLERANCE_PX
    if x0 < -tol or y0 < -tol or x1 > width + tol or y1 > height + tol:
        raise InvalidInputError(
            f"{source} of shape {mask.shape} scaled by {scale} at offset {offset} covers x {x0:g}–{x1:g}, "
            f"y {y0:g}–{y1:g} px and does not fit the {width}×{height} px image."
        )
    return upsample(mask.astype(np.int32, copy=False), (0, 0), scale, offset, shape)


def _load_mask_file(path: Path, source: str) -> np.ndarray:
    if not path.exists():
        raise InvalidInputError(f"{source} does not exist.")
    suffix = path.suffix.lower()
    try:
        if suffix == ".npy":
            return np.load(path, allow_pickle=False)
        if suffix == ".npz":
            with np.load(path, allow_pickle=False) as npz:
                keys = list(npz.keys())
                if len(keys) == 1:
                    return npz[keys[0]]
                for key in _NPZ_KEYS:
                    if key in keys:
                        return npz[key]
            raise InvalidInputError(f"{source} holds several arrays {keys}; name the mask one of {list(_NPZ_KEYS)}.")
        if suffix in (".tif", ".tiff"):
            import tifffile

            return tifffile.imread(path)
        if suffix == ".png":
            from PIL import Image

            with Image.open(path) as img:
                return np.asarray(img)
    except InvalidInputError:
        raise
    except Exception as err:  # noqa: BLE001 - any reader failure is bad input
        raise InvalidInputError(f"{source} could not be read: {err}.") from None
    raise InvalidInputError(f"{source}: unsupported file type {suffix!r}; use .npy, .npz, .tif/.tiff or .png.")
