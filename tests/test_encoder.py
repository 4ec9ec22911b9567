"""The pretrained nucleus encoder HistoCell starts from (models.encoder_card, HistoCell(encoder=...))."""

import json
import shutil

import numpy as np
import pytest
import torch

import histocell_sd as hc
from histocell_sd import InvalidInputError
from histocell_sd._shipped import load_weights, shipped_dir
from histocell_sd._stain import to_optical_density
from histocell_sd.datasets import CELL_TYPES


def test_default_model_starts_from_the_shipped_encoder():
    state, card = load_weights(shipped_dir("encoder"), "encoder")
    model = hc.HistoCell(CELL_TYPES)
    assert model.preprocessing["encoder"]["source"] == "pretrained"
    assert model.preprocessing["encoder"]["weights_sha256"] == card["weights_sha256"] == hc.models.encoder_card()["weights_sha256"]
    for key, value in state.items():
        assert torch.equal(model.net.nucleus.state_dict()[key], value), key
    scratch = hc.HistoCell(CELL_TYPES, encoder="scratch")
    assert scratch.preprocessing["encoder"]["source"] == "scratch"
    assert not torch.equal(scratch.net.nucleus.state_dict()["proj.weight"], state["proj.weight"])


def test_encoder_card_documents_data_and_licences():
    card = hc.models.encoder_card()
    assert card["kind"] == "encoder" and card["training"]["script"] == "scripts/train_encoder.py"
    assert card["preprocessing"]["crop_px"] == 32 and card["preprocessing"]["canonical_mpp"] == 0.5
    assert card["training"]["mode"] == "both" and card["training"]["excluded_datasets"] is None
    assert (shipped_dir("encoder") / "weights.safetensors").stat().st_size < 2**20


def test_encoder_card_probe_reproduces_on_embedded_patches():
    """The card's linear probe on the embedded BRCA-M2C patches (2 train, 4 test) comes out the same here."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import f1_score
    from sklearn.preprocessing import StandardScaler

    state, card = load_weights(shipped_dir("encoder"), "encoder")
    encoder = hc.models.NucleusEncoder(**card["architecture"])
    encoder.load_state_dict(state)
    encoder.eval()

    def cells(split):
        crops, labels = [], []
        for name in hc.datasets.brca_m2c_names(split):
            rgb, mpp, pts = hc.datasets.read_brca_m2c_patch(name)
            assert mpp == pytest.approx(0.5, rel=0.02)
            crops.append(hc.pp.nucleus_crops(rgb, pts[["x", "y"]].to_numpy(float), size=32))
            labels.append(pts["cell_type"].astype(str).to_numpy())
        with torch.no_grad():
            embedding = encoder(to_optical_density(torch.from_numpy(np.concatenate(crops)))).numpy()
        return embedding, np.concatenate(labels)

    (a, ya), (b, yb) = cells("train"), cells("test")
    scaler = StandardScaler().fit(a)
    pred = LogisticRegression(max_iter=3000).fit(scaler.transform(a), ya).predict(scaler.transform(b))
    expected = card["metrics"]["linear_probe_brca_m2c_embedded"]
    assert len(yb) == expected["test_cells"]
    assert f1_score(yb, pred, average="weighted") == pytest.approx(expected["weighted_f1"], abs=0.01)
    assert f1_score(yb, pred, average="macro") == pytest.approx(expected["macro_f1"], abs=0.01)


def test_encoder_bad_inputs(tmp_path):
    with pytest.raises(InvalidInputError, match="Unknown encoder 'imagenet'"):
        hc.HistoCell(CELL_TYPES, encoder="imagenet")
    with pytest.raises(InvalidInputError, match="encoder must be"):
        hc.HistoCell(CELL_TYPES, encoder=3)
    with pytest.raises(InvalidInputError, match="trained on 32 px crops at 0.5 µm/px, but the model uses 48 px"):
        hc.HistoCell(CELL_TYPES, crop_px=48)
    assert hc.HistoCell(CELL_TYPES, crop_px=48, encoder="scratch").preprocessing["crop_px"] == 48
    copy = tmp_path / "encoder"
    shutil.copytree(shipped_dir("encoder"), copy)
    assert hc.HistoCell(CELL_TYPES, encoder=copy).preprocessing["encoder"]["source"] == str(copy)
    (copy / "weights.safetensors").write_bytes(b"\0" * 64)
    with pytest.raises(InvalidInputError, match="checksum"):
        hc.HistoCell(CELL_TYPES, encoder=copy)
    (copy / "card.json").unlink()
    with pytest.raises(InvalidInputError, match="missing card.json"):
        hc.HistoCell(CELL_TYPES, encoder=copy)
    with pytest.raises(InvalidInputError, match="not a 'encoder' network"):
        hc.HistoCell(CELL_TYPES, encoder=shipped_dir("segmenter"))


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("architecture", {"width": 8, "out_dim": 64}, "weights do not fit the card's architecture"),
        ("architecture", {"out_dim": 64}, "needs preprocessing crop_px .*KeyError: 'width'"),
        ("preprocessing", [], "needs preprocessing crop_px"),
        ("preprocessing", {"crop_px": "abc", "canonical_mpp": 0.5}, "needs preprocessing crop_px .*ValueError"),
    ],
)
def test_encoder_card_that_does_not_fit_its_weights(tmp_path, key, value, message):
    # own case encoder_card_inconsistent: the checksum covers the weights, not the card
    folder = tmp_path / "encoder"
    shutil.copytree(shipped_dir("encoder"), folder)
    card = json.loads((folder / "card.json").read_text())
    card[key] = value
    (folder / "card.json").write_text(json.dumps(card))
    with pytest.raises(InvalidInputError, match=message):
        hc.HistoCell(CELL_TYPES, encoder=folder)


def test_frozen_encoder_and_provenance_in_checkpoint(tmp_path):
    sdata, _ = hc.datasets.synthetic_visium(seed=5, preset="tiny", progress=False)
    hc.pp.store_nuclei(sdata, sdata.labels["truth_labels"].data, method="truth")
    model = hc.HistoCell(CELL_TYPES)
    before = {k: v.clone() for k, v in model.net.nucleus.state_dict().items()}
    with pytest.raises(InvalidInputError, match="encoder_lr_factor"):
        model.fit(sdata, encoder_lr_factor=-1, progress=False)
    model.fit(sdata, epochs=2, self_training_epochs=0, state_epochs=0, encoder_lr_factor=0, progress=False)
    for key, value in model.net.nucleus.state_dict().items():
        assert torch.equal(value, before[key]), key
    path = model.save(tmp_path / "m")
    loaded = hc.HistoCell.load(path)
    assert loaded.preprocessing["encoder"] == model.preprocessing["encoder"]
    a = np.concatenate([p.detach().ravel().numpy() for p in model.net.parameters()])
    b = np.concatenate([p.detach().ravel().numpy() for p in loaded.net.parameters()])
    np.testing.assert_array_equal(a, b)
