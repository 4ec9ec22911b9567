"""Learnt nucleus segmentation: a small U-Net (foreground, centre and distance maps) + marker watershed.

The network runs at the canonical µm/px of its card on optical density. Instances are grown by
watershed on the predicted distance map from the peaks of the centre map, inside the predicted
foreground; all thresholds come from the card (tuned on the network's training data only).
"""

from __future__ import annotations

import copy
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage as ndi
from skimage.feature import peak_local_max
from skimage.segmentation import relabel_sequential, watershed
from torch import nn

from .._device import full_float32, resolve_device
from .._docs import inject_docs
from .._errors import InvalidInputError
from .._shipped import load_weights, shipped_dir
from .._stain import to_optical_density
from ._resample import rescale_uint8
from ._segment_array import _filter_area, _resize_labels, is_padding

__all__ = ["SegmenterNet", "check_scale", "load_segmenter", "segment_learnt"]

DEFAULT_SEGMENTER = "segmenter"
HEADS = ("foreground", "centre", "distance")
# A tile is resampled to the network's µm/px; beyond these factors the image is not an H&E at a
# resolution where nuclei can be told apart (or would need an absurd upsampling).
MAX_UPSCALE, MAX_DOWNSCALE = 4.0, 16.0
_PAD = 16  # px of reflected border around a tile, so the network sees no artificial edge


def check_scale(mpp: float, canonical_mpp: float) -> None:
    """Refuse resampling factors no H&E needs (a mis-declared µm/px would upsample without bound)."""
    up = mpp / canonical_mpp
    if not (np.isfinite(up) and 1 / MAX_DOWNSCALE <= up <= MAX_UPSCALE):
        raise InvalidInputError(
            f"The image is at {mpp} µm/px; segmentation works at {canonical_mpp} µm/px and resamples by at most "
            f"×{MAX_UPSCALE:g} up or ×{MAX_DOWNSCALE:g} down (this would be ×{up:.3g}). Check sdata.attrs['mpp']."
        )


def _block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.ReLU(inplace=True), nn.Conv2d(cout, cout, 3, padding=1), nn.ReLU(inplace=True))


class SegmenterNet(nn.Module):
    """U-Net over optical density: space-to-depth ×2, three poolings, three heads (logits) at input resolution.

    Input (n, 3, h, w) with h, w multiples of 16; output (n, 3, h, w): foreground, centre and
    distance logits.
    """

    def __init__(self, width: int = 16):
        super().__init__()
        w = width
        self.enc1, self.enc2, self.enc3, self.enc4 = _block(12, w), _block(w, 2 * w), _block(2 * w, 4 * w), _block(4 * w, 4 * w)
        self.dec3, self.dec2, self.dec1 = _block(8 * w, 4 * w), _block(6 * w, 2 * w), _block(3 * w, w)
        self.out = nn.Conv2d(w, 4 * len(HEADS), 1)

    def forward(self, od: torch.Tensor) -> torch.Tensor:
        e1 = self.enc1(F.pixel_unshuffle(od, 2))
        e2 = self.enc2(F.max_pool2d(e1, 2))
        e3 = self.enc3(F.max_pool2d(e2, 2))
        e4 = self.enc4(F.max_pool2d(e3, 2))
        d3 = self.dec3(torch.cat([F.interpolate(e4, scale_factor=2.0), e3], 1))
        d2 = self.dec2(torch.cat([F.interpolate(d3, scale_factor=2.0), e2], 1))
        d1 = self.dec1(torch.cat([F.interpolate(d2, scale_factor=2.0), e1], 1))
        return F.pixel_shuffle(self.out(d1), 2)


@lru_cache(maxsize=4)
def _cached(path: str, stamp: tuple) -> tuple[SegmenterNet, dict]:
    state, card = load_weights(path, "segmenter")
    net = SegmenterNet(**card["architecture"])
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as error:
        raise InvalidInputError(f"The segmenter at {path}: weights do not fit the card's architecture ({error}).") from None
    return net.eval(), card


@lru_cache(maxsize=4)
def _cached_on(path: str, stamp: tuple, device: str) -> SegmenterNet:
    """A copy of the cached network on ``device`` (the CPU one is shared by the threads of a segmentation)."""
    return copy.deepcopy(_cached(path, stamp)[0]).to(device).eval()


@inject_docs
def load_segmenter(*, network=None, device: str | None = None) -> tuple[SegmenterNet, dict]:
    """The segmenter network (eval mode) and its card: the shipped one, or the folder ``network``.

    Parameters
    ----------
    network
        Folder of a segmenter (``weights.safetensors`` + ``card.json``, as written by
        ``scripts/train_segmenter.py``); None: the one shipped in the package.
    {device}

    Returns
    -------
    tuple
        ``(network, card)``: the torch module in eval mode and its card (a dict).
    """
    path = shipped_dir(DEFAULT_SEGMENTER) if network is None else Path(network)
    if not path.is_dir():
        raise InvalidInputError(f"No segmenter network folder at {path}.")
    # re-read whenever either file changes (size or modification time), so a replaced file is never served from cache
    stamp = tuple((f.stat().st_mtime_ns, f.stat().st_size) if f.exists() else None for f in (path / "card.json", path / "weights.safetensors"))
    net, card = _cached(str(path.resolve()), stamp)
    target = resolve_device(device)
    return (net, card) if target.type == "cpu" else (_cached_on(str(path.resolve()), stamp, str(target)), card)


def predict_maps(net: SegmenterNet, rgb_uint8: np.ndarray) -> np.ndarray:
    """(3, h, w) probabilities (foreground, centre, distance) of an RGB uint8 image at the network's µm/px."""
    h, w = rgb_uint8.shape[:2]
    pad_y, pad_x = (-(h + 2 * _PAD)) % 16 + _PAD, (-(w + 2 * _PAD)) % 16 + _PAD
    x = torch.from_numpy(np.ascontiguousarray(rgb_uint8.transpose(2, 0, 1))).unsqueeze(0).to(next(net.parameters()).device)
    od = to_optical_density(x)
    mode = "reflect" if min(h, w) > max(pad_y, pad_x) else "replicate"
    od = F.pad(od, (_PAD, pad_x, _PAD, pad_y), mode=mode)
    with torch.inference_mode(), full_float32():
        out = torch.sigmoid(net(od.contiguous(memory_format=torch.channels_last)))
    return out[0, :, _PAD : _PAD + h, _PAD : _PAD + w].cpu().numpy()


def instances(maps: np.ndarray, mpp: float, params: dict) -> np.ndarray:
    """Instance labels from the network's maps at ``mpp`` µm/px with the post-processing ``params``."""
    foreground, centre, distance = maps
    min_distance = max(1, round(params["min_distance_um"] / mpp))
    peaks = peak_local_max(centre, min_distance=min_distance, threshold_abs=params["centre_threshold"], exclude_border=False)
    markers = np.zeros(centre.shape, dtype=np.int32)
    if len(peaks) == 0:
        return markers
    markers[tuple(peaks.T)] = np.arange(1, len(peaks) + 1, dtype=np.int32)
    mask = foreground > params["foreground_threshold"]
    if params["seed_radius_um"] > 0:  # a peak where the foreground map is unsure still owns a small disk
        mask |= ndi.binary_dilation(markers > 0, iterations=max(1, round(params["seed_radius_um"] / mpp)))
    labels = watershed(-distance, markers, mask=mask)
    return _filter_area(labels, params["min_area_um2"] / mpp**2, params["max_area_um2"] / mpp**2)


@inject_docs
def segment_learnt(rgb, mpp: float, *, network=None, device: str | None = None, **overrides) -> np.ndarray:
    """Segment nuclei of an H&E array with the learnt segmenter.

    Parameters
    ----------
    rgb
        (H, W, 3) uint8 image (an alpha channel is ignored).
    mpp
        Its µm/px; the image is resampled to the network's µm/px (within ×4 up, ×16 down).
    network
        A segmenter folder (``weights.safetensors`` + ``card.json``); default: the shipped one.
    {device}
    **overrides
        Post-processing parameters replacing the card's: ``centre_threshold``, ``min_distance_um``,
        ``foreground_threshold``, ``seed_radius_um``, ``min_area_um2``, ``max_area_um2``.

    Returns
    -------
    numpy.ndarray
        int32 labels of shape (H, W); 0 is background.
    """
    net, card = load_segmenter(network=network, device=device)
    params = dict(card["postprocessing"])
    unknown = set(overrides) - set(params)
    if unknown:
        raise InvalidInputError(f"Unknown post-processing parameters {sorted(unknown)}; the segmenter takes {sorted(params)}.")
    params.update(overrides)
    rgb = np.asarray(rgb)
    if rgb.ndim != 3 or rgb.shape[2] not in (3, 4) or rgb.dtype != np.uint8:
        raise InvalidInputError(f"The segmenter needs an (H, W, 3) uint8 image, got {rgb.dtype} of shape {rgb.shape}.")
    rgb = rgb[..., :3]
    shape = rgb.shape[:2]
    canonical = float(card["preprocessing"]["mpp"])
    scale = float(mpp) / canonical
    check_scale(float(mpp), canonical)
    if min(shape) * scale < 8:
        return np.zeros(shape, dtype=np.int32)
    if not np.isclose(scale, 1.0, rtol=0.02):
        rgb = rescale_uint8(rgb, scale)
    padding = is_padding(rgb.astype(np.float32) / 255.0)
    if padding.any():  # scanner padding is no tissue: show it to the network as glass
        rgb = rgb.copy()
        rgb[padding] = 255
    labels = instances(predict_maps(net, rgb), canonical, params)
    labels = relabel_sequential(_resize_labels(labels, shape))[0]
    return labels.astype(np.int32, copy=False)
