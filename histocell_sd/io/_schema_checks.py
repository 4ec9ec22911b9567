"""The checks behind the table models of :mod:`histocell_sd.io._schema` (each raises a named InvalidInputError)."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
from matplotlib.colors import is_color_like
from spatialdata.models import get_table_keys

from .._constants import (
    CELL_STATE_KEY,
    CELL_STATE_PROBA_KEY,
    CELL_TYPE_KEY,
    CELL_TYPE_PROBA_KEY,
    COMPARTMENT_KEY,
    HISTOCELL_KEY,
    REFINED_TYPE_KEY,
    REGION_KEY,
    SPATIAL_KEY,
    SPOT_ID_KEY,
)
from .._errors import InvalidInputError
from ._proportions import SUM_TOLERANCE

# obs column -> (obsm probabilities, uns["histocell"] key with the full label list)
_PREDICTIONS = {
    CELL_TYPE_KEY: (CELL_TYPE_PROBA_KEY, "cell_types"),
    CELL_STATE_KEY: (CELL_STATE_PROBA_KEY, "states"),
    COMPARTMENT_KEY: (f"{COMPARTMENT_KEY}_proba", "compartments"),
    REFINED_TYPE_KEY: (f"{REFINED_TYPE_KEY}_proba", "cell_types"),
}


def annotation(table: ad.AnnData, name: str, instance_key: str) -> str:
    """The element ``table`` annotates, after checking it annotates one by ``instance_key``."""
    if not isinstance(table, ad.AnnData):
        raise InvalidInputError(f"{name} must be an AnnData, got {type(table).__name__}.")
    if "spatialdata_attrs" not in table.uns:
        raise InvalidInputError(f"{name} does not annotate any element (no uns['spatialdata_attrs']).")
    region, region_key, found = get_table_keys(table)
    if found != instance_key or region_key != REGION_KEY:
        raise InvalidInputError(f"{name} must annotate by obs[{REGION_KEY!r}] and obs[{instance_key!r}], not {region_key!r} and {found!r}.")
    for key in (region_key, instance_key):
        if key not in table.obs:
            raise InvalidInputError(f"{name} has no obs[{key!r}].")
    if table.obs_names.has_duplicates:
        raise InvalidInputError(f"{name} has duplicate row names, e.g. {table.obs_names[table.obs_names.duplicated()][:3].tolist()}.")
    return region if isinstance(region, str) else list(region)[0]


def check_xy(table: ad.AnnData, name: str, required: bool) -> None:
    if SPATIAL_KEY not in table.obsm:
        if required:
            raise InvalidInputError(f"{name} has no obsm[{SPATIAL_KEY!r}] (x, y in pixels).")
        return
    xy = np.asarray(table.obsm[SPATIAL_KEY])
    if xy.ndim != 2 or xy.shape[1] < 2 or not np.issubdtype(xy.dtype, np.number) or not np.isfinite(xy[:, :2]).all():
        raise InvalidInputError(f"{name}.obsm[{SPATIAL_KEY!r}] must hold finite (x, y) pixel coordinates, got shape {xy.shape}.")


def check_rows(frame, table: ad.AnnData, name: str, *, missing_rows: bool = False) -> None:
    """A DataFrame of probabilities/proportions: rows = table rows, finite, ≥ 0, rows summing to 1 (or all NaN)."""
    if not isinstance(frame, pd.DataFrame):
        raise InvalidInputError(f"{name} must be a DataFrame with labels as columns.")
    if not frame.index.equals(table.obs_names):
        raise InvalidInputError(f"{name} rows do not follow the table's rows.")
    values = numeric_values(frame, name)
    empty = np.isnan(values).all(axis=1) if missing_rows else np.zeros(len(values), dtype=bool)
    values = values[~empty]
    if not np.isfinite(values).all() or (values < 0).any():
        raise InvalidInputError(f"{name} holds NaN, infinite or negative values.")
    sums = values.sum(axis=1)
    if len(sums) and (np.abs(sums - 1) > SUM_TOLERANCE).any():
        raise InvalidInputError(f"{name} has rows that do not sum to 1 (e.g. {sums[np.abs(sums - 1) > SUM_TOLERANCE][0]:.3g}).")


def numeric_values(frame: pd.DataFrame, name: str) -> np.ndarray:
    """The values of ``frame`` as float64, refusing (and naming) non-numeric columns."""
    text = [str(c) for c in frame.columns if not (pd.api.types.is_numeric_dtype(frame[c]) and not pd.api.types.is_bool_dtype(frame[c]))]
    if text:
        raise InvalidInputError(f"{name} has non-numeric columns {text[:5]}; it must hold numbers only.")
    return frame.to_numpy(dtype=np.float64)


def check_nuclei_mpp(table: ad.AnnData, mpp: float, name: str) -> None:
    """Refuse a nuclei table measured at another µm per pixel than the sample declares now.

    Its centroids are pixels and its features µm of the image at ``uns["histocell"]["mpp"]``; a sample
    whose ``attrs["mpp"]`` was changed afterwards (a mis-declared resolution corrected, or introduced)
    would pair crops and features at different scales.
    """
    recorded = table.uns.get(HISTOCELL_KEY, {}).get("mpp")
    if recorded is not None and not np.isclose(float(recorded), float(mpp), rtol=1e-3):
        raise InvalidInputError(
            f"{name} was measured at {float(recorded):g} µm/px (uns[{HISTOCELL_KEY!r}]['mpp']) but the sample declares "
            f"sdata.attrs['mpp'] = {float(mpp):g}: if the image is at {float(mpp):g} µm/px, segment (or read) the nuclei again; "
            f"else set sdata.attrs['mpp'] back to {float(recorded):g}."
        )


def check_spot_ids(table: ad.AnnData, name: str) -> None:
    if SPOT_ID_KEY not in table.obs:
        return
    column = table.obs[SPOT_ID_KEY]
    if not isinstance(column.dtype, pd.CategoricalDtype):
        raise InvalidInputError(f"{name}.obs[{SPOT_ID_KEY!r}] must be categorical (a missing spot would not survive zarr/h5ad).")
    if "nan" in set(column.cat.categories.astype(str)):
        raise InvalidInputError(f"{name}.obs[{SPOT_ID_KEY!r}] has the spot 'nan': a missing value became a string.")


def check_categorical(table: ad.AnnData, name: str, key: str, labels: list[str] | None) -> None:
    column = table.obs[key]
    if not isinstance(column.dtype, pd.CategoricalDtype):
        raise InvalidInputError(f"{name}.obs[{key!r}] must be categorical.")
    categories = [str(c) for c in column.cat.categories]
    unused = sorted(set(categories) - set(column.dropna().astype(str)))
    if unused:
        raise InvalidInputError(f"{name}.obs[{key!r}] has categories that no row holds: {unused} (squidpy fails on them).")
    if labels is not None and set(categories) - {str(label) for label in labels}:
        raise InvalidInputError(f"{name}.obs[{key!r}] has labels {sorted(set(categories) - set(labels))} the model does not predict.")
    colors = table.uns.get(f"{key}_colors")
    if colors is None or len(colors) != len(categories) or not all(is_color_like(c) for c in colors):
        raise InvalidInputError(f"{name}.uns[{key + '_colors'!r}] must hold one colour per category of obs[{key!r}].")


def check_predictions(table: ad.AnnData, name: str) -> None:
    meta = table.uns.get(HISTOCELL_KEY, {})
    for key, (proba_key, labels_key) in _PREDICTIONS.items():
        if key in table.obs:
            check_categorical(table, name, key, meta.get(labels_key))
        if proba_key in table.obsm:
            proba = table.obsm[proba_key]
            check_rows(proba, table, f"{name}.obsm[{proba_key!r}]")
            if key in table.obs and set(table.obs[key].cat.categories) - set(map(str, proba.columns)):
                raise InvalidInputError(f"{name}.obs[{key!r}] has labels that are not columns of obsm[{proba_key!r}].")
