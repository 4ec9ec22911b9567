"""Train the ready-to-use checkpoint ``hc.models.pretrained("tumor_stromal_lymphocyte")`` with the method itself.

Weak supervision only: Visium-like pseudo-spots (55 µm, 100 µm hex pitch) over the BRCA-M2C train+val
patches give spot proportions of tumour/epithelial, stromal and lymphocyte cells; nuclei come from the
shipped segmenter and HistoCell starts from the shipped encoder. The card records the metrics on the
BRCA-M2C test split (patients never seen; the dataset's train labels were seen as proportions), on the
four test patches embedded in the package (what the tests reproduce) and on the NuCLS test tiles (a dataset
whose labels this classifier never saw; its train tiles did shape the segmenter and encoder), with NuCLS
classes mapped tumor_any → tumor, nonTIL_stromal → stromal, sTIL → lymphocyte (other_nucleus not scored).

Usage::

    python scripts/train_pretrained.py --brca-m2c PATH --out histocell_sd/weights/tumor_stromal_lymphocyte
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
import warnings
from pathlib import Path

import numpy as np
from _provenance import provenance

import histocell_sd as hc

TYPES = list(hc.datasets.BRCA_M2C_CLASSES)
COMPARTMENTS = {"tumor": ["tumor"], "stroma": ["stromal"], "immune": ["lymphocyte"]}
NUCLS_TO_TYPES = {"tumor_any": "tumor", "nonTIL_stromal": "stromal", "sTIL": "lymphocyte"}


def prepared(samples, spots: bool) -> list:
    out = []
    for sdata in samples:
        if spots:
            hc.datasets.pseudo_spots(sdata, cell_types=TYPES)
        hc.pp.segment_nuclei(sdata, progress=False)
        hc.tl.transfer_truth(sdata, columns=["cell_type"])
        out.append(sdata)
    return out


def score(model, samples, mapping: dict | None = None) -> dict:
    """Weighted and macro F1 over the segmented nuclei matched to an annotated cell."""
    true, pred = [], []
    for sdata in samples:
        hc.tl.predict(sdata, model, progress=False)
        obs = sdata.tables["histocell"].obs
        t = obs["true_cell_type"].astype(object)
        if mapping is not None:
            t = t.map(mapping)
        keep = t.notna().to_numpy()
        true.append(t.to_numpy()[keep])
        pred.append(obs["cell_type"].astype(str).to_numpy()[keep])
    scores = hc.tl.classification_scores(np.concatenate(true), np.concatenate(pred), labels=TYPES)
    return {k: round(v, 4) if isinstance(v, float) else v for k, v in scores.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--brca-m2c", required=True, type=Path)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", required=True, type=Path)
    args = parser.parse_args()
    origin = provenance(__file__, args.brca_m2c)  # the commit training starts from
    warnings.simplefilter("ignore")
    logging.getLogger("histocell_sd").setLevel(logging.ERROR)
    started = time.perf_counter()
    train = prepared([*hc.datasets.brca_m2c("train", path=args.brca_m2c).values(), *hc.datasets.brca_m2c("val", path=args.brca_m2c).values()], spots=True)
    model = hc.HistoCell(TYPES, compartments=COMPARTMENTS)
    model.fit(train, seed=args.seed, progress=False)
    fit_s = time.perf_counter() - started
    metrics = {
        "brca_m2c_test_split": score(model, prepared(hc.datasets.brca_m2c("test", path=args.brca_m2c).values(), spots=False)),
        "brca_m2c_embedded_test_patches": score(model, prepared(hc.datasets.brca_m2c("test").values(), spots=False)),
        "nucls_test_tiles": score(model, prepared(hc.datasets.nucls("test").values(), spots=False), NUCLS_TO_TYPES),
        "protocol": "segmented nuclei (shipped segmenter) matched one-to-one within 3 µm to annotated cells; weighted/macro F1",
    }
    metadata = {
        "name": args.out.name,
        "intended_use": (
            "Typing nuclei of H&E slides into tumour/epithelial, stromal and lymphocyte, e.g. for workshops, "
            "spatial statistics (squidpy) and as a starting point; breast cancer at 20x-40x is what it was "
            "measured on. Not a diagnostic device. Other cell types (macrophages, plasma cells, endothelium, "
            "normal epithelium) are forced into the three classes."
        ),
        "training": {
            **origin,
            "method": "HistoCell weak supervision (spot proportions only), library defaults, pretrained encoder",
            "data": "BRCA-M2C train + val splits (90 patches, 0.5 µm/px): 55 µm pseudo-spots on a 100 µm hex grid, proportions of the annotated cells",
            "spots": int(sum(s.tables["table"].n_obs for s in train)),
            "nuclei": int(sum(s.tables["histocell"].n_obs for s in train)),
            "fit_s": round(fit_s, 1),
            "seed": args.seed,
            "segmenter_sha256": hc.pp.load_segmenter()[1]["weights_sha256"],
        },
        "licences": {
            "weights": "MIT (histocell-sd)",
            "data": "BRCA-M2C: BSD 3-Clause (Abousamra et al., ICCV 2021); NuCLS (segmenter/encoder training, scoring): CC0 1.0 (Amgad et al., GigaScience 2022)",
        },
        "metrics": metrics,
    }
    if args.out.exists():
        sys.exit(f"{args.out} exists; remove it first")
    model.save(args.out, metadata=metadata)
    print(json.dumps(metadata, indent=1))


if __name__ == "__main__":
    main()
