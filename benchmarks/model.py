"""Benchmark of the HistoCell model (issue 4, "Must be measured"); prints one JSON object.

Sections (``--sections synthetic,speed``; the real-data sections live in ``benchmarks/real.py``):

``synthetic``
    Train on the synthetic slide seed 0 and score the nuclei of an unseen held-out slide (seed 7).
    Nuclei come from ``pp.segment_nuclei`` on both slides; a segmented nucleus takes the truth of the
    true nucleus it is matched to one-to-one within 3 µm (``pp.match_points``); detection scores are
    reported separately and classification metrics on matched nuclei only. Compared: the weakly
    supervised model (spot proportions only), prior-only (majority type of the training proportions,
    and types sampled from them), morphology-only classifiers on the nuclei table's features trained on
    the same weak labels (spot argmax label, and every nucleus repeated once per type with its spot's
    proportion as sample weight) and the supervised twin (same architecture, true types of the matched
    training nuclei, unmatched nuclei unlabelled).
``speed``
    ``"visium"`` preset (seed 1; generation not timed); nuclei stored from the truth raster with
    ``pp.store_nuclei`` to isolate the model: training time, end-to-end inference nuclei/s
    (``tl.predict``: crops + forward + writing), peak RSS and a determinism check.

Usage::

    python benchmarks/model.py [--quick] [--sections synthetic,speed] [--out benchmarks/results/model.json]

``--quick`` uses the ``"tiny"`` preset and few epochs everywhere, to smoke-test the script.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.ensemble import HistGradientBoostingClassifier
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score, confusion_matrix, f1_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

import histocell_sd as hc
from histocell_sd import pp, tl
from histocell_sd._constants import HISTOCELL_KEY
from histocell_sd.datasets import CELL_STATES, CELL_TYPES, TRUTH_TABLE_KEY

MATCH_UM = 3.0
COMPARTMENTS = {"tumor": ["tumor"], "stroma": ["fibroblast", "endothelial"], "immune": ["lymphocyte", "macrophage"]}
SPEED_TRAIN_BUDGET_S = 480.0  # leave head-room under the 10 min target when epochs must be reduced


def timing_summary(model: hc.HistoCell) -> dict:
    """Seconds of the model's last fit (``fit_timing_``): preparation, epochs, total."""
    t = model.fit_timing_
    return {
        "fit_s": round(t["fit_s"], 1),
        "prepare_s": round(t["prepare_s"], 1),
        "epochs_run": len(t["epoch_s"]),
        "epochs_by_stage": model.history_["stage"].value_counts(sort=False).to_dict() if model.history_ is not None else {},
        "mean_epoch_s": round(float(np.mean(t["epoch_s"])), 2) if t["epoch_s"] else None,
    }


# ---------------------------------------------------------------------------------------- helpers
def peak_rss_gib() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3)


def vm_hwm_gib() -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 2**20, 3)
    except OSError:
        pass
    return None


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS counter (VmHWM) of this process (Linux ≥ 4.0)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def classification(true, pred, labels) -> dict:
    true, pred = np.asarray(true, dtype=object), np.asarray(pred, dtype=object)
    present = [t for t in labels if (true == t).any()]
    return {
        "n": int(len(true)),
        "accuracy": round(float(accuracy_score(true, pred)), 4),
        "macro_f1": round(float(f1_score(true, pred, labels=present, average="macro", zero_division=0)), 4),
        "weighted_f1": round(float(f1_score(true, pred, labels=present, average="weighted", zero_division=0)), 4),
        "per_class_f1": {t: round(float(v), 4) for t, v in zip(present, f1_score(true, pred, labels=present, average=None, zero_division=0))},
    }


def match_truth(sdata, mpp: float) -> tuple[pd.DataFrame, dict]:
    """Truth (type, state, compartment) of each segmented nucleus (NaN when unmatched) and detection scores."""
    nuclei = sdata.tables[HISTOCELL_KEY]
    truth = sdata.tables[TRUTH_TABLE_KEY]
    pred_xy = np.asarray(nuclei.obsm["spatial"], dtype=float)
    true_xy = np.asarray(truth.obsm["spatial"], dtype=float)
    pi, ti = pp.match_points(pred_xy, true_xy, max_dist=MATCH_UM / mpp)
    columns = [c for c in ("cell_type", "cell_state", "compartment") if c in truth.obs]
    out = pd.DataFrame(np.nan, index=nuclei.obs_names, columns=columns, dtype=object)
    for c in columns:
        out.iloc[pi, out.columns.get_loc(c)] = truth.obs[c].astype(str).to_numpy()[ti]
    n_pred, n_true, n_match = len(pred_xy), len(true_xy), len(pi)
    detection = {
        "n_pred": n_pred,
        "n_true": n_true,
        "n_matched": n_match,
        "precision": round(n_match / max(n_pred, 1), 4),
        "recall": round(n_match / max(n_true, 1), 4),
        "f1": round(2 * n_match / max(n_pred + n_true, 1), 4),
        "max_dist_um": MATCH_UM,
    }
    return out, detection


def morphology_baselines(train_tables, test_table, types, seed: int = 0) -> dict[str, np.ndarray]:
    """Classifiers on the nuclei table's morphology X, trained on weak (spot) labels only.

    ``train_tables``: list of (nuclei AnnData, spot proportions DataFrame). Nuclei outside spots are
    not used. Returns predictions for ``test_table`` per variant.
    """
    xs, props = [], []
    for nuclei, proportions in train_tables:
        spot = nuclei.obs["spot_id"]
        inside = spot.notna().to_numpy() & spot.isin(proportions.index).to_numpy()
        xs.append(np.asarray(nuclei.X, dtype=np.float64)[inside])
        props.append(proportions.loc[spot[inside].astype(str)].to_numpy(dtype=np.float64))
    x, p = np.concatenate(xs), np.concatenate(props)
    x_test = np.asarray(test_table.X, dtype=np.float64)
    types = np.asarray(types, dtype=object)
    out = {}
    # (1) every nucleus labelled with its spot's argmax type
    y_argmax = types[p.argmax(1)]
    # (2) every nucleus once per type present in its spot, weighted by the spot proportion
    rows, cols = np.nonzero(p > 0)
    x_rep, y_rep, w_rep = x[rows], types[cols], p[rows, cols]
    for name, model in {
        "hgb": lambda: HistGradientBoostingClassifier(max_iter=200, learning_rate=0.1, random_state=seed),
        "logreg": lambda: make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000)),
    }.items():
        if len(np.unique(y_argmax)) > 1:
            out[f"{name}_spot_argmax_labels"] = model().fit(x, y_argmax).predict(x_test)
        clf = model()
        if name == "logreg":
            clf.fit(x_rep, y_rep, logisticregression__sample_weight=w_rep)
        else:
            clf.fit(x_rep, y_rep, sample_weight=w_rep)
        out[f"{name}_proportion_weighted"] = clf.predict(x_test)
    return out


def prior_baselines(proportions_list, n_test: int, types, seed: int = 0) -> dict[str, np.ndarray]:
    """Majority type of the training proportions, and types sampled from their mean."""
    p = pd.concat(proportions_list)[list(types)].to_numpy(dtype=np.float64)
    mean = p.mean(0)
    mean = mean / mean.sum()
    types = np.asarray(types, dtype=object)
    rng = np.random.default_rng(seed)
    return {
        "majority": np.full(n_test, types[mean.argmax()], dtype=object),
        "proportions_sampled": types[rng.choice(len(types), size=n_test, p=mean)],
        "_mean_training_proportions": {t: round(float(v), 4) for t, v in zip(types, mean)},
    }


def spot_pearson(table, types) -> dict:
    pred = table.obsm["histocell_proportions"]
    pred = pd.DataFrame(pred, index=table.obs_names) if not isinstance(pred, pd.DataFrame) else pred
    true = table.obsm["true_proportions"] if "true_proportions" in table.obsm else table.obsm["proportions"]
    keep = pred.notna().all(axis=1).to_numpy()
    a = pred.loc[keep, list(types)].to_numpy(np.float64)
    b = true.loc[pred.index[keep], list(types)].to_numpy(np.float64)
    per_type = {t: round(float(np.corrcoef(a[:, i], b[:, i])[0, 1]), 4) for i, t in enumerate(types) if b[:, i].std() > 0}
    return {
        "mean_per_type_r": round(float(np.mean(list(per_type.values()))), 4),
        "pearson_r_all": round(float(np.corrcoef(a.ravel(), b.ravel())[0, 1]), 4),  # pooled over types (inflated; kept for comparison)
        "pearson_r_per_type": per_type,
        "mean_abs_error": round(float(np.abs(a - b).mean()), 4),
        "spots_scored": int(keep.sum()),
        "spots_without_nuclei": int((~keep).sum()),
    }


def predictions(sdata, model, **kwargs) -> tuple[pd.DataFrame, float]:
    start = time.perf_counter()
    tl.predict(sdata, model, progress=False, **kwargs)
    seconds = time.perf_counter() - start
    obs = sdata.tables[HISTOCELL_KEY].obs.copy()
    if "cell_state" not in obs:  # a model whose state heads were not trained writes no states
        obs["cell_state"] = np.nan
    return obs[["cell_type", "cell_state", "compartment"]].astype(str), seconds


# ---------------------------------------------------------------------------------------- sections
def section_synthetic(args) -> dict:
    preset = "tiny" if args.quick else "default"
    fit_kwargs = {"epochs": 3, "self_training_epochs": 1, "state_epochs": 1} if args.quick else cli_epochs(args)
    types = list(CELL_TYPES)
    result = {"preset": preset, "train_seed": args.train_seed, "test_seed": args.test_seed, "fit_kwargs": fit_kwargs or "defaults"}
    slides = {}
    for role, seed in (("train", args.train_seed), ("test", args.test_seed)):
        sdata, _ = hc.datasets.synthetic_visium(seed=seed, preset=preset, progress=False)
        start = time.perf_counter()
        pp.segment_nuclei(sdata, progress=False)
        seg_s = time.perf_counter() - start
        mpp = sdata.attrs["mpp"]
        truth, detection = match_truth(sdata, mpp)
        detection["segment_s"] = round(seg_s, 1)
        result[f"detection_{role}"] = detection
        slides[role] = (sdata, truth)
    train, train_truth = slides["train"]
    test, test_truth = slides["test"]
    train.tables["histocell"].obs["true_type"] = train_truth["cell_type"].to_numpy()
    matched = test_truth["cell_type"].notna().to_numpy()
    true_type = test_truth["cell_type"].to_numpy()[matched]
    scores = {}

    # (a) weak
    weak = hc.HistoCell(types, states=CELL_STATES, compartments=COMPARTMENTS)
    weak.fit(train, seed=0, progress=False, **fit_kwargs)
    pred, predict_s = predictions(test, weak)
    scores["weak"] = classification(true_type, pred["cell_type"].to_numpy()[matched], types)
    result["weak_training"] = timing_summary(weak) | {"summary": weak.training_summary_}
    result["weak_predict_s"] = round(predict_s, 2)
    result["spot_level_test"] = spot_pearson(test.tables["table"], types)
    cm = confusion_matrix(true_type, pred["cell_type"].to_numpy()[matched], labels=types)
    result["weak_confusion"] = {"labels": types, "rows": "true", "columns": "predicted", "matrix": cm.tolist()}
    true_state = test_truth["cell_state"].to_numpy()[matched]
    result["weak_state"] = classification(true_state, pred["cell_state"].to_numpy()[matched], weak.state_names)
    true_comp = test_truth["compartment"].to_numpy()[matched]
    pred_comp = pred["compartment"].to_numpy()[matched]
    result["weak_compartment"] = {
        "accuracy_all": round(float((true_comp == pred_comp).mean()), 4),
        "predicted_mixed_fraction": round(float((pred_comp == "mixed").mean()), 4),
        "accuracy_excluding_predicted_mixed": round(float((true_comp == pred_comp)[pred_comp != "mixed"].mean()), 4)
        if (pred_comp != "mixed").any() else None,
        "note": "per matched nucleus, predicted compartment vs the true compartment of the cell; 'mixed' counts as wrong",
    }
    weak_proba = test.tables["histocell"].obsm["cell_type_proba"].to_numpy().copy()

    # (b) prior-only
    priors = prior_baselines([train.tables["table"].obsm["proportions"]], int(matched.sum()), types)
    result["training_mean_proportions"] = priors.pop("_mean_training_proportions")
    for name, p in priors.items():
        scores[f"prior_{name}"] = classification(true_type, p, types)

    # (c) morphology-only on the same weak labels
    morph = morphology_baselines([(train.tables["histocell"], train.tables["table"].obsm["proportions"])], test.tables["histocell"], types)
    for name, p in morph.items():
        scores[f"morphology_{name}"] = classification(true_type, np.asarray(p)[matched], types)

    # (d) supervised twin
    sup = hc.HistoCell(types, states=CELL_STATES, compartments=COMPARTMENTS)
    sup_kwargs = fit_kwargs | {"state_epochs": 0}  # only the type head is scored
    sup.fit(train, seed=0, progress=False, nucleus_labels_key="true_type", **sup_kwargs)
    pred_sup, _ = predictions(test, sup)
    scores["supervised_twin"] = classification(true_type, pred_sup["cell_type"].to_numpy()[matched], types)
    result["supervised_training"] = timing_summary(sup) | {"fit_kwargs": sup_kwargs, "labelled_training_nuclei": int(train_truth["cell_type"].notna().sum())}

    # determinism: predicting again with the weak model gives identical probabilities
    tl.predict(test, weak, progress=False)
    result["weak_predict_twice_identical"] = bool(np.array_equal(weak_proba, test.tables["histocell"].obsm["cell_type_proba"].to_numpy()))

    result["scores"] = scores
    result["ratio_weak_over_supervised_macro_f1"] = round(scores["weak"]["macro_f1"] / max(scores["supervised_twin"]["macro_f1"], 1e-9), 4)
    result["targets"] = {
        "weak_over_supervised_macro_f1>=0.9": result["ratio_weak_over_supervised_macro_f1"] >= 0.9,
        "spot_pooled_r>=0.9": result["spot_level_test"]["pearson_r_all"] >= 0.9,
    }
    result["notes"] = (
        "classification metrics on segmented test nuclei matched one-to-one to a true nucleus within 3 µm; "
        "morphology baselines use the 13 features of the nuclei table (pp.FEATURES, X) of training nuclei inside spots: "
        "'spot_argmax_labels' = each nucleus labelled with its spot's argmax type; 'proportion_weighted' = each nucleus "
        "repeated once per type with the spot proportion as sample weight; the supervised twin trains on the true types "
        "of matched training nuclei (unmatched = unlabelled, ignored in the loss)."
    )
    result["_weak_model"] = weak
    result["_epoch_s_per_training_spot"] = (
        result["weak_training"]["mean_epoch_s"] / max(weak.training_summary_["spots_train"], 1) if result["weak_training"]["mean_epoch_s"] else None
    )
    return result


def cli_epochs(args) -> dict:
    """Epoch caps given on the command line (library defaults where not given)."""
    return {k: v for k, v in (("epochs", args.epochs), ("self_training_epochs", args.self_training_epochs), ("state_epochs", args.state_epochs)) if v is not None}


def section_speed(args, estimate_epoch_s_per_spot: float | None, trained=None) -> dict:
    preset = "tiny" if args.quick else args.speed_preset
    types = list(CELL_TYPES)
    start = time.perf_counter()
    sdata, reference = hc.datasets.synthetic_visium(seed=1, preset=preset, progress=False)
    del reference
    result = {"preset": preset, "seed": 1, "generate_s_not_counted": round(time.perf_counter() - start, 1)}
    result["peak_rss_gib_after_generation"] = peak_rss_gib()
    start = time.perf_counter()
    pp.store_nuclei(sdata, sdata.labels["truth_labels"].data, method="truth")
    result["store_nuclei_s"] = round(time.perf_counter() - start, 1)
    gc.collect()
    result["peak_rss_reset"] = reset_peak_rss()
    result["rss_after_reset_gib"] = vm_hwm_gib()
    n_nuclei = int(sdata.tables["histocell"].n_obs)
    n_spots = int(sdata.tables["table"].n_obs)
    result.update({"nuclei": n_nuclei, "spots": n_spots, "torch_threads": __import__("torch").get_num_threads()})
    default_epochs = sum(hc.models.stage_epochs(round(n_spots * 0.85)).values())  # the library's defaults on this slide
    if args.speed_train == "fit" or trained is None:
        fit_kwargs = {"epochs": 2, "self_training_epochs": 1, "state_epochs": 1} if args.quick else cli_epochs(args)
        result["fit_kwargs"] = fit_kwargs or "defaults"
        model = hc.HistoCell(types, states=CELL_STATES, compartments=COMPARTMENTS)
        model.fit(sdata, seed=0, progress=False, **fit_kwargs)
        t = timing_summary(model)
        result["training"] = t | {"summary": model.training_summary_}
        if t["mean_epoch_s"]:
            result["training"]["default_fit_extrapolated_upper_bound_s"] = round(t["prepare_s"] + default_epochs * t["mean_epoch_s"], 0)
        result["training_measured_on_this_slide"] = True
    else:
        model = trained
        result["training_measured_on_this_slide"] = False
        result["model_used_for_inference"] = "the weak model of the synthetic section (inference speed does not depend on the weights)"
    _, first_s = predictions(sdata, model)
    first = sdata.tables["histocell"].obsm["cell_type_proba"].to_numpy().copy()
    first_state = sdata.tables["histocell"].obsm["cell_state_proba"].to_numpy().copy()
    _, second_s = predictions(sdata, model)
    second = sdata.tables["histocell"].obsm["cell_type_proba"].to_numpy()
    result["predict"] = {
        "seconds_first": round(first_s, 2),
        "seconds_second": round(second_s, 2),
        "nuclei_per_s_first": round(n_nuclei / first_s, 0),
        "nuclei_per_s_second": round(n_nuclei / second_s, 0),
    }
    result["predict_twice_identical"] = bool(
        np.array_equal(first, second) and np.array_equal(first_state, sdata.tables["histocell"].obsm["cell_state_proba"].to_numpy())
    )
    truth = sdata.tables[TRUTH_TABLE_KEY].obs["cell_type"].astype(str)
    ids = sdata.tables["histocell"].obs_names
    pred = sdata.tables["histocell"].obs["cell_type"].astype(str).to_numpy()
    same = truth.reindex(ids).to_numpy()  # store_nuclei names nuclei "nucleus_<label>" like the truth table
    known = pd.notna(same)
    result["nucleus_scores_vs_truth_info_only"] = classification(same[known], pred[known], types)
    result["peak_rss_gib"] = {"ru_maxrss_process": peak_rss_gib(), "vm_hwm_since_reset": vm_hwm_gib()}
    if not result["training_measured_on_this_slide"] and estimate_epoch_s_per_spot:
        epoch_s = estimate_epoch_s_per_spot * n_spots * 0.85  # 15 % of spots are held out for validation
        result["training_extrapolated"] = {
            "method": "seconds per training spot per epoch measured in the synthetic section (same architecture, same defaults) "
                      "x training spots of this slide; preprocessing approximated by the first predict call (an upper bound)",
            "epoch_s_per_training_spot": round(estimate_epoch_s_per_spot, 4),
            "epoch_s": round(epoch_s, 1),
            "default_max_epochs": default_epochs,
            "default_fit_upper_bound_s": round(first_s + default_epochs * epoch_s, 0),
            "epochs_fitting_in_600_s": int(max(0, (600 - first_s) // epoch_s)),
        }
    fit_s = result.get("training", {}).get("fit_s") or result.get("training_extrapolated", {}).get("default_fit_upper_bound_s", np.inf)
    result["targets"] = {
        "inference_nuclei_per_s>=3000": result["predict"]["nuclei_per_s_second"] >= 3000,
        "training_s<=600": bool(fit_s <= 600),
        "peak_rss<=8GiB": (result["peak_rss_gib"]["vm_hwm_since_reset"] or result["peak_rss_gib"]["ru_maxrss_process"]) <= 8,
        "deterministic": result["predict_twice_identical"],
    }
    result["notes"] = (
        "nuclei stored from the truth raster with pp.store_nuclei (segmentation not timed); the in-memory slide "
        "(image + truth raster) is part of the RSS; vm_hwm_since_reset is the peak RSS after generation "
        "(/proc/self/clear_refs 5), ru_maxrss_process includes generation and earlier sections."
    )
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny preset and few epochs (smoke test)")
    parser.add_argument("--sections", default="synthetic,speed")
    parser.add_argument("--train-seed", type=int, default=0)
    parser.add_argument("--test-seed", type=int, default=7)
    parser.add_argument("--epochs", type=int, default=None, help="cap of the first stage (default: library default)")
    parser.add_argument("--self-training-epochs", type=int, default=None)
    parser.add_argument("--state-epochs", type=int, default=None)
    parser.add_argument("--speed-preset", default="visium")
    parser.add_argument("--speed-train", choices=["fit", "extrapolate"], default="fit",
                        help="'extrapolate': time inference on the slide with the synthetic section's model and extrapolate training")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "model.json")
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    import logging

    logging.getLogger("histocell_sd").setLevel(logging.ERROR)
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = set(sections) - {"synthetic", "speed"}
    if unknown:
        parser.error(f"unknown sections {sorted(unknown)}")
    out = {"quick": args.quick, "sections": sections, "argv": sys.argv[1:], "loadavg_start": [round(x, 2) for x in os.getloadavg()], "cpu_count": os.cpu_count()}
    estimate, trained = None, None
    started = time.perf_counter()
    for name in sections:
        t0 = time.perf_counter()
        if name == "synthetic":
            out[name] = section_synthetic(args)
            estimate = out[name].pop("_epoch_s_per_training_spot")
            trained = out[name].pop("_weak_model")
        else:
            out[name] = section_speed(args, estimate, trained)
        out[name]["section_s"] = round(time.perf_counter() - t0, 1)
        print(f"[{name} done in {out[name]['section_s']} s]", file=sys.stderr, flush=True)
    out["total_s"] = round(time.perf_counter() - started, 1)
    out["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    write_json(out, args.out)


def write_json(out: dict, path: Path) -> None:
    """Write ``out`` to ``path`` (numpy scalars as numbers) and print it: every benchmark script's output."""
    text = json.dumps(out, indent=1, default=lambda o: o.item() if hasattr(o, "item") else str(o))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
