"""Time of tl.spatial_indicators (and tl.cell_graph, tl.tissue_architecture) on one large slide; prints JSON.

    python benchmarks/indicators.py [--n-nuclei 150000] [--seed 0]

The slide is a synthetic_cohort-style layout (nuclei in the prediction layout, no image).
"""

import argparse
import json
import resource
import time
import warnings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n-nuclei", type=int, default=150_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-architecture", action="store_true")
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    from histocell_sd import datasets, tl

    t0 = time.perf_counter()
    samples, _, _ = datasets.synthetic_cohort(n_samples=2, n_nuclei=args.n_nuclei, seed=args.seed)  # a cohort has two or more; the first is timed
    sdata = next(iter(samples.values()))
    result = {"n_nuclei": int(sdata.tables["histocell"].n_obs), "generate_s": round(time.perf_counter() - t0, 2)}
    t0 = time.perf_counter()
    ind = tl.spatial_indicators(sdata, progress=False)
    result["spatial_indicators_s"] = round(time.perf_counter() - t0, 2)
    result["n_indicators"] = int(ind.n_vars)
    t0 = time.perf_counter()
    tl.cell_graph(sdata)
    result["cell_graph_s"] = round(time.perf_counter() - t0, 2)
    if not args.skip_architecture:
        t0 = time.perf_counter()
        tl.tissue_architecture(sdata, n_niches=4)
        result["tissue_architecture_s"] = round(time.perf_counter() - t0, 2)
        t0 = time.perf_counter()
        tl.spatial_indicators(sdata, progress=False)
        result["spatial_indicators_with_niches_s"] = round(time.perf_counter() - t0, 2)
    result["peak_rss_gb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6, 2)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
