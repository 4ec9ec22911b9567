"""Tests of the classical nucleus segmentation and of the segmentation metrics."""

import numpy as np
import pytest
from scipy import ndimage as ndi
from skimage.transform import rescale

import histocell_sd as hc
from histocell_sd.datasets import NUCLS_MPP, read_nucls_tile
from histocell_sd.pp._metrics import aggregated_jaccard_index, detection_scores, match_points
from histocell_sd.pp._segment_array import segment_array


def _tile(name: str) -> tuple[np.ndarray, np.ndarray]:
    """RGB image and annotated centroids (x, y px) of a NuCLS tile shipped with the package."""
    rgb, _, points = read_nucls_tile(name)
    return rgb, points[["x", "y"]].to_numpy(dtype=float)


def _centroids(labels: np.ndarray) -> np.ndarray:
    ids = np.unique(labels)[1:]
    return np.asarray(ndi.center_of_mass(np.ones_like(labels), labels, ids)).reshape(-1, 2)[:, ::-1]


def test_f1_on_nucls_test_tiles():
    matched = n_pred = n_true = 0
    for i in range(1, 6):
        rgb, points = _tile(f"test_{i}")
        labels = segment_array(rgb, NUCLS_MPP)
        assert labels.shape == rgb.shape[:2] and labels.dtype == np.int32
        scores = detection_scores(_centroids(labels), points, max_dist=3.0 / NUCLS_MPP)
        matched += scores["n_matched"]
        n_pred += scores["n_pred"]
        n_true += scores["n_true"]
    assert 2 * matched / (n_pred + n_true) >= 0.80


def test_white_image_gives_no_nuclei():
    labels = segment_array(np.full((200, 300, 3), 255, dtype=np.uint8), 0.5)
    assert labels.shape == (200, 300) and not labels.any()


@pytest.mark.parametrize("shape", [(1, 1, 3), (3, 3, 3), (6, 5, 4), (2, 500, 3)])
def test_image_smaller_than_a_nucleus_gives_no_nuclei(shape):
    rgb = np.full(shape, 60, dtype=np.uint8)
    rgb[..., 2] = 150
    labels = segment_array(rgb, 0.25)
    assert labels.shape == shape[:2] and not labels.any()


def test_deterministic_and_float_input():
    rgb, _ = _tile("train_1")
    labels = segment_array(rgb, NUCLS_MPP)
    np.testing.assert_array_equal(labels, segment_array(rgb, NUCLS_MPP))
    np.testing.assert_array_equal(labels, segment_array(rgb / 255.0, NUCLS_MPP))
    assert np.array_equal(np.unique(labels), np.arange(labels.max() + 1))


@pytest.mark.parametrize("factor", [2.0, 0.5])
def test_resolution_invariance(factor):
    def median_area_um2(rgb, mpp):
        labels = segment_array(rgb, mpp)
        return np.median(np.bincount(labels.ravel())[1:]) * mpp**2

    rgb = np.concatenate([_tile(name)[0] for name in ("train_2", "train_5")], axis=1)
    resized = rescale(rgb / 255.0, factor, order=1, channel_axis=-1, anti_aliasing=factor < 1)
    reference = median_area_um2(rgb, NUCLS_MPP)
    assert median_area_um2(resized, NUCLS_MPP / factor) == pytest.approx(reference, rel=0.10)


def test_match_points_is_one_to_one():
    pred = np.array([[0.0, 0.0], [1.0, 0.0], [50.0, 50.0]])
    true = np.array([[0.9, 0.0], [-1.5, 0.0], [10.0, 10.0]])
    pred_idx, true_idx = match_points(pred, true, max_dist=2.0)
    # greedy nearest-neighbour would pair pred 0 with true 0 and leave pred 1 unmatched
    assert sorted(zip(pred_idx.tolist(), true_idx.tolist())) == [(0, 1), (1, 0)]
    empty = match_points(np.zeros((0, 2)), true, max_dist=2.0)
    assert len(empty[0]) == len(empty[1]) == 0


def test_detection_scores():
    pred = [[0, 0], [5, 5], [10, 10]]
    true = [[0, 1], [5.5, 5], [20, 20], [30, 30]]
    scores = detection_scores(pred, true, max_dist=2.0)
    assert scores["n_matched"] == 2 and scores["n_pred"] == 3 and scores["n_true"] == 4
    assert scores["precision"] == pytest.approx(2 / 3)
    assert scores["recall"] == pytest.approx(0.5)
    assert scores["f1"] == pytest.approx(4 / 7)
    assert detection_scores([], [], max_dist=1.0)["f1"] == 1.0
    assert detection_scores([], [[0, 0]], max_dist=1.0)["f1"] == 0.0


def test_aggregated_jaccard_index():
    # own case bare_value_error
    truth = np.zeros((10, 10), dtype=int)
    truth[2:5, 2:5] = 1
    truth[6:9, 6:9] = 2
    assert aggregated_jaccard_index(truth, truth * 7) == 1.0
    with pytest.raises(hc.InvalidInputError, match="same shape, got \\(10, 10\\) and \\(10, 9\\)"):
        aggregated_jaccard_index(truth, truth[:, :9])
    with pytest.raises(hc.InvalidInputError, match=r"rgb must have shape \(H, W, 3\)"):
        hc.pp.segment_array(truth.astype(float), mpp=0.5)
    # one nucleus missed: 9 / (9 + 9)
    assert aggregated_jaccard_index(truth, np.where(truth == 1, 1, 0)) == pytest.approx(0.5)
    # both nuclei merged into one prediction: each true pairs with it, union counted twice
    merged = (truth > 0).astype(int)
    assert aggregated_jaccard_index(truth, merged) == pytest.approx(18 / 36)
    # a spurious prediction adds its area to the union
    extra = truth.copy()
    extra[0, 0] = 3
    assert aggregated_jaccard_index(truth, extra) == pytest.approx(18 / 19)
    assert aggregated_jaccard_index(np.zeros((4, 4)), np.zeros((4, 4))) == 1.0
    assert aggregated_jaccard_index(truth, np.zeros_like(truth)) == 0.0


def test_hematoxylin_equals_skimage_rgb2hed():
    """The float32 H-only colour deconvolution of the classical segmenter is skimage's rgb2hed channel 0."""
    from skimage.color import rgb2hed

    from histocell_sd.pp._segment_array import _as_float_rgb, _hematoxylin

    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, size=(64, 80, 3), dtype=np.uint8)
    rgb[0, :3] = [[0, 0, 0], [255, 255, 255], [255, 0, 0]]  # the 1e-6 floor and the clip at 0
    ref = rgb2hed(rgb)[..., 0]
    ours = _hematoxylin(_as_float_rgb(rgb))
    assert ours.dtype == np.float32 and (ref == 0).any()
    np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-6)  # float32 against float64


@pytest.mark.parametrize(  # own case segment_array_int_or_0_255_float
    ("convert", "hint"),
    [
        (lambda rgb: rgb.astype(np.float32), r"0-255 floats\?"),  # float 0-255 was clipped to [0, 1]: no nuclei
        (lambda rgb: rgb.astype(np.uint16), "rescale its range to 0-255"),  # 8-bit values in uint16 were divided by 65535
        (lambda rgb: rgb.astype(np.uint16) * 16, "rescale its range to 0-255"),  # 12-bit data
        (lambda rgb: rgb.astype(np.int64), "rescale its range to 0-255"),
    ],
)
def test_segment_array_refuses_images_without_an_unambiguous_scale(convert, hint):
    rgb = read_nucls_tile("test_3")[0]
    with pytest.raises(hc.InvalidInputError, match=f"rgb must be uint8 \\(0-255\\) or floats in \\[0, 1\\], got .*{hint}"):
        segment_array(convert(rgb), NUCLS_MPP)
