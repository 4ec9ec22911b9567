"""Expression of the synthetic slide: per-state profiles, Visium spot counts and a single-cell reference."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
from scipy import sparse

from ._synthetic_cells import CELL_STATES, CELL_TYPES

MARKERS = {
    "tumor": ["EPCAM", "KRT8", "KRT18", "KRT19", "CDH1", "CLDN4", "ELF3", "MUC1"],
    "fibroblast": ["COL1A1", "COL1A2", "COL3A1", "DCN", "LUM", "PDGFRA", "FBLN1", "SFRP2"],
    "lymphocyte": ["PTPRC", "CD3E", "CD2", "CD52", "CCL5", "IL7R", "MS4A1", "CD79A"],
    "macrophage": ["CD68", "CD163", "LYZ", "C1QA", "C1QB", "AIF1", "FCER1G", "TYROBP"],
    "endothelial": ["PECAM1", "VWF", "CDH5", "KDR", "CLDN5", "EMCN", "PLVAP", "RAMP2"],
}
STATE_MARKERS = {
    "tumor_proliferative": ["MKI67", "TOP2A", "CCNB1"],
    "tumor_quiescent": ["CDKN1A", "GDF15", "KRT7"],
    "fibroblast_myCAF": ["ACTA2", "POSTN", "TAGLN"],
    "fibroblast_iCAF": ["IL6", "CXCL12", "CFD"],
    "lymphocyte_naive": ["CCR7", "SELL", "TCF7"],
    "lymphocyte_activated": ["GZMB", "IFNG", "CD69"],
}
RNA_CONTENT = {"tumor": 1.4, "fibroblast": 1.0, "lymphocyte": 0.6, "macrophage": 1.2, "endothelial": 0.9}
N_BACKGROUND_GENES = 300


def expression_profiles(rng: np.random.Generator) -> pd.DataFrame:
    """Relative expression (rows = cell states, columns = genes, rows sum to 1)."""
    markers = [g for t in CELL_TYPES for g in MARKERS[t]]
    state_markers = [g for s in STATE_MARKERS for g in STATE_MARKERS[s]]
    background = [f"GENE{i:04d}" for i in range(N_BACKGROUND_GENES)]
    genes = markers + state_markers + background
    states = [s for t in CELL_TYPES for s in CELL_STATES[t]]
    base = rng.lognormal(0, 1.0, len(genes))
    profiles = pd.DataFrame(np.tile(base, (len(states), 1)), index=states, columns=genes)
    profiles.loc[:, markers + state_markers] *= 0.05
    for t in CELL_TYPES:
        for s in CELL_STATES[t]:
            profiles.loc[s, MARKERS[t]] = rng.lognormal(np.log(40), 0.25, len(MARKERS[t]))
            # background genes drift between types, so types differ beyond their markers
            profiles.loc[s, background] *= np.exp(rng.normal(0, 0.3, len(background)) * 0.5)
    for s, genes_s in STATE_MARKERS.items():
        profiles.loc[s, genes_s] = rng.lognormal(np.log(12), 0.3, len(genes_s))
    return profiles.div(profiles.sum(axis=1), axis=0)


def _negative_binomial(rng: np.random.Generator, mean: np.ndarray, dispersion: float) -> np.ndarray:
    """Gamma–Poisson counts with ``var = mean + mean² / dispersion``."""
    return rng.poisson(rng.gamma(dispersion, np.maximum(mean, 1e-12) / dispersion)).astype(np.float32)


def spot_counts(
    rng: np.random.Generator,
    profiles: pd.DataFrame,
    states_per_spot: pd.DataFrame,
    umi_per_cell: float = 2500.0,
    dispersion: float = 15.0,
) -> pd.DataFrame:
    """Counts of each spot from the states of the cells whose centres it holds.

    ``states_per_spot`` counts cells per spot (rows) and state (columns). Each cell contributes its
    state's profile scaled by its type's RNA content; spot capture efficiency varies (log-normal).
    """
    content = np.array([RNA_CONTENT[_type_of(s)] for s in profiles.index])
    expected = (states_per_spot[profiles.index].to_numpy() * content) @ profiles.to_numpy()
    capture = rng.lognormal(0, 0.25, len(states_per_spot))[:, None]
    counts = _negative_binomial(rng, expected * umi_per_cell * capture, dispersion)
    return pd.DataFrame(counts, index=states_per_spot.index, columns=profiles.columns)


def reference(rng: np.random.Generator, profiles: pd.DataFrame, cells_per_state: int = 150, umi: float = 3000.0) -> ad.AnnData:
    """A single-cell reference: raw counts with ``obs["cell_type"]`` and ``obs["cell_state"]``."""
    states = np.repeat(profiles.index.to_numpy(), cells_per_state)
    library = rng.lognormal(np.log(umi), 0.3, len(states)) * np.array([RNA_CONTENT[_type_of(s)] for s in states])
    counts = _negative_binomial(rng, profiles.loc[states].to_numpy() * library[:, None], 5.0)
    obs = pd.DataFrame(
        {
            "cell_type": pd.Categorical([_type_of(s) for s in states], categories=CELL_TYPES),
            "cell_state": pd.Categorical(states, categories=profiles.index),
        },
        index=[f"cell_{i:05d}" for i in range(len(states))],
    )
    return ad.AnnData(sparse.csr_matrix(counts), obs=obs, var=pd.DataFrame(index=profiles.columns))


def _type_of(state: str) -> str:
    return next(t for t, states in CELL_STATES.items() if state in states)
