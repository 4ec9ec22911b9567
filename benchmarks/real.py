"""The real-data yardstick: detection and weak supervision on real H&E (BRCA-M2C, NuCLS); prints JSON.

Sections (``--sections``):

``detection``
    Nucleus detection P/R/F1 (centroids matched one-to-one within 3 µm) on the BRCA-M2C test split, the
    NuCLS test tiles and unseen synthetic slides, for every segmentation method: ``default`` (the learnt
    segmenter), ``classical`` and a naive rgb2hed + Otsu + watershed baseline. The learnt segmenter scored on
    a real dataset is its leave-one-dataset-out twin (same script, that dataset's labels left out); the
    shipped weights on the same split are reported beside it, labelled as having seen the dataset's labels.
``weak20x``
    Visium-like pseudo-spots (55 µm, 100 µm hex pitch) over the BRCA-M2C train+val patches give spot
    proportions; the models learn from those only and predict the 30 test patches from H&E alone; weighted and
    macro F1 over every segmented test nucleus matched to an annotated cell. Beside the weak model
    (``HistoCell``, pretrained encoder): the same from scratch, prior-only, morphology-only (features of the
    nuclei table with weak labels), the supervised twin (same architecture, the matched dots' classes) and the
    upstream HistoCell design (benchmarks/_upstream.py), all in one run. Segmenter and encoder are the
    BRCA-M2C leave-one-dataset-out twins.
``weak40x``
    The same with every patch resampled to 0.25 µm/px (40x).
``weak20x_seeds``
    The weak model and its supervised twin of ``weak20x`` fitted with several seeds (``--fit-seeds``; a seed
    sets the spot split, sampling, augmentation and initialisation), beside the prior and morphology
    baselines, all in one run (those of ``--models``): the mean and spread of each F1 and of the weak / twin ratio,
    and the fits of all seeds predicting as one ensemble (``tl.predict`` with the list of models: mean probabilities).
``holdout``
    How ``fit`` holds out spots for early stopping (``holdout="spots"``, scattered over every tile, against
    ``"tiles"``, whole 400 µm squares: here whole patches): the weak model of ``weak20x`` (and from scratch, with
    ``weak_scratch_encoder`` in ``--models``) fitted with each over ``--fit-seeds`` on one data preparation;
    nucleus F1 on the scored split, spot agreement on its pseudo-spots (mean per-type r against the true
    proportions), and what ``fit`` reported on its held-out spots.
``st_like``
    Legacy-ST-like spots: 100 µm diameter (about four times the nuclei of a Visium spot) on a 110 µm hex
    pitch, proportions perturbed the way deconvolution errs (Dirichlet noise around the truth, concentration
    ``--dirichlet``; then also one type missing from the labels), on the patient-disjoint split. Spot-level
    agreement on the test patches' spots (mean over types of the Pearson r across spots, against the true
    proportions) next to a ridge regression on each spot's mean nucleus morphology, and nucleus F1; the weak
    model is fitted with each of ``--fit-seeds`` (one noise draw), with a bootstrap interval over test spots of
    its difference to the ridge.
``nucls``
    Smoke test on the 15 NuCLS tiles (tiny): 20 µm pseudo-spots on the 10 train tiles, score the 5 test
    tiles; NuCLS leave-one-dataset-out segmenter and encoder.
``speed``
    Inference nuclei/s of HistoCell and of the upstream design on the same nuclei (BRCA-M2C test patches).

Leave-one-dataset-out weights are trained once by scripts/train_segmenter.py and scripts/train_encoder.py
with ``--exclude`` into ``--lodo-dir`` (reused when present; the JSON records their cards).

Usage::

    python benchmarks/real.py [--brca-m2c PATH] [--sections ...] [--models ...] [--update] [--quick] [--dev] [--out FILE]

``--dev`` trains on the train split and scores the val split (for development; never report it).
``--quick`` uses a few patches and few epochs (smoke test of the script).
``--models`` runs only some models of the weak sections; with ``--update`` the results are merged into an
existing ``--out`` (what is re-run replaces its old entry; ``runs`` lists every invocation, and each section
says which run measured it, ``models_run`` which run measured each model).
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import torch
from scipy import ndimage as ndi
from skimage.transform import rescale
from sklearn.linear_model import RidgeCV

import histocell_sd as hc
from histocell_sd import pp, tl

sys.path.insert(0, str(Path(__file__).parent))
from _upstream import fit_upstream, predict_upstream, training_sample  # noqa: E402
from model import classification, morphology_baselines, prior_baselines, write_json  # noqa: E402
from segmentation_nucls import naive_segment  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
MATCH_UM = 3.0
TYPES = list(hc.datasets.BRCA_M2C_CLASSES)
ST_DIAMETER_UM, ST_PITCH_UM = 100.0, 110.0
MODELS = ("weak", "weak_scratch_encoder", "supervised_twin", "upstream_design", "baselines")
WEAK_SECTIONS = ("weak20x", "weak40x")
NUCLS_SPOT_UM = 20.0


# ------------------------------------------------------------------------------------------ weights
def lodo_weights(kind: str, dataset: str, args) -> Path | None:
    """The ``kind`` network trained without ``dataset``'s labels (trained here by its script when missing;
    None when missing and ``--no-lodo-training``)."""
    out = args.lodo_dir / f"{kind}_no_{dataset}"
    if not (out / "card.json").exists():
        if args.no_lodo_training:
            return None
        script = ROOT / "scripts" / f"train_{kind}.py"
        cmd = [sys.executable, str(script), "--brca-m2c", str(args.brca_m2c), "--exclude", dataset, "--out", str(out)]
        if args.quick:
            cmd += ["--steps", "50"]
        print(f"[training {out.name}: {' '.join(cmd[1:])}]", file=sys.stderr, flush=True)
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return out


def card_summary(path: Path) -> dict:
    card = json.loads((path / "card.json").read_text())
    return {"path": str(path), "weights_sha256": card["weights_sha256"], "training": card["training"]}


# ------------------------------------------------------------------------------------------ data
def upsample(sdata, factor: float):
    """The sample resampled by ``factor`` (image, annotated cells), µm/px divided by it."""
    rgb = np.asarray(hc.io.get_image(sdata).data).transpose(1, 2, 0)
    rgb = np.clip(np.round(rescale(rgb, factor, order=1, channel_axis=-1, preserve_range=True)), 0, 255).astype(np.uint8)
    out = hc.io.from_arrays(rgb, sdata.attrs["mpp"] / factor, sample_id=sdata.attrs["sample_id"])
    truth = sdata.tables["truth_nuclei"].copy()
    truth.obsm["spatial"] = (np.asarray(truth.obsm["spatial"]) + 0.5) * factor - 0.5
    out.tables["truth_nuclei"] = truth
    return out


def brca_samples(args, split: str, *, spots: dict | None, network: Path, factor: float = 1.0) -> list:
    """BRCA-M2C patches of ``split``, optionally with pseudo-spots, segmented, truth transferred to nuclei."""
    names = hc.datasets.brca_m2c_names(split, path=args.brca_m2c)
    if args.quick:
        names = names[: 6 if split != "test" else 3]
    out = []
    for sdata in hc.datasets.brca_m2c(split, path=args.brca_m2c, names=names).values():
        if factor != 1.0:
            sdata = upsample(sdata, factor)
        if spots is not None:
            hc.datasets.pseudo_spots(sdata, cell_types=TYPES, **spots)
        pp.segment_nuclei(sdata, network=network, progress=False)
        if "histocell" not in sdata.tables:
            continue
        tl.transfer_truth(sdata, columns=["cell_type"])
        out.append(sdata)
    return out


def splits(args) -> tuple[list[str], str]:
    return (["train"], "val") if args.dev else (["train", "val"], "test")


def training_set(args, spots: dict, network: Path, factor: float = 1.0) -> list:
    train_splits, _ = splits(args)
    return [s for split in train_splits for s in brca_samples(args, split, spots=spots, network=network, factor=factor)]


def matched_truth(samples: list) -> np.ndarray:
    return np.concatenate([s.tables["histocell"].obs["true_cell_type"].astype(object).to_numpy() for s in samples])


def perturb(samples: list, alpha: float | None, drop: str | None, seed: int) -> None:
    """Replace each spot's proportions by a Dirichlet draw around them and/or drop a type (renormalised)."""
    rng = np.random.default_rng(seed)
    for s in samples:
        table = s.tables["table"]
        p = table.obsm["proportions"].copy()
        if alpha:
            noisy = np.stack([rng.dirichlet(alpha * np.clip(row, 1e-3, None)) for row in p.to_numpy()])
            p = pd.DataFrame(noisy, index=p.index, columns=p.columns)
        if drop:
            p = p.drop(columns=drop)
            p = p.div(p.sum(1).replace(0, np.nan), axis=0).fillna(1.0 / p.shape[1])
        table.obsm["proportions"] = p


# ------------------------------------------------------------------------------------------ models
def fit_kwargs(args) -> dict:
    return {"epochs": 3, "self_training_epochs": 1, "state_epochs": 0} if args.quick else {}


def predict_all(samples: list, model) -> tuple[np.ndarray, float]:
    started, pred = time.perf_counter(), []
    for s in samples:
        tl.predict(s, model, progress=False)
        pred.append(s.tables["histocell"].obs["cell_type"].astype(str).to_numpy())
    return np.concatenate(pred), time.perf_counter() - started


def weak_comparison(args, train: list, test: list, types: list[str], encoder: Path) -> dict:
    """Every model of the weak-supervision comparison on the same nuclei; scores on matched test nuclei."""
    truth = matched_truth(test)
    known = pd.notna(truth)
    y = truth[known]
    scores, training, preds = {}, {}, {}
    n_spots = sum(s.tables["table"].n_obs for s in train)
    result = {"train_patches": len(train), "test_patches": len(test), "train_spots": int(n_spots),
              "train_nuclei_in_spots": int(sum(s.tables["histocell"].obs["spot_id"].notna().sum() for s in train)),
              "mean_cells_per_spot": round(float(np.mean(np.concatenate([s.tables["table"].obs["n_cells"] for s in train]))), 2),
              "test_nuclei_matched": int(known.sum()),
              # the patients of the splits differ in composition (label shift): what the matched nuclei truly are
              "matched_truth_shares": {"train": _shares(matched_truth(train), types), "test": _shares(y, types)}}

    def run(name, model, **kwargs):
        start = time.perf_counter()
        model.fit(train, progress=False, **{**fit_kwargs(args), **kwargs})
        fit_s = time.perf_counter() - start
        pred, predict_s = predict_all(test, model)
        preds[name] = pred
        scores[name] = classification(y, pred[known], types)
        training[name] = {"fit_s": round(fit_s, 1), "predict_s": round(predict_s, 2), "summary": model.training_summary_}
        print(f"  {name}: weighted F1 {scores[name]['weighted_f1']}, macro {scores[name]['macro_f1']} ({fit_s:.0f} s)", file=sys.stderr, flush=True)
        return model

    models = args.models
    if "weak" in models:
        result["_weak_model"] = run("weak", hc.HistoCell(types, encoder=encoder))
    if "weak_scratch_encoder" in models:
        run("weak_scratch_encoder", hc.HistoCell(types, encoder="scratch"))
    if "supervised_twin" in models:
        run("supervised_twin", hc.HistoCell(types, encoder=encoder), nucleus_labels_key="true_cell_type", self_training_epochs=0)

    if "upstream_design" in models:
        start = time.perf_counter()
        up, up_info = fit_upstream([training_sample(s) for s in train], types, epochs=3 if args.quick else 40)
        proba = [predict_upstream(up, s, types)[0] for s in test]
        pred = np.asarray(types, dtype=object)[np.concatenate(proba).argmax(1)]
        scores["upstream_design"] = classification(y, pred[known], types)
        training["upstream_design"] = up_info | {"total_s": round(time.perf_counter() - start, 1)}
        result["_upstream"] = up
        print(f"  upstream: weighted F1 {scores['upstream_design']['weighted_f1']}, macro {scores['upstream_design']['macro_f1']}", file=sys.stderr, flush=True)

    if "baselines" in models:
        baselines, result["training_mean_proportions"] = baseline_scores(train, test, y, known, types)
        scores |= baselines
    result["scores"] = scores
    result["training"] = training
    return result


def baseline_scores(train: list, test: list, y: np.ndarray, known: np.ndarray, types: list[str]) -> tuple[dict, dict]:
    """Prior-only and morphology-only scores on the matched test nuclei (``known``, truth ``y``), and the training mean proportions."""
    priors = prior_baselines([s.tables["table"].obsm["proportions"][types] for s in train], int(known.sum()), types)
    mean_proportions = priors.pop("_mean_training_proportions")
    scores = {f"prior_{name}": classification(y, p, types) for name, p in priors.items()}
    morph = morphology_baselines([(s.tables["histocell"], s.tables["table"].obsm["proportions"][types]) for s in train],
                                 ad.concat([s.tables["histocell"] for s in test]), types)
    scores |= {f"morphology_{name}": classification(y, np.asarray(p)[known], types) for name, p in morph.items()}
    return scores, mean_proportions


def _shares(labels: np.ndarray, types: list[str]) -> dict:
    """Share of each type among the known ``labels``."""
    labels = pd.Series(labels).dropna().astype(str)
    return {t: round(float((labels == t).mean()), 4) for t in types}


def weak_summary(scores: dict) -> dict:
    """The headline figures of a weak-supervision comparison (those of the models that were run)."""
    def f1(name, kind="weighted_f1"):
        return scores[name][kind] if name in scores else None

    morph = [v["weighted_f1"] for k, v in scores.items() if k.startswith("morphology_")]
    weak, twin = f1("weak"), f1("supervised_twin")
    return {"weak_weighted_f1": weak, "weak_macro_f1": f1("weak", "macro_f1"), "supervised_twin_weighted_f1": twin,
            "weak_over_supervised_weighted_f1": round(weak / max(twin, 1e-9), 4) if weak is not None and twin is not None else None,
            "upstream_weighted_f1": f1("upstream_design"), "scratch_weighted_f1": f1("weak_scratch_encoder"),
            "best_morphology_weighted_f1": max(morph) if morph else None}


def merge(old: dict, new: dict) -> dict:
    """``old`` updated by ``new``, recursively for dictionaries (what was not re-run is kept); a result (a dict
    with ``f1`` or ``not_run``) replaces the old one whole, so a re-run never mixes with what it replaced."""
    out = dict(old)
    for key, value in new.items():
        nested = isinstance(value, dict) and isinstance(out.get(key), dict)
        result = nested and any(k in d for d in (value, out[key]) for k in ("f1", "not_run"))
        out[key] = merge(out[key], value) if nested and not result else value
    return out


# ------------------------------------------------------------------------------------------ sections
def section_detection(args) -> dict:
    out = {"match_distance_um": MATCH_UM}
    sets = {"brca_m2c_test": "brca_m2c", "nucls_test": "nucls", "synthetic_unseen": None}
    sets = {k: v for k, v in sets.items() if k in args.detection_sets}
    lodo = {own: lodo_weights("segmenter", own, args) for own in sets.values() if own}
    out["lodo_segmenters"] = {k: card_summary(v) for k, v in lodo.items() if v}  # merged by --update: a missing twin keeps the old entry
    shipped = None  # segment_learnt(network=None): the shipped segmenter

    def score(images, network=None, method="default"):
        total = np.zeros(3)
        for rgb, mpp, points in images:
            if method == "naive":
                labels = naive_segment(rgb, mpp)
            elif method == "classical":
                labels = pp.segment_array(rgb, mpp)
            else:
                labels = pp.segment_learnt(rgb, mpp, network=network)
            ids = np.unique(labels)
            ids = ids[ids > 0]
            xy = np.asarray(ndi.center_of_mass(np.ones_like(labels), labels, ids))[:, ::-1] + 0.5 if len(ids) else np.zeros((0, 2))
            d = pp.detection_scores(xy, points, max_dist=MATCH_UM / mpp)
            total += [d["n_matched"], d["n_pred"], d["n_true"]]
        m, p, t = total
        return {"precision": round(m / max(p, 1), 4), "recall": round(m / max(t, 1), 4), "f1": round(2 * m / max(p + t, 1), 4),
                "n_pred": int(p), "n_true": int(t), "n_matched": int(m)}

    def images_of(key):
        if key == "brca_m2c_test":
            names = hc.datasets.brca_m2c_names("test", path=args.brca_m2c)[: 4 if args.quick else None]
            patches = (hc.datasets.read_brca_m2c_patch(n, path=args.brca_m2c) for n in names)
            return [(rgb, mpp, pts[["x", "y"]].to_numpy()) for rgb, mpp, pts in patches]
        if key == "nucls_test":
            tiles = (hc.datasets.read_nucls_tile(n) for n in hc.datasets.nucls_tile_names("test"))
            return [(rgb, hc.datasets.NUCLS_MPP, pts[["x", "y"]].to_numpy()) for rgb, _, pts in tiles]
        synthetic = []
        for seed in args.synthetic_seeds:
            sdata, _ = hc.datasets.synthetic_visium(seed=seed, preset="tiny", weak_labels=False, progress=False)
            synthetic.append((np.asarray(hc.io.get_image(sdata).data).transpose(1, 2, 0), sdata.attrs["mpp"], np.asarray(sdata.tables["truth_nuclei"].obsm["spatial"])))
        return synthetic

    for key, own in sets.items():
        images = images_of(key)
        res = {"images": len(images)}
        if own and lodo[own] is None:
            res["default"] = {"not_run": f"no leave-one-dataset-out twin segmenter_no_{own} in --lodo-dir (--no-lodo-training)"}
        else:
            res["default"] = score(images, lodo[own] if own else shipped)
            res["default"]["weights"] = f"leave-one-dataset-out twin (no {own} labels)" if own else "shipped"
        res["classical"] = score(images, method="classical")
        res["naive_baseline"] = score(images, method="naive")
        if own:
            res["default_shipped_weights_saw_this_dataset"] = score(images, shipped)
        out[key] = res
        print(f"[detection {key}: default F1 {res['default'].get('f1')}, classical {res['classical']['f1']}]", file=sys.stderr, flush=True)
    out["synthetic_seeds"] = list(args.synthetic_seeds)
    return out


def section_weak(args, factor: float = 1.0) -> dict:
    network = lodo_weights("segmenter", "brca_m2c", args)
    uses_encoder = bool({"weak", "supervised_twin"} & set(args.models))  # the others start from scratch
    encoder = lodo_weights("encoder", "brca_m2c", args) if uses_encoder else None
    spots = {"spot_diameter_um": 55.0, "pitch_um": 100.0}
    train = training_set(args, spots, network, factor)
    _, test_split = splits(args)
    test = brca_samples(args, test_split, spots=None, network=network, factor=factor)
    result = weak_comparison(args, train, test, TYPES, encoder)
    result["mpp"] = round(float(train[0].attrs["mpp"]), 4)
    result["pseudo_spots"] = spots
    result["weights"] = {"segmenter": card_summary(network)} | ({"encoder": card_summary(encoder)} if uses_encoder else {})
    return result


def section_weak_seeds(args) -> dict:
    """``weak`` and ``supervised_twin`` at 20x over ``--fit-seeds``, with the baselines, on one data preparation."""
    network, encoder = lodo_weights("segmenter", "brca_m2c", args), lodo_weights("encoder", "brca_m2c", args)
    spots = {"spot_diameter_um": 55.0, "pitch_um": 100.0}
    train = training_set(args, spots, network)
    test = brca_samples(args, splits(args)[1], spots=None, network=network)
    truth = matched_truth(test)
    known = pd.notna(truth)
    y = truth[known]
    result = {"fit_seeds": list(args.fit_seeds), "test_nuclei_matched": int(known.sum()), "pseudo_spots": spots,
              "weights": {"segmenter": card_summary(network), "encoder": card_summary(encoder)}, "per_seed": {}}
    variants = {"weak": {}, "supervised_twin": {"nucleus_labels_key": "true_cell_type", "self_training_epochs": 0}}
    fitted = {name: [] for name in variants if name in args.models}
    for seed in args.fit_seeds:
        row = {}
        for name in fitted:
            extra = variants[name]
            start = time.perf_counter()
            model = hc.HistoCell(TYPES, encoder=encoder).fit(train, progress=False, seed=seed, **{**fit_kwargs(args), **extra})
            pred, _ = predict_all(test, model)
            row[name] = classification(y, pred[known], TYPES) | {"fit_s": round(time.perf_counter() - start, 1)}
            fitted[name].append(model)
            print(f"  seed {seed} {name}: weighted F1 {row[name]['weighted_f1']}, macro {row[name]['macro_f1']}", file=sys.stderr, flush=True)
        result["per_seed"][str(seed)] = row
    if len(args.fit_seeds) > 1:  # the fits of all seeds as one ensemble (tl.predict with a list of models)
        result["ensemble"] = {}
        for name, models in fitted.items():
            pred, predict_s = predict_all(test, models)
            result["ensemble"][name] = classification(y, pred[known], TYPES) | {"members": len(models), "predict_s": round(predict_s, 2)}
            print(f"  ensemble {name}: weighted F1 {result['ensemble'][name]['weighted_f1']}, macro {result['ensemble'][name]['macro_f1']}",
                  file=sys.stderr, flush=True)
    if "baselines" in args.models:
        result["baselines"], _ = baseline_scores(train, test, y, known, TYPES)

    def spread(values):
        return {"mean": round(float(np.mean(values)), 4), "sd": round(float(np.std(values, ddof=1)), 4) if len(values) > 1 else None,
                "min": round(float(np.min(values)), 4), "max": round(float(np.max(values)), 4)}

    rows = result["per_seed"].values()
    result["summary"] = {f"{name}_{kind}": spread([r[name][kind] for r in rows]) for name in fitted for kind in ("weighted_f1", "macro_f1")}
    for kind in ("weighted_f1", "macro_f1"):
        if len(fitted) == 2:
            result["summary"][f"weak_over_supervised_{kind}"] = spread([r["weak"][kind] / r["supervised_twin"][kind] for r in rows])
    return result


def section_holdout(args) -> dict:
    """The weak model fitted with each ``holdout`` of ``fit`` over ``--fit-seeds``: nucleus F1 and spot r on the scored split."""
    network, encoder = lodo_weights("segmenter", "brca_m2c", args), lodo_weights("encoder", "brca_m2c", args)
    spots = {"spot_diameter_um": 55.0, "pitch_um": 100.0}
    train = training_set(args, spots, network)
    test = brca_samples(args, splits(args)[1], spots=spots, network=network)
    for s in test:
        s.tables["table"].obsm["true_proportions"] = s.tables["table"].obsm["proportions"].copy()
    truth = matched_truth(test)
    known = pd.notna(truth)
    y = truth[known]
    encoders = {"pretrained": encoder} | ({"scratch": "scratch"} if "weak_scratch_encoder" in args.models else {})
    result = {"fit_seeds": list(args.fit_seeds), "test_nuclei_matched": int(known.sum()), "pseudo_spots": spots,
              "weights": {"segmenter": card_summary(network), "encoder": card_summary(encoder)}, "per_seed": {}}
    for seed in args.fit_seeds:
        row = {}
        for (name, enc), holdout in itertools.product(encoders.items(), ("spots", "tiles")):
            start = time.perf_counter()
            model = hc.HistoCell(TYPES, encoder=enc).fit(train, progress=False, seed=seed, holdout=holdout, **fit_kwargs(args))
            pred, _ = predict_all(test, model)
            fit = model.training_summary_
            row[f"{name}_{holdout}"] = classification(y, pred[known], TYPES) | {
                "spot_r": spot_agreement(test, "histocell_proportions", TYPES)["mean_per_type_r"], "fit_val_spot_r": round(fit["val_spot_pearson"], 4),
                "spots_val": fit["spots_val"], "holdout_used": fit["holdout"], "epochs_run": fit["epochs_run"], "fit_s": round(time.perf_counter() - start, 1)}
            print(f"  seed {seed} {name} holdout={holdout}: weighted F1 {row[f'{name}_{holdout}']['weighted_f1']}, "
                  f"spot r {row[f'{name}_{holdout}']['spot_r']}", file=sys.stderr, flush=True)
        result["per_seed"][str(seed)] = row
    rows = list(result["per_seed"].values())
    result["summary"] = {key: {kind: {"mean": round(float(np.mean([r[key][kind] for r in rows])), 4), "min": round(float(np.min([r[key][kind] for r in rows])), 4)}
                               for kind in ("weighted_f1", "macro_f1", "spot_r", "fit_val_spot_r", "epochs_run")} for key in rows[0]}
    return result


def _spot_frames(samples: list, predicted_key: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Predicted and true proportions of the spots that have a prediction (rows aligned)."""
    pred = pd.concat([s.tables["table"].obsm[predicted_key] for s in samples])
    true = pd.concat([s.tables["table"].obsm["true_proportions"] for s in samples]).loc[pred.index]
    keep = pred.notna().all(axis=1).to_numpy()
    return pred[keep], true[keep]


def spot_agreement(samples: list, predicted_key: str, types: list[str]) -> dict:
    """Mean over types of the Pearson r across spots (and per type) between predicted and true proportions."""
    pred, true = _spot_frames(samples, predicted_key)
    per_type = {}
    for t in types:
        a, b = pred[t].to_numpy(float), true[t].to_numpy(float)
        per_type[t] = round(float(np.corrcoef(a, b)[0, 1]), 4) if a.std() > 0 and b.std() > 0 else None
    valid = [v for v in per_type.values() if v is not None]
    return {"mean_per_type_r": round(float(np.mean(valid)), 4) if valid else None, "per_type_r": per_type, "spots": len(pred)}


def _mean_r(pred: np.ndarray, true: np.ndarray) -> float:
    """Mean over columns (types) of the Pearson r across rows (spots); constant columns are skipped."""
    rs = [np.corrcoef(p, t)[0, 1] for p, t in zip(pred.T, true.T) if p.std() > 0 and t.std() > 0]
    return float(np.mean(rs)) if rs else np.nan


def section_st_like(args) -> dict:
    """Legacy-ST-like spots, two label regimes; the weak model over ``--fit-seeds`` against the spot-level ridge."""
    network = lodo_weights("segmenter", "brca_m2c", args)
    encoder = lodo_weights("encoder", "brca_m2c", args)
    spots = {"spot_diameter_um": ST_DIAMETER_UM, "pitch_um": ST_PITCH_UM}
    _, test_split = splits(args)
    out = {"spots": spots, "dirichlet_concentration": args.dirichlet, "fit_seeds": list(args.fit_seeds),
           "weights": {"segmenter": card_summary(network), "encoder": card_summary(encoder)}}
    base_train = training_set(args, spots, network)
    test = brca_samples(args, test_split, spots=spots, network=network)
    for s in test:
        s.tables["table"].obsm["true_proportions"] = s.tables["table"].obsm["proportions"].copy()
    truth = matched_truth(test)
    for regime, drop in (("dirichlet_noise", None), ("dirichlet_noise_and_missing_type", "stromal")):
        train = [_copy_sample(s) for s in base_train]
        perturb(train, args.dirichlet, drop, seed=0)  # one noise draw: the seeds vary the fit only
        types = [t for t in TYPES if t != drop]
        known = pd.notna(truth) & np.isin(truth.astype(str), types)
        res = {"label_types": types, "ridge_spot_agreement": _ridge(train, test, types), "per_seed": {}}
        ridge_pred, true = _spot_frames(test, "ridge_proportions")
        weak_preds = []
        for seed in args.fit_seeds:
            model = hc.HistoCell(types, encoder=encoder)
            start = time.perf_counter()
            model.fit(train, progress=False, seed=seed, **fit_kwargs(args))
            fit_s = round(time.perf_counter() - start, 1)
            pred, _ = predict_all(test, model)
            weak_preds.append(_spot_frames(test, "histocell_proportions")[0].reindex(ridge_pred.index)[types].to_numpy(float))
            res["per_seed"][str(seed)] = {"fit_s": fit_s, "nucleus_scores_known_types": classification(truth[known], pred[known], types),
                                          "weak_spot_agreement": spot_agreement(test, "histocell_proportions", types),
                                          "fit_validation": model.training_summary_}
            print(f"[st_like {regime} seed {seed}: weak spot r {res['per_seed'][str(seed)]['weak_spot_agreement']['mean_per_type_r']}, "
                  f"ridge {res['ridge_spot_agreement']['mean_per_type_r']}]", file=sys.stderr, flush=True)
        # the weak - ridge difference of mean per-type r (weak averaged over seeds) over resampled test spots
        ridge_np, true_np = ridge_pred[types].to_numpy(float), true[types].to_numpy(float)
        rng = np.random.default_rng(0)
        diffs = []
        for _ in range(2000):
            idx = rng.integers(0, len(true_np), len(true_np))
            diffs.append(np.mean([_mean_r(w[idx], true_np[idx]) for w in weak_preds]) - _mean_r(ridge_np[idx], true_np[idx]))
        weak_r = [r["weak_spot_agreement"]["mean_per_type_r"] for r in res["per_seed"].values()]
        macro = [r["nucleus_scores_known_types"]["macro_f1"] for r in res["per_seed"].values()]
        res["summary"] = {
            "weak_mean_per_type_r": {"mean": round(float(np.mean(weak_r)), 4), "sd": round(float(np.std(weak_r, ddof=1)), 4) if len(weak_r) > 1 else None},
            "ridge_mean_per_type_r": res["ridge_spot_agreement"]["mean_per_type_r"],
            "weak_minus_ridge_r_bootstrap_95": [round(float(np.nanpercentile(diffs, 2.5)), 4), round(float(np.nanpercentile(diffs, 97.5)), 4)],
            "weak_nucleus_macro_f1_mean": round(float(np.mean(macro)), 4),
            "spots": len(true_np),
        }
        out[regime] = res
    return out


def _copy_sample(sdata):
    from spatialdata import SpatialData

    return SpatialData(images=dict(sdata.images), shapes={k: v.copy() for k, v in sdata.shapes.items()},
                       tables={k: v.copy() for k, v in sdata.tables.items()}, attrs=dict(sdata.attrs))


def _spot_means(sdata) -> pd.DataFrame:
    nuclei = sdata.tables["histocell"]
    x = pd.DataFrame(np.asarray(nuclei.X, dtype=np.float64), index=nuclei.obs_names, columns=nuclei.var_names)
    spot = nuclei.obs["spot_id"]
    return x[spot.notna().to_numpy()].groupby(spot[spot.notna()].astype(str).to_numpy()).mean()


def _ridge(train: list, test: list, types: list[str]) -> dict:
    """Ridge regression from each spot's mean nucleus morphology to its (noisy) proportions."""
    xs, ys = [], []
    for s in train:
        means = _spot_means(s)
        props = s.tables["table"].obsm["proportions"][types]
        common = means.index.intersection(props.index)
        xs.append(means.loc[common]), ys.append(props.loc[common])
    x, y = pd.concat(xs), pd.concat(ys)
    mu, sd = x.mean(), x.std().replace(0, 1)
    model = RidgeCV(alphas=np.logspace(-2, 3, 12)).fit(((x - mu) / sd).to_numpy(), y.to_numpy())
    for s in test:
        means = _spot_means(s)
        table = s.tables["table"]
        pred = pd.DataFrame(np.clip(model.predict(((means - mu) / sd).to_numpy()), 0, None), index=means.index, columns=types)
        table.obsm["ridge_proportions"] = pred.reindex(table.obs_names)
    return spot_agreement(test, "ridge_proportions", types)


def section_nucls(args) -> dict:
    network = lodo_weights("segmenter", "nucls", args)
    encoder = lodo_weights("encoder", "nucls", args)
    classes = list(hc.datasets.NUCLS_CLASSES)

    def samples(split, with_spots):
        out = []
        for sdata in hc.datasets.nucls(split).values():
            if with_spots:
                try:
                    hc.datasets.pseudo_spots(sdata, spot_diameter_um=NUCLS_SPOT_UM, pitch_um=NUCLS_SPOT_UM, cell_types=classes)
                except hc.InvalidInputError:
                    continue
            pp.segment_nuclei(sdata, network=network, progress=False)
            tl.transfer_truth(sdata, columns=["cell_type"])
            out.append(sdata)
        return out

    train, test = samples("train", True), samples("test", False)
    present = [t for t in classes if pd.concat([s.tables["table"].obsm["proportions"] for s in train])[t].sum() > 0]
    for s in train:
        s.tables["table"].obsm["proportions"] = s.tables["table"].obsm["proportions"][present]
    truth = matched_truth(test)
    known = pd.notna(truth)
    model = hc.HistoCell(present, encoder=encoder).fit(train, progress=False, **fit_kwargs(args))
    pred, _ = predict_all(test, model)
    scores = {"weak": classification(truth[known], pred[known], classes)}
    priors = prior_baselines([s.tables["table"].obsm["proportions"] for s in train], int(known.sum()), present)
    priors.pop("_mean_training_proportions")
    for name, p in priors.items():
        scores[f"prior_{name}"] = classification(truth[known], p, classes)
    morph = morphology_baselines([(s.tables["histocell"], s.tables["table"].obsm["proportions"]) for s in train],
                                 ad.concat([s.tables["histocell"] for s in test]), present)
    for name, p in morph.items():
        scores[f"morphology_{name}"] = classification(truth[known], np.asarray(p)[known], classes)
    return {"pseudo_spot_um": NUCLS_SPOT_UM, "cell_types": present, "train_spots": int(sum(s.tables["table"].n_obs for s in train)),
            "test_nuclei_matched": int(known.sum()), "scores": scores,
            "weights": {"segmenter": card_summary(network), "encoder": card_summary(encoder)},
            "note": "smoke test: ~400 annotated training nuclei in 10 tiles of 64 µm; numbers are noisy"}


def section_speed(args, weak) -> dict:
    """Nuclei/s of HistoCell (tl.predict end to end) and the upstream design on the same BRCA-M2C test nuclei."""
    network = lodo_weights("segmenter", "brca_m2c", args)
    _, test_split = splits(args)
    test = brca_samples(args, test_split, spots=None, network=network)
    n = sum(s.tables["histocell"].n_obs for s in test)
    model, upstream = weak["_weak_model"], weak["_upstream"]
    _, ours_s = predict_all(test, model)
    _, ours_s2 = predict_all(test, model)
    up_s = sum(predict_upstream(upstream, s, TYPES)[1] for s in test)
    best = min(ours_s, ours_s2)
    return {"nuclei": int(n), "histocell_nuclei_per_s": round(n / best, 0), "upstream_nuclei_per_s": round(n / up_s, 0),
            "ratio": round(up_s / best, 2), "torch_threads": torch.get_num_threads(),
            "note": "both end to end from the SpatialData (crops, context, forward); HistoCell best of two runs"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--brca-m2c", type=Path, default=ROOT.parent / "shared" / "data" / "brca_m2c")
    parser.add_argument("--sections", default="detection,weak20x,weak40x,st_like,nucls,speed")
    parser.add_argument("--lodo-dir", type=Path, default=ROOT / "benchmarks" / "results" / "lodo")
    parser.add_argument("--synthetic-seeds", type=int, nargs="+", default=[7, 11])
    parser.add_argument("--fit-seeds", type=int, nargs="+", default=[0, 1, 2], help="fit seeds of the weak20x_seeds, holdout and st_like sections")
    parser.add_argument("--dirichlet", type=float, default=10.0, help="concentration of the Dirichlet noise (st_like)")
    parser.add_argument("--dev", action="store_true", help="train on train, score val (development only)")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--no-lodo-training", action="store_true",
                        help="do not train missing leave-one-dataset-out twins: report what needs them as not run")
    parser.add_argument("--models", default=",".join(MODELS),
                        help="models of the weak sections (default: all): " + ", ".join(MODELS))
    parser.add_argument("--detection-sets", default="brca_m2c_test,nucls_test,synthetic_unseen",
                        help="image sets of the detection section (with --update the others keep their earlier results)")
    parser.add_argument("--update", action="store_true",
                        help="merge into an existing --out: the sections and models run now replace theirs, the rest is kept")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "real.json")
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    logging.getLogger("histocell_sd").setLevel(logging.ERROR)
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = set(sections) - {"detection", "weak20x", "weak40x", "weak20x_seeds", "holdout", "st_like", "nucls", "speed"}
    if unknown:
        parser.error(f"unknown sections {sorted(unknown)}")
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    args.detection_sets = [d.strip() for d in args.detection_sets.split(",") if d.strip()]
    if set(args.detection_sets) - {"brca_m2c_test", "nucls_test", "synthetic_unseen"}:
        parser.error(f"unknown detection sets {sorted(set(args.detection_sets) - {'brca_m2c_test', 'nucls_test', 'synthetic_unseen'})}")
    if set(args.models) - set(MODELS):
        parser.error(f"unknown models {sorted(set(args.models) - set(MODELS))}")
    if "speed" in sections and not {"weak", "upstream_design"} <= set(args.models):
        parser.error("the speed section needs the models weak and upstream_design")
    torch.manual_seed(0)
    run = {"argv": sys.argv[1:], "dev_split": args.dev, "quick": args.quick, "cpu_count": os.cpu_count(),
           "torch_threads": torch.get_num_threads(), "loadavg_start": [round(x, 2) for x in os.getloadavg()],
           "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout.strip()}
    previous = json.loads(args.out.read_text()) if args.update and args.out.exists() else {}
    runs = previous.get("runs", [])
    out = {}
    started = time.perf_counter()
    weak = None
    for name in sections:
        t0 = time.perf_counter()
        print(f"[{name}]", file=sys.stderr, flush=True)
        if name == "detection":
            out[name] = section_detection(args)
        elif name == "weak20x":
            weak = section_weak(args)
            out[name] = {k: v for k, v in weak.items() if not k.startswith("_")}
        elif name == "weak40x":
            out[name] = {k: v for k, v in section_weak(args, factor=2.0).items() if not k.startswith("_")}
        elif name == "weak20x_seeds":
            out[name] = section_weak_seeds(args)
        elif name == "holdout":
            out[name] = section_holdout(args)
        elif name == "st_like":
            out[name] = section_st_like(args)
        elif name == "nucls":
            out[name] = section_nucls(args)
        elif name == "speed":
            if weak is None:
                parser.error("the speed section needs weak20x in the same run")
            out[name] = section_speed(args, weak)
        out[name]["section_s"] = round(time.perf_counter() - t0, 1)
        out[name]["run"] = len(runs)  # index into "runs": which invocation measured this
        if name == "detection":
            earlier = previous.get(name, {})
            for key in ("brca_m2c_test", "nucls_test", "synthetic_unseen"):  # with --detection-sets, the others keep an earlier run's figures
                measured_before = "f1" in earlier.get(key, {}).get("default", {})
                if key in args.detection_sets and not ("not_run" in out[name][key]["default"] and measured_before):
                    out[name][key]["run"] = len(runs)
                elif key in earlier:  # not asked for, or its twin missing now (--no-lodo-training): keep the earlier, whole
                    out[name][key] = {**earlier[key], "run": earlier[key].get("run", earlier.get("run"))}
        if name in WEAK_SECTIONS:
            out[name]["models_run"] = {m: len(runs) for m in args.models}
    run["total_s"] = round(time.perf_counter() - started, 1)
    run["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    out = merge(previous, out)
    for name in WEAK_SECTIONS:
        if name in out:
            out[name]["summary"] = weak_summary(out[name]["scores"])
    out["runs"] = [*runs, run]
    write_json(out, args.out)


if __name__ == "__main__":
    main()
