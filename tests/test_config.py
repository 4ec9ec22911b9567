"""HistoCellConfig: what defines a model, validated in one place and stored in the model card."""

import dataclasses
import json

import numpy as np
import pytest

import histocell_sd as hc
from histocell_sd import InvalidInputError
from histocell_sd.models import HistoCellConfig

TYPES = ["tumor", "fibroblast", "lymphocyte"]


def test_completes_states_and_compartments():
    config = HistoCellConfig(TYPES, states={"tumor": ["tumor_a", "tumor_b"]})
    assert config.states == {"tumor": ["tumor_a", "tumor_b"], "fibroblast": ["fibroblast"], "lymphocyte": ["lymphocyte"]}
    assert config.state_names == ["tumor_a", "tumor_b", "fibroblast", "lymphocyte"] and config.has_states
    assert config.compartments == {t: [t] for t in TYPES} and config.compartment_labels == [*TYPES, "mixed"]
    assert config.encoder["source"] == "scratch" and len(config.feature_names) == 13
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.dim = 32


def test_validates_like_the_model():
    with pytest.raises(InvalidInputError, match="multiple of 4"):
        HistoCellConfig(TYPES, dim=30)
    with pytest.raises(InvalidInputError, match="unknown cell types"):
        HistoCellConfig(TYPES, compartments={"immune": ["monocyte"]})
    with pytest.raises(InvalidInputError, match="tile_um must be above 0"):
        dataclasses.replace(HistoCellConfig(TYPES), tile_um=0)  # a changed copy is validated again
    # own case names_with_slash: "CD4/CD8 T" trained, then write_zarr failed on the probability columns
    with pytest.raises(InvalidInputError, match=r"cell_types \['CD4/CD8 T'\] contain '/'.*'CD4-CD8 T'"):
        HistoCellConfig(["CD4/CD8 T", "tumor"])
    with pytest.raises(InvalidInputError, match="contain '/'"):
        HistoCellConfig(TYPES, states={TYPES[0]: ["a/b", "c"]})


def test_card_round_trip():
    config = HistoCellConfig(TYPES, states={"tumor": ["tumor_a", "tumor_b"]}, compartments={"epi": ["tumor"], "rest": ["fibroblast", "lymphocyte"]},
                             crop_px=48, feature_names=[])
    card = json.loads(json.dumps(config.to_card()))
    assert list(card) == ["cell_types", "states", "state_names", "compartments", "compartment_labels", "outputs", "preprocessing"]
    assert HistoCellConfig.from_card(card) == config
    assert card["preprocessing"]["crop_px"] == 48 and card["preprocessing"]["feature_names"] == []


def test_compartment_of_spot_proportions():
    config = HistoCellConfig(TYPES, compartments={"epi": ["tumor"], "rest": ["fibroblast", "lymphocyte"]}, compartment_threshold=0.6)
    proportions = np.array([[0.9, 0.05, 0.05], [0.1, 0.5, 0.4], [0.5, 0.5, 0.0]])
    np.testing.assert_array_equal(config.compartment_of(proportions), [0, 1, 2])  # 2 = mixed


def test_model_settings_and_config():
    model = hc.HistoCell(TYPES, encoder="scratch", use_morphology=False)
    assert model.settings.feature_names == [] and model.preprocessing == model.settings.preprocessing
    model.preprocessing["dim"] = 8  # a copy: the model is unchanged
    assert model.preprocessing["dim"] == 64 and model.net.dim == 64
