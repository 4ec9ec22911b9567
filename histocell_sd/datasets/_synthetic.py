"""The embedded synthetic Visium + H&E slide, with ground truth for scoring."""

from __future__ import annotations

import warnings

import anndata as ad
import numpy as np
import pandas as pd
from scipy.spatial import cKDTree
from spatialdata import SpatialData
from spatialdata.models import Labels2DModel, TableModel

from .._constants import (
    REGION_KEY,
    STATE_PROPORTIONS_KEY,
    TABLE_KEY,
    VISIUM_PITCH_UM,
    VISIUM_SPOT_DIAMETER_UM,
)
from .._errors import InvalidInputError
from .._utils import progress_bar
from ..io import from_arrays
from ..io._elements import pixel_transformations
from ._synthetic_cells import CELL_STATES, CELL_TYPES, COMPARTMENTS, make_layout, sample_cells
from ._synthetic_expression import expression_profiles, reference, spot_counts
from ._synthetic_render import BlockRenderer, random_stain

PRESETS = {
    "tiny": {"width_um": 800.0, "height_um": 700.0, "mpp": 0.5},
    "default": {"width_um": 2000.0, "height_um": 1800.0, "mpp": 0.5},
    "visium": {"width_um": 6500.0, "height_um": 6500.0, "mpp": 0.5},
}
"""Slide size (µm) and resolution (µm per pixel) of each ``preset`` of :func:`synthetic_visium`."""
TRUTH_LABELS_KEY = "truth_labels"
"""Name of the ground-truth instance raster in ``sdata.labels`` (for scoring only)."""
TRUTH_TABLE_KEY = "truth_nuclei"
"""Name of the ground-truth nuclei table in ``sdata.tables`` (type, state, compartment, spot per nucleus; for scoring only)."""
BLOCK_PX = 2048
MIXED = "mixed"
MIXED_THRESHOLD = 0.6


class _NotGiven:
    """Default of a deprecated parameter whose old values include None."""

    def __repr__(self) -> str:
        return "<not given>"


_NOT_GIVEN = _NotGiven()


def synthetic_visium(
    *,
    seed: int = 0,
    preset: str = "default",
    mpp: float | None = None,
    width_um: float | None = None,
    height_um: float | None = None,
    weak_labels: bool = True,
    umi_per_cell: float = 2500.0,
    progress: bool = True,
    proportions: str | None | _NotGiven = _NOT_GIVEN,
) -> tuple[SpatialData, ad.AnnData]:
    """Generate a synthetic Visium slide with its H&E and a matching single-cell reference.

    The tissue has tumour nests (some with lumina), stroma with fibres, immune aggregates, vessels
    with red cells and fat. Five cell types (``CELL_TYPES``) with overlapping nucleus morphology
    sit in spatially coherent compartments; tumour, fibroblast and lymphocyte have two states each
    (``CELL_STATES``). Spot counts are simulated from per-state expression profiles of the cells
    whose centres fall in each 55 µm spot (negative binomial, varying capture efficiency); the
    reference is drawn from the same profiles. Stain colours vary between seeds.

    Parameters
    ----------
    seed
        Seed of every random draw: same seed, same slide.
    preset
        ``"tiny"`` (≈ 40 spots, for tests), ``"default"`` (≈ 300 spots, ≈ 10k nuclei) or
        ``"visium"`` (6.5 mm capture area, ≈ 4,000 spots, ≈ 150k nuclei, rendered block by block).
    mpp, width_um, height_um
        Override the preset's resolution (µm per pixel) and tissue size.
    weak_labels
        Store the true spot proportions as ``obsm["proportions"]`` and ``obsm["state_proportions"]``,
        the weak labels the model learns from, as if deconvolution were perfect. ``False`` leaves them
        out (deconvolve the counts to get them).
    umi_per_cell
        Mean UMIs a cell contributes to its spot (sequencing depth).
    progress
        Show a progress bar while rendering.
    proportions
        Deprecated: ``"truth"`` is ``weak_labels=True``, ``None`` is ``weak_labels=False``
        (``proportions`` elsewhere is a table of proportions, as in :func:`~histocell_sd.io.from_arrays`).

    Returns
    -------
    tuple
        ``(sdata, reference)``. ``sdata`` follows the data model (image ``"he"``, circles ``"spots"``,
        table ``"table"`` with counts) and keeps the ground truth for scoring only: labels
        ``"truth_labels"``, the table ``"truth_nuclei"`` annotating them (``obs`` ``cell_type``,
        ``cell_state``, ``compartment``, ``spot_id``; ``obsm["spatial"]`` centroids in px), and in
        ``"table"`` ``obsm["true_proportions"]``, ``obsm["true_state_proportions"]`` and
        ``obs["true_compartment"]``. ``reference`` holds raw counts with ``obs["cell_type"]`` and
        ``obs["cell_state"]``.
    """
    if preset not in PRESETS:
        raise InvalidInputError(f"Unknown preset {preset!r}; choose from {sorted(PRESETS)}.")
    weak_labels = _weak_labels(weak_labels, proportions)
    params = PRESETS[preset] | {k: v for k, v in {"mpp": mpp, "width_um": width_um, "height_um": height_um}.items() if v is not None}
    mpp, width_um, height_um = params["mpp"], params["width_um"], params["height_um"]
    rng = np.random.default_rng(seed)
    layout = make_layout(rng, width_um, height_um)
    cells = sample_cells(rng, layout)
    stain = random_stain(rng)
    spots = _visium_grid(width_um, height_um)
    cells["spot_id"] = _spot_of(cells, spots)
    spots = spots.loc[spots.index.isin(cells["spot_id"].dropna())]
    spots.index = _barcodes(rng, len(spots), spots.index)
    cells["spot_id"] = cells["spot_id"].map(dict(zip(spots["grid_id"], spots.index)))

    profiles = expression_profiles(rng)
    in_spot = cells.dropna(subset=["spot_id"])
    state_counts = pd.crosstab(in_spot["spot_id"], in_spot["cell_state"]).reindex(index=spots.index, columns=profiles.index, fill_value=0)
    counts = spot_counts(rng, profiles, state_counts, umi_per_cell=umi_per_cell)
    true_props = _fractions(pd.crosstab(in_spot["spot_id"], in_spot["cell_type"]), spots.index, CELL_TYPES)
    true_state_props = _fractions(state_counts, spots.index, profiles.index)
    ref = reference(rng, profiles)

    image, labels = _render(BlockRenderer(layout, cells, stain, mpp, seed), width_um, height_um, mpp, progress)
    centers = pd.DataFrame({"x": spots["x_um"] / mpp, "y": spots["y_um"] / mpp}, index=spots.index)
    sdata = from_arrays(
        image,
        mpp,
        spot_centers=centers,
        spot_diameter_um=VISIUM_SPOT_DIAMETER_UM,
        counts=counts,
        proportions=true_props if weak_labels else None,
        sample_id=f"synthetic_{preset}_seed{seed}",
    )
    table = sdata.tables[TABLE_KEY]
    table.obsm["true_proportions"] = true_props
    if weak_labels:
        table.obsm[STATE_PROPORTIONS_KEY] = true_state_props
    table.obsm["true_state_proportions"] = true_state_props
    table.obs["true_compartment"] = _spot_compartment(in_spot, spots.index)
    sdata.labels[TRUTH_LABELS_KEY] = Labels2DModel.parse(
        labels, dims=("y", "x"), chunks=(BLOCK_PX, BLOCK_PX), transformations=pixel_transformations(mpp)
    )
    sdata.tables[TRUTH_TABLE_KEY] = _truth_table(cells, mpp)
    sdata.attrs["synthetic"] = {"seed": int(seed), "preset": preset}
    sdata.attrs["cell_states"] = {t: list(s) for t, s in CELL_STATES.items()}
    return sdata, ref


def _visium_grid(width_um: float, height_um: float) -> pd.DataFrame:
    """Spot centres on the Visium hexagonal lattice (100 µm pitch) inside the capture area."""
    dy = VISIUM_PITCH_UM * np.sqrt(3) / 2
    margin = VISIUM_SPOT_DIAMETER_UM / 2 + 5
    rows = np.arange(margin, height_um - margin, dy)
    xy = [(x, y, r, c) for r, y in enumerate(rows) for c, x in enumerate(np.arange(margin + (r % 2) * VISIUM_PITCH_UM / 2, width_um - margin, VISIUM_PITCH_UM))]
    grid = pd.DataFrame(xy, columns=["x_um", "y_um", "array_row", "array_col"])
    grid["grid_id"] = [f"r{r}c{c}" for r, c in zip(grid["array_row"], grid["array_col"])]
    return grid.set_index(grid["grid_id"].to_numpy())


def _spot_of(cells: pd.DataFrame, spots: pd.DataFrame) -> pd.Series:
    """The spot whose 55 µm circle holds each cell's centre (NaN when none)."""
    dist, idx = cKDTree(spots[["x_um", "y_um"]].to_numpy()).query(cells[["x_um", "y_um"]].to_numpy())
    spot = pd.Series(spots.index.to_numpy()[idx], index=cells.index, dtype=object)
    return spot.where(dist <= VISIUM_SPOT_DIAMETER_UM / 2)


def _barcodes(rng: np.random.Generator, n: int, grid_ids: pd.Index) -> pd.Index:
    letters = np.array(list("ACGT"))
    codes = {"".join(letters[rng.integers(0, 4, 16)]) + "-1" for _ in range(2 * n)}
    return pd.Index(sorted(codes)[:n] if len(codes) >= n else [f"{g}-1" for g in grid_ids], name=None)


def _fractions(counts: pd.DataFrame, index: pd.Index, columns) -> pd.DataFrame:
    counts = counts.reindex(index=index, columns=list(columns), fill_value=0).astype(np.float64)
    out = counts.div(counts.sum(axis=1), axis=0)
    out.columns = out.columns.astype(str)
    return out


def _spot_compartment(in_spot: pd.DataFrame, index: pd.Index) -> pd.Categorical:
    share = _fractions(pd.crosstab(in_spot["spot_id"], in_spot["compartment"]), index, COMPARTMENTS)
    label = np.where(share.max(axis=1) >= MIXED_THRESHOLD, share.idxmax(axis=1), MIXED)
    return pd.Categorical(label, categories=[*COMPARTMENTS, MIXED])


def _weak_labels(weak_labels, proportions) -> bool:
    """``weak_labels``, or the deprecated ``proportions`` (``"truth"`` / None) with a FutureWarning."""
    if not isinstance(weak_labels, bool):
        raise InvalidInputError(f"weak_labels must be True or False, got {weak_labels!r}.")
    if proportions is _NOT_GIVEN:
        return weak_labels
    if proportions not in ("truth", None):
        raise InvalidInputError(f"proportions (deprecated) must be 'truth' or None, got {proportions!r}; use weak_labels=True or False.")
    if weak_labels is not True:
        raise InvalidInputError("Give weak_labels= or the deprecated proportions=, not both.")
    warnings.warn("synthetic_visium(proportions=...) is deprecated; use weak_labels=True ('truth') or False (None).", FutureWarning, stacklevel=3)
    return proportions == "truth"


def _render(renderer: BlockRenderer, width_um, height_um, mpp, progress) -> tuple[np.ndarray, np.ndarray]:
    height, width = int(np.ceil(height_um / mpp)), int(np.ceil(width_um / mpp))
    image = np.empty((height, width, 3), dtype=np.uint8)
    labels = np.empty((height, width), dtype=np.int32)
    blocks = [(y, x) for y in range(0, height, BLOCK_PX) for x in range(0, width, BLOCK_PX)]
    for y, x in progress_bar(blocks, desc="rendering H&E", disable=not progress or len(blocks) == 1):
        y1, x1 = min(y + BLOCK_PX, height), min(x + BLOCK_PX, width)
        image[y:y1, x:x1], labels[y:y1, x:x1] = renderer.render(y, y1, x, x1)
    return image, labels


def _truth_table(cells: pd.DataFrame, mpp: float) -> ad.AnnData:
    obs = cells[["cell_type", "cell_state", "compartment"]].copy()
    obs["spot_id"] = cells["spot_id"].astype(object)
    obs[REGION_KEY] = pd.Categorical([TRUTH_LABELS_KEY] * len(cells))
    obs["label_id"] = np.arange(1, len(cells) + 1)
    obs.index = [f"nucleus_{i}" for i in obs["label_id"]]
    morphology = ["major_um", "minor_um", "darkness"]
    adata = ad.AnnData(obs=obs, obsm={"spatial": cells[["x_um", "y_um"]].to_numpy() / mpp})
    adata.obs[morphology] = cells[morphology].to_numpy()
    return TableModel.parse(adata, region=TRUTH_LABELS_KEY, region_key=REGION_KEY, instance_key="label_id")
