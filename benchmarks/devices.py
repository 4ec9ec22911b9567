"""Segment + train + predict times of the ``"visium"`` preset on each device (CPU, CUDA GPU); prints one JSON object.

The slide is generated once (not timed). For each device: ``pp.segment_nuclei`` (learnt default segmenter),
``HistoCell.fit`` on the segmented nuclei with the slide's true spot proportions (a fixed number of epochs, so
devices do the same work), and ``tl.predict`` end to end. Beside the times: nuclei/s of prediction, peak GPU
memory, and how far the GPU's results are from the CPU's (nucleus count, mean |Δ probability| of the same
model on the same nuclei).

Usage::

    python benchmarks/devices.py [--preset visium] [--devices cpu,cuda] [--epochs 4] [--out FILE]

With no GPU, ``cuda`` is reported as not run. A run on a GPU machine is published as
``benchmarks/measured/devices_<gpu>.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import spatialdata
import torch

import histocell_sd as hc
from histocell_sd.datasets import CELL_TYPES


def run_device(sdata, device: str, epochs: int, n_jobs: int) -> tuple[dict, hc.HistoCell, object]:
    sdata = spatialdata.deepcopy(sdata)  # each device segments its own copy
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
        torch.cuda.synchronize()
    out = {}
    start = time.perf_counter()
    hc.pp.segment_nuclei(sdata, device=device, n_jobs=n_jobs, progress=False)
    out["segment_s"] = round(time.perf_counter() - start, 1)
    out["nuclei"] = int(sdata.tables["histocell"].n_obs)
    print(f"[{device}] segmented {out['nuclei']} nuclei in {out['segment_s']} s", file=sys.stderr, flush=True)
    start = time.perf_counter()
    model = hc.HistoCell(list(CELL_TYPES)).fit(sdata, epochs=epochs, self_training_epochs=0, state_epochs=0, progress=False, device=device)
    out["fit_s"] = round(time.perf_counter() - start, 1)
    out["fit_epochs"] = int(model.training_summary_["epochs_run"])
    print(f"[{device}] fitted in {out['fit_s']} s", file=sys.stderr, flush=True)
    start = time.perf_counter()
    hc.tl.predict(sdata, model, device=device, progress=False)
    seconds = time.perf_counter() - start
    out["predict_s"] = round(seconds, 2)
    out["predict_nuclei_per_s"] = round(out["nuclei"] / seconds)
    if device.startswith("cuda"):
        out["peak_gpu_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    return out, model, sdata


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="visium")
    parser.add_argument("--devices", default="cpu,cuda")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--n-jobs", type=int, default=2)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    hc.settings.progress = False
    start = time.perf_counter()
    sdata, _ = hc.datasets.synthetic_visium(seed=args.seed, preset=args.preset, progress=False)
    print(f"slide generated in {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
    result = {
        "benchmark": "devices", "preset": args.preset, "seed": args.seed, "epochs": args.epochs,
        "machine": {"cpu_cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
                    "torch": torch.__version__, "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None},
        "devices": {},
    }
    runs = {}
    for device in [d.strip() for d in args.devices.split(",") if d.strip()]:
        if device.startswith("cuda") and not torch.cuda.is_available():
            result["devices"][device] = {"not_run": "no CUDA GPU on this machine"}
            continue
        result["devices"][device], model, predicted = run_device(sdata, device, args.epochs, args.n_jobs)
        runs[device] = (model, predicted)
        print(f"[{device}] {result['devices'][device]}", file=sys.stderr, flush=True)
    if "cpu" in runs and any(d.startswith("cuda") for d in runs):
        gpu = next(d for d in runs if d.startswith("cuda"))
        model, cpu_sdata = runs["cpu"][0], runs["cpu"][1]
        cpu_proba = cpu_sdata.tables["histocell"].obsm["cell_type_proba"].to_numpy()
        again = hc.tl.predict(cpu_sdata, model, device=gpu, progress=False, copy=True).tables["histocell"].obsm["cell_type_proba"].to_numpy()
        result["gpu_vs_cpu"] = {
            "nuclei_difference": result["devices"][gpu]["nuclei"] - result["devices"]["cpu"]["nuclei"],
            "same_model_mean_abs_proba_difference": float(np.abs(again - cpu_proba).mean()),
            "same_model_type_agreement": float((again.argmax(1) == cpu_proba.argmax(1)).mean()),
        }
    text = json.dumps(result, indent=2)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    print(text)
    return result


if __name__ == "__main__":
    main()
