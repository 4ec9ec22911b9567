"""Benchmark: training HistoCell from Visium HD bins (issue 13); prints one JSON object.

Sections (``--sections regimes,full_area``):

``regimes``
    One synthetic tissue (``datasets.synthetic_visium_hd``, seed ``--train-seed``, ``--size-um`` square) is the
    training slide; an H&E-only slide of the same generator (seed ``--test-seed``, same size, its bins unused)
    is predicted and scored. Nuclei are stored from the truth rasters (``pp.store_nuclei``) on both slides so that
    only the weak labels differ; every nucleus of the test slide is scored against its true type (macro and
    weighted F1). Rows, all with the same model, seed, epochs and batching (``tile_um``):

    - ``bins_8um_*`` / ``bins_16um_*``: the bins' counts deconvolved (``tl.deconvolve(method="poisson")``), bags
      by centroid or by overlap (``fit(spot_bags=...)``), and for 8 µm bins with low-count pooling
      (``deconvolve(min_counts=...)``);
    - ``visium_55um``: 55 µm circles on a 100 µm hexagonal lattice of the same slide, counts = the 2 µm bins whose
      centre each circle holds, deconvolved the same way (centroid bags, as Visium);
    - ``supervised_twin``: the same architecture trained on the true type of every training nucleus;
    - ``prior_only``: every test nucleus gets the commonest training type.

    ``deconvolution`` reports, per bin regime, the mean absolute error of the bins' proportions against the
    true cell shares of the bins holding nuclei (centroids), with and without pooling.
``full_area``
    A full capture area (``--full-size-um``, 6.5 mm: ~660k 8 µm bins) on this machine's cores, one step after
    another: writing the synthetic folder (not in the pipeline figure), reading the 8 µm bins, storing the
    nuclei from the truth raster, Poisson deconvolution with pooling, and ``fit`` with overlap bags on
    ``--full-epochs`` epochs; wall time and peak RSS (VmHWM, reset before each step where Linux allows).

Usage::

    python benchmarks/visium_hd.py [--quick] [--sections regimes,full_area] [--out benchmarks/results/visium_hd.json] [--update]

``--update`` merges the sections run into an existing ``--out`` file (a section is replaced whole).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import torch
from scipy import sparse
from scipy.spatial import cKDTree

import histocell_sd as hc
from histocell_sd.datasets import CELL_TYPES

sys.path.insert(0, str(Path(__file__).parent))
from model import classification, reset_peak_rss, vm_hwm_gib, write_json  # noqa: E402

TYPES = list(CELL_TYPES)


# ------------------------------------------------------------------------------------------- slides
def hd_slide(generated, bin_size_um: int):
    """The bins of one size of a generated slide ``(path, truth, reference)``, with nuclei from the truth raster and
    their true types in ``obs["true_cell_type"]``."""
    path, truth, _ = generated
    sdata = hc.io.read_visium_hd(path, bin_size_um=bin_size_um)
    store_truth_nuclei(sdata, truth)
    return sdata


def store_truth_nuclei(sdata, truth) -> None:
    hc.pp.store_nuclei(sdata, truth.labels["truth_labels"].data.compute())
    sdata.tables["truth_nuclei"] = truth.tables["truth_nuclei"]
    hc.tl.transfer_truth(sdata, columns=("cell_type",))


def visium_circles(generated, sdata, mpp: float):
    """55 µm circles (100 µm hex pitch) over ``sdata``'s image, counts = the 2 µm bins whose centre they hold."""
    path, truth, _ = generated
    hc.datasets.pseudo_spots(sdata, overwrite=True)  # circles + truth shares; counts added below
    store_truth_nuclei(sdata, truth)  # obs["spot_id"] of the circles
    fine = hc.io.read_visium_hd(path, bin_size_um=2).tables["table"]
    spots = sdata.shapes["spots"]
    centres = np.column_stack([spots.geometry.x, spots.geometry.y])
    dist, idx = cKDTree(centres).query(np.asarray(fine.obsm["spatial"]))
    inside = dist <= spots["radius"].to_numpy()[idx]
    pool = sparse.csr_matrix((np.ones(inside.sum(), np.float32), (idx[inside], np.flatnonzero(inside))), shape=(len(centres), fine.n_obs))
    table = sdata.tables["table"]
    counts = hc.io.SpotsTableModel.parse(
        ad.AnnData(pool @ fine.X, obs=table.obs.copy(), var=fine.var.copy(), obsm=dict(table.obsm.items())), region="spots", mpp=mpp)
    sdata.tables["table"] = counts
    return sdata


def truth_shares(sdata, bin_col: str) -> pd.DataFrame:
    """True cell-type shares of the bins holding truth centroids."""
    truth = sdata.tables["truth_nuclei"]
    frame = pd.crosstab(truth.obs[bin_col].to_numpy(), truth.obs["cell_type"].astype(str).to_numpy()).reindex(columns=TYPES, fill_value=0)
    return frame.div(frame.sum(axis=1), axis=0)


def deconvolution_error(sdata, shares: pd.DataFrame) -> float:
    est = sdata.tables["table"].obsm["proportions"].reindex(index=shares.index).dropna()
    return round(float(np.abs(est.to_numpy() - shares.loc[est.index, TYPES].to_numpy()).sum(1).mean() / 2), 4)


def score(model, test) -> dict:
    hc.tl.predict(test, model, progress=False)
    nuclei = test.tables["histocell"]
    known = nuclei.obs["true_cell_type"].notna().to_numpy()
    return classification(nuclei.obs["true_cell_type"].astype(str)[known], nuclei.obs["cell_type"].astype(str)[known], TYPES)


def h_and_e_only(sdata):
    """The slide without its bins: the image, the nuclei and the truth (for scoring)."""
    import spatialdata

    out = spatialdata.deepcopy(sdata)
    del out.shapes["spots"], out.tables["table"]
    return out


# ------------------------------------------------------------------------------------------- sections
def section_regimes(args) -> dict:
    folder = Path(tempfile.mkdtemp(prefix="hc_hd_bench_"))
    fit_kwargs = {"epochs": args.epochs, "self_training_epochs": args.self_training_epochs, "state_epochs": 0}
    model_kwargs = {"tile_um": args.tile_um}
    def generate(name, seed):
        return hc.datasets.synthetic_visium_hd(folder / name, seed=seed, width_um=args.size_um, height_um=args.size_um, progress=False)

    test = h_and_e_only(hd_slide(generate("test", args.test_seed), 8))
    generated = generate("train", args.train_seed)
    rows, deconv, timing = {}, {}, {}

    def run(name, sdata, **kwargs):
        t0 = time.perf_counter()
        model = hc.HistoCell(TYPES, **model_kwargs).fit(sdata, seed=0, progress=False, **fit_kwargs, **kwargs)
        rows[name] = score(model, test) | {"spots_train": model.training_summary_["spots_train"]}
        timing[name] = round(time.perf_counter() - t0, 1)
        print(f"  {name}: macro-F1 {rows[name]['macro_f1']} ({timing[name]} s)", file=sys.stderr, flush=True)
        return model

    for size in (8, 16):
        sdata, ref = hd_slide(generated, size), generated[2]
        shares = truth_shares(sdata, f"square_{size:03d}um")
        hc.tl.deconvolve(sdata, ref, method="poisson", progress=False)
        deconv[f"bins_{size}um"] = {"mean_abs_error": deconvolution_error(sdata, shares),
                                    "median_counts": float(np.median(np.asarray(sdata.tables["table"].X.sum(1)).ravel()))}
        for bags in ("centroid", "overlap"):
            run(f"bins_{size}um_{bags}", sdata, spot_bags=bags)
        if size == 8:
            train8 = sdata
            for min_counts in args.min_counts:
                pooled = hc.tl.deconvolve(sdata, ref, method="poisson", min_counts=min_counts, progress=False, copy=True)
                deconv[f"bins_8um_pooled_{min_counts:g}"] = {"mean_abs_error": deconvolution_error(pooled, shares),
                                                            "n_pooled": pooled.tables["table"].uns["deconvolution"]["n_pooled"]}
                for bags in ("centroid", "overlap"):
                    run(f"bins_8um_{bags}_pooled_{min_counts:g}", pooled, spot_bags=bags)
    visium = visium_circles(generated, h_and_e_only(train8), train8.attrs["mpp"])
    shares = visium.tables["table"].obsm["proportions"].copy()  # pseudo_spots: the true shares
    hc.tl.deconvolve(visium, ref, method="poisson", progress=False)
    deconv["visium_55um"] = {"mean_abs_error": deconvolution_error(visium, shares),
                             "median_counts": float(np.median(np.asarray(visium.tables["table"].X.sum(1)).ravel()))}
    run("visium_55um", visium, spot_bags="centroid")
    run("supervised_twin", train8, nucleus_labels_key="true_cell_type")
    train_types = train8.tables["histocell"].obs["true_cell_type"].dropna().astype(str)
    known = test.tables["histocell"].obs["true_cell_type"].dropna().astype(str)
    rows["prior_only"] = classification(known, np.full(len(known), train_types.mode()[0], dtype=object), TYPES)
    return {
        "train_seed": args.train_seed, "test_seed": args.test_seed, "size_um": args.size_um, "mpp": float(train8.attrs["mpp"]),
        "train_nuclei": int(train8.tables["histocell"].n_obs), "test_nuclei": int(test.tables["histocell"].n_obs),
        "fit": fit_kwargs | model_kwargs | {"seed": 0, "encoder": "pretrained"},
        "scores": rows, "deconvolution": deconv, "fit_and_predict_s": timing,
    }


def section_full_area(args) -> dict:
    folder = Path(tempfile.mkdtemp(prefix="hc_hd_full_"))
    steps = {}

    def step(name, fn):
        reset_ok = reset_peak_rss()
        t0 = time.perf_counter()
        result = fn()
        steps[name] = {"s": round(time.perf_counter() - t0, 1), "peak_rss_gib": vm_hwm_gib(), "peak_reset": reset_ok}
        print(f"  {name}: {steps[name]}", file=sys.stderr, flush=True)
        return result

    path, truth, ref = step("write_synthetic", lambda: hc.datasets.synthetic_visium_hd(
        folder / "outs", seed=args.train_seed, width_um=args.full_size_um, height_um=args.full_size_um, bin_sizes_um=(8,), progress=False))
    sdata = step("read_8um", lambda: hc.io.read_visium_hd(path, bin_size_um=8))
    labels = truth.labels["truth_labels"].data
    step("store_nuclei", lambda: hc.pp.store_nuclei(sdata, labels.compute()))
    step("deconvolve_poisson_pooled", lambda: hc.tl.deconvolve(sdata, ref, method="poisson", min_counts=args.min_counts[0], progress=False))
    model = hc.HistoCell(TYPES, tile_um=args.tile_um)
    step("fit", lambda: model.fit(sdata, seed=0, progress=False, epochs=args.full_epochs, self_training_epochs=0, state_epochs=0))
    pipeline = ("read_8um", "store_nuclei", "deconvolve_poisson_pooled", "fit")
    return {
        "size_um": args.full_size_um, "bins_8um": int(sdata.tables["table"].n_obs), "nuclei": int(sdata.tables["histocell"].n_obs),
        "nnz": int(sdata.tables["table"].X.nnz), "epochs": args.full_epochs, "spots_train": model.training_summary_["spots_train"],
        "mean_epoch_s": round(float(np.mean(model.fit_timing_["epoch_s"])), 1), "prepare_s": round(model.fit_timing_["prepare_s"], 1),
        "steps": steps, "pipeline_s": round(sum(steps[s]["s"] for s in pipeline), 1),
        "pipeline_peak_rss_gib": max(steps[s]["peak_rss_gib"] or 0 for s in pipeline),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small slides and 2 epochs (smoke test)")
    parser.add_argument("--sections", default="regimes,full_area")
    parser.add_argument("--train-seed", type=int, default=0)
    parser.add_argument("--test-seed", type=int, default=7)
    parser.add_argument("--size-um", type=float, default=800.0)
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--self-training-epochs", type=int, default=5)
    parser.add_argument("--tile-um", type=float, default=200.0)
    parser.add_argument("--min-counts", type=float, nargs="+", default=[30.0], help="pooling thresholds measured (the first is used by full_area)")
    parser.add_argument("--full-size-um", type=float, default=6500.0)
    parser.add_argument("--full-epochs", type=int, default=1)
    parser.add_argument("--torch-threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "visium_hd.json")
    parser.add_argument("--update", action="store_true", help="merge the sections into an existing --out file")
    args = parser.parse_args()
    if args.quick:
        args.size_um, args.epochs, args.self_training_epochs, args.full_size_um = 400.0, 2, 1, 800.0
    warnings.simplefilter("ignore")
    import logging

    logging.getLogger("histocell_sd").setLevel(logging.ERROR)
    torch.set_num_threads(args.torch_threads)
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = set(sections) - {"regimes", "full_area"}
    if unknown:
        parser.error(f"unknown sections {sorted(unknown)}")
    out = json.loads(args.out.read_text()) if args.update and args.out.is_file() else {}
    runs = out.setdefault("runs", [])
    run = {"argv": sys.argv[1:], "sections": sections, "loadavg_start": [round(x, 2) for x in os.getloadavg()],
           "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads()}
    started = time.perf_counter()
    for name in sections:
        t0 = time.perf_counter()
        out[name] = section_regimes(args) if name == "regimes" else section_full_area(args)
        out[name]["section_s"] = round(time.perf_counter() - t0, 1)
        out[name]["run"] = len(runs)
        print(f"[{name} done in {out[name]['section_s']} s]", file=sys.stderr, flush=True)
    run["total_s"] = round(time.perf_counter() - started, 1)
    run["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    runs.append(run)
    write_json(out, args.out)


if __name__ == "__main__":
    main()
