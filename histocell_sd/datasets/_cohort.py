"""A synthetic histology cohort with planted clinical effects, in the predicted-table layout.

Each sample is a small slide whose nuclei already carry what ``tl.predict`` would write (the
prediction layout of :mod:`histocell_sd._constants`), so cohort analyses (indicators, survival,
drug response, phenotype screening) can be tested apart from the model.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy.spatial import cKDTree
from spatialdata import SpatialData
from spatialdata.models import Image2DModel

from .._constants import (
    HISTOCELL_KEY,
    IMAGE_KEY,
    NUCLEI_KEY,
)
from .._errors import InvalidInputError
from .._utils import check_whole_number, progress_bar
from ..io._elements import check_mpp, pixel_transformations
from ._stand_in import EMBEDDING_DIM, NUCLEUS_RADIUS_UM, nucleus_circles, prediction_table
from ._synthetic_cells import CELL_STATES, CELL_TYPES, COMPARTMENTS

__all__ = ["INFILTRATION_RADIUS_UM", "PROGNOSTIC_INDICATOR", "synthetic_cohort"]


PROGNOSTIC_INDICATOR = "infiltration_lymphocyte_in_tumor"
"""Name (as ``tl.spatial_indicators`` writes it) of the indicator the cohort's hazard depends on."""
INFILTRATION_RADIUS_UM = 30.0
"""Neighbourhood radius (µm) of the infiltration indicator (``tl.spatial_indicators`` default)."""
PHENOTYPE_INDICATOR = "frac_tumor_proliferative"
RESPONSE_INDICATOR = "frac_fibroblast_myCAF"
NULL_INDICATORS = ("frac_macrophage", "density_macrophage", "frac_endothelial", "density_endothelial", "frac_lymphocyte_activated")
_DENSITY_PER_MM2 = 8000.0
_CLINICAL_COLUMNS = ("duration", "event", "response", "responder", "phenotype")


def synthetic_cohort(
    *,
    n_samples: int = 40,
    seed: int = 0,
    effect: bool = True,
    n_nuclei: int = 3000,
    mpp: float = 0.5,
    image: bool = False,
    hazard_ratio: float = 2.7,
    censoring: float = 0.3,
    progress: bool = True,
) -> tuple[dict[str, SpatialData], pd.DataFrame, dict]:
    """Generate a cohort of small synthetic slides with planted prognostic and phenotype effects.

    Every slide is a square of tissue (≈ ``n_nuclei`` nuclei at ≈ 8,000 nuclei/mm²) with tumour
    nests, immune aggregates and stroma. Per sample, latent variables set how far lymphocytes
    infiltrate the tumour nests, the proliferative share of tumour cells, the myCAF share of
    fibroblasts, the activated share of lymphocytes and the macrophage abundance.

    Planted effects (``effect=True``):

    - **survival**: hazard ``h = h0 · HR^(−z)`` with ``z`` the standardised realised
      ``infiltration_lymphocyte_in_tumor`` (the fraction of lymphocytes whose nuclei within 30 µm
      are mostly tumour, as ``tl.spatial_indicators`` computes it): lymphocyte exclusion from the
      tumour raises the hazard. Durations are exponential, with independent uniform censoring.
    - **phenotype** (binary): ``P(phenotype=1) = sigmoid(3 z)``, ``z`` the standardised
      fraction of ``tumor_proliferative`` nuclei.
    - **drug response**: ``response = z + N(0, 0.6)`` with ``z`` the standardised fraction of
      ``fibroblast_myCAF`` nuclei; ``responder = response > 0``.
    - **null indicators** (``truth["null_indicators"]``): macrophage and endothelial abundance and
      the lymphocyte activation share vary between samples but drive nothing.

    With ``effect=False`` the layouts are drawn the same way but every outcome is independent noise.

    Parameters
    ----------
    n_samples
        Number of slides (≥ 2).
    seed
        Seed of every random draw (same seed, same cohort).
    effect
        Plant the effects above, or none.
    n_nuclei
        Approximate number of nuclei per slide (≥ 100).
    mpp
        Microns per pixel of the slides' ``global`` coordinate system.
    image
        Also render a cheap H&E-like image ``"he"`` (dark discs on pink) for image crops.
    hazard_ratio
        Hazard ratio per standard deviation of lymphocyte *exclusion* (``effect=True``; > 0, 1: none).
    censoring
        Approximate fraction of censored samples, in [0, 1).
    progress
        Show a progress bar (after a second of work; ``hc.settings.progress = False`` silences it).

    Returns
    -------
    tuple
        ``(samples, clinical, truth)``: ``samples`` maps ``"sample_00"``… to a SpatialData with
        polygons ``"nuclei"`` (circles), the table ``"histocell"`` in the prediction layout
        (``obs`` ``cell_type``, ``cell_state``, ``compartment``, ``spot_id`` (NaN: no spots);
        ``obsm`` ``cell_type_proba``, ``histocell_embedding`` (16-D, states separate),
        ``spatial``), ``attrs["mpp"]`` and optionally the image ``"he"``. ``clinical`` is indexed by
        sample with ``duration``, ``event`` (bool), ``response`` (float), ``responder`` (bool) and
        ``phenotype`` (0/1). ``truth`` holds ``prognostic_indicator``, ``phenotype_population``
        (``{"cell_type", "cell_state"}``), ``phenotype_indicator``, ``response_indicator``,
        ``null_indicators``, ``effect``, ``hazard`` (per-sample Series) and ``latent`` (DataFrame of
        the per-sample latent variables and realised driver values).
    """
    check_whole_number("n_samples", n_samples, 2)
    check_whole_number("n_nuclei", n_nuclei, 100)
    mpp = check_mpp(mpp)
    if isinstance(hazard_ratio, bool) or not (isinstance(hazard_ratio, (int, float, np.number)) and np.isfinite(hazard_ratio) and hazard_ratio > 0):
        raise InvalidInputError(f"hazard_ratio must be a positive number (1: no effect), got {hazard_ratio!r}.")
    if isinstance(censoring, bool) or not (isinstance(censoring, (int, float, np.number)) and 0 <= censoring < 1):
        raise InvalidInputError(f"censoring is the share of censored samples and must lie in [0, 1), got {censoring!r}.")
    rng = np.random.default_rng(seed)
    states = [s for t in CELL_TYPES for s in CELL_STATES[t]]
    centres = rng.normal(0, 1.6, size=(len(states), EMBEDDING_DIM))
    names = [f"sample_{i:02d}" for i in range(n_samples)]
    samples, rows = {}, []
    for name in progress_bar(names, desc="synthetic cohort", disable=not progress):
        latent = {
            "infiltration_latent": rng.uniform(0, 1),
            "prolif_share": rng.uniform(0.1, 0.9),
            "mycaf_share": rng.uniform(0.1, 0.9),
            "activated_share": rng.uniform(0.2, 0.8),
            "macrophage_scale": rng.uniform(0.5, 2.0),
        }
        cells, side_um = _cohort_cells(rng, int(n_nuclei), latent)
        samples[name] = _sample_sdata(rng, cells, side_um, mpp, states, centres, name, image)
        rows.append(latent | _drivers(cells))
    latent = pd.DataFrame(rows, index=names)
    clinical, hazard = _outcomes(rng, latent, effect, hazard_ratio, censoring)
    truth = {
        "prognostic_indicator": PROGNOSTIC_INDICATOR,
        "phenotype_population": {"cell_type": "tumor", "cell_state": "tumor_proliferative"},
        "phenotype_indicator": PHENOTYPE_INDICATOR,
        "response_indicator": RESPONSE_INDICATOR,
        "null_indicators": list(NULL_INDICATORS),
        "effect": bool(effect),
        "hazard": hazard,
        "latent": latent,
    }
    return samples, clinical, truth


def _cohort_cells(rng: np.random.Generator, n_nuclei: int, latent: dict) -> tuple[pd.DataFrame, float]:
    """Nucleus positions (µm), compartments, types and states of one slide."""
    side = float(np.sqrt(n_nuclei / _DENSITY_PER_MM2) * 1000.0)
    k = int(np.ceil(np.sqrt(n_nuclei)))
    step = side / k
    gx, gy = np.meshgrid(np.arange(k), np.arange(k))
    xy = (np.column_stack([gx.ravel(), gy.ravel()]) + 0.5 + rng.uniform(-0.35, 0.35, (k * k, 2))) * step
    xy = xy[rng.permutation(len(xy))[:n_nuclei]]
    comp = np.full(len(xy), COMPARTMENTS.index("stroma"))
    for _ in range(rng.integers(2, 4)):  # immune aggregates
        c, r = rng.uniform(0.1, 0.9, 2) * side, rng.uniform(0.06, 0.1) * side
        comp[np.linalg.norm(xy - c, axis=1) < r] = COMPARTMENTS.index("immune")
    for _ in range(rng.integers(4, 7)):  # tumour nests (irregular discs)
        c, r = rng.uniform(0.15, 0.85, 2) * side, rng.uniform(0.14, 0.22) * side
        d = xy - c
        wobble = 1 + 0.15 * np.sin(3 * np.arctan2(d[:, 1], d[:, 0]) + rng.uniform(0, 2 * np.pi))
        comp[np.linalg.norm(d, axis=1) < r * wobble] = COMPARTMENTS.index("tumor")
    lt, m = 0.01 + 0.3 * latent["infiltration_latent"], latent["macrophage_scale"]
    mix = np.array(
        [
            [0.85 - lt, 0.07, lt, 0.05 * m, 0.01],
            [0.03, 0.66, 0.08, 0.10 * m, 0.10],
            [0.02, 0.08, 0.75, 0.10 * m, 0.03],
        ]
    )
    mix /= mix.sum(axis=1, keepdims=True)
    cum = np.cumsum(mix[comp], axis=1)
    t = np.minimum((rng.random(len(xy))[:, None] > cum).sum(axis=1), len(CELL_TYPES) - 1)
    types = np.asarray(CELL_TYPES, dtype=object)[t]
    share = {"tumor": latent["prolif_share"], "fibroblast": latent["mycaf_share"], "lymphocyte": 1 - latent["activated_share"]}
    u = rng.random(len(xy))
    state = np.array([CELL_STATES[ty][0] if (len(CELL_STATES[ty]) == 1 or ui < share[ty]) else CELL_STATES[ty][1] for ty, ui in zip(types, u)], dtype=object)
    cells = pd.DataFrame({"x_um": xy[:, 0], "y_um": xy[:, 1], "cell_type": types, "cell_state": state})
    cells["compartment"] = np.asarray(COMPARTMENTS, dtype=object)[comp]
    return cells, side


def lymphocyte_infiltration(xy_um: np.ndarray, cell_type: np.ndarray, radius_um: float = INFILTRATION_RADIUS_UM) -> float:
    """Fraction of lymphocytes whose other nuclei within ``radius_um`` are more than half tumour.

    The reference definition of ``infiltration_lymphocyte_in_tumor`` (lymphocytes with no
    neighbour count as not infiltrating); NaN without lymphocytes.
    """
    cell_type = np.asarray(cell_type)
    lym = np.flatnonzero(cell_type == "lymphocyte")
    if not len(lym):
        return float("nan")
    tree = cKDTree(xy_um)
    hits = tree.query_ball_point(xy_um[lym], radius_um)
    inside = 0
    for i, h in zip(lym, hits):
        others = [j for j in h if j != i]
        if others and np.mean(cell_type[others] == "tumor") > 0.5:
            inside += 1
    return inside / len(lym)


def _drivers(cells: pd.DataFrame) -> dict:
    """Realised values of the indicators that drive the outcomes."""
    return {
        PROGNOSTIC_INDICATOR: lymphocyte_infiltration(cells[["x_um", "y_um"]].to_numpy(), cells["cell_type"].to_numpy()),
        PHENOTYPE_INDICATOR: float(np.mean(cells["cell_state"] == "tumor_proliferative")),
        RESPONSE_INDICATOR: float(np.mean(cells["cell_state"] == "fibroblast_myCAF")),
    }


def _z(x: pd.Series) -> np.ndarray:
    x = x.to_numpy(dtype=float)
    sd = x.std()
    return (x - x.mean()) / sd if sd > 0 else np.zeros_like(x)


def _outcomes(rng, latent: pd.DataFrame, effect: bool, hazard_ratio: float, censoring: float) -> tuple[pd.DataFrame, pd.Series]:
    """Clinical table: survival, phenotype and drug response, driven by the realised indicators."""
    n = len(latent)
    z_inf, z_ph, z_resp = (_z(latent[k]) for k in (PROGNOSTIC_INDICATOR, PHENOTYPE_INDICATOR, RESPONSE_INDICATOR))
    if not effect:
        z_inf, z_ph, z_resp = np.zeros(n), np.zeros(n), np.zeros(n)
    hazard = (1 / 24.0) * np.exp(-np.log(hazard_ratio) * z_inf)  # per month
    t_event = rng.exponential(1 / hazard)
    rate_c = (1 / 24.0) * censoring / max(1 - censoring, 1e-6)  # P(censored) ≈ censoring at the baseline hazard
    t_censor = np.minimum(rng.exponential(1 / rate_c, n) if rate_c > 0 else np.full(n, np.inf), 120.0)
    duration = np.minimum(t_event, t_censor)
    phenotype = (rng.random(n) < 1 / (1 + np.exp(-3 * z_ph))).astype(int)
    response = z_resp + rng.normal(0, 0.6 if effect else 1.0, n)
    clinical = pd.DataFrame(
        {"duration": duration, "event": t_event <= t_censor, "response": response, "responder": response > 0, "phenotype": phenotype},
        index=latent.index,
    )
    return clinical[list(_CLINICAL_COLUMNS)], pd.Series(hazard, index=latent.index, name="hazard")


def _sample_sdata(rng, cells: pd.DataFrame, side_um: float, mpp: float, states, centres, name: str, image: bool) -> SpatialData:
    """One slide as a SpatialData in the prediction layout."""
    xy_px = cells[["x_um", "y_um"]].to_numpy() / mpp
    radius_px = NUCLEUS_RADIUS_UM / mpp * rng.uniform(0.8, 1.2, len(cells))
    shapes = {NUCLEI_KEY: nucleus_circles(xy_px, radius_px, mpp)}
    table = prediction_table(
        rng, xy_px, cells["cell_type"], cells["cell_state"], cells["compartment"], states, centres, region=NUCLEI_KEY, mpp=mpp, method="truth"
    )
    images = {}
    if image:
        images[IMAGE_KEY] = _render(rng, xy_px, radius_px, cells["cell_type"].to_numpy(), int(np.ceil(side_um / mpp)), mpp)
    sdata = SpatialData(images=images, shapes=shapes, tables={HISTOCELL_KEY: table})
    sdata.attrs["mpp"] = float(mpp)
    sdata.attrs["sample_id"] = name
    return sdata


def _render(rng, xy_px, radius_px, cell_type, size: int, mpp: float):
    """A cheap H&E-like RGB image: pink background, darker discs at the nuclei."""
    img = np.empty((size, size, 3), dtype=np.float32)
    img[:] = np.array([236, 190, 214]) + rng.normal(0, 4, (size, size, 3))
    shade = {"tumor": (95, 60, 140), "fibroblast": (120, 80, 160), "lymphocyte": (55, 35, 110), "macrophage": (135, 95, 165), "endothelial": (115, 85, 165)}
    for (x, y), r, t in zip(xy_px, radius_px, cell_type):
        r = r * (1.3 if t == "tumor" else 1.0)
        x0, x1, y0, y1 = int(max(x - r, 0)), int(min(x + r + 1, size)), int(max(y - r, 0)), int(min(y + r + 1, size))
        yy, xx = np.mgrid[y0:y1, x0:x1]
        inside = (xx + 0.5 - x) ** 2 + (yy + 0.5 - y) ** 2 <= r * r
        img[y0:y1, x0:x1][inside] = shade[t]
    img = np.clip(img, 0, 255).astype(np.uint8).transpose(2, 0, 1)
    return Image2DModel.parse(img, dims=("c", "y", "x"), c_coords=["r", "g", "b"], transformations=pixel_transformations(mpp))
