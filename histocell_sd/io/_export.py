"""Export nuclei and their predictions: QuPath-compatible GeoJSON and a flat CSV table.

Coordinates are the ``global`` system, i.e. the full-resolution pixels of the H&E: pixel
``(col, row)`` covers ``[col, col + 1) × [row, row + 1)``, so polygon vertices lie on pixel
corners, as QuPath and :func:`~histocell_sd.io.read_nuclei` expect.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import shapely
from shapely.geometry import mapping
from spatialdata import SpatialData
from spatialdata.models import get_table_keys
from spatialdata.transformations import get_transformation

from .._constants import (
    CELL_TYPE_KEY,
    CELL_TYPE_PROBA_KEY,
    COORDINATE_SYSTEM,
    HISTOCELL_KEY,
    PALETTE,
    REGION_KEY,
    SPATIAL_KEY,
)
from .._docs import inject_docs
from .._errors import InvalidInputError
from .._utils import atomic_write
from ._elements import annotated_shapes, get_mpp
from ._nuclei_parse import PROBA_PREFIX
from ._outlines import pixel_outlines

__all__ = ["write_csv", "write_geojson"]

_CIRCLE_SEGMENTS = 16  # per quarter circle, for nuclei stored as circles (Point + radius)


@inject_docs
def write_geojson(
    sdata: SpatialData,
    path,
    *,
    nuclei_key: str | None = None,
    nuclei_table_key: str = HISTOCELL_KEY,
    cluster_key: str | None = CELL_TYPE_KEY,
    proba_key: str | None = CELL_TYPE_PROBA_KEY,
    labels_key: str | None = None,
    features: bool = True,
    overwrite: bool = False,
) -> Path:
    """Write the nuclei and their predicted types as a QuPath-compatible GeoJSON FeatureCollection.

    Parameters
    ----------
    sdata
        The sample, with nuclei and (usually) the predictions of :func:`~histocell_sd.tl.predict`.
    path
        The ``.geojson`` file to create.
    {nuclei_key}
        None: the shapes element the nuclei table annotates.
    {nuclei_table_key}
    {cluster_key}
        It becomes each nucleus' QuPath classification; None writes none.
    proba_key
        ``obsm`` key of the class probabilities (DataFrame, columns = classes), written as the
        measurements ``prob_<class>``; None writes none.
    labels_key
        Name of a Labels2D element in ``sdata.labels`` holding the nuclei's instance raster (value
        ``<id>`` = nucleus ``"nucleus_<id>"``): its exact pixel outlines are written instead of the
        simplified polygons ``nuclei_key``, so that :func:`~histocell_sd.io.read_nuclei` gives back the
        very same pixels. None: the raster recorded by segmentation in the table's
        ``uns["histocell"]["labels_key"]`` when it is in ``sdata.labels``, else the polygons.
    features
        Add the morphology features of the table's ``X`` (``var_names``) to the measurements.
    overwrite
        Replace an existing file (refused otherwise).

    Returns
    -------
    pathlib.Path
        The file written (atomically: a failure leaves no partial file).

    Notes
    -----
    One Feature per row of the nuclei table, in table order: ``"id"`` and ``properties.name`` =
    the nucleus id (QuPath replaces a non-UUID ``id`` by its own and shows the name),
    ``properties.objectType = "detection"``, ``properties.classification = {"name": type,
    "color": [r, g, b]}`` with the colours of ``uns[f"{cluster_key}_colors"]`` (the package palette
    when absent) and ``properties.measurements`` (``prob_<class>`` and the features; NaN values left
    out). A nucleus without a prediction (missing ``cluster_key``) has no classification. Geometry:
    a closed ``Polygon`` ring (a ``MultiPolygon`` if the shapes hold one; circles become 64-gons) in
    ``global`` pixels.
    """
    table, names, ids = _nuclei_table(sdata, nuclei_table_key)
    nuclei_key = annotated_shapes(sdata, nuclei_table_key, nuclei_key)
    geoms = _geometries(sdata, table, names, ids, nuclei_key, nuclei_table_key, labels_key)
    classes, colors = _classes(table, nuclei_table_key, cluster_key)
    proba = _proba(table, nuclei_table_key, proba_key)
    measurements = {}
    if proba is not None:
        measurements |= {f"{PROBA_PREFIX}{c}": proba[c].to_numpy(np.float64) for c in proba.columns}
    if features:
        measurements |= {str(v): np.asarray(table[:, v].X, dtype=np.float64).ravel() for v in table.var_names}
    columns = [(k, v.tolist()) for k, v in measurements.items()]

    features_out = []
    for i, (name, geom) in enumerate(zip(names, geoms)):
        props: dict = {"objectType": "detection", "name": name}
        if classes is not None and classes[i] is not None:
            props["classification"] = {"name": classes[i], "color": colors[classes[i]]}
        meas = {k: v[i] for k, v in columns if np.isfinite(v[i])}
        if meas:
            props["measurements"] = meas
        features_out.append({"type": "Feature", "id": name, "geometry": mapping(geom), "properties": props})
    collection = {"type": "FeatureCollection", "features": features_out}

    def write(tmp: Path) -> None:
        with open(tmp, "w", encoding="utf-8") as fh:
            json.dump(collection, fh, allow_nan=False, ensure_ascii=False)

    return atomic_write(path, write, overwrite=overwrite)


@inject_docs
def write_csv(
    sdata: SpatialData,
    path,
    *,
    nuclei_table_key: str = HISTOCELL_KEY,
    proba_key: str | None = CELL_TYPE_PROBA_KEY,
    features: bool = True,
    overwrite: bool = False,
) -> Path:
    """Write the nuclei table as a flat CSV: one row per nucleus, for spreadsheets, R or QuPath-free analysis.

    Parameters
    ----------
    sdata
        The sample; ``mpp`` from the table's ``uns["histocell"]["mpp"]``, else ``sdata.attrs["mpp"]``.
    path
        The ``.csv`` file to create.
    {nuclei_table_key}
    proba_key
        ``obsm`` key of the cell-type probabilities (DataFrame), written as the columns
        ``prob_<type>``; None or absent writes none. The other ``obsm`` DataFrames named ``<name>_proba``
        (states, compartments) become ``<name>_prob_<label>`` (``cell_type_proba`` is never written
        twice).
    features
        Add the morphology features of the table's ``X`` (one column per ``var_names``).
    overwrite
        Replace an existing file (refused otherwise).

    Returns
    -------
    pathlib.Path
        The file written (atomically: a failure leaves no partial file).

    Notes
    -----
    Columns: ``nucleus_id``, the centroid ``x_px``, ``y_px`` (``global`` pixels) and ``x_um``,
    ``y_um``, then every ``obs`` column but ``region`` (``spot_id``, ``cell_type``,
    ``cell_type_entropy``, ``cell_state``, ``compartment``, ...; empty where missing), the
    probabilities and the features.
    """
    table, names, _ = _nuclei_table(sdata, nuclei_table_key)
    if SPATIAL_KEY not in table.obsm:
        raise InvalidInputError(f"The nuclei table {nuclei_table_key!r} has no obsm[{SPATIAL_KEY!r}] (centroids in px).")
    mpp = table.uns["histocell"].get("mpp") or get_mpp(sdata)
    if isinstance(mpp, bool) or not isinstance(mpp, (int, float, np.number)) or not (np.isfinite(mpp) and mpp > 0):
        raise InvalidInputError(f"The nuclei table {nuclei_table_key!r} records mpp {mpp!r} in uns['histocell']; it must be a positive µm/px.")
    mpp = float(mpp)
    xy = np.asarray(table.obsm[SPATIAL_KEY], dtype=np.float64)
    instance_key = get_table_keys(table)[2]
    out = pd.DataFrame({"nucleus_id": names, "x_px": xy[:, 0], "y_px": xy[:, 1], "x_um": xy[:, 0] * mpp, "y_um": xy[:, 1] * mpp})
    for col in table.obs.columns:
        if col not in (REGION_KEY, instance_key, *out.columns):
            out[col] = table.obs[col].to_numpy()
    if proba_key is not None and proba_key in table.obsm:
        proba = _proba(table, nuclei_table_key, proba_key)
        for c in proba.columns:
            out[f"{PROBA_PREFIX}{c}"] = proba[c].to_numpy()
    skip = {proba_key} if proba_key is not None else {CELL_TYPE_PROBA_KEY}
    for key in table.obsm:
        value = table.obsm[key]
        if key not in skip and key.endswith("_proba") and isinstance(value, pd.DataFrame):
            for c in value.columns:
                out[f"{key[: -len('_proba')]}_prob_{c}"] = value[c].to_numpy()
    if features:
        X = np.asarray(table.X.toarray() if hasattr(table.X, "toarray") else table.X)
        for j, v in enumerate(table.var_names):
            if str(v) not in out.columns:
                out[str(v)] = X[:, j]
    return atomic_write(path, lambda tmp: out.to_csv(tmp, index=False), overwrite=overwrite)


# ------------------------------------------------------------------------------------- checks


def _nuclei_table(sdata: SpatialData, table_key: str):
    """``(table, nucleus names, raster ids or None)`` of a nuclei table."""
    if not isinstance(sdata, SpatialData):
        raise InvalidInputError(f"Expected a SpatialData sample, got {type(sdata).__name__}.")
    if table_key not in sdata.tables:
        raise InvalidInputError(
            f"The SpatialData has no nuclei table {table_key!r} (tables: {sorted(sdata.tables)}); segment or store "
            "nuclei first (pp.segment_nuclei, pp.store_nuclei or io.read_nuclei)."
        )
    table = sdata.tables[table_key]
    if not isinstance(table.uns.get("histocell"), dict):
        raise InvalidInputError(f"Table {table_key!r} is not a nuclei table (no uns['histocell']; the spots table?).")
    if "spatialdata_attrs" not in table.uns:
        raise InvalidInputError(f"The nuclei table {table_key!r} annotates no element (no uns['spatialdata_attrs']).")
    instance_key = get_table_keys(table)[2]
    if instance_key not in table.obs:
        raise InvalidInputError(f"The nuclei table {table_key!r} has no obs[{instance_key!r}] (the nucleus ids).")
    names = table.obs[instance_key].astype(str).tolist()
    ids = pd.to_numeric(pd.Series(names).str.extract(r"^nucleus_(\d+)$")[0], errors="coerce")
    return table, names, (None if ids.isna().any() else ids.to_numpy(np.int64))


def _geometries(sdata, table, names, ids, nuclei_key, table_key, labels_key) -> list:
    """One polygon per table row in ``global`` px: exact raster outlines, or the stored shapes."""
    if labels_key is None:
        recorded = table.uns.get("histocell", {}).get("labels_key")
        labels_key = recorded if isinstance(recorded, str) and recorded in sdata.labels else None
    elif labels_key not in sdata.labels:
        raise InvalidInputError(f"The SpatialData has no labels {labels_key!r} (labels: {sorted(sdata.labels)}).")
    if labels_key is not None:
        if ids is None:
            raise InvalidInputError(f"The nuclei of {table_key!r} are not named 'nucleus_<id>'; their raster ids are unknown.")
        element = sdata.labels[labels_key]
        geoms = pixel_outlines(element, ids, names, labels_key)
        return _to_global(geoms, element, f"labels {labels_key!r}")
    shapes = sdata.shapes[nuclei_key]
    missing = pd.Index(names).difference(shapes.index.astype(str))
    if len(missing):
        raise InvalidInputError(f"{len(missing)} nuclei of the table {table_key!r} have no polygon in {nuclei_key!r}, e.g. {list(missing[:3])}.")
    geoms = shapes.geometry.set_axis(shapes.index.astype(str)).loc[names].to_numpy()
    kinds = set(shapely.get_type_id(geoms).tolist())
    if kinds == {0}:  # circles: Point + radius
        if "radius" not in shapes.columns:
            raise InvalidInputError(f"The shapes {nuclei_key!r} are points without a 'radius'; nuclei need an outline.")
        radius = shapes["radius"].set_axis(shapes.index.astype(str)).loc[names].to_numpy(np.float64)
        geoms = shapely.buffer(geoms, radius, quad_segs=_CIRCLE_SEGMENTS)
    elif not kinds <= {3, 6}:
        raise InvalidInputError(f"The shapes {nuclei_key!r} must be polygons or circles to export as nucleus outlines.")
    return _to_global(list(geoms), shapes, f"shapes {nuclei_key!r}")


def _to_global(geoms: list, element, what: str) -> list:
    """Apply the element's transformation to ``global`` (an identity costs nothing)."""
    try:
        matrix = get_transformation(element, to_coordinate_system=COORDINATE_SYSTEM).to_affine_matrix(("x", "y"), ("x", "y"))
    except (KeyError, ValueError):
        raise InvalidInputError(f"The {what} have no transformation to the {COORDINATE_SYSTEM!r} coordinate system.") from None
    matrix = np.asarray(matrix, dtype=np.float64)
    if np.array_equal(matrix, np.eye(3)):
        return geoms
    return list(shapely.transform(np.asarray(geoms, dtype=object), lambda xy: xy @ matrix[:2, :2].T + matrix[:2, 2]))


def _classes(table, table_key: str, cluster_key: str | None):
    """``(class name or None per row, {class: [r, g, b]})``; ``(None, None)`` without ``cluster_key``."""
    if cluster_key is None:
        return None, None
    if cluster_key not in table.obs:
        raise InvalidInputError(
            f"The nuclei table {table_key!r} has no obs[{cluster_key!r}]; run tl.predict first, name another column "
            "(cluster_key=) or pass cluster_key=None to export the outlines only."
        )
    values = table.obs[cluster_key]
    categories = [str(c) for c in values.cat.categories] if isinstance(values.dtype, pd.CategoricalDtype) else sorted(values.dropna().astype(str).unique())
    stored = table.uns.get(f"{cluster_key}_colors")
    palette = list(stored) if stored is not None and len(stored) == len(categories) else [PALETTE[i % len(PALETTE)] for i in range(len(categories))]
    colors = {c: _rgb(h, cluster_key) for c, h in zip(categories, palette)}
    classes = [None if pd.isna(v) else str(v) for v in values.tolist()]
    return classes, colors


def _rgb(color, key: str) -> list[int]:
    """``[r, g, b]`` ints of a colour (hex like ``"#ffe119"`` or any matplotlib colour)."""
    from matplotlib.colors import to_rgb

    try:
        return [int(round(255 * c)) for c in to_rgb(color)]
    except ValueError:
        raise InvalidInputError(f"uns[{key + '_colors'!r}] holds {color!r}, which is not a colour.") from None


def _proba(table, table_key: str, proba_key: str | None) -> pd.DataFrame | None:
    """The class probabilities as a DataFrame (columns = classes), or None."""
    if proba_key is None:
        return None
    if proba_key not in table.obsm:
        raise InvalidInputError(
            f"The nuclei table {table_key!r} has no obsm[{proba_key!r}]; pass proba_key=None to export without probabilities."
        )
    value = table.obsm[proba_key]
    if isinstance(value, pd.DataFrame):
        return value
    labels = table.uns.get("histocell", {}).get("cell_types")
    value = np.asarray(value)
    if labels is None or value.ndim != 2 or value.shape[1] != len(labels):
        raise InvalidInputError(f"obsm[{proba_key!r}] of {table_key!r} must be a DataFrame whose columns name the classes.")
    return pd.DataFrame(value, columns=[str(c) for c in labels], index=table.obs_names)
