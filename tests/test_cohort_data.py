"""The synthetic cohort: determinism, data layout and the planted effects."""

import numpy as np
import pandas as pd
import pytest
from scipy.stats import spearmanr

from histocell_sd import InvalidInputError, tl
from histocell_sd._constants import CELL_TYPE_PROBA_KEY, EMBEDDING_KEY
from histocell_sd.datasets import CELL_TYPES, synthetic_cohort


@pytest.fixture(scope="module")
def cohort():
    return synthetic_cohort(n_samples=30, seed=0, n_nuclei=1500)


def test_layout_and_outputs(cohort):
    samples, clinical, truth = cohort
    assert list(samples) == [f"sample_{i:02d}" for i in range(30)]
    sdata = samples["sample_00"]
    table = sdata.tables["histocell"]
    assert sdata.attrs["mpp"] == 0.5 and len(sdata.shapes["nuclei"]) == table.n_obs == 1500
    assert list(table.obsm[CELL_TYPE_PROBA_KEY].columns) == list(CELL_TYPES)
    np.testing.assert_allclose(table.obsm[CELL_TYPE_PROBA_KEY].sum(axis=1), 1.0)
    assert (table.obsm[CELL_TYPE_PROBA_KEY].idxmax(axis=1).to_numpy() == table.obs["cell_type"].astype(str).to_numpy()).all()
    assert table.obsm[EMBEDDING_KEY].dtype == np.float32
    for key in ("cell_type", "cell_state", "compartment"):
        assert isinstance(table.obs[key].dtype, pd.CategoricalDtype)
    assert list(clinical.columns) == ["duration", "event", "response", "responder", "phenotype"]
    assert clinical.index.equals(pd.Index(list(samples)))
    assert (clinical["duration"] > 0).all() and 0.3 < clinical["event"].mean() < 0.95
    assert truth["prognostic_indicator"] == "infiltration_lymphocyte_in_tumor"
    assert truth["phenotype_population"] == {"cell_type": "tumor", "cell_state": "tumor_proliferative"}


def test_deterministic_per_seed():
    a = synthetic_cohort(n_samples=3, seed=7, n_nuclei=300)
    b = synthetic_cohort(n_samples=3, seed=7, n_nuclei=300)
    c = synthetic_cohort(n_samples=3, seed=8, n_nuclei=300)
    pd.testing.assert_frame_equal(a[1], b[1])
    np.testing.assert_array_equal(a[0]["sample_02"].tables["histocell"].obsm["spatial"], b[0]["sample_02"].tables["histocell"].obsm["spatial"])
    np.testing.assert_array_equal(a[0]["sample_01"].tables["histocell"].obsm[EMBEDDING_KEY], b[0]["sample_01"].tables["histocell"].obsm[EMBEDDING_KEY])
    assert not a[1].equals(c[1])


def test_planted_effects_are_recoverable(cohort):
    samples, clinical, truth = cohort
    ind = tl.spatial_indicators(samples, n_perms=10, progress=False).to_df()
    planted = ind[truth["prognostic_indicator"]]
    np.testing.assert_allclose(planted, truth["latent"][truth["prognostic_indicator"]])
    assert spearmanr(planted, truth["hazard"])[0] < -0.99  # exclusion (low infiltration) → high hazard
    assert spearmanr(planted, clinical["duration"])[0] > 0.3
    ph = ind[truth["phenotype_indicator"]]
    assert ph[clinical["phenotype"] == 1].mean() > ph[clinical["phenotype"] == 0].mean()
    assert spearmanr(ind[truth["response_indicator"]], clinical["response"])[0] > 0.6
    for name in truth["null_indicators"]:
        assert name in ind.columns


def test_no_effect_cohort():
    samples, clinical, truth = synthetic_cohort(n_samples=30, seed=1, n_nuclei=400, effect=False)
    assert truth["effect"] is False
    assert truth["hazard"].nunique() == 1
    assert abs(spearmanr(truth["latent"][truth["response_indicator"]], clinical["response"])[0]) < 0.6


def test_optional_image():
    samples, _, _ = synthetic_cohort(n_samples=2, seed=0, n_nuclei=200, image=True)
    img = samples["sample_00"].images["he"]
    assert img.shape[0] == 3 and img.dtype == np.uint8


def test_truth_as_predictions_with_given_probabilities(tiny_predicted):
    from histocell_sd import InvalidInputError
    from histocell_sd.datasets import confused_probabilities, truth_as_predictions

    sdata, _ = tiny_predicted  # written by truth_as_predictions(sdata, proba=confused_probabilities(sdata, seed=3))
    proba = confused_probabilities(sdata, seed=3)
    truth = sdata.tables["truth_nuclei"].obs["cell_type"].astype(str).to_numpy()
    accuracy = (proba.to_numpy().argmax(axis=1) == pd.Categorical(truth, categories=CELL_TYPES).codes).mean()
    assert 0.55 < accuracy < 0.85  # a confused stand-in, not the truth
    nuclei, spots = sdata.tables["histocell"], sdata.tables["table"]
    np.testing.assert_array_equal(nuclei.obsm[CELL_TYPE_PROBA_KEY].to_numpy(), proba.to_numpy())
    assert (nuclei.obs["cell_type"].cat.codes.to_numpy() == proba.to_numpy().argmax(axis=1)).all()
    means = spots.obsm["histocell_proportions"]
    held = nuclei.obs["spot_id"].dropna().unique()
    np.testing.assert_allclose(means.loc[held].sum(axis=1), 1, atol=1e-6)
    assert means.drop(index=held).isna().all().all()  # spots without nuclei: undefined, as in tl.predict
    with pytest.raises(InvalidInputError, match="one row per truth nucleus"):
        truth_as_predictions(sdata, proba=proba.iloc[:10])


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"n_samples": 3.5}, "n_samples must be a whole number"), ({"n_nuclei": 50}, "n_nuclei must be a whole number ≥ 100"),
    ({"mpp": 0}, "mpp"), ({"hazard_ratio": 0}, "hazard_ratio must be a positive number"),
    ({"censoring": 1.0}, r"censoring .* \[0, 1\)"), ({"censoring": -0.1}, "censoring"),
])
def test_bad_arguments_are_named(kwargs, message):
    # own case cohort_args
    # probe: n_samples=3.5 TypeError, mpp=0 ZeroDivisionError; hazard_ratio=0 gave durations of 0, censoring=1 no events
    with pytest.raises(InvalidInputError, match=message):
        synthetic_cohort(**kwargs)
