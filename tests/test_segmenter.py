"""The learnt segmenter shipped in the package (pp.segment_learnt, segment_nuclei's default)."""

import json
import shutil

import numpy as np
import pytest

import histocell_sd as hc
from histocell_sd import InvalidInputError
from histocell_sd._shipped import shipped_dir
from histocell_sd.pp import detection_scores, load_segmenter, segment_array, segment_learnt, segment_nuclei

MATCH_UM = 3.0


def _centroids(labels):
    from scipy import ndimage as ndi

    ids = np.arange(1, labels.max() + 1)
    return np.asarray(ndi.center_of_mass(np.ones_like(labels), labels, ids))[:, ::-1] + 0.5


def _f1(method, patches):
    total = np.zeros(3)
    for rgb, mpp, points in patches:
        d = detection_scores(_centroids(method(rgb, mpp)), points[["x", "y"]].to_numpy(), max_dist=MATCH_UM / mpp)
        total += [d["n_matched"], d["n_pred"], d["n_true"]]
    return 2 * total[0] / (total[1] + total[2])


@pytest.fixture(scope="module")
def brca_test_patches():
    return [hc.datasets.read_brca_m2c_patch(n) for n in hc.datasets.brca_m2c_names("test")]


def test_card_metrics_reproduce_on_embedded_patches(brca_test_patches):
    _, card = load_segmenter()
    f1 = _f1(segment_learnt, brca_test_patches)
    assert f1 == pytest.approx(card["metrics"]["brca_m2c_embedded_test_patches"]["f1"], abs=0.005)
    assert f1 > _f1(segment_array, brca_test_patches)


def test_weights_are_small_and_documented():
    path = shipped_dir("segmenter")
    assert (path / "weights.safetensors").stat().st_size < 5 * 2**20
    card = json.loads((path / "card.json").read_text())
    assert card["kind"] == "segmenter" and card["training"]["script"] == "scripts/train_segmenter.py"
    assert "BSD" in " ".join(card["licences"]["training data"]) and "CC0" in " ".join(card["licences"]["training data"])


def test_default_method_is_learnt_and_deterministic():
    sdata = next(iter(hc.datasets.brca_m2c("test").values()))
    segment_nuclei(sdata, progress=False)
    first = sdata.tables["histocell"].obsm["spatial"].copy()
    assert sdata.tables["histocell"].uns["histocell"]["method"] == "segment_nuclei:default"
    segment_nuclei(sdata, tile_size_px=200, n_jobs=2, progress=False)
    again = sdata.tables["histocell"].obsm["spatial"]
    assert abs(len(again) - len(first)) <= 0.02 * len(first)  # seams between tiles lose or double next to nothing
    segment_nuclei(sdata, tile_size_px=200, n_jobs=1, progress=False)
    np.testing.assert_array_equal(sdata.tables["histocell"].obsm["spatial"], again)  # n_jobs changes nothing


def test_resolution_robustness(brca_test_patches):
    """The same patches at 40x (0.25 µm/px) are detected about as well as at 20x."""
    from skimage.transform import rescale

    upsampled = []
    for rgb, mpp, points in brca_test_patches[:2]:
        big = np.clip(np.round(rescale(rgb, 2, order=1, channel_axis=-1, preserve_range=True)), 0, 255).astype(np.uint8)
        upsampled.append((big, mpp / 2, points.assign(x=(points["x"] + 0.5) * 2 - 0.5, y=(points["y"] + 0.5) * 2 - 0.5)))
    assert _f1(segment_learnt, upsampled) >= _f1(segment_learnt, brca_test_patches[:2]) - 0.03


def test_bad_weights_and_resolutions(tmp_path, brca_test_patches):
    rgb = brca_test_patches[0][0][:128, :128]
    copy = tmp_path / "seg"
    shutil.copytree(shipped_dir("segmenter"), copy)
    assert segment_learnt(rgb, 0.5, network=copy).max() > 0
    with pytest.raises(InvalidInputError, match="resamples by at most"):
        segment_learnt(rgb, 5.0)  # a 10x mis-declared µm/px would upsample without bound
    with pytest.raises(InvalidInputError, match="No segmenter network folder"):
        segment_learnt(rgb, 0.5, network=tmp_path / "missing")
    with pytest.raises(InvalidInputError, match="Unknown post-processing"):
        segment_learnt(rgb, 0.5, threshold=3)
    (copy / "weights.safetensors").write_bytes(b"garbage")
    with pytest.raises(InvalidInputError, match="checksum"):
        segment_learnt(rgb, 0.5, network=copy)
    (copy / "card.json").write_text("{not json")
    with pytest.raises(InvalidInputError, match="not valid JSON"):
        segment_learnt(rgb, 0.5, network=copy)
    (copy / "weights.safetensors").unlink()
    with pytest.raises(InvalidInputError, match="missing weights.safetensors"):
        segment_learnt(rgb, 0.5, network=copy)
    with pytest.raises(InvalidInputError, match="not a 'segmenter' network"):
        segment_learnt(rgb, 0.5, network=shipped_dir("encoder"))
    sdata = hc.io.from_arrays(rgb, 0.5)
    with pytest.raises(InvalidInputError, match="No segmenter network folder"):
        segment_nuclei(sdata, network=tmp_path / "missing", progress=False)
    assert "histocell" not in sdata.tables
