"""Train the learnt nucleus segmenter shipped in histocell_sd/weights/segmenter (plain torch, CPU).

Training data (all open):
- BRCA-M2C train split (BSD-3): a class dot per cell -> centre maps only (no masks);
- NuCLS train tiles embedded in the package (CC0): instance masks -> foreground, centre and distance maps;
- synthetic slides of ``hc.datasets.synthetic_visium`` (seeds 200+): instance masks.

``--exclude brca_m2c`` / ``--exclude nucls`` trains the leave-one-dataset-out twin used to score that
dataset (benchmarks/real.py). Post-processing thresholds are then tuned on the training datasets only
(BRCA-M2C val split when BRCA-M2C is used, NuCLS train tiles, a synthetic slide), never on a test split.

Usage::

    python scripts/train_segmenter.py --brca-m2c PATH [--exclude brca_m2c|nucls] [--steps 4000] --out DIR
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from _provenance import provenance
from scipy import ndimage as ndi
from skimage.transform import rescale

import histocell_sd as hc
from histocell_sd._shipped import write_network
from histocell_sd._stain import stain_jitter, to_optical_density
from histocell_sd.pp._segmenter import SegmenterNet, instances, predict_maps

CANONICAL_MPP = 0.5
CROP = 128
HEAT_SIGMA_UM = 1.0
MATCH_UM = 3.0
SYNTHETIC_SEEDS = (200, 201, 202, 203, 204, 205)
SYNTHETIC_TUNE_SEED = 206
DEFAULT_MIX = {"brca_m2c": 0.45, "nucls": 0.25, "synthetic": 0.30}
POSTPROCESSING = {
    "centre_threshold": 0.3,
    "min_distance_um": 2.5,
    "foreground_threshold": 0.5,
    "seed_radius_um": 0.0,
    "min_area_um2": 6.0,
    "max_area_um2": 250.0,
}
GRID = {"centre_threshold": [0.2, 0.3, 0.4, 0.5, 0.6, 0.7], "min_distance_um": [2.0, 2.5, 3.0], "seed_radius_um": [0.0, 1.5]}


# ------------------------------------------------------------------------------------------ data
def _to_canonical(rgb: np.ndarray, mpp: float) -> tuple[np.ndarray, float]:
    scale = mpp / CANONICAL_MPP
    if np.isclose(scale, 1.0, rtol=0.02):
        return rgb, 1.0
    out = rescale(rgb, scale, order=1, channel_axis=-1, anti_aliasing=scale < 1, preserve_range=True)
    return np.clip(np.round(out), 0, 255).astype(np.uint8), scale


def _resize_nearest(labels: np.ndarray, shape) -> np.ndarray:
    rows = np.minimum(((np.arange(shape[0]) + 0.5) * labels.shape[0] / shape[0]).astype(int), labels.shape[0] - 1)
    cols = np.minimum(((np.arange(shape[1]) + 0.5) * labels.shape[1] / shape[1]).astype(int), labels.shape[1] - 1)
    return labels[np.ix_(rows, cols)]


def _centroids(labels: np.ndarray) -> np.ndarray:
    ids = np.unique(labels)
    ids = ids[ids > 0]
    if len(ids) == 0:
        return np.zeros((0, 2))
    return np.asarray(ndi.center_of_mass(np.ones_like(labels), labels, ids))[:, ::-1]  # (x, y)


def _heat(shape, xy: np.ndarray) -> np.ndarray:
    """Max of Gaussians (sigma HEAT_SIGMA_UM) at the points (x, y px, canonical)."""
    heat = np.zeros(shape, np.float32)
    sigma = HEAT_SIGMA_UM / CANONICAL_MPP
    r = int(np.ceil(3 * sigma))
    offs = np.arange(-r, r + 1)
    for x, y in xy:
        cx, cy = int(round(x - 0.5)), int(round(y - 0.5))
        ys, xs = cy + offs, cx + offs
        gy = np.exp(-((ys + 0.5 - y) ** 2) / (2 * sigma**2))
        gx = np.exp(-((xs + 0.5 - x) ** 2) / (2 * sigma**2))
        ok_y, ok_x = (ys >= 0) & (ys < shape[0]), (xs >= 0) & (xs < shape[1])
        if ok_y.any() and ok_x.any():
            block = np.outer(gy[ok_y], gx[ok_x]).astype(np.float32)
            sl = np.ix_(ys[ok_y], xs[ok_x])
            heat[sl] = np.maximum(heat[sl], block)
    return heat


def _distance(labels: np.ndarray) -> np.ndarray:
    """Distance to the background inside each nucleus, divided by that nucleus's largest distance."""
    dist = ndi.distance_transform_edt(labels > 0).astype(np.float32)
    n = int(labels.max())
    if n == 0:
        return dist
    peak = ndi.maximum(dist, labels, np.arange(n + 1))
    peak = np.asarray(peak, np.float32)
    peak[0] = 1.0
    return dist / np.maximum(peak[labels], 1.0)


def make_item(rgb: np.ndarray, points_xy: np.ndarray | None, labels: np.ndarray | None, name: str) -> dict:
    """One training image at the canonical µm/px with its target maps (masks optional)."""
    if labels is not None:
        xy = _centroids(labels) + 0.5
        if points_xy is not None and len(points_xy):
            # annotated points outside every mask are nuclei too
            r = np.clip(np.round(points_xy[:, 1] - 0.5).astype(int), 0, labels.shape[0] - 1)
            c = np.clip(np.round(points_xy[:, 0] - 0.5).astype(int), 0, labels.shape[1] - 1)
            xy = np.vstack([xy, points_xy[labels[r, c] == 0]])
        fg, dist, known = (labels > 0).astype(np.float32), _distance(labels), np.float32(1.0)
    else:
        xy = points_xy
        fg = dist = np.zeros(rgb.shape[:2], np.float32)
        known = np.float32(0.0)
    return {"name": name, "rgb": rgb, "heat": _heat(rgb.shape[:2], xy), "fg": fg, "dist": dist, "masks_known": known, "points": xy}


def brca_items(path: str, split: str) -> list[dict]:
    items = []
    for name in hc.datasets.brca_m2c_names(split, path=path):
        rgb, mpp, points = hc.datasets.read_brca_m2c_patch(name, path=path)
        rgb, scale = _to_canonical(rgb, mpp)
        items.append(make_item(rgb, points[["x", "y"]].to_numpy(float) * scale, None, name))
    return items


def nucls_items(split: str) -> list[dict]:
    items = []
    for name in hc.datasets.nucls_tile_names(split):
        rgb, labels, points = hc.datasets.read_nucls_tile(name)
        rgb, scale = _to_canonical(rgb, hc.datasets.NUCLS_MPP)
        labels = _resize_nearest(labels, rgb.shape[:2])
        items.append(make_item(rgb, points[["x", "y"]].to_numpy(float) * scale, labels, name))
    return items


def synthetic_items(seeds) -> list[dict]:
    items = []
    for seed in seeds:
        sdata, _ = hc.datasets.synthetic_visium(seed=seed, preset="tiny", weak_labels=False, progress=False)
        rgb = np.asarray(hc.io.get_image(sdata).data).transpose(1, 2, 0)
        labels = np.asarray(sdata.labels["truth_labels"].data)
        items.append(make_item(rgb, None, labels, f"synthetic_{seed}"))
    return items


# ------------------------------------------------------------------------------------------ batches
def _gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    r = max(1, int(np.ceil(2.5 * sigma)))
    k = torch.exp(-(torch.arange(-r, r + 1, dtype=torch.float32) ** 2) / (2 * sigma**2))
    k = (k / k.sum()).to(x.dtype)
    c = x.shape[1]
    x = F.conv2d(F.pad(x, (r, r, 0, 0), mode="reflect"), k.view(1, 1, 1, -1).repeat(c, 1, 1, 1), groups=c)
    return F.conv2d(F.pad(x, (0, 0, r, r), mode="reflect"), k.view(1, 1, -1, 1).repeat(c, 1, 1, 1), groups=c)


def sample_batch(datasets: dict, mix: dict, batch: int, rng: np.random.Generator, gen: torch.Generator):
    """A batch of augmented crops: OD images (n, 3, CROP, CROP) and targets (n, 4, CROP, CROP)."""
    names = list(mix)
    p = np.asarray([mix[n] for n in names], float)
    images, targets = [], []
    for _ in range(batch):
        items = datasets[names[rng.choice(len(names), p=p / p.sum())]]
        item = items[rng.integers(len(items))]
        h, w = item["rgb"].shape[:2]
        side = int(min(round(CROP * rng.uniform(0.8, 1.25)), h, w))
        y0, x0 = rng.integers(0, h - side + 1), rng.integers(0, w - side + 1)
        sl = (slice(y0, y0 + side), slice(x0, x0 + side))
        img = torch.from_numpy(np.ascontiguousarray(item["rgb"][sl].transpose(2, 0, 1)))
        tgt = torch.from_numpy(np.stack([item["fg"][sl], item["heat"][sl], item["dist"][sl], np.full((side, side), item["masks_known"], np.float32)]))
        k = int(rng.integers(4))
        img, tgt = torch.rot90(img, k, (1, 2)), torch.rot90(tgt, k, (1, 2))
        if rng.random() < 0.5:
            img, tgt = img.flip(2), tgt.flip(2)
        od = to_optical_density(img).unsqueeze(0)
        tgt = tgt.unsqueeze(0)
        if side != CROP:
            od = F.interpolate(od, size=(CROP, CROP), mode="bilinear", align_corners=False)
            tgt = torch.cat([F.interpolate(tgt[:, :3], size=(CROP, CROP), mode="bilinear", align_corners=False),
                             F.interpolate(tgt[:, 3:], size=(CROP, CROP), mode="nearest")], 1)
        images.append(od)
        targets.append(tgt)
    od, tgt = torch.cat(images), torch.cat(targets)
    # colour: stain concentrations, overall density, per-channel gains; optics: blur, noise
    od = stain_jitter(od, gen, strength=0.35)
    od = od * (0.75 + 0.5 * torch.rand(len(od), 1, 1, 1, generator=gen))
    od = od * (0.92 + 0.16 * torch.rand(len(od), 3, 1, 1, generator=gen))
    for i in range(len(od)):
        if rng.random() < 0.3:
            od[i : i + 1] = _gaussian_blur(od[i : i + 1], float(rng.uniform(0.5, 1.5)))
    noisy = torch.rand(len(od), 1, 1, 1, generator=gen) < 0.3
    od = od + noisy * 0.03 * torch.randn(od.shape, generator=gen)
    return od.clamp(min=0).contiguous(memory_format=torch.channels_last), tgt


def loss_fn(logits: torch.Tensor, tgt: torch.Tensor) -> tuple[torch.Tensor, dict]:
    fg_t, heat_t, dist_t, known = tgt[:, 0], tgt[:, 1], tgt[:, 2], tgt[:, 3]
    fg_l, heat_l, dist_l = logits[:, 0], logits[:, 1], logits[:, 2]
    n_known = known.sum().clamp(min=1.0)
    fg = (F.binary_cross_entropy_with_logits(fg_l, fg_t, reduction="none") * known).sum() / n_known
    weight = 1.0 + 9.0 * heat_t
    heat = (F.binary_cross_entropy_with_logits(heat_l, heat_t, reduction="none") * weight).sum() / weight.sum()
    dist = ((torch.sigmoid(dist_l) - dist_t) ** 2 * known).sum() / n_known
    total = fg + 4.0 * heat + 2.0 * dist
    return total, {"fg": round(fg.item(), 4), "heat": round(heat.item(), 4), "dist": round(dist.item(), 4)}


# ------------------------------------------------------------------------------------------ tuning
def _detection(net, items, params) -> np.ndarray:
    """[matched, predicted, true] summed over items (points matched one-to-one within 3 µm)."""
    total = np.zeros(3)
    for item in items:
        labels = instances(predict_maps(net, item["rgb"]), CANONICAL_MPP, params)
        d = hc.pp.detection_scores(_centroids(labels) + 0.5, item["points"], max_dist=MATCH_UM / CANONICAL_MPP)
        total += [d["n_matched"], d["n_pred"], d["n_true"]]
    return total


def _maps_cache(net, items):
    return [(predict_maps(net, item["rgb"]), item["points"]) for item in items]


def tune(net, tuning_sets: dict) -> tuple[dict, dict]:
    """Grid-search centre threshold and peak distance for the mean F1 over the tuning sets."""
    cached = {k: _maps_cache(net, v) for k, v in tuning_sets.items()}
    best, best_f1, table = None, -1.0, {}
    for values in itertools.product(*GRID.values()):
        params = POSTPROCESSING | dict(zip(GRID, values))
        f1s = {}
        for key, maps in cached.items():
            total = np.zeros(3)
            for m, pts in maps:
                labels = instances(m, CANONICAL_MPP, params)
                d = hc.pp.detection_scores(_centroids(labels) + 0.5, pts, max_dist=MATCH_UM / CANONICAL_MPP)
                total += [d["n_matched"], d["n_pred"], d["n_true"]]
            f1s[key] = round(2 * total[0] / max(total[1] + total[2], 1), 4)
        mean = float(np.mean(list(f1s.values())))
        table[json.dumps(dict(zip(GRID, values)))] = f1s
        if mean > best_f1:
            best, best_f1 = params, mean
    return best, {"grid": GRID, "best_mean_f1": round(best_f1, 4), "f1_by_setting": table}


# ------------------------------------------------------------------------------------------ main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--brca-m2c", required=True, help="full BRCA-M2C folder (images/, labels/, split files)")
    parser.add_argument("--exclude", choices=["none", "brca_m2c", "nucls"], default="none", help="leave this dataset's labels out")
    parser.add_argument("--steps", type=int, default=6000)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    origin = provenance(__file__, args.brca_m2c)  # the commit training starts from
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng, gen = np.random.default_rng(args.seed), torch.Generator().manual_seed(args.seed)
    started = time.perf_counter()

    datasets = {"synthetic": synthetic_items(SYNTHETIC_SEEDS)}
    tuning = {"synthetic": synthetic_items([SYNTHETIC_TUNE_SEED])}
    if args.exclude != "brca_m2c":
        datasets["brca_m2c"] = brca_items(args.brca_m2c, "train")
        tuning["brca_m2c_val"] = brca_items(args.brca_m2c, "val")
    if args.exclude != "nucls":
        datasets["nucls"] = nucls_items("train")
        tuning["nucls_train"] = datasets["nucls"]
    mix = {k: v for k, v in DEFAULT_MIX.items() if k in datasets}
    print(f"data ready in {time.perf_counter() - started:.0f} s: " + ", ".join(f"{k} {len(v)}" for k, v in datasets.items()), file=sys.stderr)

    net = SegmenterNet(width=args.width).to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(net.parameters(), lr=args.lr, weight_decay=1e-4)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=args.lr, total_steps=args.steps, pct_start=0.05)
    log = []
    net.train()
    for step in range(args.steps):
        od, tgt = sample_batch(datasets, mix, args.batch, rng, gen)
        loss, parts = loss_fn(net(od), tgt)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()
        log.append(loss.item())
        if (step + 1) % 100 == 0:
            print(f"step {step + 1}: loss {np.mean(log[-100:]):.4f} {parts} ({time.perf_counter() - started:.0f} s)", file=sys.stderr, flush=True)
    net.eval()
    train_s = time.perf_counter() - started
    params, tuning_report = tune(net, tuning)
    print(f"tuned: {params} {tuning_report['best_mean_f1']}", file=sys.stderr)
    used = [k for k in ("brca_m2c", "nucls", "synthetic") if k in datasets]
    metrics = {}  # recorded, never used for a choice: what tests reproduce from the shipped weights
    for key, items in (("brca_m2c_embedded_test_patches", brca_items(None, "test")), ("nucls_test_tiles", nucls_items("test"))):
        m, p, t = _detection(net, items, params)
        metrics[key] = {"precision": round(m / p, 4), "recall": round(m / t, 4), "f1": round(2 * m / (p + t), 4), "images": len(items)}
    card = {
        "kind": "segmenter",
        "name": args.out.name,
        "architecture": {"width": args.width},
        "preprocessing": {"mpp": CANONICAL_MPP, "input": "optical density -log((rgb + 1) / 256) of RGB uint8"},
        "heads": ["foreground", "centre", "distance"],
        "postprocessing": params,
        "training": {
            **origin,
            "datasets": {
                "brca_m2c": "BRCA-M2C train split, class dots -> centre maps (BSD 3-Clause; Abousamra et al., ICCV 2021)" if "brca_m2c" in used else None,
                "nucls": "NuCLS train tiles (10) embedded in histocell_sd, instance masks (CC0 1.0; Amgad et al., GigaScience 2022)" if "nucls" in used else None,
                "synthetic": f"histocell_sd.datasets.synthetic_visium seeds {list(SYNTHETIC_SEEDS)}, preset 'tiny', instance masks (MIT, this package)",
            },
            "excluded_labels": None if args.exclude == "none" else args.exclude,
            "mix": mix,
            "steps": args.steps,
            "batch": args.batch,
            "crop_px": CROP,
            "seed": args.seed,
            "augmentation": "rot90/flip, scale 0.8-1.25, HED jitter 0.35, density 0.75-1.25, channel gains ±8 %, blur (p 0.3), noise (p 0.3)",
            "final_loss": round(float(np.mean(log[-100:])), 4),
            "train_s": round(train_s, 1),
            "torch_threads": args.threads,
        },
        "tuning": {"sets": list(tuning), **{k: v for k, v in tuning_report.items() if k != "f1_by_setting"}},
        "metrics": metrics | {"note": "centroids matched one-to-one within 3 µm; the leave-one-dataset-out figures come from benchmarks/real.py"},
        "licences": {"weights": "MIT (histocell-sd)", "training data": ["BSD-3-Clause (BRCA-M2C)", "CC0-1.0 (NuCLS)", "synthetic (MIT)"]},
    }
    write_network(args.out, net.state_dict(), card)
    (args.out / "tuning.json").write_text(json.dumps(tuning_report, indent=1) + "\n")
    print(json.dumps(card, indent=1))


if __name__ == "__main__":
    main()
