"""What defines a HistoCell model before training: its outputs (cell types, states, compartments) and its
preprocessing and architecture. Validated here, once, and stored in the model card."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields

import numpy as np
import pandas as pd

from .._errors import InvalidInputError
from .._utils import check_storable_names
from ._encoder import SCRATCH

MIXED = "mixed"
"""Compartment label of a spot (or nucleus) without a dominant compartment."""
DEFAULT_FEATURES = [
    "area_um2", "perimeter_um", "eccentricity", "solidity", "major_axis_um", "minor_axis_um",
    "h_mean", "h_std", "e_mean", "e_std", "h_contrast", "h_entropy", "h_skewness",
]  # fmt: skip
"""Morphology features (columns of the nuclei table) a model with ``use_morphology=True`` reads."""

OUTPUTS = {
    "cell_type_proba": "columns = cell_types, in order",
    "cell_state_proba": "joint P(state) = P(type) P(state | type); columns = state_names",
    "compartment": "argmax over compartment_labels",
}


@dataclass(frozen=True)
class HistoCellConfig:
    """The settings of a :class:`~histocell_sd.models.HistoCell`, validated on creation.

    ``states`` may be partial and ``compartments`` None; both are completed (a type without states is
    its own single state; one compartment per cell type). See :class:`~histocell_sd.models.HistoCell`
    for the meaning of each field; ``feature_names`` lists the morphology features read (empty: none),
    ``encoder`` describes the nucleus encoder (source, width, out_dim, weights_sha256).

    Attributes
    ----------
    cell_types, states, compartments, compartment_threshold, crop_px, canonical_mpp, context_mpp, n_neighbors, radius_um, dim, feature_names, max_nuclei_per_spot, tile_um, encoder
        As in the model card (``preprocessing`` holds all but the first three).
    """

    cell_types: list[str]
    states: dict[str, list[str]] | None = None
    compartments: dict[str, list[str]] | None = None
    compartment_threshold: float = 0.5
    crop_px: int = 32
    canonical_mpp: float = 0.5
    context_mpp: float = 4.0
    n_neighbors: int = 12
    radius_um: float = 30.0
    dim: int = 64
    feature_names: list[str] = field(default_factory=lambda: list(DEFAULT_FEATURES))
    max_nuclei_per_spot: int = 48
    tile_um: float = 400.0
    encoder: dict = field(default_factory=lambda: dict(SCRATCH))

    def __post_init__(self):
        cell_types = _names(self.cell_types, "cell_types")
        if len(cell_types) < 2:
            raise InvalidInputError(f"cell_types must be at least two distinct names, got {cell_types}.")
        if self.states is not None and not isinstance(self.states, Mapping):
            raise InvalidInputError(f"states must be a mapping {{cell_type: [state, ...]}}, got {type(self.states).__name__}.")
        given = {str(t): _names(v, f"states[{t!r}]") for t, v in (self.states or {}).items()}
        unknown = set(given) - set(cell_types)
        if unknown:
            raise InvalidInputError(f"states given for unknown cell types {sorted(unknown)}.")
        states = {t: given.get(t) or [t] for t in cell_types}
        names = [s for t in cell_types for s in states[t]]
        clash = sorted({n for n in names if names.count(n) > 1} | {s for t, v in given.items() for s in v if s in cell_types and s != t})
        if clash:
            raise InvalidInputError(f"State names must be unique and differ from the other cell types; {clash} repeat.")
        if self.compartments is not None and not isinstance(self.compartments, Mapping):
            raise InvalidInputError(f"compartments must be a mapping {{compartment: [cell_type, ...]}}, got {type(self.compartments).__name__}.")
        compartments = {str(c): _names(v, f"compartments[{c!r}]") for c, v in (self.compartments or {t: [t] for t in cell_types}).items()}
        bad = {t for v in compartments.values() for t in v} - set(cell_types)
        if bad:
            raise InvalidInputError(f"compartments refer to unknown cell types {sorted(bad)}.")
        if MIXED in compartments:
            raise InvalidInputError(f"{MIXED!r} is the label of spots without a dominant compartment; name the compartment otherwise.")
        _check_positive(crop_px=(self.crop_px, 8), n_neighbors=(self.n_neighbors, 1), dim=(self.dim, 4), max_nuclei_per_spot=(self.max_nuclei_per_spot, 1))
        _check_positive(canonical_mpp=(self.canonical_mpp, 0), context_mpp=(self.context_mpp, 0), radius_um=(self.radius_um, 0), tile_um=(self.tile_um, 0))
        if int(self.dim) % 4:
            raise InvalidInputError(f"dim must be a multiple of 4 (the attention heads), got {self.dim}.")
        if not 0 < float(self.compartment_threshold) <= 1:
            raise InvalidInputError(f"compartment_threshold is a share of the spot and must lie in (0, 1], got {self.compartment_threshold}.")
        normalised = {"cell_types": cell_types, "states": states, "compartments": compartments,
                      "feature_names": [str(f) for f in self.feature_names], "encoder": dict(self.encoder)}
        for name in ("crop_px", "n_neighbors", "dim", "max_nuclei_per_spot"):
            normalised[name] = int(getattr(self, name))
        for name in ("compartment_threshold", "canonical_mpp", "context_mpp", "radius_um", "tile_um"):
            normalised[name] = float(getattr(self, name))
        for name, value in normalised.items():
            object.__setattr__(self, name, value)  # frozen: set once, here

    # ------------------------------------------------------------------ derived
    @property
    def state_names(self) -> list[str]:
        """All states in output order (types in order, then their states)."""
        return [s for t in self.cell_types for s in self.states[t]]

    @property
    def compartment_labels(self) -> list[str]:
        """The compartments, then ``"mixed"``."""
        return [*self.compartments, MIXED]

    @property
    def has_states(self) -> bool:
        """Whether some cell type has more than one state."""
        return len(self.state_names) > len(self.cell_types)

    @property
    def input_settings(self) -> dict:
        """The settings that building a sample's inputs reads (crops, context, neighbours, morphology)."""
        return {
            "crop_px": self.crop_px, "canonical_mpp": self.canonical_mpp, "context_mpp": self.context_mpp,
            "n_neighbors": self.n_neighbors, "radius_um": self.radius_um, "feature_names": list(self.feature_names) or None,
        }  # fmt: skip

    @property
    def preprocessing(self) -> dict:
        """Preprocessing and architecture, as the card's ``"preprocessing"`` (a new dict each time)."""
        structure = ("cell_types", "states", "compartments")
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in structure}
        out["feature_names"], out["encoder"] = list(self.feature_names), dict(self.encoder)
        return out

    def compartment_of(self, proportions: np.ndarray) -> np.ndarray:
        """Compartment index of each row of cell-type proportions (``len(compartments)`` = mixed)."""
        shares = np.stack([proportions[:, [self.cell_types.index(t) for t in types]].sum(1) for types in self.compartments.values()], 1)
        label = shares.argmax(1)
        return np.where(shares.max(1) >= self.compartment_threshold, label, len(self.compartments))

    # ------------------------------------------------------------------ model card
    def to_card(self) -> dict:
        """The card entries that define the model: output order, state and compartment layout, preprocessing."""
        return {
            "cell_types": list(self.cell_types),
            "states": {t: list(v) for t, v in self.states.items()},
            "state_names": self.state_names,
            "compartments": {c: list(v) for c, v in self.compartments.items()},
            "compartment_labels": self.compartment_labels,
            "outputs": dict(OUTPUTS),
            "preprocessing": self.preprocessing,
        }

    @classmethod
    def from_card(cls, card: Mapping) -> HistoCellConfig:
        """The config stored in a model card (see :meth:`to_card`); raises on a missing or invalid entry."""
        pre = card["preprocessing"]
        known = {f.name for f in fields(cls)} - {"cell_types", "states", "compartments"}
        return cls(card["cell_types"], states=card["states"], compartments=card["compartments"], **{k: pre[k] for k in known})


def _names(values, what: str) -> list[str]:
    """Distinct names from a list-like (a lone string is refused: it is not a list of names)."""
    if isinstance(values, (str, bytes)) or not isinstance(values, (Sequence, pd.Index, np.ndarray)):
        raise InvalidInputError(f"{what} must be a list of names, got {values!r}.")
    names = [str(v) for v in values]
    check_storable_names(names, what)
    if len(set(names)) != len(names):
        raise InvalidInputError(f"{what} repeats names: {sorted({n for n in names if names.count(n) > 1})}.")
    return names


def _check_positive(**values) -> None:
    """Each ``name=(value, least)``: a finite number above ``least`` (at least ``least`` when it is ≥ 1)."""
    for name, (value, least) in values.items():
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise InvalidInputError(f"{name} must be a number, got {value!r}.") from None
        ok = np.isfinite(number) and (number >= least if least >= 1 else number > least)
        if not ok or isinstance(value, bool):
            bound = f"at least {least}" if least >= 1 else f"above {least}"
            raise InvalidInputError(f"{name} must be {bound}, got {value!r}.")
