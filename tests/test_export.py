"""Tests of exporting nuclei and predictions: QuPath GeoJSON (and reading it back) and CSV."""

import json
import uuid

import numpy as np
import pandas as pd
import pytest
import shapely
from scipy import ndimage as ndi

import histocell_sd as hc
from histocell_sd import InvalidInputError
from histocell_sd._utils import copy_for_writing
from histocell_sd.io._nuclei import _to_raster


@pytest.fixture(scope="module")
def predicted(tiny_slide):
    """The tiny slide with its true nuclei stored and a real prediction (shipped checkpoint); read-only."""
    sdata = copy_for_writing(tiny_slide[0])
    hc.pp.store_nuclei(sdata, np.asarray(sdata.labels["truth_labels"]))
    hc.tl.predict(sdata, hc.models.pretrained("tumor_stromal_lymphocyte"), progress=False)
    return sdata


def _fresh(tiny_slide):
    """A copy of the bare slide (image, spots, counts) to read nuclei into."""
    return copy_for_writing(tiny_slide[0])


def _load(path) -> dict:
    def refuse(name):
        raise AssertionError(f"{name} is not JSON")

    return json.loads(open(path, encoding="utf-8").read(), parse_constant=refuse)


def _raster(path, shape) -> np.ndarray:
    """The full-image raster read_nuclei builds from a GeoJSON file."""
    labels, (y0, x0), _ = _to_raster(str(path), "geojson", shape, 1.0, (0.0, 0.0), 0.5)
    full = np.zeros(shape, dtype=np.int32)
    full[y0 : y0 + labels.shape[0], x0 : x0 + labels.shape[1]] = labels
    return full


def _largest_parts(truth: np.ndarray) -> np.ndarray:
    """Each nucleus reduced to its largest 4-connected part, holes filled (what one outline can hold)."""
    out = np.zeros_like(truth)
    for i, sl in enumerate(ndi.find_objects(truth), start=1):
        if sl is None:
            continue
        parts, n = ndi.label(truth[sl] == i)
        keep = parts == (np.argmax(np.bincount(parts.ravel())[1:]) + 1) if n > 1 else parts > 0
        out[sl][ndi.binary_fill_holes(keep)] = i
    return out


# ------------------------------------------------------------------------------------ GeoJSON


def test_geojson_has_the_qupath_structure(predicted, tmp_path):
    path = hc.io.write_geojson(predicted, tmp_path / "cells.geojson")
    fc = _load(path)
    table = predicted.tables["histocell"]
    assert fc["type"] == "FeatureCollection" and len(fc["features"]) == table.n_obs
    colors = dict(zip(table.obs["cell_type"].cat.categories, table.uns["cell_type_colors"]))
    for feat, (name, row) in zip(fc["features"], table.obs.iterrows()):
        assert feat["type"] == "Feature" and feat["id"] == name == feat["properties"]["name"]
        assert feat["geometry"]["type"] == "Polygon"
        ring = feat["geometry"]["coordinates"][0]
        assert len(ring) >= 4 and ring[0] == ring[-1]
        props = feat["properties"]
        assert props["objectType"] == "detection"
        cls = props["classification"]
        assert cls["name"] == row["cell_type"]
        assert isinstance(cls["color"], list) and len(cls["color"]) == 3 and all(type(c) is int and 0 <= c <= 255 for c in cls["color"])
        assert "#{:02x}{:02x}{:02x}".format(*cls["color"]) == colors[row["cell_type"]]
        meas = props["measurements"]
        assert sum(meas[f"prob_{t}"] for t in table.obsm["cell_type_proba"].columns) == pytest.approx(1, abs=1e-5)
        assert set(table.var_names) <= set(meas)
    first = fc["features"][0]["geometry"]["coordinates"][0]
    assert shapely.Polygon(first).equals(predicted.shapes["nuclei"].geometry.iloc[0])  # the stored polygon, in global px


def test_geojson_round_trip_with_the_raster_is_exact(predicted, tiny_slide, tmp_path):
    """With the label raster, the outlines are exact: the same pixels, hence the same nuclei, ids, features."""
    path = hc.io.write_geojson(predicted, tmp_path / "cells.geojson", labels_key="truth_labels")
    truth = np.asarray(predicted.labels["truth_labels"])
    raster = _raster(path, truth.shape)
    assert np.array_equal(raster, _largest_parts(truth))
    assert (raster != truth).sum() <= 10  # a few stray pixels touching their nucleus only diagonally

    back = _fresh(tiny_slide)
    hc.io.read_nuclei(path, back, format="geojson")
    a, b = predicted.tables["histocell"], back.tables["histocell"]
    assert list(b.obs_names) == list(a.obs_names)
    assert all(x.equals(y) for x, y in zip(predicted.shapes["nuclei"].geometry, back.shapes["nuclei"].geometry))
    assert (b.obs["imported_type"].astype(str) == a.obs["cell_type"].astype(str)).all()
    assert list(b.obs["imported_type"].cat.categories) == list(a.obs["cell_type"].cat.categories)
    assert b.uns["imported_type_colors"] == list(a.uns["cell_type_colors"])
    pd.testing.assert_frame_equal(b.obsm["imported_proba"], a.obsm["cell_type_proba"].astype(np.float64))
    whole = [i for i in range(1, truth.max() + 1) if ((raster == i) == (truth == i)).all()]
    rows = [f"nucleus_{i}" for i in whole]
    assert len(rows) >= a.n_obs - 10
    assert np.array_equal(a[rows].X, b[rows].X) and np.array_equal(a[rows].obsm["spatial"], b[rows].obsm["spatial"])


def test_geojson_round_trip_with_the_polygons(predicted, tiny_slide, tmp_path):
    """Without a raster the stored (simplified) polygons are written: ids, classes, probabilities come back the
    same; the polygons only nearly, since store_nuclei re-traces and re-simplifies the rasterised outline."""
    path = hc.io.write_geojson(predicted, tmp_path / "cells.geojson")
    back = _fresh(tiny_slide)
    hc.io.read_nuclei(path, back, format="geojson")
    a, b = predicted.tables["histocell"], back.tables["histocell"]
    assert list(b.obs_names) == list(a.obs_names)
    assert (b.obs["imported_type"].astype(str) == a.obs["cell_type"].astype(str)).all()
    np.testing.assert_array_equal(b.obsm["imported_proba"].to_numpy(), a.obsm["cell_type_proba"].to_numpy(np.float64))
    before, after = predicted.shapes["nuclei"].geometry.to_numpy(), back.shapes["nuclei"].geometry.to_numpy()
    iou = shapely.area(shapely.intersection(before, after)) / shapely.area(shapely.union(before, after))
    assert iou.min() > 0.85 and iou.mean() > 0.97


def test_geojson_uses_the_raster_segmentation_recorded(tiny_slide, tmp_path):
    sdata = _fresh(tiny_slide)
    hc.pp.store_nuclei(sdata, np.asarray(sdata.labels["truth_labels"]), labels_key="nuclei_labels")
    path = hc.io.write_geojson(sdata, tmp_path / "a.geojson", cluster_key=None, proba_key=None)
    explicit = hc.io.write_geojson(sdata, tmp_path / "b.geojson", cluster_key=None, proba_key=None, labels_key="truth_labels")
    assert _load(path) == _load(explicit)
    feat = _load(path)["features"][0]
    assert "classification" not in feat["properties"] and "prob_tumor" not in feat["properties"]["measurements"]
    no_features = hc.io.write_geojson(sdata, tmp_path / "c.geojson", cluster_key=None, proba_key=None, features=False)
    assert all("measurements" not in f["properties"] for f in _load(no_features)["features"])


def test_geojson_after_qupath_and_unpredicted_nuclei(predicted, tiny_slide, tmp_path):
    """QuPath replaces ids by UUIDs (the name keeps ours) and 0.2-0.3 wrote measurements as a list; a nucleus
    without a prediction has no classification and reads back as missing."""
    sdata = copy_for_writing(predicted)
    table = sdata.tables["histocell"]
    cell_type = table.obs["cell_type"].copy()
    cell_type.iloc[:5] = np.nan
    table.obs["cell_type"] = cell_type
    fc = _load(hc.io.write_geojson(sdata, tmp_path / "cells.geojson"))
    assert all("classification" not in f["properties"] for f in fc["features"][:5])
    assert "classification" in fc["features"][5]["properties"]
    for feat in fc["features"]:
        feat["id"] = str(uuid.uuid4())
        feat["properties"]["measurements"] = [{"name": k, "value": v} for k, v in feat["properties"]["measurements"].items()]
    back = _fresh(tiny_slide)
    hc.io.read_nuclei(fc, back, format="geojson")
    b = back.tables["histocell"]
    assert list(b.obs_names) == list(table.obs_names)
    assert b.obs["imported_type"].iloc[:5].isna().all()
    assert (b.obs["imported_type"].iloc[5:].astype(str) == table.obs["cell_type"].iloc[5:].astype(str)).all()
    np.testing.assert_array_equal(b.obsm["imported_proba"].to_numpy(), table.obsm["cell_type_proba"].to_numpy(np.float64))


def test_geojson_from_circles_and_foreign_ids(tiny_slide, tmp_path):
    """Circles (Point + radius) are written as 64-gons; a file with other ids is still numbered by position."""
    import geopandas as gpd
    from spatialdata.models import ShapesModel

    sdata = _fresh(tiny_slide)
    hc.datasets.truth_as_predictions(sdata)  # nuclei as 12-gons around the true centroids
    stand_in = sdata.shapes["nuclei"]
    assert _load(hc.io.write_geojson(sdata, tmp_path / "gons.geojson"))["features"][0]["geometry"]["coordinates"][0] == [
        list(xy) for xy in stand_in.geometry.iloc[0].exterior.coords
    ]
    centres = stand_in.geometry.centroid
    radius = np.sqrt(stand_in.geometry.area / np.pi).to_numpy()
    sdata.shapes["nuclei"] = ShapesModel.parse(gpd.GeoDataFrame({"radius": radius}, geometry=centres.to_numpy(), index=stand_in.index))
    fc = _load(hc.io.write_geojson(sdata, tmp_path / "circles.geojson"))
    ring = np.asarray(fc["features"][0]["geometry"]["coordinates"][0])
    assert fc["features"][0]["geometry"]["type"] == "Polygon" and len(ring) == 65
    assert np.allclose(np.hypot(ring[:, 0] - centres.iloc[0].x, ring[:, 1] - centres.iloc[0].y), radius[0])
    for i, feat in enumerate(fc["features"]):
        feat["id"], feat["properties"]["name"] = f"cell-{i}", f"cell-{i}"
    back = _fresh(tiny_slide)
    hc.io.read_nuclei(fc, back, format="geojson")
    assert back.tables["histocell"].obs_names[:2].tolist() == ["nucleus_1", "nucleus_2"]


def test_nuclei_under_other_names_are_found_by_their_table(tiny_slide, tmp_path):
    # own case nuclei_key_default: nuclei stored as key_added="nuc", nuclei_table_key="nuc_tab": pl.cell_types raised
    # spatialdata-plot's KeyError "Table 'nuc_tab' does not annotate element 'nuclei'" and write_geojson needed nuclei_key=
    import matplotlib.pyplot as plt

    sdata = _fresh(tiny_slide)
    hc.pp.store_nuclei(sdata, np.asarray(sdata.labels["truth_labels"]), key_added="nuc", nuclei_table_key="nuc_tab", labels_key=None)
    hc.tl.predict(sdata, hc.models.pretrained("tumor_stromal_lymphocyte"), nuclei_table_key="nuc_tab", progress=False)
    features = _load(hc.io.write_geojson(sdata, tmp_path / "nuc.geojson", nuclei_table_key="nuc_tab"))["features"]
    assert len(features) == sdata.tables["nuc_tab"].n_obs
    ax = hc.pl.cell_types(sdata, nuclei_table_key="nuc_tab", extent=(0, 300, 0, 300))
    assert ax.collections or ax.patches  # nuclei drawn
    plt.close(ax.figure)
    with pytest.raises(InvalidInputError, match=r"annotates \['nuc'\], not the shapes 'spots'"):
        hc.pl.cell_types(sdata, nuclei_table_key="nuc_tab", nuclei_key="spots")


def test_geojson_refuses_bad_input(predicted, tmp_path):
    path = hc.io.write_geojson(predicted, tmp_path / "cells.geojson")
    with pytest.raises(InvalidInputError, match="already exists"):
        hc.io.write_geojson(predicted, path)
    hc.io.write_geojson(predicted, path, overwrite=True, features=False)
    assert "area_um2" not in _load(path)["features"][0]["properties"]["measurements"]
    with pytest.raises(InvalidInputError, match="no nuclei table 'nope'"):
        hc.io.write_geojson(predicted, tmp_path / "x.geojson", nuclei_table_key="nope")
    with pytest.raises(InvalidInputError, match="no nuclei shapes 'nope'"):
        hc.io.write_geojson(predicted, tmp_path / "x.geojson", nuclei_key="nope")
    with pytest.raises(InvalidInputError, match=r"no obs\['nope'\].*cluster_key=None"):
        hc.io.write_geojson(predicted, tmp_path / "x.geojson", cluster_key="nope")
    with pytest.raises(InvalidInputError, match=r"no obsm\['nope'\].*proba_key=None"):
        hc.io.write_geojson(predicted, tmp_path / "x.geojson", proba_key="nope")
    with pytest.raises(InvalidInputError, match="no labels 'nope'"):
        hc.io.write_geojson(predicted, tmp_path / "x.geojson", labels_key="nope")
    with pytest.raises(InvalidInputError, match="no pixel in the labels"):
        empty = copy_for_writing(predicted)
        empty.labels["empty"] = hc.io.get_image(empty).isel(c=0).astype(np.int32) * 0  # no nucleus in it
        hc.io.write_geojson(empty, tmp_path / "x.geojson", labels_key="empty")
    # own case export_not_nuclei: an AnnData raised AttributeError; the spots table was written as nuclei; a bad mpp gave NaN µm
    for write in (hc.io.write_geojson, hc.io.write_csv):
        with pytest.raises(InvalidInputError, match="Expected a SpatialData sample, got AnnData"):
            write(predicted.tables["histocell"], tmp_path / "x.geojson")
        with pytest.raises(InvalidInputError, match="'table' is not a nuclei table"):
            write(predicted, tmp_path / "x.geojson", nuclei_table_key="table")
    bad = copy_for_writing(predicted)
    bad.tables["histocell"].uns["histocell"]["mpp"] = float("nan")
    with pytest.raises(InvalidInputError, match="records mpp nan"):
        hc.io.write_csv(bad, tmp_path / "x.geojson")
    assert not (tmp_path / "x.geojson").exists()


# ---------------------------------------------------------------------------------------- CSV


def test_csv_has_one_row_per_nucleus(predicted, tmp_path):
    path = hc.io.write_csv(predicted, tmp_path / "nuclei.csv")
    df = pd.read_csv(path)
    table = predicted.tables["histocell"]
    mpp = predicted.attrs["mpp"]
    assert len(df) == table.n_obs and df["nucleus_id"].tolist() == table.obs_names.tolist()
    assert df.columns[:5].tolist() == ["nucleus_id", "x_px", "y_px", "x_um", "y_um"]
    np.testing.assert_allclose(df[["x_px", "y_px"]].to_numpy(), table.obsm["spatial"])
    np.testing.assert_allclose(df[["x_um", "y_um"]].to_numpy(), table.obsm["spatial"] * mpp)
    for col in ("cell_type", "cell_state", "compartment"):
        assert (df[col] == table.obs[col].astype(str).to_numpy()).all()
    spot = table.obs["spot_id"]
    assert df["spot_id"].isna().tolist() == spot.isna().tolist()
    assert (df["spot_id"].dropna() == spot.dropna().astype(str).to_numpy()).all()
    proba = table.obsm["cell_type_proba"]
    np.testing.assert_allclose(df[[f"prob_{t}" for t in proba.columns]].to_numpy(), proba.to_numpy(), rtol=1e-6)
    assert any(c.startswith("compartment_prob_") for c in df.columns) and "region" not in df.columns
    np.testing.assert_allclose(df[list(table.var_names)].to_numpy(), table.X, rtol=1e-6)
    with pytest.raises(InvalidInputError, match="already exists"):
        hc.io.write_csv(predicted, path)
    slim = pd.read_csv(hc.io.write_csv(predicted, path, overwrite=True, features=False, proba_key=None))
    assert "area_um2" not in slim.columns and "prob_tumor" not in slim.columns
    with pytest.raises(InvalidInputError, match="no nuclei table"):
        hc.io.write_csv(predicted, tmp_path / "y.csv", nuclei_table_key="nope")


def test_geojson_outlines_of_a_raster_window_land_in_global_pixels(tiny_slide, tmp_path):
    """A raster covering a window of the image (Translation to global) is outlined where it lies."""
    sdata = _fresh(tiny_slide)
    truth = np.asarray(sdata.labels["truth_labels"])
    window = truth[200:600, 300:900]
    hc.pp.store_nuclei(sdata, window, origin=(200, 300), labels_key="window")
    path = hc.io.write_geojson(sdata, tmp_path / "w.geojson", cluster_key=None, proba_key=None)
    expected = np.zeros_like(truth)
    expected[200:600, 300:900] = _largest_parts(window)
    assert np.array_equal(_raster(path, truth.shape), expected)
