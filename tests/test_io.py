"""The I/O contract: every bad input is refused with a clear InvalidInputError and nothing is written."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import spatialdata
from spatialdata.transformations import Identity, get_transformation, set_transformation

from histocell_sd import InvalidInputError
from histocell_sd.io import check_proportions, from_arrays, read_proportions, read_zarr, validate, write_zarr

SIZE = 64
MPP = 0.5
BARCODES = ["AAAC-1", "AAAG-1", "AACT-1", "AAGC-1", "ACGT-1"]
CELL_TYPES = ["T cell", "B cell", "Epithelial"]


@pytest.fixture
def image():
    return np.random.default_rng(0).integers(0, 256, size=(SIZE, SIZE, 3), dtype=np.uint8)


@pytest.fixture
def centers():
    return pd.DataFrame({"x": [10.0, 30.0, 50.0, 20.0, 40.5], "y": [10.0, 20.0, 40.0, 50.0, 60.25]}, index=BARCODES)


@pytest.fixture
def counts():
    rng = np.random.default_rng(1)
    return pd.DataFrame(rng.poisson(3, size=(len(BARCODES), 6)), index=BARCODES, columns=[f"Gene{i}" for i in range(6)])


@pytest.fixture
def proportions():
    rng = np.random.default_rng(2)
    return pd.DataFrame(rng.dirichlet(np.ones(len(CELL_TYPES)), len(BARCODES)), index=BARCODES, columns=CELL_TYPES)


@pytest.fixture
def sdata(image, centers, counts, proportions):
    return from_arrays(image, MPP, spot_centers=centers, counts=counts, proportions=proportions, sample_id="s1")


def _pixels(sdata) -> np.ndarray:
    image = sdata.images["he"]
    image = image["scale0"]["image"] if "scale0" in getattr(image, "children", {}) else image
    return np.asarray(image.transpose("y", "x", "c").values)


# --------------------------------------------------------------------------- image


@pytest.mark.parametrize("shape", [(2, SIZE, SIZE, 3), (SIZE,)])
def test_image_wrong_dims(shape, centers):
    with pytest.raises(InvalidInputError, match="dimensions"):
        from_arrays(np.zeros(shape, dtype=np.uint8), MPP, spot_centers=centers)


@pytest.mark.parametrize(("dtype", "top", "hint"), [(np.float32, 1.0, r"\(image \* 255\)"), (np.float32, 255.0, r"np.clip\(image, 0, 255\)"),
                                                  (np.uint16, 4000, "rescale its range")])
def test_image_wrong_dtype(dtype, top, hint, centers):
    # own case uint8_hint: a uint16 or 0-255 float image was told to multiply by 255
    with pytest.raises(InvalidInputError, match=f"must be uint8.*{hint}"):
        from_arrays(np.full((SIZE, SIZE, 3), top, dtype=dtype), MPP, spot_centers=centers)


def test_image_grayscale(centers):
    with pytest.raises(InvalidInputError, match="grayscale"):
        from_arrays(np.zeros((SIZE, SIZE), dtype=np.uint8), MPP, spot_centers=centers)


def test_image_channel_first(image, centers):
    with pytest.raises(InvalidInputError, match="channel-first"):
        from_arrays(image.transpose(2, 0, 1), MPP, spot_centers=centers)


def test_image_rgba_converted_with_warning(image, centers):
    rgba = np.dstack([image, np.full((SIZE, SIZE), 255, dtype=np.uint8)])
    with pytest.warns(UserWarning, match="RGBA"):
        sdata = from_arrays(rgba, MPP, spot_centers=centers)
    np.testing.assert_array_equal(_pixels(sdata), image)
    validate(sdata)


# --------------------------------------------------------------------------- mpp


def test_an_image_off_the_origin_is_refused_by_everything_that_reads_its_pixels(image):
    # own case image_offset: a bounding_box_query crop (Translation) or a Scale(2) copy was segmented in its own pixels,
    # so the nuclei sat off the H&E (no spot_id, empty overlays, shifted exports) and io.validate passed
    from spatialdata.transformations import Scale

    import histocell_sd as hc

    sample = from_arrays(image, MPP)
    crop = sample.query.bounding_box(min_coordinate=[10, 20], max_coordinate=[50, 60], axes=("x", "y"), target_coordinate_system="global")
    scaled = from_arrays(image, MPP)
    set_transformation(scaled.images["he"], Scale([2.0, 2.0], axes=("x", "y")), to_coordinate_system="global")
    for bad, where in ((crop, "offset 10, 20; scale 1, 1"), (scaled, "offset 0, 0; scale 2, 2")):
        for call in (lambda s: validate(s), lambda s: hc.pp.segment_nuclei(s, method="classical"),
                     lambda s: hc.pp.store_nuclei(s, np.ones((4, 4), dtype=np.int32))):
            with pytest.raises(InvalidInputError, match=f"Image 'he' is placed in 'global' with an offset or scale \\(x, y {where}\\)"):
                call(bad)
        assert "histocell" not in bad.tables
    validate(sample)  # the image at the origin


def test_mpp_missing(image, centers):
    with pytest.raises(InvalidInputError, match="mpp"):
        from_arrays(image, None, spot_centers=centers)


@pytest.mark.parametrize("mpp", [0, -1, float("nan")])
def test_mpp_not_positive(image, centers, mpp):
    with pytest.raises(InvalidInputError, match="positive"):
        from_arrays(image, mpp, spot_centers=centers)


# --------------------------------------------------------------------------- spots, counts


def test_spot_centers_outside_image(image, centers):
    centers.loc["ACGT-1", "x"] = SIZE + 3.0
    with pytest.raises(InvalidInputError, match="outside"):
        from_arrays(image, MPP, spot_centers=centers)


def test_spot_centers_duplicate_barcodes(image, centers):
    centers.index = BARCODES[:-1] + [BARCODES[0]]
    with pytest.raises(InvalidInputError, match="duplicated"):
        from_arrays(image, MPP, spot_centers=centers)


def test_counts_index_does_not_match_spots(image, centers, counts):
    counts.index = BARCODES[:-1] + ["TTTT-1"]
    with pytest.raises(InvalidInputError, match="unknown spots"):
        from_arrays(image, MPP, spot_centers=centers, counts=counts)


def test_counts_missing_spots(image, centers, counts):
    with pytest.raises(InvalidInputError, match="no row"):
        from_arrays(image, MPP, spot_centers=centers, counts=counts.iloc[:-1])


def test_counts_rows_follow_spots_order(image, centers, counts):
    sdata = from_arrays(image, MPP, spot_centers=centers, counts=counts.iloc[::-1])
    table = sdata.tables["table"]
    assert list(table.obs_names) == BARCODES
    np.testing.assert_array_equal(table.X.toarray(), counts.to_numpy())


# --------------------------------------------------------------------------- proportions


def test_proportions_index_does_not_match_spots(image, centers, proportions):
    proportions.index = ["x" + b for b in BARCODES]
    with pytest.raises(InvalidInputError, match="unknown spots"):
        from_arrays(image, MPP, spot_centers=centers, proportions=proportions)


def test_proportions_nan(proportions):
    proportions.iloc[1, 0] = np.nan
    with pytest.raises(InvalidInputError, match="NaN"):
        check_proportions(proportions)


def test_proportions_negative(proportions):
    proportions.iloc[2, 1] = -0.1
    with pytest.raises(InvalidInputError, match="negative"):
        check_proportions(proportions)


def test_proportions_all_zero_row(proportions):
    proportions.iloc[3] = 0.0
    with pytest.raises(InvalidInputError, match="all zero"):
        check_proportions(proportions)


def test_proportions_renormalised_with_warning(image, centers, proportions):
    scaled = proportions * 7.0
    with pytest.warns(UserWarning, match="renormalised"):
        sdata = from_arrays(image, MPP, spot_centers=centers, proportions=scaled)
    stored = sdata.tables["table"].obsm["proportions"]
    np.testing.assert_allclose(stored.sum(axis=1), 1.0)
    np.testing.assert_allclose(stored.to_numpy(), proportions.to_numpy())


def test_proportions_that_sum_to_one_do_not_warn(proportions):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_proportions(proportions)


def test_proportions_unknown_cell_types(proportions):
    with pytest.raises(InvalidInputError, match="unknown cell types"):
        check_proportions(proportions, cell_types=["T cell", "B cell"])
    check_proportions(proportions, cell_types=CELL_TYPES + ["Fibroblast"])


def test_proportions_duplicate_barcodes(image, centers, proportions):
    proportions.index = BARCODES[:-1] + [BARCODES[0]]
    with pytest.raises(InvalidInputError, match="duplicate"):
        check_proportions(proportions)
    with pytest.raises(InvalidInputError, match="duplicate"):
        from_arrays(image, MPP, spot_centers=centers, proportions=proportions)


# --------------------------------------------------------------------------- write_zarr / read_zarr


def test_write_existing_path_refused_and_untouched(sdata, tmp_path):
    path = write_zarr(sdata, tmp_path / "sample.zarr")
    before = sorted((p.relative_to(path), p.stat().st_mtime_ns) for p in path.rglob("*"))
    other = from_arrays(np.zeros((SIZE, SIZE, 3), dtype=np.uint8), 2.0)
    with pytest.raises(InvalidInputError, match="already exists"):
        write_zarr(other, path)
    assert sorted((p.relative_to(path), p.stat().st_mtime_ns) for p in path.rglob("*")) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sample.zarr"]
    assert read_zarr(path).attrs["mpp"] == MPP


def test_write_overwrite_replaces(sdata, tmp_path):
    path = write_zarr(sdata, tmp_path / "sample.zarr")
    other = from_arrays(np.zeros((SIZE, SIZE, 3), dtype=np.uint8), 2.0, sample_id="other")
    write_zarr(other, path, overwrite=True)
    back = read_zarr(path)
    assert back.attrs == {"mpp": 2.0, "sample_id": "other"}
    assert set(back.shapes) == set() and set(back.tables) == set()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sample.zarr"]


def test_write_stores_uns_tuples_as_lists(sdata, tmp_path):
    # own case uns_tuple_write
    # own case: squidpy's spatial_neighbors(radius=(0, r)) records a tuple in uns, which anndata cannot write
    import squidpy as sq

    table = sdata.tables["table"]
    sq.gr.spatial_neighbors(table, radius=(0, 30), coord_type="generic")
    table.uns["nested"] = {"pairs": ((1, 2), (3, 4)), "array": np.arange(3)}
    uns = table.uns
    path = write_zarr(sdata, tmp_path / "sample.zarr")
    assert table.uns is uns and table.uns["spatial_neighbors"]["params"]["radius"] == (0, 30)
    assert table.uns["nested"]["pairs"] == ((1, 2), (3, 4))
    back = read_zarr(path).tables["table"].uns
    assert list(back["spatial_neighbors"]["params"]["radius"]) == [0, 30]
    assert np.asarray(back["nested"]["pairs"]).tolist() == [[1, 2], [3, 4]] and back["nested"]["array"].tolist() == [0, 1, 2]


def test_write_unstorable_uns_named_and_nothing_written(sdata, tmp_path):
    # own case uns_tuple_write
    uns = sdata.tables["table"].uns
    uns["ragged"], uns["pair"] = [1, [2, 3]], (0, 30)
    with pytest.raises(InvalidInputError, match="ragged"):
        write_zarr(sdata, tmp_path / "sample.zarr")
    assert list(tmp_path.iterdir()) == []
    assert sdata.tables["table"].uns is uns and uns["pair"] == (0, 30)  # the tuple is back after the failed write


@pytest.mark.parametrize("existing", [False, True])
def test_write_failure_leaves_nothing_behind(sdata, tmp_path, monkeypatch, existing):
    # cases.md: kill_write_zarr_new, kill_write_zarr_overwrite (a failure that runs the clean-up)
    path = tmp_path / "sample.zarr"
    if existing:
        write_zarr(sdata, path)
    real_write = spatialdata.SpatialData.write

    def half_write(self, file_path, *args, **kwargs):
        real_write(self, file_path, *args, **kwargs)  # a complete temporary store ...
        raise OSError("disk full")  # ... then the failure

    monkeypatch.setattr(spatialdata.SpatialData, "write", half_write)
    other = from_arrays(np.zeros((SIZE, SIZE, 3), dtype=np.uint8), 2.0)
    with pytest.raises(OSError, match="disk full"):
        write_zarr(other, path, overwrite=True)
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == (["sample.zarr"] if existing else [])
    if existing:
        back = read_zarr(path)
        assert back.attrs["mpp"] == MPP
        np.testing.assert_array_equal(_pixels(back), _pixels(sdata))


def test_write_failure_while_swapping_restores_old_store(sdata, tmp_path, monkeypatch):
    import os

    path = write_zarr(sdata, tmp_path / "sample.zarr")
    real_rename = os.rename

    def failing_rename(source, target):
        if Path(target) == path and Path(source).name.startswith(".sample.zarr.tmp-"):
            raise OSError("rename failed")
        return real_rename(source, target)

    monkeypatch.setattr(os, "rename", failing_rename)
    with pytest.raises(OSError, match="rename failed"):
        write_zarr(from_arrays(np.zeros((SIZE, SIZE, 3), dtype=np.uint8), 2.0), path, overwrite=True)
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sample.zarr"]
    assert read_zarr(path).attrs["mpp"] == MPP


def test_overwrite_refuses_a_plain_file(sdata, tmp_path):
    # a store replaces only a folder (own case write_kind_mismatch): a file of that name is left as it is
    (tmp_path / "sample.zarr").write_text("not a store")
    with pytest.raises(InvalidInputError, match="is a file; overwrite=True replaces it only by another file"):
        write_zarr(sdata, tmp_path / "sample.zarr", overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sample.zarr"]
    assert (tmp_path / "sample.zarr").read_text() == "not a store"


def test_write_without_mpp_refused(sdata, tmp_path):
    del sdata.attrs["mpp"]
    with pytest.raises(InvalidInputError, match="mpp"):
        write_zarr(sdata, tmp_path / "sample.zarr")
    assert list(tmp_path.iterdir()) == []


def test_read_zarr_missing(tmp_path):
    with pytest.raises(InvalidInputError, match="No zarr store"):
        read_zarr(tmp_path / "nothing.zarr")
    (tmp_path / "folder").mkdir()
    with pytest.raises(InvalidInputError, match="not a readable"):
        read_zarr(tmp_path / "folder")


def test_round_trip(sdata, image, centers, counts, proportions, tmp_path):
    validate(sdata)
    back = read_zarr(write_zarr(sdata, tmp_path / "sample.zarr"))
    validate(back)
    assert back.attrs == {"mpp": MPP, "sample_id": "s1"}
    np.testing.assert_array_equal(_pixels(back), image)
    spots = back.shapes["spots"]
    assert list(spots.index.astype(str)) == BARCODES
    np.testing.assert_allclose(spots.geometry.x, centers["x"])
    np.testing.assert_allclose(spots.geometry.y, centers["y"])
    np.testing.assert_allclose(spots["radius"], 55 / 2 / MPP)
    table = back.tables["table"]
    assert list(table.obs_names) == BARCODES and list(table.var_names) == list(counts.columns)
    np.testing.assert_array_equal(table.X.toarray(), counts.to_numpy())
    pd.testing.assert_frame_equal(table.obsm["proportions"], proportions, check_names=False)
    assert "global" in get_transformation(back.images["he"], get_all=True)


# --------------------------------------------------------------------------- validate


def test_validate_missing_mpp(sdata):
    del sdata.attrs["mpp"]
    with pytest.raises(InvalidInputError, match="mpp"):
        validate(sdata)


@pytest.mark.parametrize("element", ["he", "spots"])
def test_validate_element_not_in_global(sdata, element):
    set_transformation(sdata[element], {"aligned": Identity()}, set_all=True)
    with pytest.raises(InvalidInputError, match="global"):
        validate(sdata)


def test_validate_stored_proportions_not_summing_to_one(sdata):
    sdata.tables["table"].obsm["proportions"] = sdata.tables["table"].obsm["proportions"] * 2
    with pytest.raises(InvalidInputError, match="sum to 1"):
        validate(sdata)


# --------------------------------------------------------------------------- read_proportions


def test_read_proportions_cell2location_csv(sdata, proportions, tmp_path):
    abundances = proportions.iloc[::-1] * np.array([[3.0], [5.0], [8.0], [2.0], [9.0]])
    abundances.columns = CELL_TYPES
    abundances.index.name = "spot_id"
    file = tmp_path / "cell2location.csv"
    abundances.to_csv(file)
    with pytest.warns(UserWarning, match="renormalised"):
        result = read_proportions(file, sdata, key_added="c2l")
    assert list(result.index) == BARCODES
    stored = sdata.tables["table"].obsm["c2l"]
    np.testing.assert_allclose(stored.to_numpy(), proportions.to_numpy())
    np.testing.assert_allclose(stored.sum(axis=1), 1.0)


def test_read_proportions_upstream_histocell_tsv(sdata, centers, proportions, tmp_path):
    upstream = proportions.copy()
    upstream.index = [f"{x:g}_{y:g}_{b}" for b, (x, y) in centers.loc[BARCODES, ["x", "y"]].iterrows()]
    file = tmp_path / "proportions.tsv"
    upstream.iloc[[2, 0, 4, 1, 3]].to_csv(file, sep="\t")
    result = read_proportions(file, sdata)
    assert list(result.index) == BARCODES
    pd.testing.assert_frame_equal(sdata.tables["table"].obsm["proportions"], proportions, check_names=False)


def test_read_proportions_unknown_barcode(sdata, proportions, tmp_path):
    before = sdata.tables["table"].obsm["proportions"].copy()
    proportions.index = BARCODES[:-1] + ["TTTT-1"]
    file = tmp_path / "proportions.csv"
    proportions.to_csv(file)
    with pytest.raises(InvalidInputError, match="unknown spots"):
        read_proportions(file, sdata)
    pd.testing.assert_frame_equal(sdata.tables["table"].obsm["proportions"], before)
    assert "c2l" not in sdata.tables["table"].obsm


# --------------------------------------------------------------------------- bad inputs refused with a clear message


@pytest.mark.parametrize("mpp", [1e6, 1e-4, 100.0])
def test_mpp_outside_plausible_range(image, centers, mpp):
    # cases.md: fa_mpp_huge
    with pytest.raises(InvalidInputError, match="plausible range"):
        from_arrays(image, mpp, spot_centers=centers)


@pytest.mark.parametrize("mpp", [True, np.bool_(True), "0.5"])
def test_mpp_bool_or_string_refused(image, centers, mpp):
    # cases.md: fa_mpp_bool
    with pytest.raises(InvalidInputError, match="must be a positive number"):
        from_arrays(image, mpp, spot_centers=centers)


def test_spot_diameter_string_refused(image, centers):
    # cases.md: fa_spot_diam_str
    with pytest.raises(InvalidInputError, match="spot_diameter_um must be a number"):
        from_arrays(image, MPP, spot_centers=centers, spot_diameter_um="55")


def test_counts_negative_refused(image, centers, counts):
    # cases.md: fa_counts_float_neg
    with pytest.raises(InvalidInputError, match="negative"):
        from_arrays(image, MPP, spot_centers=centers, counts=counts.astype(float) - 0.5)


def test_counts_string_column_named(image, centers, counts):
    # cases.md: fa_counts_strings
    with pytest.raises(InvalidInputError, match=r"non-numeric columns \['Gene2'\]"):
        from_arrays(image, MPP, spot_centers=centers, counts=counts.assign(Gene2=list("abcde")))


def test_counts_duplicate_genes_named(image, centers, counts):
    # cases.md: fa_counts_dup_genes
    counts.columns = ["Gene0", "Gene1", "Gene1", "Gene3", "Gene4", "Gene4"]
    with pytest.raises(InvalidInputError, match=r"duplicated gene names.*\['Gene1', 'Gene4'\]"):
        from_arrays(image, MPP, spot_centers=centers, counts=counts)


def test_counts_nan_refused(image, centers, counts):
    # cases.md: fa_counts_nan
    counts = counts.astype(float)
    counts.iloc[2, 3] = np.nan
    with pytest.raises(InvalidInputError, match="NaN"):
        from_arrays(image, MPP, spot_centers=centers, counts=counts)


def test_spot_centers_non_numeric_strings(image, centers):
    # cases.md: fa_spots_nonnumeric_str
    centers["x"] = centers["x"].astype(object)
    centers.iloc[1, 0] = "left"
    with pytest.raises(InvalidInputError, match="spot_centers column 'x'.*'left'"):
        from_arrays(image, MPP, spot_centers=centers)


def test_read_proportions_spot_without_values(sdata, proportions, tmp_path):
    # cases.md: rp_missing_col
    file = tmp_path / "proportions.csv"
    proportions.to_csv(file)
    file.write_text(file.read_text().replace(f"{BARCODES[-1]},", f"{BARCODES[-1]}\n#").split("\n#")[0] + "\n")
    before = sdata.tables["table"].obsm["proportions"].copy()
    with pytest.raises(InvalidInputError, match="no values for 1 spots.*ACGT-1.*missing from the table"):
        read_proportions(file, sdata, key_added="new")
    (tmp_path / "index_only.csv").write_text("spot\n" + "\n".join(BARCODES) + "\n")
    with pytest.raises(InvalidInputError, match="no cell-type columns"):
        read_proportions(tmp_path / "index_only.csv", sdata, key_added="new")
    assert "new" not in sdata.tables["table"].obsm
    pd.testing.assert_frame_equal(sdata.tables["table"].obsm["proportions"], before)


def test_read_proportions_empty_file(sdata, tmp_path):
    # cases.md: rp_empty_file
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(InvalidInputError, match="is empty"):
        read_proportions(tmp_path / "empty.csv", sdata, key_added="new")
    assert "new" not in sdata.tables["table"].obsm


def test_read_proportions_coordinate_columns_need_drop_columns(sdata, centers, proportions, tmp_path):
    # cases.md: rp_coords_cols
    file = tmp_path / "rctd.csv"
    proportions.join(centers).to_csv(file)
    with pytest.raises(InvalidInputError, match=r"\['x', 'y'\] that look like spot coordinates.*drop_columns"):
        read_proportions(file, sdata, key_added="new")
    assert "new" not in sdata.tables["table"].obsm
    result = read_proportions(file, sdata, key_added="new", drop_columns=["x", "y"])
    assert list(result.columns) == CELL_TYPES


@pytest.mark.filterwarnings("ignore:SpatialData is not stored in the most current format")
@pytest.mark.parametrize("zarr_format", [3, 2])
def test_read_zarr_refuses_a_deleted_image_chunk(tmp_path, zarr_format):
    # cases.md: rz_chunk_deleted
    pixels = np.full((1100, 1100, 3), 200, dtype=np.uint8)  # 2 × 2 chunks at full resolution, with a pyramid
    pixels[:1024, :1024] = 0  # an all-zero chunk that zarr legitimately does not write
    sdata = from_arrays(pixels, MPP)
    path = tmp_path / "sample.zarr"
    if zarr_format == 3:
        write_zarr(sdata, path)
    else:
        fmt = pytest.importorskip("spatialdata._io.format")
        sdata.write(path, sdata_formats=[fmt.RasterFormatV02(), fmt.SpatialDataContainerFormatV01()])
    np.testing.assert_array_equal(_pixels(read_zarr(path)), pixels)  # complete store, omitted empty chunk: fine
    s0 = path / "images" / "he" / "s0"
    chunk = next(p for p in (s0 / "c" / "0" / "1" / "1", s0 / "0" / "1" / "1") if p.is_file())
    chunk.unlink()
    with pytest.raises(InvalidInputError, match=r"Image 'he' .* missing 1 chunk files \(1 of 4 at scale0"):
        read_zarr(path)


# --------------------------------------------------------------------------- kill -9 during write_zarr (cases.md kill_*)
class _Killed(BaseException):
    """Stands for SIGKILL: nothing after it runs (the writer's clean-up is made to fail too)."""


def _kill_after_first_rename(monkeypatch):
    """Fault injection: every rename after the first one (path -> .old) dies, as a kill between the two would."""
    import os

    real_rename, calls = os.rename, []

    def rename(source, target):
        calls.append((source, target))
        if len(calls) > 1:
            raise _Killed
        return real_rename(source, target)

    monkeypatch.setattr(os, "rename", rename)


def _dead_pid() -> int:
    import os

    pid = 2**22 + 4321
    while True:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return pid
        except PermissionError:
            pass
        pid += 1


@pytest.mark.parametrize("existing", [False, True])
def test_debris_of_a_killed_write_is_removed_by_the_next_write(sdata, tmp_path, existing):
    # cases.md: kill_write_zarr_overwrite (existing store), kill_write_zarr_new (new path)
    path = tmp_path / "s.zarr"
    if existing:
        write_zarr(sdata, path)
    for k in range(3):  # what three kills during the write leave: partial temporary stores of dead writers
        debris = tmp_path / f".s.zarr.tmp-{_dead_pid()}-dead000{k}"
        (debris / "images").mkdir(parents=True)
        (debris / "images" / "chunk").write_bytes(b"\0" * 1000)
    assert not path.exists() or read_zarr(path).attrs["mpp"] == MPP  # the old store is intact meanwhile
    write_zarr(from_arrays(np.zeros((SIZE, SIZE, 3), dtype=np.uint8), 2.0), path, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.zarr"]
    assert read_zarr(path).attrs["mpp"] == 2.0


def test_kill_between_the_renames_is_reported_and_recovered(sdata, tmp_path, monkeypatch):
    # cases.md: kill_write_zarr_rename_window
    path = write_zarr(sdata, tmp_path / "inj.zarr")
    _kill_after_first_rename(monkeypatch)
    with pytest.raises(_Killed):
        write_zarr(from_arrays(np.zeros((SIZE, SIZE, 3), dtype=np.uint8), 2.0), path, overwrite=True)
    monkeypatch.undo()
    assert not path.exists()  # the instant a kill can hit: the old store moved aside, the new one not yet in place
    with pytest.raises(InvalidInputError, match=r"interrupted; the previous store is intact at .*\.inj\.zarr\.old-.*restores it"):
        read_zarr(path)
    with pytest.raises(InvalidInputError, match="already exists"):  # the next write restores the old store first
        write_zarr(from_arrays(np.zeros((SIZE, SIZE, 3), dtype=np.uint8), 2.0), path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["inj.zarr"]
    np.testing.assert_array_equal(_pixels(read_zarr(path)), _pixels(sdata))


@pytest.mark.parametrize("thing", [None, "table", "path"])
def test_io_functions_refuse_what_is_not_a_spatialdata(sdata, tmp_path, thing):
    # own case io_not_sdata: io.validate / io.write_zarr given an AnnData, None or a path crashed with AttributeError
    value = {"table": sdata.tables["table"], "path": str(tmp_path)}.get(thing)
    with pytest.raises(InvalidInputError, match="Expected a SpatialData sample, got"):
        validate(value)
    with pytest.raises(InvalidInputError, match="Expected a SpatialData sample, got"):
        write_zarr(value, tmp_path / "x.zarr")
    assert not (tmp_path / "x.zarr").exists()


def test_read_proportions_refuses_totals_and_reserved_keys_and_names_cell2location_types(sdata, proportions, tmp_path):
    # own case byo_proportions: an RCTD nUMI column, a total or a flag became a cell type (spot 0 read as 99.98 % "nUMI");
    # cell2location's "q05cell_abundance_w_sf_<type>" columns became the cell-type names, and a file holding two
    # posteriors counted every type twice; key_added="spatial" replaced the spot centres
    table = sdata.tables["table"]
    for extra in ({"nUMI": 3000}, {"total_counts": 2.0}, {"in_tissue2": True}):
        name = next(iter(extra))
        with pytest.raises(InvalidInputError, match=rf"columns \['{name}'\] that look like spot totals or flags.*drop_columns=\['{name}'\]"):
            read_proportions(proportions.assign(**extra), sdata, key_added="new")
    assert "new" not in table.obsm
    file = tmp_path / "c2l.csv"
    (proportions * 7).add_prefix("q50cell_abundance_w_sf_").to_csv(file)
    result = read_proportions(file, sdata, key_added="new")
    assert list(result.columns) == CELL_TYPES
    assert np.allclose(result.loc[proportions.index].to_numpy(), proportions.to_numpy() / proportions.sum(axis=1).to_numpy()[:, None])
    both = pd.concat([proportions.add_prefix("q05cell_abundance_w_sf_"), proportions.add_prefix("meanscell_abundance_w_sf_")], axis=1)
    with pytest.raises(InvalidInputError, match=r"several cell2location posteriors \(meanscell_abundance_w_sf_<type>, q05cell_abundance_w_sf_<type>\)"):
        read_proportions(both, sdata, key_added="other")
    spatial = table.obsm["spatial"].copy()
    with pytest.raises(InvalidInputError, match=r"key_added='spatial' would overwrite obsm\['spatial'\]"):
        read_proportions(proportions, sdata, key_added="spatial")
    assert np.array_equal(table.obsm["spatial"], spatial) and "other" not in table.obsm


def test_read_proportions_hints_and_float_noise(sdata, proportions):
    # own case byo_proportions_hints: barcodes without the "-1" suffix, the barcodes in another column and decimal commas
    # got errors without a hint; a -1e-12 (float noise of the writing tool) refused the whole file
    suffixed = proportions.rename(index=lambda b: f"{b}-1")
    sdata.tables["table"].obs_names = [f"{b}-1" for b in sdata.tables["table"].obs_names]
    with pytest.raises(InvalidInputError, match=r"rows for unknown spots.*carry a suffix \(e.g. '.*-1'\); add it"):
        read_proportions(proportions, sdata, key_added="new")
    with pytest.raises(InvalidInputError, match=r"non-numeric columns \['barcode'\]: a column of barcodes other than the first needs index_col="):
        read_proportions(suffixed.reset_index(names="barcode").set_index(CELL_TYPES[0]), sdata, key_added="new")
    noisy = suffixed.copy()
    noisy.iloc[0, 0], noisy.iloc[0, 1] = -1e-12, noisy.iloc[0, 1] + noisy.iloc[0, 0]
    result = read_proportions(noisy, sdata, key_added="new")
    assert result.iloc[:, 0].loc[noisy.index[0]] == 0.0
    before = noisy.copy()
    check_proportions(noisy)  # reads the frame's own memory (pandas shares it): must not write the zero back
    assert noisy.equals(before)
    noisy.iloc[0, 0] = -1e-6
    with pytest.raises(InvalidInputError, match="negative values"):
        read_proportions(noisy, sdata, key_added="other")


def _real_sample(image=None, c_coords=("r", "g", "b")):
    """A vendored real H&E tile as a sample whose image element is built as a spatialdata user would."""
    from spatialdata import SpatialData
    from spatialdata.models import Image2DModel

    from histocell_sd.datasets import NUCLS_MPP, read_nucls_tile
    from histocell_sd.io._elements import pixel_transformations

    rgb = read_nucls_tile("test_3")[0] if image is None else image
    element = Image2DModel.parse(np.moveaxis(rgb, -1, 0), dims=("c", "y", "x"), c_coords=list(c_coords),
                                 transformations=pixel_transformations(NUCLS_MPP))
    return SpatialData(images={"he": element}, attrs={"mpp": NUCLS_MPP})


def test_images_that_are_not_colour_rgb_uint8_are_refused_everywhere_pixels_are_read():  # own case bgr_channel_order
    from histocell_sd.datasets import read_nucls_tile
    from histocell_sd.io import read_nuclei, validate
    from histocell_sd.models import HistoCell
    from histocell_sd.pp import segment_nuclei

    rgb, truth = read_nucls_tile("test_3")[:2]
    bgr = _real_sample(rgb[..., ::-1], c_coords=("b", "g", "r"))
    for call in (lambda: validate(bgr), lambda: segment_nuclei(bgr, progress=False), lambda: read_nuclei(truth, bgr, format="labels")):
        with pytest.raises(InvalidInputError, match=r"channels \['b', 'g', 'r'\]; .* order r, g, b"):
            call()
    assert "histocell" not in bgr.tables
    # own case predict_on_nonuint8_image: read_nuclei and predict did not check the dtype (floats in [0, 1] gave other types)
    floats = _real_sample((rgb / 255).astype(np.float32))
    with pytest.raises(InvalidInputError, match=r"must be uint8 \(0-255\), got float32: convert"):
        read_nuclei(truth, floats, format="labels")
    assert "histocell" not in floats.tables
    sdata = _real_sample()
    read_nuclei(truth, sdata, format="labels")  # the same tile as colour uint8: read
    sdata.images["he"] = _real_sample((rgb / 255).astype(np.float32)).images["he"]
    model = HistoCell(["tumor", "stromal", "lymphocyte"])
    with pytest.raises(InvalidInputError, match=r"must be uint8 \(0-255\), got float32: convert"):
        model.sample_inputs(sdata)


def test_greyscale_copied_into_three_channels_is_refused():  # own case grayscale_as_rgb
    from histocell_sd.datasets import read_nucls_tile
    from histocell_sd.pp import segment_nuclei

    rgb = read_nucls_tile("test_3")[0]
    grey = np.repeat(np.round(rgb @ [0.299, 0.587, 0.114]).astype(np.uint8)[..., None], 3, axis=-1)
    with pytest.raises(InvalidInputError, match="Image 'he' is greyscale"):
        from_arrays(grey, 0.25)
    with pytest.raises(InvalidInputError, match="Image 'he' is greyscale"):
        segment_nuclei(_real_sample(grey), progress=False)
    with pytest.raises(InvalidInputError, match="Image 'he' is greyscale"):
        from_arrays(np.tile(grey, (5, 5, 1)), 0.25)  # 1280 px: a pyramid, judged on windows of the full resolution
    from_arrays(rgb, 0.25)  # its colour original is accepted
    from_arrays(np.full((64, 64, 3), 200, dtype=np.uint8), 0.25)  # a featureless placeholder is not judged
