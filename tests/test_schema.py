"""The table layouts (io._schema): every producer writes them, validate refuses what breaks them, and the
real ``tl.predict`` output survives zarr/h5ad and runs scverse downstream analysis unchanged."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import squidpy as sq
import torch

import histocell_sd as hc
from histocell_sd import InvalidInputError
from histocell_sd.io import ExpressionTableModel, NucleiTableModel, SpotsTableModel

FAST = {"epochs": 4, "self_training_epochs": 0, "state_epochs": 1, "progress": False}


@pytest.fixture(scope="module")
def predicted():
    """The tiny slide (seed 3) with nuclei from its truth raster and a real model's predictions, and the reference."""
    from histocell_sd.datasets import CELL_TYPES, synthetic_visium

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        sdata, reference = synthetic_visium(seed=3, preset="tiny", progress=False)
        hc.pp.store_nuclei(sdata, np.asarray(sdata.labels["truth_labels"]), method="truth")
        model = hc.HistoCell(list(CELL_TYPES), states=sdata.attrs["cell_states"]).fit(sdata, **FAST)
        hc.tl.predict(sdata, model, progress=False)
    finally:
        torch.set_num_threads(threads)
    return sdata, reference


def _table(sdata, key="histocell"):
    return sdata.tables[key].copy()


# ------------------------------------------------------------------------------------------ producers
def test_spots_tables_follow_the_layout(tiny_slide):
    sdata, _ = tiny_slide
    spots = sdata.tables["table"]
    SpotsTableModel.validate(spots)
    centres = np.column_stack([sdata.shapes["spots"].geometry.x, sdata.shapes["spots"].geometry.y])
    np.testing.assert_allclose(spots.obsm["spatial"], centres[sdata.shapes["spots"].index.get_indexer(spots.obs_names)])


def test_predict_merges_metadata_and_keeps_only_present_labels(predicted):
    sdata, _ = predicted
    table = sdata.tables["histocell"]
    NucleiTableModel.validate(table)
    meta = table.uns["histocell"]
    assert meta["mpp"] == pytest.approx(sdata.attrs["mpp"]) and meta["method"] == "truth" and "features" in meta  # segmentation's stay
    assert meta["cell_types"] and meta["states"] and meta["compartments"]  # prediction's join them
    for key in ("cell_type", "cell_state", "compartment"):
        column = table.obs[key]
        assert set(column.cat.categories) == set(column.unique())
        assert len(table.uns[f"{key}_colors"]) == len(column.cat.categories)
    # a label keeps its colour from the model's full list, whichever others are absent
    full = meta["cell_types"]
    for label, colour in zip(table.obs["cell_type"].cat.categories, table.uns["cell_type_colors"]):
        assert colour == hc._constants.PALETTE[full.index(label) % len(hc._constants.PALETTE)]


def test_stand_in_predictions_follow_the_same_layout(tiny_predicted):
    sdata, _ = tiny_predicted
    table = sdata.tables["histocell"]
    NucleiTableModel.validate(table)
    assert table.uns["histocell"]["method"] == "given probabilities"
    assert isinstance(table.obs["spot_id"].dtype, pd.CategoricalDtype)


def test_cohort_samples_carry_their_mpp():
    samples, _, _ = hc.datasets.synthetic_cohort(n_samples=2, n_nuclei=300, seed=0)
    sample = next(iter(samples.values()))
    NucleiTableModel.validate(sample.tables["histocell"])
    hc.tl.cell_graph(sample)  # no "No µm per pixel" error: the table carries its mpp


@pytest.mark.filterwarnings("ignore:.*hold no nuclei")
def test_refined_expression_table_never_shadows_cell_type(tiny_predicted):
    sdata, reference = tiny_predicted
    hc.tl.refine_deconvolution(sdata, reference, progress=False)
    expression = sdata.tables["histocell_expression"]
    ExpressionTableModel.validate(expression)
    assert "cell_type" not in expression.obs
    nuclei = sdata.tables["histocell"]
    NucleiTableModel.validate(nuclei)
    assert (expression.obs["refined_cell_type"].astype(str) == nuclei.obs["refined_cell_type"].astype(str)).all()
    # the same type has the same colour in the predicted and refined columns
    predicted = dict(zip(nuclei.obs["cell_type"].cat.categories, nuclei.uns["cell_type_colors"]))
    refined = dict(zip(nuclei.obs["refined_cell_type"].cat.categories, nuclei.uns["refined_cell_type_colors"]))
    assert all(predicted[t] == refined[t] for t in set(predicted) & set(refined))


# ------------------------------------------------------------------------------------------ round trips
def test_missing_spot_stays_missing_through_zarr_and_h5ad(predicted, tmp_path):
    # cases.md: rt_spot_id_nan (after predict)
    sdata, _ = predicted
    table = sdata.tables["histocell"]
    outside = table.obs["spot_id"].isna().to_numpy()
    assert outside.any() and not outside.all()
    hc.io.write_zarr(sdata, tmp_path / "s.zarr")
    back_zarr = hc.io.read_zarr(tmp_path / "s.zarr").tables["histocell"]
    table.write_h5ad(tmp_path / "t.h5ad")
    back_h5ad = ad.read_h5ad(tmp_path / "t.h5ad")
    for back in (back_zarr, back_h5ad):
        NucleiTableModel.validate(back)
        np.testing.assert_array_equal(back.obs["spot_id"].isna().to_numpy(), outside)
        assert list(back.obs["cell_type"].cat.categories) == list(table.obs["cell_type"].cat.categories)
        assert back.uns["histocell"]["mpp"] == table.uns["histocell"]["mpp"]


# ------------------------------------------------------------------------------------------ downstream on real output
def test_scverse_downstream_runs_on_real_predictions(predicted):
    sdata, _ = predicted
    table = _table(sdata)
    hc.tl.cell_graph(table)  # mpp from uns["histocell"], as segmentation stored it
    assert "spatial_connectivities" in table.obsp
    sq.gr.nhood_enrichment(table, cluster_key="cell_type", n_perms=20, seed=0, show_progress_bar=False)
    assert np.isfinite(table.uns["cell_type_nhood_enrichment"]["zscore"]).all()
    sq.gr.centrality_scores(table, cluster_key="cell_type", show_progress_bar=False)
    assert np.isfinite(table.uns["cell_type_centrality_scores"].to_numpy()).all()
    sq.gr.co_occurrence(table, cluster_key="cell_type", interval=np.linspace(5, 200, 5))
    assert np.isfinite(table.uns["cell_type_co_occurrence"]["occ"]).all()
    indicators = hc.tl.spatial_indicators(sdata, n_perms=10, progress=False)
    assert indicators.n_obs == 1 and np.isfinite(indicators.X).any()


# ------------------------------------------------------------------------------------------ validate refuses
def _broken(predicted, change):
    table = _table(predicted[0])
    change(table)
    return table


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda t: t.obs.__setitem__("cell_type", t.obs["cell_type"].cat.add_categories(["ghost"])), "no row holds"),
        (lambda t: t.uns.pop("cell_type_colors"), "one colour per category"),
        (lambda t: t.obs.__setitem__("spot_id", t.obs["spot_id"].astype(str)), "must be categorical"),
        (lambda t: t.obs.__setitem__("spot_id", pd.Categorical(t.obs["spot_id"].astype(object).where(t.obs["spot_id"].notna(), "nan"))), "spot 'nan'"),
        (lambda t: t.uns["histocell"].pop("mpp"), "µm per pixel"),
        (lambda t: t.obsm.__setitem__("cell_type_proba", t.obsm["cell_type_proba"] * 2), "do not sum to 1"),
        (lambda t: t.obsm.__setitem__("spatial", np.full((t.n_obs, 2), np.nan)), "finite"),
        (lambda t: t.uns.pop("spatialdata_attrs"), "does not annotate"),
    ],
    ids=["unused-category", "no-colours", "object-spot-id", "nan-string-spot", "no-mpp", "proba-sum", "nan-centroid", "no-annotation"],
)
def test_nuclei_validate_names_the_problem(predicted, change, message):
    with pytest.raises(InvalidInputError, match=message):
        NucleiTableModel.validate(_broken(predicted, change))


def test_spots_validate_names_the_problem(tiny_slide):
    table = tiny_slide[0].tables["table"].copy()
    table.obsm["proportions"] = table.obsm["proportions"] * 0.5
    with pytest.raises(InvalidInputError, match="do not sum to 1"):
        SpotsTableModel.validate(table)
    table = tiny_slide[0].tables["table"].copy()
    table.obs["spot_id"] = table.obs["spot_id"].astype(str).to_numpy()[::-1]
    with pytest.raises(InvalidInputError, match="must equal the row names"):
        SpotsTableModel.validate(table)


def test_io_validate_checks_the_tables(predicted):
    sdata, _ = predicted
    hc.io.validate(sdata)
    table = sdata.tables["histocell"]
    colours = table.uns.pop("cell_type_colors")
    try:
        with pytest.raises(InvalidInputError, match="tables\\['histocell'\\].uns\\['cell_type_colors'\\]"):
            hc.io.validate(sdata)
    finally:
        table.uns["cell_type_colors"] = colours


# ------------------------------------------------------------------------------------------ µm coordinates
def test_every_element_has_a_micron_system(predicted):
    from spatialdata import bounding_box_query
    from spatialdata.transformations import get_transformation

    sdata, _ = predicted
    mpp = sdata.attrs["mpp"]
    for name in ("he", "spots", "nuclei", "truth_labels"):
        assert set(get_transformation(sdata[name], get_all=True)) >= {"global", "um"}, name
    box_um = bounding_box_query(sdata, axes=("x", "y"), min_coordinate=[100, 100], max_coordinate=[300, 300],
                                target_coordinate_system="um", filter_table=False)
    box_px = bounding_box_query(sdata, axes=("x", "y"), min_coordinate=[100 / mpp, 100 / mpp], max_coordinate=[300 / mpp, 300 / mpp],
                                target_coordinate_system="global", filter_table=False)
    assert len(box_um.shapes["nuclei"]) > 0 and box_um.shapes["nuclei"].index.equals(box_px.shapes["nuclei"].index)


def test_squidpy_works_in_microns(predicted):
    sdata, _ = predicted
    table = _table(sdata)
    mpp = table.uns["histocell"]["mpp"]
    np.testing.assert_allclose(table.obsm["spatial_um"], table.obsm["spatial"] * mpp)
    np.testing.assert_allclose(sdata.tables["table"].obsm["spatial_um"], sdata.tables["table"].obsm["spatial"] * mpp)
    um, px = table.copy(), table.copy()
    sq.gr.spatial_neighbors_radius(um, spatial_key="spatial_um", radius=20.0)
    sq.gr.spatial_neighbors_radius(px, spatial_key="spatial", radius=20.0 / mpp)
    assert (um.obsp["spatial_connectivities"] != px.obsp["spatial_connectivities"]).nnz == 0
    np.testing.assert_allclose(um.obsp["spatial_distances"].toarray(), px.obsp["spatial_distances"].toarray() * mpp, rtol=1e-6)


# ------------------------------------------------------------------------------------------ own bad-input cases (tests/RELIABILITY.md)
@pytest.mark.parametrize("model", [NucleiTableModel, SpotsTableModel, ExpressionTableModel])
@pytest.mark.parametrize("thing", [None, "frame", "sdata"])
def test_validate_refuses_what_is_not_an_anndata(predicted, model, thing):
    # own case schema_validate_not_anndata: validate(a DataFrame / None / the SpatialData) crashed with AttributeError
    value = {"frame": predicted[0].tables["histocell"].to_df(), "sdata": predicted[0]}.get(thing)
    with pytest.raises(InvalidInputError, match="must be an AnnData, got"):
        model.validate(value)


def test_validate_names_non_numeric_proportions(tiny_slide):
    # own case schema_proportions_text: a text column in obsm['proportions'] crashed with "could not convert string to float"
    sdata = tiny_slide[0]
    table = sdata.tables["table"].copy()
    table.obsm["proportions"] = table.obsm["proportions"].assign(tumor="lots")
    with pytest.raises(InvalidInputError, match=r"obsm\['proportions'\] has non-numeric columns \['tumor'\]"):
        SpotsTableModel.validate(table)
    original = sdata.tables["table"]
    sdata.tables.data["table"] = table  # io.validate reads the same table (put back below)
    try:
        with pytest.raises(InvalidInputError, match=r"non-numeric columns \['tumor'\]"):
            hc.io.validate(sdata)
    finally:
        sdata.tables.data["table"] = original
    hc.io.validate(sdata)


def test_io_validate_refuses_nuclei_measured_at_another_mpp(predicted):
    # own case io_validate_mpp_mismatch (and cases.md pred_mpp_2x, mis-declared after segmentation): sdata.attrs['mpp']
    # changed after the nuclei were measured was accepted, pairing pixels and µm at different scales
    sdata, _ = predicted
    before = sdata.attrs["mpp"]
    sdata.attrs["mpp"] = 2 * before
    try:
        with pytest.raises(InvalidInputError, match=rf"measured at {before:g} µm/px .* declares sdata.attrs\['mpp'\] = {2 * before:g}"):
            hc.io.validate(sdata)
    finally:
        sdata.attrs["mpp"] = before
    hc.io.validate(sdata)


def test_io_validate_refuses_nuclei_assigned_to_unknown_spots(predicted):
    # own case io_validate_unknown_spot_ids: nuclei naming spots absent from the spots table passed validate
    sdata, _ = predicted
    table = sdata.tables["histocell"]
    spot_id = table.obs["spot_id"]
    table.obs["spot_id"] = spot_id.cat.rename_categories(lambda c: f"other_{c}")
    try:
        with pytest.raises(InvalidInputError, match=r"names \d+ spots that are not rows of tables\['table'\], e.g. \['other_"):
            hc.io.validate(sdata)
    finally:
        table.obs["spot_id"] = spot_id
    hc.io.validate(sdata)


def test_io_validate_checks_nuclei_stored_under_another_name():
    # own case io_validate_renamed_nuclei (API review): after segment_nuclei(key_added="cellpose") validate skipped every
    # nucleus check, as it looked only for shapes "nuclei"
    sdata, _ = hc.datasets.synthetic_visium(seed=3, preset="tiny", progress=False)
    hc.pp.store_nuclei(sdata, np.asarray(sdata.labels["truth_labels"]), method="truth", key_added="cellpose")
    hc.io.validate(sdata)
    sdata.attrs["mpp"] = 2 * sdata.attrs["mpp"]
    with pytest.raises(InvalidInputError, match=r"tables\['histocell'\].*measured at"):
        hc.io.validate(sdata)
    with pytest.raises(InvalidInputError, match=r"measured at"):
        hc.io.validate(sdata, nuclei_table_key="histocell")
    sdata.attrs["mpp"] = sdata.attrs["mpp"] / 2
    hc.pp.store_nuclei(sdata, np.asarray(sdata.labels["truth_labels"]), method="truth", overwrite=True)  # "nuclei" too
    hc.pp.store_nuclei(sdata, np.asarray(sdata.labels["truth_labels"]), method="truth", key_added="stardist", nuclei_table_key="stardist_table")
    hc.io.validate(sdata, nuclei_table_key="stardist_table")  # checked against its own shapes, not "nuclei"
    del sdata.shapes["stardist"]
    with pytest.raises(InvalidInputError, match=r"tables\['stardist_table'\] annotates the shapes \['stardist'\], which the SpatialData lacks"):
        hc.io.validate(sdata, nuclei_table_key="stardist_table")
