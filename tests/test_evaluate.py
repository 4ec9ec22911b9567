"""tl.spot_pearson: the spot agreement (mean per-type Pearson r) of a sample's spots table."""

import numpy as np
import pandas as pd
import pytest

import histocell_sd as hc
from histocell_sd import InvalidInputError


def _sample(predicted: np.ndarray, true: np.ndarray):
    n = len(true)
    centers = pd.DataFrame({"x": 20.0 + 60.0 * np.arange(n), "y": 40.0}, index=[f"s{i}" for i in range(n)])
    columns = ["tumor", "stromal", "lymphocyte"]
    sdata = hc.io.from_arrays(np.full((80, 60 * n + 40, 3), 200, np.uint8), 1.0, spot_centers=centers,
                              proportions=pd.DataFrame(true, index=centers.index, columns=columns))
    table = sdata.tables["table"]
    table.obsm["true_proportions"] = table.obsm["proportions"]
    table.obsm["histocell_proportions"] = pd.DataFrame(predicted, index=table.obs_names, columns=columns)
    return sdata


def test_spot_pearson_is_the_mean_of_per_type_r_over_spots_with_nuclei():
    rng = np.random.default_rng(0)
    true = rng.dirichlet(np.ones(3), size=8)
    predicted = 0.7 * true + 0.3 * rng.dirichlet(np.ones(3), size=8)
    predicted[2] = np.nan  # a spot without nuclei is skipped
    keep = np.arange(8) != 2
    expected = np.mean([np.corrcoef(predicted[keep, j], true[keep, j])[0, 1] for j in range(3)])
    assert hc.tl.spot_pearson(_sample(predicted, true)) == pytest.approx(expected, rel=1e-6)


def test_spot_pearson_bad_inputs():
    true = np.random.default_rng(1).dirichlet(np.ones(3), size=4)
    sdata = _sample(true, true)
    # own case spot_pearson_missing_table: a missing spots table was a bare KeyError
    with pytest.raises(InvalidInputError, match="visium"):
        hc.tl.spot_pearson(sdata, spots_table_key="visium")
    with pytest.raises(InvalidInputError, match="no obsm\\['cell2location'\\]"):
        hc.tl.spot_pearson(sdata, true_key="cell2location")
    with pytest.raises(InvalidInputError, match="SpatialData"):
        hc.tl.spot_pearson(sdata.tables["table"])


def test_labels_of_two_series_are_paired_by_their_index():
    # own case cm_index_order: two Series of the same nuclei in another order were compared by position
    y_true = pd.Series(["a", "b", "a", None], index=["n1", "n2", "n3", "n4"])
    y_pred = pd.Series(["b", "a", "a", "b"], index=["n2", "n1", "n3", "n4"])  # all right, other order
    assert hc.tl.classification_scores(y_true, y_pred)["accuracy"] == 1.0
    assert hc.tl.classification_scores(y_true.to_numpy(), ["a", "b", "a", "b"])["accuracy"] == 1.0
    with pytest.raises(InvalidInputError, match="y_true has 4 labels and y_pred 3"):
        hc.tl.classification_scores(y_true, ["a", "b", "a"])
