"""Slide-scale nucleus segmentation: tiles with overlap, background skipping, seam-free stitching."""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from contextlib import contextmanager

import numpy as np
import torch
from joblib import Parallel, delayed
from scipy import ndimage as ndi
from spatialdata import SpatialData

from .._constants import HISTOCELL_KEY, IMAGE_KEY, NUCLEI_KEY
from .._device import resolve_device
from .._docs import inject_docs
from .._errors import InvalidInputError
from .._utils import progress_bar
from ..io._elements import get_mpp, get_rgb_image, resolve_key
from ..io._nuclei_store import NO_SPOTS, claim_nuclei_keys, spots_for_nuclei, write_nuclei
from ._segment_array import _MIN_HEMATOXYLIN, _hematoxylin, hematoxylin_level, is_padding, segment_array
from ._segmenter import check_scale, load_segmenter, segment_learnt

__all__ = ["segment_nuclei"]

METHODS = ("default", "classical")
_WEIGHTS_METHODS = ("stardist", "cellpose")
# Coarsest pyramid level used for the tissue check: a nucleus is still a few pixels there.
_MAX_CHECK_DOWNSCALE = 8
# Largest pixel size (µm) of the level on which the slide-wide hematoxylin threshold is set.
_LEVEL_MPP = 1.0


@inject_docs
def segment_nuclei(
    sdata: SpatialData,
    *,
    image_key: str | None = None,
    spots_key: str | None = None,
    method: str | Callable[[np.ndarray, float], np.ndarray] = "default",
    key_added: str = NUCLEI_KEY,
    nuclei_table_key: str = HISTOCELL_KEY,
    tile_size_px: int = 2048,
    overlap_um: float = 32.0,
    n_jobs: int = 1,
    progress: bool = True,
    labels_key: str | None = None,
    overwrite: bool = False,
    device: str | None = None,
    **method_kwargs,
) -> None:
    """Segment the nuclei of the H&E image tile by tile and store them.

    Tiles overlap by ``overlap_um``; a nucleus is kept only by the tile whose core (the tile
    less half the overlap on each inner side) holds its centroid, so each nucleus appears once
    and, the overlap exceeding a nucleus diameter, is never cut by a tile edge. Tiles without
    hematoxylin on a coarse pyramid level are skipped without reading the full resolution.
    With several tiles, the hematoxylin threshold is set once for the slide (Otsu on a pyramid
    level of ≤ 1 µm pixels) so that neighbouring tiles agree at their seams.

    Parameters
    ----------
    sdata
        The sample, with ``sdata.attrs["mpp"]`` and an RGB ``uint8`` H&E image.
    {image_key}
    spots_key
        Name of the spot circles or squares (``sdata.shapes``; read) that give the nuclei ``obs["spot_id"]``. None:
        ``"spots"`` when present, else the circles or squares the spots table ``"table"`` annotates, else none.
    method
        ``"default"``: the learnt segmenter shipped in the package (:func:`~histocell_sd.pp.segment_learnt`;
        ``network=`` takes another segmenter folder). ``"classical"``: the classical, resolution-aware
        segmenter (:func:`~histocell_sd.pp.segment_array`). Or any callable ``f(rgb, mpp, **method_kwargs)``
        returning an integer instance raster of the tile's height and width: the tiling, seam
        handling and features stay the same. This is how StarDist, Cellpose or any model runs
        with weights from a local path (nothing is ever downloaded), e.g.::

            from cellpose import models
            net = models.CellposeModel(pretrained_model="/path/to/weights", gpu=False)
            hc.pp.segment_nuclei(sdata, method=lambda rgb, mpp: net.eval(rgb, diameter=8 / mpp)[0])
    {key_added}
        the nucleus polygons (``sdata.shapes``; see :func:`store_nuclei`).
    {nuclei_table_key:written}
    tile_size_px
        Tile side in pixels of the full-resolution image (not of the canonical resolution).
    overlap_um
        Overlap of neighbouring tiles in µm; keep it above the largest nucleus diameter.
    n_jobs
        Tiles segmented in parallel (joblib threads; ``-1`` = all cores).
    {progress}
    {labels_key}
        Here the stitched instance raster of the slide.
    overwrite
        Replace elements under ``key_added`` / ``nuclei_table_key`` / ``labels_key`` that a segmentation did not
        write (refused otherwise, before any work; an earlier segmentation's nuclei are always replaced).
    {device}
        Used by the learnt segmenter (``method="default"``); labels on a GPU can differ from the CPU's by
        rounding at a few boundary pixels.
    **method_kwargs
        Passed to :func:`~histocell_sd.pp.segment_learnt` (``network``, post-processing such as
        ``centre_threshold``), :func:`~histocell_sd.pp.segment_array` (e.g. ``min_area_um2``) or the callable.

    Returns
    -------
    None
        Writes ``sdata.shapes[key_added]``, ``sdata.tables[nuclei_table_key]`` (and
        ``sdata.labels[labels_key]``) as :func:`store_nuclei` does.

    Notes
    -----
    The stitched raster is int32 over the full image (4 bytes per pixel). When no nucleus is
    found a warning is issued and nothing is written (see :func:`store_nuclei`).
    """
    _check_method(method, method_kwargs)
    mpp = get_mpp(sdata)
    earlier = claim_nuclei_keys(sdata, key_added, nuclei_table_key, labels_key, overwrite=overwrite)
    image_key = resolve_key(sdata, "images", key=image_key, default=IMAGE_KEY)
    image = get_rgb_image(sdata, image_key=image_key)
    spots_key = spots_for_nuclei(sdata, spots_key, nuclei_key=key_added)  # after the image: its placement is the likelier fault
    height, width = image.shape[1:]
    tile_size_px, overlap_px = _check_tiling(tile_size_px, overlap_um, mpp)
    if isinstance(n_jobs, bool) or not isinstance(n_jobs, (int, np.integer)) or n_jobs == 0:
        raise InvalidInputError(f"n_jobs must be a whole number of parallel tiles (≥ 1, or -1 for all cores), got {n_jobs!r}.")
    if method == "classical":
        check_scale(mpp, float(method_kwargs.get("canonical_mpp", 0.5)))
    elif method == "default":
        check_scale(mpp, float(load_segmenter(network=method_kwargs.get("network"))[1]["preprocessing"]["mpp"]))
        method_kwargs = method_kwargs | {"device": str(resolve_device(device))}
    tiles = _tiles(height, width, tile_size_px, overlap_px)
    tissue = _tissue_check(sdata.images[image_key], (height, width))
    tiles = [t for t in tiles if tissue(t)]
    if method == "classical" and tiles and "threshold" not in method_kwargs:  # one level for the slide, whatever the tiling
        method_kwargs = method_kwargs | {"threshold": _slide_threshold(sdata.images[image_key], (height, width), mpp, method_kwargs)}
    labels = np.zeros((height, width), dtype=np.int32)
    n_found = 0
    segmenter = {"default": segment_learnt, "classical": segment_array}.get(method, method)
    jobs = (delayed(_segment_tile)(image, t, mpp, segmenter, method_kwargs) for t in tiles)
    with _torch_threads(n_jobs):
        results = Parallel(n_jobs=n_jobs, prefer="threads", return_as="generator")(jobs)
        for window, tile_labels in progress_bar(results, total=len(tiles), desc="segmenting nuclei", disable=not progress):
            n_found = _paste(labels, window, tile_labels, n_found)
    if n_found == 0:
        removed = f"; the earlier nuclei {sorted(earlier)} were removed, as they no longer describe it" if earlier else ""
        warnings.warn(f"No nuclei found in image {image_key!r}; nothing was written{removed}.", stacklevel=2)
    write_nuclei(sdata, labels, origin=(0, 0), image_key=image_key, spots_key=NO_SPOTS if spots_key is None else spots_key, key_added=key_added,
                 nuclei_table_key=nuclei_table_key, labels_key=labels_key, method=f"segment_nuclei:{getattr(method, '__name__', method)}",
                 overwrite=overwrite, connected=method in ("default", "classical"), segmented_here=method in ("default", "classical"))


@contextmanager
def _torch_threads(n_jobs: int):
    """Share the torch threads among ``n_jobs`` parallel tiles (oversubscribed threads thrash)."""
    before = torch.get_num_threads()
    jobs = (os.cpu_count() or 1) if n_jobs < 0 else max(int(n_jobs), 1)
    torch.set_num_threads(max(1, before // jobs))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _check_method(method: str, method_kwargs: dict) -> None:
    """Refuse unknown methods, and deep-learning backends that would need downloaded weights."""
    if callable(method) or method in METHODS:
        return
    if method in _WEIGHTS_METHODS:
        raise InvalidInputError(
            f"method={method!r} is not bundled, and histocell-sd never downloads weights: load the {method} model "
            "from local weights yourself and pass a function (rgb, mpp) -> labels as method= (see the docstring), "
            "or import its results with histocell_sd.io.read_nuclei, or use method='default' or 'classical'."
        )
    raise InvalidInputError(f"Unknown segmentation method {method!r}; choose from {list(METHODS)} or pass a function (rgb, mpp) -> labels.")


def _check_tiling(tile_size_px: int, overlap_um: float, mpp: float) -> tuple[int, int]:
    """Tile side and overlap in pixels; the overlap must leave a core in every tile."""
    if isinstance(tile_size_px, bool) or not isinstance(tile_size_px, (int, np.integer)):
        raise InvalidInputError(f"tile_size_px must be a whole number of pixels, got {tile_size_px!r}.")
    if isinstance(overlap_um, bool) or not isinstance(overlap_um, (int, float, np.number)) or not np.isfinite(overlap_um):
        raise InvalidInputError(f"overlap_um must be a finite number of µm, got {overlap_um!r}.")
    tile_size_px = int(tile_size_px)
    overlap_px = int(np.ceil(float(overlap_um) / mpp))
    if overlap_um < 0 or tile_size_px <= overlap_px:
        raise InvalidInputError(
            f"tile_size_px ({tile_size_px}) must exceed the overlap ({overlap_um} µm = {overlap_px} px), which must be ≥ 0."
        )
    return tile_size_px, overlap_px


def _tiles(height: int, width: int, size: int, overlap: int) -> list[tuple]:
    """Windows ``(y0, y1, x0, x1)`` with their cores ``(cy0, cy1, cx0, cx1)``; cores partition the image."""
    ys, xs = _starts(height, size, overlap), _starts(width, size, overlap)
    return [
        ((y0, min(y0 + size, height), x0, min(x0 + size, width)), (*_core(ys, i, height, overlap), *_core(xs, j, width, overlap)))
        for i, y0 in enumerate(ys)
        for j, x0 in enumerate(xs)
    ]


def _starts(length: int, size: int, overlap: int) -> list[int]:
    """Tile start positions along one axis, stride ``size - overlap``."""
    stride = size - overlap
    return list(range(0, max(length - overlap, 1), stride))


def _core(starts: list[int], i: int, length: int, overlap: int) -> tuple[int, int]:
    """Core of tile ``i`` along one axis: from half the overlap into it to half the overlap into the next."""
    lo = 0 if i == 0 else starts[i] + overlap // 2
    hi = length if i == len(starts) - 1 else starts[i + 1] + overlap // 2
    return lo, hi


def _tissue_check(element, shape: tuple[int, int]):
    """A predicate on a tile: does its window hold hematoxylin on a coarse pyramid level?"""
    level, factor = _coarse_level(element, shape)
    h = _hematoxylin(np.asarray(level).transpose(1, 2, 0).astype(np.float32) / 255.0)
    # half the per-image floor: averaging over a coarse pixel dilutes a small nucleus
    stained = h > _MIN_HEMATOXYLIN / 2

    def has_tissue(tile) -> bool:
        y0, y1, x0, x1 = tile[0]
        return bool(stained[int(y0 / factor) : int(np.ceil(y1 / factor)), int(x0 / factor) : int(np.ceil(x1 / factor))].any())

    return has_tissue


def _slide_threshold(element, shape: tuple[int, int], mpp: float, kwargs: dict) -> float:
    """One hematoxylin level for all tiles: Otsu on a pyramid level of pixels ≤ 1 µm, smoothed as each tile is."""
    level, factor = _coarse_level(element, shape, max(1.0, _LEVEL_MPP / mpp))
    rgb = np.asarray(level).transpose(1, 2, 0).astype(np.float32) / 255.0
    padding = is_padding(rgb)
    h = np.where(padding, 0.0, _hematoxylin(rgb))
    hs = ndi.gaussian_filter(h, kwargs.get("smooth_um", 1.0) / (mpp * factor))
    return hematoxylin_level(hs[(hs > _MIN_HEMATOXYLIN / 2) & ~padding])


def _coarse_level(element, shape: tuple[int, int], max_factor: float = _MAX_CHECK_DOWNSCALE):
    """The coarsest pyramid level at most ``max_factor`` times smaller, and its factor."""
    if hasattr(element, "children") and element.children:
        best, best_factor = None, 0.0
        for node in element.children.values():
            level = node["image"]
            factor = shape[0] / level.shape[1]
            if best_factor < factor <= max_factor * 1.01:
                best, best_factor = level, factor
        if best is not None:
            return best.data, best_factor
        element = element["scale0"]["image"]
    step = max(1, int(max_factor))
    return element.data[:, ::step, ::step], float(step)


def _segment_tile(image, tile: tuple, mpp: float, segmenter, kwargs: dict) -> tuple[tuple, np.ndarray]:
    """Segment one window; keep nuclei whose centroid lies in the core. Returns the window and its labels."""
    (y0, y1, x0, x1), (cy0, cy1, cx0, cx1) = tile
    rgb = np.asarray(image.data[:, y0:y1, x0:x1]).transpose(1, 2, 0)
    labels = np.asarray(segmenter(rgb, mpp, **kwargs))
    if labels.shape != rgb.shape[:2] or not np.issubdtype(labels.dtype, np.integer) or (labels.size and labels.min() < 0):
        raise InvalidInputError(
            f"The segmentation method returned {labels.dtype} labels of shape {labels.shape} for a tile of shape "
            f"{rgb.shape[:2]}; it must return non-negative integer instance ids of the tile's shape."
        )
    labels = labels.astype(np.int32, copy=False)
    n = int(labels.max())
    if n == 0:
        return tile[0], labels
    rows, cols = np.nonzero(labels)
    lab = labels[rows, cols]
    count = np.bincount(lab, minlength=n + 1)
    with np.errstate(invalid="ignore", divide="ignore"):
        cy = np.bincount(lab, rows, minlength=n + 1) / count + y0
        cx = np.bincount(lab, cols, minlength=n + 1) / count + x0
    keep = (count > 0) & (cy >= cy0) & (cy < cy1) & (cx >= cx0) & (cx < cx1)
    keep[0] = False
    new_ids = np.zeros(n + 1, dtype=np.int32)
    new_ids[keep] = np.arange(1, int(keep.sum()) + 1, dtype=np.int32)
    return tile[0], new_ids[labels]


def _paste(labels: np.ndarray, window: tuple, tile_labels: np.ndarray, n_found: int) -> int:
    """Write a tile's nuclei into the global raster under fresh ids (taken pixels stay); return the id count."""
    y0, y1, x0, x1 = window
    n = int(tile_labels.max())
    if n == 0:
        return n_found
    target = labels[y0:y1, x0:x1]
    free = (tile_labels > 0) & (target == 0)
    target[free] = tile_labels[free] + n_found
    return n_found + n
