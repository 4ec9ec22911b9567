"""Torch building blocks of HistoCell: nucleus and context encoders, neighbour attention."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .._errors import InvalidInputError


def _conv(cin: int, cout: int, stride: int = 1, dilation: int = 1) -> nn.Sequential:
    # No batch norm: it is slow on CPU and the nets are shallow enough to train without it.
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride=stride, padding=dilation, dilation=dilation), nn.ReLU(inplace=True))


class NucleusEncoder(nn.Module):
    """A CNN over the nucleus crop (optical density): three stages of a full-resolution and a strided
    convolution, then mean and max pooling projected to ``out_dim``.

    The architecture of the pretrained encoder (``histocell_sd/weights/encoder``) for ``width`` 16.
    """

    def __init__(self, width: int = 16, out_dim: int = 64):
        super().__init__()
        w = width
        self.net = nn.Sequential(
            _conv(3, w), _conv(w, w, 2),
            _conv(w, 2 * w), _conv(2 * w, 2 * w, 2),
            _conv(2 * w, 4 * w), _conv(4 * w, 4 * w, 2),
        )  # fmt: skip
        self.proj = nn.Linear(8 * w, out_dim)

    def forward(self, od: torch.Tensor) -> torch.Tensor:
        x = self.net(od.contiguous(memory_format=torch.channels_last))
        return self.proj(torch.cat([x.mean(dim=(2, 3)), x.amax(dim=(2, 3))], dim=1))


class ContextEncoder(nn.Module):
    """A fully convolutional net over the low-resolution image; sampled at nucleus positions.

    Its receptive field is ``RECEPTIVE_RADIUS`` pixels each side, so a window with that margin gives
    the same features as the whole image.
    """

    RECEPTIVE_RADIUS = 1 + 2 + 4 + 4

    def __init__(self, width: int = 8, out_dim: int = 32):
        super().__init__()
        self.net = nn.Sequential(
            _conv(3, width),
            _conv(width, width, dilation=2),
            _conv(width, 2 * width, dilation=4),
            _conv(2 * width, 2 * width, dilation=4),
            nn.Conv2d(2 * width, out_dim, 1),
        )

    def forward(self, od: torch.Tensor, xy: torch.Tensor) -> torch.Tensor:
        """``od`` (1, 3, h, w); ``xy`` (n, 2) positions in its pixels → (n, out_dim)."""
        fmap = self.net(od)
        h, w = od.shape[-2:]
        grid = torch.stack([(xy[:, 0] + 0.5) / w * 2 - 1, (xy[:, 1] + 0.5) / h * 2 - 1], dim=-1)
        return F.grid_sample(fmap, grid.view(1, -1, 1, 2), align_corners=False).view(fmap.shape[1], -1).T


class NeighbourAttention(nn.Module):
    """Multi-head attention of each nucleus over its neighbours (softmax over neighbours, padding masked).

    A distance penalty learnt per head favours close neighbours; the output is added to the nucleus's
    own embedding (residual) and normalised.
    """

    def __init__(self, dim: int, heads: int = 4, radius_um: float = 30.0):
        super().__init__()
        if dim % heads:
            raise InvalidInputError(f"dim must be a multiple of heads, got dim={dim} and heads={heads}.")
        self.heads, self.radius_um = heads, radius_um
        self.q, self.k, self.v = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.out = nn.Linear(dim, dim)
        self.distance_weight = nn.Parameter(torch.ones(heads))
        self.norm = nn.LayerNorm(dim)

    def forward(self, h_query: torch.Tensor, h_keys: torch.Tensor, neighbors: torch.Tensor, distances: torch.Tensor) -> torch.Tensor:
        """``h_query`` (n, d); ``h_keys`` (m, d); ``neighbors`` (n, k) rows of ``h_keys`` or -1; ``distances`` (n, k) µm."""
        n, k = neighbors.shape
        d = h_query.shape[1] // self.heads
        mask = neighbors >= 0
        safe = neighbors.clamp(min=0).reshape(-1)
        q = self.q(h_query).view(n, 1, self.heads, d)
        # index_select: its backward (index_add_) is deterministic on CPU, unlike fancy indexing's
        keys = self.k(h_keys).index_select(0, safe).view(n, k, self.heads, d)
        values = self.v(h_keys).index_select(0, safe).view(n, k, self.heads, d)
        logits = (q * keys).sum(-1) / math.sqrt(d)
        logits = logits - F.softplus(self.distance_weight) * (distances / self.radius_um).unsqueeze(-1)
        logits = logits.masked_fill(~mask.unsqueeze(-1), float("-inf"))
        attention = torch.softmax(logits, dim=1)  # over neighbours
        attention = torch.nan_to_num(attention, nan=0.0)
        mixed = (attention.unsqueeze(-1) * values).sum(1).reshape(n, -1)
        return self.norm(h_query + self.out(mixed))
