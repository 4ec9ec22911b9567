"""Visium HD: read_visium_hd on the synthetic Space Ranger HD folder, square spots, and their assignment."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import geopandas as gpd
import numpy as np
import pandas as pd
import pytest
import scanpy as sc
import shapely
from scipy import sparse
from spatialdata.models import ShapesModel
from spatialdata.transformations import get_transformation

import histocell_sd as hc
from histocell_sd import InvalidInputError
from histocell_sd.datasets._synthetic_hd import write_10x_h5
from histocell_sd.io._spots import SQUARE, spot_geometry, spot_ids_of_points, spot_of_points, square_spots_element
from histocell_sd.io._visium_hd import grid_angle

MPP = 0.5


@pytest.fixture(scope="module")
def hd_folder(tmp_path_factory):
    path, truth, reference = hc.datasets.synthetic_visium_hd(tmp_path_factory.mktemp("hd") / "outs", seed=1, progress=False)
    return path, truth, reference


@pytest.fixture(scope="module")
def hd8(hd_folder):
    return hc.io.read_visium_hd(hd_folder[0], bin_size_um=8)


def _copy(hd_folder, tmp_path) -> Path:
    target = tmp_path / "outs"
    shutil.copytree(hd_folder[0], target)
    return target


def _row_col(barcode: str) -> tuple[int, int]:
    """``s_008um_<row>_<col>-1`` -> (row, col)."""
    _, _, row, col = barcode.removesuffix("-1").split("_")
    return int(row), int(col)


def _files(path: Path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*"))


# ------------------------------------------------------------------------------------------------ reader
@pytest.mark.parametrize("size", [8, 16])
def test_bins_hold_the_2um_counts(hd_folder, size):
    path = hd_folder[0]
    fine = sc.read_10x_h5(path / "binned_outputs" / "square_002um" / "filtered_feature_bc_matrix.h5")
    sdata = hc.io.read_visium_hd(path, bin_size_um=size)
    table = sdata.tables["table"]
    assert sparse.issparse(table.X)
    assert table.X.sum() == pytest.approx(fine.X.sum()) and fine.X.sum() > 0
    np.testing.assert_allclose(np.asarray(table.X.sum(axis=0)).ravel(), np.asarray(fine.X.sum(axis=0)).ravel())
    # a coarse bin holds the sum of its (size / 2)² fine bins
    rows, cols = np.array([_row_col(b) for b in fine.obs_names]).T
    k = size // 2
    target = next(b for b in table.obs_names[table.X.sum(axis=1).A1 > 0])
    r, c = _row_col(target)
    members = (rows // k == r) & (cols // k == c)
    np.testing.assert_allclose(table[target].X.toarray().ravel(), np.asarray(fine.X[members].sum(axis=0)).ravel())


def test_read_visium_hd_layout(hd8):
    sdata = hd8
    hc.io.validate(sdata, require_spots=True)
    assert sdata.attrs["mpp"] == MPP and sdata.attrs["bin_size_um"] == 8
    table, spots = sdata.tables["table"], sdata.shapes["spots"]
    assert list(spots.index) == list(table.obs_names) and spots.index.name == "spot_id"
    assert {"array_row", "array_col", "in_tissue"} <= set(table.obs.columns) and "location_id" not in table.obs
    side = 8 / MPP
    np.testing.assert_array_equal(spots["side"], side)
    # bin (row r, col c) of 8 µm spans [8c, 8c + 8) × [8r, 8r + 8) µm: its centre, corners and µm system
    for barcode in table.obs_names[[0, len(table) // 2, -1]]:
        r, c = _row_col(barcode)
        centre = np.array([(c + 0.5) * side, (r + 0.5) * side])
        np.testing.assert_allclose(table[barcode].obsm["spatial"][0], centre)
        np.testing.assert_allclose(table[barcode].obsm["spatial_um"][0], centre * MPP)
        assert spots.geometry[barcode].bounds == pytest.approx((c * side, r * side, (c + 1) * side, (r + 1) * side))
        to_um = get_transformation(spots, "um").to_affine_matrix(("x", "y"), ("x", "y"))
        corner_um = to_um @ np.array([c * side, r * side, 1.0])
        np.testing.assert_allclose(corner_um[:2], [8 * c, 8 * r])
    geometry = spot_geometry(spots)
    assert geometry.shape == SQUARE
    np.testing.assert_allclose(geometry.centers, table.obsm["spatial"])
    assert get_transformation(sdata.images["he"], "um") is not None


def test_truth_bins_match_square_assignment(hd_folder, hd8):
    truth = hd_folder[1].tables["truth_nuclei"]
    ids = spot_ids_of_points(hd8.shapes["spots"], truth.obsm["spatial"])
    expected = truth.obs["square_008um"].to_numpy()
    pd.testing.assert_series_equal(ids.reset_index(drop=True), pd.Series(expected, dtype=object), check_names=False)
    assert pd.notna(expected).mean() > 0.9


def test_store_nuclei_assigns_squares(hd_folder, hd8):
    sdata = hc.io.read_visium_hd(hd_folder[0], bin_size_um=16)
    labels = hd_folder[1].labels["truth_labels"].data.compute()
    hc.pp.store_nuclei(sdata, labels)
    nuclei = sdata.tables["histocell"]
    hc.io.validate(sdata)
    assert nuclei.obs["spot_id"].notna().mean() > 0.9
    xy = nuclei.obsm["spatial"]
    col, row = np.floor(xy[:, 0] * MPP / 16).astype(int), np.floor(xy[:, 1] * MPP / 16).astype(int)
    named = nuclei.obs["spot_id"].notna().to_numpy()
    expected = [f"s_016um_{r:05d}_{c:05d}-1" for r, c in zip(row[named], col[named])]
    assert list(nuclei.obs["spot_id"].astype(str)[named]) == expected


def test_zarr_round_trip(hd8, tmp_path):
    hc.io.write_zarr(hd8, tmp_path / "hd.zarr")
    back = hc.io.read_zarr(tmp_path / "hd.zarr")
    hc.io.validate(back, require_spots=True)
    assert back.attrs["bin_size_um"] == 8
    pd.testing.assert_series_equal(back.shapes["spots"]["side"], hd8.shapes["spots"]["side"])
    points = np.random.default_rng(0).uniform(0, 800, size=(500, 2))
    pd.testing.assert_series_equal(spot_ids_of_points(back.shapes["spots"], points), spot_ids_of_points(hd8.shapes["spots"], points))
    assert (back.tables["table"].X != hd8.tables["table"].X).nnz == 0


def test_synthetic_visium_hd_is_deterministic_and_refuses_overwrite(hd_folder, tmp_path):
    path, truth, _ = hc.datasets.synthetic_visium_hd(tmp_path / "again", seed=1, progress=False)
    for size in (2, 8, 16):
        name = f"binned_outputs/square_{size:03d}um/filtered_feature_bc_matrix.h5"
        a, b = sc.read_10x_h5(hd_folder[0] / name), sc.read_10x_h5(path / name)
        assert list(a.obs_names) == list(b.obs_names) and (a.X != b.X).nnz == 0
    pd.testing.assert_frame_equal(truth.tables["truth_nuclei"].obs, hd_folder[1].tables["truth_nuclei"].obs)
    with pytest.raises(InvalidInputError, match="exists"):
        hc.datasets.synthetic_visium_hd(path, seed=1, progress=False)
    other = tmp_path / "mine"
    other.mkdir()
    with pytest.raises(InvalidInputError, match="not a folder written by"):
        hc.datasets.synthetic_visium_hd(other, overwrite=True, progress=False)


def test_synthetic_counts_are_low_and_sparse(hd_folder):
    fine = sc.read_10x_h5(hd_folder[0] / "binned_outputs" / "square_002um" / "filtered_feature_bc_matrix.h5")
    per_bin = fine.X.sum(axis=1).A1
    assert 0 < np.median(per_bin[per_bin > 0]) < 20  # a few UMIs per 2 µm bin, as Visium HD
    assert fine.X.nnz < 0.2 * fine.n_obs * fine.n_vars


# ------------------------------------------------------------------------------------------- bad input
def test_missing_alignment(hd_folder, tmp_path):
    path = _copy(hd_folder, tmp_path)
    (path / "binned_outputs/square_008um/spatial/scalefactors_json.json").unlink()
    before = _files(path)
    with pytest.raises(InvalidInputError, match="no image alignment"):
        hc.io.read_visium_hd(path, bin_size_um=8)
    assert _files(path) == before
    factors = path / "binned_outputs/square_016um/spatial/scalefactors_json.json"
    values = json.loads(factors.read_text())
    del values["microns_per_pixel"]
    factors.write_text(json.dumps(values))
    with pytest.raises(InvalidInputError, match="no image alignment"):
        hc.io.read_visium_hd(path, bin_size_um=16)


def test_missing_fullres_image(hd_folder, tmp_path):
    path = _copy(hd_folder, tmp_path)
    (path / "tissue_image.tif").unlink()
    with pytest.raises(InvalidInputError, match="no full-resolution H&E"):
        hc.io.read_visium_hd(path)
    with pytest.raises(InvalidInputError, match="does not exist"):
        hc.io.read_visium_hd(path, fullres_image_file="missing.tif")


def test_unknown_bin_size(hd_folder):
    with pytest.raises(InvalidInputError, match=r"no 4 µm bins; it has bin sizes \[2, 8, 16\]"):
        hc.io.read_visium_hd(hd_folder[0], bin_size_um=4)
    with pytest.raises(InvalidInputError, match="whole number"):
        hc.io.read_visium_hd(hd_folder[0], bin_size_um=8.5)


def test_zero_counts_everywhere(hd_folder, tmp_path):
    path = _copy(hd_folder, tmp_path)
    file = path / "binned_outputs/square_008um/filtered_feature_bc_matrix.h5"
    bins = sc.read_10x_h5(file)
    write_10x_h5(file, bins.obs_names, sparse.csr_matrix(bins.shape, dtype=np.float32), bins.var_names)
    with pytest.raises(InvalidInputError, match="zero counts everywhere"):
        hc.io.read_visium_hd(path, bin_size_um=8)


def test_not_a_visium_hd_folder(tmp_path):
    with pytest.raises(InvalidInputError, match="does not exist"):
        hc.io.read_visium_hd(tmp_path / "nothing")
    with pytest.raises(InvalidInputError, match="no Visium HD bins"):
        hc.io.read_visium_hd(tmp_path)


# ------------------------------------------------------------------------------------- square geometry
def _grid(side=10.0, n=3, angle=0.0, origin=(0.0, 0.0)):
    u = np.array([np.cos(angle), np.sin(angle)])
    v = np.array([-u[1], u[0]])
    r, c = np.divmod(np.arange(n * n), n)
    centres = np.asarray(origin) + ((c + 0.5) * side)[:, None] * u + ((r + 0.5) * side)[:, None] * v
    ids = [f"r{i}c{j}" for i, j in zip(r, c)]
    return square_spots_element(centres, side, ids, mpp=MPP, angle=angle), r, c


def test_edges_and_corners_go_to_one_bin():
    spots, _, _ = _grid()
    points = np.array([
        [15.0, 15.0],  # interior of r1c1
        [10.0, 15.0],  # edge between r1c0 and r1c1 -> +x side
        [15.0, 20.0],  # edge between r1c1 and r2c1 -> +y side
        [10.0, 10.0],  # corner of 4 bins -> +x/+y bin
        [0.0, 0.0],  # outer corner of r0c0
        [30.0, 15.0],  # right outer edge of r1c2 (closed squares: it still holds it)
        [31.0, 15.0],  # outside every bin
        [-5.0, -5.0],
    ])
    ids = spot_ids_of_points(spots, points)
    assert ids.iloc[:6].tolist() == ["r1c1", "r1c1", "r2c1", "r1c1", "r0c0", "r1c2"]
    assert ids.iloc[6:].isna().all()


def test_square_assignment_agrees_with_shapely_on_random_points():
    rng = np.random.default_rng(0)
    for angle in (0.0, 0.3, -1.1):
        spots, _, _ = _grid(side=7.0, n=6, angle=angle, origin=(20.0, 5.0))
        points = rng.uniform(-10, 70, size=(4000, 2))
        ours = spot_of_points(spot_geometry(spots), points)
        pts = shapely.points(points)
        tree = shapely.STRtree(spots.geometry.to_numpy())
        point_idx, square_idx = tree.query(pts, predicate="within")
        reference = np.full(len(points), -1)
        reference[point_idx] = square_idx
        assert np.bincount(point_idx, minlength=len(points)).max() <= 1  # squares that tile: at most one holds a point
        np.testing.assert_array_equal(ours, reference)
        assert (ours >= 0).sum() > 500 and (ours < 0).sum() > 500


def test_squares_in_any_vertex_order():
    """Squares made by buffering points (spatialdata-io's bins_as_squares) are read with the same frame."""
    spots, _, _ = _grid()
    centres = spot_geometry(spots).centers
    buffered = gpd.GeoDataFrame({"side": 10.0}, geometry=shapely.buffer(shapely.points(centres), 5.0, cap_style="square"),
                                index=spots.index)
    buffered = ShapesModel.parse(buffered)
    points = np.array([[10.0, 15.0], [10.0, 10.0], [15.0, 20.0], [3.0, 27.0]])
    assert spot_ids_of_points(buffered, points).tolist() == spot_ids_of_points(spots, points).tolist()


def test_rotated_bins_from_the_grid():
    spots, r, c = _grid(side=16.0, n=5, angle=0.2, origin=(100.0, 40.0))
    centres = spot_geometry(spots).centers
    assert grid_angle(c, r, centres) == pytest.approx(0.2)
    assert grid_angle(c, r, centres[:, ::-1]) == pytest.approx(np.pi / 2 - 0.2)  # x and y swapped: the other axis
    assert grid_angle(np.zeros(4), np.arange(4), centres[:4]) == 0.0  # one column: no frame to fit


def test_bad_spot_geometry_is_refused():
    spots, _, _ = _grid()
    with pytest.raises(InvalidInputError, match="circles .* or squares"):
        spot_geometry(spots.drop(columns="side"))
    wrong = spots.copy()
    wrong["side"] = 12.0
    with pytest.raises(InvalidInputError, match="not squares"):
        spot_geometry(wrong)
    rectangles = gpd.GeoDataFrame({"side": 10.0}, geometry=[shapely.box(0, 0, 10, 5)], index=["a"])
    with pytest.raises(InvalidInputError, match="not squares"):
        spot_geometry(rectangles)


# ---------------------------------------------------------------------------------------------------- plots
def test_spot_proportions_draws_the_bins_as_squares(hd_folder):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sdata = hc.io.read_visium_hd(hd_folder[0], bin_size_um=16)
    truth = hd_folder[1].tables["truth_nuclei"]
    table = sdata.tables["table"]
    types = list(hc.datasets.CELL_TYPES)
    holding = pd.crosstab(truth.obs["square_016um"].to_numpy(), truth.obs["cell_type"].to_numpy())
    counts = holding.reindex(index=table.obs_names, columns=types, fill_value=0).astype(float)
    counts[counts.sum(axis=1) == 0] = 1.0
    table.obsm["proportions"] = counts.div(counts.sum(axis=1), axis=0)
    extent = (200.0, 600.0, 200.0, 600.0)
    ax = hc.pl.spot_proportions(sdata, cell_type="tumor", extent=extent, fill_alpha=1.0, vmin=0, vmax=1)
    squares = [c for c in ax.collections if len(c.get_paths()) > 1]
    assert len(squares) == 1
    collection = squares[0]
    to_data = collection.get_transform() - ax.transData
    boxes = np.array([[*to_data.transform(p.vertices).min(axis=0), *to_data.transform(p.vertices).max(axis=0)] for p in collection.get_paths()])
    side = 16 / MPP
    np.testing.assert_allclose(boxes[:, 2] - boxes[:, 0], side, atol=1e-6)  # squares of the bin side, along the axes
    np.testing.assert_allclose(boxes[:, 3] - boxes[:, 1], side, atol=1e-6)
    np.testing.assert_allclose(boxes[:, :2] % side, 0, atol=1e-6)  # on the bin grid
    # each drawn square is coloured by its own bin's tumour proportion
    centres = (boxes[:, :2] + boxes[:, 2:]) / 2
    drawn = spot_ids_of_points(sdata.shapes["spots"], centres)
    expected = plt.get_cmap("viridis")(table.obsm["proportions"].loc[drawn.to_numpy(), "tumor"].to_numpy())
    np.testing.assert_allclose(collection.get_facecolors()[:, :3], expected[:, :3], atol=0.02)
    assert (table.obsm["proportions"].loc[drawn.to_numpy(), "tumor"] == 1).any()
    plt.close("all")


# ----------------------------------------------------------------------------------- training bags from bins
def test_fit_and_predict_on_square_bins(hd_folder):
    from histocell_sd.models import HistoCell
    from histocell_sd.models._samples import prepare_sample

    sdata = hc.io.read_visium_hd(hd_folder[0], bin_size_um=16)
    hc.pp.store_nuclei(sdata, hd_folder[1].labels["truth_labels"].data.compute())
    table, nuclei = sdata.tables["table"], sdata.tables["histocell"]
    holding = table.obs_names.isin(nuclei.obs["spot_id"].dropna().astype(str))
    table.obsm["proportions"] = pd.DataFrame(np.tile([0.7, 0.3], (table.n_obs, 1)), index=table.obs_names, columns=["a", "b"])
    model = HistoCell(["a", "b"])
    sample = prepare_sample(model.settings, sdata, proportions_key="proportions", state_key=None, spots_table_key=None,
                            nuclei_table_key=None, image_key=None, progress=False, spot_bags="centroid")
    assert len(sample.spot_nuclei) == holding.sum()  # one bag per bin holding a nucleus centroid
    bins = table.obs_names[holding]
    np.testing.assert_allclose(np.sort(sample.spot_xy_um, axis=0), np.sort(table[bins].obsm["spatial_um"], axis=0))
    model.fit(sdata, epochs=1, state_epochs=0, self_training_epochs=0, progress=False)
    hc.tl.predict(sdata, model, progress=False)
    predicted = table.obsm["histocell_proportions"]
    assert list(predicted.index[predicted.notna().all(axis=1)]) == list(bins)
    with pytest.warns(UserWarning, match="hold no nuclei"):  # the bins without a nucleus centroid
        hc.tl.refine_deconvolution(sdata, progress=False)  # from obsm["proportions"] and the nucleus probabilities
    refined = table.obsm["refined_proportions"]
    assert refined.notna().all(axis=None) and np.allclose(refined.sum(axis=1), 1)
    assert not np.allclose(refined.loc[bins], table.obsm["proportions"].loc[bins])  # bins with nuclei moved
