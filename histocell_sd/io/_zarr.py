"""Atomic reading and writing of SpatialData zarr stores."""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from contextlib import contextmanager
from os import PathLike
from pathlib import Path

import spatialdata as sd
from spatialdata import SpatialData

from .._errors import InvalidInputError
from .._utils import atomic_write, stale_backup
from ._elements import get_mpp


def write_zarr(sdata: SpatialData, path: str | PathLike, *, overwrite: bool = False) -> Path:
    """Write ``sdata`` to a zarr store at ``path`` atomically.

    The store is written next to ``path`` under a temporary name and swapped in only when complete
    (``histocell_sd._utils.atomic_write``), so a failure or a kill never leaves a half-written or
    missing store, and debris of killed writes is cleaned by the next one. An existing ``path`` is
    refused unless ``overwrite=True``. Tuples in a table's ``uns`` (squidpy records
    ``radius=(0, r)`` as one), which anndata cannot write, are stored as lists; ``sdata`` itself is
    left as it is.

    Parameters
    ----------
    sdata
        The sample (needs ``attrs["mpp"]``); its ``path`` is set to the new store.
    path
        The zarr store to write.
    overwrite
        Replace an existing store at ``path``.

    Returns
    -------
    pathlib.Path
        ``path``.
    """
    get_mpp(sdata)

    def write(tmp: Path) -> None:
        with warnings.catch_warnings(), _tuples_stored_as_lists(sdata):
            warnings.filterwarnings("ignore", message=".*autosharding.*", category=UserWarning)
            try:
                sdata.write(tmp)
            except Exception as error:
                where = [note for note in getattr(error, "__notes__", []) if "while writing key" in note]
                if not where:
                    raise
                # anndata could not write a value (it names the key): the user's data, not a fault of the write
                raise InvalidInputError(f"The sample cannot be stored as zarr: {error} {' '.join(where)}") from error

    path = atomic_write(path, write, overwrite=overwrite)
    sdata.path = path
    return path


@contextmanager
def _tuples_stored_as_lists(sdata: SpatialData):
    """While open, each table whose ``uns`` holds a tuple (at any depth) has it as a list instead."""
    swapped = {}
    for name, table in sdata.tables.items():
        if _holds_tuple(table.uns):
            swapped[name] = table.uns
            table.uns = _tuples_as_lists(table.uns)
    try:
        yield
    finally:
        for name, uns in swapped.items():
            sdata.tables[name].uns = uns


def _holds_tuple(value) -> bool:
    if isinstance(value, tuple):
        return True
    if isinstance(value, Mapping):
        return any(_holds_tuple(v) for v in value.values())
    return isinstance(value, list) and any(_holds_tuple(v) for v in value)


def _tuples_as_lists(value):
    if isinstance(value, (tuple, list)):
        return [_tuples_as_lists(v) for v in value]
    if isinstance(value, Mapping):
        return {k: _tuples_as_lists(v) for k, v in value.items()}
    return value


def read_zarr(path: str | PathLike) -> SpatialData:
    """Read a histocell-sd zarr store, checking that it carries ``mpp``.

    Parameters
    ----------
    path
        The zarr store written by :func:`write_zarr` (or any SpatialData store with ``attrs["mpp"]``).

    Returns
    -------
    SpatialData
        The sample, backed by the store; images whose chunk files are missing are refused.
    """
    path = Path(path)
    if not path.exists():
        backup = stale_backup(path)
        hint = f" A write to it was interrupted; the previous store is intact at {backup} (the next write_zarr to {path.name} restores it)." if backup else ""
        raise InvalidInputError(f"No zarr store at {path}.{hint}")
    try:
        sdata = sd.read_zarr(path)
    except (ValueError, KeyError, OSError) as error:
        raise InvalidInputError(f"{path} is not a readable SpatialData zarr store: {error}") from error
    get_mpp(sdata)
    for name in sdata.images:
        _check_image_chunks(path / "images" / name, name, sdata.images[name])
    return sdata


def _check_image_chunks(folder: Path, name: str, image) -> None:
    """Refuse an image whose chunk files are missing from the store (they would read as black).

    zarr omits chunks that hold only the fill value, so a missing chunk counts as lost only when the
    same region of a neighbouring pyramid level is not all fill value (a single-level image cannot
    be checked). Chunk files are counted first, so a complete store costs one directory walk per level.
    """
    import dask
    import dask.array as da
    import numpy as np

    levels = [image[k]["image"].data for k in image.children] if hasattr(image, "children") else [image.data]
    paths = _dataset_paths(folder, len(levels))
    lost, total = {}, {}
    for k, sub in enumerate(paths):
        meta = _array_meta(folder / sub)
        if meta is None:
            continue
        grid = [-(-n // c) for n, c in zip(meta["shape"], meta["chunks"])]
        total[k] = int(np.prod(grid))
        present = _chunk_keys(folder / sub, meta["prefix"], meta["separator"], len(grid))
        if len(present) >= total[k] or len(levels) < 2:
            continue
        other = da.asarray(levels[k + 1 if k + 1 < len(levels) else k - 1])
        fill = float(meta["fill"]) if isinstance(meta["fill"], str) else (meta["fill"] or 0)  # v3 writes NaN as "NaN"
        regions = [_region(other.shape, levels[k].shape, i, meta["chunks"]) for i in np.ndindex(*grid) if i not in present]
        data = [other[r] for r in regions if r is not None]
        lost[k] = sum(dask.compute(*[(~da.isnan(x) if np.isnan(fill) else x != fill).any() for x in data]))
    lost = {k: n for k, n in lost.items() if n}
    if lost:
        where = ", ".join(f"{n} of {total[k]} at scale{k}" for k, n in lost.items())
        raise InvalidInputError(
            f"Image {name!r} in {folder.parent.parent} is missing {sum(lost.values())} chunk files ({where}; scale0 is "
            "the full resolution): the store is incomplete (an interrupted copy or write?) and those regions would "
            "read as black. Restore or rewrite the store."
        )


def _dataset_paths(folder: Path, n_levels: int) -> list[str]:
    """The array folders of the image's levels, finest first (OME multiscales metadata, zarr v3 or v2)."""
    import json

    for meta_file, get in (("zarr.json", lambda m: m.get("attributes", {}).get("ome", {})), (".zattrs", lambda m: m)):
        if (folder / meta_file).is_file():
            try:
                multiscales = get(json.loads((folder / meta_file).read_text())).get("multiscales")
                return [d["path"] for d in multiscales[0]["datasets"]][:n_levels]
            except (ValueError, KeyError, IndexError, TypeError, AttributeError):
                break
    return [f"s{k}" for k in range(n_levels)]


def _array_meta(folder: Path) -> dict | None:
    """Shape, chunk (or shard) shape, chunk key prefix and separator and fill value of a zarr v3 or v2 array."""
    import json

    try:
        if (folder / "zarr.json").is_file():
            meta = json.loads((folder / "zarr.json").read_text())
            encoding = meta.get("chunk_key_encoding", {"name": "default"})
            default = encoding.get("name") == "default"
            separator = encoding.get("configuration", {}).get("separator", "/" if default else ".")
            return {"shape": meta["shape"], "chunks": meta["chunk_grid"]["configuration"]["chunk_shape"],
                    "prefix": "c" if default else "", "separator": separator, "fill": meta.get("fill_value")}
        if (folder / ".zarray").is_file():
            meta = json.loads((folder / ".zarray").read_text())
            return {"shape": meta["shape"], "chunks": meta["chunks"], "prefix": "",
                    "separator": meta.get("dimension_separator") or ".", "fill": meta.get("fill_value")}
    except (ValueError, KeyError, TypeError):
        return None
    return None


def _chunk_keys(folder: Path, prefix: str, separator: str, ndim: int) -> set[tuple[int, ...]]:
    """Grid indices of the chunk files present under an array folder."""
    import os

    keys = set()
    for root, _, files in os.walk(folder):
        rel = Path(root).relative_to(folder).as_posix()
        for file in files:
            key = file if rel == "." else f"{rel}/{file}"
            if prefix:
                if not key.startswith(prefix + separator):
                    continue
                key = key[len(prefix) + len(separator):]
            parts = key.split(separator)
            if len(parts) == ndim and all(p.isdigit() for p in parts):
                keys.add(tuple(int(p) for p in parts))
    return keys


def _region(other_shape, shape, index, chunks) -> tuple[slice, ...] | None:
    """The region of chunk ``index`` (of an array of ``shape``) in a level of ``other_shape``, or None when too small.

    The region is mapped by the ratio of the two levels' sizes and shrunk by two pixels so that
    downsampling never mixes in the neighbouring chunks.
    """
    import math

    region = []
    for i, c, n, m in zip(index, chunks, shape, other_shape):
        lo, hi = i * c, min((i + 1) * c, n)
        if n == m:
            region.append(slice(lo, hi))
            continue
        a, b = math.floor(lo * m / n) + 2, math.ceil(hi * m / n) - 2
        if b <= a:
            return None
        region.append(slice(a, b))
    return tuple(region)
