"""Install histocell-sd at the lower bounds and at the latest releases of its dependency ranges, run the fast tests in each.

Each environment is a fresh venv built by ``uv`` (``--resolution lowest-direct`` for the lower bounds: every
direct dependency at the oldest release its range admits) from the package's own ``pyproject.toml``, then
``pytest -m "not slow" tests`` runs in it. Prints JSON (one entry per environment: Python, resolution, the key
versions, the test counts and time); ``make``'s environment (``constraints.txt``) is not touched.

Downloads several GB per environment (PyPI's torch wheels are CUDA builds); not run by CI.

Usage::

    python benchmarks/environments.py --python 3.11=/path/to/python3.11 --python 3.13=/path/to/python3.13 \\
        --lowest 3.11 --latest 3.12,3.13 --workdir /tmp/envs > benchmarks/measured/environments.json
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
KEY_PACKAGES = (
    "torch", "numpy", "pandas", "scipy", "scikit-image", "scikit-learn", "anndata", "spatialdata", "spatialdata-io",
    "spatialdata-plot", "scanpy", "squidpy", "tangram-sc", "dask", "geopandas", "shapely", "matplotlib", "zarr",
)  # fmt: skip


def _run(cmd, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, **kwargs)


def _uv(workdir: Path) -> Path:
    tool = workdir / "uv-tool"
    if not (tool / "bin" / "uv").exists():
        _run([sys.executable, "-m", "venv", str(tool)], check=True)
        _run([str(tool / "bin" / "pip"), "install", "-q", "uv"], check=True)
    return tool / "bin" / "uv"


def build(uv: Path, python: str, venv: Path, resolution: str) -> dict:
    """A fresh venv at ``venv`` with histocell-sd[test] resolved by ``resolution`` (``lowest-direct`` or ``highest``)."""
    _run([str(uv), "venv", "-q", "--clear", "-p", python, str(venv)], check=True)
    env = {**os.environ, "VIRTUAL_ENV": str(venv)}
    start = time.perf_counter()
    done = _run([str(uv), "pip", "install", "-q", "--resolution", resolution, "-e", f"{ROOT}[test]"], env=env)
    if done.returncode:
        return {"install_error": done.stderr.strip()[-2000:]}
    freeze = _run([str(uv), "pip", "freeze"], env=env, check=True).stdout
    versions = dict(line.split("==", 1) for line in freeze.splitlines() if "==" in line)
    return {"install_s": round(time.perf_counter() - start, 1), "versions": {k: versions.get(k) for k in KEY_PACKAGES}}


def run_tests(venv: Path) -> dict:
    """``pytest -m "not slow" tests`` in ``venv``; the counts from pytest's summary line."""
    env = {**os.environ, "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1", "OMP_NUM_THREADS": "1"}
    start = time.perf_counter()
    done = _run([str(venv / "bin" / "python"), "-m", "pytest", "-p", "no:cacheprovider", "-q", "-m", "not slow", "tests"], cwd=ROOT, env=env)
    summary = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else done.stderr[-500:]
    counts = {k: int(n) for n, k in re.findall(r"(\d+) (passed|failed|skipped|errors?|deselected)", summary)}
    failed = [line.split(" - ")[0].removeprefix("FAILED ").removeprefix("ERROR ") for line in done.stdout.splitlines() if line.startswith(("FAILED ", "ERROR "))]
    return {"tests_s": round(time.perf_counter() - start, 1), "exit_status": done.returncode, "counts": counts, "failed": failed, "summary": summary}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--python", action="append", default=[], metavar="VERSION=PATH", help="an interpreter, e.g. 3.13=/usr/bin/python3.13")
    parser.add_argument("--lowest", default="3.11", help="comma-separated Python versions installed at the lower bounds")
    parser.add_argument("--latest", default="3.13", help="comma-separated Python versions installed at the latest releases")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/histocell-envs"), help="where the venvs go (several GB each)")
    args = parser.parse_args(argv)
    pythons = dict(item.split("=", 1) for item in args.python)
    args.workdir.mkdir(parents=True, exist_ok=True)
    uv = _uv(args.workdir)
    plan = [(v, "lowest-direct") for v in filter(None, args.lowest.split(","))] + [(v, "highest") for v in filter(None, args.latest.split(","))]
    results = []
    for version, resolution in plan:
        python = pythons.get(version, f"python{version}")
        venv = args.workdir / f"py{version.replace('.', '')}-{resolution}"
        entry = {"python": version, "resolution": resolution, **build(uv, python, venv, resolution)}
        if "install_error" not in entry:
            entry.update(run_tests(venv))
        print(f"{version} {resolution}: {entry.get('summary', entry.get('install_error', ''))[:200]}", file=sys.stderr, flush=True)
        results.append(entry)
    commit = _run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT).stdout.strip()
    print(json.dumps({"benchmark": "environments", "commit": commit, "machine": f"{os.cpu_count()} CPU cores", "environments": results}, indent=1))


if __name__ == "__main__":
    main()
