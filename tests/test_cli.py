"""The command line: ``histocell-sd demo`` end to end on the tiny preset."""

import torch

from histocell_sd import cli
from histocell_sd.models import HistoCell


def test_demo_runs_end_to_end(tmp_path, capsys):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert cli.main(["--quiet", "demo", "--preset", "tiny", "--epochs", "2", "--out", str(tmp_path)]) == 0
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    assert "deconvolved the training spots (poisson)" in out
    assert "nucleus accuracy in spots: HistoCell" in out
    for name in ("demo.zarr", "overview.png", "predicted_cell_types.png", "reference.h5ad"):
        assert (tmp_path / name).exists()
    model = HistoCell.load(tmp_path / "model")
    assert model.training_summary_["proportions_key"] == "proportions"


def _store(path):
    import numpy as np

    from histocell_sd.io import from_arrays, write_zarr

    return write_zarr(from_arrays(np.full((32, 32, 3), 200, dtype=np.uint8), 0.5), path)


def _one_line_error(capsys, *words):
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    for word in words:
        assert word in err, err


def test_train_bad_states_json_is_a_one_line_error(tmp_path, capsys):
    # cases.md: cli_train_bad_states_json
    store = _store(tmp_path / "seg.zarr")
    assert cli.main(["train", str(store), "--out", str(tmp_path / "m"), "--states", "{tumor: [a,b]}"]) == 2
    _one_line_error(capsys, "--states", "not valid JSON")
    assert not (tmp_path / "m").exists()


def test_predict_out_exists_needs_overwrite(tmp_path, capsys):
    # cases.md: cli_predict_out_exists
    store = _store(tmp_path / "seg.zarr")
    other = _store(tmp_path / "other.zarr")
    before = sorted(p.relative_to(other) for p in other.rglob("*"))
    assert cli.main(["predict", str(store), "--model", str(tmp_path / "m"), "--out", str(other)]) == 2
    _one_line_error(capsys, "already exists", "--overwrite")
    assert sorted(p.relative_to(other) for p in other.rglob("*")) == before


def test_train_out_is_an_input_store_refused(tmp_path, capsys):
    # cases.md: cli_train_out_is_store
    from histocell_sd.io import read_zarr

    store = _store(tmp_path / "victim.zarr")
    for extra in ([], ["--overwrite"]):
        assert cli.main(["train", str(store), "--out", str(store), *extra]) == 2
        _one_line_error(capsys, "input", "victim.zarr")
    assert cli.main(["train", str(store), "--out", str(tmp_path)]) == 2  # contains the store
    _one_line_error(capsys, "input")
    (tmp_path / "m").mkdir()
    assert cli.main(["train", str(store), "--out", str(tmp_path / "m")]) == 2
    _one_line_error(capsys, "already exists", "--overwrite")
    assert read_zarr(store).attrs["mpp"] == 0.5


def test_invalid_input_is_a_one_line_error(tmp_path, capsys):
    store = _store(tmp_path / "seg.zarr")
    assert cli.main(["train", str(store), "--out", str(tmp_path / "m")]) == 2
    _one_line_error(capsys, "histocell-sd train: error:", "no spot proportions")
