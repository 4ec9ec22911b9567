"""Command line: ``histocell-sd import | segment | deconvolve | train | predict | refine | export | demo``.

A typical run on your own Visium sample::

    histocell-sd import sample.zarr --visium outs/ --fullres-image he.tif   # Visium HD: --visium-hd outs/ --bin-size-um 8
    histocell-sd segment sample.zarr
    histocell-sd deconvolve sample.zarr --reference reference.h5ad
    histocell-sd train sample.zarr --out model/
    histocell-sd predict other.zarr --model model/        # or --model tumor_stromal_lymphocyte (shipped)
                                                          # --model seed0/ --model seed1/: one ensemble
    histocell-sd refine other.zarr --reference reference.h5ad
    histocell-sd export other.zarr --out other_nuclei.geojson

Errors are one line on stderr with exit status 2; nothing is overwritten without ``--overwrite``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from . import _commands

__all__ = ["build_parser", "main"]

_DEVICE_HELP = "torch device: auto (CUDA when available), cpu, cuda or cuda:<i> (default: hc.settings.device)"


def _common() -> argparse.ArgumentParser:
    """Options every sub-command takes (SUPPRESS: given before or after the sub-command, never reset)."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--quiet", action="store_true", default=argparse.SUPPRESS, help="no progress bars")
    return common


def _out(p: argparse.ArgumentParser, what: str, required: bool = False, overwrite: str = "replace an existing --out (never an input)") -> None:
    p.add_argument("--out", type=Path, required=required, help=what)
    p.add_argument("--overwrite", action="store_true", help=overwrite)


def build_parser() -> argparse.ArgumentParser:
    """The ``histocell-sd`` argument parser (every option has a help text)."""
    from .. import __version__

    common = _common()
    parser = argparse.ArgumentParser(prog="histocell-sd", description=__doc__.split("\n\n")[0], parents=[common],
                                     epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"histocell-sd {__version__}", help="print the version and exit")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, text: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=text, description=text, parents=[common])

    p = command("import", "build a zarr store from a Space Ranger folder (Visium or Visium HD), or from an H&E image + spot centres + µm/px")
    p.add_argument("out", type=Path, help="the zarr store to write")
    p.add_argument("--visium", type=Path, help="Space Ranger outs/ folder (spatial/, filtered_feature_bc_matrix.h5)")
    p.add_argument("--visium-hd", type=Path, help="Space Ranger Visium HD outs/ folder (binned_outputs/square_<XXX>um/)")
    p.add_argument("--bin-size-um", type=int, default=8, help="Visium HD bin side in µm to read (2, 8 or 16; default: 8)")
    p.add_argument("--fullres-image", type=Path, help="the full-resolution H&E given to Space Ranger (with --visium or --visium-hd): a path, or a file name inside the Space Ranger folder")
    p.add_argument("--image", type=Path, help="an H&E image file (TIFF, PNG, JPEG) instead of --visium")
    p.add_argument("--mpp", type=float, help="µm per pixel of --image")
    p.add_argument("--spots", type=Path, help="CSV of spot centres: barcode, x, y (pixels of --image)")
    p.add_argument("--spot-diameter-um", type=float, default=55.0, help="spot diameter in µm (default: 55, Visium)")
    p.add_argument("--counts", type=Path, help=".h5ad of spot counts (spots × genes, rows = barcodes), with --spots")
    p.add_argument("--proportions", type=Path, help="CSV of spot cell-type proportions (barcode, one column per type)")
    p.add_argument("--sample-id", help="sample name stored in attrs['sample_id']")
    p.add_argument("--overwrite", action="store_true", help="replace an existing store")

    p = command("segment", "segment the nuclei of a store (in place, or into --out)")
    p.add_argument("store", type=Path, help="a zarr store with the H&E")
    p.add_argument("--method", default="default", choices=["default", "classical"], help="learnt segmenter (default) or classical")
    p.add_argument("--n-jobs", type=int, default=2, help="tiles segmented in parallel (default: 2)")
    p.add_argument("--device", help=_DEVICE_HELP)
    _out(p, "write the segmented sample here instead of in place",
         overwrite="segment in place a store that already has nuclei (they and everything predicted from them are replaced), or replace an existing --out")

    p = command("deconvolve", "spot cell-type proportions from expression against a single-cell reference")
    p.add_argument("store", type=Path, help="a zarr store with spot counts")
    p.add_argument("--reference", type=Path, required=True, help="single-cell reference .h5ad (counts in X)")
    p.add_argument("--method", default="tangram", choices=["tangram", "poisson"],
                   help="Tangram (default, as hc.tl.deconvolve) or a Poisson mixture of the reference's marker profiles")
    p.add_argument("--cell-type-key", default="cell_type", help="obs column of the reference with the cell types")
    p.add_argument("--state-key", help="obs column of the reference with cell states (also deconvolved)")
    p.add_argument("--device", help=_DEVICE_HELP + " (Tangram)")
    _out(p, "write the result here instead of in place",
         overwrite="deconvolve in place a store that already has spot proportions (they are replaced), or replace an existing --out")

    p = command("train", "train a model on segmented stores with spot proportions")
    p.add_argument("stores", type=Path, nargs="+", help="segmented zarr stores with obsm['proportions']")
    p.add_argument("--epochs", type=int, default=None, help="maximum epochs of the first stage (default: by slide size)")
    p.add_argument("--states", help='JSON {"cell_type": ["state", ...]} (default: the store\'s attrs["cell_states"])')
    p.add_argument("--compartments", help='JSON {"compartment": ["cell_type", ...]}')
    p.add_argument("--seed", type=int, default=0, help="seed of the split, sampling and initialisation (default: 0)")
    p.add_argument("--device", help=_DEVICE_HELP)
    _out(p, "model folder to write (safetensors + model card)", required=True)

    p = command("predict", "predict cell type, state and compartment of every nucleus of a segmented store")
    p.add_argument("store", type=Path, help="a segmented zarr store")
    p.add_argument("--model", type=Path, action="append", required=True,
                   help="a model folder or the name of a shipped model (tumor_stromal_lymphocyte); give --model several times to predict "
                        "with the models as one ensemble (the mean of their probabilities; their disagreement in obs['cell_type_ensemble_std'])")
    p.add_argument("--device", help=_DEVICE_HELP)
    _out(p, "write the predicted sample here instead of in place",
         overwrite="predict in place a store that already has predictions (they are replaced), or replace an existing --out")

    p = command("refine", "histology-refined deconvolution: spot counts (or proportions) × nucleus predictions")
    p.add_argument("store", type=Path, help="a predicted zarr store")
    p.add_argument("--reference", type=Path, help="single-cell reference .h5ad (default: refine the stored proportions)")
    _out(p, "write the result here instead of in place",
         overwrite="refine in place a store that already has refined proportions (they are replaced), or replace an existing --out")

    p = command("export", "export the nuclei with their predictions as QuPath GeoJSON or CSV")
    p.add_argument("store", type=Path, help="a segmented (and predicted) zarr store")
    p.add_argument("--format", choices=["geojson", "csv"], default=None, help="default: from the --out suffix")
    _out(p, "file to write (.geojson or .csv)", required=True)

    p = command("demo", "synthetic slides -> segment -> deconvolve -> train -> predict -> refine -> scores, zarr, PNGs")
    p.add_argument("--out", type=Path, default=Path("histocell_demo"), help="output folder (default: histocell_demo)")
    p.add_argument("--seed", type=int, default=0, help="seed of the training slide (the held-out one is seed + 1000)")
    p.add_argument("--preset", default="default", choices=["tiny", "default", "visium"], help="synthetic slide size")
    p.add_argument("--epochs", type=int, default=30, help="maximum training epochs (default: 30)")
    p.add_argument("--deconvolution", default="poisson", choices=["poisson", "tangram"],
                   help="how the training spots get their proportions (default: poisson)")
    return parser


def _run(args) -> str | None:
    progress = not getattr(args, "quiet", False)
    if args.command == "import":
        return _commands.import_sample(
            args.out, visium=args.visium, visium_hd=args.visium_hd, bin_size_um=args.bin_size_um, image=args.image, spots=args.spots, mpp=args.mpp, spot_diameter_um=args.spot_diameter_um,
            counts=args.counts, proportions=args.proportions, fullres_image=args.fullres_image, sample_id=args.sample_id,
            overwrite=args.overwrite)
    if args.command == "segment":
        return _commands.segment(args.store, out=args.out, n_jobs=args.n_jobs, method=args.method, device=args.device, progress=progress,
                                 overwrite=args.overwrite)
    if args.command == "deconvolve":
        return _commands.deconvolve(args.store, reference=args.reference, out=args.out, method=args.method, cell_type_key=args.cell_type_key,
                                    state_key=args.state_key, device=args.device, progress=progress, overwrite=args.overwrite)
    if args.command == "train":
        return _commands.train(args.stores, out=args.out, epochs=args.epochs, states=args.states, compartments=args.compartments,
                               seed=args.seed, device=args.device, progress=progress, overwrite=args.overwrite)
    if args.command == "predict":
        return _commands.predict(args.store, models=args.model, out=args.out, device=args.device, progress=progress, overwrite=args.overwrite)
    if args.command == "refine":
        return _commands.refine(args.store, reference=args.reference, out=args.out, progress=progress, overwrite=args.overwrite)
    if args.command == "export":
        fmt = args.format or {".geojson": "geojson", ".json": "geojson", ".csv": "csv"}.get(args.out.suffix.lower())
        if fmt is None:
            raise _commands.InvalidInputError(f"--out {args.out}: give --format geojson|csv or a .geojson/.csv name.")
        return _commands.export(args.store, out=args.out, format=fmt, overwrite=args.overwrite)
    from ._demo import demo

    demo(args.out, args.seed, args.preset, args.epochs, args.deconvolution, progress)
    return None


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``histocell-sd`` console script: 0 on success, 2 on any error (one line on stderr)."""
    args = build_parser().parse_args(argv)
    try:
        message = _run(args)
    except Exception as error:  # noqa: BLE001 - every failure is reported as one line, exit status 2
        from .._errors import InvalidInputError

        text = str(error) if isinstance(error, InvalidInputError) else f"{type(error).__name__}: {error}"
        print(f"histocell-sd {args.command}: error: {' '.join(text.split())}", file=sys.stderr)
        return 2
    if message:
        print(message)
    return 0


if __name__ == "__main__":
    sys.exit(main())
