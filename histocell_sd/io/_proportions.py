"""Spot cell-type proportions: validation and import from deconvolution tools."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from os import PathLike

import numpy as np
import pandas as pd
from spatialdata import SpatialData

from .._constants import PROPORTIONS_KEY, TABLE_KEY
from .._errors import InvalidInputError
from ._elements import resolve_key

SUM_TOLERANCE = 1e-3


def check_proportions(
    proportions: pd.DataFrame,
    *,
    spot_ids: Sequence[str] | None = None,
    cell_types: Sequence[str] | None = None,
    name: str = "proportions",
) -> pd.DataFrame:
    """Validate spot proportions and return them as float64, rows in ``spot_ids`` order.

    Refuses non-DataFrames, duplicate spots or cell types, non-numeric, NaN, negative and all-zero
    rows, spots missing from ``spot_ids`` and columns outside ``cell_types``. Rows that do not sum
    to 1 are renormalised with a warning.
    """
    if not isinstance(proportions, pd.DataFrame):
        raise InvalidInputError(f"{name} must be a pandas DataFrame (rows = spots, columns = cell types).")
    if proportions.shape[1] == 0:
        raise InvalidInputError(f"{name} has no cell-type columns.")
    if proportions.index.has_duplicates:
        dup = proportions.index[proportions.index.duplicated()].unique()[:5].tolist()
        raise InvalidInputError(f"{name} has duplicate spot barcodes, e.g. {dup}.")
    if proportions.columns.has_duplicates:
        raise InvalidInputError(f"{name} has duplicate cell-type columns.")
    non_numeric = [c for c in proportions.columns if not pd.api.types.is_numeric_dtype(proportions[c])]
    if non_numeric:
        raise InvalidInputError(f"{name} has non-numeric columns {non_numeric[:5]}.")
    if cell_types is not None:
        unknown = [c for c in proportions.columns if c not in set(cell_types)]
        if unknown:
            raise InvalidInputError(f"{name} has unknown cell types {unknown}; expected {list(cell_types)}.")
    values = proportions.to_numpy(dtype=np.float64)
    bad = ~np.isfinite(values).all(axis=1)
    if bad.any():
        raise InvalidInputError(f"{name} has NaN or infinite values in {bad.sum()} spots, e.g. {proportions.index[bad][:3].tolist()}.")
    if (values < 0).any():
        rows = proportions.index[(values < 0).any(axis=1)][:3].tolist()
        raise InvalidInputError(f"{name} has negative values, e.g. in spots {rows}.")
    sums = values.sum(axis=1)
    if (sums <= 0).any():
        raise InvalidInputError(f"{name} has spots whose proportions are all zero, e.g. {proportions.index[sums <= 0][:3].tolist()}.")
    off = np.abs(sums - 1) > SUM_TOLERANCE
    if off.any():
        warnings.warn(f"{name}: {off.sum()} spots do not sum to 1 (e.g. {sums[off][0]:.3g}); renormalised.", stacklevel=3)
    out = pd.DataFrame(values / sums[:, None], index=proportions.index.astype(str), columns=proportions.columns.astype(str))
    if spot_ids is not None:
        out = align_to_spots(out, spot_ids, name=name)
    return out


def align_to_spots(frame: pd.DataFrame, spot_ids: Sequence[str], *, name: str) -> pd.DataFrame:
    """Reorder ``frame`` to ``spot_ids``, refusing rows for unknown spots or spots without a row."""
    spot_ids = pd.Index(spot_ids).astype(str)
    index = frame.index.astype(str)
    unknown = index.difference(spot_ids)
    if len(unknown):
        raise InvalidInputError(f"{name} has {len(unknown)} rows for unknown spots, e.g. {unknown[:3].tolist()}.")
    missing = spot_ids.difference(index)
    if len(missing):
        raise InvalidInputError(f"{name} has no row for {len(missing)} spots, e.g. {missing[:3].tolist()}.")
    frame = frame.copy()
    frame.index = index
    return frame.loc[spot_ids]


def _barcode_from_upstream(label: str) -> str:
    """Upstream HistoCell TSVs index spots as ``x_y_barcode``; keep the barcode."""
    parts = str(label).split("_")
    if len(parts) >= 3 and _is_number(parts[0]) and _is_number(parts[1]):
        return "_".join(parts[2:])
    return str(label)


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def read_proportions(
    path_or_frame: str | PathLike | pd.DataFrame,
    sdata: SpatialData | None = None,
    *,
    table_key: str | None = None,
    key_added: str = PROPORTIONS_KEY,
    index_col: int | str = 0,
    sep: str | None = None,
    drop_columns: Sequence[str] = (),
) -> pd.DataFrame:
    """Read spot cell-type proportions exported by a deconvolution tool.

    Works for CSV/TSV tables from cell2location (abundances are renormalised), RCTD, CARD and the
    upstream HistoCell TSV whose index is ``x_y_barcode``. Rows are validated with
    :func:`check_proportions` and, when ``sdata`` is given, matched to its spots by barcode and stored
    in ``sdata.tables[table_key].obsm[key_added]``.

    Parameters
    ----------
    path_or_frame
        A delimited file (separator sniffed unless ``sep``) or a DataFrame; rows = spots.
    sdata
        SpatialData whose spots table receives the proportions.
    table_key
        The spots table; default ``"table"`` or the only table.
    key_added
        ``obsm`` key of the stored proportions.
    index_col, sep
        Passed to :func:`pandas.read_csv`.
    drop_columns
        Non-proportion columns to ignore (coordinates, totals...).

    Returns
    -------
    The validated proportions (rows in the spots' order when ``sdata`` is given).
    """
    if isinstance(path_or_frame, pd.DataFrame):
        frame = path_or_frame.copy()
    else:
        frame = pd.read_csv(path_or_frame, index_col=index_col, sep=sep, engine="python" if sep is None else "c")
    frame = frame.drop(columns=[c for c in drop_columns if c in frame.columns])
    frame.index = [_barcode_from_upstream(i) for i in frame.index]
    if sdata is None:
        return check_proportions(frame)
    table_key = resolve_key(sdata, "tables", table_key, TABLE_KEY)
    table = sdata.tables[table_key]
    frame = check_proportions(frame, spot_ids=table.obs_names)
    table.obsm[key_added] = frame
    return frame
