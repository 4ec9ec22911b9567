"""Pretrain the nucleus encoder shipped in histocell_sd/weights/encoder (plain torch, CPU).

The encoder (``histocell_sd.models.NucleusEncoder``) sees a 32 px crop at 0.5 µm/px (16 µm) of optical
density around each nucleus. Objectives (``--mode``):

- ``supervised``: one linear head per labelled dataset on the embedding (cross-entropy): BRCA-M2C train+val
  dots (tumour, stromal, lymphocyte; BSD-3), NuCLS train tiles (4 classes; CC0), synthetic slides (5 types);
- ``ssl``: SimCLR (NT-Xent between two augmented views) on crops of the same images, positions from the
  classical segmenter (no labels);
- ``both``: the sum.

``--exclude brca_m2c`` / ``--exclude nucls`` drops that dataset's labels (the leave-one-dataset-out twin
that benchmarks/real.py uses to score that dataset); its training images (BRCA-M2C train+val, NuCLS train)
still serve, unlabelled, for SSL, as a user's own training slides would. Test images are never used.

The card's ``metrics`` are linear probes on frozen embeddings of annotated cells (BRCA-M2C train → test
split, the embedded BRCA-M2C patches 2 train → 4 test, NuCLS train → test tiles); ``--add-metrics FOLDER``
computes them for an existing encoder without training.

Usage::

    python scripts/train_encoder.py --brca-m2c PATH [--mode both] [--exclude none] [--steps 6000] --out DIR
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from _provenance import provenance
from torch import nn

import histocell_sd as hc
from histocell_sd._shipped import load_weights, write_network
from histocell_sd._stain import stain_jitter, to_optical_density
from histocell_sd.models import NucleusEncoder
from histocell_sd.pp import nucleus_crops

CANONICAL_MPP = 0.5
CROP = 32
BIG = 44  # crops are cut larger, augmented, then centre-cropped to CROP
SYNTHETIC_SEEDS = (300, 301, 302, 303, 304, 305)


# ------------------------------------------------------------------------------------------ data
def _canonical(rgb: np.ndarray, mpp: float):
    from skimage.transform import rescale

    scale = mpp / CANONICAL_MPP
    if np.isclose(scale, 1.0, rtol=0.02):
        return rgb, 1.0
    out = rescale(rgb, scale, order=1, channel_axis=-1, anti_aliasing=scale < 1, preserve_range=True)
    return np.clip(np.round(out), 0, 255).astype(np.uint8), scale


def _segmented_xy(rgb: np.ndarray) -> np.ndarray:
    labels = hc.pp.segment_array(rgb, CANONICAL_MPP)
    from scipy import ndimage as ndi

    ids = np.arange(1, labels.max() + 1)
    return np.asarray(ndi.center_of_mass(np.ones_like(labels), labels, ids))[:, ::-1] + 0.5 if len(ids) else np.zeros((0, 2))


def crops_from(rgb: np.ndarray, mpp: float, xy: np.ndarray | None, labels=None) -> dict:
    """Crops (n, 3, BIG, BIG) at the canonical µm/px around ``xy`` (default: classical segmentation)."""
    rgb, scale = _canonical(rgb, mpp)
    xy = _segmented_xy(rgb) if xy is None else np.asarray(xy, float) * scale
    return {"crops": nucleus_crops(rgb, xy, size=BIG), "labels": None if labels is None else np.asarray(labels)}


def load_sets(brca_path: str, exclude: str) -> tuple[dict, dict]:
    """Labelled sets ``{name: (crops, labels, classes)}`` and unlabelled crops ``{name: crops}``."""
    labelled, unlabelled = {}, {}
    parts = []
    for name in hc.datasets.brca_m2c_names("train", path=brca_path) + hc.datasets.brca_m2c_names("val", path=brca_path):
        rgb, mpp, pts = hc.datasets.read_brca_m2c_patch(name, path=brca_path)
        unlabelled.setdefault("brca_m2c", []).append(crops_from(rgb, mpp, None)["crops"])
        if exclude != "brca_m2c":
            parts.append(crops_from(rgb, mpp, pts[["x", "y"]].to_numpy(), pts["cell_type"].cat.codes.to_numpy()))
    if parts:
        labelled["brca_m2c"] = (np.concatenate([p["crops"] for p in parts]), np.concatenate([p["labels"] for p in parts]), list(hc.datasets.BRCA_M2C_CLASSES))
    parts = []
    for name in hc.datasets.nucls_tile_names("train"):
        rgb, _, pts = hc.datasets.read_nucls_tile(name)
        unlabelled.setdefault("nucls", []).append(crops_from(rgb, hc.datasets.NUCLS_MPP, None)["crops"])
        if exclude != "nucls":
            parts.append(crops_from(rgb, hc.datasets.NUCLS_MPP, pts[["x", "y"]].to_numpy(), pts["cell_type"].cat.codes.to_numpy()))
    if parts:
        labelled["nucls"] = (np.concatenate([p["crops"] for p in parts]), np.concatenate([p["labels"] for p in parts]), list(hc.datasets.NUCLS_CLASSES))
    parts = []
    for seed in SYNTHETIC_SEEDS:
        sdata, _ = hc.datasets.synthetic_visium(seed=seed, preset="tiny", weak_labels=False, progress=False)
        rgb = np.asarray(hc.io.get_image(sdata).data).transpose(1, 2, 0)
        truth = sdata.tables[hc.datasets.TRUTH_TABLE_KEY]
        codes = truth.obs["cell_type"].astype(str).map({t: i for i, t in enumerate(hc.datasets.CELL_TYPES)}).to_numpy()
        parts.append(crops_from(rgb, sdata.attrs["mpp"], np.asarray(truth.obsm["spatial"]), codes))
    labelled["synthetic"] = (np.concatenate([p["crops"] for p in parts]), np.concatenate([p["labels"] for p in parts]), list(hc.datasets.CELL_TYPES))
    unlabelled["synthetic"] = [labelled["synthetic"][0]]
    return labelled, {k: np.concatenate(v) for k, v in unlabelled.items()}


# ------------------------------------------------------------------------------------------ metrics
def _dot_crops(patches) -> tuple[np.ndarray, np.ndarray]:
    """CROP-px crops at the canonical µm/px around the annotated cells of ``(rgb, mpp, points)`` patches."""
    crops, labels = [], []
    for rgb, mpp, pts in patches:
        rgb, scale = _canonical(rgb, mpp)
        crops.append(nucleus_crops(rgb, pts[["x", "y"]].to_numpy(float) * scale, size=CROP))
        labels.append(pts["cell_type"].astype(str).to_numpy())
    return np.concatenate(crops), np.concatenate(labels)


def embed(encoder: NucleusEncoder, crops: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return torch.cat([encoder(to_optical_density(torch.from_numpy(crops[i : i + 2048]))) for i in range(0, len(crops), 2048)]).numpy()


def linear_probe(encoder: NucleusEncoder, train, test) -> dict:
    """Weighted/macro F1 of a logistic regression on frozen embeddings, fit on ``train`` dots, scored on ``test``."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import f1_score
    from sklearn.preprocessing import StandardScaler

    (a, ya), (b, yb) = _dot_crops(train), _dot_crops(test)
    encoder.eval()
    ea, eb = embed(encoder, a), embed(encoder, b)
    scaler = StandardScaler().fit(ea)
    pred = LogisticRegression(max_iter=3000).fit(scaler.transform(ea), ya).predict(scaler.transform(eb))
    return {"train_cells": int(len(ya)), "test_cells": int(len(yb)),
            "weighted_f1": round(float(f1_score(yb, pred, average="weighted")), 4), "macro_f1": round(float(f1_score(yb, pred, average="macro")), 4)}


def probe_metrics(encoder: NucleusEncoder, brca_path: str | None) -> dict:
    """Linear probes on held-out cells: BRCA-M2C train → test split, the embedded patches, NuCLS train → test."""
    def brca(split, path):
        return (hc.datasets.read_brca_m2c_patch(n, path=path) for n in hc.datasets.brca_m2c_names(split, path=path))

    def nucls(split):
        return ((rgb, hc.datasets.NUCLS_MPP, pts) for rgb, _, pts in (hc.datasets.read_nucls_tile(n) for n in hc.datasets.nucls_tile_names(split)))

    out = {"protocol": f"logistic regression on frozen embeddings of {CROP}-px crops at {CANONICAL_MPP} µm/px centred on the annotated cells"}
    if brca_path:
        out["linear_probe_brca_m2c_test_split"] = linear_probe(encoder, brca("train", brca_path), brca("test", brca_path))
    out["linear_probe_brca_m2c_embedded"] = linear_probe(encoder, brca("train", None), brca("test", None))
    out["linear_probe_nucls"] = linear_probe(encoder, nucls("train"), nucls("test"))
    return out


# ------------------------------------------------------------------------------------------ augmentation
def augment(crops: np.ndarray, rng: np.random.Generator, gen: torch.Generator) -> torch.Tensor:
    """Random rotation (any angle), flip, shift ±2 px, scale 0.9-1.1, stain/density jitter, blur, noise → (n, 3, CROP, CROP) OD."""
    x = to_optical_density(torch.from_numpy(crops))
    n = len(x)
    angle = torch.from_numpy(rng.uniform(0, 2 * np.pi, n)).float()
    scale = torch.from_numpy(rng.uniform(0.9, 1.1, n)).float() * (CROP / BIG)
    flip = torch.from_numpy(np.where(rng.random(n) < 0.5, -1.0, 1.0)).float()
    shift = torch.from_numpy(rng.uniform(-2, 2, (n, 2)) / (BIG / 2)).float()
    cos, sin = torch.cos(angle) * scale, torch.sin(angle) * scale
    theta = torch.stack([torch.stack([cos * flip, -sin, shift[:, 0]], 1), torch.stack([sin * flip, cos, shift[:, 1]], 1)], 1)
    grid = F.affine_grid(theta, (n, 3, CROP, CROP), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    x = stain_jitter(x, gen, strength=0.3)
    x = x * (0.8 + 0.4 * torch.rand(n, 1, 1, 1, generator=gen))
    blur = torch.from_numpy(rng.random(n) < 0.25)
    if blur.any():
        k = torch.tensor([0.25, 0.5, 0.25])
        kernel = (k[:, None] * k[None, :]).view(1, 1, 3, 3).repeat(3, 1, 1, 1)
        x[blur] = F.conv2d(F.pad(x[blur], (1, 1, 1, 1), mode="replicate"), kernel, groups=3)
    x = x + (torch.rand(n, 1, 1, 1, generator=gen) < 0.3) * 0.03 * torch.randn(x.shape, generator=gen)
    return x.clamp(min=0)


def nt_xent(a: torch.Tensor, b: torch.Tensor, temperature: float = 0.2) -> torch.Tensor:
    z = F.normalize(torch.cat([a, b]), dim=1)
    sim = z @ z.T / temperature
    sim.fill_diagonal_(float("-inf"))
    n = len(a)
    target = torch.cat([torch.arange(n, 2 * n), torch.arange(n)])
    return F.cross_entropy(sim, target)


# ------------------------------------------------------------------------------------------ main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--brca-m2c", required=True)
    parser.add_argument("--exclude", choices=["none", "brca_m2c", "nucls"], default="none")
    parser.add_argument("--mode", choices=["supervised", "ssl", "both"], default="both")
    parser.add_argument("--steps", type=int, default=6000)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--add-metrics", type=Path, metavar="FOLDER",
                        help="train nothing: copy the encoder at FOLDER to --out with the probe metrics in its card")
    args = parser.parse_args()
    origin = provenance(__file__, args.brca_m2c)  # the commit training starts from
    if args.add_metrics:
        add_metrics(args.add_metrics, args.brca_m2c, args.out)
        return
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng, gen = np.random.default_rng(args.seed), torch.Generator().manual_seed(args.seed)
    started = time.perf_counter()
    labelled, unlabelled = load_sets(args.brca_m2c, args.exclude)
    print(f"data ready in {time.perf_counter() - started:.0f} s: " + ", ".join(f"{k} {len(v[0])} labelled" for k, v in labelled.items())
          + "; " + ", ".join(f"{k} {len(v)} unlabelled" for k, v in unlabelled.items()), file=sys.stderr)
    encoder = NucleusEncoder(width=args.width, out_dim=args.dim)
    heads = nn.ModuleDict({k: nn.Linear(args.dim, len(v[2])) for k, v in labelled.items()})
    projector = nn.Sequential(nn.Linear(args.dim, args.dim), nn.ReLU(), nn.Linear(args.dim, 32))
    params = [*encoder.parameters(), *heads.parameters(), *projector.parameters()]
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=1e-4)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=args.lr, total_steps=args.steps, pct_start=0.05)
    pool = np.concatenate(list(unlabelled.values()))
    log = []
    for step in range(args.steps):
        loss = torch.zeros(())
        parts = {}
        if args.mode in ("supervised", "both"):
            per = max(args.batch // len(labelled), 8)
            for name, (crops, labels, _) in labelled.items():
                idx = rng.integers(0, len(crops), per)
                ce = F.cross_entropy(heads[name](encoder(augment(crops[idx], rng, gen))), torch.from_numpy(labels[idx]).long(), label_smoothing=0.1)
                loss = loss + ce / len(labelled)
                parts[name] = round(ce.item(), 3)
        if args.mode in ("ssl", "both"):
            idx = rng.integers(0, len(pool), args.batch)
            ssl = nt_xent(projector(encoder(augment(pool[idx], rng, gen))), projector(encoder(augment(pool[idx], rng, gen))))
            loss = loss + ssl
            parts["ssl"] = round(ssl.item(), 3)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()
        log.append(loss.item())
        if (step + 1) % 100 == 0:
            print(f"step {step + 1}: {np.mean(log[-100:]):.4f} {parts} ({time.perf_counter() - started:.0f} s)", file=sys.stderr, flush=True)
    encoder.eval()
    card = {
        "kind": "encoder",
        "name": args.out.name,
        "architecture": {"width": args.width, "out_dim": args.dim},
        "preprocessing": {"crop_px": CROP, "canonical_mpp": CANONICAL_MPP, "input": "optical density -log((rgb + 1) / 256) of RGB uint8"},
        "training": {
            **origin,
            "mode": args.mode,
            "labelled": {k: {"nuclei": int(len(v[0])), "classes": v[2]} for k, v in labelled.items()},
            "unlabelled_crops": {k: int(len(v)) for k, v in unlabelled.items()},
            "excluded_datasets": None if args.exclude == "none" else args.exclude,
            "steps": args.steps,
            "batch": args.batch,
            "seed": args.seed,
            "final_loss": round(float(np.mean(log[-100:])), 4),
            "train_s": round(time.perf_counter() - started, 1),
        },
        "licences": {"weights": "MIT (histocell-sd)", "training data": ["BSD-3-Clause (BRCA-M2C)", "CC0-1.0 (NuCLS)", "synthetic (MIT)"]},
    }
    card["metrics"] = probe_metrics(encoder, args.brca_m2c)
    write_network(args.out, encoder.state_dict(), card)
    print(json.dumps(card, indent=1))


def add_metrics(folder: Path, brca_path: str, out: Path) -> None:
    """Copy the encoder at ``folder`` to ``out`` with the probe metrics in its card (the weights unchanged)."""
    state, card = load_weights(folder, "encoder")
    encoder = NucleusEncoder(**card["architecture"])
    encoder.load_state_dict(state)
    card = {k: v for k, v in card.items() if k not in ("format", "format_version", "weights_sha256")}
    card["metrics"] = probe_metrics(encoder, brca_path)
    write_network(out, state, card)
    print(json.dumps(card["metrics"], indent=1))


if __name__ == "__main__":
    main()
