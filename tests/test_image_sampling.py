"""Image sampling the model relies on: the sparse resampler (what skimage's anti-aliased bilinear rescale computes)
and nucleus crops."""

import numpy as np
import pytest
from skimage.transform import rescale

from histocell_sd.pp import nucleus_crops
from histocell_sd.pp._resample import rescale_rgb, rescale_uint8

SHAPES = [(37, 53), (300, 211), (5, 7), (1, 9), (9, 9), (3, 17)]  # small ones: the Gaussian is wider than the image
SCALES = [1 / 8, 1 / 8.3, 0.5, 0.9, 1.1, 2.0, 3.7]


@pytest.mark.parametrize(("shape", "scale"), [(sh, sc) for sh in SHAPES for sc in SCALES if min(sh) * sc >= 1])
def test_matches_skimage_rescale(shape, scale):
    image = np.random.default_rng(0).integers(0, 256, (*shape, 3), dtype=np.uint8)
    expected = rescale(image, scale, order=1, anti_aliasing=scale < 1, channel_axis=2, preserve_range=True)
    out = rescale_rgb(image, scale)
    assert out.shape == expected.shape and out.dtype == np.float64 and out.flags.c_contiguous
    np.testing.assert_allclose(out, expected, rtol=0, atol=1e-9)


@pytest.mark.parametrize("scale", [1 / 8, 0.5, 2.0])
def test_blocks_do_not_change_the_result(scale):
    image = np.random.default_rng(3).integers(0, 256, (129, 77, 3), dtype=np.uint8)
    whole = rescale_rgb(image, scale, block_bytes=2**30)
    for block_bytes in (1, 5000, 10**5):  # one output row at a time, a few rows, many
        np.testing.assert_array_equal(rescale_rgb(image, scale, block_bytes=block_bytes), whole)
        np.testing.assert_array_equal(rescale_uint8(image, scale, block_bytes=block_bytes), np.round(whole).astype(np.uint8))


def test_uint8_rounding_and_range():
    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, (512, 384, 3), dtype=np.uint8)
    expected = np.round(rescale(image, 0.125, order=1, anti_aliasing=True, channel_axis=2, preserve_range=True))
    out = rescale_uint8(image, 0.125)
    assert out.dtype == np.uint8 and out.shape == (64, 48, 3)
    # equal but where a value sits on .5 to ~1e-13 (none here, several per 10^7 values elsewhere)
    assert np.abs(out.astype(int) - expected).max() <= 1 and (out != expected).mean() < 1e-5
    flat = np.full((40, 40, 3), 200, np.uint8)
    assert (rescale_uint8(flat, 0.3) == 200).all() and (rescale_uint8(flat, 2.5) == 200).all()


def test_nucleus_crops_are_the_centred_windows_zero_padded():
    rng = np.random.default_rng(2)
    image = rng.integers(1, 256, (40, 50, 3), dtype=np.uint8)  # no zeros: padding is recognisable
    xy = np.array([[25.0, 20.0], [0.0, 0.0], [49.4, 39.6], [3.2, 37.0], [-2.0, 60.0]])
    size, half = 8, 4
    crops = nucleus_crops(image, xy, size=size)
    assert crops.shape == (len(xy), 3, size, size) and crops.dtype == np.uint8
    for crop, (x, y) in zip(crops, xy):
        expected = np.zeros((size, size, 3), np.uint8)
        cx, cy = int(np.clip(np.round(x), 0, image.shape[1] + 1)), int(np.clip(np.round(y), 0, image.shape[0] + 1))  # centres clamped
        for i in range(size):
            for j in range(size):
                r, c = cy - half + i, cx - half + j
                if 0 <= r < image.shape[0] and 0 <= c < image.shape[1]:
                    expected[i, j] = image[r, c]
        np.testing.assert_array_equal(crop, expected.transpose(2, 0, 1))
    assert (crops[0] > 0).all() and (crops[1][:, :half, :] == 0).all() and (crops[1][:, half:, half:] > 0).all()


@pytest.mark.parametrize("mpp", [0.25, 0.5, 1.0])  # crops resampled 2x down, as read, 2x up
def test_crops_on_demand_are_the_held_crops(monkeypatch, mpp):
    import histocell_sd as hc
    from histocell_sd.models import _inputs

    monkeypatch.setattr(_inputs, "BAND_UM", 32.0)  # many bands on a small image
    rng = np.random.default_rng(4)
    image = rng.integers(0, 256, (300, 220, 3), dtype=np.uint8)
    labels = np.zeros((300, 220), np.int32)
    for i, (y, x) in enumerate(rng.integers(0, [300, 220], (60, 2)), start=1):  # edges included
        labels[max(y - 3, 0) : y + 3, max(x - 3, 0) : x + 3] = i
    sdata = hc.io.from_arrays(image, mpp=mpp)
    hc.pp.store_nuclei(sdata, labels)
    settings = {"crop_px": 16, "canonical_mpp": 0.5, "context_mpp": 4.0, "n_neighbors": 4, "radius_um": 20.0, "feature_names": None}
    held = _inputs.sample_inputs(sdata, progress=False, **settings)
    lazy = _inputs.sample_inputs(sdata, progress=False, crops_on_demand=True, **settings)
    assert isinstance(lazy.crops, _inputs.ImageCrops) and lazy.crops.shape == held.crops.shape and len(lazy.crops) == len(held.crops)
    assert len(np.unique(lazy.crops.band_of)) >= 3
    np.testing.assert_array_equal(lazy.context, held.context)
    order = rng.permutation(len(held.crops))  # any order, several bands at once, a slice
    np.testing.assert_array_equal(lazy.crops[order], held.crops[order])
    np.testing.assert_array_equal(lazy.crops[5:9], held.crops[5:9])
    assert len(lazy.crops._canonical) <= 2
