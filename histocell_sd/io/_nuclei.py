"""Bring-your-own nuclei: import HoVer-Net JSON, QuPath / GeoJSON polygons or instance label masks.

Every format becomes an instance label raster in the image's ``global`` pixels, which
:func:`histocell_sd.pp.store_nuclei` turns into the ``nuclei`` shapes and the ``histocell``
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

import warnings
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd
from spatialdata import SpatialData

from .._constants import HISTOCELL_KEY, IMAGE_KEY, NUCLEI_KEY, NUCLEUS_ID_KEY
from .._docs import inject_docs
from .._errors import InvalidInputError
from .._utils import user_stacklevel
from ._elements import get_mpp, get_rgb_image, resolve_key
from ._nuclei_parse import check_inside, parse_geojson, parse_hovernet, ring_area
from ._nuclei_raster import rasterise_corners, rasterise_indices, read_label_mask, upsample
from ._nuclei_store import split_disconnected, write_nuclei

__all__ = ["read_nuclei"]

_FORMATS = ("hovernet", "geojson", "labels")
MAX_NUCLEUS_UM2 = 2000.0  # a polygon larger than this is a tissue or region annotation, not a nucleus (~50 µm across)


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
    type_map: Mapping | Sequence | None = None,
    spots_key: str | None = None,
    overwrite: bool = False,
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
        Renames per-nucleus classes, e.g. ``{1: "neoplastic", 2: "inflammatory"}``, or a list of names indexed by
        class id (``["background", "neoplastic", ...]``). HoVer-Net's ``type_info.json``
        (``{"1": ["neopla", [r, g, b]], ...}``) works as is.
    spots_key
        Name of the spot circles or squares (``sdata.shapes``; read) used for ``obs["spot_id"]``. None: ``"spots"``
        when present, else the circles or squares the spots table ``"table"`` annotates, else none.
    overwrite
        Replace elements under these names that an earlier segmentation or import did not write (refused
        otherwise; nuclei this package stored there before are always replaced).

    Returns
    -------
    None
        Writes ``sdata.shapes[key_added]`` and ``sdata.tables[nuclei_table_key]`` as
        :func:`~histocell_sd.pp.store_nuclei` does, and the imported classes in
        ``obs["imported_type"]`` of that table (and, from GeoJSON, their colours in
        ``uns["imported_type_colors"]`` and class probabilities in ``obsm["imported_proba"]``).

    Notes
    -----
    Polygons are rasterised in file order and a later polygon never overwrites pixels of an
    earlier one; a nucleus left with no pixel is dropped with a warning. Classes in the file
    (HoVer-Net ``"type"``, GeoJSON ``properties.classification.name``) are stored as the
    categorical ``sdata.tables[nuclei_table_key].obs["imported_type"]``, matched to the table rows by
    raster id (a dropped nucleus takes its class with it). Nuclei are named ``"nucleus_<k>"``, ``k`` the
    record's position from 1, except in a file written by :func:`~histocell_sd.io.write_geojson`: when
    every feature's ``id`` (or, after QuPath replaced the ids by UUIDs, its ``properties.name``) is a
    distinct ``"nucleus_<id>"``, those ids are kept. GeoJSON classification colours (``[r, g, b]``, when
    every class has one) become ``uns["imported_type_colors"]``, and ``prob_<class>`` measurements the
    DataFrame ``obsm["imported_proba"]`` (columns = classes, NaN where a nucleus has none). GeoJSON holes are filled and a
    MultiPolygon keeps its largest part; in a QuPath export mixing annotations with detections or
    cells, the annotations (e.g. tissue outlines) are skipped, and cells contribute their
    ``nucleusGeometry`` when present. Polygons over 2,000 µm² (tissue or region outlines) are skipped
    with a warning, and nuclei reaching past the image border are cut at it; a nucleus whose centre lies
    off the image means a wrong ``scale`` / ``offset`` and is refused. QuPath's derived classes
    (``"names": ["Tumor", "Positive"]``) are named ``"Tumor: Positive"``. A label mask is split into one
    nucleus per connected region as :func:`~histocell_sd.pp.store_nuclei` describes. Nuclei hardly darker in
    hematoxylin than the tissue around them (x and y swapped, a wrong scale or offset, another image's file) give a
    warning.
    """
    if format not in _FORMATS:
        raise InvalidInputError(f"format must be one of {_FORMATS}, got {format!r}.")
    scale, offset = _check_transform(scale, offset)
    type_map = _check_type_map(type_map)
    image_key = resolve_key(sdata, "images", key=image_key, default=IMAGE_KEY)
    level = get_rgb_image(sdata, image_key=image_key)
    shape = (int(level.sizes["y"]), int(level.sizes["x"]))

    labels, origin, parsed = _to_raster(path, format, shape, scale, offset, get_mpp(sdata))
    if parsed is not None:  # a polygon cut in two by earlier ones keeps its larger part: new ids would have no record
        labels = split_disconnected(labels, min_part_px=np.inf)

    write_nuclei(
        sdata, labels, origin=origin, image_key=image_key, spots_key=spots_key, key_added=key_added, nuclei_table_key=nuclei_table_key,
        labels_key=None, method=f"imported ({format})", overwrite=overwrite, connected=parsed is not None,
    )
    if parsed is not None:
        _store_imported(sdata, nuclei_table_key, parsed, type_map)


# ----------------------------------------------------------------------------------------- parsing


def _to_raster(path, format: str, shape: tuple[int, int], scale: float, offset, mpp: float):
    """Parse and rasterise: ``(labels, origin (y0, x0), parsed polygons or None for a mask)``."""
    if format == "labels":
        labels, origin = read_label_mask(path, shape, scale, offset)
        return labels, origin, None
    parsed = parse_hovernet(path) if format == "hovernet" else parse_geojson(path)
    if not parsed.polygons:
        raise InvalidInputError(f"{parsed.source} contains no nuclei.")
    shift = 0.0 if format == "geojson" else 0.5  # pixel indices -> pixel-corner coordinates
    corners = [(poly + shift) * scale + np.asarray(offset) for poly in parsed.polygons]
    parsed, corners = _without_regions(parsed, corners, mpp)
    check_inside(corners, parsed, shape)
    if format == "geojson":
        labels, origin = rasterise_corners(corners, parsed, shape)
    else:  # fill on the file's own pixel grid (outline included), then map to the image's
        window, file_origin = rasterise_indices(parsed)
        labels, origin = upsample(window, file_origin, scale, offset, shape)
    if not labels.any():
        raise InvalidInputError(f"No nucleus of {parsed.source} covers a pixel of the image; nothing was imported.")
    return labels, origin, parsed


def _without_regions(parsed, corners: list, mpp: float):
    """Skip polygons far larger than any nucleus (tissue or region annotations), with a warning; refuse a file of only those."""
    areas = np.array([ring_area(c) for c in corners]) * mpp**2
    keep = areas <= MAX_NUCLEUS_UM2
    if keep.all():
        return parsed, corners
    skipped = [f"{parsed.names[k]!r}" + (f" ({parsed.types[k]})" if parsed.types and parsed.types[k] is not None else "") for k in np.flatnonzero(~keep)]
    if not keep.any():
        raise InvalidInputError(
            f"{parsed.source} holds no nucleus: its {len(skipped)} polygons each cover over {MAX_NUCLEUS_UM2:g} µm² "
            f"(e.g. {skipped[int(np.argmax(areas))]}, {areas.max():.0f} µm²), as tissue or region annotations do; export the detections or cells "
            "(or check scale=)."
        )
    warnings.warn(
        f"{len(skipped)} polygons of {parsed.source} cover over {MAX_NUCLEUS_UM2:g} µm², far more than a nucleus (tissue or "
        f"region annotations?), and were skipped: {', '.join(skipped[:3])}.", stacklevel=user_stacklevel(),
    )
    return parsed.subset(keep), [c for c, k in zip(corners, keep) if k]


def _check_type_map(type_map):
    """``type_map`` as a dict (a list of names is indexed by class id); refused before anything is written."""
    if type_map is None:
        return None
    if isinstance(type_map, (Mapping, pd.Series)):
        return dict(type_map.items())
    if isinstance(type_map, (Sequence, np.ndarray)) and not isinstance(type_map, str):
        return dict(enumerate(type_map))
    raise InvalidInputError(
        f"type_map must map class ids to names ({{1: 'neoplastic', ...}}) or list names by class id, got {type(type_map).__name__}."
    )


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


def _store_imported(sdata: SpatialData, table_key: str, parsed, type_map: dict | None) -> None:
    """Write the file's classes, their colours and probabilities to the table rows, matched by raster id."""
    table = sdata.tables[table_key]
    rows = [parsed.position(i) for i in _raster_ids(sdata, table_key)]
    columns = list(dict.fromkeys(c for p in parsed.proba if p for c in p))
    if any(t is not None for t in parsed.types):
        _store_types(table, parsed, rows, type_map, columns)
    if columns:
        per_row = [(parsed.proba[k] if k is not None else None) or {} for k in rows]
        table.obsm["imported_proba"] = pd.DataFrame(
            [[p.get(c, np.nan) for c in columns] for p in per_row], index=table.obs_names, columns=columns, dtype=np.float64
        )


def _store_types(table, parsed, rows: list, type_map: dict | None, proba_columns: list) -> None:
    """Write ``obs["imported_type"]`` (and ``uns["imported_type_colors"]`` when every class has a colour).

    Categories follow ``type_map``, else the probability columns when they name every class (the model's
    order, as :func:`~histocell_sd.io.write_geojson` wrote them), else sorted.
    """
    names = [_map_type(t, type_map) for t in parsed.types]
    values = [names[k] if k is not None else None for k in rows]
    present = [v for v in values if v is not None]  # a dropped nucleus takes its class with it
    if type_map:
        order = [_map_type(k, type_map) for k in type_map]
        categories = list(dict.fromkeys([c for c in order if c in present] + sorted(set(present) - set(order))))
    elif set(present) <= set(proba_columns):
        categories = [c for c in proba_columns if c in set(present)]
    else:
        categories = sorted(set(present), key=lambda c: (not c.lstrip("-").isdigit(), int(c) if c.lstrip("-").isdigit() else 0, c))
    table.obs["imported_type"] = pd.Categorical(values, categories=categories)
    colors = {}
    for name, color in zip(names, parsed.colors or [None] * len(names)):
        if name is not None and color is not None:
            colors.setdefault(name, color)
    if categories and all(c in colors for c in categories):
        table.uns["imported_type_colors"] = ["#{:02x}{:02x}{:02x}".format(*colors[c]) for c in categories]


def _raster_ids(sdata: SpatialData, table_key: str) -> np.ndarray:
    """The raster id of every row of the nucleus table (store_nuclei names nuclei ``nucleus_<id>``)."""
    table = sdata.tables[table_key]
    names = table.obs[NUCLEUS_ID_KEY].astype(str) if NUCLEUS_ID_KEY in table.obs else table.obs_names.to_series()
    ids = pd.to_numeric(names.str.rsplit("_", n=1).str[-1], errors="coerce")
    if ids.isna().any():
        raise InvalidInputError(f"Table {table_key!r} has nucleus ids that are not 'nucleus_<id>'; cannot match imported types.")
    return ids.to_numpy(dtype=np.int64)
