"""Command line: ``histocell-sd demo``."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


def demo(out: Path, seed: int, preset: str, progress: bool) -> None:
    """Generate the synthetic slide, write it as zarr and a PNG overview, print where they are."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from . import datasets, io, pl

    start = time.perf_counter()
    sdata, reference = datasets.synthetic_visium(seed=seed, preset=preset, progress=progress)
    table = sdata.tables["table"]
    print(
        f"synthetic slide (seed {seed}, {preset}): {table.n_obs} spots, {sdata.tables[datasets.TRUTH_TABLE_KEY].n_obs} "
        f"nuclei, {table.n_vars} genes, mpp {sdata.attrs['mpp']} µm/px; reference {reference.n_obs} cells "
        f"({time.perf_counter() - start:.1f} s)"
    )
    out.mkdir(parents=True, exist_ok=True)
    store = io.write_zarr(sdata, out / "demo.zarr", overwrite=True)
    reference_path = out / "reference.h5ad"
    reference.write_h5ad(reference_path)
    fig, axes = plt.subplots(1, 2, figsize=(14, 6))
    pl.spot_proportions(sdata, "tumor", proportions_key="true_proportions", ax=axes[0])
    pl.spot_proportions(sdata, "lymphocyte", proportions_key="true_proportions", ax=axes[1])
    overview = out / "overview.png"
    fig.savefig(overview, dpi=110, bbox_inches="tight")
    plt.close(fig)
    print(f"wrote {store}\nwrote {reference_path}\nwrote {overview}")


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``histocell-sd`` console script."""
    parser = argparse.ArgumentParser(prog="histocell-sd", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p_demo = sub.add_parser("demo", help="synthetic Visium slide -> zarr + overview PNG")
    p_demo.add_argument("--out", type=Path, default=Path("histocell_demo"), help="output folder (default: histocell_demo)")
    p_demo.add_argument("--seed", type=int, default=0)
    p_demo.add_argument("--preset", default="default", choices=["tiny", "default", "visium"])
    p_demo.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    if args.command == "demo":
        demo(args.out, args.seed, args.preset, progress=not args.quiet)
    return 0


if __name__ == "__main__":
    sys.exit(main())
