"""Run segment → predict → indicators over a cohort of slides with dask.distributed, resumably."""

from __future__ import annotations

import os
import uuid
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

import anndata as ad
import pandas as pd

from ..._errors import InvalidInputError
from ..._utils import atomic_write, progress_bar

__all__ = ["run_cohort", "sample_name"]

_MODEL_DIR = "model"


def sample_name(path: str | os.PathLike) -> str:
    """Sample id of a slide path: the file name without a ``.zarr`` suffix."""
    name = Path(path).name
    return name[: -len(".zarr")] if name.endswith(".zarr") else name


def run_cohort(
    paths: Sequence[str | os.PathLike],
    model,
    *,
    out_dir: str | os.PathLike,
    client=None,
    segment_kwargs: dict | None = None,
    indicator_kwargs: dict | None = None,
    save_predictions: bool = False,
    overwrite: bool = False,
    progress: bool = True,
) -> tuple[ad.AnnData, pd.DataFrame]:
    """Segment, predict and compute spatial indicators for every slide of a cohort, in parallel.

    Each slide (a SpatialData zarr store with an H&E and ``attrs["mpp"]``) is read,
    segmented (:func:`~histocell_sd.pp.segment_nuclei`), predicted (:func:`~histocell_sd.tl.predict`)
    and summarised (:func:`~histocell_sd.tl.spatial_indicators`) by a dask worker. The 1-row
    indicators of a slide are written atomically to ``out_dir/<sample>.h5ad`` as soon as it is done,
    so a rerun skips finished slides (resume). A failing slide is reported, the others are kept.

    The model travels as a checkpoint, not as a pickled torch module: it is saved once to
    ``out_dir/model`` (:meth:`~histocell_sd.models.HistoCell.save`, safetensors) and every worker process loads it
    (:meth:`~histocell_sd.models.HistoCell.load`, cached per process).

    Parameters
    ----------
    paths
        Zarr stores of the slides; sample ids are their names without ``.zarr`` (must be unique).
    model
        A trained :class:`~histocell_sd.models.HistoCell`, or the folder of a saved one.
    out_dir
        Folder of the results (created).
    client
        ``None``: a ``LocalCluster(n_workers=2, threads_per_worker=1, processes=True)`` for this call
        (the one-thread variables it sets in ``os.environ`` for its workers are put back afterwards);
        a scheduler address (``"tcp://host:8786"``) or a ``distributed.Client``: the same call on that
        cluster; ``"synchronous"``: a plain loop in this process (debugging, tests).
    segment_kwargs, indicator_kwargs
        Passed to :func:`~histocell_sd.pp.segment_nuclei` and :func:`~histocell_sd.tl.spatial_indicators`.
    save_predictions
        Also write each predicted slide to ``out_dir/<sample>.zarr``.
    overwrite
        Recompute slides that already have a result.
    progress
        Show a progress bar over finished slides.

    Returns
    -------
    tuple
        ``(indicators, failures)``: AnnData samples × indicators of every successful slide (in the
        order of ``paths``; ``obs`` gains ``path`` and ``status`` ``"computed"`` / ``"resumed"``), and a
        DataFrame of the failed slides (``sample``, ``path``, ``error``).
    """
    from ...models import HistoCell

    paths = [str(p) for p in paths]
    if not paths:
        raise InvalidInputError("run_cohort needs at least one path.")
    names = [sample_name(p) for p in paths]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise InvalidInputError(f"Slide names must be unique; duplicated: {dupes}.")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if isinstance(model, HistoCell):
        if not model.training_summary_:
            raise InvalidInputError("The model is untrained: call model.fit(...) or HistoCell.load(path) first.")
        model_dir = out / _MODEL_DIR
        model.save(model_dir, overwrite=True)
    elif isinstance(model, (str, os.PathLike)) and Path(model).is_dir():
        model_dir = Path(model)
    else:
        raise InvalidInputError(f"model must be a trained HistoCell or the folder of a saved one, got {model!r}.")
    kwargs = {
        "model_dir": str(model_dir.resolve()),
        "out_dir": str(out.resolve()),
        "segment_kwargs": dict(segment_kwargs or {}),
        "indicator_kwargs": dict(indicator_kwargs or {}),
        "save_predictions": bool(save_predictions),
    }
    status = {}
    todo = []
    for name, path in zip(names, paths):
        if not overwrite and (out / f"{name}.h5ad").exists():
            status[name] = "resumed"
        else:
            todo.append((name, path))
    errors = {}
    bar = progress_bar(total=len(todo), desc="slides", disable=not progress or not todo)
    if client == "synchronous":
        for name, path in todo:
            _record(name, process_slide(path, **kwargs), status, errors)
            bar.update()
    elif todo:
        for name, result in _distributed(todo, kwargs, client):
            _record(name, result, status, errors)
            bar.update()
    bar.close()
    done = [n for n in names if status.get(n) in ("computed", "resumed")]
    parts = []
    for name in done:
        part = ad.read_h5ad(out / f"{name}.h5ad")
        part.obs["status"] = status[name]
        parts.append(part)
    path_of = dict(zip(names, paths))
    if parts:
        indicators = ad.concat(parts, join="outer", merge="first", uns_merge="first")
        indicators.obs["path"] = [path_of[n] for n in indicators.obs_names]
    else:
        indicators = ad.AnnData(obs=pd.DataFrame(index=pd.Index([], dtype=str)))
    failures = pd.DataFrame(
        [{"sample": n, "path": path_of[n], "error": errors[n]} for n in names if n in errors],
        columns=["sample", "path", "error"],
    )
    return indicators, failures


def _record(name: str, result: tuple[str, str], status: dict, errors: dict) -> None:
    kind, message = result
    if kind == "ok":
        status[name] = "computed"
    else:
        errors[name] = message


def _distributed(todo, kwargs, client):
    """Submit every slide to a dask cluster and yield ``(name, result)`` as they finish."""
    from distributed import Client, LocalCluster, as_completed

    own_cluster = own_client = None
    if client is None:
        environ = dict(os.environ)  # LocalCluster sets OMP_NUM_THREADS=1 etc. here for its workers and leaves them set
        own_cluster = LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None)
        own_client = client = Client(own_cluster)
    elif isinstance(client, str):
        own_client = client = Client(client)
    elif not isinstance(client, Client):
        raise InvalidInputError(f"client must be None, 'synchronous', a scheduler address or a distributed.Client, got {client!r}.")
    try:
        futures = {client.submit(process_slide, path, **kwargs, key=f"histocell-{name}-{uuid.uuid4().hex[:6]}", pure=False): name for name, path in todo}
        for future in as_completed(futures):
            name = futures[future]
            try:
                yield name, future.result()
            except Exception as error:  # noqa: BLE001 - a worker crash is reported as a failed slide
                yield name, ("error", f"{type(error).__name__}: {error}")
    finally:
        if own_client is not None:
            own_client.close()
        if own_cluster is not None:
            own_cluster.close()
            _restore_environ(environ)


def _restore_environ(environ: dict[str, str]) -> None:
    """Put ``os.environ`` back as it was: later subprocesses (a Jupyter kernel, a worker pool) keep all their threads."""
    for key in set(os.environ) - set(environ):
        del os.environ[key]
    for key, value in environ.items():
        if os.environ.get(key) != value:
            os.environ[key] = value


@lru_cache(maxsize=2)
def _load_model(model_dir: str):
    from ...models import HistoCell

    return HistoCell.load(model_dir)


def process_slide(
    path: str, *, model_dir: str, out_dir: str, segment_kwargs: dict, indicator_kwargs: dict, save_predictions: bool = False
) -> tuple[str, str]:
    """Segment → predict → indicators for one slide; writes ``out_dir/<sample>.h5ad`` atomically.

    Returns ``("ok", path)`` or ``("error", message)``; never raises for a bad slide.
    """
    from ... import io, pp
    from .._prediction.predict import predict
    from .._spatial.indicators import spatial_indicators

    name = sample_name(path)
    target = Path(out_dir) / f"{name}.h5ad"
    try:
        sdata = io.read_zarr(path)
        pp.segment_nuclei(sdata, **({"progress": False} | segment_kwargs))
        predict(sdata, _load_model(model_dir), progress=False)
        sdata.attrs["sample_id"] = name
        indicators = spatial_indicators({name: sdata}, **({"progress": False} | indicator_kwargs))
        if save_predictions:
            io.write_zarr(sdata, Path(out_dir) / f"{name}.zarr", overwrite=True)
        atomic_write(target, indicators.write_h5ad, overwrite=True)
    except Exception as error:  # noqa: BLE001 - any failure of one slide is reported, not raised
        return "error", f"{type(error).__name__}: {error}"
    return "ok", str(path)
