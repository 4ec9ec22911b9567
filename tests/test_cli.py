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
