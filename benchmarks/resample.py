"""Image resampling: the sparse resampler (``pp._resample``) against skimage's ``rescale``; prints one JSON object.

Two parts, each timing both implementations in the same process:

``bands``
    One image band as ``tl.predict`` reads it (2048 rows, 1024 µm at 0.5 µm/px; random RGB) resampled by
    the factors the package uses: 1/8 (context image at 20x), 1/16 (context image at 40x), 1/2 (nucleus
    crops at 40x) and 2 (crops of a 1 µm/px image); best of three, max |difference| of the values.
``predict``
    ``tl.predict`` end to end with the shipped ``tumor_stromal_lymphocyte`` checkpoint on the ``"visium"``
    preset (seed 1, nuclei stored from the truth raster; generation not timed), twice with each
    resampler, the peak RSS above the RSS before each call (VmHWM, Linux), and whether the probabilities
    are bitwise identical.

Usage::

    python benchmarks/resample.py [--preset visium] [--out benchmarks/results/resample.json]
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
from skimage.transform import rescale

import histocell_sd as hc
import histocell_sd.models._inputs as model_inputs
from histocell_sd.pp._resample import rescale_rgb, rescale_uint8

sys.path.insert(0, str(Path(__file__).parent))
from model import reset_peak_rss, vm_hwm_gib, write_json  # noqa: E402


def skimage_rgb(image: np.ndarray, scale: float) -> np.ndarray:
    return rescale(image, scale, order=1, anti_aliasing=scale < 1, channel_axis=2, preserve_range=True)


def skimage_uint8(image: np.ndarray, scale: float) -> np.ndarray:
    return np.clip(np.round(skimage_rgb(image, scale)), 0, 255).astype(np.uint8)


def rss_gib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 2**20
    return float("nan")


def best_of(fn, *args, repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn(*args)
        times.append(time.perf_counter() - start)
    return min(times)


def section_bands(width: int) -> dict:
    band = np.random.default_rng(0).integers(0, 256, (2048, width, 3), dtype=np.uint8)
    out = {"band_px": list(band.shape[:2])}
    for name, scale in {"context_20x": 1 / 8, "context_40x": 1 / 16, "crops_40x": 1 / 2, "crops_1um": 2.0}.items():
        image = band if scale < 1 else band[:512, : width // 4]  # upsampling a whole band would take GBs
        out[name] = {
            "scale": scale,
            "input_px": list(image.shape[:2]),
            "skimage_s": round(best_of(skimage_rgb, image, scale), 3),
            "sparse_s": round(best_of(rescale_rgb, image, scale), 3),
            "max_abs_difference": float(np.abs(skimage_rgb(image, scale) - rescale_rgb(image, scale)).max()),
        }
        out[name]["speed_up"] = round(out[name]["skimage_s"] / out[name]["sparse_s"], 1)
        print(f"[bands] {name}: {out[name]}", file=sys.stderr, flush=True)
    return out


def section_predict(preset: str) -> dict:
    sdata, _ = hc.datasets.synthetic_visium(seed=1, preset=preset, progress=False)
    hc.pp.store_nuclei(sdata, sdata.labels["truth_labels"].data, method="truth")
    del sdata.labels["truth_labels"]
    model = hc.models.pretrained("tumor_stromal_lymphocyte")
    out = {"preset": preset, "nuclei": int(sdata.tables["histocell"].n_obs)}
    probabilities = {}
    try:
        for name, implementation in [("skimage", skimage_uint8), ("sparse", rescale_uint8)] * 2:
            model_inputs.rescale_uint8 = implementation
            gc.collect()
            reset_peak_rss()
            before = rss_gib()
            start = time.perf_counter()
            hc.tl.predict(sdata, model, progress=False)
            out.setdefault(f"{name}_s", []).append(round(time.perf_counter() - start, 2))
            out.setdefault(f"{name}_peak_rss_above_start_gib", []).append(round(vm_hwm_gib() - before, 3))
            probabilities.setdefault(name, []).append(sdata.tables["histocell"].obsm["cell_type_proba"].to_numpy().copy())
            print(f"[predict] {name}: {out[f'{name}_s'][-1]} s", file=sys.stderr, flush=True)
    finally:
        model_inputs.rescale_uint8 = rescale_uint8
    for name in ("skimage", "sparse"):
        out[f"{name}_nuclei_per_s_best"] = round(out["nuclei"] / min(out[f"{name}_s"]))
    out["identical_probabilities"] = all(np.array_equal(a, b) for a, b in zip(probabilities["skimage"], probabilities["sparse"]))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="visium")
    parser.add_argument("--band-width", type=int, default=6000, help="width of the timed band in pixels")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "resample.json")
    args = parser.parse_args()
    hc.settings.progress = False
    out = {
        "benchmark": "resample",
        "machine": {"cpu_cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), "python": platform.python_version()},
        "loadavg_start": [round(x, 2) for x in os.getloadavg()],
    }
    out["bands"] = section_bands(args.band_width)
    out["predict"] = section_predict(args.preset)
    out["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    write_json(out, args.out)


if __name__ == "__main__":
    main()
