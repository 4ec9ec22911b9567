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
def test_cell_graph_is_um_aware(slide, method, tmp_path):
    table = tl.cell_graph(slide, method=method, radius_um=25.0, copy=True)
    table.write_h5ad(tmp_path / "graph.h5ad")  # own case graph_write: delaunay's params held a tuple anndata cannot write
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


@pytest.mark.parametrize("method", ["delaunay", "radius"])
def test_cell_graph_in_microns(slide, method):
    # own case graph_distance_units
    # API review: obsp distances were always pixels, so squidpy tools run on the graph gave pixel results
    px = tl.cell_graph(slide, method=method, radius_um=30.0, copy=True)
    um = tl.cell_graph(slide, method=method, radius_um=30.0, spatial_key="spatial_um", copy=True)
    assert (px.obsp["spatial_connectivities"] != um.obsp["spatial_connectivities"]).nnz == 0
    mpp = slide.attrs["mpp"]
    np.testing.assert_allclose(um.obsp["spatial_distances"].toarray(), px.obsp["spatial_distances"].toarray() * mpp, rtol=1e-5)
    assert (px.uns["spatial_neighbors"]["histocell"]["distance_unit"], um.uns["spatial_neighbors"]["histocell"]["distance_unit"]) == ("px", "um")
    bare = slide.tables["histocell"].copy()
    bare.uns.pop("histocell")  # no µm/px: needed for pixels only
    tl.cell_graph(bare, method=method, radius_um=30.0, spatial_key="spatial_um")
    assert (bare.obsp["spatial_connectivities"] != um.obsp["spatial_connectivities"]).nnz == 0
    with pytest.raises(InvalidInputError, match=r"spatial_key must be 'spatial' \(pixels\) or 'spatial_um'"):
        tl.cell_graph(slide, spatial_key="X_umap", copy=True)


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
    # own case ta_bad_settings: these wrote the niches and then failed on the regions (half-written), or truncated
    table = slide.tables["histocell"]
    before = (list(table.obs.columns), list(table.obsm), list(slide.shapes))
    for kwargs, message in [({"region_buffer_um": 0}, "region_buffer_um"), ({"simplify_um": -1}, "simplify_um"),
                            ({"smooth": -1}, "smooth"), ({"n_niches": 2.7}, "n_niches")]:
        with pytest.raises(InvalidInputError, match=message):
            tl.tissue_architecture(slide, **kwargs)
    # own case ta_key_added_collision: key_added="cell_type" replaced the predictions with niche names
    for key in ("cell_type", "spot_id", "nucleus_id"):
        with pytest.raises(InvalidInputError, match=f"key_added='{key}' would overwrite obs"):
            tl.tissue_architecture(slide, key_added=key)
    assert (list(table.obs.columns), list(table.obsm), list(slide.shapes)) == before


def test_niche_names_and_cell_types_can_be_written(slide, tmp_path):
    # own case niche_colours
    # own case niche_slash: a "tumor/lymphocyte-mixed" niche named a key of uns[...]["composition"]: write_zarr failed
    from histocell_sd.io import write_zarr
    from histocell_sd.tl._spatial.architecture import _names

    names, _ = _names(np.array([[0.4, 0.35, 0.25]]), np.array([0]), ["tumor", "lymphocyte", "fibroblast"])
    assert list(names) == ["tumor+lymphocyte-mixed"]
    out = tl.tissue_architecture(slide, n_niches=6, copy=True)
    niches = out.tables["histocell"]
    assert not any("/" in name for name in niches.obs["niche"].cat.categories)
    # own case niche_colors: no uns["niche_colors"], so scanpy and spatialdata-plot coloured niches unlike pl.niches
    assert len(niches.uns["niche_colors"]) == len(niches.obs["niche"].cat.categories)
    # probe: a "tumor-rich" niche was drawn cyan beside yellow tumour cells; a niche rich in a type takes its colour,
    # the other niches colours no type has, and no two niches share one
    type_colour = dict(zip(niches.obs["cell_type"].cat.categories, niches.uns["cell_type_colors"]))
    niche_colour = dict(zip(niches.obs["niche"].cat.categories, niches.uns["niche_colors"]))
    rich = {n: c for n, c in niche_colour.items() if n.endswith("-rich")}
    assert rich and all(c == type_colour[n.removesuffix("-rich")] for n, c in rich.items())
    assert not set(niche_colour[n] for n in niche_colour if n not in rich) & set(type_colour.values())
    assert len(set(niche_colour.values())) == len(niche_colour)
    write_zarr(SpatialData(tables={"histocell": out.tables["histocell"]}, attrs=dict(slide.attrs)), tmp_path / "niches.zarr")
    slashed = out.tables["histocell"].copy()
    slashed.obs["cell_type"] = slashed.obs["cell_type"].cat.rename_categories({"lymphocyte": "T/NK"})
    with pytest.raises(InvalidInputError, match=r"cell types in obs\['cell_type'\] \['T/NK'\] contain '/'"):
        tl.tissue_architecture(SpatialData(tables={"histocell": slashed}, attrs=dict(slide.attrs)), key_added="niche2")


def test_resegmenting_removes_the_niche_regions_drawn_from_the_old_nuclei(tiny_slide):
    # own case stale_niches: segment -> predict -> tissue_architecture -> segment again kept shapes["niche_regions"]
    # (pl.niches drew the old regions over the new nuclei, io.validate passed)
    from histocell_sd import pp

    sdata = predicted_slide(tiny_slide[0])
    pp.store_nuclei(sdata, np.asarray(sdata.labels["truth_labels"]), overwrite=True)
    sdata.tables["histocell"].obs["cell_type"] = sdata.tables["truth_nuclei"].obs["cell_type"].to_numpy()
    tl.tissue_architecture(sdata, n_niches=3)
    assert "niche_regions" in sdata.shapes
    with pytest.warns(UserWarning, match=r"Removed the niche regions \['niche_regions'\]"):
        pp.store_nuclei(sdata, np.asarray(sdata.labels["truth_labels"]))
    assert "niche_regions" not in sdata.shapes and "niche" not in sdata.tables["histocell"].obs


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


def test_a_state_named_like_its_type_leaves_the_type_fraction():
    # own case indicator_state_shadows_type: frac_<state> of a type's own state overwrote frac_<type>
    adata = _hand_made()
    states = adata.obs["cell_state"].astype(str).to_numpy()
    quiescent = (states == "tumor_quiescent").sum()
    states[np.flatnonzero(adata.obs["cell_type"] == "macrophage")[:10]] = "tumor_quiescent"  # state argmax need not follow type
    adata.obs["cell_state"] = pd.Categorical(states)
    ind = tl.spatial_indicators({"a": adata}, n_perms=0, progress=False)
    assert ind.to_df().loc["a", "frac_macrophage"] == pytest.approx(20 / 10000)  # was 10 / 10000, the state's share
    assert ind.to_df().loc["a", "frac_tumor_quiescent"] == pytest.approx((quiescent + 10) / 10000)


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
    # cases.md: si_bad_infiltration
    adata = _hand_made()
    with pytest.raises(InvalidInputError, match=r"unknown cell types \['tcell'\].*\['tumor', .*'lymphocyte'"):
        tl.spatial_indicators({"a": adata}, infiltration=("tcell", "tumor"), n_perms=0, progress=False)
    with pytest.raises(InvalidInputError, match="must be a pair"):
        tl.spatial_indicators({"a": adata}, infiltration="lymphocyte", n_perms=0, progress=False)
    ind = tl.spatial_indicators({"a": adata}, infiltration=("macrophage", "tumor"), n_perms=0, progress=False)
    assert "infiltration_macrophage_in_tumor" in ind.var_names
    assert ind.uns["spatial_indicators"]["infiltration"] == ["macrophage", "tumor"]


def test_indicators_samples_forms_and_niches(slide):
    # own case indicators_mpp_override
    tl.tissue_architecture(slide, n_niches=3)
    one = tl.spatial_indicators(slide, progress=False, n_perms=10)
    assert one.obs_names.tolist() == [slide.attrs["sample_id"]]
    assert any(c.startswith("niche_frac_") for c in one.var_names)
    both = tl.spatial_indicators({"x": slide, "y": slide.tables["histocell"]}, mpp=slide.attrs["mpp"], progress=False, n_perms=10)
    assert both.obs_names.tolist() == ["x", "y"]
    np.testing.assert_allclose(both.X[0], both.X[1], equal_nan=True)  # same seed, same permutations
    # probe: mpp= meant for an AnnData rescaled every sample (density ×4 at mpp=0.25 on a 0.5 µm/px slide)
    with pytest.raises(InvalidInputError, match=r"Sample 'x' declares 0\.5 µm per pixel \(sdata\.attrs\['mpp'\]\), but mpp=0\.25"):
        tl.spatial_indicators({"x": slide, "y": slide.tables["histocell"]}, mpp=0.25, progress=False, n_perms=0)
    with pytest.raises(InvalidInputError, match="declares"):
        tl.cell_graph(slide, mpp=0.25)
    for t in CELL_TYPES:
        assert f"frac_{t}" in both.var_names
    with pytest.raises(InvalidInputError, match="cell_type"):
        tl.spatial_indicators(slide, cluster_key="nope", progress=False)
    with pytest.raises(InvalidInputError):
        tl.spatial_indicators([], progress=False)
    with pytest.raises(InvalidInputError, match="area_method"):
        tl.spatial_indicators(slide, area_method="alpha", progress=False)
    # own case si_bad_settings: these gave all-NaN z-scores or skipped the states without a word
    for kwargs, message in [({"graph_radius_um": 0}, "graph_radius_um"), ({"graph_radius_um": float("nan")}, "graph_radius_um"),
                            ({"n_perms": -3}, "n_perms"), ({"n_perms": 2.5}, "n_perms"), ({"state_key": "nope"}, "obs\\['nope'\\]")]:
        with pytest.raises(InvalidInputError, match=message):
            tl.spatial_indicators(slide, progress=False, **kwargs)


def test_cell_graph_on_coincident_or_collinear_nuclei():
    # own case cg_degenerate_points: Qhull raised QhullError
    for xy in (np.full((10, 2), 100.0), np.c_[np.arange(10.0), 2 * np.arange(10.0)]):
        adata = ad.AnnData(obs=pd.DataFrame(index=[str(i) for i in range(10)]), obsm={"spatial": xy}, uns={"mpp": 0.5})
        with pytest.raises(InvalidInputError, match="coincide or lie on one line"):
            tl.cell_graph(adata)
        assert tl.cell_graph(adata, method="knn", n_neighbors=3, copy=True).obsp["spatial_connectivities"].nnz > 0


# ------------------------------------------------------------- replicas of library functions, pinned to the library
def _typed(xy, codes, names):
    obs = pd.DataFrame({"cell_type": pd.Categorical.from_codes(codes, names)}, index=[str(k) for k in range(len(xy))])
    return ad.AnnData(obs=obs, obsm={"spatial": np.asarray(xy, dtype=float)})


def _clustered(n=800, seed=0):
    """Points in 300 × 300 µm, left half type 0, right half type 1, a random 20 % type 2; type 3 absent."""
    rng = np.random.default_rng(seed)
    xy = rng.uniform(0, 300, (n, 2))
    t = np.where(xy[:, 0] < 150, 0, 1)
    t[rng.random(n) < 0.2] = 2
    return xy, t, ["tumor", "lymphocyte", "fibroblast", "macrophage"]


def _edge_set(matrix) -> set:
    coo = matrix.tocoo()
    return {(int(a), int(b)) for a, b in zip(coo.row, coo.col) if a < b}


@pytest.mark.parametrize("max_len", [None, 25.0])
def test_delaunay_edges_equal_squidpy_and_scipy(max_len):
    from scipy.spatial import Delaunay

    from histocell_sd.tl._spatial.graph import delaunay_edges

    xy, t, names = _clustered()
    i, j = delaunay_edges(xy, max_len)
    ours = set(zip(i.tolist(), j.tolist()))
    assert (i < j).all() and len(ours) == len(i)
    adata = _typed(xy, t, names)
    sq.gr.spatial_neighbors(adata, coord_type="generic", delaunay=True, radius=None if max_len is None else (0.0, max_len))
    assert ours == _edge_set(adata.obsp["spatial_connectivities"])
    s = Delaunay(xy).simplices  # the triangles' sides, independently of scipy's neighbour CSR
    sides = {tuple(sorted(map(int, e))) for e in np.concatenate([s[:, [0, 1]], s[:, [1, 2]], s[:, [0, 2]]])}
    if max_len is not None:
        sides = {(a, b) for a, b in sides if np.linalg.norm(xy[a] - xy[b]) <= max_len}
    assert ours == sides and len(ours) > 2 * len(xy)


def test_radius_adjacency_equals_sklearn_radius_graph():
    from sklearn.neighbors import radius_neighbors_graph

    from histocell_sd.tl._spatial.graph import radius_adjacency

    xy, *_ = _clustered()
    for include_self in (False, True):
        ours = radius_adjacency(xy, 15.0, include_self=include_self)
        ref = radius_neighbors_graph(xy, 15.0, mode="connectivity", include_self=include_self)
        assert ours.shape == ref.shape and (ours != ref).nnz == 0 and ours.nnz > len(xy)


class _SquidpyPermutations:
    """The label permutations squidpy 1.8's nhood_enrichment draws with ``seed`` and ``n_jobs=1``:
    ``RandomState(seed)`` shuffling one copy of the labels in place, once per permutation."""

    def __init__(self, seed):
        self.rs, self.labels = np.random.RandomState(seed), None

    def permutation(self, labels):
        if self.labels is None:
            self.labels = np.array(labels, copy=True)
        self.rs.shuffle(self.labels)
        return self.labels.copy()


def test_nhood_z_equals_squidpy_nhood_enrichment():
    """Given squidpy's permutations, the z-scores are squidpy's on the same (pruned Delaunay) graph, to rounding;
    with its own generator they agree within the Monte Carlo error of n_perms permutations."""
    from histocell_sd.tl._spatial.indicators import _nhood_z

    xy, t, names = _clustered()
    counts = np.bincount(t, minlength=len(names)).astype(float)
    adata = _typed(xy, t, names[:3])
    sq.gr.spatial_neighbors(adata, coord_type="generic", delaunay=True, radius=(0.0, 25.0))
    ref, _ = sq.gr.nhood_enrichment(adata, "cell_type", n_perms=200, seed=7, n_jobs=1, copy=True, show_progress_bar=False)

    def matrix(z):
        return np.array([[z[f"nhood_z_{names[min(a, b)]}__{names[max(a, b)]}"] for b in range(3)] for a in range(3)])

    ours = _nhood_z(xy, t, names, 25.0, 200, _SquidpyPermutations(7), counts)
    np.testing.assert_allclose(matrix(ours), ref, rtol=1e-10, atol=1e-10)
    assert all(np.isnan(v) for k, v in ours.items() if "macrophage" in k)  # an absent type has no z
    assert ref[0, 0] > 20 and ref[0, 1] < -20  # a strongly structured input
    # Our own generator: z = (obs - mean) / sd of 200 permutations; the mean's error is sd / sqrt(200)
    # (0.07 in z) and the sd's relative error 1 / sqrt(2 * 200) (5 % of z): allow 4 of each.
    free = matrix(_nhood_z(xy, t, names, 25.0, 200, np.random.default_rng(0), counts))
    assert (np.abs(free - ref) <= 4 * (1 / np.sqrt(200) + np.abs(ref) / np.sqrt(400))).all()
    assert (np.sign(free) == np.sign(ref))[np.abs(ref) > 2].all()


def test_cooc_conditional_shares_equal_squidpy_co_occurrence():
    """``cooc_<a>__<b>`` = P(b within r of a) / share of b among all nuclei; squidpy's co_occurrence divides the same
    P(b within r of a) by the share of b among all neighbour pairs. The numerators agree exactly, and where every
    nucleus has as many neighbours (a ring), so do the ratios."""
    from scipy.spatial import cKDTree

    from histocell_sd.tl._spatial.indicators import _cooc

    def both(xy, t, names, r):
        counts = np.bincount(t, minlength=len(names)).astype(float)
        pairs = cKDTree(xy).query_pairs(r, output_type="ndarray")
        got = _cooc(pairs, t, names, counts / len(t), counts, r)
        ours = np.array([[got[f"cooc_{a}__{b}_{r:g}um"] for b in names] for a in names])
        occ, _ = sq.gr.co_occurrence(_typed(xy, t, names), "cell_type", interval=np.array([0.0, r]), copy=True)
        return ours, occ[..., 0].T, counts / len(t)  # squidpy's occ[b, a] is the ratio of b around a

    xy, t, names = _clustered()
    names = names[:3]
    ours, ref, frac = both(xy, t, names, 20.0)
    d = np.linalg.norm(xy[:, None] - xy[None], axis=2)
    np.fill_diagonal(d, np.inf)
    pair_share = np.array([(d[:, t == b] <= 20.0).sum() for b in range(3)]) / (d <= 20.0).sum()
    np.testing.assert_allclose(ours * frac[None, :], ref * pair_share[None, :], rtol=1e-12)
    assert ours[0, 0] > 1.8 and ours[0, 1] < 0.1 and np.abs(ours / ref - 1).max() > 0.05  # the normalisations differ here

    angle = np.arange(60) * 2 * np.pi / 60
    ring = 100 * np.c_[np.cos(angle), np.sin(angle)]  # each point has exactly two neighbours within 1.5 steps
    t_ring = (np.arange(60) // 7) % 3
    ours, ref, _ = both(ring, t_ring, names, 1.5 * 200 * np.sin(np.pi / 60))
    np.testing.assert_allclose(ours, ref, rtol=1e-12)
    assert ours[0, 0] > 2


def test_cell_graph_keeps_squidpy_info_lines_out_of_the_output(tiny_slide, capsys):
    import logging

    sdata = predicted_slide(tiny_slide[0])
    logger = logging.getLogger("spatialdata._logging")
    before = logger.level
    tl.cell_graph(sdata)
    out = capsys.readouterr()
    assert "Creating graph" not in out.out + out.err
    assert logger.level == before  # the logger's own level is restored
