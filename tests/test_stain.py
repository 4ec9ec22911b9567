"""The torch stain space of the networks against skimage's colour deconvolution (rgb2hed)."""

import numpy as np
import torch
from skimage.color import hed_from_rgb, rgb2hed, rgb_from_hed

from histocell_sd._stain import HED_FROM_RGB, RGB_FROM_HED, stain_jitter, to_optical_density


def _rgb(seed=0, n=2, size=24) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    return torch.from_numpy(rng.integers(0, 256, size=(n, 3, size, size), dtype=np.uint8))


def test_stain_matrices_are_skimage_hed():
    np.testing.assert_allclose(RGB_FROM_HED.numpy(), rgb_from_hed, rtol=0, atol=1e-7)
    np.testing.assert_allclose(HED_FROM_RGB.numpy(), hed_from_rgb, rtol=0, atol=1e-6)  # float32 inverse


def test_optical_density_in_hed_space_is_rgb2hed():
    """od @ HED_FROM_RGB is rgb2hed of the (rgb + 1) / 256 image, up to rgb2hed's 1 / log(1e6) scale and clip at 0."""
    rgb = _rgb()
    od = to_optical_density(rgb)
    hed = torch.einsum("nchw,cd->ndhw", od, HED_FROM_RGB).numpy()
    ref = rgb2hed(((rgb.numpy().astype(np.float64) + 1) / 256).transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)
    np.testing.assert_allclose(np.maximum(hed / np.log(1e6), 0), ref, rtol=0, atol=1e-6)


def test_stain_jitter_scales_and_shifts_each_skimage_stain():
    """Read back in skimage's HED space, the jitter is an affine map of each stain alone (no channel mixing)."""
    od = to_optical_density(_rgb(1))
    np.testing.assert_allclose(stain_jitter(od, torch.Generator().manual_seed(0), strength=0.0).numpy(), od.numpy(), atol=1e-5)
    strength = 0.15
    out = stain_jitter(od, torch.Generator().manual_seed(0), strength=strength)
    before = np.einsum("nchw,cd->ndhw", od.numpy().astype(np.float64), hed_from_rgb)
    after = np.einsum("nchw,cd->ndhw", out.numpy().astype(np.float64), hed_from_rgb)
    for i in range(od.shape[0]):
        for d in range(3):
            x, y = before[i, d].ravel(), after[i, d].ravel()
            slope, shift = np.polyfit(x, y, 1)
            assert 1 - strength - 1e-4 <= slope <= 1 + strength + 1e-4
            assert abs(shift) <= 0.05 * strength + 1e-4
            assert np.abs(y - (slope * x + shift)).max() < 1e-4
