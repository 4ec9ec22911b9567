"""``histocell-sd demo``: synthetic slides → segment → deconvolve → train → predict → refine → scores, zarr, PNGs."""

from __future__ import annotations

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

    from .. import datasets, io, pl, pp, tl
    from ..models import HistoCell

    def rmse(spots, key):
        """Against the true proportions, over the spots that hold nuclei (HistoCell's view is undefined elsewhere)."""
        truth = spots.obsm["true_proportions"]
        error = (spots.obsm[key][truth.columns] - truth).to_numpy()
        keep = truth.sum(axis=1).to_numpy() > 0
        if "histocell_proportions" in spots.obsm:
            keep &= np.isfinite(spots.obsm["histocell_proportions"].to_numpy()).all(axis=1)
        return float(np.sqrt((error[keep] ** 2).mean()))

    start = time.perf_counter()
    train, reference = datasets.synthetic_visium(seed=seed, preset=preset, weak_labels=False, progress=progress)
    test, test_reference = datasets.synthetic_visium(seed=seed + 1000, preset=preset, weak_labels=False, progress=progress)
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
