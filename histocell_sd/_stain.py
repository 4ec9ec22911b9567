"""Optical density and stain augmentation of H&E tensors, shared by the segmenter and the model."""

from __future__ import annotations

import torch

# Optical densities of hematoxylin, eosin and DAB (rows) in RGB, as skimage's rgb2hed uses.
RGB_FROM_HED = torch.tensor([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]], dtype=torch.float32)
HED_FROM_RGB = torch.linalg.inv(RGB_FROM_HED)


def to_optical_density(rgb_uint8: torch.Tensor) -> torch.Tensor:
    """uint8 RGB (…, 3, h, w) → optical density ``-log((rgb + 1) / 256)``, the input scale of the networks."""
    return -torch.log((rgb_uint8.float() + 1.0) / 256.0)


def stain_jitter(od: torch.Tensor, generator: torch.Generator, strength: float = 0.15) -> torch.Tensor:
    """Scale and shift the hematoxylin, eosin and residual concentrations of each image (HED augmentation)."""
    n = od.shape[0]
    hed = torch.einsum("nchw,cd->ndhw", od, HED_FROM_RGB)
    scale = 1 + strength * (2 * torch.rand(n, 3, 1, 1, generator=generator) - 1)
    shift = 0.05 * strength * (2 * torch.rand(n, 3, 1, 1, generator=generator) - 1)
    return torch.einsum("ndhw,dc->nchw", hed * scale + shift, RGB_FROM_HED)
