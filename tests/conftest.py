"""Shared fixtures: small synthetic slides generated once per test session."""

import matplotlib
import pytest

matplotlib.use("Agg")


@pytest.fixture(scope="session")
def tiny_slide():
    """The ``"tiny"`` synthetic slide (≈ 50 spots) and its reference; treat as read-only."""
    from histocell_sd.datasets import synthetic_visium

    return synthetic_visium(seed=3, preset="tiny", progress=False)


@pytest.fixture
def tiny_predicted():
    """A fresh ``"tiny"`` slide (seed 3) with the simulated nucleus predictions, and its reference; mutable."""
    from histocell_sd.datasets import confused_probabilities, synthetic_visium, truth_as_predictions

    sdata, reference = synthetic_visium(seed=3, preset="tiny", progress=False)
    truth_as_predictions(sdata, proba=confused_probabilities(sdata, seed=3))
    return sdata, reference
