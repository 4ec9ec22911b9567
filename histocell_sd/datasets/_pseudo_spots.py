"""Visium-like pseudo-spots over annotated cells: the weak labels of the real-data benchmarks."""

from __future__ import annotations

import numpy as np
import pandas as pd
from spatialdata import SpatialData

from .._constants import SPOTS_KEY, TABLE_KEY, VISIUM_PITCH_UM, VISIUM_SPOT_DIAMETER_UM
from .._errors import InvalidInputError
from .._utils import renamed
from ..io import get_image, get_mpp
from ..io._arrays import spots_element, spots_table
from ..io._spots import CIRCLE, SpotGeometry, spot_of_points
from ._synthetic import TRUTH_TABLE_KEY


def hex_grid(width_px: float, height_px: float, *, pitch_px: float, margin_px: float = 0.0) -> np.ndarray:
    """(x, y) centres of a hexagonal lattice of pitch ``pitch_px`` at least ``margin_px`` inside the image.

    Parameters
    ----------
    width_px, height_px
        Size of the image, pixels.
    pitch_px
        Distance between neighbouring centres, pixels.
    margin_px
        Least distance of a centre from the image border, pixels.

    Returns
    -------
    numpy.ndarray
        (n, 2) float64 centres, row by row (odd rows shifted by half a pitch).
    """
    dy = pitch_px * np.sqrt(3) / 2
    rows = np.arange(margin_px, height_px - margin_px + 1e-9, dy)
    xy = [(x, y) for r, y in enumerate(rows) for x in np.arange(margin_px + (r % 2) * pitch_px / 2, width_px - margin_px + 1e-9, pitch_px)]
    return np.asarray(xy, dtype=np.float64).reshape(-1, 2)


def pseudo_spots(
    sdata: SpatialData,
    *,
    spot_diameter_um: float = VISIUM_SPOT_DIAMETER_UM,
    pitch_um: float = VISIUM_PITCH_UM,
    cell_types=None,
    truth_table_key: str = TRUTH_TABLE_KEY,
    cell_type_key: str = "cell_type",
    min_cells: int = 1,
    overwrite: bool = False,
    diameter_um: float | None = None,
) -> None:
    """Add Visium-like spots whose proportions are the shares of the annotated cells inside them.

    Spots lie on a hexagonal lattice (``pitch_um``) wholly inside the image; a spot is kept when it
    holds at least ``min_cells`` annotated cells (centres within ``spot_diameter_um / 2``; a cell counts in the
    nearest such spot, which matters only when ``spot_diameter_um > pitch_um``).

    Parameters
    ----------
    sdata
        A sample with annotated cells in ``tables[truth_table_key]`` (``obs[cell_type_key]``, ``obsm["spatial"]`` px).
    spot_diameter_um, pitch_um
        Spot diameter and lattice pitch (Visium: 55 and 100 µm; legacy ST: 100 and 200 µm).
    cell_types
        Columns of the proportions, in order (default: the categories of ``obs[cell_type_key]``).
    truth_table_key
        Name of the table of annotated cells in ``sdata.tables`` (read).
    cell_type_key
        ``obs`` column of that table with the cell types (read).
    min_cells
        Fewest annotated cells a spot must hold.
    overwrite
        Replace existing ``"spots"`` / ``"table"`` elements (refused otherwise).
    diameter_um
        Deprecated name of ``spot_diameter_um`` (as in :func:`~histocell_sd.io.from_arrays`).

    Returns
    -------
    None
        Writes the elements described in the Notes into ``sdata``.

    Notes
    -----
    Writes the shapes ``"spots"`` and the spots table ``"table"`` with ``obsm["proportions"]`` and
    ``obs["n_cells"]``. When no spot qualifies an :class:`~histocell_sd.InvalidInputError` is raised
    and nothing is written.
    """
    spot_diameter_um = renamed("pseudo_spots", "diameter_um", diameter_um, "spot_diameter_um", spot_diameter_um, VISIUM_SPOT_DIAMETER_UM)
    mpp = get_mpp(sdata)
    if truth_table_key not in sdata.tables or cell_type_key not in sdata.tables[truth_table_key].obs:
        raise InvalidInputError(f"No annotated cells: tables[{truth_table_key!r}].obs[{cell_type_key!r}] is missing.")
    if not overwrite and (SPOTS_KEY in sdata.shapes or TABLE_KEY in sdata.tables):
        raise InvalidInputError(f"The sample already has {SPOTS_KEY!r} or {TABLE_KEY!r}; pass overwrite=True to replace them.")
    if not (np.isfinite(spot_diameter_um) and np.isfinite(pitch_um) and 0 < spot_diameter_um and 0 < pitch_um):
        raise InvalidInputError(f"spot_diameter_um and pitch_um must be positive, got {spot_diameter_um} and {pitch_um}.")
    truth = sdata.tables[truth_table_key]
    labels = truth.obs[cell_type_key]
    if cell_types is None:
        cell_types = list(labels.cat.categories) if isinstance(labels.dtype, pd.CategoricalDtype) else sorted(labels.dropna().unique())
    cell_types = [str(t) for t in cell_types]
    image = get_image(sdata)
    radius_px = spot_diameter_um / 2 / mpp
    centres = hex_grid(image.sizes["x"], image.sizes["y"], pitch_px=pitch_um / mpp, margin_px=radius_px)
    xy = np.asarray(truth.obsm["spatial"], dtype=np.float64)
    known = labels.notna().to_numpy() & labels.astype(str).isin(cell_types).to_numpy()
    onehot = (labels.astype(str).to_numpy()[known, None] == np.asarray(cell_types)[None, :]).astype(np.float64)
    spot = spot_of_points(SpotGeometry(CIRCLE, centres, np.full(len(centres), radius_px), pd.RangeIndex(len(centres))), xy[known])
    counts = np.zeros((len(centres), len(cell_types)))  # (spots, types)
    np.add.at(counts, spot[spot >= 0], onehot[spot >= 0])
    n_cells = counts.sum(1)
    keep = n_cells >= max(int(min_cells), 1)
    if not keep.any():
        raise InvalidInputError(f"No {spot_diameter_um} µm pseudo-spot holds {min_cells} annotated cell(s) in this sample.")
    sample = str(sdata.attrs.get("sample_id", "sample"))
    ids = pd.Index([f"{sample}_spot{i}" for i in np.flatnonzero(keep)])
    proportions = pd.DataFrame(counts[keep] / n_cells[keep, None], index=ids, columns=cell_types)
    table = spots_table(ids, proportions=proportions, centers=centres[keep], mpp=mpp)
    table.obs["n_cells"] = n_cells[keep].astype(int)
    sdata.shapes[SPOTS_KEY] = spots_element(centres[keep], radius_px, ids, mpp=mpp)
    sdata.tables[TABLE_KEY] = table
