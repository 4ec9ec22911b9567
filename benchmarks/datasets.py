"""Time and peak memory of the synthetic generator; prints JSON.

    python benchmarks/datasets.py [--preset visium] [--seed 1]
"""

import argparse
import json
import resource
import time
import warnings

from histocell_sd.datasets import TRUTH_TABLE_KEY, synthetic_visium


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--preset", default="visium")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    start = time.perf_counter()
    sdata, reference = synthetic_visium(seed=args.seed, preset=args.preset, progress=False)
    seconds = time.perf_counter() - start
    image = sdata.images["he"]["scale0"].image
    print(
        json.dumps(
            {
                "preset": args.preset,
                "seed": args.seed,
                "seconds": round(seconds, 1),
                "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
                "image_px": list(image.shape[1:]),
                "spots": int(sdata.tables["table"].n_obs),
                "nuclei": int(sdata.tables[TRUTH_TABLE_KEY].n_obs),
                "reference_cells": int(reference.n_obs),
            }
        )
    )


if __name__ == "__main__":
    main()
