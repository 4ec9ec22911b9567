"""Benchmark: Tangram alone vs HistoCell alone vs histology-refined deconvolution, against truth.

Prints JSON. Spot level: RMSE and mean Jensen-Shannon divergence of the spot proportions against the
true cell fractions, for Tangram, the Poisson mixture alone (``deconvolve(method="poisson")``),
HistoCell alone (mean nucleus probability), the refinement with the spot counts (default) and the
refinement of Tangram's proportions (``expression="proportions"``). Nucleus level: accuracy of a
deconvolution's in-spot assignment (type counts dealt in arbitrary order, as
``tangram.utils.deconvolve_cell_annotations``), of the image model alone (argmax), of both
refinements, and the bound of any assignment given the true counts. Regimes: normal depth, low UMI
depth (``umi_per_cell=300``), a cell type missing from the reference, and a platform effect
(every reference gene's expression scaled by a log-normal factor, sd 0.5, as between a single-cell
reference and Visium). A separate run times deconvolve + refine on the ``"visium"`` preset
(generation not counted).

Usage::

    python benchmarks/deconvolution.py --probabilities simulated [--seeds 101 102] [--timing-preset visium]

``--probabilities model`` trains HistoCell on slide seed 0 and predicts each slide's nuclei (the
real pipeline); ``--probabilities simulated`` uses a stand-in for HistoCell's nucleus probabilities (noisy around
the true type, ~70 % top-1, confusing fibroblast/endothelial and lymphocyte/macrophage); the
probability source is the single function :func:`nucleus_probabilities`.
"""

from __future__ import annotations

import argparse
import functools
import json
import time
import warnings

import numpy as np
import pandas as pd
from scipy import sparse

from histocell_sd import tl
from histocell_sd._constants import (
    CELL_TYPE_KEY,
    CELL_TYPE_PROBA_KEY,
    HISTOCELL_KEY,
    PREDICTED_PROPORTIONS_KEY,
    SPOT_ID_KEY,
)
from histocell_sd.datasets import confused_probabilities, synthetic_visium, truth_as_predictions
from histocell_sd.models import HistoCell


@functools.cache
def trained_model():
    """HistoCell trained on the spot proportions of synthetic slide seed 0 (nuclei from its truth raster)."""
    from histocell_sd.datasets import CELL_STATES, CELL_TYPES
    from histocell_sd.pp import store_nuclei

    train, _ = synthetic_visium(seed=0, progress=False)
    store_nuclei(train, np.asarray(train.labels["truth_labels"]))
    compartments = {"tumor": ["tumor"], "stroma": ["fibroblast", "endothelial"], "immune": ["lymphocyte", "macrophage"]}
    return HistoCell(CELL_TYPES, states=CELL_STATES, compartments=compartments).fit(train, progress=False)


def nucleus_probabilities(sdata, source: str, seed: int) -> pd.DataFrame:
    """The one place the nucleus probabilities come from: ``"simulated"`` stand-in or the ``"model"``."""
    truth = sdata.tables["truth_nuclei"].obs
    types = ["tumor", "fibroblast", "lymphocyte", "macrophage", "endothelial"]
    if source == "simulated":
        return confused_probabilities(sdata, seed=seed)
    from histocell_sd.pp import store_nuclei

    store_nuclei(sdata, np.asarray(sdata.labels["truth_labels"]))
    tl.predict(sdata, trained_model(), progress=False)
    proba = sdata.tables[HISTOCELL_KEY].obsm[CELL_TYPE_PROBA_KEY]
    proba = proba.set_axis(proba.index.str.removeprefix("nucleus_").astype(int))
    # truth rows are label ids 1..n; a nucleus with no pixel in the raster gets a uniform probability
    return proba.reindex(truth["label_id"].to_numpy()).fillna(1.0 / len(types)).set_axis(truth.index)[types]


def tangram_assignment(sdata, proportions: pd.DataFrame, seed: int) -> np.ndarray:
    """Tangram's deconvolve_cell_annotations: largest-remainder type counts dealt in arbitrary order."""
    from histocell_sd.tl._deconvolution.refine_em import largest_remainder

    nuclei = sdata.tables[HISTOCELL_KEY].obs
    rng = np.random.default_rng(seed)
    out = np.full(len(nuclei), None, dtype=object)
    types = np.asarray(proportions.columns)
    for spot, idx in nuclei.groupby(SPOT_ID_KEY, observed=True).indices.items():
        counts = largest_remainder(proportions.loc[spot].to_numpy(), len(idx))
        out[rng.permutation(idx)] = np.repeat(types, counts)  # segmentation order is arbitrary w.r.t. type
    return out


def spot_scores(pred: pd.DataFrame, truth: pd.DataFrame) -> dict:
    pred = pred.reindex(columns=truth.columns, fill_value=0.0).to_numpy(dtype=np.float64)
    true = truth.to_numpy(dtype=np.float64)
    m = 0.5 * (pred + true)

    def kl(a, b):
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(a > 0, a * np.log(a / np.maximum(b, 1e-12)), 0.0).sum(axis=1)

    return {"rmse": round(float(np.sqrt(((pred - true) ** 2).mean())), 4),
            "jsd": round(float((0.5 * kl(pred, m) + 0.5 * kl(true, m)).mean() / np.log(2)), 4)}


def platform_shift(reference, sd: float, seed: int):
    """The reference as another platform would measure it: each gene scaled by exp(N(0, sd)), counts redrawn."""
    rng = np.random.default_rng(seed)
    factor = np.exp(rng.normal(0, sd, reference.n_vars))
    shifted = reference.copy()
    shifted.X = sparse.csr_matrix(rng.poisson(reference.X.toarray() * factor).astype(np.float32))
    return shifted


def oracle_assignment(sdata) -> np.ndarray:
    """Upper bound of any in-spot assignment: the true type counts of each spot, matched on the image posteriors."""
    from histocell_sd.tl._deconvolution.refine_em import assign_nuclei

    nuclei = sdata.tables[HISTOCELL_KEY]
    proba = nuclei.obsm[CELL_TYPE_PROBA_KEY]
    types = list(proba.columns)
    spot_of = pd.Index(sdata.tables["table"].obs_names).get_indexer(nuclei.obs[SPOT_ID_KEY].astype(object))
    inside = spot_of >= 0
    true = pd.Categorical(sdata.tables["truth_nuclei"].obs[CELL_TYPE_KEY].astype(str), categories=types).codes
    counts = np.zeros((len(sdata.tables["table"]), len(types)))
    np.add.at(counts, (spot_of[inside], true[inside]), 1)
    n = counts.sum(axis=1)
    likelihood = proba.to_numpy() / proba.to_numpy().mean(axis=0)
    q = likelihood * (counts / np.maximum(n, 1)[:, None])[np.maximum(spot_of, 0)]
    q /= np.maximum(q.sum(axis=1, keepdims=True), 1e-300)
    out = np.full(len(nuclei), None, dtype=object)
    out[inside] = np.asarray(types)[assign_nuclei(q, spot_of, n.astype(int), counts / np.maximum(n, 1)[:, None], False)]
    return out


def evaluate(sdata, reference, probabilities: str, seed: int, epochs: int, strength: float, missing: str | None = None,
             image_prior: str | None = "mean", umi_weight: float = 1.0) -> dict:
    """Run both deconvolutions and both refinements on one slide and score every view against truth."""
    if missing is not None:
        reference = reference[reference.obs["cell_type"] != missing].copy()
        reference.obs["cell_type"] = reference.obs["cell_type"].cat.remove_unused_categories()
    truth_as_predictions(sdata, proba=nucleus_probabilities(sdata, probabilities, seed))
    spots, nuclei = sdata.tables["table"], sdata.tables[HISTOCELL_KEY]
    seconds = {}
    t0 = time.perf_counter()
    tl.deconvolve(sdata, reference, epochs=epochs, seed=seed, progress=False)
    seconds["deconvolve_tangram"] = time.perf_counter() - t0
    tl.deconvolve(sdata, reference, method="poisson", key_added="poisson_proportions", progress=False)
    filled = "raise" if missing is None else "image"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t0 = time.perf_counter()
        tl.refine_deconvolution(sdata, reference, umi_weight=umi_weight, image_prior=image_prior, missing_types=filled,
                                expression_key=None if missing else "histocell_expression", progress=False)
        seconds["refine_counts"] = time.perf_counter() - t0
        counts_types = nuclei.obs["refined_cell_type"].astype(str).copy()
        tl.refine_deconvolution(sdata, expression="proportions", key_added="refined_from_tangram", strength=strength,
                                image_prior=image_prior, missing_types=filled, progress=False)
    truth = spots.obsm["true_proportions"]
    has = spots.obs_names.isin(nuclei.obs[SPOT_ID_KEY].dropna().unique())
    true_type = sdata.tables["truth_nuclei"].obs[CELL_TYPE_KEY].astype(str).to_numpy()
    in_spot = nuclei.obs[SPOT_ID_KEY].notna().to_numpy()

    def acc(pred):
        return round(float((np.asarray(pred, dtype=object)[in_spot] == true_type[in_spot]).mean()), 4)

    views = {"tangram": "proportions", "poisson": "poisson_proportions", "histocell": PREDICTED_PROPORTIONS_KEY,
             "refined": "refined_proportions", "refined_from_tangram": "refined_from_tangram"}
    return {
        "n_spots": int(spots.n_obs), "n_nuclei": int(nuclei.n_obs),
        "spot": {name: spot_scores(spots.obsm[key][has], truth[has]) for name, key in views.items()},
        "nucleus_accuracy_in_spots": {
            "tangram_arbitrary": acc(tangram_assignment(sdata, spots.obsm["proportions"], seed)),
            "poisson_arbitrary": acc(tangram_assignment(sdata, spots.obsm["poisson_proportions"], seed)),
            "histocell_argmax": acc(nuclei.obs[CELL_TYPE_KEY].astype(str)),
            "refined": acc(counts_types),
            "refined_from_tangram": acc(nuclei.obs["refined_cell_type"].astype(str)),
            "oracle_counts": acc(oracle_assignment(sdata)),
        },
        "seconds": {k: round(v, 1) for k, v in seconds.items()},
    }


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--probabilities", choices=["simulated", "model"], default="simulated")
    parser.add_argument("--seeds", type=int, nargs="+", default=[101, 102])
    parser.add_argument("--preset", default="default")
    parser.add_argument("--timing-preset", default="visium", help="preset timed once ('none' to skip)")
    parser.add_argument("--epochs", type=int, default=500)
    parser.add_argument("--strength", type=float, default=2.0)
    parser.add_argument("--image-prior", choices=["mean", "none"], default="mean")
    parser.add_argument("--umi-weight", type=float, default=1.0)
    parser.add_argument("--regimes", nargs="+", default=None, help="subset of the regimes (default: all)")
    args = parser.parse_args(argv)
    regimes = {"normal": {}, "low_umi_300": {"umi_per_cell": 300.0}, "missing_endothelial": {"missing": "endothelial"},
               "platform_effect_0.5": {"platform_sd": 0.5}}
    prior = None if args.image_prior == "none" else args.image_prior
    results = {"probabilities": args.probabilities, "image_prior": args.image_prior, "preset": args.preset,
               "umi_weight": args.umi_weight, "strength_of_proportions_model": args.strength, "regimes": {}}
    for name, regime in regimes.items():
        if args.regimes and name not in args.regimes:
            continue
        runs = {}
        for seed in args.seeds:
            sdata, reference = synthetic_visium(seed=seed, preset=args.preset, progress=False,
                                                umi_per_cell=regime.get("umi_per_cell", 2500.0))
            if "platform_sd" in regime:
                reference = platform_shift(reference, regime["platform_sd"], seed)
            runs[f"seed{seed}"] = evaluate(sdata, reference, args.probabilities, seed, args.epochs, args.strength, regime.get("missing"),
                                              prior, args.umi_weight)
        results["regimes"][name] = runs
    if args.timing_preset != "none":
        sdata, reference = synthetic_visium(seed=args.seeds[0], preset=args.timing_preset, progress=False)
        run = evaluate(sdata, reference, args.probabilities, args.seeds[0], args.epochs, args.strength, image_prior=prior,
                       umi_weight=args.umi_weight)
        run["seconds"]["total"] = round(sum(run["seconds"].values()), 1)
        results["timing"] = {"preset": args.timing_preset, **run}
    print(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    main()
