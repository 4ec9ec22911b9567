"""Cell graph (squidpy on predictions), tissue niches and spatial indicators."""

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import squidpy as sq
from sklearn.metrics import adjusted_rand_score
from spatialdata import SpatialData

from histocell_sd import tl
from histocell_sd._errors import InvalidInputError
from histocell_sd.datasets import CELL_TYPES, truth_as_predictions
from histocell_sd.datasets._cohort import lymphocyte_infiltration


def predicted_slide(sdata, type_noise=0.0):
    """A copy of a synthetic slide with the prediction-layout table built from the truth ("perfect predictions")."""
    out = SpatialData(images=dict(sdata.images), labels=dict(sdata.labels), shapes=dict(sdata.shapes), tables={k: v.copy() for k, v in sdata.tables.items()})
    out.attrs.update(sdata.attrs)
    truth_as_predictions(out, type_noise=type_noise, seed=1)
    return out


@pytest.fixture(scope="module")
def slide(tiny_slide):
    return predicted_slide(tiny_slide[0])


def _hand_made(spacing_um=10.0, n=100, mpp=0.5):
    """A 1 mm × 1 mm lattice: left half tumour, right half lymphocyte, known counts and areas."""
    g = np.arange(n) * spacing_um
    xx, yy = np.meshgrid(g, g)
    xy = np.c_[xx.ravel(), yy.ravel()]
    types = np.where(xy[:, 0] < 500, "tumor", "lymphocyte")
    types[(xy[:, 0] == 250) & (xy[:, 1] < 200)] = "macrophage"  # 20 macrophages inside the tumour
    obs = pd.DataFrame({"cell_type": pd.Categorical(types, categories=["tumor", "lymphocyte", "macrophage"])}, index=[f"n{i}" for i in range(len(xy))])
    obs["cell_state"] = pd.Categorical(np.where(types == "tumor", np.where(xy[:, 1] < 250, "tumor_proliferative", "tumor_quiescent"), types))
    return ad.AnnData(obs=obs, obsm={"spatial": xy / mpp}, uns={"mpp": mpp})


@pytest.mark.parametrize("method", ["delaunay", "radius", "knn"])
def test_cell_graph_is_um_aware(slide, method):
    table = tl.cell_graph(slide, method=method, radius_um=25.0, copy=True)
    dist = table.obsp["spatial_distances"]
    assert table.obsp["spatial_connectivities"].nnz > table.n_obs
    if method != "knn":
        assert dist.data.max() * slide.attrs["mpp"] <= 25.0 + 1e-6
    else:
        assert np.all(np.diff(table.obsp["spatial_connectivities"].indptr) == 6)
    assert "spatial_connectivities" not in slide.tables["histocell"].obsp  # copy=True left the table alone


def test_squidpy_runs_on_the_nuclei_table(slide):
    table = slide.tables["histocell"].copy()
    table.uns["mpp"] = slide.attrs["mpp"]
    assert tl.cell_graph(table) is None
    sq.gr.nhood_enrichment(table, cluster_key="cell_type", n_perms=50, seed=0, show_progress_bar=False, n_jobs=1)
    z = table.uns["cell_type_nhood_enrichment"]["zscore"]
    types = list(table.obs["cell_type"].cat.categories)
    assert z[types.index("tumor"), types.index("tumor")] > 5  # tumour nests cluster
    sq.gr.interaction_matrix(table, cluster_key="cell_type")
    sq.gr.centrality_scores(table, cluster_key="cell_type", n_jobs=1)
    sub = table[np.random.default_rng(0).choice(table.n_obs, min(table.n_obs, 1500), replace=False)].copy()
    sq.gr.co_occurrence(sub, cluster_key="cell_type", interval=10)
    assert "cell_type_co_occurrence" in sub.uns
    assert table.uns["cell_type_interactions"].shape == (len(types), len(types))


def test_squidpy_runs_via_the_spatialdata(slide):
    tl.cell_graph(slide, nuclei_table_key="histocell", method="delaunay", radius_um=30.0)
    sq.gr.nhood_enrichment(slide, cluster_key="cell_type", table_key="histocell", n_perms=20, seed=0, show_progress_bar=False, n_jobs=1)
    sq.gr.interaction_matrix(slide, cluster_key="cell_type", table_key="histocell")
    sq.gr.centrality_scores(slide, cluster_key="cell_type", table_key="histocell", n_jobs=1)
    table = slide.tables["histocell"]
    assert {"cell_type_nhood_enrichment", "cell_type_interactions", "cell_type_centrality_scores"} <= set(table.uns)
    assert table.uns["spatial_neighbors"]["histocell"]["radius_um"] == 30.0


def test_cell_graph_copy_and_knn(slide):
    table = slide.tables["histocell"]
    graph = tl.cell_graph(slide, method="knn", n_neighbors=4, key_added="knn4", copy=True)
    assert "knn4_connectivities" not in table.obsp and "knn4_connectivities" in graph.obsp
    assert (np.asarray(graph.obsp["knn4_connectivities"].sum(axis=1)).ravel() == 4).all()
    assert graph.uns["knn4_neighbors"]["histocell"]["n_neighbors"] == 4


def test_cell_graph_rejects_bad_input(slide):
    with pytest.raises(InvalidInputError, match="Unknown graph method"):
        tl.cell_graph(slide, method="voronoi")
    with pytest.raises(InvalidInputError, match="No table"):
        tl.cell_graph(slide, nuclei_table_key="nope")
    with pytest.raises(InvalidInputError, match="radius_um"):
        tl.cell_graph(slide, radius_um=-1)
    table = slide.tables["histocell"].copy()
    table.uns.pop("mpp", None)
    table.uns.pop("histocell", None)
    with pytest.raises(InvalidInputError, match="µm per pixel"):
        tl.cell_graph(table)


@pytest.mark.parametrize("noise", [0.0, 0.15])
def test_niches_recover_compartments(tiny_slide, noise):
    sdata = predicted_slide(tiny_slide[0], type_noise=noise)
    tl.tissue_architecture(sdata, n_niches=3)
    obs = sdata.tables["histocell"].obs
    known = obs["compartment"].notna()
    ari = adjusted_rand_score(obs.loc[known, "compartment"], obs.loc[known, "niche"])
    assert ari >= 0.6, ari
    assert isinstance(obs["niche"].dtype, pd.CategoricalDtype)
    assert any(name.startswith("tumor") for name in obs["niche"].cat.categories)
    regions = sdata.shapes["niche_regions"]
    assert set(regions["niche"].astype(str)) == set(obs["niche"].cat.categories)
    assert regions.geometry.is_valid.all()


def test_tissue_architecture_copy_leaves_the_input_unchanged(tiny_slide):
    sdata = predicted_slide(tiny_slide[0])
    result = tl.tissue_architecture(sdata, n_niches=3, copy=True)
    assert "niche" not in sdata.tables["histocell"].obs and "niche_regions" not in sdata.shapes
    assert tl.tissue_architecture(sdata, n_niches=3) is None
    pd.testing.assert_series_equal(result.tables["histocell"].obs["niche"], sdata.tables["histocell"].obs["niche"])
    assert result.shapes["niche_regions"].equals(sdata.shapes["niche_regions"])


def test_niches_plot(tiny_slide):
    import matplotlib.pyplot as plt

    from histocell_sd import pl

    sdata = predicted_slide(tiny_slide[0])
    tl.tissue_architecture(sdata)  # automatic number of niches
    assert 2 <= sdata.tables["histocell"].obs["niche"].nunique() <= 8
    ax = pl.niches(sdata)
    assert ax is not None
    plt.close("all")


def test_tissue_architecture_rejects_bad_input(slide):
    with pytest.raises(InvalidInputError, match="cell_type"):
        tl.tissue_architecture(slide, cluster_key="missing")
    with pytest.raises(InvalidInputError, match="radius_um"):
        tl.tissue_architecture(slide, radius_um=0)


def test_indicators_on_a_hand_made_layout():
    adata = _hand_made()
    ind = tl.spatial_indicators({"a": adata}, n_perms=20, progress=False, area_method="grid", grid_um=50.0)
    v = ind.to_df().loc["a"]
    assert ind.obs.loc["a", "tissue_area_mm2"] == pytest.approx(1.0)
    assert v["frac_tumor"] == pytest.approx((5000 - 20) / 10000)
    assert v["frac_macrophage"] == pytest.approx(20 / 10000)
    assert v["density_lymphocyte"] == pytest.approx(5000.0)
    assert v["frac_tumor_proliferative"] == pytest.approx(25 * 50 / 10000 - 20 / 10000)
    assert v["nn_dist_tumor__tumor_um"] == pytest.approx(10.0)
    assert v["nn_dist_macrophage__macrophage_um"] == pytest.approx(10.0)
    assert v["nn_dist_macrophage__lymphocyte_um"] == pytest.approx(250.0)
    assert v["nhood_z_tumor__tumor"] > 10 and v["nhood_z_tumor__lymphocyte"] < -10
    assert v["cooc_tumor__lymphocyte_30um"] < 0.1 and v["cooc_lymphocyte__lymphocyte_30um"] > 1.8
    assert v["infiltration_lymphocyte_in_tumor"] == pytest.approx(0.0)
    assert "niche_frac_tumor-rich" not in ind.var_names
    assert set(ind.var["family"]) >= {"fraction", "density", "nhood_z", "cooccurrence", "nn_distance", "infiltration"}
    assert "hull" in tl.spatial_indicators(adata, progress=False, area_method="hull").uns["spatial_indicators"]["area_method"]


def test_infiltration_matches_reference():
    rng = np.random.default_rng(0)
    xy = rng.uniform(0, 400, (1500, 2))
    types = np.where(np.linalg.norm(xy - 200, axis=1) < 120, "tumor", "fibroblast").astype(object)
    types[rng.random(1500) < 0.2] = "lymphocyte"
    adata = ad.AnnData(obs=pd.DataFrame({"cell_type": pd.Categorical(types)}, index=[str(i) for i in range(1500)]), obsm={"spatial": xy}, uns={"mpp": 1.0})
    ind = tl.spatial_indicators([adata], progress=False, n_perms=5)
    got = float(ind[:, "infiltration_lymphocyte_in_tumor"].X[0, 0])
    assert got == pytest.approx(lymphocyte_infiltration(xy, types))
    assert 0.05 < got < 0.95


def test_infiltration_unknown_cell_type_refused():
    adata = _hand_made()
    with pytest.raises(InvalidInputError, match=r"unknown cell types \['tcell'\].*\['tumor', .*'lymphocyte'"):
        tl.spatial_indicators({"a": adata}, infiltration=("tcell", "tumor"), n_perms=0, progress=False)
    with pytest.raises(InvalidInputError, match="must be a pair"):
        tl.spatial_indicators({"a": adata}, infiltration="lymphocyte", n_perms=0, progress=False)
    ind = tl.spatial_indicators({"a": adata}, infiltration=("macrophage", "tumor"), n_perms=0, progress=False)
    assert "infiltration_macrophage_in_tumor" in ind.var_names
    assert ind.uns["spatial_indicators"]["infiltration"] == ["macrophage", "tumor"]


def test_indicators_samples_forms_and_niches(slide):
    tl.tissue_architecture(slide, n_niches=3)
    one = tl.spatial_indicators(slide, progress=False, n_perms=10)
    assert one.obs_names.tolist() == [slide.attrs["sample_id"]]
    assert any(c.startswith("niche_frac_") for c in one.var_names)
    both = tl.spatial_indicators({"x": slide, "y": slide.tables["histocell"]}, mpp=slide.attrs["mpp"], progress=False, n_perms=10)
    assert both.obs_names.tolist() == ["x", "y"]
    np.testing.assert_allclose(both.X[0], both.X[1], equal_nan=True)  # same seed, same permutations
    for t in CELL_TYPES:
        assert f"frac_{t}" in both.var_names
    with pytest.raises(InvalidInputError, match="cell_type"):
        tl.spatial_indicators(slide, cluster_key="nope", progress=False)
    with pytest.raises(InvalidInputError):
        tl.spatial_indicators([], progress=False)
    with pytest.raises(InvalidInputError, match="area_method"):
        tl.spatial_indicators(slide, area_method="alpha", progress=False)
