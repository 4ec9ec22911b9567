"""device= (CPU / CUDA) and the package settings (hc.settings): the GPU path runs when a GPU is present."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import histocell_sd as hc
from histocell_sd import InvalidInputError
from histocell_sd._device import full_float32, resolve_device
from histocell_sd._utils import progress_bar

CUDA = torch.cuda.is_available()
needs_gpu = pytest.mark.skipif(not CUDA, reason="no CUDA GPU on this machine")


@pytest.fixture(scope="module")
def slide():
    """A tiny slide (seed 3) with nuclei from its truth raster; treat as read-only."""
    sdata, reference = hc.datasets.synthetic_visium(seed=3, preset="tiny", progress=False)
    hc.pp.store_nuclei(sdata, np.asarray(sdata.labels["truth_labels"]))
    return sdata, reference


@pytest.fixture(scope="module")
def model():
    return hc.models.pretrained("tumor_stromal_lymphocyte")


def test_auto_is_cuda_when_available_else_cpu():
    assert resolve_device("auto").type == ("cuda" if CUDA else "cpu")
    assert resolve_device("cpu").type == "cpu"


@pytest.mark.parametrize("device", ["gpu", "cuda:x", "", 0, 1.5])
def test_bad_device_is_refused(device):
    with pytest.raises(InvalidInputError, match="device must be"):
        resolve_device(device)


def test_full_float32_turns_tf32_off_and_restores_it_even_on_error():
    before = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    with pytest.raises(ValueError), full_float32():
        assert not torch.backends.cudnn.allow_tf32 and not torch.backends.cuda.matmul.allow_tf32
        raise ValueError("inside")
    assert (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32) == before


@pytest.mark.skipif(CUDA, reason="a CUDA GPU is present")
def test_cuda_without_a_gpu_is_refused_before_anything_is_written(slide, model):
    sdata = hc._utils.copy_for_writing(slide[0])
    before = set(sdata.tables["histocell"].obs.columns)
    with pytest.raises(InvalidInputError, match="no CUDA GPU"):
        hc.tl.predict(sdata, model, device="cuda", progress=False)
    assert set(sdata.tables["histocell"].obs.columns) == before


def test_settings_validate_and_silence_every_bar():
    with pytest.raises(InvalidInputError, match="settings.progress"):
        hc.settings.progress = "no"
    with pytest.raises(InvalidInputError, match="device must be"):
        hc.settings.device = "tpu"
    before = hc.settings.progress
    try:
        hc.settings.progress = False
        assert progress_bar(range(3)).disable
        hc.settings.progress = True
        assert not progress_bar(range(3)).disable and progress_bar(range(3), disable=True).disable
    finally:
        hc.settings.progress = before
    assert "device='auto'" in repr(hc.settings)


def test_predict_on_cpu_is_the_same_whatever_the_default(slide, model):
    explicit = hc.tl.predict(slide[0], model, device="cpu", progress=False, copy=True).tables["histocell"]
    default = hc.tl.predict(slide[0], model, progress=False, copy=True).tables["histocell"]
    if not CUDA:  # "auto" is the CPU here: bit-identical
        np.testing.assert_array_equal(explicit.obsm["cell_type_proba"].to_numpy(), default.obsm["cell_type_proba"].to_numpy())
    assert next(model.net.parameters()).device.type == "cpu"  # the model rests on the CPU after a call


@needs_gpu
def test_gpu_predict_matches_cpu(slide, model):
    cpu = hc.tl.predict(slide[0], model, device="cpu", progress=False, copy=True).tables["histocell"]
    gpu = hc.tl.predict(slide[0], model, device="cuda", progress=False, copy=True).tables["histocell"]
    np.testing.assert_allclose(gpu.obsm["cell_type_proba"].to_numpy(), cpu.obsm["cell_type_proba"].to_numpy(), atol=1e-3)
    assert (gpu.obs["cell_type"].astype(str) == cpu.obs["cell_type"].astype(str)).mean() > 0.99


@needs_gpu
def test_gpu_fit_trains_and_returns_to_the_cpu(slide):
    types = list(hc.datasets.CELL_TYPES)
    fitted = hc.HistoCell(types).fit(slide[0], epochs=2, self_training_epochs=0, state_epochs=0, progress=False, device="cuda")
    assert next(fitted.net.parameters()).device.type == "cpu" and np.isfinite(fitted.training_summary_["val_loss"])


@needs_gpu
def test_gpu_segmentation_matches_cpu():
    sdata, _ = hc.datasets.synthetic_visium(seed=5, preset="tiny", progress=False)
    counts = {}
    for device in ("cpu", "cuda"):
        copy = hc._utils.copy_for_writing(sdata)
        hc.pp.segment_nuclei(copy, device=device, progress=False)
        counts[device] = copy.tables["histocell"].n_obs
    assert abs(counts["cuda"] - counts["cpu"]) <= 0.01 * counts["cpu"]


@needs_gpu
def test_gpu_tangram_matches_cpu(slide):
    sdata, reference = slide
    out = {}
    for device in ("cpu", "cuda"):
        copy = hc.tl.deconvolve(sdata, reference, epochs=50, device=device, progress=False, copy=True)
        out[device] = copy.tables["table"].obsm["proportions"].to_numpy()
    np.testing.assert_allclose(out["cuda"], out["cpu"], atol=0.02)


def test_progress_bar_waits_a_second_before_showing(monkeypatch):
    import io

    monkeypatch.setattr(hc.settings, "progress", True)
    stream = io.StringIO()
    for _ in progress_bar(range(3), file=stream, desc="quick"):
        pass
    assert stream.getvalue() == ""  # work shorter than PROGRESS_DELAY_S prints nothing
    stream = io.StringIO()
    for _ in progress_bar(range(2), file=stream, desc="long", delay=0):
        pass
    assert "long" in stream.getvalue()
