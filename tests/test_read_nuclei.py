"""Tests of importing nuclei segmented elsewhere (HoVer-Net JSON, GeoJSON, label masks)."""

import json
import warnings

import numpy as np
import pandas as pd
import pytest
import tifffile
from PIL import Image
from scipy import ndimage as ndi

from histocell_sd import InvalidInputError
from histocell_sd.io import from_arrays, read_nuclei
from histocell_sd.io._nuclei import _to_raster
from histocell_sd.io._nuclei_parse import parse_geojson, parse_hovernet

MPP = 0.5
SIZE = 200
# (x, y, radius px) of the dark disks, and their HoVer-Net classes
DISKS = [(40, 50, 8), (120, 45, 6), (70, 140, 10), (160, 150, 7)]
TYPES = [1, 2, 1, 3]
TYPE_MAP = {1: "neoplastic", 2: "inflammatory", 3: "connective"}


def _truth() -> np.ndarray:
    yy, xx = np.mgrid[:SIZE, :SIZE]
    labels = np.zeros((SIZE, SIZE), dtype=np.int32)
    for i, (x, y, r) in enumerate(DISKS, start=1):
        labels[(xx - x) ** 2 + (yy - y) ** 2 <= r**2] = i
    return labels


TRUTH = _truth()
TRUE_AREA_UM2 = np.bincount(TRUTH.ravel())[1:] * MPP**2


def _image() -> np.ndarray:
    image = np.full((SIZE, SIZE, 3), 235, dtype=np.uint8)
    image[TRUTH > 0] = (70, 40, 110)
    return image


def _sdata(**kwargs):
    return from_arrays(_image(), mpp=MPP, **kwargs)


def _contour(mask: np.ndarray) -> list:
    """Boundary pixels of a star-shaped mask ordered by angle, as HoVer-Net's [[x, y], ...]."""
    edge = mask & ~ndi.binary_erosion(mask)
    ys, xs = np.nonzero(edge)
    cy, cx = ys.mean(), xs.mean()
    order = np.argsort(np.arctan2(ys - cy, xs - cx))
    return [[int(xs[k]), int(ys[k])] for k in order]


def _hovernet(types=TYPES) -> dict:
    nuc = {}
    for i, ((x, y, r), t) in enumerate(zip(DISKS, types), start=1):
        nuc[str(i)] = {
            "bbox": [[y - r, x - r], [y + r, x + r]],
            "centroid": [x, y],
            "contour": _contour(TRUTH == i),
            "type_prob": 0.9,
            "type": t,
        }
    return {"mag": 40, "nuc": nuc}


def _circle(x, y, r, n=48, scale=1.0) -> list:
    """A closed ring around disk (x, y, r) in QuPath's pixel-corner coordinates."""
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    ring = np.c_[x + 0.5 + r * np.cos(t), y + 0.5 + r * np.sin(t)] / scale
    return np.vstack([ring, ring[:1]]).tolist()


def _geojson(scale=1.0) -> dict:
    features = []
    for i, ((x, y, r), t) in enumerate(zip(DISKS, TYPES)):
        features.append({
            "type": "Feature",
            "id": f"cell-{i}",
            "geometry": {"type": "Polygon", "coordinates": [_circle(x, y, r, scale=scale)]},
            "properties": {"objectType": "detection", "classification": {"name": TYPE_MAP[t], "color": [255, 0, 0]}},
        })
    return {"type": "FeatureCollection", "features": features}


def _write_json(tmp_path, name, obj) -> str:
    path = tmp_path / name
    path.write_text(json.dumps(obj))
    return str(path)


# ------------------------------------------------------------------------------------- parsing


def _iou_per_nucleus(labels: np.ndarray) -> np.ndarray:
    return np.array([
        ((labels == i) & (TRUTH == i)).sum() / ((labels == i) | (TRUTH == i)).sum() for i in range(1, len(DISKS) + 1)
    ])


def _full(labels, origin):
    out = np.zeros((SIZE, SIZE), dtype=np.int32)
    y0, x0 = origin
    out[y0 : y0 + labels.shape[0], x0 : x0 + labels.shape[1]] = labels
    return out


def test_hovernet_contours_rasterise_to_the_mask(tmp_path):
    parsed = parse_hovernet(_write_json(tmp_path, "h.json", _hovernet()))
    assert parsed.names == ["1", "2", "3", "4"] and parsed.types == TYPES
    labels, origin, _ = _to_raster(_hovernet(), "hovernet", (SIZE, SIZE), 1.0, (0.0, 0.0), MPP)
    assert (_full(labels, origin) == TRUTH).all() or _iou_per_nucleus(_full(labels, origin)).min() > 0.97
    assert _iou_per_nucleus(_full(labels, origin)).min() > 0.97


def test_geojson_polygons_rasterise_to_the_mask():
    parsed = parse_geojson(_geojson())
    assert parsed.names == [f"cell-{i}" for i in range(4)] and parsed.types == [TYPE_MAP[t] for t in TYPES]
    labels, origin, _ = _to_raster(_geojson(), "geojson", (SIZE, SIZE), 1.0, (0.0, 0.0), MPP)
    assert _iou_per_nucleus(_full(labels, origin)).min() > 0.9


def test_geojson_multipolygon_keeps_largest_and_skips_annotations():
    fc = _geojson()
    big, small = _circle(*DISKS[0]), _circle(5, 5, 2)
    fc["features"][0]["geometry"] = {"type": "MultiPolygon", "coordinates": [[small], [big]]}
    fc["features"].append({"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [_circle(100, 100, 90)]},
                           "properties": {"objectType": "annotation"}})
    parsed = parse_geojson(fc["features"])  # a plain list of Features works too
    assert len(parsed.polygons) == 4
    assert np.allclose(parsed.polygons[0].mean(axis=0), [40.5, 50.5], atol=0.1)


def test_later_polygons_do_not_overwrite_earlier_ones():
    fc = _geojson()
    fc["features"][1]["geometry"]["coordinates"] = [_circle(44, 50, 8)]  # overlaps nucleus 0
    full = _full(*_to_raster(fc, "geojson", (SIZE, SIZE), 1.0, (0.0, 0.0), MPP)[:2])
    alone = _full(*_to_raster(_geojson(), "geojson", (SIZE, SIZE), 1.0, (0.0, 0.0), MPP)[:2])
    assert ((full == 1) == (alone == 1)).all()
    assert 0 < (full == 2).sum() < (TRUTH == 1).sum()


def test_scale_and_offset_map_downsampled_exports():
    half = _geojson(scale=2.0)  # exported at a 2× downsampled level
    labels, origin, _ = _to_raster(half, "geojson", (SIZE, SIZE), 2.0, (0.0, 0.0), MPP)
    assert _iou_per_nucleus(_full(labels, origin)).min() > 0.85
    # a crop starting at (30, 20) px
    crop = _hovernet()
    for rec in crop["nuc"].values():
        rec["contour"] = [[x - 30, y - 20] for x, y in rec["contour"]]
    labels, origin, _ = _to_raster(crop, "hovernet", (SIZE, SIZE), 1.0, (30.0, 20.0), MPP)
    assert _iou_per_nucleus(_full(labels, origin)).min() > 0.97


@pytest.mark.parametrize("suffix", [".npy", ".npz", ".tif", ".png", "array"])
def test_label_mask_sources(tmp_path, suffix):
    path = tmp_path / f"mask{suffix}"
    if suffix == ".npy":
        np.save(path, TRUTH)
    elif suffix == ".npz":
        np.savez(path, inst_map=TRUTH, other=np.zeros(3))
    elif suffix == ".tif":
        tifffile.imwrite(path, TRUTH.astype(np.uint16))
    elif suffix == ".png":
        Image.fromarray(TRUTH.astype(np.uint8)).save(path)
    else:
        path = TRUTH
    labels, origin, parsed = _to_raster(path, "labels", (SIZE, SIZE), 1.0, (0.0, 0.0), MPP)
    assert parsed is None and origin == (0, 0) and (labels == TRUTH).all()


def test_label_mask_of_a_downsampled_level():
    labels, origin, _ = _to_raster(TRUTH[::2, ::2], "labels", (SIZE, SIZE), 2.0, (0.0, 0.0), MPP)
    assert _iou_per_nucleus(_full(labels, origin)).min() > 0.8
    # a crop of the mask placed at its offset
    labels, origin, _ = _to_raster(TRUTH[20:120, 30:180], "labels", (SIZE, SIZE), 1.0, (30.0, 20.0), MPP)
    assert origin == (20, 30) and (_full(labels, origin)[20:120, 30:180] == TRUTH[20:120, 30:180]).all()


def test_qupath_cells_use_their_nucleus_geometry():
    fc = _geojson()
    for feat in fc["features"]:
        feat["nucleusGeometry"] = feat["geometry"]
        cell = np.asarray(feat["geometry"]["coordinates"][0])
        feat["geometry"] = {"type": "Polygon", "coordinates": [((cell - cell.mean(0)) * 2 + cell.mean(0)).tolist()]}
        feat["properties"] = {"objectType": "cell", "classification": "Tumor"}
    labels, origin, parsed = _to_raster(fc, "geojson", (SIZE, SIZE), 1.0, (0.0, 0.0), MPP)
    assert _iou_per_nucleus(_full(labels, origin)).min() > 0.9 and parsed.types == ["Tumor"] * 4


# -------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "mutate, match",
    [
        (lambda d: d.pop("nuc"), "no 'nuc' key"),
        (lambda d: d["nuc"]["3"].pop("contour"), "nucleus '3'.*no 'contour'"),
        (lambda d: d["nuc"]["2"].update(contour=[[1, 1], [5, 5]]), "nucleus '2'.*2 points"),
        (lambda d: d["nuc"]["4"].update(contour=[[1, 1], [5, "a"], [3, 4]]), "nucleus '4'.*malformed"),
        (lambda d: d["nuc"]["1"].update(contour=[[190, 190], [250, 190], [250, 230]]), "nucleus '1'.*outside"),
    ],
)
def test_hovernet_errors_name_the_record(tmp_path, mutate, match):
    data = _hovernet()
    mutate(data)
    with pytest.raises(InvalidInputError, match=match):
        read_nuclei(_write_json(tmp_path, "h.json", data), _sdata(), format="hovernet")


def test_malformed_json_is_named(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('{"nuc": {"1": ')
    with pytest.raises(InvalidInputError, match="broken.json.*not valid JSON"):
        read_nuclei(str(path), _sdata())
    with pytest.raises(InvalidInputError, match="broken.json.*not valid JSON"):
        read_nuclei(path, _sdata(), format="geojson")


@pytest.mark.parametrize(
    "geometry, kind",
    [({"type": "Point", "coordinates": [3, 4]}, "Point"),
     ({"type": "LineString", "coordinates": [[3, 4], [5, 6]]}, "LineString")],
)
def test_geojson_non_polygon_is_named(geometry, kind):
    fc = _geojson()
    fc["features"][2]["geometry"] = geometry
    with pytest.raises(InvalidInputError, match=f"feature 2 \\(id 'cell-2'\\).*{kind}"):
        read_nuclei(fc, _sdata(), format="geojson")


def test_geojson_outside_and_degenerate(tmp_path):
    fc = _geojson()
    fc["features"][1]["geometry"]["coordinates"] = [_circle(120, 45, 6, scale=0.5)]  # 2× too large
    with pytest.raises(InvalidInputError, match="nucleus 'cell-1'.*outside.*scale"):
        read_nuclei(_write_json(tmp_path, "g.geojson", fc), _sdata(), format="geojson")
    fc = _geojson()
    fc["features"][3]["geometry"]["coordinates"] = [[[1, 1], [2, 2], [1, 1]]]
    with pytest.raises(InvalidInputError, match="feature 3 \\(id 'cell-3'\\).*2 points"):
        read_nuclei(fc, _sdata(), format="geojson")
    fc = _geojson()
    fc["features"][0]["geometry"] = None
    with pytest.raises(InvalidInputError, match="feature 0 \\(id 'cell-0'\\).*no geometry"):
        read_nuclei(fc, _sdata(), format="geojson")
    with pytest.raises(InvalidInputError, match="neither a GeoJSON FeatureCollection"):
        read_nuclei({"type": "Polygon"}, _sdata(), format="geojson")


def test_label_mask_errors(tmp_path):
    sdata = _sdata()
    with pytest.raises(InvalidInputError, match="shape \\(100, 200\\).*image is \\(200, 200\\)"):
        read_nuclei(TRUTH[:100], sdata, format="labels")
    with pytest.raises(InvalidInputError, match="must be an integer"):
        read_nuclei(TRUTH.astype(np.float32), sdata, format="labels")
    with pytest.raises(InvalidInputError, match="must be an integer"):
        read_nuclei(TRUTH > 0, sdata, format="labels")
    np.save(tmp_path / "m.npy", TRUTH[:, :150])
    with pytest.raises(InvalidInputError, match="m.npy.*shape \\(200, 150\\)"):
        read_nuclei(tmp_path / "m.npy", sdata, format="labels")
    with pytest.raises(InvalidInputError, match="does not fit"):
        read_nuclei(TRUTH[::2, ::2], sdata, format="labels", scale=2, offset=(10, 0))
    with pytest.raises(InvalidInputError, match="format must be"):
        read_nuclei(TRUTH, sdata, format="csv")


# ---------------------------------------------------------------------------------- end to end


def _check_table(sdata, nuclei_table_key="histocell", key_added="nuclei", n=None):
    n = len(DISKS) if n is None else n
    table = sdata.tables[nuclei_table_key]
    assert table.n_obs == n and len(sdata.shapes[key_added]) == n
    # store_nuclei puts pixel (r, c) at [c, c + 1) × [r, r + 1): a disk centred on pixel (x, y) has centroid (x + .5, y + .5)
    expected = np.array([[x + 0.5, y + 0.5] for x, y, _ in DISKS])
    assert np.abs(table.obsm["spatial"] - expected).max() < 1.0
    area = np.asarray(table[:, "area_um2"].X).ravel()
    assert np.allclose(area, TRUE_AREA_UM2, rtol=0.1)
    return table


@pytest.mark.parametrize("as_file", [True, False])
def test_read_hovernet_end_to_end(tmp_path, as_file):
    sdata = _sdata()
    source = _write_json(tmp_path, "h.json", _hovernet()) if as_file else _hovernet()
    read_nuclei(source, sdata, format="hovernet", type_map=TYPE_MAP)
    table = _check_table(sdata)
    assert table.obs["imported_type"].tolist() == [TYPE_MAP[t] for t in TYPES]
    assert list(table.obs["imported_type"].cat.categories) == ["neoplastic", "inflammatory", "connective"]


def test_hovernet_types_without_map_and_with_type_info_json():
    sdata = _sdata()
    read_nuclei(_hovernet(), sdata)
    assert sdata.tables["histocell"].obs["imported_type"].tolist() == ["1", "2", "1", "3"]
    type_info = {"0": ["nolabe", [0, 0, 0]], "1": ["neopla", [255, 0, 0]], "2": ["inflam", [0, 255, 0]],
                 "3": ["connec", [0, 0, 255]]}
    read_nuclei(_hovernet(types=[1, 2, None, 3]), sdata, type_map=type_info)
    types = sdata.tables["histocell"].obs["imported_type"]
    assert types.iloc[[0, 1, 3]].tolist() == ["neopla", "inflam", "connec"] and types.isna().iloc[2]


def test_read_geojson_end_to_end(tmp_path):
    sdata = _sdata()
    read_nuclei(_write_json(tmp_path, "cells.geojson", _geojson()), sdata, format="geojson",
                key_added="qupath", nuclei_table_key="qupath_table")
    table = _check_table(sdata, "qupath_table", "qupath")
    assert table.obs["imported_type"].tolist() == [TYPE_MAP[t] for t in TYPES]


def test_read_geojson_downsampled_export():
    sdata = _sdata()
    read_nuclei(_geojson(scale=2.0), sdata, format="geojson", scale=2.0)
    _check_table(sdata)


@pytest.mark.parametrize("as_file", [True, False])
def test_read_label_mask_end_to_end(tmp_path, as_file):
    sdata = _sdata()
    if as_file:
        np.save(tmp_path / "mask.npy", TRUTH)
    read_nuclei(tmp_path / "mask.npy" if as_file else TRUTH, sdata, format="labels")
    table = _check_table(sdata)
    assert "imported_type" not in table.obs


def test_dropped_nuclei_keep_their_types_aligned():
    data = _hovernet()
    data["nuc"] = {"0": {**data["nuc"]["1"], "type": 3}, **data["nuc"]}  # same pixels as nucleus '1', first
    sdata = _sdata()
    with pytest.warns(UserWarning, match="1 nuclei.*dropped.*'1'"):
        read_nuclei(data, sdata, type_map=TYPE_MAP)
    table = _check_table(sdata)
    assert table.obs["imported_type"].tolist() == ["connective", "inflammatory", "neoplastic", "connective"]
    # own case byo_unused_class: the class of a dropped nucleus stayed behind as an unused category
    data["nuc"]["1"] = {**data["nuc"]["1"], "type": 4}  # a class only the dropped nucleus has
    with pytest.warns(UserWarning, match="1 nuclei.*dropped.*'1'"):
        read_nuclei(data, sdata, type_map=TYPE_MAP | {4: "dead"})
    types = sdata.tables["histocell"].obs["imported_type"]
    assert types.tolist() == ["connective", "inflammatory", "neoplastic", "connective"]
    assert list(types.cat.categories) == ["neoplastic", "inflammatory", "connective"]  # type_map order, without "dead"


def test_nuclei_are_assigned_to_spots():
    sdata = _sdata(spot_centers=np.array([[45.0, 50.0], [150.0, 150.0]]))
    read_nuclei(_hovernet(), sdata)
    spot_ids = sdata.tables["histocell"].obs["spot_id"]
    assert spot_ids.iloc[0] == "spot_00000" and spot_ids.iloc[3] == "spot_00001" and spot_ids.isna().sum() == 2


def test_all_zero_label_mask_is_refused_and_nothing_written():
    # cases.md: rn_mask_allzero
    sdata = _sdata()
    read_nuclei(TRUTH, sdata, format="labels")  # an earlier import must survive the refused one
    before = sdata.tables["histocell"].copy()
    with pytest.raises(InvalidInputError, match="no nuclei in the mask"):
        read_nuclei(np.zeros_like(TRUTH), sdata, format="labels")
    assert set(sdata.shapes) == {"nuclei"} and set(sdata.tables) == {"histocell"}
    assert sdata.tables["histocell"].n_obs == before.n_obs
    empty = _sdata()
    with pytest.raises(InvalidInputError, match="no nuclei in the mask"):
        read_nuclei(np.zeros_like(TRUTH), empty, format="labels")
    assert not empty.shapes and not empty.tables


def test_spots_under_another_name_are_found():
    # own case nuclei_spots_renamed (API review): with spots not named "spots" (spatialdata-io names Visium circles after
    # the dataset) the nuclei silently got no spot_id; now the spots the spots table annotates are used
    from histocell_sd.io import validate
    from histocell_sd.pp import segment_nuclei

    sdata = _sdata(spot_centers=np.array([[45.0, 50.0], [150.0, 150.0]]))
    sdata.shapes["V1_Breast_Cancer"] = sdata.shapes["spots"]
    del sdata.shapes["spots"]
    region_key = sdata.tables["table"].uns["spatialdata_attrs"]["region_key"]
    sdata.tables["table"].obs[region_key] = pd.Categorical(["V1_Breast_Cancer"] * sdata.tables["table"].n_obs)
    sdata.set_table_annotates_spatialelement("table", region="V1_Breast_Cancer", region_key=region_key)
    read_nuclei(_hovernet(), sdata)
    assert sdata.tables["histocell"].obs["spot_id"].notna().sum() == 2
    validate(sdata)
    sdata.shapes["cell_circles"] = sdata.shapes["V1_Breast_Cancer"].iloc[:1]  # spot-like, but no table's spots
    segment_nuclei(sdata, method="classical", overwrite=True)
    assert sdata.tables["histocell"].obs["spot_id"].notna().sum() == 2
    segment_nuclei(sdata, spots_key="cell_circles", method="classical", overwrite=True)
    assert sdata.tables["histocell"].obs["spot_id"].notna().sum() == 1
    before = sdata.tables["histocell"].copy()
    with pytest.raises(InvalidInputError, match="must be spot circles"):
        segment_nuclei(sdata, spots_key="nuclei", method="classical", overwrite=True)
    assert sdata.tables["histocell"].obs.equals(before.obs)
    far = sdata.shapes["V1_Breast_Cancer"].copy()
    far.geometry = far.geometry.translate(10_000, 10_000)
    sdata.shapes["V1_Breast_Cancer"] = far
    with pytest.raises(InvalidInputError, match="V1_Breast_Cancer"):
        validate(sdata)  # the renamed spots are checked too


def test_spatialdata_io_spots_give_barcodes_and_misplaced_spots_are_refused():
    # own case sdio_integer_spot_ids, sdio_scaled_spots, sdio_hd_no_bins
    # interop probe: spatialdata-io indexes its Visium circles by an integer instance id and names the table's rows
    # by barcode, so nuclei got integer spot ids and every spot result was NaN; spots scaled into 'global' (hires
    # coordinates) were read as full-resolution pixels; bins that tables annotate but that are not squares gave no word
    import warnings

    from spatialdata.transformations import Scale, set_transformation

    sdata = _sdata(spot_centers=np.array([[45.0, 50.0], [150.0, 150.0]]))
    table, spots = sdata.tables["table"], sdata.shapes["spots"].copy()
    barcodes = list(table.obs_names)
    spots.index = pd.Index([0, 1], name="spot_id")  # spatialdata-io: integer instance ids
    sdata.shapes["heart"] = spots
    del sdata.shapes["spots"]
    region_key, instance_key = table.uns["spatialdata_attrs"]["region_key"], table.uns["spatialdata_attrs"]["instance_key"]
    table.obs[region_key] = pd.Categorical(["heart"] * table.n_obs)
    table.obs[instance_key] = [0, 1]
    sdata.set_table_annotates_spatialelement("table", region="heart", region_key=region_key, instance_key=instance_key)
    read_nuclei(_hovernet(), sdata)
    assert set(sdata.tables["histocell"].obs["spot_id"].dropna()) == set(barcodes)  # rows of the table, not 0 and 1

    set_transformation(sdata.shapes["heart"], Scale([0.15, 0.15], axes=("x", "y")), to_coordinate_system="global")
    before = sdata.tables["histocell"].copy()
    with pytest.raises(InvalidInputError, match=r"Spots 'heart' are placed in 'global' with a scale or offset \(scale 0.15"):
        read_nuclei(_hovernet(), sdata, key_added="other", nuclei_table_key="other_table")
    assert "other" not in sdata.shapes and sdata.tables["histocell"].obs.equals(before.obs)

    squares = spots.copy()  # spatialdata-io's Visium HD bins: polygons without a 'side' column
    squares.geometry = squares.geometry.buffer(5, cap_style="square")
    squares = squares.drop(columns=[c for c in squares.columns if c != "geometry"])
    del sdata.shapes["heart"]
    sdata.shapes["hd_square_008um"] = squares
    table.obs[region_key] = pd.Categorical(["hd_square_008um"] * table.n_obs)
    sdata.set_table_annotates_spatialelement("table", region="hd_square_008um", region_key=region_key, instance_key=instance_key)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        from histocell_sd.pp import segment_nuclei

        segment_nuclei(sdata, method="classical", overwrite=True)
    said = [str(w.message) for w in caught if "spots_key=" in str(w.message)]
    assert len(said) == 1 and "tables annotate the shapes ['hd_square_008um']" in said[0]


def test_renamed_nuclei_are_named_when_segmenting_again():
    # own case seg_renamed_nuclei
    # interop probe: after renaming the nuclei shapes (and the table's annotation) segment_nuclei refused the table as
    # "not written by a segmentation"
    from histocell_sd.pp import segment_nuclei

    sdata = _sdata()
    read_nuclei(TRUTH, sdata, format="labels", key_added="cells")
    with pytest.raises(InvalidInputError, match=r"Table 'histocell' holds the nuclei of the shapes \['cells'\], not 'nuclei': pass key_added='cells'"):
        segment_nuclei(sdata, method="classical")
    segment_nuclei(sdata, method="classical", key_added="cells")
    assert sdata.tables["histocell"].n_obs == 4


# ----------------------------------------------------------------- bring-your-own probe (2026-12-07, night)


def test_nuclei_cut_by_the_image_border_are_kept_with_a_warning():
    # own case byo_border_nuclei: write_geojson -> read_nuclei refused the whole file because two border nuclei of the
    # package's own slide reach 2.5 px past the image ("exported from a downsampled level?")
    fc = _geojson()
    fc["features"][0]["geometry"]["coordinates"] = [_circle(3, 50, 8)]  # reaches 5 px past the left border
    sdata = _sdata()
    with pytest.warns(UserWarning, match=r"1 nuclei of the GeoJSON input reach beyond the image border and were cut at it, e.g. \['cell-0'\]"):
        read_nuclei(fc, sdata, format="geojson")
    table = sdata.tables["histocell"]
    assert table.n_obs == len(DISKS) and table.obsm["spatial"][:, 0].min() > 0
    assert sdata.shapes["nuclei"].total_bounds[0] >= 0  # cut at the border
    fc["features"][0]["geometry"]["coordinates"] = [_circle(-6, 50, 8)]  # its centre off the image: a wrong scale or offset
    with pytest.raises(InvalidInputError, match="nucleus 'cell-0'.*outside.*Set scale and offset"):
        read_nuclei(fc, _sdata(), format="geojson")


def test_type_map_as_a_list_and_a_bad_type_map_changes_nothing():
    # own case byo_type_map: type_map=[names] raised a bare TypeError after the earlier nuclei had been replaced
    sdata = _sdata()
    read_nuclei(_hovernet(), sdata, type_map=["background", "neoplastic", "inflammatory", "connective"])
    before = sdata.tables["histocell"].obs["imported_type"].tolist()
    assert before == [TYPE_MAP[t] for t in TYPES]
    with pytest.raises(InvalidInputError, match="type_map must map class ids to names.*got int"):
        read_nuclei(_hovernet()["nuc"] | {}, sdata, type_map=5)
    assert sdata.tables["histocell"].obs["imported_type"].tolist() == before


def test_read_nuclei_offers_the_overwrite_its_error_names():
    # own case byo_overwrite_hint: the refusal said "pass overwrite=True" (and labels_key=), which read_nuclei lacked
    import anndata as ad

    sdata = _sdata()
    sdata.tables["histocell"] = ad.AnnData(obs=pd.DataFrame(index=["a", "b"]))  # not written by a segmentation
    with pytest.raises(InvalidInputError, match=r"\(key_added=, nuclei_table_key=\) or pass overwrite=True"):
        read_nuclei(_hovernet(), sdata)
    assert sdata.tables["histocell"].n_obs == 2
    read_nuclei(_hovernet(), sdata, overwrite=True)
    _check_table(sdata)


def test_qupath_derived_classes_and_colours_with_alpha():
    # own case byo_qupath_classes: QuPath >= 0.4 writes "Tumor: Positive" as "names": [...], colours may carry alpha
    fc = _geojson()
    classes = [{"names": ["Tumor", "Positive"], "color": [0, 200, 0, 255]}, {"names": ["Tumor", "Negative"], "color": [100, 100, 200]},
               {"name": "Stroma", "colorRGB": -3657166}, {"names": ["Tumor", "Positive"], "color": [0, 200, 0, 255]}]
    for feature, cls in zip(fc["features"], classes):
        feature["properties"]["classification"] = cls
    sdata = _sdata()
    read_nuclei(fc, sdata, format="geojson")
    table = sdata.tables["histocell"]
    assert table.obs["imported_type"].tolist() == ["Tumor: Positive", "Tumor: Negative", "Stroma", "Tumor: Positive"]
    colours = dict(zip(table.obs["imported_type"].cat.categories, table.uns["imported_type_colors"]))
    assert colours == {"Stroma": "#c83232", "Tumor: Negative": "#6464c8", "Tumor: Positive": "#00c800"}


def test_polygons_larger_than_any_nucleus_are_skipped_and_a_file_of_only_those_refused():
    # own case byo_annotation_only: a QuPath export of the tissue outline alone became one 360,000 µm² "nucleus"
    tissue = {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [[[0, 0], [200, 0], [200, 200], [0, 200], [0, 0]]]},
              "properties": {"objectType": "annotation", "classification": {"name": "Tissue"}}}
    sdata = _sdata()
    with pytest.raises(InvalidInputError, match=r"holds no nucleus: its 1 polygons each cover over 2000 µm² \(e.g. '0' \(Tissue\), 10000 µm²\)"):
        read_nuclei([tissue], sdata, format="geojson")
    assert "histocell" not in sdata.tables and "nuclei" not in sdata.shapes
    region = tissue | {"properties": {"classification": {"name": "Region"}}}  # no objectType: not skipped as an annotation
    with pytest.warns(UserWarning, match=r"1 polygons of the GeoJSON input cover over 2000 µm².*skipped: '0' \(Region\)"):
        read_nuclei([region] + _geojson()["features"], sdata, format="geojson")
    table = sdata.tables["histocell"]
    assert table.obs["imported_type"].tolist() == [TYPE_MAP[t] for t in TYPES]
    assert table.obs_names.tolist() == ["nucleus_2", "nucleus_3", "nucleus_4", "nucleus_5"]  # named by their place in the file


def test_a_polygon_cut_in_two_by_an_earlier_one_keeps_its_larger_part_and_its_class():
    # own case byo_polygon_split: the split gave the smaller part a new id, which was a dropped record's id (its class)
    fc = _geojson()
    bar = {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [[[39, 30], [45, 30], [45, 72], [39, 72], [39, 30]]]},
           "properties": {"classification": {"name": "bar"}}}
    duplicate = json.loads(json.dumps(fc["features"][3]))  # fully covered by the nucleus before it: dropped
    duplicate["properties"]["classification"]["name"] = "ghost"
    sdata = _sdata()
    with pytest.warns(UserWarning, match="1 nuclei.*dropped"):
        read_nuclei([bar] + fc["features"] + [duplicate], sdata, format="geojson")
    table = sdata.tables["histocell"]
    assert table.n_obs == 5 and "ghost" not in table.obs["imported_type"].astype(str).tolist()
    disk = table.obs["imported_type"].astype(str) == TYPE_MAP[TYPES[0]]
    assert disk.sum() == 2  # disk 0 (cut by the bar) and disk 2, same class
    centre = np.asarray(table.obsm["spatial"])[disk.to_numpy()][0]
    assert centre[0] < 39 and abs(centre[1] - 50.5) < 1.5  # the larger (left) part of disk 0 only


def test_label_ids_covering_several_regions_become_one_nucleus_per_region():
    # own case byo_split_ids: a 0/255 binary mask became 1 nucleus, and tiles stitched with ids restarting at 1 gave 2
    # nuclei for 8, each centred between its blobs, its polygon one blob and its features all of them
    def disks_found(sdata):  # the largest part keeps the id, so compare the nuclei as sets
        table = sdata.tables["histocell"]
        centres = np.asarray(table.obsm["spatial"])
        order = np.lexsort(centres.T[::-1])
        truth = np.array([[x + 0.5, y + 0.5] for x, y, _ in DISKS])
        truth_order = np.lexsort(truth.T[::-1])
        assert table.n_obs == len(sdata.shapes["nuclei"]) == len(DISKS)
        assert np.abs(centres[order] - truth[truth_order]).max() < 1.0
        area = np.asarray(table[:, "area_um2"].X).ravel()
        assert np.allclose(area[order], TRUE_AREA_UM2[truth_order], rtol=0.1)
        assert np.allclose(sdata.shapes["nuclei"].area.to_numpy() * MPP**2, area, rtol=0.15)  # polygon and features: one region
        return table.obs_names.tolist()

    binary = np.where(TRUTH > 0, 255, 0).astype(np.uint8)
    sdata = _sdata()
    with pytest.warns(UserWarning, match=r"1 label ids cover several separate regions \(e.g. ids \[255\]\): 3 regions became nuclei"):
        read_nuclei(binary, sdata, format="labels")
    assert sorted(disks_found(sdata)) == ["nucleus_255", "nucleus_256", "nucleus_257", "nucleus_258"]
    stitched = TRUTH.copy()
    stitched[stitched == 3], stitched[stitched == 4] = 1, 2  # a second tile numbered from 1 again
    with pytest.warns(UserWarning, match=r"2 label ids cover several separate regions"):
        read_nuclei(stitched, sdata, format="labels")
    assert sorted(disks_found(sdata)) == ["nucleus_1", "nucleus_2", "nucleus_3", "nucleus_4"]  # new ids follow the largest
    fragment = TRUTH.copy()
    fragment[190, 190] = 1  # one stray pixel of nucleus 1: dropped, no warning
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        read_nuclei(fragment, sdata, format="labels")
    _check_table(sdata)
    assert fragment[190, 190] == 1  # the caller's mask is not modified


def test_nuclei_that_miss_the_images_nuclei_are_warned_about():  # own case byo_misregistered
    from histocell_sd.datasets import nucls

    sdata = nucls("test")["test_3"]  # real H&E, 53 annotated nuclei
    truth = np.asarray(sdata.labels["truth_labels"]["scale0"]["image"] if hasattr(sdata.labels["truth_labels"], "keys")
                       else sdata.labels["truth_labels"])
    hovernet = {"nuc": {str(i): {"contour": _contour(truth == i)} for i in np.unique(truth) if i > 0}}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        read_nuclei(hovernet, sdata, format="hovernet")  # on their nuclei: no warning
        read_nuclei(truth, sdata, format="labels", overwrite=True)
        padded = nucls("test")["test_3"]
        padded.images["he"] = padded.images["he"].copy()
        padded.images["he"][:, :, :26] = 0  # black scanner padding beside the nuclei is not the tissue around them
        read_nuclei(truth, padded, format="labels")
        read_nuclei(np.where(truth % 3 == 0, truth, 0), padded, format="labels", overwrite=True)  # a third of them
    swapped = {"nuc": {k: {"contour": [[y, x] for x, y in rec["contour"]]} for k, rec in hovernet["nuc"].items()}}
    with pytest.warns(UserWarning, match=r"hardly darker in hematoxylin .* x and y are not swapped"):
        read_nuclei(swapped, sdata, format="hovernet", overwrite=True)
    shifted = np.zeros_like(truth)
    shifted[:, 40:] = truth[:, :-40]  # 10 µm to the right
    with pytest.warns(UserWarning, match=r"ratio [01]\.\d\d;"):
        read_nuclei(shifted, sdata, format="labels", overwrite=True)
