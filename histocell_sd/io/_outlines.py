"""Exact pixel outlines of nuclei in an instance label raster (for :func:`~histocell_sd.io.write_geojson`).

An outline runs along pixel edges, so its vertices are on pixel corners and a pixel lies inside it exactly
when its centre does: rasterising the outline the way :func:`~histocell_sd.io.read_nuclei` does gives back
the nucleus' pixels (its largest part, holes filled).
"""

from __future__ import annotations

import numpy as np
import shapely
from scipy import ndimage as ndi

from .._errors import InvalidInputError

_BAND_ROWS = 1024


def pixel_outlines(element, ids: np.ndarray, names: list, key: str) -> list:
    """One outline polygon per id, in the raster's own pixel coordinates (x = column, y = row)."""
    raster = _array(element)
    order = np.argsort(ids, kind="stable")
    sorted_ids = ids[order]
    boxes = _boxes(raster, sorted_ids)
    missing = np.flatnonzero(boxes[:, 0] < 0)
    if len(missing):
        raise InvalidInputError(
            f"{len(missing)} nuclei have no pixel in the labels {key!r}, e.g. {[names[order[k]] for k in missing[:3]]}; "
            "is it the raster these nuclei were stored from?"
        )
    out = np.empty(len(ids), dtype=object)
    by_start = np.argsort(boxes[:, 0], kind="stable")
    for band in np.split(by_start, np.flatnonzero(np.diff(boxes[by_start, 0] // _BAND_ROWS)) + 1):
        y0, y1 = boxes[band, 0].min(), boxes[band, 1].max()
        x0, x1 = boxes[band, 2].min(), boxes[band, 3].max()
        window = _compress(np.asarray(raster[y0:y1, x0:x1]), sorted_ids)
        for k in band:
            by0, by1, bx0, bx1 = boxes[k]
            mask = window[by0 - y0 : by1 - y0, bx0 - x0 : bx1 - x0] == k + 1
            out[order[k]] = outline(mask, by0, bx0)
    return list(out)


def outline(mask: np.ndarray, y0: int, x0: int):
    """The outline (exterior of the largest part) of a boolean mask whose pixel ``[0, 0]`` is ``(x0, y0)``."""
    d = np.diff(np.pad(mask, ((0, 0), (1, 1))).astype(np.int8), axis=1)
    rows, starts = np.nonzero(d == 1)
    _, stops = np.nonzero(d == -1)  # row-major, so each run's stop pairs with its start
    runs = shapely.box(x0 + starts, y0 + rows, x0 + stops, y0 + rows + 1)
    union = shapely.union_all(runs)
    if union.geom_type == "MultiPolygon":
        union = max(union.geoms, key=lambda g: g.area)
    return shapely.simplify(shapely.Polygon(union.exterior), 0.0)  # drop the collinear vertices of the runs


def _array(element):
    """The full-resolution 2-D array (numpy or dask) of a Labels2D element."""
    if hasattr(element, "children"):  # multiscale DataTree: its full-resolution level
        element = next(iter(element["scale0"].ds.data_vars.values()))
    data = getattr(element, "data", element)
    if data.ndim != 2:
        raise InvalidInputError(f"A Labels2D element must be 2-D, got shape {data.shape}.")
    return data


def _compress(block: np.ndarray, sorted_ids: np.ndarray) -> np.ndarray:
    """Relabel ``block``: the id ``sorted_ids[k]`` becomes ``k + 1``, anything else 0."""
    idx = np.searchsorted(sorted_ids, block)
    idx = np.minimum(idx, len(sorted_ids) - 1)
    return np.where(sorted_ids[idx] == block, idx + 1, 0)


def _boxes(raster, sorted_ids: np.ndarray) -> np.ndarray:
    """``(y0, y1, x0, x1)`` of each id over the whole raster (band by band); -1 where an id has no pixel."""
    boxes = np.full((len(sorted_ids), 4), -1, dtype=np.int64)
    for r0 in range(0, raster.shape[0], _BAND_ROWS):
        found = ndi.find_objects(_compress(np.asarray(raster[r0 : r0 + _BAND_ROWS]), sorted_ids), max_label=len(sorted_ids))
        for k, sl in enumerate(found):
            if sl is None:
                continue
            box = (sl[0].start + r0, sl[0].stop + r0, sl[1].start, sl[1].stop)
            if boxes[k, 0] < 0:
                boxes[k] = box
            else:
                boxes[k] = (boxes[k, 0], box[1], min(boxes[k, 2], box[2]), max(boxes[k, 3], box[3]))
    return boxes
