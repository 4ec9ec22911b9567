"""read_visium on a minimal but genuine Space Ranger output folder."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tifffile
from PIL import Image
from spatialdata.transformations import get_transformation

from histocell_sd import InvalidInputError
from histocell_sd.datasets._synthetic_hd import write_10x_h5
from histocell_sd.io import SpotsTableModel, read_visium, validate

N_SPOTS = 20
SPOT_DIAMETER_FULLRES = 18.0
HEIGHT, WIDTH = 200, 240
GENES = [f"Gene{j}" for j in range(7)]


def make_spaceranger_outs(root: Path, *, positions_file: str = "tissue_positions.csv", prefix: str = "",
                          fullres: str | None = "image.tif", rgba: bool = False) -> dict:
    """Write ``root`` as a Space Ranger ``outs`` folder with ``N_SPOTS`` spots on a small image."""
    rng = np.random.default_rng(0)
    (root / "spatial").mkdir(parents=True)
    barcodes = [f"AAACAAGTATCTCCCA-{i}" if i == 0 else f"AC{i:04d}GTTAGCAGT-1" for i in range(N_SPOTS)]
    counts = rng.poisson(2.0, size=(N_SPOTS, len(GENES))).astype(np.int32)
    version = {"library_ids": np.array([b"lib1"]), "chemistry_description": "Spatial 3' v1", "software_version": "spaceranger-2.0.0"}
    write_10x_h5(root / f"{prefix}filtered_feature_bc_matrix.h5", barcodes, counts, GENES, attrs=version)

    rows, cols = np.divmod(np.arange(N_SPOTS), 5)
    x = (30 + cols * 40 + (rows % 2) * 20).astype(int)
    y = (30 + rows * 35).astype(int)
    positions = pd.DataFrame({"barcode": barcodes, "in_tissue": 1, "array_row": rows, "array_col": 2 * cols + rows % 2,
                              "pxl_row_in_fullres": y, "pxl_col_in_fullres": x})
    # spots off the tissue are listed too but absent from the filtered matrix
    positions = pd.concat([positions, pd.DataFrame([{"barcode": "GGGG0000TTTT-1", "in_tissue": 0, "array_row": 9,
                                                     "array_col": 0, "pxl_row_in_fullres": 190, "pxl_col_in_fullres": 5}])])
    if positions_file == "tissue_positions.csv":  # Space Ranger >= 2: header
        positions.to_csv(root / "spatial" / positions_file, index=False)
    else:  # Space Ranger 1: no header
        positions.to_csv(root / "spatial" / positions_file, index=False, header=False)
    scalefactors = {"spot_diameter_fullres": SPOT_DIAMETER_FULLRES, "tissue_hires_scalef": 0.5,
                    "fiducial_diameter_fullres": 1.6 * SPOT_DIAMETER_FULLRES, "tissue_lowres_scalef": 0.25}
    (root / "spatial" / "scalefactors_json.json").write_text(json.dumps(scalefactors))

    image = rng.integers(0, 256, size=(HEIGHT, WIDTH, 3), dtype=np.uint8)
    Image.fromarray(image[::2, ::2]).save(root / "spatial" / "tissue_hires_image.png")
    Image.fromarray(image[::4, ::4]).save(root / "spatial" / "tissue_lowres_image.png")
    if fullres is not None:
        if rgba:
            Image.fromarray(np.dstack([image, np.full(image.shape[:2], 255, np.uint8)])).save(root / fullres)
        else:
            tifffile.imwrite(root / fullres, image)
    return {"image": image, "barcodes": barcodes, "counts": counts, "x": x, "y": y}


@pytest.mark.parametrize("positions_file", ["tissue_positions.csv", "tissue_positions_list.csv"])
def test_read_visium(tmp_path, positions_file):
    outs = tmp_path / "sampleA" / "outs"
    truth = make_spaceranger_outs(outs, positions_file=positions_file)
    sdata = read_visium(outs, fullres_image_file="image.tif")

    assert set(sdata.images) == {"he", "sampleA_hires_image", "sampleA_lowres_image"}
    assert set(sdata.shapes) == {"spots"}
    assert set(sdata.tables) == {"table"}
    SpotsTableModel.validate(sdata.tables["table"])
    circles = sdata.shapes["spots"].loc[sdata.tables["table"].obs_names]
    np.testing.assert_allclose(sdata.tables["table"].obsm["spatial"], np.column_stack([circles.geometry.x, circles.geometry.y]))
    assert sdata.attrs["mpp"] == pytest.approx(55 / SPOT_DIAMETER_FULLRES)
    assert sdata.attrs["sample_id"] == "sampleA"

    he = sdata.images["he"]["scale0"]["image"]
    assert he.dtype == np.uint8 and list(he.coords["c"].values) == ["r", "g", "b"]
    np.testing.assert_array_equal(he.transpose("y", "x", "c").values, truth["image"])
    assert "global" in get_transformation(sdata.images["he"], get_all=True)

    spots = sdata.shapes["spots"]
    assert list(spots.index) == truth["barcodes"]
    np.testing.assert_allclose(spots["radius"], SPOT_DIAMETER_FULLRES / 2)
    np.testing.assert_allclose(spots.geometry.x, truth["x"])
    np.testing.assert_allclose(spots.geometry.y, truth["y"])
    assert "global" in get_transformation(spots, get_all=True)

    table = sdata.tables["table"]
    attrs = table.uns["spatialdata_attrs"]
    assert (attrs["region"], attrs["region_key"], attrs["instance_key"]) == ("spots", "region", "spot_id")
    assert list(table.obs_names) == truth["barcodes"]
    assert list(table.obs["spot_id"]) == truth["barcodes"]
    assert list(table.var_names) == GENES
    np.testing.assert_array_equal(table.X.toarray(), truth["counts"])
    validate(sdata)


def test_read_visium_library_prefix_and_sample_id(tmp_path):
    make_spaceranger_outs(tmp_path / "outs", prefix="lib7_", fullres="he.png", rgba=True)
    with pytest.warns(UserWarning, match="alpha"):
        sdata = read_visium(tmp_path / "outs", fullres_image_file="he.png", sample_id="patient 1")
    assert "lib7_hires_image" in sdata.images and "he" in sdata.images
    assert sdata.images["he"]["scale0"]["image"].sizes["c"] == 3
    assert sdata.attrs["sample_id"] == "patient 1"


def test_a_spatialdata_io_object_is_sent_to_read_visium(tmp_path):
    # own case sdio_no_mpp
    # interop probe: spatialdata_io.visium gives no mpp and no "global" system; the error said "set sdata.attrs['mpp'] =
    # 0.5", after which every reader of the image failed on the missing "global"
    import spatialdata_io

    make_spaceranger_outs(tmp_path)
    sdata = spatialdata_io.visium(tmp_path, dataset_id="lib1")
    with pytest.raises(InvalidInputError, match=r"no 'global' coordinate system \(it has \['lib1'.*hc.io.read_visium"):
        validate(sdata)
    assert "mpp" not in sdata.attrs


def test_read_visium_needs_fullres(tmp_path):
    make_spaceranger_outs(tmp_path, fullres=None)
    with pytest.raises(InvalidInputError, match="fullres_image_file"):
        read_visium(tmp_path)
    with pytest.raises(InvalidInputError, match="nothere.tif"):
        read_visium(tmp_path, fullres_image_file="nothere.tif")


def test_read_visium_missing_files(tmp_path):
    with pytest.raises(InvalidInputError, match="does not exist"):
        read_visium(tmp_path / "nope", fullres_image_file="image.tif")
    make_spaceranger_outs(tmp_path)
    (tmp_path / "spatial" / "scalefactors_json.json").unlink()
    with pytest.raises(InvalidInputError, match="scalefactors_json.json"):
        read_visium(tmp_path, fullres_image_file="image.tif")
    (tmp_path / "spatial" / "tissue_positions.csv").unlink()
    with pytest.raises(InvalidInputError, match="tissue_positions"):
        read_visium(tmp_path, fullres_image_file="image.tif")
    (tmp_path / "filtered_feature_bc_matrix.h5").unlink()
    with pytest.raises(InvalidInputError, match="filtered_feature_bc_matrix.h5"):
        read_visium(tmp_path, fullres_image_file="image.tif")


def test_read_visium_round_trips_through_zarr(tmp_path):
    from histocell_sd.io import read_zarr, write_zarr

    truth = make_spaceranger_outs(tmp_path / "outs")
    sdata = read_visium(tmp_path / "outs", fullres_image_file="image.tif", dataset_id="s1")
    back = read_zarr(write_zarr(sdata, tmp_path / "s1.zarr"))
    validate(back)
    assert back.attrs["mpp"] == pytest.approx(55 / SPOT_DIAMETER_FULLRES) and back.attrs["sample_id"] == "s1"
    assert list(back.shapes["spots"].index) == truth["barcodes"]
    np.testing.assert_array_equal(back.tables["table"].X.toarray(), truth["counts"])


def test_read_visium_barcode_without_position(tmp_path):
    make_spaceranger_outs(tmp_path)
    positions = tmp_path / "spatial" / "tissue_positions.csv"
    pd.read_csv(positions).iloc[1:].to_csv(positions, index=False)
    with pytest.raises(InvalidInputError, match="no position"):
        read_visium(tmp_path, fullres_image_file="image.tif")


@pytest.mark.parametrize("res", ["hires", "lowres"])
def test_read_visium_hires_or_lowres_given_as_fullres(tmp_path, res):
    # cases.md: rv_hires_as_fullres
    make_spaceranger_outs(tmp_path)
    with pytest.raises(InvalidInputError, match=f"looks like Space Ranger's {res} image.*tissue_{res}_scalef.*full-resolution H&E"):
        read_visium(tmp_path, fullres_image_file=f"spatial/tissue_{res}_image.png")
    for png in ("hires", "lowres"):  # without the PNGs to compare with: the spots fit the image once scaled
        (tmp_path / "spatial" / f"tissue_{png}_image.png").rename(tmp_path / f"{png}.png")
    with pytest.raises(InvalidInputError, match="looks like Space Ranger's"):
        read_visium(tmp_path, fullres_image_file=f"{res}.png")
