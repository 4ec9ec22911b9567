"""Bring-your-own nuclei: import HoVer-Net JSON, QuPath / GeoJSON polygons or instance label masks.

Every format becomes an instance label raster in the image's ``global`` pixels, which
:func:`histocell_sd.pp._nuclei.store_nuclei` turns into the ``nuclei`` shapes and the ``histocell``
table, exactly as segmentation does.

Pixel conventions
-----------------
* HoVer-Net contours come from ``cv2.findContours``: vertices are integer pixel indices on the
  nucleus' boundary pixels, so the polygon *and its outline* are filled, on the file's own pixel
  grid, then mapped to the image's (nearest neighbour) when ``scale`` / ``offset`` are set.
* GeoJSON (QuPath) vertices are on pixel corners, as in ``global``: pixel ``(col, row)`` covers
  ``[col, col + 1) × [row, row + 1)`` and belongs to the nucleus when its centre does.
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from skimage.draw import polygon as draw_polygon
from skimage.draw import polygon_perimeter
from spatialdata import SpatialData

from .._constants import HISTOCELL_KEY, IMAGE_KEY, NUCLEI_KEY, NUCLEUS_ID_KEY
from .._docs import inject_docs
from .._errors import InvalidInputError
from ._elements import get_image, resolve_key

__all__ = ["read_nuclei"]

_FORMATS = ("hovernet", "geojson", "labels")
_NPZ_KEYS = ("inst_map", "labels", "label", "mask", "masks", "instances")
# Vertices may lie this far (px) beyond the image border (pixel-corner vertices, rounding).
_BORDER_TOLERANCE_PX = 1.0


@dataclass
class _Parsed:
    """Polygons (file coordinates, x/y columns) with their record names and optional classes."""

    polygons: list = field(default_factory=list)
    names: list = field(default_factory=list)
    types: list = field(default_factory=list)
    source: str = ""


@inject_docs
def read_nuclei(
    path,
    sdata: SpatialData,
    *,
    format: str = "hovernet",
    image_key: str | None = None,
    key_added: str = NUCLEI_KEY,
    nuclei_table_key: str = HISTOCELL_KEY,
    scale: float = 1.0,
    offset=(0, 0),
    type_map: dict | None = None,
    spots_key: str | None = None,
) -> None:
    """Import nuclei segmented elsewhere into ``sdata``: the same shapes and table as segmentation writes.

    Parameters
    ----------
    path
        HoVer-Net JSON file (or its loaded dict), GeoJSON file (or a FeatureCollection dict / list
        of Features), or for ``"labels"`` an instance mask: a ``.npy``, ``.npz``, ``.tif``/``.tiff``
        or ``.png`` file, or an integer array (0 = background, one id per nucleus).
    sdata
        The sample; needs the H&E and ``sdata.attrs["mpp"]``.
    format
        ``"hovernet"``, ``"geojson"`` or ``"labels"``.
    {image_key}
    {key_added}
        the nucleus polygons (``sdata.shapes``), indexed ``"nucleus_<id>"``.
    {nuclei_table_key:written}
    scale, offset
        Map the file's coordinates to full-resolution pixels: ``global = file * scale + offset``
        with ``offset = (x, y)`` in full-resolution px (the top-left of an exported crop). Use
        ``scale=4`` for a file made on a 4× downsampled level. A label mask is upsampled (nearest
        neighbour) and placed at ``offset``.
    type_map
        Renames per-nucleus classes, e.g. ``{1: "neoplastic", 2: "inflammatory"}``. HoVer-Net's
        ``type_info.json`` (``{"1": ["neopla", [r, g, b]], ...}``) works as is.
    spots_key
        Name of the spot circles (``sdata.shapes``; read) used for ``obs["spot_id"]``: by default
        ``"spots"`` when present, else none.

    Returns
    -------
    None
        Writes ``sdata.shapes[key_added]`` and ``sdata.tables[nuclei_table_key]`` as
        :func:`~histocell_sd.pp.store_nuclei` does, and the imported classes in
        ``obs["imported_type"]`` of that table.

    Notes
    -----
    Polygons are rasterised in file order and a later polygon never overwrites pixels of an
    earlier one; a nucleus left with no pixel is dropped with a warning. Classes in the file
    (HoVer-Net ``"type"``, GeoJSON ``properties.classification.name``) are stored as the
    categorical ``sdata.tables[nuclei_table_key].obs["imported_type"]``, matched to the table rows by
    raster id (a dropped nucleus takes its class with it). GeoJSON holes are filled and a
    MultiPolygon keeps its largest part; in a QuPath export mixing annotations with detections or
    cells, the annotations (e.g. tissue outlines) are skipped, and cells contribute their
    ``nucleusGeometry`` when present.
    """
    if format not in _FORMATS:
        raise InvalidInputError(f"format must be one of {_FORMATS}, got {format!r}.")
    scale, offset = _check_transform(scale, offset)
    image_key = resolve_key(sdata, "images", key=image_key, default=IMAGE_KEY)
    level = get_image(sdata, image_key=image_key)
    shape = (int(level.sizes["y"]), int(level.sizes["x"]))

    labels, origin, parsed = _to_raster(path, format, shape, scale, offset)

    from ..pp._nuclei import store_nuclei

    store_nuclei(
        sdata, labels, origin=origin, image_key=image_key, spots_key=spots_key, key_added=key_added,
        nuclei_table_key=nuclei_table_key, method=f"imported ({format})",
    )
    if parsed is not None and any(t is not None for t in parsed.types):
        _store_types(sdata, nuclei_table_key, parsed.types, type_map)


# ----------------------------------------------------------------------------------------- parsing


def _to_raster(path, format: str, shape: tuple[int, int], scale: float, offset):
    """Parse and rasterise: ``(labels, origin (y0, x0), parsed polygons or None for a mask)``."""
    if format == "labels":
        labels, origin = _read_label_mask(path, shape, scale, offset)
        return labels, origin, None
    parsed = _parse_hovernet(path) if format == "hovernet" else _parse_geojson(path)
    if not parsed.polygons:
        raise InvalidInputError(f"{parsed.source} contains no nuclei.")
    shift = 0.0 if format == "geojson" else 0.5  # pixel indices -> pixel-corner coordinates
    corners = [(poly + shift) * scale + np.asarray(offset) for poly in parsed.polygons]
    _check_inside(corners, parsed, shape)
    if format == "geojson":
        labels, origin = _rasterise_corners(corners, parsed, shape)
    else:  # fill on the file's own pixel grid (outline included), then map to the image's
        window, file_origin = _rasterise_indices(parsed)
        labels, origin = _upsample(window, file_origin, scale, offset, shape)
    if not labels.any():
        raise InvalidInputError(f"No nucleus of {parsed.source} covers a pixel of the image; nothing was imported.")
    return labels, origin, parsed


def _check_transform(scale, offset) -> tuple[float, tuple[float, float]]:
    try:
        scale = float(scale)
        offset = tuple(float(v) for v in offset)
    except (TypeError, ValueError):
        raise InvalidInputError(f"scale must be a number and offset an (x, y) pair, got {scale!r}, {offset!r}.") from None
    if not np.isfinite(scale) or scale <= 0:
        raise InvalidInputError(f"scale must be a positive number, got {scale!r}.")
    if len(offset) != 2 or not np.all(np.isfinite(offset)):
        raise InvalidInputError(f"offset must be a finite (x, y) pair in pixels, got {offset!r}.")
    return scale, offset


def _load_json(path, what: str):
    """Return ``(object, source description)`` for a JSON path or an already loaded object."""
    if isinstance(path, (str, os.PathLike)):
        source = f"{what} file {str(path)!r}"
        try:
            with open(path, encoding="utf-8") as fh:
                return json.load(fh), source
        except FileNotFoundError:
            raise InvalidInputError(f"{source} does not exist.") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise InvalidInputError(f"{source} is not valid JSON: {err}.") from None
    return path, f"the {what} input"


def _as_polygon(coords, record: str, min_points: int = 3) -> np.ndarray:
    """An (n, 2) float array of x, y from nested lists, refusing malformed or degenerate contours."""
    try:
        poly = np.asarray(coords, dtype=np.float64)
    except (TypeError, ValueError):
        raise InvalidInputError(f"{record} has a malformed contour (not a list of [x, y] pairs).") from None
    if poly.ndim != 2 or poly.shape[1] < 2 or poly.shape[0] == 0:
        raise InvalidInputError(f"{record} has a malformed contour of shape {poly.shape}; expected [[x, y], ...].")
    poly = poly[:, :2]
    if not np.isfinite(poly).all():
        raise InvalidInputError(f"{record} has NaN or infinite contour coordinates.")
    if len(poly) > 1 and np.array_equal(poly[0], poly[-1]):
        poly = poly[:-1]  # closed ring
    if len(poly) < min_points:
        raise InvalidInputError(f"{record} has a contour with {len(poly)} points; a polygon needs at least 3.")
    return poly


def _parse_hovernet(path) -> _Parsed:
    data, source = _load_json(path, "HoVer-Net JSON")
    if not isinstance(data, dict) or "nuc" not in data:
        raise InvalidInputError(f"{source} has no 'nuc' key; expected HoVer-Net output {{'mag': ..., 'nuc': {{id: {{...}}}}}}.")
    nuc = data["nuc"]
    if isinstance(nuc, list):
        nuc = {str(i): rec for i, rec in enumerate(nuc)}
    if not isinstance(nuc, dict):
        raise InvalidInputError(f"{source}: 'nuc' must map nucleus ids to records, got {type(nuc).__name__}.")
    parsed = _Parsed(source=source)
    for nid, rec in nuc.items():
        record = f"nucleus {nid!r} of {source}"
        if not isinstance(rec, dict):
            raise InvalidInputError(f"{record} is not a dict of 'bbox', 'centroid', 'contour', 'type' ...")
        if "contour" not in rec:
            raise InvalidInputError(f"{record} has no 'contour'.")
        parsed.polygons.append(_as_polygon(rec["contour"], record))
        parsed.names.append(str(nid))
        parsed.types.append(rec.get("type"))
    return parsed


def _geojson_features(data, source: str) -> list:
    if isinstance(data, list):
        return data
    if isinstance(data, dict):
        if data.get("type") == "FeatureCollection" or "features" in data:
            features = data.get("features")
            if not isinstance(features, list):
                raise InvalidInputError(f"{source}: 'features' must be a list.")
            return features
        if data.get("type") == "Feature":
            return [data]
    raise InvalidInputError(f"{source} is neither a GeoJSON FeatureCollection nor a list of Features.")


def _ring_area(ring: np.ndarray) -> float:
    x, y = ring[:, 0], ring[:, 1]
    return 0.5 * abs(float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))))


def _classification(props: dict):
    cls = props.get("classification")
    if isinstance(cls, dict):
        return cls.get("name")
    if isinstance(cls, str):
        return cls
    return None


def _parse_geojson(path) -> _Parsed:
    data, source = _load_json(path, "GeoJSON")
    features = _geojson_features(data, source)
    object_types = [
        (f.get("properties") or {}).get("objectType") if isinstance(f, dict) else None for f in features
    ]
    skip_annotations = "annotation" in object_types and any(t not in (None, "annotation") for t in object_types)
    parsed = _Parsed(source=source)
    for i, feat in enumerate(features):
        if not isinstance(feat, dict):
            raise InvalidInputError(f"feature {i} of {source} is not a GeoJSON Feature object.")
        fid = feat.get("id")
        record = f"feature {i}" + (f" (id {fid!r})" if fid is not None else "") + f" of {source}"
        props = feat.get("properties") or {}
        if skip_annotations and props.get("objectType") == "annotation":
            continue
        geometry = feat.get("nucleusGeometry") or feat.get("geometry")
        if not isinstance(geometry, dict) or "type" not in geometry:
            raise InvalidInputError(f"{record} has no geometry.")
        kind, coords = geometry["type"], geometry.get("coordinates")
        if kind == "Polygon":
            if not isinstance(coords, list) or not coords:
                raise InvalidInputError(f"{record} has an empty Polygon.")
            poly = _as_polygon(coords[0], record)  # exterior ring; holes are filled
        elif kind == "MultiPolygon":
            if not isinstance(coords, list) or not coords:
                raise InvalidInputError(f"{record} has an empty MultiPolygon.")
            parts = [_as_polygon(part[0] if isinstance(part, list) and part else part, record) for part in coords]
            poly = max(parts, key=_ring_area)
        else:
            raise InvalidInputError(f"{record} has a {kind} geometry; nuclei must be Polygon or MultiPolygon.")
        parsed.polygons.append(poly)
        parsed.names.append(str(fid) if fid is not None else str(i))
        parsed.types.append(_classification(props))
    return parsed


def _check_inside(corners: list, parsed: _Parsed, shape: tuple[int, int]) -> None:
    height, width = shape
    tol = _BORDER_TOLERANCE_PX
    for poly, name in zip(corners, parsed.names):
        lo, hi = poly.min(axis=0), poly.max(axis=0)
        if lo[0] < -tol or lo[1] < -tol or hi[0] > width + tol or hi[1] > height + tol:
            raise InvalidInputError(
                f"nucleus {name!r} of {parsed.source} lies outside the {width}×{height} px image "
                f"(x {lo[0]:.1f}–{hi[0]:.1f}, y {lo[1]:.1f}–{hi[1]:.1f} px after scale/offset); "
                "was it exported from a downsampled level or a crop? Set scale and offset."
            )


# ------------------------------------------------------------------------------------- rasterising


def _fill(polygons, names, window: tuple[int, int], outline: bool, source: str) -> np.ndarray:
    """Instance raster of polygons given in the window's pixel indices (x, y); ids are 1 + position.

    A later polygon never overwrites an earlier one; nuclei left without a pixel are reported.
    """
    labels = np.zeros(window, dtype=np.int32)
    empty = []
    for i, poly in enumerate(polygons, start=1):
        rows, cols = poly[:, 1], poly[:, 0]
        rr, cc = draw_polygon(rows, cols, shape=window)
        if outline:  # vertices are the nucleus' boundary pixels
            pr, pc = polygon_perimeter(np.round(rows), np.round(cols), shape=window, clip=False)
            keep = (pr >= 0) & (pr < window[0]) & (pc >= 0) & (pc < window[1])
            rr, cc = np.concatenate([rr, pr[keep]]), np.concatenate([cc, pc[keep]])
        free = labels[rr, cc] == 0
        labels[rr[free], cc[free]] = i
        if not free.any():
            empty.append(names[i - 1])
    if empty:
        warnings.warn(
            f"{len(empty)} nuclei of {source} have no pixel of their own (too small, outside the image or "
            f"covered by earlier nuclei) and were dropped, e.g. {empty[:3]}.",
            stacklevel=4,
        )
    return labels


def _rasterise_corners(corners: list, parsed: _Parsed, shape: tuple[int, int]):
    """Rasterise pixel-corner polygons (global px) over their bounding window: ``(labels, (y0, x0))``.

    A pixel belongs to a polygon when its centre does.
    """
    height, width = shape
    centres = [poly - 0.5 for poly in corners]  # pixel (i, j) has its centre at index (i, j)
    lo = np.min([p.min(axis=0) for p in centres], axis=0)
    hi = np.max([p.max(axis=0) for p in centres], axis=0)
    x0, y0 = min(max(int(np.floor(lo[0])), 0), width - 1), min(max(int(np.floor(lo[1])), 0), height - 1)
    x1, y1 = max(min(int(np.ceil(hi[0])) + 1, width), x0 + 1), max(min(int(np.ceil(hi[1])) + 1, height), y0 + 1)
    local = [poly - [x0, y0] for poly in centres]
    return _fill(local, parsed.names, (y1 - y0, x1 - x0), False, parsed.source), (y0, x0)


def _rasterise_indices(parsed: _Parsed):
    """Rasterise pixel-index contours on the file's grid: ``(labels, (fy0, fx0))`` in file pixels."""
    lo = np.floor(np.min([p.min(axis=0) for p in parsed.polygons], axis=0)).astype(int)
    hi = np.ceil(np.max([p.max(axis=0) for p in parsed.polygons], axis=0)).astype(int)
    local = [poly - lo for poly in parsed.polygons]
    window = (hi[1] - lo[1] + 1, hi[0] - lo[0] + 1)
    return _fill(local, parsed.names, window, True, parsed.source), (lo[1], lo[0])


def _upsample(window: np.ndarray, file_origin, scale: float, offset, shape: tuple[int, int]):
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


def _read_label_mask(path, shape: tuple[int, int], scale: float, offset):
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
    tol = _BORDER_TOLERANCE_PX
    if x0 < -tol or y0 < -tol or x1 > width + tol or y1 > height + tol:
        raise InvalidInputError(
            f"{source} of shape {mask.shape} scaled by {scale} at offset {offset} covers x {x0:g}–{x1:g}, "
            f"y {y0:g}–{y1:g} px and does not fit the {width}×{height} px image."
        )
    return _upsample(mask.astype(np.int32, copy=False), (0, 0), scale, offset, shape)


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


# ------------------------------------------------------------------------------------------ types


def _map_type(value, type_map: dict | None):
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return None
    if type_map:
        for key in (value, str(value)) + ((int(value),) if isinstance(value, str) and value.lstrip("-").isdigit() else ()):
            if key in type_map:
                mapped = type_map[key]
                return str(mapped[0] if isinstance(mapped, (list, tuple)) else mapped)
    return str(value)


def _store_types(sdata: SpatialData, table_key: str, types: list, type_map: dict | None) -> None:
    """Write ``obs["imported_type"]``, matching table rows to raster ids (1 + record position)."""
    names = [_map_type(t, type_map) for t in types]
    table = sdata.tables[table_key]
    raster_ids = _raster_ids(sdata, table_key)
    values = [names[i - 1] if 1 <= i <= len(names) else None for i in raster_ids]
    present = [n for n in names if n is not None]
    if type_map:
        order = [_map_type(k, type_map) for k in type_map]
        categories = list(dict.fromkeys([c for c in order if c in present] + sorted(set(present) - set(order))))
    else:
        categories = sorted(set(present), key=lambda c: (not c.lstrip("-").isdigit(), int(c) if c.lstrip("-").isdigit() else 0, c))
    table.obs["imported_type"] = pd.Categorical(values, categories=categories)


def _raster_ids(sdata: SpatialData, table_key: str) -> np.ndarray:
    """The raster id of every row of the nucleus table (store_nuclei names nuclei ``nucleus_<id>``)."""
    table = sdata.tables[table_key]
    names = table.obs[NUCLEUS_ID_KEY].astype(str) if NUCLEUS_ID_KEY in table.obs else table.obs_names.to_series()
    ids = pd.to_numeric(names.str.rsplit("_", n=1).str[-1], errors="coerce")
    if ids.isna().any():
        raise InvalidInputError(f"Table {table_key!r} has nucleus ids that are not 'nucleus_<id>'; cannot match imported types.")
    return ids.to_numpy(dtype=np.int64)
