"""Nucleus segmentation on the real NuCLS tiles: detection F1, AJI and speed, as JSON.

Detection: predicted nucleus centroids against the annotated points, matched one-to-one
within 3 µm. AJI: predicted labels against the instance masks. The naive baseline is
colour deconvolution -> Otsu -> distance-transform watershed. Parameters were tuned on
the train tiles only.

Run: ``python benchmarks/segmentation_nucls.py [--data DIR]``
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage as ndi
from skimage.color import rgb2hed
from skimage.feature import peak_local_max
from skimage.filters import threshold_otsu
from skimage.segmentation import watershed

from histocell_sd.pp import aggregated_jaccard_index, detection_scores, segment_array

NUCLS_MPP = 0.25
MATCH_UM = 3.0
CANDIDATES = [
    Path(__file__).resolve().parents[1] / "histocell_sd" / "datasets" / "data" / "nucls",
    Path("/work/shared/data/nucls"),
]


def find_data(explicit: str | None) -> Path:
    """The NuCLS folder: ``explicit``, else the package copy, else the shared copy."""
    for path in [Path(explicit)] if explicit else CANDIDATES:
        if (path / "images").is_dir():
            return path
    raise FileNotFoundError("NuCLS tiles not found; pass --data")


def load_tile(root: Path, name: str):
    """RGB image, annotated points (x, y) and instance mask of one tile."""
    rgb = np.asarray(Image.open(root / "images" / f"{name}.png").convert("RGB"))
    points = np.loadtxt(root / "points" / f"{name}.csv", delimiter=",", ndmin=2)[:, :2]
    inst = np.load(root / "masks" / f"{name}.npz")["inst_map"]
    return rgb, points, inst


def centroids(labels: np.ndarray) -> np.ndarray:
    """(x, y) centroid of every nonzero label."""
    ids = np.unique(labels)
    ids = ids[ids > 0]
    if len(ids) == 0:
        return np.zeros((0, 2))
    return np.asarray(ndi.center_of_mass(np.ones_like(labels), labels, ids))[:, ::-1]


def naive_segment(rgb: np.ndarray, mpp: float) -> np.ndarray:
    """Baseline: rgb2hed hematoxylin -> Otsu -> distance-transform watershed."""
    h = rgb2hed(rgb)[..., 0]
    mask = h > threshold_otsu(h)
    dist = ndi.distance_transform_edt(mask)
    peaks = peak_local_max(dist, min_distance=max(1, round(2.0 / mpp)), labels=ndi.label(mask)[0])
    markers = np.zeros(mask.shape, dtype=np.int32)
    markers[tuple(peaks.T)] = np.arange(1, len(peaks) + 1)
    return watershed(-dist, markers, mask=mask)


def score_split(root: Path, names: list[str], method) -> dict:
    """Per-tile and pooled detection scores and AJI of ``method`` on ``names``."""
    tiles, totals = {}, np.zeros(3)
    for name in names:
        rgb, points, inst = load_tile(root, name)
        labels = method(rgb, NUCLS_MPP)
        det = detection_scores(centroids(labels), points, max_dist=MATCH_UM / NUCLS_MPP)
        tiles[name] = {k: round(det[k], 4) for k in ("precision", "recall", "f1")} | {
            "n_pred": det["n_pred"],
            "n_true": det["n_true"],
            "aji": round(aggregated_jaccard_index(inst, labels), 4),
        }
        totals += [det["n_matched"], det["n_pred"], det["n_true"]]
    matched, n_pred, n_true = totals
    overall = {
        "precision": round(matched / n_pred, 4) if n_pred else 0.0,
        "recall": round(matched / n_true, 4),
        "f1": round(2 * matched / (n_pred + n_true), 4),
        "mean_aji": round(float(np.mean([t["aji"] for t in tiles.values()])), 4),
    }
    return {"overall": overall, "tiles": tiles}


def megapixels_per_second(root: Path, names: list[str], size: int = 1024, repeats: int = 3) -> float:
    """Speed of ``segment_array`` on a ``size``² mosaic of tiles taken as 0.5 µm/px (no resampling)."""
    tiles = [load_tile(root, n)[0] for n in names]
    reps = -(-size // tiles[0].shape[0])
    rows = [np.concatenate([tiles[(i * reps + j) % len(tiles)] for j in range(reps)], axis=1) for i in range(reps)]
    mosaic = np.ascontiguousarray(np.concatenate(rows, axis=0)[:size, :size])
    segment_array(mosaic, 0.5)
    best = np.inf
    for _ in range(repeats):
        start = time.perf_counter()
        segment_array(mosaic, 0.5)
        best = min(best, time.perf_counter() - start)
    return round(size * size / best / 1e6, 2)


def main() -> None:
    """Print the benchmark as JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=None, help="NuCLS folder (images/, points/, masks/)")
    root = find_data(parser.parse_args().data)
    splits = {
        "test": [f"test_{i}" for i in range(1, 6)],
        "train": [f"train_{i}" for i in range(1, 11)],
    }
    methods = {"segment_array": segment_array, "naive_baseline": naive_segment}
    result = {
        "data": str(root),
        "match_distance_um": MATCH_UM,
        "results": {m: {s: score_split(root, names, fn) for s, names in splits.items()} for m, fn in methods.items()},
        "segment_array_mpx_per_s_1024px_at_0.5mpp": megapixels_per_second(root, splits["train"]),
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
