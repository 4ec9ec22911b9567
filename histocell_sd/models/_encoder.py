"""The pretrained nucleus encoder shipped in ``histocell_sd/weights/encoder``."""

from __future__ import annotations

from pathlib import Path

from .._errors import InvalidInputError
from .._shipped import load_weights, read_card, shipped_dir
from ._modules import NucleusEncoder

PRETRAINED = "encoder"
SCRATCH = {"source": "scratch", "width": 16, "out_dim": 64, "weights_sha256": None}


def encoder_card(encoder: str = "pretrained") -> dict:
    """The card of an encoder (``"pretrained"`` or a folder): architecture, preprocessing, training data, licences."""
    return read_card(shipped_dir(PRETRAINED) if encoder == "pretrained" else Path(encoder), "encoder")


def resolve_encoder(encoder, *, crop_px: int, canonical_mpp: float) -> tuple[dict, dict | None]:
    """``(config, state_dict)`` of the encoder a model starts from; the state is None from scratch.

    Refuses an unknown name, a missing or corrupt folder, and an encoder whose preprocessing (crop size,
    µm/px) differs from the model's.
    """
    if encoder == "scratch":
        return dict(SCRATCH), None
    if not isinstance(encoder, (str, Path)):
        raise InvalidInputError(f"encoder must be 'pretrained', 'scratch' or the path of an encoder folder, got {encoder!r}.")
    path = shipped_dir(PRETRAINED) if encoder == "pretrained" else Path(encoder)
    if encoder != "pretrained" and not path.is_dir():
        raise InvalidInputError(f"Unknown encoder {str(encoder)!r}: use 'pretrained', 'scratch' or the path of an encoder folder.")
    state, card = load_weights(path, "encoder")
    pre, arch = card["preprocessing"], card["architecture"]
    try:
        trained_crop, trained_mpp = int(pre["crop_px"]), float(pre["canonical_mpp"])
        width, out_dim = int(arch["width"]), int(arch["out_dim"])
    except (KeyError, TypeError, ValueError) as error:
        raise InvalidInputError(
            f"The encoder card at {path} needs preprocessing crop_px and canonical_mpp and architecture width and out_dim "
            f"as numbers ({type(error).__name__}: {error})."
        ) from None
    if trained_crop != crop_px or abs(trained_mpp - canonical_mpp) > 1e-9:
        raise InvalidInputError(
            f"The encoder at {path} was trained on {trained_crop} px crops at {trained_mpp} µm/px, but the "
            f"model uses {crop_px} px at {canonical_mpp} µm/px; use matching crop_px/canonical_mpp or encoder='scratch'."
        )
    try:  # the card's architecture must hold exactly these weights
        NucleusEncoder(width=width, out_dim=out_dim).load_state_dict(state, strict=True)
    except (RuntimeError, ValueError) as error:
        raise InvalidInputError(f"The encoder at {path}: its weights do not fit the card's architecture ({error}).") from None
    config = {"source": "pretrained" if encoder == "pretrained" else str(path), "width": width,
              "out_dim": out_dim, "weights_sha256": card["weights_sha256"]}
    return config, state
