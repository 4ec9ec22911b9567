"""Generic helpers: the one atomic write used by zarr stores, checkpoints, shipped networks and cohort results."""

import os

import numpy as np
import pytest

from histocell_sd import InvalidInputError
from histocell_sd._utils import atomic_write, mean_per_type_pearson, stale_backup


def _write_text(text):
    def write(tmp):
        tmp.mkdir()
        (tmp / "data.txt").write_text(text)

    return write


def test_atomic_write_creates_replaces_and_refuses(tmp_path):
    target = tmp_path / "store"
    atomic_write(target, _write_text("one"))
    assert (target / "data.txt").read_text() == "one"
    with pytest.raises(InvalidInputError, match="already exists"):
        atomic_write(target, _write_text("two"))
    atomic_write(target, _write_text("two"), overwrite=True)
    assert (target / "data.txt").read_text() == "two"
    assert [p.name for p in tmp_path.iterdir()] == ["store"]


def test_overwrite_replaces_only_the_same_kind_and_errors_name_the_target(tmp_path):
    # own case write_kind_mismatch: write_csv(..., "store.zarr", overwrite=True) deleted a whole zarr store
    store, table = tmp_path / "store.zarr", tmp_path / "cells.csv"
    atomic_write(store, _write_text("zarr"))
    table.write_text("csv")
    with pytest.raises(InvalidInputError, match="store.zarr is a folder; overwrite=True replaces it only by another folder"):
        atomic_write(store, lambda tmp: tmp.write_text("a csv"), overwrite=True)
    with pytest.raises(InvalidInputError, match="cells.csv is a file; overwrite=True replaces it only by another file"):
        atomic_write(table, _write_text("a store"), overwrite=True)
    assert (store / "data.txt").read_text() == "zarr" and table.read_text() == "csv"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cells.csv", "store.zarr"]
    for name in ("", "."):  # own case write_empty_name: '' was reported as '. already exists'
        with pytest.raises(InvalidInputError, match="must name a file or folder"):
            atomic_write(name, _write_text("x"), overwrite=True)

    def denied(tmp):  # own case write_permission: the PermissionError named the hidden temporary sibling
        raise PermissionError(13, "Permission denied", str(tmp))

    with pytest.raises(InvalidInputError, match=f"Cannot write {table}: permission denied in {tmp_path}"):
        atomic_write(table, denied, overwrite=True)
    assert table.read_text() == "csv"


def test_failed_write_keeps_the_old_version_and_leaves_nothing(tmp_path):
    # cases.md: kill_write_zarr_overwrite, kill_model_save (the shared atomic write)
    target = tmp_path / "store"
    atomic_write(target, _write_text("one"))

    def broken(tmp):
        tmp.mkdir()
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        atomic_write(target, broken, overwrite=True)
    assert (target / "data.txt").read_text() == "one"
    assert [p.name for p in tmp_path.iterdir()] == ["store"]


def test_a_kill_between_the_renames_is_recovered_by_the_next_write(tmp_path):
    # cases.md: kill_write_zarr_rename_window, kill_model_save_window (the shared atomic write)
    target = tmp_path / "store"
    atomic_write(target, _write_text("one"))
    dead = 2**22 + 12345  # no such process
    os.rename(target, tmp_path / f".store.old-{dead}-abcd1234")  # what a kill after the first rename leaves
    (tmp_path / f".store.tmp-{dead}-abcd1234").mkdir()  # and the complete-or-not new copy
    assert stale_backup(target) == tmp_path / f".store.old-{dead}-abcd1234"
    with pytest.raises(InvalidInputError, match="already exists"):  # restored first, so still refused
        atomic_write(target, _write_text("two"))
    assert (target / "data.txt").read_text() == "one"
    assert [p.name for p in tmp_path.iterdir()] == ["store"]  # debris of the dead writer removed


def test_mean_per_type_pearson_is_not_inflated_by_type_means():
    rng = np.random.default_rng(0)
    target = rng.dirichlet([8, 1, 1], size=50)
    noise = rng.permutation(target)  # right type means, no spot-level agreement at all
    pooled = np.corrcoef(noise.ravel(), target.ravel())[0, 1]
    assert pooled > 0.8 and abs(mean_per_type_pearson(noise, target)) < 0.3
    assert mean_per_type_pearson(target, target) == pytest.approx(1.0)
    assert np.isnan(mean_per_type_pearson(np.ones((4, 2)), target[:4, :2]))
