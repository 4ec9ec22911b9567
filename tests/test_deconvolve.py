"""tl.deconvolve (Tangram, Poisson mixture) and tl.refine_deconvolution (histology-refined composition, per-nucleus types)."""

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from scipy import sparse

from histocell_sd import InvalidInputError, tl
from histocell_sd.tl._deconvolution.refine_em import largest_remainder

EPOCHS = 60


@pytest.fixture
def deconvolved(tiny_predicted):
    sdata, reference = tiny_predicted
    tl.deconvolve(sdata, reference, state_key="cell_state", epochs=EPOCHS, progress=False)
    return sdata, reference


def test_proportions_sum_to_one_and_states(deconvolved):
    sdata, reference = deconvolved
    table = sdata.tables["table"]
    props = table.obsm["proportions"]
    assert list(props.columns) == list(reference.obs["cell_type"].cat.categories)
    assert (props.index == table.obs_names).all()
    np.testing.assert_allclose(props.sum(axis=1), 1, atol=1e-6)
    assert (props.to_numpy() >= 0).all()
    states = table.obsm["state_proportions"]
    assert set(states.columns) == set(reference.obs["cell_state"].astype(str))
    np.testing.assert_allclose(states.sum(axis=1), 1, atol=1e-6)
    assert table.uns["deconvolution"]["n_shared_genes"] == reference.n_vars
    # better than a flat guess
    truth = table.obsm["true_proportions"][props.columns].to_numpy()
    assert np.sqrt(((props.to_numpy() - truth) ** 2).mean()) < np.sqrt(((truth - truth.mean(0)) ** 2).mean()) + 0.05


def test_poisson_deconvolution(tiny_predicted):
    sdata, reference = tiny_predicted
    tl.deconvolve(sdata, reference, state_key="cell_state", method="poisson", progress=False)
    table = sdata.tables["table"]
    props, states = table.obsm["proportions"], table.obsm["state_proportions"]
    np.testing.assert_allclose(props.sum(axis=1), 1, atol=1e-6)
    np.testing.assert_allclose(states.sum(axis=1), 1, atol=1e-6)
    assert table.uns["deconvolution"]["method"] == "poisson"
    # the generator's counts follow this likelihood: the fractions are close to the truth
    truth = table.obsm["true_proportions"][props.columns].to_numpy()
    occupied = truth.sum(axis=1) > 0
    assert np.sqrt(((props.to_numpy() - truth)[occupied] ** 2).mean()) < 0.05
    tl.deconvolve(sdata, reference, method="poisson", key_added="again", progress=False)
    pd.testing.assert_frame_equal(props, table.obsm["again"])
    assert table.obsm["state_proportions"] is states  # they belong to obsm["proportions"], which was not replaced


def test_redeconvolving_without_states_removes_the_earlier_states(tiny_predicted):
    # own case deconvolve_stale_states
    # probe: deconvolve(state_key="cell_state") then deconvolve() kept the old state proportions, and fit then
    # refused them as disagreeing with proportions the user had just written
    sdata, reference = tiny_predicted
    table = sdata.tables["table"]
    tl.deconvolve(sdata, reference, state_key="cell_state", method="poisson", progress=False)
    assert "state_proportions" in table.obsm
    tl.deconvolve(sdata, reference, method="poisson", key_added="poisson_proportions", progress=False)  # beside: kept
    assert "state_proportions" in table.obsm and table.uns["deconvolution"]["state_proportions_of"] == "proportions"
    with pytest.warns(UserWarning, match="Removed obsm\\['state_proportions'\\]"):
        tl.deconvolve(sdata, reference, method="poisson", progress=False)
    assert "state_proportions" not in table.obsm and table.uns["deconvolution"]["state_key"] is None
    assert table.uns["deconvolution"]["state_proportions_of"] is None


def test_copy_leaves_the_input_unchanged(tiny_predicted):
    sdata, reference = tiny_predicted
    before = set(sdata.tables["table"].obsm)
    deconvolved = tl.deconvolve(sdata, reference, method="poisson", key_added="poisson", progress=False, copy=True)
    assert set(sdata.tables["table"].obsm) == before and "deconvolution" not in sdata.tables["table"].uns
    assert "poisson" in deconvolved.tables["table"].obsm
    with pytest.warns(UserWarning, match="hold no nuclei") if _has_empty_spots(sdata) else _nothing():
        refined = tl.refine_deconvolution(deconvolved, reference, progress=False, copy=True)
    assert "refined_proportions" not in deconvolved.tables["table"].obsm and "histocell_expression" not in deconvolved.tables
    assert "refined_cell_type" not in deconvolved.tables["histocell"].obs
    assert "refined_proportions" in refined.tables["table"].obsm and "histocell_expression" in refined.tables
    assert tl.deconvolve(sdata, reference, method="poisson", key_added="poisson", progress=False) is None
    pd.testing.assert_frame_equal(sdata.tables["table"].obsm["poisson"], deconvolved.tables["table"].obsm["poisson"])


def test_deconvolve_is_deterministic(tiny_predicted):
    sdata, reference = tiny_predicted
    tl.deconvolve(sdata, reference, epochs=EPOCHS, progress=False, seed=1)
    first = sdata.tables["table"].obsm["proportions"].copy()
    tl.deconvolve(sdata, reference, epochs=EPOCHS, progress=False, seed=1, key_added="again")
    pd.testing.assert_frame_equal(first, sdata.tables["table"].obsm["again"])


def test_refine_outputs_and_counts(deconvolved):
    sdata, reference = deconvolved
    with pytest.warns(UserWarning, match="hold no nuclei") if _has_empty_spots(sdata) else _nothing():
        tl.refine_deconvolution(sdata, reference, progress=False)
    spots, nuclei = sdata.tables["table"], sdata.tables["histocell"]
    assert spots.uns["refinement"]["expression"] == "counts"
    refined = spots.obsm["refined_proportions"]
    np.testing.assert_allclose(refined.sum(axis=1), 1, atol=1e-6)
    types = list(refined.columns)
    assert list(nuclei.obs["refined_cell_type"].cat.categories) == types
    np.testing.assert_allclose(nuclei.obsm["refined_cell_type_proba"].sum(axis=1), 1, atol=1e-6)
    # per spot, the refined types' counts are the largest-remainder counts of the refined proportions
    inside = nuclei.obs["spot_id"].notna()
    for spot, obs in nuclei.obs[inside].groupby("spot_id", observed=True):
        expected = largest_remainder(refined.loc[spot].to_numpy(), len(obs))
        got = obs["refined_cell_type"].value_counts().reindex(types, fill_value=0).to_numpy()
        np.testing.assert_array_equal(got, expected)
    # nuclei outside spots keep the image prediction
    outside = ~inside
    if outside.any():
        assert (nuclei.obs.loc[outside, "refined_cell_type"].astype(str) == nuclei.obs.loc[outside, "cell_type"].astype(str)).all()
    # imputed expression: the reference's genes, one row per nucleus, a cell of the refined type
    expr = sdata.tables["histocell_expression"]
    assert list(expr.var_names) == list(reference.var_names)
    assert (expr.obs_names == nuclei.obs_names).all()
    matched_type = reference.obs.loc[expr.obs["matched_cell"], "cell_type"].astype(str).to_numpy()
    assert (matched_type == nuclei.obs["refined_cell_type"].astype(str).to_numpy()).all()
    assert expr.uns["spatialdata_attrs"]["region"] == "nuclei"


@pytest.mark.parametrize("expression", ["proportions", "counts"])
def test_refined_beats_its_inputs(deconvolved, expression):
    sdata, reference = deconvolved
    with pytest.warns(UserWarning, match="hold no nuclei") if _has_empty_spots(sdata) else _nothing():
        tl.refine_deconvolution(sdata, reference, expression=expression, expression_key=None, progress=False)
    spots, nuclei = sdata.tables["table"], sdata.tables["histocell"]
    assert spots.uns["refinement"]["expression"] == expression
    truth = sdata.tables["truth_nuclei"].obs["cell_type"].astype(str).to_numpy()
    inside = nuclei.obs["spot_id"].notna().to_numpy()
    noisy = (nuclei.obs["cell_type"].astype(str).to_numpy() == truth)[inside].mean()
    refined = (nuclei.obs["refined_cell_type"].astype(str).to_numpy() == truth)[inside].mean()
    true_props = spots.obsm["true_proportions"]
    occupied = true_props.sum(axis=1).to_numpy() > 0

    def rmse(key):
        return np.sqrt(((spots.obsm[key][true_props.columns] - true_props).to_numpy()[occupied] ** 2).mean())

    if expression == "proportions":
        assert refined >= noisy
        assert rmse("refined_proportions") < rmse("proportions")
    else:  # the spot counts pin the composition down; the image ranks the nuclei within a spot
        assert refined >= noisy + 0.05
        assert rmse("refined_proportions") < 0.5 * rmse("proportions")


def test_refined_table_runs_squidpy(deconvolved):
    import squidpy as sq

    sdata, _ = deconvolved
    tl.refine_deconvolution(sdata, progress=False)
    nuclei = sdata.tables["histocell"]
    sq.gr.spatial_neighbors_knn(nuclei, n_neighs=6)
    sq.gr.nhood_enrichment(nuclei, cluster_key="refined_cell_type", n_perms=20, seed=0, show_progress_bar=False)
    assert nuclei.uns["refined_cell_type_nhood_enrichment"]["zscore"].shape == (5, 5)


def test_largest_remainder():
    np.testing.assert_array_equal(largest_remainder(np.array([0.5, 0.3, 0.2]), 7), [4, 2, 1])
    assert largest_remainder(np.array([0.2] * 5), 3).sum() == 3


# --- bad input -------------------------------------------------------------------------------------

def test_reference_without_raw_counts(tiny_predicted):
    sdata, reference = tiny_predicted
    logged = reference.copy()
    logged.X = sparse.csr_matrix(np.log1p(logged.X.toarray() / 3))
    with pytest.raises(InvalidInputError, match="no raw counts.*log-transformed"):
        tl.deconvolve(sdata, logged, epochs=5, progress=False)
    # raw counts kept in layers["counts"] or .raw are found
    logged.layers["counts"] = reference.X.copy()
    tl.deconvolve(sdata, logged, epochs=5, progress=False)
    with_raw = logged.copy()
    del with_raw.layers["counts"]
    with_raw.raw = reference.copy()
    tl.deconvolve(sdata, with_raw, epochs=5, progress=False)


def test_reference_labels_with_a_slash_are_refused(tiny_predicted):
    sdata, reference = tiny_predicted
    slashed = reference.copy()
    slashed.obs["cell_type"] = slashed.obs["cell_type"].astype(str).replace({"lymphocyte": "T/NK"})
    before = set(sdata.tables["table"].obsm)
    with pytest.raises(InvalidInputError, match=r"reference.obs\['cell_type'\}?\] \['T/NK'\] contain '/'"):
        tl.deconvolve(sdata, slashed, epochs=5, progress=False)
    assert set(sdata.tables["table"].obsm) == before


def test_too_few_shared_genes(tiny_predicted):
    sdata, reference = tiny_predicted
    renamed = reference[:, :300].copy()
    renamed.var_names = [f"ENSG{i:08d}" for i in range(renamed.n_vars)]
    renamed = ad.concat([renamed, reference[:, 300:305]], axis=1, merge="same")
    renamed.obs = reference.obs.copy()
    with pytest.raises(InvalidInputError, match="share only 5 genes"):
        tl.deconvolve(sdata, renamed, epochs=5, progress=False)


def test_missing_cell_type_key_and_no_counts(tiny_predicted):
    sdata, reference = tiny_predicted
    with pytest.raises(InvalidInputError, match="no column 'celltype'"):
        tl.deconvolve(sdata, reference, cell_type_key="celltype", epochs=5, progress=False)
    table = sdata.tables["table"]
    sdata.tables["table"] = ad.AnnData(obs=table.obs.copy(), obsm={k: v for k, v in table.obsm.items()},
                                       uns=table.uns.copy(), X=sparse.csr_matrix((table.n_obs, 0), dtype=np.float32))
    with pytest.raises(InvalidInputError, match="no genes"):
        tl.deconvolve(sdata, reference, epochs=5, progress=False)


def test_refine_cell_type_sets_must_match(tiny_predicted):
    sdata, _ = tiny_predicted
    table = sdata.tables["table"]
    props = table.obsm["true_proportions"].drop(columns="endothelial")
    table.obsm["partial"] = props.div(props.sum(axis=1).replace(0, 1), axis=0).where(props.sum(axis=1) > 0, 0.25, axis=0)
    with pytest.raises(InvalidInputError, match="different cell-type sets"):
        tl.refine_deconvolution(sdata, proportions_key="partial", progress=False)
    tl.refine_deconvolution(sdata, proportions_key="partial", missing_types="image", progress=False)
    assert "endothelial" in table.obsm["refined_proportions"].columns
    extra = table.obsm["true_proportions"].assign(plasma=0.0)
    table.obsm["extra"] = extra
    with pytest.raises(InvalidInputError, match=r"only in the proportions \['plasma'\]"):
        tl.refine_deconvolution(sdata, proportions_key="extra", progress=False)


def test_refine_reference_missing_type_and_empty_spots(tiny_predicted):
    sdata, reference = tiny_predicted
    table, nuclei = sdata.tables["table"], sdata.tables["histocell"]
    table.obsm["proportions"] = table.obsm["true_proportions"]
    nuclei.obs.loc[nuclei.obs["spot_id"] == table.obs_names[0], "spot_id"] = np.nan
    with pytest.warns(UserWarning, match=r"1 of \d+ spots hold no nuclei"):
        tl.refine_deconvolution(sdata, progress=False)
    pd.testing.assert_series_equal(table.obsm["refined_proportions"].iloc[0], table.obsm["proportions"].iloc[0], check_names=False)
    # with a reference, a spot without nuclei gets the expression likelihood alone, i.e. method="poisson"
    tl.deconvolve(sdata, reference, method="poisson", key_added="poisson", progress=False)
    with pytest.warns(UserWarning, match=r"1 of \d+ spots hold no nuclei.*expression likelihood alone"):
        tl.refine_deconvolution(sdata, reference, expression_key=None, progress=False)
    np.testing.assert_allclose(table.obsm["refined_proportions"].iloc[0], table.obsm["poisson"].iloc[0], atol=2e-3)


def test_refine_reference_type_sets(tiny_predicted):
    sdata, reference = tiny_predicted
    partial = reference[reference.obs["cell_type"] != "macrophage"].copy()
    with pytest.raises(InvalidInputError, match=r"only in the predictions \['macrophage'\].*missing_types='image'"):
        tl.refine_deconvolution(sdata, partial, progress=False)
    # the missing type's share then comes from the nuclei alone; no reference cell can be imputed for it
    with pytest.warns(UserWarning, match="hold no nuclei") if _has_empty_spots(sdata) else _nothing():
        tl.refine_deconvolution(sdata, partial, missing_types="image", expression_key=None, progress=False)
    refined = sdata.tables["table"].obsm["refined_proportions"]
    assert refined["macrophage"].max() > 0
    with pytest.raises(InvalidInputError, match=r"\['macrophage'\].*absent from reference"):
        tl.refine_deconvolution(sdata, partial, missing_types="image", key_added="not_written", progress=False)
    assert "not_written" not in sdata.tables["table"].obsm  # refused before anything was written
    extra = reference.copy()
    extra.obs["cell_type"] = extra.obs["cell_type"].cat.add_categories("plasma")
    extra.obs.iloc[:5, extra.obs.columns.get_loc("cell_type")] = "plasma"
    with pytest.raises(InvalidInputError, match=r"only in the reference \['plasma'\].*Subset the reference"):
        tl.refine_deconvolution(sdata, extra, progress=False)
    logged = reference.copy()
    logged.X = sparse.csr_matrix(np.log1p(logged.X.toarray() / 3))
    with pytest.raises(InvalidInputError, match="no raw counts"):
        tl.refine_deconvolution(sdata, logged, progress=False)
    with pytest.raises(InvalidInputError, match="needs a single-cell reference"):
        tl.refine_deconvolution(sdata, expression="counts", progress=False)
    with pytest.raises(InvalidInputError, match="expression must be one of"):
        tl.refine_deconvolution(sdata, reference, expression="tangram", progress=False)


def _has_empty_spots(sdata):
    spot_ids = set(sdata.tables["histocell"].obs["spot_id"].dropna())
    return not set(sdata.tables["table"].obs_names) <= spot_ids


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_composition_em_recovers_fractions_and_platform_effects():
    from histocell_sd.tl._deconvolution.poisson import composition_em

    rng = np.random.default_rng(0)
    n_types, n_genes, n_spots = 4, 200, 300
    mu = rng.gamma(0.5, 1.0, (n_types, n_genes))
    mu /= mu.sum(axis=1, keepdims=True)
    rho = np.array([1.4, 1.0, 0.6, 1.0])
    pi = rng.dirichlet(np.full(n_types, 0.7), n_spots)
    gamma = np.exp(rng.normal(0, 0.7, n_genes))  # the spots see every gene scaled
    rate = (pi * rho) @ (mu * gamma)
    Y = rng.poisson(5000 * rate / rate.sum(axis=1, keepdims=True)).astype(float)

    def rmse(platform_effects):
        fitted, _, _ = composition_em(Y, mu, rho, platform_effects=platform_effects)
        np.testing.assert_allclose(fitted.sum(axis=1), 1, atol=1e-9)
        return np.sqrt(((fitted - pi) ** 2).mean())

    assert rmse(True) < 0.03
    assert rmse(True) < 0.5 * rmse(False)
    with pytest.warns(UserWarning, match="stopped after max_iter=2 iterations"):
        composition_em(Y, mu, rho, max_iter=2)
    with pytest.raises(InvalidInputError, match="max_iter must be at least 1"):
        composition_em(Y, mu, rho, max_iter=0)


def test_composition_em_is_accelerated_to_the_same_fixed_point():
    """SQUAREM reaches the fixed point of the EM (with gene factors) in a fraction of plain EM's steps (1,266 at tol 1e-7)."""
    from histocell_sd.tl._deconvolution.poisson import composition_em

    rng = np.random.default_rng(0)
    mu = rng.gamma(0.5, 1.0, (4, 200))
    mu /= mu.sum(axis=1, keepdims=True)
    rho = np.array([1.4, 1.0, 0.6, 1.0])
    pi = rng.dirichlet(np.full(4, 0.7), 300)
    rate = (pi * rho) @ (mu * np.exp(rng.normal(0, 0.7, 200)))
    Y = rng.poisson(5000 * rate / rate.sum(axis=1, keepdims=True)).astype(float)
    tight, _, _ = composition_em(Y, mu, rho, max_iter=20000, tol=1e-10)
    fitted, _, n_iter = composition_em(Y, mu, rho, tol=1e-7)
    assert n_iter < 400
    np.testing.assert_allclose(fitted, tight, atol=2e-4)  # a fraction near 0 creeps (sublinear)
    assert (fitted >= 0).all()
    np.testing.assert_allclose(fitted.sum(axis=1), 1, atol=1e-12)


def test_refinement_em_is_accelerated_to_the_same_fixed_point():
    """The proportions refinement's EM (with per-type recalibration) also runs SQUAREM: plain EM takes 443 steps at tol 1e-7."""
    from scipy import sparse

    from histocell_sd.tl._deconvolution.refine_em import composition_em_proportions

    rng = np.random.default_rng(0)
    truth = rng.dirichlet(np.full(5, 0.4), 300)
    n_nuclei = rng.poisson(15, 300)
    n_nuclei[:5] = 0
    spot_of = np.concatenate([np.repeat(np.arange(300), n_nuclei), np.full(400, -1)])  # 400 nuclei outside every spot
    types = np.array([rng.choice(5, p=truth[s]) if s >= 0 else rng.integers(5) for s in spot_of])
    P = rng.dirichlet(np.ones(5), len(types)) * 0.5
    P[np.arange(len(types)), types] += 0.5
    inside = spot_of >= 0
    members = sparse.csr_matrix((np.ones(inside.sum()), (spot_of[inside], np.flatnonzero(inside))), shape=(300, len(P)))
    E = np.clip(truth * [1.6, 1.0, 0.7, 1.0, 1.2] + rng.normal(0, 0.05, truth.shape), 1e-9, None)  # biased per type, noisy
    E /= E.sum(axis=1, keepdims=True)
    args = (E, P / P.mean(axis=0), spot_of, members, n_nuclei.astype(float), 5.0)
    tight, _, _ = composition_em_proportions(*args, max_iter=100000, tol=1e-12)
    fitted, Q, n_iter = composition_em_proportions(*args, max_iter=100000, tol=1e-7)
    assert n_iter < 250
    np.testing.assert_allclose(fitted, tight, atol=1e-5)
    assert (fitted >= 0).all()
    np.testing.assert_allclose(fitted.sum(axis=1), 1, atol=1e-12)
    np.testing.assert_allclose(Q[inside].sum(axis=1), 1, atol=1e-12)
    assert (Q[~inside] == 0).all()


def test_composition_em_sparse_counts_match_dense(monkeypatch):
    """The sparse E-step (blocks of spots over the non-zero counts only) gives the dense one's fractions."""
    from histocell_sd.tl._deconvolution import poisson

    rng = np.random.default_rng(1)
    mu = rng.dirichlet(np.full(60, 0.3), 3)
    rho = np.array([1.5, 1.0, 0.5])
    pi = rng.dirichlet(np.ones(3), 250)
    Y = rng.poisson(((pi * rho) @ mu) * 40).astype(float)  # low counts: mostly zeros, some empty spots
    Y[:5] = 0
    monkeypatch.setattr(poisson._RatioTimesMu, "_BLOCK_ROWS", 64)  # several blocks, one partial
    dense = poisson.composition_em(Y, mu, rho, max_iter=1000, tol=1e-9)
    sparse_fit = poisson.composition_em(sparse.csr_matrix(Y), mu, rho, max_iter=1000, tol=1e-9)
    np.testing.assert_allclose(sparse_fit[0], dense[0], rtol=0, atol=1e-10)
    assert sparse_fit[2] == dense[2]


def test_deconvolve_is_the_same_in_every_process():
    """Tangram orders genes through a Python set, whose order changes with the process's hash seed."""
    import os
    import subprocess
    import sys

    code = (
        "import hashlib, warnings; warnings.simplefilter('ignore')\n"
        "from histocell_sd import datasets, tl\n"
        "s, r = datasets.synthetic_visium(seed=3, preset='tiny', progress=False)\n"
        "tl.deconvolve(s, r, epochs=20, progress=False)\n"
        "print(hashlib.md5(s.tables['table'].obsm['proportions'].to_numpy().tobytes()).hexdigest())\n"
    )
    digests = {
        subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONHASHSEED": str(h)},
                       capture_output=True, text=True, check=True).stdout.split()[-1]
        for h in (1, 2)
    }
    assert len(digests) == 1


def test_deconvolve_reference_not_anndata(tiny_predicted):
    # cases.md: dc_ref_not_anndata
    sdata, reference = tiny_predicted
    frame, before = reference.to_df(), set(sdata.tables["table"].obsm)
    with pytest.raises(InvalidInputError, match="reference must be an AnnData.*got DataFrame"):
        tl.deconvolve(sdata, frame, key_added="new", progress=False)
    with pytest.raises(InvalidInputError, match="reference must be an AnnData.*got DataFrame"):
        tl.refine_deconvolution(sdata, frame, key_added="new", progress=False)
    assert set(sdata.tables["table"].obsm) == before


def test_refine_expression_key_must_not_overwrite_other_elements(tiny_predicted):
    # cases.md: rf_expression_key_collision, rf_expression_key_histocell
    sdata, reference = tiny_predicted
    spots, nuclei = sdata.tables["table"].copy(), sdata.tables["histocell"].copy()
    for key in ("table", "histocell", "nuclei", "spots"):
        with pytest.raises(InvalidInputError, match=f"expression_key '{key}' names an existing .* did not write"):
            tl.refine_deconvolution(sdata, reference, expression_key=key, progress=False)
    assert "refined_proportions" not in sdata.tables["table"].obsm and "refined_cell_type" not in sdata.tables["histocell"].obs
    assert sdata.tables["table"].n_vars == spots.n_vars and sdata.tables["histocell"].n_vars == nuclei.n_vars
    with pytest.warns(UserWarning, match="hold no nuclei") if _has_empty_spots(sdata) else _nothing():
        tl.refine_deconvolution(sdata, reference, expression_key="imputed", progress=False)
        tl.refine_deconvolution(sdata, reference, expression_key="imputed", seed=1, progress=False)  # its own output: replaced
    assert sdata.tables["imputed"].uns["imputation"]["seed"] == 1


def test_deconvolution_settings_are_checked_before_anything_runs(tiny_predicted):
    # own case dc_bad_settings: torch / numpy / sklearn errors (NaN or negative learning rate, a float n_markers or
    # epochs, min_shared_genes=0 with no shared gene, top_k=0, tol=nan accepted)
    sdata, reference = tiny_predicted
    before = set(sdata.tables["table"].obsm)
    for kwargs, message in [({"learning_rate": float("nan")}, "learning_rate"), ({"learning_rate": -1}, "learning_rate"),
                            ({"n_markers": 2.5}, "n_markers"), ({"epochs": 2.5}, "epochs"), ({"min_shared_genes": 0}, "min_shared_genes")]:
        with pytest.raises(InvalidInputError, match=message):
            tl.deconvolve(sdata, reference, key_added="checked", progress=False, **kwargs)
    for kwargs, message in [({"top_k": 0}, "top_k"), ({"tol": float("nan")}, "tol")]:
        with pytest.raises(InvalidInputError, match=message):
            tl.refine_deconvolution(sdata, reference, key_added="checked", progress=False, **kwargs)
    assert set(sdata.tables["table"].obsm) == before


def test_spot_counts_with_nan_are_refused_and_normalised_ones_warned(tiny_predicted):
    # own case dc_spot_counts: NaN counts gave a spot uniform proportions; log-normalised spots ran without a word
    sdata, reference = tiny_predicted
    table = sdata.tables["table"]
    raw = table.X.copy()
    before = set(table.obsm)
    dense = np.asarray(raw.toarray() if hasattr(raw, "toarray") else raw, dtype=np.float32)
    try:
        table.X = np.where(np.arange(dense.shape[0])[:, None] == 0, np.nan, dense)
        with pytest.raises(InvalidInputError, match="NaN or infinite values in X"):
            tl.deconvolve(sdata, reference, method="poisson", key_added="checked", progress=False)
        assert set(table.obsm) == before
        table.X = np.log1p(dense)
        with pytest.warns(UserWarning, match="non-integer values .* expects raw counts"):
            tl.deconvolve(sdata, reference, method="poisson", key_added="checked", progress=False)
    finally:
        table.X = raw
        table.obsm.pop("checked", None)


def test_a_reference_type_without_counts_is_named(tiny_predicted):
    # own case dc_silent_type: a type whose reference cells have no counts got proportion 0 with no word naming it
    sdata, reference = tiny_predicted
    reference = reference.copy()
    keep = (reference.obs["cell_type"].astype(str) != "endothelial").to_numpy()[:, None]

    def zeroed(m):
        return m.multiply(keep).tocsr() if hasattr(m, "multiply") else m * keep

    reference.X = zeroed(reference.X)
    if "counts" in reference.layers:
        reference.layers["counts"] = zeroed(reference.layers["counts"])
    with pytest.warns(UserWarning, match=r"reference cells of \['endothelial'\] have no counts"):
        tl.deconvolve(sdata, reference, method="poisson", key_added="checked", progress=False)


@pytest.mark.parametrize("key", ["spatial", "spatial_um", "state_proportions", "histocell_proportions"])
def test_key_added_must_not_overwrite_the_spots_layout(tiny_predicted, key):
    # own case dc_key_added_layout: key_added="spatial" replaced the spot centroids with proportions
    sdata, reference = tiny_predicted
    before = {k: (v.copy() if hasattr(v, "copy") else v) for k, v in sdata.tables["table"].obsm.items()}
    with pytest.raises(InvalidInputError, match=f"key_added='{key}' would overwrite obsm"):
        tl.deconvolve(sdata, reference, method="poisson", key_added=key, progress=False)
    with pytest.raises(InvalidInputError, match=f"key_added='{key}' would overwrite obsm"):
        tl.refine_deconvolution(sdata, reference, key_added=key, progress=False)
    after = sdata.tables["table"].obsm
    assert set(after) == set(before)
    for k, v in before.items():
        np.testing.assert_array_equal(np.asarray(after[k]), np.asarray(v))


@pytest.mark.parametrize("method", ["poisson", "tangram"])
@pytest.mark.parametrize("side", ["reference", "spots"])
@pytest.mark.parametrize("case", [str.lower, lambda g: g[:1].upper() + g[1:].lower()], ids=["lower", "title"])
def test_gene_names_match_whatever_their_case(tiny_predicted, side, case, method):
    # cases.md: dc_case_mismatch. Decided: gene symbols are matched case-insensitively (an upper-case human
    # reference against a lower- or title-cased panel), so the result is the one with identical names.
    sdata, reference = tiny_predicted
    options = {"method": method, "progress": False} | ({"epochs": 30} if method == "tangram" else {})
    tl.deconvolve(sdata, reference, key_added="same_case", **options)
    table = sdata.tables["table"]
    if side == "reference":
        reference = reference.copy()
        reference.var_names = [case(g) for g in reference.var_names]
    else:
        table.var_names = [case(g) for g in table.var_names]
    assert len(set(reference.var_names) & set(table.var_names)) < 0.1 * table.n_vars  # the names really differ
    tl.deconvolve(sdata, reference, key_added="other_case", **options)
    pd.testing.assert_frame_equal(table.obsm["same_case"], table.obsm["other_case"])


def test_replacing_proportions_deconvolve_did_not_write_warns(tiny_predicted):
    # own case deconvolve_replaces_imported (API review): deconvolve's default key replaced proportions imported with
    # io.read_proportions (e.g. RCTD's) without a word
    import warnings

    import histocell_sd as hc

    sdata, reference = tiny_predicted
    table = sdata.tables["table"]
    hc.io.read_proportions(table.obsm["true_proportions"].copy(), sdata)
    with pytest.warns(UserWarning, match=r"Replaced obsm\['proportions'\], which tl.deconvolve did not write.*key_added="):
        tl.deconvolve(sdata, reference, method="poisson", progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # its own earlier results are replaced as scanpy's key_added are
        tl.deconvolve(sdata, reference, method="poisson", progress=False)
        tl.deconvolve(sdata, reference, method="poisson", key_added="poisson", progress=False)
        tl.deconvolve(sdata, reference, method="poisson", progress=False)
    assert table.uns["deconvolution"]["proportions_keys"] == ["poisson", "proportions"]
    hc.io.read_proportions(table.obsm["true_proportions"].copy(), sdata)  # imported after a deconvolution: warns again
    with pytest.warns(UserWarning, match=r"Replaced obsm\['proportions'\], which tl.deconvolve did not write"):
        tl.deconvolve(sdata, reference, method="poisson", progress=False)
