"""Generic helpers shared across the package."""

from __future__ import annotations

import contextlib
import logging
import warnings

import numpy as np
from tqdm.auto import tqdm

from ._settings import settings

PROGRESS_DELAY_S = 1.0
"""A bar appears only once its work has run this long, so notebooks making many small calls stay quiet."""


def user_stacklevel() -> int:
    """The ``stacklevel`` of a warning raised here that points at the first caller outside the package."""
    import inspect
    from pathlib import Path

    package = str(Path(__file__).resolve().parent)
    frame, level = inspect.currentframe().f_back, 1  # the function calling warnings.warn is level 1
    while frame is not None and str(Path(frame.f_code.co_filename).resolve()).startswith(package):
        frame, level = frame.f_back, level + 1
    return level


def progress_bar(*args, disable: bool = False, **kwargs):
    """:func:`tqdm.auto.tqdm`, silenced by ``disable`` or by ``hc.settings.progress = False``; shown after ``PROGRESS_DELAY_S``."""
    kwargs.setdefault("delay", PROGRESS_DELAY_S)
    return tqdm(*args, disable=disable or not settings.progress, **kwargs)


def mean_per_type_pearson(predicted: np.ndarray, target: np.ndarray) -> float:
    """Mean over types of the Pearson r across spots (types constant in either array are skipped; NaN if all are).

    Unlike r pooled over all (spot, type) pairs, it is not inflated by differences between the type means.
    """
    rs = []
    for a, b in zip(np.asarray(predicted, float).T, np.asarray(target, float).T):
        if len(a) > 1 and a.std() > 0 and b.std() > 0:
            rs.append(float(np.corrcoef(a, b)[0, 1]))
    return float(np.mean(rs)) if rs else float("nan")


def check_whole_number(name: str, value, minimum: int, hint: str = "") -> None:
    """Refuse a ``value`` that is not a whole number ≥ ``minimum`` (a bool or a float such as 2.5 included)."""
    from ._errors import InvalidInputError

    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise InvalidInputError(f"{name} must be a whole number ≥ {minimum}{hint}, got {value!r}.")


def check_storable_names(names, what: str) -> None:
    """Refuse names holding ``/``: each becomes a column (a zarr key) of the proportions and probabilities written."""
    from ._errors import InvalidInputError

    bad = [str(n) for n in names if "/" in str(n)]
    if bad:
        raise InvalidInputError(
            f"{what} {bad} contain '/', which a zarr store cannot hold in a column name; rename them (e.g. {bad[0].replace('/', '-')!r})."
        )


def check_key_added(key_added, protected, where: str) -> None:
    """Refuse a ``key_added`` that is not a name or would overwrite ``where[key]`` for a key in ``protected``
    (what the call reads or the data layout defines)."""
    from ._errors import InvalidInputError

    if not isinstance(key_added, str) or not key_added:
        raise InvalidInputError(f"key_added must be a non-empty string, got {key_added!r}.")
    if key_added in protected:
        raise InvalidInputError(
            f"key_added={key_added!r} would overwrite {where}[{key_added!r}], which this call reads or the data layout "
            "defines; choose another name."
        )


def renamed(call: str, old: str, old_value, new: str, new_value, new_default):
    """The value of parameter ``new``, or of its deprecated name ``old`` (given: not None) with a FutureWarning."""
    from ._errors import InvalidInputError

    if old_value is None:
        return new_value
    if new_value != new_default:
        raise InvalidInputError(f"Give {new}= or the deprecated {old}=, not both.")
    warnings.warn(f"{call}({old}=...) is deprecated; use {new}=.", FutureWarning, stacklevel=3)
    return old_value


def copy_for_writing(sdata):
    """A new SpatialData for ``copy=True``: every table deep-copied, the other elements shared.

    A function that writes into tables (and adds or replaces whole elements) can then work on the
    result and leave ``sdata`` unchanged, without duplicating images, labels, points or shapes,
    which it never modifies in place. ``attrs`` are deep-copied; the copy is not backed by a store.
    """
    import copy

    from spatialdata import SpatialData

    return SpatialData(
        images=dict(sdata.images),
        labels=dict(sdata.labels),
        points=dict(sdata.points),
        shapes=dict(sdata.shapes),
        tables={key: table.copy() for key, table in sdata.tables.items()},
        attrs=copy.deepcopy(dict(sdata.attrs)),
    )


def atomic_write(path, write, *, overwrite: bool = False):
    """Create ``path`` (a file or a folder) by ``write(tmp)`` into a temporary sibling, then swap it in.

    An existing ``path`` is refused unless ``overwrite``; it is moved aside before the swap and put back if
    anything fails, so a failure (even a kill) never leaves ``path`` half-written or missing: a kill in the
    instant between the two renames leaves the old version under ``.<name>.old-<pid>-*``, which the next
    write for that path restores (and :func:`stale_backup` reports). Temporary siblings left by killed
    processes are removed by the next write. Returns ``path`` as a :class:`~pathlib.Path`.
    """
    import os
    import uuid
    from pathlib import Path

    from ._errors import InvalidInputError

    path = Path(path)
    if path.name in ("", ".", ".."):
        raise InvalidInputError(f"The path to write must name a file or folder, got {str(path)!r}.")
    _recover(path)
    if (path.exists() or path.is_symlink()) and not overwrite:
        raise InvalidInputError(f"{path} already exists; pass overwrite=True to replace it.")
    tag = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp, old = path.with_name(f".{path.name}.tmp-{tag}"), path.with_name(f".{path.name}.old-{tag}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write(tmp)
        if path.exists() and tmp.is_dir() != path.is_dir():  # e.g. a CSV over a zarr store: never what was meant
            kind = "folder" if path.is_dir() else "file"
            raise InvalidInputError(f"{path} is a {kind}; overwrite=True replaces it only by another {kind}.")
        if path.exists() or path.is_symlink():
            os.rename(path, old)
        os.rename(tmp, path)
    except BaseException as error:
        _remove(tmp)
        if (old.exists() or old.is_symlink()) and not path.exists():
            os.rename(old, path)
        if isinstance(error, PermissionError):  # it names the hidden temporary sibling, not what the user gave
            raise InvalidInputError(f"Cannot write {path}: permission denied in {path.parent}.") from None
        raise
    _remove(old)
    return path


def stale_backup(path):
    """The complete earlier version of ``path`` left by a write killed between its two renames, or None."""
    from pathlib import Path

    path = Path(path)
    candidates = [p for p in path.parent.glob(f".{path.name}.old-*") if not _alive(p)]
    return max(candidates, key=lambda p: p.stat().st_mtime) if candidates else None


def _recover(path) -> None:
    """Put back a version that a killed write moved aside, and delete dead writers' temporary copies."""
    import os

    backup = stale_backup(path)
    if backup is not None and not (path.exists() or path.is_symlink()):
        os.rename(backup, path)
    for debris in [*path.parent.glob(f".{path.name}.tmp-*"), *path.parent.glob(f".{path.name}.old-*")]:
        if not _alive(debris):
            _remove(debris)


def _alive(debris) -> bool:
    """Is the process that made this temporary sibling (``...-<pid>-<hex>``) still running?"""
    import os

    try:
        pid = int(debris.name.rsplit("-", 2)[-2])
    except (ValueError, IndexError):
        return False  # not ours or an older naming: treat as debris
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove(path) -> None:
    import shutil

    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink(missing_ok=True)


@contextlib.contextmanager
def quiet_logger(name: str, level: int = logging.WARNING):
    """Raise logger ``name`` to ``level`` for the block (e.g. squidpy's INFO lines about a call's internals)."""
    logger = logging.getLogger(name)
    before = logger.level
    logger.setLevel(max(level, before))
    try:
        yield
    finally:
        logger.setLevel(before)
