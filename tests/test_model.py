"""The HistoCell model: losses, neighbour attention, determinism, checkpoints, bad input, end to end.

One small model is trained per module on the ``"tiny"`` synthetic slide (seed 3), with nuclei stored
from the truth label raster (no segmentation) so the whole file stays fast on two cores.
"""

from __future__ import annotations

import json
import logging
import pickle
import shutil
import warnings

import numpy as np
import pandas as pd
import pytest
import torch

import histocell_sd as hc
from histocell_sd import InvalidInputError
from histocell_sd.models import HistoCell, NeighbourAttention, bag_mean, card_sha256, spot_posteriors, stage_epochs, symmetric_kl

FAST_EPOCHS = {"epochs": 6, "self_training_epochs": 0, "state_epochs": 2}
FAST = FAST_EPOCHS | {"progress": False}
TINY_FIT = {"epochs": 1, "self_training_epochs": 1, "state_epochs": 1, "progress": False}


# ---------------------------------------------------------------------------- fixtures
def _fresh_slide():
    """A fresh tiny slide (seed 3) with nuclei stored from the truth raster, and its reference."""
    from histocell_sd.datasets import synthetic_visium

    sdata, reference = synthetic_visium(seed=3, preset="tiny", progress=False)
    hc.pp.store_nuclei(sdata, np.asarray(sdata.labels["truth_labels"]))
    return sdata, reference


def _copy(sdata):
    import spatialdata

    copied = spatialdata.deepcopy(sdata)
    copied.attrs = dict(sdata.attrs)
    return copied


def _new_model(sdata) -> HistoCell:
    from histocell_sd.datasets import CELL_TYPES

    return HistoCell(list(CELL_TYPES), states=sdata.attrs["cell_states"])


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """One torch thread: on a shared two-core machine this is several times faster, and it keeps the
    fits bitwise reproducible (see test_same_seed_identical_with_several_threads)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def slide():
    """Module slide with nuclei; treat as read-only (tests that mutate take a copy)."""
    return _fresh_slide()


@pytest.fixture(scope="module")
def model(slide):
    sdata, _ = slide
    return _new_model(sdata).fit(sdata, **FAST)


@pytest.fixture(scope="module")
def predicted(slide, model):
    """A copy of the module slide with the module model's predictions."""
    sdata = _copy(slide[0])
    hc.tl.predict(sdata, model, progress=False)
    return sdata


@pytest.fixture(scope="module")
def checkpoint(model, tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "model"
    model.save(path)
    return path


def _image_array(sdata) -> np.ndarray:
    from histocell_sd.io import get_image

    return np.asarray(get_image(sdata).transpose("y", "x", "c"))


def _proba(sdata) -> pd.DataFrame:
    return sdata.tables["histocell"].obsm["cell_type_proba"].copy()


def _in_eval_mode(net: torch.nn.Module) -> bool:
    return not any(m.training for m in net.modules())


# ---------------------------------------------------------------------------- 1. losses
def test_bag_mean_averages_rows_of_each_bag_and_ignores_unbagged():
    p = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.5, 0.5], [0.2, 0.8], [9.0, 9.0]])
    bag = torch.tensor([0, 0, 1, 1, -1])
    out = bag_mean(p, bag, 3)
    expected = torch.tensor([[0.5, 0.5], [0.35, 0.65], [0.0, 0.0]])  # bag 2 is empty
    torch.testing.assert_close(out, expected)
    # the unbagged row does not leak into any bag, whatever its value
    p2 = p.clone()
    p2[4] = torch.tensor([-100.0, 100.0])
    torch.testing.assert_close(bag_mean(p2, bag, 3), expected)
    # gradients reach exactly the bagged rows
    p3 = p.clone().requires_grad_(True)
    bag_mean(p3, bag, 3).sum().backward()
    torch.testing.assert_close(p3.grad[:, 0], torch.tensor([0.5, 0.5, 0.5, 0.5, 0.0]))


def test_symmetric_kl_zero_symmetric_positive():
    a = torch.tensor([[0.2, 0.3, 0.5], [0.6, 0.4, 0.0]])
    b = torch.tensor([[0.5, 0.3, 0.2], [0.1, 0.1, 0.8]])
    assert float(symmetric_kl(a, a)) == pytest.approx(0.0, abs=1e-6)
    assert float(symmetric_kl(a, b)) == pytest.approx(float(symmetric_kl(b, a)), rel=1e-6)
    assert float(symmetric_kl(a, b)) > 0.1
    # hand-computed: batch mean of sum (q - p)(log q - log p)
    row0 = sum((q - p) * (np.log(q) - np.log(p)) for p, q in zip([0.2, 0.3, 0.5], [0.5, 0.3, 0.2]))
    assert float(symmetric_kl(a[:1], b[:1])) == pytest.approx(row0, rel=1e-4)
    # batch mean, not sum
    assert float(symmetric_kl(torch.cat([a[:1], a[:1]]), torch.cat([b[:1], b[:1]]))) == pytest.approx(row0, rel=1e-4)


def test_spot_posteriors_match_targets_and_keep_unbagged():
    g = torch.Generator().manual_seed(0)
    p = torch.softmax(1.5 * torch.randn(10, 3, generator=g), dim=1)
    bag = torch.tensor([0, 0, 0, 1, 1, 1, 1, -1, -1, 0])
    targets = torch.tensor([[0.5, 0.3, 0.2], [0.1, 0.6, 0.3]])
    q = spot_posteriors(p, bag, targets)
    torch.testing.assert_close(bag_mean(q, bag, 2), targets, atol=1e-3, rtol=0)
    torch.testing.assert_close(q[bag == -1], p[bag == -1])
    torch.testing.assert_close(q.sum(1), torch.ones(10))
    assert (q >= 0).all()


# ---------------------------------------------------------------------------- 2. neighbour attention
@pytest.fixture
def attention():
    torch.manual_seed(0)
    layer = NeighbourAttention(8, heads=2, radius_um=30.0).eval()
    h = torch.randn(6, 8)
    return layer, h


def test_attention_ignores_padding_and_non_neighbours(attention):
    layer, h = attention
    # row 0 of h_keys is what padding (-1) is clamped to: it must get zero attention from query 1
    neighbors = torch.tensor([[1, 2, -1, -1], [2, 3, 4, -1]])
    distances = torch.tensor([[0.0, 5.0, 0.0, 0.0], [0.0, 8.0, 12.0, 0.0]])
    query = h[[1, 2]]
    out = layer(query, h, neighbors, distances)
    changed = h.clone()
    changed[0] += 10.0  # only ever a padded neighbour
    changed[5] -= 10.0  # not a neighbour at all
    torch.testing.assert_close(layer(query, changed, neighbors, distances), out)
    # a real neighbour changes the output of exactly the queries that list it
    changed = h.clone()
    changed[4] += 3.0
    moved = layer(query, changed, neighbors, distances)
    torch.testing.assert_close(moved[0], out[0])
    assert (moved[1] - out[1]).abs().max() > 1e-3


def test_attention_mixes_neighbours_and_sums_to_one(attention):
    layer, h = attention
    # identical keys/values at different distances: whatever the weights, a convex combination of
    # one value vector is that vector, so the output equals a single-neighbour output.
    keys = h.clone()
    keys[2] = keys[3] = keys[4] = h[2]
    query = h[[1]]
    several = layer(query, keys, torch.tensor([[2, 3, 4, -1]]), torch.tensor([[1.0, 9.0, 20.0, 0.0]]))
    single = layer(query, keys, torch.tensor([[2, -1, -1, -1]]), torch.tensor([[1.0, 0.0, 0.0, 0.0]]))
    torch.testing.assert_close(several, single)
    # the layer really mixes: the output depends on the neighbours, not only on the query
    other = layer(query, h, torch.tensor([[5, -1, -1, -1]]), torch.tensor([[1.0, 0.0, 0.0, 0.0]]))
    assert (other - single).abs().max() > 1e-3
    # a nucleus with no valid neighbour gets a finite output (no NaN from an all-masked softmax)
    lonely = layer(query, h, torch.tensor([[-1, -1, -1, -1]]), torch.zeros(1, 4))
    assert torch.isfinite(lonely).all()


def test_attention_weights_sum_to_one_over_valid_neighbours(attention, monkeypatch):
    layer, h = attention
    captured = []
    softmax = torch.softmax

    def spy(x, dim=None, **kwargs):
        out = softmax(x, dim=dim, **kwargs)
        captured.append(out.detach())
        return out

    monkeypatch.setattr(torch, "softmax", spy)
    neighbors = torch.tensor([[1, 2, -1, -1], [2, 3, 4, 5]])
    layer(h[[1, 2]], h, neighbors, torch.tensor([[0.0, 4.0, 0.0, 0.0], [0.0, 3.0, 6.0, 9.0]]))
    assert len(captured) == 1
    weights = captured[0]  # (n, k, heads)
    torch.testing.assert_close(weights.sum(1), torch.ones(2, layer.heads))
    assert (weights[0, 2:] == 0).all()  # padding gets zero attention
    assert (weights[:, :2] > 0).all()


# ---------------------------------------------------------------------------- 3. determinism
@pytest.fixture
def threads():
    """Set torch's intra-op threads for one test, restoring them afterwards."""
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


def test_same_seed_same_predictions(slide):
    sdata = _copy(slide[0])
    a = _new_model(sdata).fit(sdata, seed=7, **TINY_FIT)
    assert _in_eval_mode(a.net)
    hc.tl.predict(sdata, a, progress=False)
    first = _proba(sdata)
    b = _new_model(sdata).fit(sdata, seed=7, **TINY_FIT)
    hc.tl.predict(sdata, b, progress=False)
    pd.testing.assert_frame_equal(_proba(sdata), first, check_exact=True)
    assert a.history_.equals(b.history_)
    timing = a.fit_timing_  # wall-clock seconds, kept out of the history and the card
    assert len(timing["epoch_s"]) == len(a.history_) and 0 < timing["prepare_s"] + sum(timing["epoch_s"]) <= timing["fit_s"]
    # a different seed gives a different model
    c = _new_model(sdata).fit(sdata, seed=8, **TINY_FIT)
    hc.tl.predict(sdata, c, progress=False)
    assert not np.array_equal(_proba(sdata).to_numpy(), first.to_numpy())


def test_attention_gradients_reproducible_with_several_threads(threads):
    threads(2)
    torch.manual_seed(0)
    layer = NeighbourAttention(64)
    h = torch.randn(400, 64)
    neighbors = torch.randint(0, 400, (4000, 12))
    distances = 30 * torch.rand(4000, 12)

    def gradient():
        keys = h.clone().requires_grad_(True)
        layer(keys.repeat(10, 1), keys, neighbors, distances).sum().backward()
        return keys.grad

    reference = gradient()
    for _ in range(3):
        torch.testing.assert_close(gradient(), reference, rtol=0, atol=0)


def test_predicting_twice_is_identical_and_eval_mode(slide, model):
    assert _in_eval_mode(model.net)
    sdata = _copy(slide[0])
    hc.tl.predict(sdata, model, progress=False)
    first = _proba(sdata)
    hc.tl.predict(sdata, model, progress=False)
    pd.testing.assert_frame_equal(_proba(sdata), first, check_exact=True)
    assert _in_eval_mode(model.net)


def test_predict_copy_leaves_the_input_unchanged(slide, model, predicted):
    sdata = _copy(slide[0])
    result = hc.tl.predict(sdata, model, copy=True, progress=False)
    assert "cell_type" not in sdata.tables["histocell"].obs and "histocell_proportions" not in sdata.tables["table"].obsm
    assert result is not sdata and result.images["he"] is sdata.images["he"]  # images shared, not duplicated
    pd.testing.assert_frame_equal(_proba(result), _proba(predicted), check_exact=True)  # the same as in place
    assert "histocell_proportions" in result.tables["table"].obsm
    assert hc.tl.predict(sdata, model, progress=False) is None


# ---------------------------------------------------------------------------- 4. checkpoints
def test_save_load_round_trip(slide, model, predicted, checkpoint, monkeypatch):
    def no_pickle(*args, **kwargs):
        raise AssertionError("loading a checkpoint must not unpickle anything")

    monkeypatch.setattr(pickle, "load", no_pickle)
    monkeypatch.setattr(pickle, "loads", no_pickle)
    monkeypatch.setattr(torch, "load", no_pickle)
    loaded = HistoCell.load(checkpoint)
    monkeypatch.undo()
    assert _in_eval_mode(loaded.net)
    assert loaded.cell_types == model.cell_types
    assert loaded.state_names == model.state_names
    assert loaded.compartment_labels == model.compartment_labels
    assert loaded.preprocessing == model.preprocessing
    np.testing.assert_array_equal(loaded.feature_mean_, model.feature_mean_)
    np.testing.assert_array_equal(loaded.feature_std_, model.feature_std_)
    assert loaded.training_summary_ == model.training_summary_
    assert list(loaded.history_.columns) == list(model.history_.columns)
    for key, value in model.net.state_dict().items():
        assert torch.equal(loaded.net.state_dict()[key], value), key
    sdata = _copy(slide[0])
    hc.tl.predict(sdata, loaded, progress=False)
    pd.testing.assert_frame_equal(_proba(sdata), _proba(predicted), check_exact=True)
    assert sdata.tables["histocell"].obs["cell_type"].equals(predicted.tables["histocell"].obs["cell_type"])


def test_refit_of_a_loaded_model_starts_from_its_nucleus_encoder(slide, checkpoint):
    loaded = HistoCell.load(checkpoint)
    encoder = {key: value.clone() for key, value in loaded.net.nucleus.state_dict().items()}
    loaded.fit(slide[0], encoder_lr_factor=0, **TINY_FIT)  # a frozen encoder keeps exactly what it started from
    for key, value in encoder.items():
        assert torch.equal(loaded.net.nucleus.state_dict()[key], value), key


def test_model_card_contents(model, checkpoint):
    from safetensors import safe_open

    files = sorted(p.name for p in checkpoint.iterdir())
    assert files == ["model_card.json", "weights.safetensors"]
    card = json.loads((checkpoint / "model_card.json").read_text())
    assert card["cell_types"] == model.cell_types == ["tumor", "fibroblast", "lymphocyte", "macrophage", "endothelial"]
    assert card["states"] == model.states
    assert card["state_names"] == model.state_names
    assert card["states"]["tumor"] == ["tumor_proliferative", "tumor_quiescent"]
    assert card["compartment_labels"] == model.compartment_labels
    pre = card["preprocessing"]
    for key in ("crop_px", "canonical_mpp", "context_mpp", "n_neighbors", "radius_um", "max_nuclei_per_spot"):
        assert pre[key] == model.preprocessing[key]
    assert card["package_version"] == hc.__version__
    assert isinstance(card["format_version"], int)
    summary = card["training_summary"]
    assert summary["nuclei"] == 1572 and summary["seed"] == 0
    assert summary["spots_train"] + summary["spots_val"] == 49
    assert np.isfinite(summary["val_loss"]) and np.isfinite(summary["val_spot_pearson"])
    for key in ("val_called_share", "val_label_share"):  # what the held-out spots' nuclei are called, and their labels
        assert list(summary[key]) == model.cell_types and abs(sum(summary[key].values()) - 1) < 1e-3, key
    # weights are a safetensors file (8-byte header length + JSON header), not a pickle
    raw = (checkpoint / "weights.safetensors").read_bytes()
    header = int.from_bytes(raw[:8], "little")
    assert raw[8:9] == b"{" and json.loads(raw[8 : 8 + header])
    assert not raw.startswith(b"\x80")  # pickle protocol marker
    with safe_open(str(checkpoint / "weights.safetensors"), framework="pt") as f:
        assert set(f.keys()) == set(model.net.state_dict())


def test_fit_warns_when_a_labelled_type_is_hardly_ever_called(slide, monkeypatch):
    from histocell_sd.models._trainer import Trainer, _warn_if_collapsed

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _warn_if_collapsed({"a": 0.6, "b": 0.38, "c": 0.02}, {"a": 0.5, "b": 0.3, "c": 0.2})  # rare calls, not none
        _warn_if_collapsed({"a": 0.995, "b": 0.005}, {"a": 0.95, "b": 0.05})  # a rare type rarely called
    with pytest.warns(UserWarning, match=r"hardly ever calls \['b'\].*b 40 % of the labels, 0.5 % of the calls"):
        _warn_if_collapsed({"a": 0.995, "b": 0.005}, {"a": 0.6, "b": 0.4})
    n = len(slide[0].tables["table"].obsm["proportions"].columns)
    collapsed = (np.eye(n)[0], np.full(n, 1 / n))  # every held-out nucleus called the first type
    checked = []  # the tiles the check ran on
    monkeypatch.setattr(Trainer, "_called_shares", lambda self, tiles: (checked.append((tiles, self.val, self.train)), collapsed)[1])
    with pytest.warns(UserWarning, match="on the held-out spots' nuclei.*collapsed towards the commoner types"):
        _new_model(slide[0]).fit(slide[0], **TINY_FIT)
    # with no spot held out the check runs on the training spots, and says so
    with pytest.warns(UserWarning, match=r"on the training spots' nuclei.*training_summary_\['train_called_share'\]"):
        model = _new_model(slide[0]).fit(slide[0], val_fraction=0, **TINY_FIT)
    summary = model.training_summary_
    (first, val, _), (second, no_val, train) = checked
    assert first is val and val and second is train and train and not no_val
    assert summary["spots_val"] == 0 and "val_called_share" not in summary
    assert summary["train_called_share"] == dict(zip(model.cell_types, collapsed[0]))
    assert summary["train_label_share"] == dict(zip(model.cell_types, collapsed[1].round(4)))


def _tiles(sizes, samples=2):
    """(sample, spots) tiles of the given sizes, spread over ``samples`` samples, spot rows numbered per sample."""
    tiles, start = [], [0] * samples
    for i, n in enumerate(sizes):
        sample = i % samples
        tiles.append((sample, np.arange(start[sample], start[sample] + n)))
        start[sample] += n
    return tiles


def _spot_set(tiles):
    return {(sample, int(s)) for sample, spots in tiles for s in spots}


def test_split_spots_holds_out_whole_tiles():
    from histocell_sd.models._samples import split_spots

    tiles = _tiles([10] * 20)
    train, val, used = split_spots(tiles, 0.15, np.random.default_rng(0))
    assert used == "tiles" and len(val) == 3 and len(train) == 17  # 30 of the 200 spots: three whole tiles
    whole = {(sample, tuple(spots)) for sample, spots in tiles}
    assert all((sample, tuple(spots)) in whole for sample, spots in train + val)
    assert _spot_set(train) | _spot_set(val) == _spot_set(tiles) and not _spot_set(train) & _spot_set(val)
    again = split_spots(tiles, 0.15, np.random.default_rng(0))[1]
    assert [(a, list(b)) for a, b in again] == [(a, list(b)) for a, b in val]  # same seed, same split
    assert {tuple(b) for _, b in split_spots(tiles, 0.15, np.random.default_rng(1))[1]} != {tuple(b) for _, b in val}
    # tiles of unequal size: tiles are added until they hold the share, and one tile always trains
    for seed in range(20):
        train, val, _ = split_spots(_tiles([1, 1, 1, 100], samples=1), 0.5, np.random.default_rng(seed))
        assert train and val and sum(len(s) for _, s in val) < 103
    assert split_spots(tiles, 0.0, np.random.default_rng(0))[1:] == ([], "spots")


def test_split_spots_falls_back_to_spots_with_few_tiles():
    from histocell_sd.models._samples import split_spots

    tiles = _tiles([50] * 4)  # 4 tiles × 0.15 < 1: a whole tile would be a quarter of the spots
    train, val, used = split_spots(tiles, 0.15, np.random.default_rng(0))
    assert used == "spots" and 10 <= sum(len(s) for _, s in val) <= 50
    assert _spot_set(train) | _spot_set(val) == _spot_set(tiles) and not _spot_set(train) & _spot_set(val)
    assert split_spots(tiles, 0.15, np.random.default_rng(0), "spots")[2] == "spots"
    assert split_spots(_tiles([10] * 20), 0.15, np.random.default_rng(0), "spots")[2] == "spots"


@pytest.mark.filterwarnings("ignore:The fitted model hardly ever calls")  # one epoch
def test_fit_records_how_spots_were_held_out(slide):
    from histocell_sd.datasets import CELL_TYPES

    sdata = slide[0]
    assert _new_model(sdata).fit(sdata, **TINY_FIT).training_summary_["holdout"] == "spots"  # too few 400 µm tiles
    small_tiles = HistoCell(list(CELL_TYPES), states=sdata.attrs["cell_states"], tile_um=100.0)
    summary = small_tiles.fit(sdata, **TINY_FIT).training_summary_
    assert summary["holdout"] == "tiles" and summary["spots_val"] > 0 and summary["spots_train"] + summary["spots_val"] == 49
    assert small_tiles.fit(sdata, holdout="spots", **TINY_FIT).training_summary_["holdout"] == "spots"
    assert small_tiles.fit(sdata, val_fraction=0, **TINY_FIT).training_summary_["holdout"] is None


def _broken(checkpoint, tmp_path, name="broken"):
    path = tmp_path / name
    shutil.copytree(checkpoint, path)
    return path


def _edit_card(path, edit):
    card = json.loads((path / "model_card.json").read_text())
    edit(card)
    (path / "model_card.json").write_text(json.dumps(card))


def test_load_refuses_missing_files(checkpoint, tmp_path):
    path = _broken(checkpoint, tmp_path)
    (path / "weights.safetensors").unlink()
    with pytest.raises(InvalidInputError, match="missing weights.safetensors"):
        HistoCell.load(path)
    path = _broken(checkpoint, tmp_path, "nocard")
    (path / "model_card.json").unlink()
    with pytest.raises(InvalidInputError, match="missing model_card.json"):
        HistoCell.load(path)
    with pytest.raises(InvalidInputError, match="No checkpoint folder at"):
        HistoCell.load(tmp_path / "does_not_exist")


def test_load_refuses_bad_card(checkpoint, tmp_path):
    path = _broken(checkpoint, tmp_path, "notjson")
    (path / "model_card.json").write_text("{ this is not json")
    with pytest.raises(InvalidInputError, match="not valid JSON"):
        HistoCell.load(path)

    path = _broken(checkpoint, tmp_path, "version")
    _edit_card(path, lambda card: card.update(format_version=999))
    with pytest.raises(InvalidInputError, match="format version 999"):
        HistoCell.load(path)

    path = _broken(checkpoint, tmp_path, "format")
    _edit_card(path, lambda card: card.update(format="something-else"))
    with pytest.raises(InvalidInputError, match="not a histocell-sd model card"):
        HistoCell.load(path)

    path = _broken(checkpoint, tmp_path, "lacks")
    _edit_card(path, lambda card: card.pop("preprocessing"))
    with pytest.raises(InvalidInputError, match="lacks"):
        HistoCell.load(path)


def test_load_refuses_corrupt_weights(checkpoint, tmp_path):
    path = _broken(checkpoint, tmp_path)
    raw = bytearray((path / "weights.safetensors").read_bytes())
    for i in range(len(raw) - 64, len(raw) - 32):  # flip bytes inside the tensor data
        raw[i] ^= 0xFF
    (path / "weights.safetensors").write_bytes(bytes(raw))
    with pytest.raises(InvalidInputError, match="checksum"):
        HistoCell.load(path)


def test_load_refuses_cell_types_that_do_not_match_weights(checkpoint, tmp_path):
    # drop a cell type and fix nothing else
    path = _broken(checkpoint, tmp_path, "dropped")
    _edit_card(path, lambda card: card["cell_types"].remove("endothelial"))
    with pytest.raises(InvalidInputError, match="edited after saving"):
        HistoCell.load(path)

    # reordering cell types would silently swap labels: the card's structure checksum refuses it
    path = _broken(checkpoint, tmp_path, "reordered")
    _edit_card(path, lambda card: card["cell_types"].reverse())
    with pytest.raises(InvalidInputError, match="edited after saving"):
        HistoCell.load(path)

    # drop it consistently from the whole card and forge the checksum: the weights (5 type logits) no longer fit
    def drop_everywhere(card):
        card["cell_types"].remove("endothelial")
        card["states"].pop("endothelial")
        card["compartments"].pop("endothelial")
        card["card_sha256"] = card_sha256(card)

    path = _broken(checkpoint, tmp_path, "consistent")
    _edit_card(path, drop_everywhere)
    with pytest.raises(InvalidInputError, match="weights do not fit the model card"):
        HistoCell.load(path)


def test_save_refuses_existing_path_without_overwrite(model, checkpoint, tmp_path):
    path = _broken(checkpoint, tmp_path)
    with pytest.raises(InvalidInputError, match="already exists"):
        model.save(path)
    model.save(path, overwrite=True)
    assert HistoCell.load(path).cell_types == model.cell_types
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left


# ---------------------------------------------------------------------------- 5. bad input
def test_fit_refuses_unknown_cell_type_column(slide):
    sdata = _copy(slide[0])
    table = sdata.tables["table"]
    table.obsm["proportions"] = table.obsm["proportions"].rename(columns={"macrophage": "monocyte"})
    with pytest.raises(InvalidInputError, match="monocyte"):
        _new_model(sdata).fit(sdata, **TINY_FIT)


def test_fit_refuses_missing_cell_type_column(slide):
    sdata = _copy(slide[0])
    table = sdata.tables["table"]
    props = table.obsm["proportions"].drop(columns="endothelial")
    props.loc[props.sum(1) == 0, "tumor"] = 1.0
    table.obsm["proportions"] = props.div(props.sum(1), axis=0)
    with pytest.raises(InvalidInputError, match="lacks the cell types \\['endothelial'\\]"):
        _new_model(sdata).fit(sdata, **TINY_FIT)


def test_fit_refuses_missing_proportions_key(slide):
    sdata = slide[0]
    with pytest.raises(InvalidInputError, match="no obsm\\['not_there'\\]"):
        _new_model(sdata).fit(sdata, proportions_key="not_there", **TINY_FIT)


def test_fit_refuses_zero_spots(slide):
    sdata = _copy(slide[0])
    # a spots table with no rows cannot be parsed by spatialdata, so bypass its validation
    sdata.tables.data["table"] = sdata.tables["table"][:0].copy()
    assert sdata.tables["table"].obsm["proportions"].shape == (0, 5)
    with pytest.raises(InvalidInputError, match="zero spots"):
        _new_model(sdata).fit(sdata, **TINY_FIT)


def test_fit_refuses_all_zero_proportions(slide):
    sdata = _copy(slide[0])
    table = sdata.tables["table"]
    table.obsm["proportions"] = table.obsm["proportions"] * 0.0
    with pytest.raises(InvalidInputError, match="all zero"):
        _new_model(sdata).fit(sdata, **TINY_FIT)


def test_fit_refuses_spots_without_any_nucleus(slide):
    sdata = _copy(slide[0])
    sdata.tables["histocell"].obs["spot_id"] = np.nan
    with pytest.raises(InvalidInputError, match="No nucleus lies in a spot"):
        _new_model(sdata).fit(sdata, **TINY_FIT)


def test_fit_skips_spots_without_nuclei_with_a_log(slide, caplog):
    sdata = _copy(slide[0])
    obs = sdata.tables["histocell"].obs
    emptied = obs["spot_id"].dropna().unique()[:3]
    obs.loc[obs["spot_id"].isin(emptied), "spot_id"] = np.nan
    with caplog.at_level(logging.WARNING, logger="histocell_sd"):
        model = _new_model(sdata).fit(sdata, epochs=1, self_training_epochs=0, state_epochs=0, progress=False)
    assert "3 of 49 spots hold no nucleus and are skipped" in caplog.text
    assert model.training_summary_["spots_train"] + model.training_summary_["spots_val"] == 46


def test_resolution_that_cannot_be_resampled(slide, model):
    sdata = _copy(slide[0])
    sdata.attrs["mpp"] = 20.0
    sdata.tables["histocell"].uns["histocell"]["mpp"] = 20.0  # consistently declared (else refused as mis-declared)
    with pytest.raises(InvalidInputError, match="cannot resample"):
        hc.tl.predict(sdata, model, progress=False)
    with pytest.raises(InvalidInputError, match="cannot resample"):
        _new_model(sdata).fit(sdata, **TINY_FIT)


def test_predict_refuses_untrained_model(slide):
    sdata = _copy(slide[0])
    with pytest.raises(InvalidInputError, match="untrained"):
        hc.tl.predict(sdata, _new_model(sdata), progress=False)
    with pytest.raises(InvalidInputError, match="HistoCell"):
        hc.tl.predict(sdata, object(), progress=False)


def test_predict_refuses_sdata_without_nuclei(slide, model):
    sdata = hc.io.from_arrays(_image_array(slide[0]), 0.5)
    with pytest.raises(InvalidInputError, match="No nuclei table 'histocell'"):
        hc.tl.predict(sdata, model, progress=False)


def test_constructor_refuses_bad_types_and_states():
    with pytest.raises(InvalidInputError):
        HistoCell(["tumor"])
    with pytest.raises(InvalidInputError):
        HistoCell(["tumor", "tumor"])
    with pytest.raises(InvalidInputError, match="unknown cell types"):
        HistoCell(["tumor", "stroma"], states={"immune": ["a", "b"]})


def test_types_only_model_ignores_state_proportions(slide):
    sdata = slide[0]
    assert "state_proportions" in sdata.tables["table"].obsm
    model = HistoCell(list(sdata.tables["table"].obsm["proportions"].columns))
    model.fit(sdata, epochs=1, self_training_epochs=0, state_epochs=1, progress=False)
    assert model.training_summary_["states_trained"] is False


# ---------------------------------------------------------------------------- 6. end to end
def test_fit_beats_prior_only_on_nuclei(predicted, model):
    table = predicted.tables["histocell"]
    truth = predicted.tables["truth_nuclei"].obs
    truth = truth.set_index("nucleus_" + truth["label_id"].astype(str))["cell_type"].astype(str)
    truth = truth.reindex(table.obs_names)
    assert truth.notna().all()
    predicted_types = table.obs["cell_type"].astype(str)
    accuracy = float((predicted_types.to_numpy() == truth.to_numpy()).mean())
    prior_only = float((truth == truth.value_counts().index[0]).mean())
    assert accuracy >= prior_only + 0.15, (accuracy, prior_only)
    assert predicted_types.nunique() >= 2
    history = model.history_
    assert list(history.columns[:2]) == ["stage", "epoch"] and set(history["stage"]) == {"types", "states"}
    assert history["val_loss"].notna().all()


def test_predicted_spot_proportions_correlate_with_truth(predicted, model):
    spots = predicted.tables["table"]
    mean = spots.obsm["histocell_proportions"]
    assert list(mean.columns) == model.cell_types
    assert list(mean.index) == list(spots.obs_names)
    ok = mean.notna().all(1)
    assert ok.sum() >= 45
    np.testing.assert_allclose(mean[ok].sum(1), 1.0, atol=1e-5)
    true = spots.obsm["true_proportions"][model.cell_types].loc[mean.index[ok]]
    r = np.corrcoef(mean[ok].to_numpy().ravel(), true.to_numpy().ravel())[0, 1]
    assert r >= 0.8, r
    assert (spots.obs["n_nuclei"][ok] > 0).all()


def test_prediction_outputs(predicted, model):
    table = predicted.tables["histocell"]
    obs = table.obs
    assert isinstance(obs["cell_type"].dtype, pd.CategoricalDtype)
    present = [t for t in model.cell_types if (obs["cell_type"] == t).any()]
    assert list(obs["cell_type"].cat.categories) == present  # only what occurs, in the model's order (squidpy needs it)
    colours = dict(zip(present, table.uns["cell_type_colors"]))
    assert colours == {t: hc._constants.PALETTE[model.cell_types.index(t)] for t in present}  # a type keeps its colour
    proba = table.obsm["cell_type_proba"]
    assert isinstance(proba, pd.DataFrame)
    assert list(proba.columns) == model.cell_types and proba.index.equals(table.obs_names)
    np.testing.assert_allclose(proba.sum(1), 1.0, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(model.cell_types)[proba.to_numpy().argmax(1)], obs["cell_type"].astype(str).to_numpy())
    assert (obs["cell_type_entropy"] >= 0).all() and (obs["cell_type_entropy"] <= np.log(5) + 1e-6).all()
    assert set(obs["cell_state"].cat.categories) <= set(model.state_names)
    state = table.obsm["cell_state_proba"]
    assert list(state.columns) == model.state_names
    np.testing.assert_allclose(state.sum(1), 1.0, atol=1e-5)
    # joint P(state): summing a type's states gives P(type)
    tumor = state[["tumor_proliferative", "tumor_quiescent"]].sum(1)
    np.testing.assert_allclose(tumor, proba["tumor"], atol=1e-5)
    assert set(obs["compartment"].cat.categories) <= set(model.compartment_labels)
    np.testing.assert_allclose(table.obsm["compartment_proba"].sum(1), 1.0, atol=1e-5)
    assert table.obsm["histocell_embedding"].shape == (table.n_obs, model.preprocessing["dim"])
    assert "cell_type_mc_std" not in obs


def test_histology_only_prediction(slide, model):
    sdata = hc.io.from_arrays(_image_array(slide[0]), 0.5)
    hc.pp.store_nuclei(sdata, np.asarray(slide[0].labels["truth_labels"]))
    assert "table" not in sdata.tables and "spots" not in sdata.shapes
    hc.tl.predict(sdata, model, progress=False)
    assert set(sdata.tables) == {"histocell"}
    table = sdata.tables["histocell"]
    assert table.n_obs == 1572
    np.testing.assert_allclose(table.obsm["cell_type_proba"].sum(1), 1.0, atol=1e-5)
    assert {"cell_type", "cell_state", "compartment"} <= set(table.obs)


# ---------------------------------------------------------------------------- 7. from_arrays
def test_api_on_from_arrays_data(slide):
    source = slide[0]
    spots = source.shapes["spots"]
    centers = pd.DataFrame({"x": spots.geometry.x, "y": spots.geometry.y}, index=spots.index.astype(str))
    proportions = source.tables["table"].obsm["proportions"].loc[centers.index]
    sdata = hc.io.from_arrays(_image_array(source), 0.5, spot_centers=centers, proportions=proportions)
    hc.pp.store_nuclei(sdata, np.asarray(source.labels["truth_labels"]))
    in_spots = sdata.tables["histocell"].obs["spot_id"].notna()
    assert in_spots.sum() == slide[0].tables["histocell"].obs["spot_id"].notna().sum()
    cell_types = list(proportions.columns)
    model = HistoCell(cell_types).fit(sdata, epochs=2, self_training_epochs=0, state_epochs=0, progress=False)
    assert model.training_summary_["states_trained"] is False
    hc.tl.predict(sdata, model, progress=False)
    table = sdata.tables["histocell"]
    assert set(table.obs["cell_type"].cat.categories) <= set(cell_types)
    mean = sdata.tables["table"].obsm["histocell_proportions"]
    assert list(mean.columns) == cell_types and mean.notna().all(1).sum() >= 45


# ---------------------------------------------------------------------------- 8. MC dropout
def test_mc_dropout(slide, model, predicted):
    sdata = _copy(slide[0])
    hc.tl.predict(sdata, model, mc_samples=3, progress=False)
    table = sdata.tables["histocell"]
    std = table.obs["cell_type_mc_std"]
    assert std.notna().all() and (std >= 0).all() and (std > 0).any()
    pd.testing.assert_frame_equal(_proba(sdata), _proba(predicted), check_exact=True)
    assert _in_eval_mode(model.net)


@pytest.mark.filterwarnings("ignore:The fitted model hardly ever calls")  # one epoch: the second member may collapse
def test_ensemble_averages_its_members(slide, model, predicted):
    """Several fitted models predict as one: mean probabilities, embeddings side by side, their disagreement."""
    other = _new_model(slide[0]).fit(slide[0], **(TINY_FIT | {"seed": 1}))
    alone = _copy(slide[0])
    hc.tl.predict(alone, other, progress=False)
    sdata = _copy(slide[0])
    hc.tl.predict(sdata, [model, other], progress=False)
    table = sdata.tables["histocell"]
    expected = (_proba(predicted) + _proba(alone)) / 2
    pd.testing.assert_frame_equal(_proba(sdata), expected, check_exact=False, atol=1e-6)
    assert (table.obs["cell_type"].astype(str).to_numpy() == expected.idxmax(axis=1).to_numpy()).all()
    states = (predicted.tables["histocell"].obsm["cell_state_proba"] + alone.tables["histocell"].obsm["cell_state_proba"]) / 2
    pd.testing.assert_frame_equal(table.obsm["cell_state_proba"], states, check_exact=False, atol=1e-6)
    assert table.obsm["histocell_embedding"].shape == (table.n_obs, 2 * model.settings.dim)
    spread = table.obs["cell_type_ensemble_std"]
    assert (spread >= 0).all() and (spread > 0).any()
    assert table.uns["histocell"]["ensemble_size"] == 2
    mean = sdata.tables["table"].obsm["histocell_proportions"].dropna()
    assert np.allclose(mean.sum(1), 1.0, atol=1e-5)
    hc.tl.predict(sdata, [model], progress=False)  # a list of one is the model itself; the ensemble's columns go
    pd.testing.assert_frame_equal(_proba(sdata), _proba(predicted), check_exact=True)
    assert "cell_type_ensemble_std" not in sdata.tables["histocell"].obs
    assert sdata.tables["histocell"].uns["histocell"]["ensemble_size"] == 1


def test_ensemble_members_must_agree_and_nothing_is_written_otherwise(slide, model):
    sdata = _copy(slide[0])
    before = sdata.tables["histocell"].copy()
    three = HistoCell(["tumor", "fibroblast", "lymphocyte"], encoder="scratch")
    sub = _copy(slide[0])
    props = sub.tables["table"].obsm["proportions"][["tumor", "fibroblast", "lymphocyte"]] + 1e-3
    sub.tables["table"].obsm["proportions"] = props.div(props.sum(1), axis=0)
    three.fit(sub, **TINY_FIT)
    with pytest.raises(InvalidInputError, match=r"same cell types: model\[1\]"):
        hc.tl.predict(sdata, [model, three], progress=False)
    with pytest.raises(InvalidInputError, match=r"model\[1\] is untrained"):
        hc.tl.predict(sdata, [model, _new_model(sdata)], progress=False)
    with pytest.raises(InvalidInputError, match=r"model\[0\] must be a HistoCell"):
        hc.tl.predict(sdata, ["model.safetensors", model], progress=False)
    with pytest.raises(InvalidInputError, match="empty"):
        hc.tl.predict(sdata, [], progress=False)
    after = sdata.tables["histocell"]
    assert list(after.obs.columns) == list(before.obs.columns) and list(after.obsm) == list(before.obsm)


def test_default_epochs_scale_with_the_training_spots(model):
    assert list(stage_epochs(300).values()) == [40, 10, 15]
    assert list(stage_epochs(3000).values()) == [13, 3, 5]  # a Visium slide: about the same optimiser steps
    assert stage_epochs(3000, epochs=7, state_epochs=0) == {"types": 7, "self-training": 3, "states": 0}
    with pytest.raises(InvalidInputError, match="non-negative"):
        stage_epochs(10, epochs=-1)
    assert stage_epochs(model.training_summary_["spots_train"], **FAST_EPOCHS) == model.training_summary_["max_epochs"]


# ---------------------------------------------------------------------------- 6. reliability cases (tests/RELIABILITY.md)
@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"cell_types": "tumor"}, "must be a list of names"),
        ({"states": {"tumor": ["x", "x"]}}, "repeats names"),
        ({"states": {"tumor": ["fibroblast", "b"]}}, "differ from the other cell types"),
        ({"states": {"tumor": "ab"}}, "must be a list of names"),
        ({"compartments": {"mixed": ["tumor"], "other": ["fibroblast"]}}, "'mixed' is the label"),
        ({"crop_px": 0}, "crop_px must be at least 8"),
        ({"dim": 0}, "dim must be at least 4"),
        ({"dim": 30}, "multiple of 4"),
        ({"n_neighbors": 0}, "n_neighbors must be at least 1"),
        ({"radius_um": -5}, "radius_um must be above 0"),
        ({"canonical_mpp": 0}, "canonical_mpp must be above 0"),
        ({"compartment_threshold": 2.0}, r"must lie in \(0, 1\]"),
    ],
)
def test_constructor_refuses_degenerate_settings(kwargs, message):
    # cases.md: hc_string_types, hc_states_dup_names, hc_state_equals_type, hc_states_string, hc_compartment_mixed, hc_crop0, hc_dim0, hc_neighbors0, hc_radius_neg, hc_canonical_mpp0, hc_threshold_2
    from histocell_sd.datasets import CELL_TYPES

    kwargs = {"cell_types": list(CELL_TYPES)} | kwargs
    with pytest.raises(InvalidInputError, match=message):
        HistoCell(kwargs.pop("cell_types"), **kwargs, encoder="scratch")


def test_fit_takes_the_old_name_of_learning_rate_with_a_warning(slide):
    sdata, _ = slide
    model = _new_model(sdata)
    with pytest.warns(FutureWarning, match=r"HistoCell.fit\(lr=...\) is deprecated; use learning_rate="):
        with pytest.raises(InvalidInputError, match="learning_rate must be a positive number, got 0.0"):
            model.fit(sdata, lr=0.0, **TINY_FIT)  # the old name still reaches the check
    with pytest.raises(InvalidInputError, match="not both"):
        model.fit(sdata, lr=1e-3, learning_rate=1e-2, **TINY_FIT)
    assert model.training_summary_ == {}


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"epochs": 0, "self_training_epochs": 0, "state_epochs": 0}, "nothing to train"),
        ({"val_fraction": 1.0}, r"must lie in \[0, 1\)"),
        ({"val_fraction": -0.5}, r"must lie in \[0, 1\)"),
        ({"holdout": "patients"}, r"holdout must be one of \['tiles', 'spots'\], got 'patients'"),
        ({"learning_rate": 0.0}, "learning_rate must be a positive number"),
        ({"learning_rate": 1e6}, "Training diverged"),
    ],
)
def test_fit_refuses_degenerate_settings_and_keeps_the_trained_model(slide, model, kwargs, message):
    # cases.md: fit_epochs0, fit_val1, fit_val_neg, fit_lr_huge
    sdata, _ = slide
    refit = _new_model(sdata).fit(sdata, **TINY_FIT)
    before = {k: v.clone() for k, v in refit.net.state_dict().items()}
    summary, net, timing = dict(refit.training_summary_), refit.net, refit.fit_timing_
    with pytest.raises(InvalidInputError, match=message):
        refit.fit(sdata, **(TINY_FIT | kwargs))
    assert refit.training_summary_ == summary  # still trained, with the weights it had
    assert refit.net is net and refit.fit_timing_ is timing
    for key, value in refit.net.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_failed_fit_on_bad_data_leaves_the_model_as_it_was(slide, model):
    # cases.md: fit_failed_refit_keeps_summary, fit_not_sdata
    sdata = _copy(slide[0])
    sdata.tables["table"].obsm["proportions"] = sdata.tables["table"].obsm["proportions"].rename(columns={"tumor": "Tumor"})
    refit = _new_model(slide[0]).fit(slide[0], **TINY_FIT)
    proba = refit.predict_inputs(refit.sample_inputs(slide[0], progress=False), progress=False)["type"]
    with pytest.raises(InvalidInputError, match="Tumor"):
        refit.fit(sdata, **TINY_FIT)
    np.testing.assert_array_equal(refit.predict_inputs(refit.sample_inputs(slide[0], progress=False), progress=False)["type"], proba)
    untrained = _new_model(slide[0])
    with pytest.raises(InvalidInputError):
        untrained.fit(sdata, **TINY_FIT)
    assert not untrained.training_summary_
    with pytest.raises(InvalidInputError, match="SpatialData"):
        untrained.fit(pd.DataFrame({"a": [1]}), **TINY_FIT)


def test_states_missing_or_inconsistent(slide):
    # cases.md: fit_no_state_props, fit_state_epochs0_summary, fit_state_props_inconsistent
    sdata = _copy(slide[0])
    del sdata.tables["table"].obsm["state_proportions"]
    with pytest.warns(UserWarning, match="state heads are not trained"):
        refit = _new_model(slide[0]).fit(sdata, **TINY_FIT)
    assert refit.training_summary_["states_trained"] is False
    with pytest.warns(UserWarning, match="no cell states written"):
        hc.tl.predict(sdata, refit, progress=False)
    assert "cell_state" not in sdata.tables["histocell"].obs
    trained = _new_model(slide[0]).fit(slide[0], **TINY_FIT)
    assert trained.training_summary_["states_trained"] is True
    for members, untrained in (([trained, refit], r"\[1\]"), ([refit, trained], r"\[0\]")):  # own case ensemble_states_untrained
        ensemble = _copy(slide[0])
        with pytest.warns(UserWarning, match=rf"ensemble members {untrained} were not trained"):
            hc.tl.predict(ensemble, members, progress=False)
        assert "cell_state" not in ensemble.tables["histocell"].obs and "cell_state_proba" not in ensemble.tables["histocell"].obsm
    no_state_epochs = _new_model(slide[0]).fit(slide[0], **(TINY_FIT | {"state_epochs": 0}))
    assert no_state_epochs.training_summary_["states_trained"] is False
    skewed = _copy(slide[0])
    states = skewed.tables["table"].obsm["state_proportions"]
    skewed.tables["table"].obsm["state_proportions"] = states * 0 + np.eye(states.shape[1])[0]  # all mass on one tumour state
    with pytest.raises(InvalidInputError, match="disagrees with"):
        _new_model(slide[0]).fit(skewed, **TINY_FIT)


def test_predict_validates_before_writing(slide, model):
    # cases.md: pred_spots_table_nuclei, pred_spots_table_nuclei_state, pred_mc_neg, pred_nan_features, pred_nan_centroids, pred_centroids_outside
    sdata = _copy(slide[0])
    table = sdata.tables["histocell"]
    with pytest.raises(InvalidInputError, match="does not annotate spots"):
        hc.tl.predict(sdata, model, spots_table_key="histocell", progress=False)
    assert "cell_type" not in table.obs and "cell_type_proba" not in table.obsm  # nothing half-written
    with pytest.raises(InvalidInputError, match="mc_samples"):
        hc.tl.predict(sdata, model, mc_samples=-3, progress=False)
    broken = _copy(slide[0])
    broken.tables["histocell"].X[0, 0] = np.nan
    with pytest.raises(InvalidInputError, match="NaN or infinite morphology"):
        hc.tl.predict(broken, model, progress=False)
    broken = _copy(slide[0])
    broken.tables["histocell"].obsm["spatial"][0] = np.nan
    with pytest.raises(InvalidInputError, match="NaN or infinite centroids"):
        hc.tl.predict(broken, model, progress=False)
    broken = _copy(slide[0])
    broken.tables["histocell"].obsm["spatial"][:3] += 1e5
    with pytest.raises(InvalidInputError, match="outside the"):
        hc.tl.predict(broken, model, progress=False)


def test_predict_with_another_model_leaves_no_stale_outputs(slide, model):
    # cases.md: pred_twice_different_models
    sdata = _copy(slide[0])
    hc.tl.predict(sdata, model, mc_samples=2, progress=False)
    assert "cell_type_mc_std" in sdata.tables["histocell"].obs
    three = HistoCell(["tumor", "fibroblast", "lymphocyte"], encoder="scratch")
    sub = _copy(slide[0])
    props = sub.tables["table"].obsm["proportions"][["tumor", "fibroblast", "lymphocyte"]] + 1e-3
    sub.tables["table"].obsm["proportions"] = props.div(props.sum(1), axis=0)
    three.fit(sub, **TINY_FIT)
    hc.tl.predict(sdata, three, progress=False)
    obs = sdata.tables["histocell"].obs
    assert "cell_type_mc_std" not in obs and set(obs["cell_type"].cat.categories) <= set(three.cell_types)
    assert sdata.tables["histocell"].uns["histocell"]["mpp"] == sdata.attrs["mpp"]  # segmentation metadata kept


def test_card_edits_are_refused(checkpoint, tmp_path):
    # cases.md: ck_edit_history, ck_card_list, ck_header_garbage
    path = tmp_path / "edited"
    shutil.copytree(checkpoint, path)
    card = json.loads((path / "model_card.json").read_text())
    card["training_summary"]["val_spot_pearson"] = 0.99
    (path / "model_card.json").write_text(json.dumps(card))
    with pytest.raises(InvalidInputError, match="edited after saving"):
        HistoCell.load(path)
    (path / "model_card.json").write_text("[1, 2]")
    with pytest.raises(InvalidInputError, match="not a histocell-sd model card"):
        HistoCell.load(path)
    shutil.rmtree(path)
    shutil.copytree(checkpoint, path)
    weights = path / "weights.safetensors"
    raw = bytearray(weights.read_bytes())
    raw[8:40] = b"{" * 32  # garbage header, checksum forged
    weights.write_bytes(bytes(raw))
    card = json.loads((path / "model_card.json").read_text())
    card["weights_sha256"] = __import__("hashlib").sha256(bytes(raw)).hexdigest()
    card["card_sha256"] = card_sha256(card)
    (path / "model_card.json").write_text(json.dumps(card))
    with pytest.raises(InvalidInputError, match="not a readable safetensors file"):
        HistoCell.load(path)


def test_save_onto_a_file_is_refused(model, tmp_path):
    # cases.md: ck_save_onto_file
    target = tmp_path / "afile.txt"
    target.write_text("keep me")
    with pytest.raises(InvalidInputError, match="is a file"):
        model.save(target, overwrite=True)
    assert target.read_text() == "keep me"


# ---------------------------------------------------------------------------- 7. more reliability cases (tests/RELIABILITY.md)
def test_mpp_declared_after_segmentation_is_refused_and_a_true_resolution_is_resampled(slide, model, predicted):
    # cases.md: pred_mpp_2x. Decided: a model runs on an image at any µm/px it can resample to its canonical_mpp
    # (legitimate: a 2x coarser scan, declared as such, is typed like the original). A sample whose attrs['mpp'] was
    # changed after its nuclei were measured (the 2x mis-declaration of the case) pairs crops and µm features
    # at different scales: refused, nothing written. A resolution mis-declared from the start is indistinguishable
    # from a true one by its metadata.
    sdata = _copy(slide[0])
    sdata.attrs["mpp"] = 2 * slide[0].attrs["mpp"]
    with pytest.raises(InvalidInputError, match=r"measured at 0.5 µm/px .* declares sdata.attrs\['mpp'\] = 1"):
        hc.tl.predict(sdata, model, progress=False)
    assert "cell_type" not in sdata.tables["histocell"].obs
    with pytest.raises(InvalidInputError, match="measured at 0.5 µm/px"):
        _new_model(sdata).fit(sdata, **TINY_FIT)
    coarse = hc.io.from_arrays(_image_array(slide[0])[::2, ::2], 2 * slide[0].attrs["mpp"])
    hc.pp.store_nuclei(coarse, np.asarray(slide[0].labels["truth_labels"])[::2, ::2])
    hc.tl.predict(coarse, model, progress=False)
    shares = [s.tables["histocell"].obs["cell_type"].value_counts(normalize=True).reindex(model.cell_types).fillna(0) for s in (predicted, coarse)]
    np.testing.assert_allclose(shares[0], shares[1], atol=0.15)


def test_predict_refuses_what_is_not_a_spatialdata(slide, model):
    # own case pred_not_sdata: tl.predict(the nuclei AnnData) crashed with AttributeError
    with pytest.raises(InvalidInputError, match="sdata must be a SpatialData sample, got AnnData"):
        hc.tl.predict(slide[0].tables["histocell"], model, progress=False)


class _Killed(BaseException):
    """Stands for SIGKILL: nothing after it runs (the writer's clean-up is made to fail too)."""


def test_kill_during_save_keeps_the_old_model_and_is_recovered(model, checkpoint, tmp_path, monkeypatch):
    # cases.md: kill_model_save_window (kill between moving the old model aside and renaming the new one in)
    import os

    path = tmp_path / "m2"
    shutil.copytree(checkpoint, path)
    real_rename, calls = os.rename, []

    def rename(source, target):
        calls.append(target)
        if len(calls) > 1:
            raise _Killed
        return real_rename(source, target)

    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(_Killed):
        model.save(path, overwrite=True)
    monkeypatch.undo()
    assert not path.exists()
    with pytest.raises(InvalidInputError, match=r"interrupted; the previous model is intact at .*\.m2\.old-.*restores it"):
        HistoCell.load(path)
    with pytest.raises(InvalidInputError, match="already exists"):  # the next save puts the old model back first
        model.save(path)
    assert HistoCell.load(path).training_summary_ == model.training_summary_
    assert [p.name for p in tmp_path.iterdir()] == ["m2"]


def test_debris_of_a_killed_save_is_removed_by_the_next_save(model, tmp_path):
    # cases.md: kill_model_save (a kill at 0 s left a hidden .m.tmp-XXXX)
    import os

    pid = 2**22 + 777
    while True:  # a pid no process has
        try:
            os.kill(pid, 0)
            pid += 1
        except ProcessLookupError:
            break
        except PermissionError:
            pid += 1
    (tmp_path / f".m.tmp-{pid}-deadbeef").mkdir()
    (tmp_path / f".m.tmp-{pid}-deadbeef" / "weights.safetensors").write_bytes(b"\0" * 100)
    model.save(tmp_path / "m")
    assert [p.name for p in tmp_path.iterdir()] == ["m"]
    assert HistoCell.load(tmp_path / "m").cell_types == model.cell_types
