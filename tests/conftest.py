"""Shared fixtures: small synthetic slides generated once per test session."""

import matplotlib
import pytest

matplotlib.use("Agg")


@pytest.fixture(scope="session")
def tiny_slide():
    """The ``"tiny"`` synthetic slide (≈ 50 spots) and its reference; treat as read-only."""
    from histocell_sd.datasets import synthetic_visium

    return synthetic_visium(seed=3, preset="tiny", progress=False)


SIMULATED_CONFUSION = {"fibroblast": "endothelial", "endothelial": "fibroblast", "lymphocyte": "macrophage",
                       "macrophage": "lymphocyte", "tumor": "macrophage"}


def simulate_nucleus_table(sdata, seed: int = 0, signal: float = 2.4, confusion: float = 1.2, noise: float = 1.1):
    """Stand-in for ``tl.predict``: nuclei circles + ``"histocell"`` table from the truth nuclei.

    Probabilities are the softmax of noisy logits favouring each nucleus' true type and its look-alike
    (fibroblast/endothelial, lymphocyte/macrophage): ~70 % top-1 accuracy. Also writes the spots'
    ``obsm["histocell_proportions"]`` (mean nucleus probability per spot).
    """
    import anndata as ad
    import numpy as np
    import pandas as pd
    from spatialdata.models import ShapesModel, TableModel
    from spatialdata.transformations import Identity

    from histocell_sd.datasets import CELL_TYPES

    truth = sdata.tables["truth_nuclei"]
    types = list(CELL_TYPES)
    rng = np.random.default_rng(seed)
    true = pd.Categorical(truth.obs["cell_type"].astype(str), categories=types).codes
    similar = np.array([types.index(SIMULATED_CONFUSION[t]) for t in types])
    logits = rng.normal(0, noise, (len(true), len(types)))
    logits[np.arange(len(true)), true] += signal
    logits[np.arange(len(true)), similar[true]] += confusion
    p = np.exp(logits - logits.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    xy = np.asarray(truth.obsm["spatial"], dtype=np.float64)
    names = pd.Index(truth.obs_names.astype(str), name="nucleus_id")
    sdata.shapes["nuclei"] = ShapesModel.parse(xy, geometry=0, radius=np.full(len(xy), 8.0), index=names,
                                               transformations={"global": Identity()})
    obs = pd.DataFrame(index=names.rename(None))
    obs["region"] = pd.Categorical(["nuclei"] * len(obs), categories=["nuclei"])
    obs["nucleus_id"] = obs.index.to_numpy()
    obs["spot_id"] = truth.obs["spot_id"].to_numpy()
    obs["cell_type"] = pd.Categorical(np.asarray(types)[p.argmax(axis=1)], categories=types)
    proba = pd.DataFrame(p, index=obs.index, columns=types)
    table = ad.AnnData(obs=obs, obsm={"spatial": xy, "cell_type_proba": proba})
    sdata.tables["histocell"] = TableModel.parse(table, region="nuclei", region_key="region", instance_key="nucleus_id")
    spots = sdata.tables["table"]
    inside = obs["spot_id"].notna().to_numpy()
    mean = proba[inside].groupby(obs.loc[inside, "spot_id"].to_numpy()).mean()
    spots.obsm["histocell_proportions"] = mean.reindex(spots.obs_names).fillna(1.0 / len(types))
    return sdata


@pytest.fixture
def tiny_predicted():
    """A fresh ``"tiny"`` slide (seed 3) with the simulated nucleus predictions, and its reference; mutable."""
    from histocell_sd.datasets import synthetic_visium

    sdata, reference = synthetic_visium(seed=3, preset="tiny", progress=False)
    return simulate_nucleus_table(sdata, seed=3), reference
