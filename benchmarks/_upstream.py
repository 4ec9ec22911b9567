"""The upstream HistoCell design, re-written in plain torch for the real-data benchmark.

As in the released HistoCell code (recolyce/HistoCell, model/arch.py, data.py): a ResNet18 over every
nucleus crop (the nucleus bounding box resized to 30 × 30 px) and one over the tile around the spot
(256 px resized to 128 px), a bounding-box size embedding, an LSTM over [tile, nucleus] and a softmax
head whose mean over a spot's nuclei is matched to the spot proportions. Upstream shares one ResNet
between crops and tiles; with batch norm in eval mode that normalises the crops with running statistics
dominated by the tiles (the last inputs of each training step), which collapsed the predictions to one
class on BRCA-M2C (weighted F1 0.09), so here crops and tiles have a ResNet each. No ImageNet weights here
(nothing is downloaded): the ResNet starts from scratch, as our encoder does with ``encoder="scratch"``.
The upstream graph layer returns its input unchanged (``concat=False``), so it is left out; dropout is
off at inference (upstream keeps it on, one of the faults this project does not copy). Training uses
this package's spot loss (symmetric KL), optimiser settings of upstream (Adam, lr 5e-4) and early
stopping on held-out spots, like ``HistoCell.fit``.
"""

from __future__ import annotations

import copy
import time

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from skimage.transform import resize
from torch import nn

from histocell_sd.models import bag_mean, symmetric_kl

CROP = 30
TILE_PX = 256
TILE_IN = 128
MAX_CELLS = 128
_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
_STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


class _Basic(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout)
        self.c2, self.b2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout)
        self.down = None if stride == 1 and cin == cout else nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        y = F.relu(self.b1(self.c1(x)))
        y = self.b2(self.c2(y))
        return F.relu(y + (x if self.down is None else self.down(x)))


class ResNet18(nn.Module):
    """torchvision's resnet18 layout (BasicBlock × [2, 2, 2, 2], 64-512 channels) without the classifier."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2, 1))
        layers, cin = [], 64
        for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            layers += [_Basic(cin, cout, stride), _Basic(cout, cout, 1)]
            cin = cout
        self.layers = nn.Sequential(*layers)

    def forward(self, x):
        return self.layers(self.stem(x)).mean(dim=(2, 3))


class UpstreamNet(nn.Module):
    def __init__(self, n_types: int):
        super().__init__()
        self.resnet = ResNet18()
        self.tile_resnet = ResNet18()
        self.size_embed = nn.Sequential(nn.Linear(2, 16), nn.ReLU())
        self.merge = nn.Linear(512 + 16, 512)
        self.lstm = nn.LSTM(512, 512, batch_first=True)
        self.head = nn.Linear(512, n_types)
        self.dropout = nn.Dropout(0.5)

    def forward(self, tile: torch.Tensor, crops: torch.Tensor, sizes: torch.Tensor, tile_of: torch.Tensor) -> torch.Tensor:
        """Type logits of each nucleus; ``tile`` (t, 3, 128, 128), ``crops`` (n, 3, 30, 30), ``tile_of`` (n,)."""
        cells = self.merge(torch.cat([self.resnet(crops), self.size_embed(sizes)], 1))
        cells = self.dropout(cells)
        tiles = self.tile_resnet(tile)[tile_of]
        out, _ = self.lstm(torch.stack([tiles, cells], 1))
        return self.head(self.dropout(out[:, 1]))


def _normalise(rgb: np.ndarray) -> torch.Tensor:
    x = torch.from_numpy(np.ascontiguousarray(rgb)).permute(0, 3, 1, 2).float() / 255.0
    return (x - _MEAN) / _STD


def nucleus_inputs(sdata, nuclei_key: str = "nuclei", table_key: str = "histocell") -> dict:
    """Bounding-box crops (30 × 30), relative box sizes and centroids of every nucleus of ``sdata``."""
    rgb = np.asarray(sdata.images["he"]["scale0"].image.data if hasattr(sdata.images["he"], "children") else sdata.images["he"].data).transpose(1, 2, 0)
    bounds = sdata.shapes[nuclei_key].loc[sdata.tables[table_key].obs_names].geometry.bounds.to_numpy()  # minx miny maxx maxy
    crops = np.zeros((len(bounds), CROP, CROP, 3), np.uint8)
    for i, (x0, y0, x1, y1) in enumerate(bounds):
        x0, y0 = max(int(np.floor(x0)), 0), max(int(np.floor(y0)), 0)
        x1, y1 = min(int(np.ceil(x1)), rgb.shape[1]), min(int(np.ceil(y1)), rgb.shape[0])
        if x1 > x0 and y1 > y0:
            crops[i] = np.round(resize(rgb[y0:y1, x0:x1], (CROP, CROP), preserve_range=True, anti_aliasing=False)).astype(np.uint8)
    sizes = np.c_[bounds[:, 3] - bounds[:, 1], bounds[:, 2] - bounds[:, 0]] / TILE_PX
    xy = np.asarray(sdata.tables[table_key].obsm["spatial"], dtype=np.float64)
    return {"rgb": rgb, "crops": crops, "sizes": sizes.astype(np.float32), "xy": xy}


def _tile(rgb: np.ndarray, cx: float, cy: float) -> np.ndarray:
    half = TILE_PX // 2
    padded = np.pad(rgb, ((half, half), (half, half), (0, 0)), mode="constant", constant_values=255)
    x0, y0 = int(round(cx)), int(round(cy))
    window = padded[y0 : y0 + TILE_PX, x0 : x0 + TILE_PX]
    return np.round(resize(window, (TILE_IN, TILE_IN), preserve_range=True, anti_aliasing=True)).astype(np.uint8)


def _bags(samples: list[dict], types: list[str]) -> list[dict]:
    """One bag per spot with nuclei: tile around the spot, nucleus rows, target proportions."""
    bags = []
    for s in samples:
        spot_of = s["spot_ids"]
        for spot_id, (cx, cy) in s["spot_xy"].items():
            rows = np.flatnonzero(spot_of == spot_id)
            if len(rows):
                bags.append({"sample": s, "rows": rows[:MAX_CELLS], "tile": _tile(s["rgb"], cx, cy),
                             "target": s["proportions"].loc[spot_id, types].to_numpy(np.float32)})
    return bags


def _forward(net, bags: list[dict], augment: np.random.Generator | None):
    tiles = _normalise(np.stack([b["tile"] for b in bags]))
    crops = _normalise(np.concatenate([b["sample"]["crops"][b["rows"]] for b in bags]))
    if augment is not None:  # upstream's colour jitter, approximated by brightness/contrast on normalised inputs
        crops = crops * float(augment.uniform(0.8, 1.2)) + float(augment.uniform(-0.2, 0.2))
        k = int(augment.integers(4))
        crops, tiles = torch.rot90(crops, k, (2, 3)), torch.rot90(tiles, k, (2, 3))
    sizes = torch.from_numpy(np.concatenate([b["sample"]["sizes"][b["rows"]] for b in bags]))
    bag = torch.from_numpy(np.concatenate([np.full(len(b["rows"]), i) for i, b in enumerate(bags)]))
    return net(tiles, crops, sizes, bag), bag


def fit_upstream(samples: list[dict], types: list[str], *, epochs: int = 40, lr: float = 5e-4, batch: int = 32,
                 val_fraction: float = 0.15, patience: int = 8, seed: int = 0) -> tuple[UpstreamNet, dict]:
    """Train on spot proportions; ``samples`` from :func:`training_sample`."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    bags = _bags(samples, types)
    held = rng.random(len(bags)) < val_fraction
    train, val = [b for b, h in zip(bags, held) if not h], [b for b, h in zip(bags, held) if h]
    net = UpstreamNet(len(types))
    optimizer = torch.optim.Adam(net.parameters(), lr=lr)
    best, best_state, waited, history = np.inf, copy.deepcopy(net.state_dict()), 0, []
    started = time.perf_counter()
    for _ in range(epochs):
        net.train()
        order = rng.permutation(len(train))
        for i in range(0, len(order), batch):
            chunk = [train[j] for j in order[i : i + batch]]
            logits, bag = _forward(net, chunk, rng)
            loss = symmetric_kl(bag_mean(torch.softmax(logits, 1), bag, len(chunk)), torch.from_numpy(np.stack([b["target"] for b in chunk])))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        net.eval()
        with torch.no_grad():
            losses = []
            for i in range(0, len(val), batch):
                chunk = val[i : i + batch]
                logits, bag = _forward(net, chunk, None)
                losses.append(float(symmetric_kl(bag_mean(torch.softmax(logits, 1), bag, len(chunk)), torch.from_numpy(np.stack([b["target"] for b in chunk])))) * len(chunk))
        val_loss = sum(losses) / max(len(val), 1)
        history.append(val_loss)
        if val_loss < best - 1e-4:
            best, best_state, waited = val_loss, copy.deepcopy(net.state_dict()), 0
        else:
            waited += 1
            if waited >= patience:
                break
    net.load_state_dict(best_state)
    net.eval()
    return net, {"epochs_run": len(history), "best_val_loss": round(best, 4), "fit_s": round(time.perf_counter() - started, 1),
                 "spots_train": len(train), "spots_val": len(val), "parameters": sum(p.numel() for p in net.parameters())}


def training_sample(sdata) -> dict:
    """Inputs of one training sample: nuclei, their spots and the spot proportions."""
    s = nucleus_inputs(sdata)
    spots = sdata.shapes["spots"]
    s["spot_xy"] = pd.Series(list(zip(spots.geometry.x, spots.geometry.y)), index=spots.index.astype(str))
    s["spot_ids"] = sdata.tables["histocell"].obs["spot_id"].astype(object).to_numpy()
    s["proportions"] = sdata.tables["table"].obsm["proportions"]
    return s


@torch.no_grad()
def predict_upstream(net: UpstreamNet, sdata, types: list[str]) -> tuple[np.ndarray, float]:
    """Type probabilities of every nucleus of ``sdata`` (tiles: a 256 px grid, as upstream infers) and seconds."""
    started = time.perf_counter()
    s = nucleus_inputs(sdata)
    net.eval()
    if len(s["xy"]) == 0:
        return np.zeros((0, len(types)), np.float32), 0.0
    tile_idx = np.floor(s["xy"] / TILE_PX).astype(int)
    keys, inverse = np.unique(tile_idx, axis=0, return_inverse=True)
    proba = np.zeros((len(s["xy"]), len(types)), np.float32)
    for t, (tx, ty) in enumerate(keys):
        rows = np.flatnonzero(inverse.ravel() == t)
        tile = _normalise(_tile(s["rgb"], (tx + 0.5) * TILE_PX, (ty + 0.5) * TILE_PX)[None])
        for chunk in np.array_split(rows, -(-len(rows) // 512)):
            logits = net(tile, _normalise(s["crops"][chunk]), torch.from_numpy(s["sizes"][chunk]), torch.zeros(len(chunk), dtype=torch.long))
            proba[chunk] = torch.softmax(logits, 1).numpy()
    return proba, time.perf_counter() - started
