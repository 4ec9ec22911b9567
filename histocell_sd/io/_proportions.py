"""Spot cell-type proportions: validation and import from deconvolution tools."""

from __future__ import annotations

import csv
import re
import warnings
from collections.abc import Sequence
from os import PathLike

import numpy as np
import pandas as pd
from spatialdata import SpatialData

from .._constants import PROPORTIONS_KEY, SPOTS_OBSM_LAYOUT, TABLE_KEY
from .._docs import inject_docs
from .._errors import InvalidInputError
from .._utils import check_key_added
from ._elements import resolve_key

SUM_TOLERANCE = 1e-3
NEGATIVE_TOLERANCE = 1e-9  # proportions this close below 0 are read as 0


def check_proportions(
    proportions: pd.DataFrame,
    *,
    spot_ids: Sequence[str] | None = None,
    cell_types: Sequence[str] | None = None,
    name: str = "proportions",
) -> pd.DataFrame:
    """Validate spot proportions and return them as float64, rows in ``spot_ids`` order.

    Refuses non-DataFrames, duplicate spots or cell types, non-numeric, NaN, negative (below -1e-9;
    smaller negatives are read as 0) and all-zero rows, spots missing from ``spot_ids`` and columns outside
    ``cell_types``. Rows that do not sum
    to 1 are renormalised with a warning.

    Parameters
    ----------
    proportions
        Rows = spots (barcodes in the index), columns = cell types.
    spot_ids
        The spots the rows must match exactly (in any order); None skips the check.
    cell_types
        Allowed columns; None allows any.
    name
        What the proportions are called in error messages.

    Returns
    -------
    pandas.DataFrame
        The proportions as float64, rows summing to 1, in ``spot_ids`` order when given.
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
    values = proportions.to_numpy(dtype=np.float64, copy=True)  # never written back into the caller's frame
    bad = ~np.isfinite(values).all(axis=1)
    if bad.any():
        raise InvalidInputError(f"{name} has NaN or infinite values in {bad.sum()} spots, e.g. {proportions.index[bad][:3].tolist()}.")
    values[(values < 0) & (values > -NEGATIVE_TOLERANCE)] = 0.0  # float noise of the tool that wrote them
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
        hint = ""
        stripped = {str(s).rsplit("-", 1)[0]: str(s) for s in spot_ids if "-" in str(s)}
        if stripped and all(str(u) in stripped for u in unknown[:20]):
            hint = f" The spots' barcodes carry a suffix (e.g. {stripped[str(unknown[0])]!r}); add it to the file's barcodes."
        raise InvalidInputError(f"{name} has {len(unknown)} rows for unknown spots, e.g. {unknown[:3].tolist()}.{hint}")
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


# Column names (lower case) of spot coordinates that deconvolution tools export next to the proportions.
_COORDINATE_COLUMNS = frozenset({
    "x", "y", "imagerow", "imagecol", "array_row", "array_col", "pxl_row_in_fullres", "pxl_col_in_fullres",
    "pxl_row", "pxl_col", "row", "col", "in_tissue", "x_coord", "y_coord", "coord_x", "coord_y", "spot_x", "spot_y",
})


# Column names (lower case) of per-spot totals that deconvolution tools export next to the proportions (RCTD's
# results_df nUMI, Seurat's nCount_Spatial, scanpy's total_counts ...).
_TOTAL_COLUMNS = frozenset({
    "numi", "n_umi", "umi", "total", "sum", "total_counts", "n_counts", "ncount_spatial", "nfeature_spatial",
    "n_genes_by_counts", "n_genes", "spot_total", "total_abundance",
})

# cell2location exports its posteriors as <statistic>cell_abundance_w_sf_<cell type> (means, stds, q05, q50, q95 ...).
_C2L_PREFIX = re.compile(r"^(means|stds|q\d+)cell_abundance_w_sf_")


def _cell2location_names(frame: pd.DataFrame, source: str) -> pd.DataFrame:
    """Cell types named without cell2location's posterior prefix; a table mixing posteriors is refused."""
    used = {m[0] for c in frame.columns if (m := _C2L_PREFIX.match(str(c)))}
    if not used:
        return frame
    if len(used) > 1:
        raise InvalidInputError(
            f"{source} holds several cell2location posteriors ({', '.join(sorted(p + '<type>' for p in used))}), so each cell "
            "type would count more than once: keep the columns of one (e.g. q05cell_abundance_w_sf_<type>) and drop the others."
        )
    prefix = used.pop()
    other = [str(c) for c in frame.columns if not str(c).startswith(prefix)]
    if other:
        raise InvalidInputError(f"{source} mixes cell2location columns ({prefix}<cell type>) with others {other[:5]}; pass drop_columns= for those.")
    return frame.rename(columns=lambda c: str(c)[len(prefix):])


def _read_table(path, index_col, sep) -> pd.DataFrame:
    """A delimited file as a DataFrame; the separator (``sep=None``) is one of tab, comma, semicolon, pipe."""
    source = f"proportions file {str(path)!r}"
    try:
        with open(path, encoding="utf-8-sig", newline="") as fh:
            sample = fh.read(65536)
    except FileNotFoundError:
        raise InvalidInputError(f"{source} does not exist.") from None
    except (OSError, UnicodeDecodeError) as error:
        raise InvalidInputError(f"{source} could not be read as text: {error}") from None
    if not sample.strip():
        raise InvalidInputError(f"{source} is empty.")
    if sep is None:
        try:
            sep = csv.Sniffer().sniff(sample.splitlines()[0] + "\n", delimiters="\t,;|").delimiter
        except csv.Error:
            sep = ","  # one column: the index alone
    try:
        return pd.read_csv(path, index_col=index_col, sep=sep, encoding="utf-8-sig")
    except (ValueError, IndexError, pd.errors.ParserError, pd.errors.EmptyDataError) as error:
        raise InvalidInputError(f"{source} is not a table of spots × cell types: {error}") from None


def _check_columns(frame: pd.DataFrame, source: str) -> None:
    """Refuse tables without cell-type columns, with coordinate columns, or with spots lacking every value."""
    if frame.shape[1] == 0:
        raise InvalidInputError(f"{source} has no cell-type columns (only the spot index); expected rows = spots, columns = cell types.")
    coords = [str(c) for c in frame.columns if str(c).strip().lower() in _COORDINATE_COLUMNS]
    if coords:
        raise InvalidInputError(
            f"{source} has columns {coords} that look like spot coordinates, not cell types; pass "
            f"drop_columns={coords} to ignore them."
        )
    text = [str(c) for c in frame.columns if not pd.api.types.is_numeric_dtype(frame[c]) and not pd.api.types.is_bool_dtype(frame[c])]
    if text:
        raise InvalidInputError(
            f"{source} has non-numeric columns {text[:5]}: a column of barcodes other than the first needs index_col=, "
            "and numbers written with decimal commas ('0,25') need converting first."
        )
    totals = [str(c) for c in frame.columns if str(c).strip().lower() in _TOTAL_COLUMNS or pd.api.types.is_bool_dtype(frame[c])]
    if totals:
        raise InvalidInputError(
            f"{source} has columns {totals} that look like spot totals or flags (UMI counts, sums, booleans), not cell "
            f"types; pass drop_columns={totals} to ignore them."
        )
    empty = frame.isna().all(axis=1).to_numpy()
    if empty.any():
        raise InvalidInputError(
            f"{source} has no values for {int(empty.sum())} spots (a barcode with empty cells), e.g. "
            f"{frame.index[empty][:3].tolist()}: these spots are missing from the table."
        )


@inject_docs
def read_proportions(
    path_or_frame: str | PathLike | pd.DataFrame,
    sdata: SpatialData | None = None,
    *,
    spots_table_key: str | None = None,
    key_added: str = PROPORTIONS_KEY,
    index_col: int | str = 0,
    sep: str | None = None,
    drop_columns: Sequence[str] = (),
) -> pd.DataFrame:
    """Read spot cell-type proportions exported by a deconvolution tool.

    Works for CSV/TSV tables from cell2location (abundances are renormalised; one posterior, e.g. the
    ``q05cell_abundance_w_sf_<type>`` columns, named by cell type), RCTD, CARD and the upstream HistoCell TSV
    whose index is ``x_y_barcode``. Rows are validated with
    :func:`check_proportions` and, when ``sdata`` is given, matched to its spots by barcode and stored
    in ``sdata.tables[spots_table_key].obsm[key_added]``.

    Parameters
    ----------
    path_or_frame
        A delimited file (separator sniffed unless ``sep``) or a DataFrame; rows = spots.
    sdata
        SpatialData whose spots table receives the proportions; None only reads and validates.
    {spots_table_key}
    {key_added}
        the ``obsm`` key of the proportions in the spots table (with ``sdata``).
    index_col, sep
        Passed to :func:`pandas.read_csv`; ``sep=None`` picks tab, comma, semicolon or pipe from the header.
    drop_columns
        Non-proportion columns to ignore (coordinates, totals...). Columns named like spot coordinates
        (``x``, ``y``, ``imagerow``, ``array_col``, ``pxl_row_in_fullres``...) or totals (``nUMI``,
        ``total_counts``...), and boolean columns, are refused unless dropped.

    Returns
    -------
    pandas.DataFrame
        The validated proportions (rows in the spots' order when ``sdata`` is given); with ``sdata``
        they are also written to ``sdata.tables[spots_table_key].obsm[key_added]``.
    """
    check_key_added(key_added, SPOTS_OBSM_LAYOUT, "obsm")
    if isinstance(path_or_frame, pd.DataFrame):
        frame, source = path_or_frame.copy(), "proportions"
    else:
        frame, source = _read_table(path_or_frame, index_col, sep), f"proportions file {str(path_or_frame)!r}"
    frame = frame.drop(columns=[c for c in drop_columns if c in frame.columns])
    frame = _cell2location_names(frame, source)
    _check_columns(frame, source)
    frame.index = [_barcode_from_upstream(i) for i in frame.index]
    if sdata is None:
        return check_proportions(frame)
    spots_table_key = resolve_key(sdata, "tables", key=spots_table_key, default=TABLE_KEY)
    table = sdata.tables[spots_table_key]
    frame = check_proportions(frame, spot_ids=table.obs_names)
    table.obsm[key_added] = frame
    record = table.uns.get("deconvolution")
    if isinstance(record, dict):  # no longer tl.deconvolve's: replacing these proportions again warns
        written = record.get("proportions_keys", [record.get("key_added")])
        record["proportions_keys"] = [k for k in written if k is not None and k != key_added]
    return frame
