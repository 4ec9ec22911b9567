"""Training samples: the model inputs of a SpatialData with what fit learns from (spot proportions or
nucleus labels), and the grouping of spots into training batches and held-out spots."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import pandas as pd
import shapely
from spatialdata import SpatialData

from .._constants import HISTOCELL_KEY, TABLE_KEY
from .._errors import InvalidInputError
from ..io import check_proportions, get_mpp, resolve_key
from ..io._elements import annotated_regions
from ..io._spots import SQUARE, spot_geometry, spot_overlaps
from ._config import HistoCellConfig
from ._inputs import SampleInputs, sample_inputs

logger = logging.getLogger(__name__)

LABELLED_BAG_UM = 55.0  # training from nucleus labels: nuclei are batched by squares of this side
SPOT_BAGS = ("centroid", "overlap")
"""How a spot's bag is made: the nuclei whose centroid it holds (``obs["spot_id"]``), each counting once, or every
nucleus whose polygon overlaps it, weighted by the share of the nucleus's area inside it."""
DEFAULT_SPOT_BAGS = {"circle": "centroid", SQUARE: "overlap"}
"""``spot_bags=None``: overlap for squares, measured better on the synthetic Visium HD slide (``benchmarks/visium_hd.py``)."""
HOLDOUTS = ("tiles", "spots")
"""How fit holds out spots for early stopping: whole tiles (``tile_um`` squares), or spots scattered over every tile."""


@dataclass
class TrainingSample:
    """A training sample: inputs plus spot targets aligned to spot rows."""

    inputs: SampleInputs
    spot_nuclei: list[np.ndarray]  # nuclei rows per spot
    targets: np.ndarray  # (spots, types)
    state_targets: np.ndarray | None  # (spots, states)
    compartments: np.ndarray  # (spots,) int
    spot_xy_um: np.ndarray
    nucleus_labels: np.ndarray | None = None  # (nuclei,) type index, -1 = unknown (nucleus_labels_key)
    spot_weights: list[np.ndarray] | None = None  # weight of each nucleus in its spot's bag (None: 1 each)
    spot_bags: str = "centroid"


def inputs_of(config: HistoCellConfig, sdata: SpatialData, *, image_key=None, nuclei_table_key=HISTOCELL_KEY, progress=True,
              crops_on_demand=False) -> SampleInputs:
    """The inputs of every nucleus of ``sdata`` with the preprocessing of ``config``."""
    return sample_inputs(
        sdata,
        **config.input_settings,
        image_key=image_key,
        nuclei_table_key=nuclei_table_key,
        progress=progress,
        crops_on_demand=crops_on_demand,
    )


def check_spot_bags(spot_bags: str | None) -> None:
    """Refuse a ``spot_bags`` that is not None or one of :data:`SPOT_BAGS`."""
    if spot_bags is not None and spot_bags not in SPOT_BAGS:
        raise InvalidInputError(f"spot_bags must be one of {list(SPOT_BAGS)} or None (by spot shape), got {spot_bags!r}.")


def prepare_sample(config: HistoCellConfig, sdata, *, proportions_key, state_key, spots_table_key, nuclei_table_key, image_key, progress,
                   spot_bags: str | None = None) -> TrainingSample:
    """Inputs and spot targets (cell-type proportions, state proportions when present, compartments) of one sample.

    ``spot_bags`` is one of :data:`SPOT_BAGS`; None: :data:`DEFAULT_SPOT_BAGS` of the spots' shape.
    """
    check_spot_bags(spot_bags)
    mpp = get_mpp(sdata)
    spots_table_key = resolve_key(sdata, "tables", key=spots_table_key, default=TABLE_KEY)
    table = sdata.tables[spots_table_key]
    if proportions_key not in table.obsm:
        raise InvalidInputError(f"Spots table {spots_table_key!r} has no obsm[{proportions_key!r}] (spot proportions to learn from).")
    proportions = check_proportions(table.obsm[proportions_key], cell_types=config.cell_types, name=f"obsm[{proportions_key!r}]")
    missing = [t for t in config.cell_types if t not in proportions.columns]
    if missing:
        raise InvalidInputError(f"obsm[{proportions_key!r}] lacks the cell types {missing} of the model.")
    if len(proportions) == 0:
        raise InvalidInputError(f"obsm[{proportions_key!r}] holds zero spots.")
    proportions = proportions[config.cell_types]
    region = _annotated_region(table, spots_table_key)
    geometry = spot_geometry(sdata.shapes[region], region)
    spot_bags = spot_bags or DEFAULT_SPOT_BAGS[geometry.shape]
    inputs = inputs_of(config, sdata, image_key=image_key, nuclei_table_key=nuclei_table_key, progress=progress)
    spot_of_row = geometry.index.get_indexer(proportions.index)  # spots element row of each proportions row
    if (spot_of_row < 0).any():
        raise InvalidInputError(f"{(spot_of_row < 0).sum()} spots of obsm[{proportions_key!r}] are not in shapes {region!r}.")
    if spot_bags == "centroid":
        nucleus = np.arange(len(inputs.spot_ids))
        spot = inputs.spot_ids.map(pd.Series(np.arange(len(proportions)), index=proportions.index)).to_numpy(np.float64)
        inside = np.isfinite(spot)
        nucleus, spot, weight = nucleus[inside], spot[inside].astype(np.int64), None
    else:
        nucleus, spot, weight = _overlap_pairs(sdata, nuclei_table_key, inputs, geometry, spot_of_row)
    order = np.argsort(spot, kind="stable")
    nucleus, spot = nucleus[order], spot[order]
    weight = None if weight is None else weight[order].astype(np.float32)
    bounds = np.searchsorted(spot, np.arange(len(proportions) + 1))
    has_nuclei = np.diff(bounds) > 0
    if not has_nuclei.any():
        raise InvalidInputError(f"No nucleus lies in a spot with proportions ({spot_bags!r} bags); check obs['spot_id'] of the nuclei table.")
    if not has_nuclei.all():  # most bins of a Visium HD section hold no nucleus: expected, not a warning
        log = logger.info if geometry.shape == SQUARE else logger.warning
        log("%d of %d spots hold no nucleus and are skipped.", (~has_nuclei).sum(), len(has_nuclei))
    counted = _has_counts(table, proportions.index)
    if counted is not None and not counted[has_nuclei].all():  # no counts, no evidence: a deconvolution's answer there is its prior
        logger.info("%d spots with nuclei have no counts; their proportions carry no label and they are skipped.", (has_nuclei & ~counted).sum())
        has_nuclei &= counted
        if not has_nuclei.any():
            raise InvalidInputError(f"Every spot of obsm[{proportions_key!r}] that holds a nucleus has zero counts in X.")
    keep = np.flatnonzero(has_nuclei)
    state_targets = None
    if state_key and state_key in table.obsm and config.has_states:
        states = check_proportions(table.obsm[state_key], cell_types=config.state_names, name=f"obsm[{state_key!r}]")
        states = states.reindex(columns=config.state_names, fill_value=0.0).loc[proportions.index]
        per_type = np.stack([states[config.states[t]].to_numpy().sum(1) for t in config.cell_types], 1)
        gap = np.abs(per_type - proportions.to_numpy()).sum(1)
        if np.median(gap) > 0.1:
            raise InvalidInputError(
                f"obsm[{state_key!r}] disagrees with obsm[{proportions_key!r}]: the states of a type should add up to that "
                f"type's proportion, but they differ by {np.median(gap):.2f} (median over spots)."
            )
        state_targets = states.to_numpy(np.float32)[keep]
    xy = geometry.centers[spot_of_row] * mpp
    return TrainingSample(
        inputs=inputs,
        spot_nuclei=[nucleus[bounds[i]:bounds[i + 1]] for i in keep],
        spot_weights=None if weight is None else [weight[bounds[i]:bounds[i + 1]] for i in keep],
        spot_bags=spot_bags,
        targets=proportions.to_numpy(np.float32)[keep],
        state_targets=state_targets,
        compartments=config.compartment_of(proportions.to_numpy()[keep]),
        spot_xy_um=xy[keep],
    )


def _has_counts(table, spot_ids: pd.Index) -> np.ndarray | None:
    """Per spot of ``spot_ids``: does its row of ``X`` hold any count? None when ``X`` holds no genes (proportions only)."""
    if table.n_vars == 0 or table.X is None:
        return None
    totals = np.asarray(table.X.sum(axis=1)).ravel()
    return pd.Series(totals > 0, index=table.obs_names).reindex(spot_ids, fill_value=True).to_numpy()


def prepare_labelled_sample(config: HistoCellConfig, sdata, *, labels_key, nuclei_table_key, image_key, progress) -> TrainingSample:
    """Every labelled nucleus, in bags of the nuclei of ``LABELLED_BAG_UM`` squares (no spots needed)."""
    inputs = inputs_of(config, sdata, image_key=image_key, nuclei_table_key=nuclei_table_key, progress=progress)
    obs = sdata.tables[resolve_key(sdata, "tables", key=nuclei_table_key, default=HISTOCELL_KEY)].obs
    if labels_key not in obs:
        raise InvalidInputError(f"Nuclei table {nuclei_table_key!r} has no obs[{labels_key!r}].")
    labels = pd.Categorical(obs[labels_key].astype(str), categories=config.cell_types).codes.astype(np.int64)
    known = np.flatnonzero(labels >= 0)
    if len(known) == 0:
        raise InvalidInputError(f"No nucleus has a label among the model's cell types in obs[{labels_key!r}].")
    xy_um = inputs.context_xy[known].astype(np.float64) * config.context_mpp
    cell = np.floor(xy_um / LABELLED_BAG_UM).astype(np.int64)
    _, bag = np.unique(cell, axis=0, return_inverse=True)
    bag = bag.ravel()
    members = [known[bag == b] for b in range(bag.max() + 1)]
    onehot = np.eye(len(config.cell_types), dtype=np.float32)[labels[known]]
    targets = np.stack([onehot[bag == b].mean(0) for b in range(len(members))])
    centres = np.stack([xy_um[bag == b].mean(0) for b in range(len(members))])
    return TrainingSample(inputs=inputs, spot_nuclei=members, targets=targets, state_targets=None,
                          compartments=config.compartment_of(targets), spot_xy_um=centres, nucleus_labels=labels)


def _overlap_pairs(sdata, nuclei_table_key, inputs, geometry, spot_of_row):
    """``(nucleus rows, proportions rows, share of the nucleus's area in the spot)`` of every overlapping pair."""
    key = resolve_key(sdata, "tables", key=nuclei_table_key, default=HISTOCELL_KEY)
    shapes_key = _annotated_region(sdata.tables[key], key)
    if shapes_key not in sdata.shapes:
        raise InvalidInputError(f"spot_bags='overlap' needs the nucleus polygons: shapes {shapes_key!r} (annotated by {key!r}) is missing.")
    polygons = sdata.shapes[shapes_key].geometry
    rows = polygons.index.get_indexer(inputs.obs_names)
    if (rows < 0).any() or not polygons.geom_type.isin(["Polygon", "MultiPolygon"]).all():
        raise InvalidInputError(f"spot_bags='overlap' needs one polygon per nucleus of {key!r} in shapes {shapes_key!r}.")
    polygons = polygons.to_numpy()[rows]
    in_table = np.full(len(geometry.centers), -1, np.int64)
    in_table[spot_of_row] = np.arange(len(spot_of_row))
    nucleus, spot_row, area = spot_overlaps(geometry, polygons)
    spot = in_table[spot_row]
    keep = spot >= 0
    share = area[keep] / np.maximum(shapely.area(polygons[nucleus[keep]]), 1e-12)
    return nucleus[keep], spot[keep], np.minimum(share, 1.0)


def _annotated_region(table, table_key: str) -> str:
    regions = annotated_regions(table)
    if len(regions) != 1:
        raise InvalidInputError(f"Table {table_key!r} must annotate exactly one spots element, got {regions}.")
    return regions[0]


def spot_tiles(xy_um: np.ndarray, tile_um: float) -> list[np.ndarray]:
    """Group spot rows into square tiles of ``tile_um`` (a training batch is one tile)."""
    tile = np.floor(xy_um / tile_um).astype(int)
    _, inverse = np.unique(tile, axis=0, return_inverse=True)
    return [np.flatnonzero(inverse.ravel() == t) for t in range(inverse.max() + 1)]


def split_spots(tiles, val_fraction: float, rng: np.random.Generator, holdout: str = "tiles"):
    """Hold out about ``val_fraction`` of the spots of the ``(sample, spots)`` tiles: ``(train, val, holdout used)``.

    ``"tiles"`` holds out whole tiles, drawn in random order until they hold ``val_fraction`` of the spots (at least
    one tile is kept for training), so the neighbours of a held-out spot are held out with it. With fewer than
    ``1 / val_fraction`` tiles it falls back to ``"spots"``: every spot of every tile is held out with probability
    ``val_fraction``.
    """
    if holdout == "tiles" and len(tiles) * val_fraction >= 1:
        target, n_held = val_fraction * sum(len(s) for _, s in tiles), 0
        held = np.zeros(len(tiles), dtype=bool)
        for t in rng.permutation(len(tiles))[:-1]:
            if n_held >= target:
                break
            held[t], n_held = True, n_held + len(tiles[t][1])
        return [t for t, h in zip(tiles, held) if not h], [t for t, h in zip(tiles, held) if h], "tiles"
    train, val = [], []
    for sample_idx, spots in tiles:
        held = rng.random(len(spots)) < val_fraction
        if (~held).any():
            train.append((sample_idx, spots[~held]))
        if held.any():
            val.append((sample_idx, spots[held]))
    return train, val, "spots"
