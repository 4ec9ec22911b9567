"""The command line: ``histocell-sd demo`` end to end on the tiny preset."""

import pytest
import torch

from histocell_sd import cli
from histocell_sd.models import HistoCell


@pytest.mark.slow
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


def _write_png16(path, rgb16):
    """A 16-bit RGB PNG (Pillow cannot write one)."""
    import struct
    import zlib

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    h, w = rgb16.shape[:2]
    rows = b"".join(b"\x00" + row.astype(">u2").tobytes() for row in rgb16)
    header = struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))


def test_image_files_keep_their_values_and_an_empty_segmentation_is_a_one_line_error(tmp_path, capsys):
    # own case cli_gray16_png, cli_12bit_in_16bit_tiff, cli_multipage_tiff_first_page, cli_segment_no_nuclei_keyerror
    import numpy as np
    import tifffile
    from PIL import Image

    from histocell_sd.datasets import read_nucls_tile

    rgb = read_nucls_tile("test_3")[0]
    Image.fromarray((rgb.mean(axis=-1) * 200).astype(np.uint16)).save(tmp_path / "grey16.png")  # became all white
    tifffile.imwrite(tmp_path / "12bit.tif", rgb.astype(np.uint16) * 16)  # Pillow kept the high byte: nearly black
    for name, words in (("grey16.png", "grayscale"), ("12bit.tif", "must be uint8 (0-255), got uint16")):
        out = tmp_path / f"{name}.zarr"
        assert cli.main(["import", str(out), "--image", str(tmp_path / name), "--mpp", "0.25"]) == 2
        _one_line_error(capsys, "histocell-sd import: error:", words)
        assert not out.exists()
    with tifffile.TiffWriter(tmp_path / "pages.tif") as tif:  # a thumbnail first, then the image
        tif.write(rgb[::4, ::4])
        tif.write(np.moveaxis(rgb, -1, 0), photometric="rgb", planarconfig="separate")  # colour planes
    assert cli.main(["import", str(tmp_path / "pages.zarr"), "--image", str(tmp_path / "pages.tif"), "--mpp", "0.25"]) == 0
    assert "(256, 256) px" in capsys.readouterr().out
    from histocell_sd.io import get_image, read_zarr

    np.testing.assert_array_equal(np.asarray(get_image(read_zarr(tmp_path / "pages.zarr"))), np.moveaxis(rgb, -1, 0))
    _write_png16(tmp_path / "rgb16.png", rgb.astype(np.uint16) * 16)  # 12-bit data, as a scanner export may hold
    assert cli.main(["import", str(tmp_path / "rgb16.zarr"), "--image", str(tmp_path / "rgb16.png"), "--mpp", "0.25"]) == 2
    _one_line_error(capsys, "histocell-sd import: error:", "16 bits per colour channel")
    blank = _store(tmp_path / "blank.zarr")
    assert cli.main(["segment", str(blank)]) == 2  # was KeyError: 'histocell'
    _one_line_error(capsys, "histocell-sd segment: error:", "No nuclei found in the image of", "nothing was written")


# ---------------------------------------------------------------------------- the pipeline end to end
def test_every_option_has_help_and_version_prints(capsys):
    import argparse

    import pytest

    parser = cli.build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    missing = [f"{name} {a.option_strings or a.dest}" for name, p in {"": parser, **commands}.items()
               for a in p._actions if not isinstance(a, (argparse._HelpAction, argparse._SubParsersAction)) and not a.help]
    assert missing == []
    assert set(commands) == {"import", "segment", "deconvolve", "train", "predict", "refine", "export", "demo"}
    # a command's default is the Python function's: the shell and the notebook give the same result
    import inspect

    import histocell_sd as hc

    deconvolve = inspect.signature(hc.tl.deconvolve).parameters
    parsed = parser.parse_args(["deconvolve", "s.zarr", "--reference", "r.h5ad"])
    assert parsed.method == deconvolve["method"].default and parsed.cell_type_key == deconvolve["cell_type_key"].default
    with pytest.raises(SystemExit) as exit_:
        cli.main(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out.startswith("histocell-sd ")


@pytest.mark.slow
def test_pipeline_from_an_image_and_spots_csv(tmp_path, capsys):
    # own case cli_inplace_replaces
    """import (image + spots CSV + counts + µm/px) -> segment -> deconvolve -> train -> predict -> refine -> export."""
    import json

    import numpy as np
    import pandas as pd
    from PIL import Image

    import histocell_sd as hc

    sdata, reference = hc.datasets.synthetic_visium(seed=3, preset="tiny", progress=False)
    Image.fromarray(np.asarray(hc.io.get_image(sdata).data).transpose(1, 2, 0)).save(tmp_path / "he.png")
    spots = sdata.shapes["spots"]
    pd.DataFrame({"x": spots.geometry.x, "y": spots.geometry.y}, index=spots.index).to_csv(tmp_path / "spots.csv")
    counts = sdata.tables["table"].copy()
    counts.obs = counts.obs[[]]
    counts.uns, counts.obsm = {}, {}
    counts.write_h5ad(tmp_path / "counts.h5ad")
    reference.write_h5ad(tmp_path / "reference.h5ad")
    store, model = tmp_path / "s.zarr", tmp_path / "model"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        steps = [
            ["import", str(store), "--image", str(tmp_path / "he.png"), "--mpp", str(sdata.attrs["mpp"]), "--spots", str(tmp_path / "spots.csv"),
             "--counts", str(tmp_path / "counts.h5ad")],
            ["segment", str(store), "--n-jobs", "1", "--quiet"],  # --quiet after the sub-command too
            ["deconvolve", str(store), "--reference", str(tmp_path / "reference.h5ad")],
            ["train", str(store), "--out", str(model), "--epochs", "1"],
            ["predict", str(store), "--model", str(model)],
            ["refine", str(store), "--reference", str(tmp_path / "reference.h5ad")],
            ["export", str(store), "--out", str(tmp_path / "nuclei.geojson")],
            ["export", str(store), "--out", str(tmp_path / "nuclei.csv")],
        ]
        for step in steps:
            assert cli.main(["--quiet", *step]) == 0, capsys.readouterr().err
    finally:
        torch.set_num_threads(threads)
    back = hc.io.read_zarr(store)
    assert {"proportions", "refined_proportions"} <= set(back.tables["table"].obsm)
    assert "cell_type" in back.tables["histocell"].obs and "histocell_expression" in back.tables
    features = json.loads((tmp_path / "nuclei.geojson").read_text())["features"]
    assert len(features) == back.tables["histocell"].n_obs and "classification" in features[0]["properties"]
    assert len(pd.read_csv(tmp_path / "nuclei.csv")) == back.tables["histocell"].n_obs
    # nothing is overwritten without --overwrite
    assert cli.main(["import", str(store), "--image", str(tmp_path / "he.png"), "--mpp", "0.5"]) == 2
    _one_line_error(capsys, "already exists", "--overwrite")
    # probe: deconvolve, predict and refine in place replaced what the store had (e.g. imported proportions), exit 0
    for step, what in ((["deconvolve", str(store), "--reference", str(tmp_path / "reference.h5ad")], "spot proportions"),
                       (["predict", str(store), "--model", str(model)], "predictions"), (["refine", str(store)], "refined proportions")):
        assert cli.main(step) == 2
        _one_line_error(capsys, f"already has {what}", "--overwrite", "--out")
    after = hc.io.read_zarr(store)
    assert after.tables["table"].obsm["proportions"].equals(back.tables["table"].obsm["proportions"])
    assert after.tables["table"].obsm["refined_proportions"].equals(back.tables["table"].obsm["refined_proportions"])
    assert (after.tables["histocell"].obs["cell_type"] == back.tables["histocell"].obs["cell_type"]).all()
    assert cli.main(["--quiet", "predict", str(store), "--model", str(model), "--overwrite"]) == 0
    assert cli.main(["--quiet", "refine", str(store), "--out", str(tmp_path / "refined.zarr")]) == 0  # a new store: allowed
    assert "refined_proportions" in hc.io.read_zarr(tmp_path / "refined.zarr").tables["table"].obsm
    assert cli.main(["export", str(store), "--out", str(tmp_path / "nuclei.csv")]) == 2
    _one_line_error(capsys, "already exists")


def test_predict_with_a_shipped_model_and_import_errors(tmp_path, capsys):
    import numpy as np

    import histocell_sd as hc

    sdata, _ = hc.datasets.synthetic_visium(seed=3, preset="tiny", progress=False)
    hc.pp.store_nuclei(sdata, np.asarray(sdata.labels["truth_labels"]))
    store = hc.io.write_zarr(sdata, tmp_path / "s.zarr")
    assert cli.main(["predict", str(store), "--model", "tumor_stromal_lymphocyte", "--quiet", "--device", "cpu"]) == 0
    assert "tumor" in capsys.readouterr().out
    # --model given twice: one ensemble (the same model twice agrees with itself); the store may follow the option
    both = tmp_path / "ensemble.zarr"
    assert cli.main(["predict", "--model", "tumor_stromal_lymphocyte", "--model", "tumor_stromal_lymphocyte", str(store), "--quiet", "--out", str(both)]) == 0
    single, ensemble = hc.io.read_zarr(store).tables["histocell"], hc.io.read_zarr(both).tables["histocell"]
    assert ensemble.uns["histocell"]["ensemble_size"] == 2 and "cell_type_ensemble_std" not in single.obs
    assert (ensemble.obs["cell_type"] == single.obs["cell_type"]).all() and np.allclose(ensemble.obs["cell_type_ensemble_std"], 0, atol=1e-6)
    capsys.readouterr()
    # own case cli_segment_wipes: segmenting a predicted store in place replaced its nuclei and predictions, exit 0
    assert cli.main(["segment", str(store), "--quiet"]) == 2
    _one_line_error(capsys, "already has", "nuclei with predictions", "--overwrite")
    assert "cell_type" in hc.io.read_zarr(store).tables["histocell"].obs
    assert cli.main(["import", str(tmp_path / "x.zarr"), "--image", str(tmp_path / "missing.png"), "--mpp", "0.5"]) == 2
    _one_line_error(capsys, "does not exist")
    assert cli.main(["import", str(tmp_path / "x.zarr"), "--visium", str(tmp_path / "outs"), "--image", str(tmp_path / "he.png")]) == 2
    _one_line_error(capsys, "either --visium")
    assert cli.main(["import", str(tmp_path / "outs" / "x.zarr"), "--visium", str(tmp_path / "outs")]) == 2
    _one_line_error(capsys, "lies inside the input")
    assert cli.main(["predict", str(store), "--model", "tumor_stromal_lymphocyte", "--device", "tpu"]) == 2
    _one_line_error(capsys, "device must be")
    # own case cli_model_not_found: a relative folder that does not exist was reported as an unknown shipped model
    assert cli.main(["predict", str(store), "--model", "./mymodel/"]) == 2
    _one_line_error(capsys, "No checkpoint folder at mymodel. Nor is 'mymodel' a shipped model (tumor_stromal_lymphocyte)")
    (tmp_path / "afile").write_text("x")
    assert cli.main(["predict", str(store), "--model", str(tmp_path / "afile")]) == 2
    _one_line_error(capsys, "is a file; a checkpoint is the folder")


def test_import_a_space_ranger_folder(tmp_path, capsys, monkeypatch):
    from test_visium import make_spaceranger_outs

    import histocell_sd as hc

    outs = tmp_path / "sampleA" / "outs"
    make_spaceranger_outs(outs)
    store = tmp_path / "a.zarr"
    assert cli.main(["import", str(store), "--visium", str(outs), "--fullres-image", str(outs / "image.tif")]) == 0
    assert "spots" in capsys.readouterr().out
    back = hc.io.read_zarr(store)
    hc.io.validate(back)
    assert back.tables["table"].n_obs > 0 and "spatial_um" in back.tables["table"].obsm
    # own case cli_messages: the positional store was called "--out"; a relative --fullres-image was looked up only
    # inside the Space Ranger folder; predict on an unsegmented store pointed to hc.pp.segment_nuclei
    assert cli.main(["import", str(store), "--visium", str(outs), "--fullres-image", "image.tif"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{store} already exists; pass --overwrite" in err and "--out" not in err, err
    monkeypatch.chdir(tmp_path)
    assert cli.main(["import", "b.zarr", "--visium", str(outs), "--fullres-image", "sampleA/outs/image.tif", "--quiet"]) == 0  # from here
    assert cli.main(["import", "c.zarr", "--visium", str(outs), "--fullres-image", "image.tif", "--quiet"]) == 0  # inside the folder
    assert cli.main(["predict", "b.zarr", "--model", "tumor_stromal_lymphocyte"]) == 2
    _one_line_error(capsys, "b.zarr has no nuclei; run `histocell-sd segment b.zarr` first")


def test_import_a_visium_hd_folder(tmp_path, capsys):
    import histocell_sd as hc

    outs, _, _ = hc.datasets.synthetic_visium_hd(tmp_path / "hd" / "outs", seed=1, width_um=120, height_um=120, bin_sizes_um=(2, 8, 16), progress=False)
    bins = {}
    for size in (8, 16):
        store = tmp_path / f"hd{size}.zarr"
        assert cli.main(["import", str(store), "--visium-hd", str(outs), "--bin-size-um", str(size), "--sample-id", "hd"]) == 0
        assert "spots" in capsys.readouterr().out
        back = hc.io.read_zarr(store)
        hc.io.validate(back)
        assert back.attrs["bin_size_um"] == size and back.attrs["sample_id"] == "hd"
        bins[size] = back.tables["table"].n_obs
    assert bins[8] > 3 * bins[16] > 0  # a 16 µm bin holds four 8 µm bins
    assert cli.main(["import", str(tmp_path / "x.zarr"), "--visium-hd", str(outs), "--visium", str(outs)]) == 2
    _one_line_error(capsys, "either --visium", "--visium-hd")
    assert cli.main(["import", str(tmp_path / "x.zarr"), "--visium-hd", str(outs), "--mpp", "0.5"]) == 2
    _one_line_error(capsys, "either --visium", "--mpp")
    assert cli.main(["import", str(tmp_path / "x.zarr"), "--visium-hd", str(outs), "--bin-size-um", "4"]) == 2
    _one_line_error(capsys, "no 4 µm bins")
    assert not (tmp_path / "x.zarr").exists()
