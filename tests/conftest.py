"""Shared fixtures: small synthetic slides generated once per test session."""

import matplotlib
import pytest

matplotlib.use("Agg")


@pytest.fixture(scope="session")
def tiny_slide():
    """The ``"tiny"`` synthetic slide (≈ 50 spots) and its reference; treat as read-only."""
    from histocell_sd.datasets import synthetic_visium

    return synthetic_visium(seed=3, preset="tiny", progress=False)
