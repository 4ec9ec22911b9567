"""Invariants of the synthetic generator and the NuCLS loader."""

import numpy as np
import pandas as pd
import pytest
from scipy.spatial import cKDTree

import histocell_sd as hc
from histocell_sd.datasets import CELL_STATES, CELL_TYPES, TRUTH_LABELS_KEY, TRUTH_TABLE_KEY, synthetic_visium
from histocell_sd.datasets._synthetic_expression import MARKERS


def _image(sdata):
    return np.asarray(hc.io.get_image(sdata)).transpose(1, 2, 0)


def test_follows_data_model(tiny_slide):
    sdata, _ = tiny_slide
    hc.io.validate(sdata)
    assert sdata.attrs["mpp"] == 0.5
    assert list(sdata.tables["table"].obsm["proportions"].columns) == list(CELL_TYPES)
    assert sdata.shapes["spots"]["radius"].iloc[0] == pytest.approx(27.5 / 0.5)


def test_truth_proportions_equal_recount_of_nuclei_in_spots(tiny_slide):
    sdata, _ = tiny_slide
    truth = sdata.tables[TRUTH_TABLE_KEY]
    spots = sdata.shapes["spots"]
    centres = np.c_[spots.geometry.x, spots.geometry.y]
    dist, idx = cKDTree(centres).query(truth.obsm["spatial"])
    inside = dist <= spots["radius"].to_numpy()[idx]
    recount = pd.crosstab(spots.index[idx[inside]], truth.obs["cell_type"].to_numpy()[inside])
    recount = recount.reindex(columns=CELL_TYPES, fill_value=0)
    recount = recount.div(recount.sum(axis=1), axis=0).loc[sdata.tables["table"].obs_names]
    np.testing.assert_allclose(sdata.tables["table"].obsm["true_proportions"].to_numpy(), recount.to_numpy(), atol=1e-12)
    np.testing.assert_array_equal(truth.obs["spot_id"].where(inside).fillna("-"), pd.Series(np.where(inside, spots.index[idx], "-"), index=truth.obs_names))


def test_marker_expression_tracks_composition():
    sdata, _ = synthetic_visium(seed=5, progress=False)
    table = sdata.tables["table"]
    counts = table.X.toarray()
    cpm = counts / counts.sum(axis=1, keepdims=True)
    truth = table.obsm["true_proportions"]
    for cell_type, genes in MARKERS.items():
        for gene in genes:
            r = np.corrcoef(cpm[:, table.var_names.get_loc(gene)], truth[cell_type])[0, 1]
            assert r >= 0.8, (cell_type, gene, r)


def test_labels_raster_matches_truth_table(tiny_slide):
    sdata, _ = tiny_slide
    labels = np.asarray(sdata.labels[TRUTH_LABELS_KEY])
    truth = sdata.tables[TRUTH_TABLE_KEY]
    ids, counts = np.unique(labels[labels > 0], return_counts=True)
    assert set(ids) <= set(truth.obs["label_id"])
    assert len(ids) >= 0.97 * truth.n_obs  # nearly every nucleus is visible
    xy = np.round(truth.obsm["spatial"]).astype(int)
    under_centre = labels[np.clip(xy[:, 1], 0, labels.shape[0] - 1), np.clip(xy[:, 0], 0, labels.shape[1] - 1)]
    assert np.mean(under_centre == truth.obs["label_id"].to_numpy()) > 0.95


def test_density_and_morphology_are_realistic(tiny_slide):
    sdata, _ = tiny_slide
    spots_mm2 = (np.pi * (sdata.shapes["spots"]["radius"] * sdata.attrs["mpp"] / 1000) ** 2).sum()
    density = sdata.tables[TRUTH_TABLE_KEY].obs["spot_id"].notna().sum() / spots_mm2
    assert 2000 <= density <= 4000, density
    labels = np.asarray(sdata.labels[TRUTH_LABELS_KEY])
    area = pd.Series(np.bincount(labels.ravel())[1:], index=np.arange(1, labels.max() + 1))
    obs = sdata.tables[TRUTH_TABLE_KEY].obs.set_index("label_id")
    median_area = area.groupby(obs.loc[area.index, "cell_type"].to_numpy(), observed=True).median()
    assert median_area["lymphocyte"] < median_area["macrophage"] < median_area["tumor"]
    # distributions overlap: some lymphocytes are larger than some macrophages
    lym = area[obs.loc[area.index, "cell_type"].to_numpy() == "lymphocyte"]
    mac = area[obs.loc[area.index, "cell_type"].to_numpy() == "macrophage"]
    assert lym.quantile(0.95) > mac.quantile(0.05)


def test_compartments_are_spatially_coherent(tiny_slide):
    sdata, _ = tiny_slide
    truth = sdata.tables[TRUTH_TABLE_KEY]
    _, idx = cKDTree(truth.obsm["spatial"]).query(truth.obsm["spatial"], k=6)
    comp = truth.obs["compartment"].to_numpy()
    same = (comp[idx[:, 1:]] == comp[:, None]).mean()
    chance = (truth.obs["compartment"].value_counts(normalize=True) ** 2).sum()
    assert same > chance + 0.25


def test_reference_is_raw_counts_with_types_and_states(tiny_slide):
    _, reference = tiny_slide
    x = reference.X.toarray()
    assert np.all(x == np.round(x)) and x.min() >= 0
    assert set(reference.obs["cell_type"]) == set(CELL_TYPES)
    assert sum(len(s) >= 2 for s in CELL_STATES.values()) >= 2
    assert set(reference.obs["cell_state"]) == {s for states in CELL_STATES.values() for s in states}


def test_same_seed_same_slide_and_stain_varies_between_seeds():
    a, _ = synthetic_visium(seed=11, preset="tiny", width_um=300, height_um=300, progress=False)
    b, _ = synthetic_visium(seed=11, preset="tiny", width_um=300, height_um=300, progress=False)
    c, _ = synthetic_visium(seed=12, preset="tiny", width_um=300, height_um=300, progress=False)
    np.testing.assert_array_equal(_image(a), _image(b))
    assert np.abs(_image(a).reshape(-1, 3).mean(0) - _image(c).reshape(-1, 3).mean(0)).max() > 1.0


def test_blocks_tile_seamlessly():
    from histocell_sd.datasets._synthetic_cells import make_layout, sample_cells
    from histocell_sd.datasets._synthetic_render import BlockRenderer, random_stain

    rng = np.random.default_rng(0)
    layout = make_layout(rng, 200, 150)
    renderer = BlockRenderer(layout, sample_cells(rng, layout), random_stain(rng), 0.5, seed=0)
    whole_rgb, whole_labels = renderer.render(0, 300, 0, 400)
    left_rgb, left_labels = renderer.render(0, 300, 0, 170)
    right_rgb, right_labels = renderer.render(0, 300, 170, 400)
    np.testing.assert_array_equal(np.hstack([left_labels, right_labels]), whole_labels)
    # pixel noise is drawn per block; the rendered tissue itself is identical
    diff = np.abs(np.hstack([left_rgb, right_rgb]).astype(int) - whole_rgb.astype(int))
    assert np.median(diff) <= 6


def test_resolution_changes_pixels_not_microns():
    lo, _ = synthetic_visium(seed=2, preset="tiny", width_um=300, height_um=300, mpp=0.5, progress=False)
    hi, _ = synthetic_visium(seed=2, preset="tiny", width_um=300, height_um=300, mpp=0.25, progress=False)
    assert _image(hi).shape[0] == 2 * _image(lo).shape[0]
    area_lo = np.bincount(np.asarray(lo.labels[TRUTH_LABELS_KEY]).ravel())[1:].mean() * 0.25
    area_hi = np.bincount(np.asarray(hi.labels[TRUTH_LABELS_KEY]).ravel())[1:].mean() * 0.0625
    assert area_hi == pytest.approx(area_lo, rel=0.1)


def test_unknown_preset_split_and_proportions():
    # own case bare_value_error
    with pytest.raises(hc.InvalidInputError, match="preset"):
        synthetic_visium(preset="huge")
    with pytest.raises(hc.InvalidInputError, match="split must be"):
        hc.datasets.nucls_tile_names("val")


def test_weak_labels_and_the_deprecated_proportions_switch():
    small = {"seed": 3, "preset": "tiny", "width_um": 300.0, "height_um": 300.0, "progress": False}
    without, _ = synthetic_visium(weak_labels=False, **small)
    table = without.tables["table"]
    assert "proportions" not in table.obsm and "state_proportions" not in table.obsm and "true_proportions" in table.obsm
    with pytest.warns(FutureWarning, match=r"synthetic_visium\(proportions=...\) is deprecated; use weak_labels="):
        old, _ = synthetic_visium(proportions=None, **small)
    assert set(old.tables["table"].obsm) == set(table.obsm)
    with pytest.raises(hc.InvalidInputError, match="not both"):
        synthetic_visium(proportions="truth", weak_labels=False, **small)
    with pytest.raises(hc.InvalidInputError, match="weak_labels must be True or False, got 'truth'"):
        synthetic_visium(weak_labels="truth", **small)


def test_nucls_tiles():
    tiles = hc.datasets.nucls("test")
    assert list(tiles) == [f"test_{i}" for i in range(1, 6)]
    sdata = tiles["test_1"]
    hc.io.validate(sdata)
    assert sdata.attrs["mpp"] == hc.datasets.NUCLS_MPP
    assert _image(sdata).shape == (256, 256, 3)
    truth = sdata.tables[TRUTH_TABLE_KEY]
    assert truth.n_obs > 0 and set(truth.obs["cell_type"].cat.categories) == set(hc.datasets.NUCLS_CLASSES)
    assert len(hc.datasets.nucls_tile_names("all")) == 15


def test_brca_m2c_embedded_patches():
    patches = hc.datasets.brca_m2c("test")
    assert len(patches) == 4 and len(hc.datasets.brca_m2c_names("train")) == 2
    # own case brca_embedded_val: brca_m2c("val") without path gave {} silently; a name string was split into characters
    with pytest.raises(hc.InvalidInputError, match="The embedded patches hold no 'val' patch .* pass path="):
        hc.datasets.brca_m2c("val")
    name = hc.datasets.brca_m2c_names("test")[0]
    with pytest.raises(hc.InvalidInputError, match=f"names must be a list of patch names.*use names=\\['{name}'\\]"):
        hc.datasets.brca_m2c(names=name)
    for sdata in patches.values():
        hc.io.validate(sdata)
        assert sdata.attrs["mpp"] == pytest.approx(0.5, abs=0.01)
        truth = sdata.tables[TRUTH_TABLE_KEY]
        assert list(truth.obs["cell_type"].cat.categories) == list(hc.datasets.BRCA_M2C_CLASSES)
        xy = truth.obsm["spatial"]
        height, width = _image(sdata).shape[:2]
        assert (xy >= 0).all() and (xy[:, 0] < width).all() and (xy[:, 1] < height).all()
    rgb, mpp, points = hc.datasets.read_brca_m2c_patch(hc.datasets.brca_m2c_names("test")[0])
    assert rgb.dtype == np.uint8 and rgb.shape[2] == 3 and len(points) == 324  # 89 lymphocytes, 144 tumour, 91 stromal
    assert points["cell_type"].value_counts().to_dict() == {"tumor": 144, "stromal": 91, "lymphocyte": 89}


def test_brca_m2c_bad_inputs(tmp_path):
    with pytest.raises(hc.InvalidInputError, match="split"):
        hc.datasets.brca_m2c_names("holdout")
    with pytest.raises(hc.InvalidInputError, match="not a BRCA-M2C folder"):
        hc.datasets.brca_m2c("test", path=tmp_path)
    with pytest.raises(hc.InvalidInputError, match="No BRCA-M2C patch"):
        hc.datasets.read_brca_m2c_patch("TCGA-nope_1_1_1000_1000_0.93")


def test_pseudo_spots_hold_the_shares_of_annotated_cells():
    sdata = hc.datasets.brca_m2c("test")[hc.datasets.brca_m2c_names("test")[0]]
    hc.datasets.pseudo_spots(sdata)
    spots, table = sdata.shapes["spots"], sdata.tables["table"]
    hc.io.validate(sdata)
    props = table.obsm["proportions"]
    assert list(props.columns) == list(hc.datasets.BRCA_M2C_CLASSES)
    np.testing.assert_allclose(props.sum(1), 1.0)
    radius = spots["radius"].iloc[0]
    assert radius * 2 * sdata.attrs["mpp"] == pytest.approx(55.0)
    height, width = _image(sdata).shape[:2]
    assert ((spots.geometry.x - radius >= 0) & (spots.geometry.x + radius <= width)).all()  # wholly inside
    # recount the first spot by hand
    truth = sdata.tables[TRUTH_TABLE_KEY]
    xy = truth.obsm["spatial"]
    inside = np.hypot(xy[:, 0] - spots.geometry.x.iloc[0], xy[:, 1] - spots.geometry.y.iloc[0]) <= radius
    counts = truth.obs["cell_type"][inside].value_counts(normalize=True).reindex(props.columns, fill_value=0)
    np.testing.assert_allclose(props.iloc[0].to_numpy(), counts.to_numpy())
    assert table.obs["n_cells"].iloc[0] == inside.sum()
    with pytest.raises(hc.InvalidInputError, match="overwrite=True"):
        hc.datasets.pseudo_spots(sdata)
    hc.datasets.pseudo_spots(sdata, spot_diameter_um=100.0, pitch_um=110.0, overwrite=True)
    assert table is not sdata.tables["table"] and sdata.tables["table"].obs["n_cells"].mean() > 3 * table.obs["n_cells"].mean()
    large = sdata.tables["table"]
    with pytest.warns(FutureWarning, match=r"pseudo_spots\(diameter_um=...\) is deprecated; use spot_diameter_um="):
        hc.datasets.pseudo_spots(sdata, diameter_um=100.0, pitch_um=110.0, overwrite=True)  # the old name
    assert sdata.tables["table"].obs["n_cells"].equals(large.obs["n_cells"])
    with pytest.raises(hc.InvalidInputError, match="not both"):
        hc.datasets.pseudo_spots(sdata, diameter_um=100.0, spot_diameter_um=80.0, overwrite=True)


def test_pseudo_spots_refuse_when_none_qualifies():
    sdata = hc.datasets.brca_m2c("test")[hc.datasets.brca_m2c_names("test")[0]]
    with pytest.raises(hc.InvalidInputError, match="No 55.0 µm pseudo-spot"):
        hc.datasets.pseudo_spots(sdata, min_cells=10_000)
    assert "spots" not in sdata.shapes and "table" not in sdata.tables
    with pytest.raises(hc.InvalidInputError, match="No annotated cells"):
        hc.datasets.pseudo_spots(sdata, truth_table_key="missing")
