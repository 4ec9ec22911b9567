"""Visium HD: training bags from bins (centroid / overlap), pooling of low-count bins, fit on bins, bad input."""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import pytest
import shapely
import torch
from scipy import sparse

import histocell_sd as hc
from histocell_sd import InvalidInputError
from histocell_sd.io._spots import spot_geometry, spot_overlaps, square_spots_element
from histocell_sd.models import bag_mean, spot_posteriors
from histocell_sd.models._samples import prepare_sample
from histocell_sd.tl._deconvolution.pooling import pool_low_counts

MPP = 0.5
TYPES = list(hc.datasets.CELL_TYPES)


@pytest.fixture(scope="module")
def hd(tmp_path_factory):
    path, truth, reference = hc.datasets.synthetic_visium_hd(tmp_path_factory.mktemp("hd") / "outs", seed=1, progress=False)
    return path, truth, reference


def _bins(hd, size=8):
    sdata = hc.io.read_visium_hd(hd[0], bin_size_um=size)
    hc.pp.store_nuclei(sdata, hd[1].labels["truth_labels"].data.compute())
    return sdata


def _grid(side=10.0, n=3, angle=0.0, origin=(0.0, 0.0)):
    u = np.array([np.cos(angle), np.sin(angle)])
    v = np.array([-u[1], u[0]])
    r, c = np.divmod(np.arange(n * n), n)
    centres = np.asarray(origin) + ((c + 0.5) * side)[:, None] * u + ((r + 0.5) * side)[:, None] * v
    return square_spots_element(centres, side, [f"r{i}c{j}" for i, j in zip(r, c)], mpp=MPP, angle=angle), r, c


# ------------------------------------------------------------------------------------------- overlap bags
@pytest.mark.parametrize("angle", [0.0, 0.4])
def test_overlaps_agree_with_shapely_areas(angle):
    spots, _, _ = _grid(angle=angle, origin=(3.0, 2.0))
    nuclei = np.array([shapely.Point(18.0, 17.0).buffer(3.0), shapely.box(9.0, 9.0, 14.0, 12.0), shapely.Point(50.0, 50.0).buffer(2.0),
                       shapely.Point(8.0, 25.0).buffer(4.0, quad_segs=3)], dtype=object)
    poly, spot, area = spot_overlaps(spot_geometry(spots), nuclei)
    expected = {(i, j): shapely.intersection(nuclei[i], spots.geometry.iloc[j]).area for i in range(len(nuclei)) for j in range(len(spots))}
    expected = {k: v for k, v in expected.items() if v > 0}
    assert dict(zip(zip(poly.tolist(), spot.tolist()), area.tolist())) == pytest.approx(expected)
    assert 3 not in set(poly[poly == 2])  # the nucleus outside every bin has no pair
    assert 2 not in poly
    assert np.all(np.diff(spot) >= 0)  # sorted by spot
    assert len(set(spot[poly == 1])) >= 2  # a nucleus on a bin edge overlaps several bins


def test_circle_spots_overlap_as_discs():
    from histocell_sd.io._arrays import spots_element

    spots = spots_element(np.array([[0.0, 0.0]]), 10.0, ["a"], mpp=MPP)
    _, _, area = spot_overlaps(spot_geometry(spots), np.array([shapely.box(-20, -20, 20, 20)], dtype=object))
    assert area[0] == pytest.approx(np.pi * 100, rel=2e-3)


def test_overlap_bags_weights(hd):
    sdata = _bins(hd)
    table, nuclei = sdata.tables["table"], sdata.tables["histocell"]
    table.obsm["proportions"] = pd.DataFrame(np.full((table.n_obs, 2), 0.5), index=table.obs_names, columns=["a", "b"])
    config = hc.HistoCell(["a", "b"], encoder="scratch").settings
    kwargs = {"proportions_key": "proportions", "state_key": None, "spots_table_key": None, "nuclei_table_key": None,
              "image_key": None, "progress": False}
    centroid = prepare_sample(config, sdata, spot_bags="centroid", **kwargs)
    overlap = prepare_sample(config, sdata, **kwargs)  # the default for square bins
    assert overlap.spot_bags == "overlap" and centroid.spot_bags == "centroid" and centroid.spot_weights is None
    assert [len(w) for w in overlap.spot_weights] == [len(n) for n in overlap.spot_nuclei]
    rows, weights = np.concatenate(overlap.spot_nuclei), np.concatenate(overlap.spot_weights)
    assert (weights > 0).all() and (weights <= 1).all()
    per_nucleus = np.bincount(rows, weights=weights, minlength=nuclei.n_obs)
    # a nucleus's shares over the bins add up to 1 (all of it lies on bins), up to the polygons' simplification
    assert np.median(per_nucleus) == pytest.approx(1.0, abs=1e-6) and (per_nucleus <= 1 + 1e-5).all()
    # every centroid bag member is in its overlap bag; more bins get a bag (nuclei that cross into them)
    assert len(overlap.spot_nuclei) > len(centroid.spot_nuclei)
    by_spot = dict(zip(map(tuple, overlap.spot_xy_um.round(3)), overlap.spot_nuclei))
    for xy, members in zip(map(tuple, centroid.spot_xy_um.round(3)), centroid.spot_nuclei):
        assert set(members) <= set(by_spot[xy])
    with pytest.raises(InvalidInputError, match="spot_bags must be one of"):
        prepare_sample(config, sdata, spot_bags="area", **kwargs)
    del sdata.shapes["nuclei"]
    with pytest.raises(InvalidInputError, match="needs the nucleus polygons"):
        prepare_sample(config, sdata, spot_bags="overlap", **kwargs)


def test_spots_without_counts_carry_no_label(hd):
    sdata = _bins(hd)
    table = sdata.tables["table"]
    table.obsm["proportions"] = pd.DataFrame(np.full((table.n_obs, 2), 0.5), index=table.obs_names, columns=["a", "b"])
    config = hc.HistoCell(["a", "b"], encoder="scratch").settings
    kwargs = {"proportions_key": "proportions", "state_key": None, "spots_table_key": None, "nuclei_table_key": None,
              "image_key": None, "progress": False, "spot_bags": "centroid"}
    before = prepare_sample(config, sdata, **kwargs)
    totals = np.asarray(table.X.sum(axis=1)).ravel()
    held = pd.Index(sdata.tables["histocell"].obs["spot_id"].dropna().unique())
    emptied = [table.obs_names.get_loc(b) for b in held if totals[table.obs_names.get_loc(b)] > 0][:5]
    counts = table.X.tolil()
    counts[emptied] = 0
    table.X = counts.tocsr()
    after = prepare_sample(config, sdata, **kwargs)
    assert len(after.spot_nuclei) == len(before.spot_nuclei) - 5  # the 5 bins that lost their counts are skipped
    table.X = sparse.csr_matrix(table.shape)
    with pytest.raises(InvalidInputError, match="zero counts"):
        prepare_sample(config, sdata, **kwargs)


def test_weighted_bag_mean_and_posteriors():
    p = torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.5, 0.5], [0.3, 0.7]])
    bag = torch.tensor([0, 0, 1, -1])
    w = torch.tensor([0.25, 0.75, 0.4, 1.0])
    mean = bag_mean(p, bag, 2, w)
    torch.testing.assert_close(mean, torch.tensor([[0.25 * 0.9 + 0.75 * 0.2, 0.25 * 0.1 + 0.75 * 0.8], [0.5, 0.5]]))
    torch.testing.assert_close(bag_mean(p, bag, 2, torch.ones(4)), bag_mean(p, bag, 2))
    targets = torch.tensor([[0.6, 0.4], [0.5, 0.5]])
    q = spot_posteriors(p, bag, targets, iterations=200, weights=w)
    torch.testing.assert_close(bag_mean(q, bag, 2, w), targets, atol=1e-4, rtol=0)  # the weighted mean meets the proportions
    torch.testing.assert_close(q[3], p[3])


# ------------------------------------------------------------------------------------------- pooling
def test_pooling_low_count_bins():
    spots, r, c = _grid(n=5, angle=0.3, origin=(7.0, -4.0))
    rng = np.random.default_rng(0)
    counts = rng.poisson(6.0, size=(25, 4)).astype(np.float32)
    low, isolated = 12, 0  # the centre bin and a corner bin
    counts[low] = [1, 0, 0, 0]
    counts[isolated] = 0
    counts[[1, 5, 6]] = 0  # the corner's whole 3 × 3 window is empty: it needs a second ring
    pooled, n_bins = pool_low_counts(sparse.csr_matrix(counts), spot_geometry(spots), min_counts=10)
    pooled = pooled.toarray()
    window = (np.abs(r - 2) <= 1) & (np.abs(c - 2) <= 1)
    np.testing.assert_allclose(pooled[low], counts[window].sum(0))  # the 3 × 3 window's counts, summed
    assert n_bins[low] == 9
    second = (r <= 2) & (c <= 2)  # the corner bin's 5 × 5 window, cut by the grid's edge
    np.testing.assert_allclose(pooled[isolated], counts[second].sum(0))
    assert n_bins[isolated] == 9 and pooled[isolated].sum() >= 10
    above = counts.sum(1) >= 10
    np.testing.assert_array_equal(pooled[above], counts[above])  # bins above the minimum: untouched
    assert (n_bins[above] == 1).all()
    same, ones = pool_low_counts(sparse.csr_matrix(counts), spot_geometry(spots), min_counts=0)
    np.testing.assert_array_equal(same.toarray(), counts) and np.testing.assert_array_equal(ones, 1)


def test_pooling_refuses_circles_and_off_grid_bins():
    from histocell_sd.io._arrays import spots_element

    circles = spots_element(np.array([[0.0, 0.0], [20.0, 0.0]]), 5.0, ["a", "b"], mpp=MPP)
    with pytest.raises(InvalidInputError, match="square bins"):
        pool_low_counts(sparse.csr_matrix(np.ones((2, 3))), spot_geometry(circles), 5)
    scattered = square_spots_element(np.array([[0.0, 0.0], [13.0, 4.0]]), 10.0, ["a", "b"], mpp=MPP)
    with pytest.raises(InvalidInputError, match="one grid"):
        pool_low_counts(sparse.csr_matrix(np.ones((2, 3))), spot_geometry(scattered), 5)


def test_deconvolve_pools_zero_count_bins(hd):
    sdata = hc.io.read_visium_hd(hd[0], bin_size_um=16)
    table = sdata.tables["table"]
    x = table.X.tocsr().astype(np.float32)
    totals = np.asarray(x.sum(1)).ravel()
    zero = np.flatnonzero(totals > np.median(totals))[::25][:4]  # bins among counted neighbours, emptied
    keep = np.ones(len(totals), np.float32)
    keep[zero] = 0
    table.X = sparse.diags(keep) @ x
    table.X.eliminate_zeros()
    empty = (totals == 0).sum() + len(zero)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # empty bins are expected on Visium HD: counted, not warned about
        plain = hc.tl.deconvolve(sdata, hd[2], method="poisson", progress=False, copy=True).tables["table"]
    np.testing.assert_allclose(plain.obsm["proportions"].iloc[zero], 1 / len(TYPES))
    pooled_sample = hc.tl.deconvolve(sdata, hd[2], method="poisson", min_counts=20, progress=False, copy=True)
    pooled = pooled_sample.tables["table"]
    pool = pooled.obs["proportions_pool_bins"].to_numpy()
    assert (pool[zero] > 1).all() and pooled.uns["deconvolution"]["n_pooled"] == int((pool > 1).sum())
    assert (pool[np.setdiff1d(np.flatnonzero(totals >= 40), zero)] == 1).all()  # 40 counts on all genes: above 20 on the shared ones
    assert not np.allclose(pooled.obsm["proportions"].iloc[zero], 1 / len(TYPES))  # the neighbours' composition
    assert pooled.uns["deconvolution"]["min_counts"] == 20 and plain.uns["deconvolution"]["n_empty"] == empty
    again = hc.tl.deconvolve(pooled_sample, hd[2], method="poisson", progress=False, copy=True).tables["table"]
    assert "proportions_pool_bins" not in again.obs  # review: the pools of the replaced proportions are removed with them
    with pytest.raises(InvalidInputError, match="min_counts must be"):
        hc.tl.deconvolve(sdata, hd[2], method="poisson", min_counts=-1, progress=False)
    assert "proportions" not in table.obsm  # refused before writing


@pytest.mark.filterwarnings("ignore:The composition EM stopped")  # two spots of random counts: fractions creep to 0
def test_deconvolve_pooling_refuses_circles(hd):
    reference = hd[2]
    counts = pd.DataFrame(np.random.default_rng(0).poisson(3.0, (2, reference.n_vars)), index=["a", "b"], columns=reference.var_names)
    sdata = hc.io.from_arrays(np.full((300, 300, 3), 200, np.uint8), MPP, spot_centers=pd.DataFrame({"x": [60.0, 200.0], "y": [60.0, 200.0]},
                              index=["a", "b"]), counts=counts)
    with pytest.raises(InvalidInputError, match="are circles"):
        hc.tl.deconvolve(sdata, reference, method="poisson", min_counts=10, progress=False)
    hc.tl.deconvolve(sdata, reference, method="poisson", progress=False)  # without pooling they are deconvolved
    assert "proportions_pool_bins" not in sdata.tables["table"].obs


@pytest.mark.filterwarnings("ignore:The composition EM stopped")
def test_sparse_composition_em_matches_dense():
    from histocell_sd.tl._deconvolution.poisson import composition_em

    rng = np.random.default_rng(0)
    mu, rho = rng.dirichlet(np.ones(30), 4), np.array([1.0, 2.0, 0.5, 1.0])
    y = rng.poisson(0.3, (400, 30)).astype(float)
    dense = composition_em(y, mu, rho, max_iter=200, tol=1e-4)[0]
    np.testing.assert_allclose(composition_em(sparse.csr_matrix(y), mu, rho, max_iter=200, tol=1e-4)[0], dense, atol=1e-10)


# ------------------------------------------------------------------------------------------- fit on bins
@pytest.fixture(scope="module")
def trained(hd):
    sdata = _bins(hd, 16)
    hc.tl.deconvolve(sdata, hd[2], method="poisson", min_counts=30, progress=False)
    fits = [hc.HistoCell(TYPES, encoder="scratch", dim=16).fit(sdata, epochs=1, self_training_epochs=1, state_epochs=0, seed=3, progress=False)
            for _ in range(2)]
    return sdata, fits


@pytest.mark.slow
def test_fit_on_bins_is_deterministic(trained):
    sdata, (a, b) = trained
    assert a.training_summary_["spot_bags"] == ["overlap"]
    pa = a.predict_inputs(a.sample_inputs(sdata, progress=False), progress=False)["type"]
    pb = b.predict_inputs(b.sample_inputs(sdata, progress=False), progress=False)["type"]
    np.testing.assert_array_equal(pa, pb)
    c = hc.HistoCell(TYPES, encoder="scratch", dim=16).fit(sdata, epochs=1, self_training_epochs=1, state_epochs=0, seed=3,
                                                          spot_bags="centroid", progress=False)
    assert not np.allclose(c.predict_inputs(c.sample_inputs(sdata, progress=False), progress=False)["type"], pa)


@pytest.mark.slow
def test_model_from_bins_on_another_resolution(trained, hd):
    """A model keeps its training µm/px (canonical_mpp) and resamples any image within 4× of it; beyond, it refuses."""
    sdata, (model, _) = trained
    image = np.asarray(sdata.images["he"]["scale0"]["image"].transpose("y", "x", "c"))
    labels = hd[1].labels["truth_labels"].data.compute()
    fine = hc.io.from_arrays(np.repeat(np.repeat(image, 2, 0), 2, 1), MPP / 2)  # the same tissue at 0.25 µm/px
    hc.pp.store_nuclei(fine, np.repeat(np.repeat(labels, 2, 0), 2, 1))
    hc.tl.predict(fine, model, progress=False)
    hc.tl.predict(sdata, model, progress=False)
    here, there = sdata.tables["histocell"].obs["cell_type"], fine.tables["histocell"].obs["cell_type"]
    assert (here.astype(str).to_numpy() == there.reindex(here.index).astype(str).to_numpy()).mean() > 0.8
    coarse = hc.io.from_arrays(np.ascontiguousarray(image[::6, ::6]), MPP * 6)  # 3 µm/px: 6× coarser than the model
    hc.pp.store_nuclei(coarse, labels[::6, ::6])
    with pytest.raises(InvalidInputError, match=r"model works at 0.5 µm/px and cannot resample"):
        hc.tl.predict(coarse, model, progress=False)
    assert "cell_type" not in coarse.tables["histocell"].obs
