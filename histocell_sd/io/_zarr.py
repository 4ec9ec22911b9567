"""Atomic reading and writing of SpatialData zarr stores."""

from __future__ import annotations

import shutil
import uuid
import warnings
from os import PathLike
from pathlib import Path

import spatialdata as sd
from spatialdata import SpatialData

from .._errors import InvalidInputError
from ._elements import get_mpp


def write_zarr(sdata: SpatialData, path: str | PathLike, *, overwrite: bool = False) -> Path:
    """Write ``sdata`` to a zarr store at ``path`` atomically.

    The store is written next to ``path`` under a temporary name and moved into place only when
    complete, so a failure never leaves a half-written store. An existing ``path`` is refused
    unless ``overwrite=True``.
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise InvalidInputError(f"{path} already exists; pass overwrite=True to replace it.")
    get_mpp(sdata)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    old = path.with_name(f".{path.name}.old-{uuid.uuid4().hex[:8]}")
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*autosharding.*", category=UserWarning)
            sdata.write(tmp)
        if path.exists():
            path.rename(old)
        tmp.rename(path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old.exists() and not path.exists():
            old.rename(path)
        raise
    _remove(old)
    sdata.path = path
    return path


def read_zarr(path: str | PathLike) -> SpatialData:
    """Read a histocell-sd zarr store, checking that it carries ``mpp``."""
    path = Path(path)
    if not path.exists():
        raise InvalidInputError(f"No zarr store at {path}.")
    try:
        sdata = sd.read_zarr(path)
    except (ValueError, KeyError, OSError) as error:
        raise InvalidInputError(f"{path} is not a readable SpatialData zarr store: {error}") from error
    get_mpp(sdata)
    return sdata


def _remove(path: Path) -> None:
    """Delete the replaced store, a directory or (when a plain file was overwritten) a file."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)
