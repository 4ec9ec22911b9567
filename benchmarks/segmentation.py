"""Slide-scale nucleus segmentation: time, peak memory and detection F1, as JSON.

``segment_nuclei`` (n_jobs=2; the learnt default and the classical method) runs on the whole synthetic slide; it and squidpy's
``sq.im.segment(method="watershed")`` also run on the same central crop (squidpy's watershed
works on the whole image in memory, so the full slide is not attempted with it). Detection:
centroids against the true nuclei, matched one-to-one within 3 µm. Peak memory: the growth of
the process's peak RSS (``ru_maxrss``) during each step, so run-order effects can hide some.

Run: ``python benchmarks/segmentation.py [--quick]`` (``--quick``: the "default" preset).
"""

from __future__ import annotations

import argparse
import json
import resource
import time

import numpy as np
from scipy import ndimage as ndi

from histocell_sd.datasets import synthetic_visium
from histocell_sd.io import from_arrays
from histocell_sd.pp import detection_scores, segment_nuclei

MATCH_UM = 3.0
CROP_PX = 3072


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure(fn):
    """Run ``fn``; return its result, wall seconds and peak-RSS growth (MB)."""
    before, start = peak_rss_mb(), time.perf_counter()
    out = fn()
    return out, round(time.perf_counter() - start, 2), round(peak_rss_mb() - before, 1)


def ours(image: np.ndarray, mpp: float, n_jobs: int, method: str = "default") -> np.ndarray:
    """Centroids (x, y px) from segment_nuclei."""
    sdata = from_arrays(image, mpp)
    segment_nuclei(sdata, method=method, n_jobs=n_jobs, progress=False)
    return sdata.tables["histocell"].obsm["spatial"] if "histocell" in sdata.tables else np.zeros((0, 2))


def squidpy_watershed(image: np.ndarray) -> np.ndarray:
    """Centroids (x, y px, pixel centres) from squidpy's watershed segmentation."""
    import squidpy as sq

    img = sq.im.ImageContainer(image, layer="image")
    sq.im.segment(img, layer="image", method="watershed", channel=0, thresh=None, geq=False)
    labels = np.asarray(img["segmented_watershed"]).squeeze()
    ids = np.unique(labels)[1:]
    if len(ids) == 0:
        return np.zeros((0, 2))
    return np.asarray(ndi.center_of_mass(np.ones_like(labels), labels, ids))[:, ::-1] + 0.5


def scores(xy: np.ndarray, truth: np.ndarray, mpp: float) -> dict:
    """Detection scores rounded for the report."""
    det = detection_scores(xy, truth, max_dist=MATCH_UM / mpp)
    return {k: round(v, 4) if isinstance(v, float) else v for k, v in det.items()}


def main() -> None:
    """Print the benchmark as JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="use the 'default' preset instead of 'visium'")
    preset = "default" if parser.parse_args().quick else "visium"
    (sdata, _), gen_s, _ = measure(lambda: synthetic_visium(seed=1, preset=preset, progress=False))
    mpp = sdata.attrs["mpp"]
    image = np.asarray(sdata.images["he"]["scale0"]["image"].values).transpose(1, 2, 0)
    truth = sdata.tables["truth_nuclei"].obsm["spatial"]
    del sdata
    result = {"preset": preset, "image_px": list(image.shape[:2]), "n_true": len(truth), "generate_s": gen_s,
              "match_distance_um": MATCH_UM}
    result["full_image"] = {}
    for method in ("default", "classical"):
        xy, sec, mb = measure(lambda method=method: ours(image, mpp, 2, method))
        result["full_image"][f"segment_nuclei_{method}_n_jobs2"] = {"seconds": sec, "peak_rss_growth_mb": mb, **scores(xy, truth, mpp)}
    y0, x0 = [max(0, (s - CROP_PX) // 2) for s in image.shape[:2]]
    crop = np.ascontiguousarray(image[y0 : y0 + CROP_PX, x0 : x0 + CROP_PX])
    inside = (truth[:, 0] >= x0) & (truth[:, 0] < x0 + crop.shape[1]) & (truth[:, 1] >= y0) & (truth[:, 1] < y0 + crop.shape[0])
    crop_truth = truth[inside] - [x0, y0]
    result["crop"] = {"origin_yx": [y0, x0], "shape": list(crop.shape[:2]), "note": "squidpy watershed is run on this crop only"}
    for name, fn in (("segment_nuclei_default_n_jobs2", lambda: ours(crop, mpp, 2)),
                     ("segment_nuclei_classical_n_jobs2", lambda: ours(crop, mpp, 2, "classical")),
                     ("squidpy_watershed", lambda: squidpy_watershed(crop))):
        xy, sec, mb = measure(fn)
        result["crop"][name] = {"seconds": sec, "peak_rss_growth_mb": mb, **scores(xy, crop_truth, mpp)}
    result["peak_rss_total_mb"] = round(peak_rss_mb(), 1)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
