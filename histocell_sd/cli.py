"""Command line: ``histocell-sd demo | segment | train | predict``."""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

SYNTHETIC_COMPARTMENTS = {"tumor": ["tumor"], "stroma": ["fibroblast", "endothelial"], "immune": ["lymphocyte", "macrophage"]}


def demo(out: Path, seed: int, preset: str, epochs: int, deconvolution: str, progress: bool) -> None:
    """Synthetic slides → segment → deconvolve → train on one → predict and refine an unseen one → scores, zarr, PNGs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from . import datasets, io, pl, pp, tl
    from .models import HistoCell

    def rmse(spots, key):
        """Against the true proportions, over the spots that hold nuclei (HistoCell's view is undefined elsewhere)."""
        truth = spots.obsm["true_proportions"]
        error = (spots.obsm[key][truth.columns] - truth).to_numpy()
        keep = truth.sum(axis=1).to_numpy() > 0
        if "histocell_proportions" in spots.obsm:
            keep &= np.isfinite(spots.obsm["histocell_proportions"].to_numpy()).all(axis=1)
        return float(np.sqrt((error[keep] ** 2).mean()))

    start = time.perf_counter()
    train, reference = datasets.synthetic_visium(seed=seed, preset=preset, proportions=None, progress=progress)
    test, test_reference = datasets.synthetic_visium(seed=seed + 1000, preset=preset, proportions=None, progress=progress)
    print(
        f"synthetic slides ({preset}; seeds {seed} for training, {seed + 1000} held out): "
        f"{train.tables['table'].n_obs} + {test.tables['table'].n_obs} spots, mpp {train.attrs['mpp']} µm/px "
        f"({time.perf_counter() - start:.0f} s)"
    )
    for name, sdata in (("training", train), ("held-out", test)):
        t = time.perf_counter()
        pp.segment_nuclei(sdata, n_jobs=2, progress=progress)
        detection = tl.transfer_truth(sdata)
        print(f"segmented {name} slide: {sdata.tables['histocell'].n_obs} nuclei, detection F1 {detection['f1']:.3f} ({time.perf_counter() - t:.0f} s)")
    t = time.perf_counter()
    tl.deconvolve(train, reference, state_key="cell_state", method=deconvolution, progress=progress)
    print(f"deconvolved the training spots ({deconvolution}): RMSE {rmse(train.tables['table'], 'proportions'):.3f} vs the true proportions ({time.perf_counter() - t:.0f} s)")
    model = HistoCell(datasets.CELL_TYPES, states=datasets.CELL_STATES, compartments=SYNTHETIC_COMPARTMENTS)
    t = time.perf_counter()
    model.fit(train, epochs=epochs, progress=progress)
    print(f"trained on those spot proportions only in {time.perf_counter() - t:.0f} s ({model.training_summary_['epochs_run']} epochs)")
    t = time.perf_counter()
    tl.predict(test, model, progress=progress)
    seconds = time.perf_counter() - t
    obs = test.tables["histocell"].obs
    types = tl.classification_scores(obs["true_cell_type"], obs["cell_type"], labels=model.cell_types)
    states = tl.classification_scores(obs["true_cell_state"], obs["cell_state"], labels=model.state_names)
    r = tl.spot_pearson(test)
    print(
        f"held-out slide, {len(obs)} nuclei predicted in {seconds:.1f} s ({len(obs) / seconds:.0f} nuclei/s):\n"
        f"  cell type  accuracy {types['accuracy']:.3f}  macro-F1 {types['macro_f1']:.3f} (nuclei matched to truth within 3 µm)\n"
        f"  cell state accuracy {states['accuracy']:.3f}  macro-F1 {states['macro_f1']:.3f}\n"
        f"  spot proportions Pearson r {r:.3f}"
    )
    tl.deconvolve(test, test_reference, method=deconvolution, progress=progress)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # spots without nuclei keep the expression view
        tl.refine_deconvolution(test, test_reference, progress=progress)
    in_spot = obs["spot_id"].notna() & obs["true_cell_type"].notna()
    refined = tl.classification_scores(obs.loc[in_spot, "true_cell_type"], obs.loc[in_spot, "refined_cell_type"], labels=model.cell_types)
    alone = tl.classification_scores(obs.loc[in_spot, "true_cell_type"], obs.loc[in_spot, "cell_type"], labels=model.cell_types)
    spots = test.tables["table"]
    print(
        "held-out slide, histology-refined deconvolution (spot counts × nucleus predictions):\n"
        f"  spot RMSE: {deconvolution} {rmse(spots, 'proportions'):.3f}, HistoCell {rmse(spots, 'histocell_proportions'):.3f}, "
        f"refined {rmse(spots, 'refined_proportions'):.3f}\n"
        f"  nucleus accuracy in spots: HistoCell {alone['accuracy']:.3f}, refined {refined['accuracy']:.3f}"
    )
    out.mkdir(parents=True, exist_ok=True)
    model.save(out / "model", overwrite=True)
    store = io.write_zarr(test, out / "demo.zarr", overwrite=True)
    test_reference.write_h5ad(out / "reference.h5ad")
    fig, axes = plt.subplots(1, 2, figsize=(14, 6), layout="constrained")
    pl.spot_proportions(test, cell_type="tumor", proportions_key="true_proportions", ax=axes[0])
    pl.spot_proportions(test, cell_type="tumor", proportions_key="histocell_proportions", ax=axes[1])
    fig.savefig(out / "overview.png", dpi=100, bbox_inches="tight")
    fig, ax = plt.subplots(figsize=(8, 7), layout="constrained")
    height, width = io.get_image(test).shape[1:]
    pl.cell_types(test, extent=(width * 0.35, width * 0.65, height * 0.35, height * 0.65), ax=ax, title="predicted cell types")
    fig.savefig(out / "predicted_cell_types.png", dpi=110, bbox_inches="tight")
    plt.close("all")
    print(f"wrote {store}\nwrote {out / 'model'}\nwrote {out / 'overview.png'}\nwrote {out / 'predicted_cell_types.png'}")
    print(f"total {time.perf_counter() - start:.0f} s")


def segment(store: Path, n_jobs: int, progress: bool) -> None:
    """Segment the nuclei of a zarr store and write them back in place."""
    from . import io, pp

    sdata = io.read_zarr(store)
    pp.segment_nuclei(sdata, n_jobs=n_jobs, progress=progress)
    io.write_zarr(sdata, store, overwrite=True)
    print(f"{store}: {sdata.tables['histocell'].n_obs} nuclei")


def _json_option(text: str | None, option: str) -> dict | None:
    """The JSON object given to ``option``, refusing malformed JSON with a message naming the option."""
    from ._errors import InvalidInputError

    if not text:
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise InvalidInputError(f"{option} is not valid JSON ({error}); quote names, e.g. {option} '{{\"tumor\": [\"a\", \"b\"]}}'.") from None
    if not isinstance(value, dict):
        raise InvalidInputError(f"{option} must be a JSON object {{\"name\": [\"...\", ...]}}, got {text!r}.")
    return value


def _check_out(out: Path, inputs: list[Path], overwrite: bool, *, in_place: Path | None = None) -> None:
    """Refuse an output that is, contains or lies in an input (``in_place`` excepted), or exists without ``overwrite``."""
    from ._errors import InvalidInputError

    target = out.resolve()
    if in_place is not None and target == in_place.resolve():
        return
    for source in inputs:
        source_r = source.resolve()
        if target == source_r or target in source_r.parents or source_r in target.parents:
            raise InvalidInputError(f"--out {out} is, contains or lies inside the input {source}; writing it would destroy that input. Choose another --out.")
    if (out.exists() or out.is_symlink()) and not overwrite:
        raise InvalidInputError(f"--out {out} already exists; pass --overwrite to replace it.")


def train(stores: list[Path], out: Path, epochs: int | None, states: str | None, compartments: str | None, seed: int,
          progress: bool, overwrite: bool = False) -> None:
    """Train a model on the spot proportions of one or more segmented zarr stores."""
    from . import io
    from ._errors import InvalidInputError
    from .models import HistoCell

    state_map, compartment_map = _json_option(states, "--states"), _json_option(compartments, "--compartments")
    _check_out(out, stores, overwrite)
    samples = [io.read_zarr(s) for s in stores]
    table = samples[0].tables.get("table")
    if table is None or "proportions" not in table.obsm:
        raise InvalidInputError(f"{stores[0]} has no spot proportions (tables['table'].obsm['proportions']).")
    cell_types = list(table.obsm["proportions"].columns)
    state_map = state_map if state_map is not None else samples[0].attrs.get("cell_states")
    model = HistoCell(cell_types, states=state_map, compartments=compartment_map).fit(samples, epochs=epochs, seed=seed, progress=progress)
    model.save(out, overwrite=overwrite)
    print(f"model saved to {out}: {json.dumps(model.training_summary_)}")


def predict(store: Path, model_dir: Path, out: Path | None, progress: bool, overwrite: bool = False) -> None:
    """Predict every nucleus of a segmented zarr store with a saved model (in place unless ``out``)."""
    from . import io, tl
    from .models import HistoCell

    if out is not None:
        _check_out(out, [store, model_dir], overwrite, in_place=store)
    model = HistoCell.load(model_dir)
    sdata = io.read_zarr(store)
    tl.predict(sdata, model, progress=progress)
    target = io.write_zarr(sdata, out or store, overwrite=True)
    counts = sdata.tables["histocell"].obs["cell_type"].value_counts().to_dict()
    print(f"{target}: {counts}")


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``histocell-sd`` console script."""
    parser = argparse.ArgumentParser(prog="histocell-sd", description=__doc__)
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("demo", help="synthetic slides -> segment -> train -> predict -> scores, zarr, PNGs")
    p.add_argument("--out", type=Path, default=Path("histocell_demo"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--preset", default="default", choices=["tiny", "default", "visium"])
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--deconvolution", default="poisson", choices=["poisson", "tangram"],
                   help="how the training spots get their proportions (default: poisson)")
    p = sub.add_parser("segment", help="segment nuclei of a zarr store (in place)")
    p.add_argument("store", type=Path)
    p.add_argument("--n-jobs", type=int, default=2)
    p = sub.add_parser("train", help="train on segmented zarr stores with spot proportions")
    p.add_argument("stores", type=Path, nargs="+")
    p.add_argument("--out", type=Path, required=True, help="model folder (safetensors + model card)")
    p.add_argument("--epochs", type=int, default=None, help="maximum epochs of the first stage (default: by slide size)")
    p.add_argument("--states", help='JSON {"cell_type": ["state", ...]} (default: the store\'s attrs["cell_states"])')
    p.add_argument("--compartments", help='JSON {"compartment": ["cell_type", ...]}')
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p = sub.add_parser("predict", help="predict the nuclei of a segmented zarr store")
    p.add_argument("store", type=Path)
    p.add_argument("--model", type=Path, required=True)
    p.add_argument("--out", type=Path, help="output store (default: in place)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    args = parser.parse_args(argv)
    progress = not args.quiet
    try:
        if args.command == "demo":
            demo(args.out, args.seed, args.preset, args.epochs, args.deconvolution, progress)
        elif args.command == "segment":
            segment(args.store, args.n_jobs, progress)
        elif args.command == "train":
            train(args.stores, args.out, args.epochs, args.states, args.compartments, args.seed, progress, args.overwrite)
        elif args.command == "predict":
            predict(args.store, args.model, args.out, progress, args.overwrite)
    except Exception as error:  # noqa: BLE001 - every failure is reported as one line, exit status 2
        from ._errors import InvalidInputError

        message = str(error) if isinstance(error, InvalidInputError) else f"{type(error).__name__}: {error}"
        print(f"histocell-sd {args.command}: error: {' '.join(message.split())}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
