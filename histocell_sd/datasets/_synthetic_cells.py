"""Tissue layout and cells of the synthetic slide: compartments, positions, types, states, morphology.

Everything is in µm; rendering converts to pixels. The layout is sampled on a coarse grid of smooth
random fields, so compartments are spatially coherent, and every random draw a nucleus needs later is
stored in its row, so a slide renders identically in any tiling.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import ndimage
from scipy.spatial import cKDTree

CELL_TYPES = ("tumor", "fibroblast", "lymphocyte", "macrophage", "endothelial")
"""The five cell types of the synthetic slides, in the order of the columns of their proportions."""
CELL_STATES = {
    "tumor": ("tumor_proliferative", "tumor_quiescent"),
    "fibroblast": ("fibroblast_myCAF", "fibroblast_iCAF"),
    "lymphocyte": ("lymphocyte_naive", "lymphocyte_activated"),
    "macrophage": ("macrophage",),
    "endothelial": ("endothelial",),
}
"""The cell states of each synthetic cell type (a type with one state is its own state)."""
COMPARTMENTS = ("tumor", "stroma", "immune")
"""The tissue compartments of the synthetic slides (``obs["true_compartment"]`` of the spots table)."""

# Cell-type mix of each compartment (rows follow COMPARTMENTS, columns CELL_TYPES).
COMPOSITION = np.array(
    [
        [0.80, 0.07, 0.07, 0.05, 0.01],
        [0.04, 0.58, 0.14, 0.12, 0.12],
        [0.02, 0.08, 0.75, 0.12, 0.03],
    ]
)
# Nuclei per mm² before hard-core thinning, and the minimum centre distance (µm), per compartment.
DENSITY = np.array([9500.0, 4600.0, 14000.0])
MIN_DISTANCE = np.array([8.0, 6.5, 5.5])
GRID_UM = 4.0


@dataclass(frozen=True)
class Morphology:
    """Nucleus appearance of one cell state (µm and hematoxylin concentration units)."""

    major_um: tuple[float, float]  # mean, sd of the long axis
    ratio: tuple[float, float]  # minor / major axis
    darkness: tuple[float, float]  # hematoxylin concentration
    texture: float  # chromatin contrast
    vesicular: float  # rim darkening (open chromatin)
    nucleoli: int  # mean number of nucleoli
    cytoplasm: float  # cytoplasm radius / nucleus radius
    cytoplasm_eosin: float


MORPHOLOGY = {
    "tumor_proliferative": Morphology((12.5, 1.8), (0.78, 0.08), (0.80, 0.12), 0.45, 0.25, 2, 1.5, 0.40),
    "tumor_quiescent": Morphology((11.0, 1.6), (0.80, 0.08), (0.58, 0.10), 0.35, 0.45, 1, 1.7, 0.35),
    "fibroblast_myCAF": Morphology((13.5, 2.5), (0.30, 0.06), (0.82, 0.12), 0.15, 0.0, 0, 1.2, 0.25),
    "fibroblast_iCAF": Morphology((11.0, 2.0), (0.45, 0.08), (0.66, 0.10), 0.20, 0.05, 0, 1.3, 0.20),
    "lymphocyte_naive": Morphology((6.0, 0.6), (0.92, 0.05), (1.15, 0.12), 0.10, 0.0, 0, 1.15, 0.10),
    "lymphocyte_activated": Morphology((7.6, 0.8), (0.88, 0.06), (0.92, 0.12), 0.22, 0.05, 0, 1.3, 0.15),
    "macrophage": Morphology((9.5, 1.3), (0.65, 0.10), (0.62, 0.10), 0.25, 0.10, 0, 2.0, 0.18),
    "endothelial": Morphology((10.5, 1.8), (0.36, 0.07), (0.76, 0.12), 0.15, 0.0, 0, 1.2, 0.22),
}


@dataclass
class Layout:
    """Coarse tissue fields of a slide (grid of ``GRID_UM`` µm)."""

    width_um: float
    height_um: float
    compartment: np.ndarray  # int8 index into COMPARTMENTS, -1 = no tissue / fat / lumen
    tissue: np.ndarray  # float weights (smooth) for rendering
    fat: np.ndarray
    lumen: np.ndarray
    tumor: np.ndarray
    immune: np.ndarray
    fibre_stream: np.ndarray  # µm; stroma fibres run along its level lines
    loose: np.ndarray
    state_field: np.ndarray
    vessels: pd.DataFrame  # x, y, radius (µm)
    fat_seeds: np.ndarray  # (n, 2) µm, adipocyte centres


def _field(rng: np.random.Generator, shape: tuple[int, int], sigma_um: float) -> np.ndarray:
    """A smooth Gaussian random field with zero mean and unit variance."""
    field = ndimage.gaussian_filter(rng.standard_normal(shape), sigma_um / GRID_UM, mode="wrap")
    return ((field - field.mean()) / (field.std() + 1e-12)).astype(np.float32)


def _above_quantile(field: np.ndarray, fraction: float, within: np.ndarray) -> np.ndarray:
    threshold = np.quantile(field[within], 1 - fraction) if within.any() else np.inf
    return (field > threshold) & within


def make_layout(rng: np.random.Generator, width_um: float, height_um: float) -> Layout:
    """Sample tissue compartments, fat, lumina, vessels and stroma fibre orientation."""
    shape = (int(np.ceil(height_um / GRID_UM)) + 1, int(np.ceil(width_um / GRID_UM)) + 1)
    yy, xx = np.mgrid[0 : shape[0], 0 : shape[1]] * GRID_UM
    # Tissue: a large irregular blob covering most of the capture area.
    r = np.hypot((xx - width_um / 2) / (width_um / 2), (yy - height_um / 2) / (height_um / 2))
    tissue = (_field(rng, shape, min(width_um, height_um) / 6) * 0.25 - r**4 * 0.5) > -0.6
    tissue = ndimage.binary_opening(tissue, iterations=3)
    fat = _above_quantile(_field(rng, shape, 70), 0.10, tissue)
    nest_field = _field(rng, shape, 55)
    tumor = _above_quantile(nest_field, 0.38, tissue & ~fat)
    lumen = _above_quantile(np.where(tumor, nest_field, -np.inf) + 0.6 * _field(rng, shape, 12), 0.05, tumor)
    lumen = ndimage.binary_opening(lumen)
    immune = _above_quantile(_field(rng, shape, 35), 0.12, tissue & ~fat & ~tumor)
    compartment = np.full(shape, -1, dtype=np.int8)
    compartment[tissue & ~fat] = COMPARTMENTS.index("stroma")
    compartment[immune] = COMPARTMENTS.index("immune")
    compartment[tumor & ~lumen] = COMPARTMENTS.index("tumor")
    vessels = _sample_vessels(rng, compartment, width_um, height_um)
    seeds = rng.uniform((0, 0), (width_um, height_um), size=(int(width_um * height_um / 55.0**2), 2))
    return Layout(
        width_um=width_um,
        height_um=height_um,
        compartment=compartment,
        tissue=tissue.astype(np.float32),
        fat=(fat & tissue).astype(np.float32),
        lumen=lumen.astype(np.float32),
        tumor=(tumor & ~lumen).astype(np.float32),
        immune=immune.astype(np.float32),
        fibre_stream=_fibre_stream(rng, shape, xx, yy),
        loose=_field(rng, shape, 5),
        state_field=_field(rng, shape, 120),
        vessels=vessels,
        fat_seeds=seeds,
    )


def _fibre_stream(rng, shape, xx, yy) -> np.ndarray:
    """A wavy stream function: a dominant direction bent by smooth fields."""
    angle = rng.uniform(0, np.pi)
    return (xx * np.cos(angle) + yy * np.sin(angle) + 70 * _field(rng, shape, 60) + 6 * _field(rng, shape, 12)).astype(np.float32)


def fibre_angle_at(layout: Layout, xy_um: np.ndarray) -> np.ndarray:
    """Direction (radians) of the stroma fibres at points given in µm."""
    gy, gx = np.gradient(layout.fibre_stream)
    ij = np.clip(np.round(xy_um[:, ::-1] / GRID_UM).astype(int), 0, np.array(gy.shape) - 1)
    return np.arctan2(gy[ij[:, 0], ij[:, 1]], gx[ij[:, 0], ij[:, 1]]) + np.pi / 2


def compartment_at(layout: Layout, xy_um: np.ndarray) -> np.ndarray:
    """Compartment index (-1 for none) at points given in µm."""
    ij = np.round(xy_um[:, ::-1] / GRID_UM).astype(int)
    ij[:, 0] = np.clip(ij[:, 0], 0, layout.compartment.shape[0] - 1)
    ij[:, 1] = np.clip(ij[:, 1], 0, layout.compartment.shape[1] - 1)
    return layout.compartment[ij[:, 0], ij[:, 1]]


def _sample_vessels(rng, compartment, width_um, height_um) -> pd.DataFrame:
    n = rng.poisson(width_um * height_um / 1e6 * 45)
    xy = rng.uniform((0, 0), (width_um, height_um), size=(n, 2))
    ij = np.clip(np.round(xy[:, ::-1] / GRID_UM).astype(int), 0, np.array(compartment.shape) - 1)
    keep = compartment[ij[:, 0], ij[:, 1]] == COMPARTMENTS.index("stroma")
    xy = xy[keep]
    return pd.DataFrame(
        {"x": xy[:, 0], "y": xy[:, 1], "radius": rng.uniform(5, 14, len(xy)), "seed": rng.integers(0, 2**31 - 1, len(xy))}
    )


def _hard_core(rng, xy: np.ndarray, min_dist: np.ndarray) -> np.ndarray:
    """Thin points so no two are closer than the larger of their minimum distances."""
    rank = rng.permutation(len(xy))
    pairs = cKDTree(xy).query_pairs(float(min_dist.max()), output_type="ndarray")
    if len(pairs):
        d = np.linalg.norm(xy[pairs[:, 0]] - xy[pairs[:, 1]], axis=1)
        pairs = pairs[d < np.maximum(min_dist[pairs[:, 0]], min_dist[pairs[:, 1]])]
    drop = np.where(rank[pairs[:, 0]] > rank[pairs[:, 1]], pairs[:, 0], pairs[:, 1])
    keep = np.ones(len(xy), bool)
    keep[drop] = False
    return keep


def sample_cells(rng: np.random.Generator, layout: Layout) -> pd.DataFrame:
    """Nucleus centres (µm), compartment, type, state and every per-nucleus random draw."""
    area_mm2 = layout.width_um * layout.height_um / 1e6
    n = rng.poisson(DENSITY.max() * area_mm2)
    xy = rng.uniform((0, 0), (layout.width_um, layout.height_um), size=(n, 2))
    comp = compartment_at(layout, xy)
    accept = (comp >= 0) & (rng.random(n) < DENSITY[np.maximum(comp, 0)] / DENSITY.max())
    xy, comp = xy[accept], comp[accept]
    # Vessel lumina hold no nuclei; endothelial cells line them.
    if len(layout.vessels):
        dist, idx = cKDTree(layout.vessels[["x", "y"]].to_numpy()).query(xy)
        inside = dist < layout.vessels["radius"].to_numpy()[idx] + 3.0
        xy, comp = xy[~inside], comp[~inside]
    cumulative = np.cumsum(COMPOSITION, axis=1)[comp]
    type_idx = np.minimum((rng.random(len(comp))[:, None] > cumulative).sum(axis=1), len(CELL_TYPES) - 1)
    lining_xy, lining_angle = _vessel_lining(rng, layout.vessels)
    xy = np.vstack([xy, lining_xy])
    comp = np.concatenate([comp, np.full(len(lining_xy), COMPARTMENTS.index("stroma"), dtype=np.int8)])
    type_idx = np.concatenate([type_idx, np.full(len(lining_xy), CELL_TYPES.index("endothelial"))])
    keep = _hard_core(rng, xy, MIN_DISTANCE[comp])
    keep &= (xy[:, 0] > 2) & (xy[:, 1] > 2) & (xy[:, 0] < layout.width_um - 2) & (xy[:, 1] < layout.height_um - 2)
    angle = rng.uniform(0, np.pi, len(xy))
    # Fibroblasts follow the stroma fibres; endothelial cells lie along their vessel wall.
    is_fib = type_idx == CELL_TYPES.index("fibroblast")
    angle[is_fib] = fibre_angle_at(layout, xy[is_fib]) + rng.normal(0, 0.25, is_fib.sum())
    ij = np.clip(np.round(xy[:, ::-1] / GRID_UM).astype(int), 0, np.array(layout.state_field.shape) - 1)
    angle[len(xy) - len(lining_xy) :] = lining_angle
    state_z = layout.state_field[ij[:, 0], ij[:, 1]]
    cells = pd.DataFrame({"x_um": xy[:, 0], "y_um": xy[:, 1], "type_idx": type_idx, "comp_idx": comp, "angle": angle})
    cells["state_z"] = state_z
    cells = cells[keep].reset_index(drop=True)
    return _assign_states_and_shapes(rng, cells)


def _vessel_lining(rng, vessels: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    xy, angle = [], []
    for v in vessels.itertuples():
        n = max(3, int(2 * np.pi * v.radius / 11))
        theta = np.sort(rng.uniform(0, 2 * np.pi, n))
        r = v.radius + 2.0
        xy.append(np.c_[v.x + r * np.cos(theta), v.y + r * np.sin(theta)])
        angle.append(theta + np.pi / 2)
    if not xy:
        return np.empty((0, 2)), np.empty(0)
    return np.vstack(xy), np.concatenate(angle)


def _assign_states_and_shapes(rng, cells: pd.DataFrame) -> pd.DataFrame:
    n = len(cells)
    types = np.asarray(CELL_TYPES)[cells["type_idx"].to_numpy()]
    # The first state of a two-state type is favoured where the smooth state field is high.
    p_first = 1 / (1 + np.exp(-1.6 * cells["state_z"].to_numpy()))
    first = rng.random(n) < p_first
    states = np.array([CELL_STATES[t][0] if (f or len(CELL_STATES[t]) == 1) else CELL_STATES[t][1] for t, f in zip(types, first)])
    cells["cell_type"] = pd.Categorical(types, categories=CELL_TYPES)
    all_states = [s for t in CELL_TYPES for s in CELL_STATES[t]]
    cells["cell_state"] = pd.Categorical(states, categories=all_states)
    cells["compartment"] = pd.Categorical(np.asarray(COMPARTMENTS)[cells["comp_idx"].to_numpy()], categories=COMPARTMENTS)
    morph = [MORPHOLOGY[s] for s in states]
    major = np.array([m.major_um[0] for m in morph]) + np.array([m.major_um[1] for m in morph]) * rng.standard_normal(n)
    ratio = np.array([m.ratio[0] for m in morph]) + np.array([m.ratio[1] for m in morph]) * rng.standard_normal(n)
    dark = np.array([m.darkness[0] for m in morph]) + np.array([m.darkness[1] for m in morph]) * rng.standard_normal(n)
    cells["major_um"] = np.clip(major, 4.0, 24.0)
    cells["minor_um"] = cells["major_um"] * np.clip(ratio, 0.2, 1.0)
    cells["darkness"] = np.clip(dark, 0.3, 1.6)
    cells["texture"] = [m.texture for m in morph]
    cells["vesicular"] = [m.vesicular for m in morph]
    cells["n_nucleoli"] = rng.poisson([m.nucleoli for m in morph])
    cells["cytoplasm"] = [m.cytoplasm for m in morph]
    cells["cytoplasm_eosin"] = [m.cytoplasm_eosin for m in morph]
    cells["kidney"] = (states == "macrophage") * rng.uniform(0.1, 0.3, n)
    harmonics = rng.normal(0, 0.045, size=(n, 3))
    phases = rng.uniform(0, 2 * np.pi, size=(n, 3))
    for k in range(3):
        cells[f"harm{k}"] = harmonics[:, k]
        cells[f"phase{k}"] = phases[:, k]
    cells["texture_seed"] = rng.integers(0, 2**31 - 1, n)
    return cells.drop(columns=["type_idx", "comp_idx", "state_z"])
