"""Run segment → predict → indicators over a cohort of slides with dask.distributed, resumably."""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import uuid
from collections.abc import Mapping, Sequence
from functools import lru_cache
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd

from ..._errors import InvalidInputError
from ..._utils import atomic_write, progress_bar

__all__ = ["run_cohort", "sample_name"]

_MODEL_DIR = "model"
_RESULT_KEY = "run_cohort"


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
    so a rerun with the same model and settings skips finished slides (resume; each result records a
    fingerprint of its model and the segmentation and indicator settings, defaults filled in, and results
    of another model or other settings, or from a histocell-sd that recorded no settings, are refused unless
    ``overwrite``). A failing slide is
    reported, the others are kept. The paths, model, client and keyword arguments are checked before
    anything is written.

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
        Also write each predicted slide to ``out_dir/<sample>.zarr`` (refused where that is an input store).
    overwrite
        Recompute slides that already have a result (needed when another model made it).
    progress
        Show a progress bar over finished slides.

    Returns
    -------
    tuple
        ``(indicators, failures)``: AnnData samples × indicators of every successful slide (in the
        order of ``paths``; ``obs`` gains ``path`` and ``status`` ``"computed"`` / ``"resumed"``), and a
        DataFrame of the failed slides (``sample``, ``path``, ``error``).
    """
    if isinstance(paths, (str, os.PathLike)):
        raise InvalidInputError(f"paths must be a list of zarr stores, got the single path {str(paths)!r}: pass [{str(paths)!r}].")
    paths = [str(p) for p in paths]
    if not paths:
        raise InvalidInputError("run_cohort needs at least one path.")
    names = [sample_name(p) for p in paths]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise InvalidInputError(f"Slide names must be unique; duplicated: {dupes}.")
    _check_client(client)
    loaded = _trained_model(model)
    fingerprint = model_fingerprint(loaded)
    segment_kwargs, indicator_kwargs = _checked_kwargs(segment_kwargs, indicator_kwargs)
    out = Path(out_dir)
    if save_predictions:
        inside = [p for n, p in zip(names, paths) if (out / f"{n}.zarr").resolve() == Path(p).resolve()]
        if inside:
            raise InvalidInputError(f"save_predictions would overwrite the input stores {inside}: choose an out_dir that does not hold them.")
    resumed = {} if overwrite else {n: ad.read_h5ad(out / f"{n}.h5ad") for n in names if (out / f"{n}.h5ad").exists()}
    other = [n for n, part in resumed.items() if part.uns.get(_RESULT_KEY, {}).get("model_fingerprint") != fingerprint]
    if other:
        raise InvalidInputError(
            f"out_dir {str(out)!r} holds results of another model (or of an older histocell-sd) for {other[:3]}"
            f"{' …' if len(other) > 3 else ''}; pass overwrite=True to recompute them, or use another out_dir."
        )
    settings = _settings_record(segment_kwargs, indicator_kwargs)
    for name, part in resumed.items():
        if not _same_settings(part.uns[_RESULT_KEY].get("settings"), settings):
            raise InvalidInputError(
                f"out_dir {str(out)!r} holds a result for {name!r} made with other settings "
                f"({_settings_difference(part.uns[_RESULT_KEY].get('settings'), settings)}): resuming would mix two "
                "definitions in one table. Pass the same segment_kwargs and indicator_kwargs, overwrite=True to "
                "recompute, or another out_dir."
            )
    out.mkdir(parents=True, exist_ok=True)  # everything above is checked before anything is written
    if isinstance(model, (str, os.PathLike)):
        model_dir = Path(model)
    else:
        model_dir = out / _MODEL_DIR
        model.save(model_dir, overwrite=True)
    kwargs = {
        "model_dir": str(model_dir.resolve()),
        "model_fingerprint": fingerprint,
        "out_dir": str(out.resolve()),
        "segment_kwargs": segment_kwargs,
        "indicator_kwargs": indicator_kwargs,
        "settings": settings,
        "save_predictions": bool(save_predictions),
    }
    status = {}
    todo = []
    for name, path in zip(names, paths):
        if name in resumed:
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
        part = resumed[name] if name in resumed else ad.read_h5ad(out / f"{name}.h5ad")  # each result is read once
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


def _settings_record(segment_kwargs: dict, indicator_kwargs: dict) -> str:
    """The segmentation and indicator settings of a result as JSON, every default filled in (n_jobs, progress, overwrite and
    device left out: they change how fast, where or whether, not what)."""
    from ...pp import segment_nuclei
    from .._spatial.indicators import spatial_indicators

    record = {}
    for name, kwargs, function in (("segment_kwargs", segment_kwargs, segment_nuclei), ("indicator_kwargs", indicator_kwargs, spatial_indicators)):
        signature = inspect.signature(function)
        bound = signature.bind(None, **kwargs)
        bound.apply_defaults()
        settings = {}
        for key, value in list(bound.arguments.items())[1:]:
            if signature.parameters[key].kind is inspect.Parameter.VAR_KEYWORD:
                settings.update(value)  # segment_nuclei's method options
            elif key not in ("progress", "n_jobs", "overwrite", "device"):  # how fast, where and whether to replace; not what
                settings[key] = value
        record[name] = settings
    return json.dumps(record, sort_keys=True, default=_jsonable)


def _jsonable(value):
    """A stable JSON stand-in: paths as strings, numpy values as numbers or lists, functions by qualified name,
    other objects by type name."""
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, (np.ndarray, np.generic)):
        return value.tolist()
    if callable(value) and hasattr(value, "__qualname__"):
        return f"{getattr(value, '__module__', '')}.{value.__qualname__}"
    return type(value).__name__


def _same_settings(stored: str | None, now: str) -> bool:
    """Whether two settings records hold the same values (``30`` and ``30.0`` alike)."""
    return bool(stored) and json.loads(stored) == json.loads(now)


def _settings_difference(stored: str | None, now: str) -> str:
    """What differs between two settings records, for a message."""
    if not stored:
        return "not recorded: an older histocell-sd"
    old, new = json.loads(stored), json.loads(now)
    diff = [f"{group}[{key!r}] {old[group].get(key)!r} then, {new[group].get(key)!r} now"
            for group in new for key in sorted(set(old.get(group, {})) | set(new[group])) if old.get(group, {}).get(key) != new[group].get(key)]
    return "; ".join(diff[:3]) or "recorded differently"


def model_fingerprint(model) -> str:
    """SHA-256 of what a model predicts with: its outputs, preprocessing, weights and morphology standardisation."""
    digest = hashlib.sha256(json.dumps(model.preprocessing, sort_keys=True, default=str).encode())
    for key, value in sorted(model.net.state_dict().items()):
        digest.update(key.encode())
        digest.update(value.detach().cpu().contiguous().numpy().tobytes())
    for stats in (model.net.feature_mean, model.net.feature_std):
        digest.update(np.ascontiguousarray(stats, dtype=np.float32).tobytes())
    return digest.hexdigest()


def _trained_model(model):
    """``model`` (a HistoCell or the folder of a saved one) as a trained HistoCell, or an error naming the problem."""
    from ...models import HistoCell

    if isinstance(model, (str, os.PathLike)):
        if not Path(model).is_dir():
            raise InvalidInputError(f"model must be a trained HistoCell or the folder of a saved one; there is no folder at {str(model)!r}.")
        return HistoCell.load(model)  # a folder that is not a checkpoint is refused here, not by every slide
    if not isinstance(model, HistoCell):
        raise InvalidInputError(f"model must be a trained HistoCell or the folder of a saved one, got {model!r}.")
    if not model.training_summary_:
        raise InvalidInputError("The model is untrained: call model.fit(...) or HistoCell.load(path) first.")
    return model


def _check_client(client) -> None:
    if client is None or client == "synchronous":
        return
    if isinstance(client, str):
        if ":" not in client:  # dask addresses are "tcp://host:port" or "host:port"
            raise InvalidInputError(f"client {client!r} is neither 'synchronous' nor a scheduler address such as 'tcp://host:8786'.")
        return
    from distributed import Client

    if not isinstance(client, Client):
        raise InvalidInputError(f"client must be None, 'synchronous', a scheduler address or a distributed.Client, got {client!r}.")


def _checked_kwargs(segment_kwargs, indicator_kwargs) -> tuple[dict, dict]:
    from ...pp import segment_nuclei
    from .._spatial.indicators import spatial_indicators

    checked = []
    for name, kwargs, function in (("segment_kwargs", segment_kwargs, segment_nuclei), ("indicator_kwargs", indicator_kwargs, spatial_indicators)):
        if kwargs is None:
            kwargs = {}
        if not isinstance(kwargs, Mapping):
            raise InvalidInputError(f"{name} must be a dict of keyword arguments, got {type(kwargs).__name__}.")
        try:
            inspect.signature(function).bind(None, **kwargs)
        except TypeError as error:
            raise InvalidInputError(f"{name} does not fit {function.__name__}: {error}.") from None
        checked.append(dict(kwargs))
    return checked[0], checked[1]


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
def _load_model(model_dir: str, fingerprint: str):
    """The model saved at ``model_dir``, loaded once per process and per fingerprint (a folder replaced by another model reloads)."""
    from ...models import HistoCell

    model = HistoCell.load(model_dir)
    if model_fingerprint(model) != fingerprint:
        raise InvalidInputError(f"The model at {model_dir} changed after run_cohort started.")
    return model


def process_slide(
    path: str, *, model_dir: str, model_fingerprint: str, out_dir: str, segment_kwargs: dict, indicator_kwargs: dict,
    settings: str = "", save_predictions: bool = False,
) -> tuple[str, str]:
    """Segment → predict → indicators for one slide; writes ``out_dir/<sample>.h5ad`` atomically.

    The result records ``model_fingerprint`` and ``settings`` in ``uns["run_cohort"]``, so a resume can tell which model
    and settings made it.
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
        predict(sdata, _load_model(model_dir, model_fingerprint), progress=False)
        sdata.attrs["sample_id"] = name
        indicators = spatial_indicators({name: sdata}, **({"progress": False} | indicator_kwargs))
        indicators.uns[_RESULT_KEY] = {"model_fingerprint": model_fingerprint, "settings": settings}
        if save_predictions:
            io.write_zarr(sdata, Path(out_dir) / f"{name}.zarr", overwrite=True)
        atomic_write(target, indicators.write_h5ad, overwrite=True)
    except Exception as error:  # noqa: BLE001 - any failure of one slide is reported, not raised
        return "error", f"{type(error).__name__}: {error}"
    return "ok", str(path)
