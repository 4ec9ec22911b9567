"""Tests of slide-scale nucleus segmentation (segment_nuclei) and of store_nuclei."""

import numpy as np
import pytest
from scipy.spatial import cKDTree
from skimage.draw import disk
from spatialdata import SpatialData
from spatialdata.models import Image2DModel

import histocell_sd as hc
from histocell_sd import InvalidInputError
from histocell_sd.io import from_arrays, validate
from histocell_sd.pp import FEATURES, detection_scores, match_points, segment_nuclei, store_nuclei

MATCH_UM = 3.0


@pytest.fixture(scope="module")
def slide(tiny_slide):
    """A copy-free view of the tiny slide's image and truth, segmented once in one tile."""
    sdata, _ = tiny_slide
    sub = hc.io.from_arrays(
        np.asarray(sdata.images["he"]["scale0"]["image"].values).transpose(1, 2, 0),
        sdata.attrs["mpp"],
        spot_centers=np.column_stack([sdata.shapes["spots"].geometry.x, sdata.shapes["spots"].geometry.y]),
    )
    segment_nuclei(sub, tile_size_px=4096, progress=False)
    return sub, sdata.tables["truth_nuclei"].obsm["spatial"]


def test_seams_keep_each_nucleus_once(slide):
    whole, _ = slide
    mpp = whole.attrs["mpp"]
    image = np.asarray(whole.images["he"]["scale0"]["image"].values).transpose(1, 2, 0)
    one, tiled = from_arrays(image, mpp), from_arrays(image, mpp)
    segment_nuclei(one, method="classical", tile_size_px=4096, threshold=0.06, progress=False)  # same level in both runs
    segment_nuclei(tiled, method="classical", tile_size_px=300, overlap_um=32.0, n_jobs=2, threshold=0.06, progress=False)
    a, b = one.tables["histocell"].obsm["spatial"], tiled.tables["histocell"].obsm["spatial"]
    assert not cKDTree(b).query_pairs(1.0 / mpp)  # no duplicates
    matched = len(match_points(b, a, max_dist=1.0 / mpp)[0])
    assert matched >= 0.97 * len(a) and abs(len(a) - len(b)) <= 0.02 * len(a)


def test_detection_f1_on_synthetic(slide):
    sdata, truth = slide
    scores = detection_scores(sdata.tables["histocell"].obsm["spatial"], truth, max_dist=MATCH_UM / sdata.attrs["mpp"])
    assert scores["f1"] >= 0.80


def test_detection_f1_on_nucls_test_tiles():
    matched = n_pred = n_true = 0
    for sdata in hc.datasets.nucls("test").values():
        segment_nuclei(sdata, progress=False)
        scores = detection_scores(
            sdata.tables["histocell"].obsm["spatial"], sdata.tables["truth_nuclei"].obsm["spatial"], max_dist=MATCH_UM / 0.25
        )
        matched, n_pred, n_true = matched + scores["n_matched"], n_pred + scores["n_pred"], n_true + scores["n_true"]
    assert 2 * matched / (n_pred + n_true) >= 0.80


def test_resolution_invariance():
    areas = []
    for mpp in (0.25, 0.5):
        sdata, _ = hc.datasets.synthetic_visium(seed=11, preset="tiny", mpp=mpp, width_um=300, height_um=300, progress=False)
        segment_nuclei(sdata, progress=False)
        areas.append(np.median(sdata.tables["histocell"].to_df()["area_um2"]))
    assert areas[0] == pytest.approx(areas[1], rel=0.10)


def test_white_image_warns_and_writes_nothing():
    sdata = from_arrays(np.full((600, 700, 3), 255, dtype=np.uint8), 0.5)
    with pytest.warns(UserWarning, match="No nuclei"):
        segment_nuclei(sdata, tile_size_px=256, progress=False)
    assert "nuclei" not in sdata.shapes and "histocell" not in sdata.tables
    validate(sdata)


def _disk_sample(mpp=0.5, radius_px=20):
    image = np.full((300, 400, 3), 235, dtype=np.uint8)
    labels = np.zeros(image.shape[:2], dtype=np.int32)
    for label, (cy, cx) in ((3, (100, 100)), (7, (200, 300))):
        rr, cc = disk((cy, cx), radius_px)
        labels[rr, cc] = label
        image[rr, cc] = (70, 50, 150)
    spots = np.array([[100.5, 100.5], [300.5, 50.0]])  # (x, y): the first holds nucleus 3, none holds nucleus 7
    return from_arrays(image, mpp, spot_centers=spots, spot_diameter_um=30.0), labels


def test_features_in_um_and_spot_ids():
    sdata, labels = _disk_sample()
    store_nuclei(sdata, labels, labels_key="nuclei_labels")
    table = sdata.tables["histocell"]
    assert list(table.var_names) == list(FEATURES)
    assert list(sdata.shapes["nuclei"].index) == ["nucleus_3", "nucleus_7"] == list(table.obs["nucleus_id"])
    df = table.to_df()
    assert df["area_um2"].to_numpy() == pytest.approx(np.pi * (20 * 0.5) ** 2, rel=0.05)
    assert df["perimeter_um"].to_numpy() == pytest.approx(2 * np.pi * 20 * 0.5, rel=0.05)
    assert df["major_axis_um"].to_numpy() == pytest.approx(20.0, rel=0.05)
    assert (df["eccentricity"] < 0.1).all() and (df["solidity"] > 0.95).all()
    assert (df["h_mean"] > df["e_mean"]).all()
    np.testing.assert_allclose(table.obsm["spatial"], [[100.5, 100.5], [300.5, 200.5]])
    assert table.obs["spot_id"].iloc[0] == sdata.shapes["spots"].index[0]
    assert table.obs["spot_id"].isna().iloc[1]
    assert table.uns["histocell"]["mpp"] == 0.5
    assert "nuclei_labels" in sdata.labels
    validate(sdata)


def test_store_nuclei_window_offset():
    sdata, labels = _disk_sample()
    store_nuclei(sdata, labels[50:250, 30:200], offset=(30, 50))  # (x, y), as read_nuclei's offset
    table = sdata.tables["histocell"]
    assert table.n_obs == 1
    np.testing.assert_allclose(table.obsm["spatial"], [[100.5, 100.5]])
    x0, y0, x1, y1 = sdata.shapes["nuclei"].total_bounds
    assert 79 <= x0 <= 82 and 119 <= x1 <= 122 and 79 <= y0 <= 82
    # the former origin=(y, x) still works, with a FutureWarning; both at once are refused
    again, _ = _disk_sample()
    with pytest.warns(FutureWarning, match="use offset=\\(x, y\\)"):
        store_nuclei(again, labels[50:250, 30:200], origin=(50, 30))
    np.testing.assert_allclose(again.tables["histocell"].obsm["spatial"], [[100.5, 100.5]])
    with pytest.raises(InvalidInputError, match="not both"):
        store_nuclei(again, labels[50:250, 30:200], offset=(30, 50), origin=(50, 30))
    with pytest.raises(InvalidInputError, match="offset must be"):
        store_nuclei(again, labels, offset=5)


def test_segment_nuclei_on_drawn_disks_and_labels_key():
    sdata, _ = _disk_sample(radius_px=12)
    segment_nuclei(sdata, method="classical", tile_size_px=256, progress=False, labels_key="seg")  # drawn disks, not H&E
    df = sdata.tables["histocell"].to_df()
    assert len(df) == 2
    assert df["area_um2"].to_numpy() == pytest.approx(np.pi * 6.0**2, rel=0.10)
    assert sdata.labels["seg"].shape == (300, 400)
    validate(sdata)


def test_custom_segmenter_goes_through_tiling_and_features():
    """A user's own model (e.g. StarDist/Cellpose from local weights) plugs in as a function (rgb, mpp) -> labels."""
    sdata, _ = _disk_sample(radius_px=12)
    calls = []

    def threshold_segmenter(rgb, mpp, level=100):
        calls.append(rgb.shape)
        from skimage.measure import label

        return label(rgb.mean(axis=2) < level)

    segment_nuclei(sdata, method=threshold_segmenter, tile_size_px=256, level=120, progress=False)
    df = sdata.tables["histocell"].to_df()
    assert len(calls) > 1  # tiled
    assert len(df) == 2  # each disk once, across seams
    assert df["area_um2"].to_numpy() == pytest.approx(np.pi * 6.0**2, rel=0.10)
    assert sdata.tables["histocell"].uns["histocell"]["method"] == "segment_nuclei:threshold_segmenter"


def test_bad_inputs():
    sdata, _ = _disk_sample()
    with pytest.raises(InvalidInputError, match="never downloads weights"):
        segment_nuclei(sdata, method="stardist", progress=False)
    with pytest.raises(InvalidInputError, match="non-negative integer instance ids"):
        segment_nuclei(sdata, method=lambda rgb, mpp: np.zeros((5, 5), np.int32), progress=False)
    with pytest.raises(InvalidInputError, match="default"):
        segment_nuclei(sdata, method="otsu", progress=False)
    with pytest.raises(InvalidInputError, match="tile_size_px"):
        segment_nuclei(sdata, tile_size_px=20, progress=False)
    with pytest.raises(InvalidInputError, match="outside"):
        store_nuclei(sdata, np.zeros((300, 400), dtype=np.int32), offset=(0, 10))
    float_image = SpatialData(
        images={"he": Image2DModel.parse(np.zeros((3, 64, 64), dtype=np.float32), dims=("c", "y", "x"))}, attrs={"mpp": 0.5}
    )
    with pytest.raises(InvalidInputError, match="uint8"):
        segment_nuclei(float_image, progress=False)


# ---------------------------------------------------------------------------- reliability cases (tests/RELIABILITY.md)
@pytest.fixture(scope="module")
def tiny_rgb(tiny_slide):
    sdata, _ = tiny_slide
    return np.asarray(hc.io.get_image(sdata).data).transpose(1, 2, 0), sdata.attrs["mpp"]


def _count(rgb, mpp, **kwargs):
    sdata = from_arrays(rgb, mpp)
    segment_nuclei(sdata, progress=False, **kwargs)
    return sdata.tables["histocell"].n_obs if "histocell" in sdata.tables else 0


@pytest.mark.slow
@pytest.mark.parametrize("method", ["default", "classical"])
def test_black_padding_and_tiling_do_not_change_the_nuclei(tiny_rgb, method):
    # cases.md: seg_black_border, seg_black_border_small, seg_single_vs_multi_tile_f1 (counts)
    rgb, mpp = tiny_rgb
    plain = _count(rgb, mpp, method=method)
    blob = rgb.copy()
    blob[200:260, 200:260] = 0
    for image in (np.pad(rgb, ((5, 5), (5, 5), (0, 0))), np.pad(rgb, ((100, 100), (100, 100), (0, 0))), blob):
        assert abs(_count(image, mpp, method=method) - plain) <= 0.03 * plain
    for tile in (1024, 512):  # one tile or many: the same nuclei (classical: one slide-wide level)
        assert abs(_count(rgb, mpp, method=method, tile_size_px=tile) - plain) <= 0.01 * plain


def test_noise_is_not_tissue():
    # cases.md: seg_noise
    noise = np.random.default_rng(0).integers(0, 256, (512, 512, 3), dtype=np.uint8)
    assert _count(noise, 0.5) < 50  # the learnt default; the classical pipeline still finds blobs in noise


def test_absurd_resolution_is_refused_before_any_work(tiny_rgb):
    # cases.md: seg_mpp_wrong_large
    rgb, _ = tiny_rgb
    for method in ("default", "classical"):
        sdata = from_arrays(rgb[:256, :256], 5.0)  # 10x mis-declared: would upsample to 2560 px tiles
        with pytest.raises(InvalidInputError, match="resamples by at most"):
            segment_nuclei(sdata, method=method, progress=False)


def test_key_collisions_are_refused_and_change_nothing():
    # cases.md: seg_key_collision, seg_key_collision_state, seg_table_collision
    sdata, _ = _disk_sample(radius_px=12)
    spots_before = sdata.shapes["spots"].copy()
    with pytest.raises(InvalidInputError, match="were not written by a segmentation"):
        segment_nuclei(sdata, method="classical", key_added="spots", progress=False)
    with pytest.raises(InvalidInputError, match="were not written by a segmentation"):
        segment_nuclei(sdata, method="classical", nuclei_table_key="table", progress=False)
    with pytest.raises(InvalidInputError, match="must differ"):
        segment_nuclei(sdata, method="classical", labels_key="histocell", progress=False)
    assert sdata.shapes["spots"].equals(spots_before) and "radius" in sdata.shapes["spots"]
    assert sorted(sdata.tables) == ["table"]
    segment_nuclei(sdata, method="classical", tile_size_px=256, progress=False)
    segment_nuclei(sdata, method="classical", tile_size_px=256, progress=False)  # its own earlier nuclei: replaced
    assert sdata.tables["histocell"].n_obs == 2


def test_blank_image_removes_only_earlier_nuclei():
    # own case seg_empty_says_removed
    # cases.md: seg_blank_removes_table
    sdata, _ = _disk_sample(radius_px=12)
    segment_nuclei(sdata, method="classical", tile_size_px=256, progress=False)
    blank = from_arrays(np.full((300, 400, 3), 235, dtype=np.uint8), 0.5, spot_centers=np.array([[100.5, 100.5]]), spot_diameter_um=30.0)
    blank.shapes["nuclei"], blank.tables["histocell"] = sdata.shapes["nuclei"], sdata.tables["histocell"]
    with pytest.warns(UserWarning, match=r"No nuclei found.*nothing was written; the earlier nuclei \[.histocell., .nuclei.\] were removed"):
        segment_nuclei(blank, method="classical", progress=False)
    assert sorted(blank.tables) == ["table"] and "nuclei" not in blank.shapes  # the spots table survives


def test_n_jobs_keeps_nucleus_ids(tiny_rgb):
    # cases.md: det_seg_njobs, det_seg_njobs2_repeat
    rgb, mpp = tiny_rgb
    runs = []
    for n_jobs in (1, 2, 2):
        sdata = from_arrays(rgb, mpp)
        segment_nuclei(sdata, method="classical", tile_size_px=400, n_jobs=n_jobs, progress=False)
        runs.append(sdata.tables["histocell"])
    for other in runs[1:]:
        assert list(other.obs_names) == list(runs[0].obs_names)
        np.testing.assert_array_equal(other.obsm["spatial"], runs[0].obsm["spatial"])


def test_missing_spot_stays_missing_through_zarr(tmp_path):
    # cases.md: rt_spot_id_nan
    sdata, labels = _disk_sample()
    store_nuclei(sdata, labels)
    path = hc.io.write_zarr(sdata, tmp_path / "s.zarr")
    back = hc.io.read_zarr(path).tables["histocell"].obs["spot_id"]
    assert back.isna().tolist() == [False, True]
    assert "nan" not in back.astype(str).replace("nan", np.nan).dropna().tolist()


def _ellipse_sample(mpp=0.5):
    """Textured H&E-like image with ellipses at many angles, a diagonal line (equal variances), a
    single pixel, a two-part nucleus and gaps in the ids; the raster crosses several row bands."""
    from skimage.draw import ellipse

    rng = np.random.default_rng(3)
    image = rng.integers(150, 250, size=(170, 260, 3), dtype=np.uint8)
    labels = np.zeros(image.shape[:2], dtype=np.int32)
    for k, angle in enumerate(np.linspace(-np.pi / 2, np.pi / 2, 13)):
        rr, cc = ellipse(20 + 40 * (k // 6), 20 + 40 * (k % 6), 7 + k % 3, 14 - k % 4, shape=labels.shape, rotation=angle)
        labels[rr, cc] = 2 * k + 5
    labels[np.arange(130, 140), np.arange(20, 30)] = 100  # mu_rr == mu_cc, mu_rc > 0
    labels[np.arange(130, 140), np.arange(70, 60, -1)] = 101  # mu_rr == mu_cc, mu_rc < 0
    labels[150, 100] = 102
    labels[130:140, 120:150] = 103  # a horizontal bar: orientation ±π/2
    labels[150:160, 180:186] = labels[150:153, 200:203] = 104  # two parts
    dark = labels > 0
    image[dark] = (rng.integers(40, 110, size=(dark.sum(), 3))).astype(np.uint8)
    return from_arrays(image, mpp), labels, image


def test_features_equal_skimage_regionprops(monkeypatch):
    """The band-streamed moments and stain statistics equal skimage's regionprops_table on the same raster."""
    from scipy import stats
    from skimage.color import rgb2hed
    from skimage.measure import regionprops_table

    import histocell_sd.io._nuclei_store as nuclei_module

    monkeypatch.setattr(nuclei_module, "_BAND_ROWS", 7)  # many bands: nuclei straddle band edges
    sdata, labels, image = _ellipse_sample()
    mpp = sdata.attrs["mpp"]
    store_nuclei(sdata, labels)
    table = sdata.tables["histocell"]
    df = table.to_df()
    hed = rgb2hed(image)
    labels = labels.copy()
    labels[150:153, 200:203] = 0  # the second part of nucleus 104 (2.25 µm²) is a fragment: store_nuclei drops it
    ref = regionprops_table(
        labels, hed[..., :2],
        properties=("label", "area", "centroid", "eccentricity", "axis_major_length", "axis_minor_length",
                    "orientation", "intensity_mean", "intensity_std"),
    )
    assert list(table.obs_names) == [f"nucleus_{i}" for i in ref["label"]]
    # float32 storage of the table: relative 1e-5
    np.testing.assert_allclose(df["area_um2"], ref["area"] * mpp**2, rtol=1e-6)
    np.testing.assert_allclose(table.obsm["spatial"], np.column_stack([ref["centroid-1"], ref["centroid-0"]]) + 0.5, rtol=1e-12)
    np.testing.assert_allclose(df["eccentricity"], ref["eccentricity"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(df["major_axis_um"], ref["axis_major_length"] * mpp, rtol=1e-5)
    np.testing.assert_allclose(df["minor_axis_um"], ref["axis_minor_length"] * mpp, rtol=1e-5, atol=1e-6)
    # An axis has no direction: compare angles modulo π (a π/2 offset, a swapped axis, still fails).
    delta = np.angle(np.exp(2j * (df["orientation"].to_numpy(dtype=float) - ref["orientation"]))) / 2
    np.testing.assert_allclose(delta, 0, atol=1e-5)
    equal_variance = np.isin(ref["label"], [100, 101])
    np.testing.assert_allclose(df["orientation"][equal_variance], [np.pi / 4, -np.pi / 4], atol=1e-6)
    assert ((df["orientation"] > -np.pi / 2 - 1e-6) & (df["orientation"] <= np.pi / 2 + 1e-6)).all()
    for ours, channel in (("h", 0), ("e", 1)):
        np.testing.assert_allclose(df[f"{ours}_mean"], ref[f"intensity_mean-{channel}"], rtol=1e-5)
        np.testing.assert_allclose(df[f"{ours}_std"], ref[f"intensity_std-{channel}"], rtol=1e-4, atol=1e-6)
    skew = [stats.skew(hed[..., 0][labels == i].astype(np.float32)) if (labels == i).sum() > 1 else 0.0 for i in ref["label"]]
    np.testing.assert_allclose(df["h_skewness"], skew, rtol=1e-3, atol=1e-4)


def test_features_keep_their_physical_scale_at_twice_the_resolution(monkeypatch):
    """The same nuclei scanned at 0.25 µm/px (each pixel repeated 2 × 2) keep their texture and outline features.

    Own case features_per_pixel: h_contrast paired neighbouring *pixels* (0.2× at 0.25 µm/px) and contours were
    simplified by a pixel tolerance (solidity −5 %, perimeter +8 %), so calls shifted with the scanner's magnification.
    """
    import histocell_sd.io._nuclei_store as nuclei_module

    monkeypatch.setattr(nuclei_module, "_BAND_ROWS", 7)  # pairs two rows apart straddle band edges
    sdata, labels, image = _ellipse_sample(mpp=0.5)
    fine = from_arrays(np.repeat(np.repeat(image, 2, 0), 2, 1), 0.25)
    store_nuclei(sdata, labels)
    store_nuclei(fine, np.repeat(np.repeat(labels, 2, 0), 2, 1))
    big = (sdata.tables["histocell"].to_df()["area_um2"] > 50).to_numpy()  # the ellipses, not the lines and dots
    coarse_df, fine_df = sdata.tables["histocell"].to_df()[big], fine.tables["histocell"].to_df()[big]
    np.testing.assert_allclose(fine_df["area_um2"], coarse_df["area_um2"], rtol=1e-6)
    np.testing.assert_allclose(fine_df["h_contrast"], coarse_df["h_contrast"], rtol=1e-3)  # was 0.48×
    # the 2-pixel staircase of the repeated raster stays: the perimeter comes out a little longer (median was 1.07×)
    assert np.median(fine_df["perimeter_um"] / coarse_df["perimeter_um"]) < 1.05
    np.testing.assert_allclose(fine_df["solidity"], coarse_df["solidity"], atol=0.05)


def test_polygons_equal_spatialdata_to_polygons():
    """The nucleus polygons are spatialdata.to_polygons' contours (largest part, +0.5 px to the pixel-area
    convention); unsimplified they are the same rings, simplified they stay within the 1 px tolerance."""
    import shapely
    import spatialdata
    from spatialdata.models import Labels2DModel

    import histocell_sd.io._nuclei_store as nuclei_module

    _, labels, _ = _ellipse_sample()
    ids = np.unique(labels)[1:]
    ref = spatialdata.to_polygons(Labels2DModel.parse(labels, dims=("y", "x"))).loc[ids].geometry
    ref = ref.translate(0.5, 0.5).to_numpy()
    largest = np.array([max(g.geoms, key=lambda p: p.area) if g.geom_type == "MultiPolygon" else g for g in ref])
    assert sum(g.geom_type == "MultiPolygon" for g in ref) == 3  # the two-part nucleus and the diagonal lines (4-connected contours)
    simplified = nuclei_module._polygons(labels, ids, (0, 0))
    assert shapely.hausdorff_distance(simplified, largest, densify=0.05).max() <= 2 * 0.5  # tolerance 0.5 px (default)
    raw = nuclei_module._polygons(labels, ids, (0, 0), tolerance_px=0.0)  # simplify(0) only drops collinear vertices
    assert shapely.equals(raw, largest).all()
    # in a window at an origin, the same rings shifted by the origin
    window = nuclei_module._polygons(labels[40:, 30:], np.unique(labels[40:, 30:])[1:], (40, 30), tolerance_px=0.0)
    inside = np.isin(ids, np.unique(labels[40:, 30:])) & ~np.isin(ids, np.unique(np.r_[labels[:40].ravel(), labels[:, :30].ravel()]))
    kept = np.isin(np.unique(labels[40:, 30:])[1:], ids[inside])
    assert inside.sum() >= 5
    assert shapely.equals(window[kept], largest[inside]).all()


# ---------------------------------------------------------------------------- more reliability cases (tests/RELIABILITY.md)
def test_tiles_barely_above_the_overlap_find_the_same_nuclei(tiny_rgb):
    # cases.md: seg_tile_small_vs_default (tile_size_px=80 just above the 64 px overlap lost ~15% of the nuclei)
    rgb, mpp = tiny_rgb
    crop = rgb[540:860, 640:960]
    default = from_arrays(crop, mpp)
    segment_nuclei(default, progress=False)
    small = from_arrays(crop, mpp)
    segment_nuclei(small, tile_size_px=80, progress=False)
    a, b = default.tables["histocell"].obsm["spatial"], small.tables["histocell"].obsm["spatial"]
    assert len(a) > 20 and abs(len(a) - len(b)) <= 1
    assert detection_scores(b, a, max_dist=MATCH_UM / mpp)["f1"] > 0.98


def test_one_tile_or_many_give_the_same_detection_f1(slide, tiny_rgb):
    # cases.md: seg_single_vs_multi_tile_f1 (F1 vs truth fell from 0.817 to 0.790 with 1024 px tiles)
    sub, truth = slide
    rgb, mpp = tiny_rgb
    tiled = from_arrays(rgb, mpp)
    segment_nuclei(tiled, tile_size_px=512, progress=False)
    one = detection_scores(sub.tables["histocell"].obsm["spatial"], truth, max_dist=MATCH_UM / mpp)
    many = detection_scores(tiled.tables["histocell"].obsm["spatial"], truth, max_dist=MATCH_UM / mpp)
    assert one["f1"] > 0.9 and abs(one["f1"] - many["f1"]) < 0.005
    assert abs(one["n_pred"] - many["n_pred"]) <= 0.005 * one["n_pred"]


def test_n_jobs_keeps_nucleus_ids_with_the_learnt_segmenter(tiny_rgb):
    # cases.md: det_seg_njobs, det_seg_njobs2_repeat (ids were assigned in tile completion order)
    rgb, mpp = tiny_rgb
    runs = []
    for n_jobs in (1, 2, 2):
        sdata = from_arrays(rgb[:700, :700], mpp)
        segment_nuclei(sdata, tile_size_px=256, n_jobs=n_jobs, progress=False)
        runs.append(sdata.tables["histocell"])
    for other in runs[1:]:
        assert list(other.obs_names) == list(runs[0].obs_names)
        np.testing.assert_array_equal(other.obsm["spatial"], runs[0].obsm["spatial"])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"n_jobs": 0}, "n_jobs must be a whole number"),
        ({"n_jobs": 1.5}, "n_jobs must be a whole number"),
        ({"overlap_um": float("nan")}, "overlap_um must be a finite number"),
        ({"tile_size_px": "512"}, "tile_size_px must be a whole number"),
        ({"tile_size_px": 256.7}, "tile_size_px must be a whole number"),
    ],
)
def test_segment_settings_refused_before_anything_changes(kwargs, message):
    # own case seg_bad_settings: n_jobs=0 / overlap_um=NaN crashed inside joblib / int(); a string or fractional
    # tile size was silently truncated
    sdata, _ = _disk_sample(radius_px=12)
    segment_nuclei(sdata, method="classical", tile_size_px=256, progress=False)
    before = sdata.tables["histocell"].copy()
    with pytest.raises(InvalidInputError, match=message):
        segment_nuclei(sdata, method="classical", progress=False, **kwargs)
    assert sdata.tables["histocell"].n_obs == before.n_obs and "nuclei" in sdata.shapes


def test_segment_refuses_what_is_not_a_spatialdata(tiny_rgb):
    # own case seg_not_sdata: segment_nuclei(an array / an AnnData) crashed with AttributeError
    rgb, _ = tiny_rgb
    for thing in (rgb[:64, :64], hc.datasets.synthetic_visium(seed=3, preset="tiny", progress=False)[1]):
        with pytest.raises(InvalidInputError, match="Expected a SpatialData sample, got"):
            segment_nuclei(thing, progress=False)


@pytest.mark.parametrize("shape", [(7, 9, 3), (3, 900, 3), (300, 300, 3)])
def test_odd_images_give_no_nuclei_and_write_nothing(shape):
    # own case seg_odd_images: tiny, one-line-thin and all-black (scanner padding only) images
    sdata = from_arrays(np.zeros(shape, dtype=np.uint8), 0.5)
    with pytest.warns(UserWarning, match="No nuclei"):
        segment_nuclei(sdata, progress=False)
    assert not sdata.tables and not sdata.shapes


def test_nuclei_of_implausible_size_for_the_declared_mpp_are_warned_about():  # own case mpp_declared_2x_off
    import warnings

    from histocell_sd.datasets import brca_m2c
    from histocell_sd.io import get_image

    patch = brca_m2c("test")["TCGA-PE-A5DE-01Z-00-DX1_14001_15501_1000_1000_0.9824"]  # real 20x H&E, 0.5 µm/px
    rgb = np.asarray(get_image(patch)).transpose(1, 2, 0)
    right = from_arrays(rgb, 0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        segment_nuclei(right, progress=False)
    as_40x = from_arrays(rgb, 0.25)  # a 20x patch declared as 40x: median 10.8 µm² (19.8 declared right)
    with pytest.warns(UserWarning, match=r"median nucleus area is \d+\.\d µm² at the declared 0.25 µm/px.*not pixels per µm"):
        segment_nuclei(as_40x, progress=False)
