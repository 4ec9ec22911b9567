"""Checkpoints: safetensors weights + a JSON model card; loading never executes pickles."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .._errors import InvalidInputError
from .._utils import atomic_write, stale_backup
from ._config import HistoCellConfig
from ._network import HistoCellNet

FORMAT = "histocell-sd/checkpoint"
FORMAT_VERSION = 2  # 2: nucleus encoder v2 (pretrained encoder), encoder provenance in preprocessing
"""Version of the checkpoint format this histocell-sd writes and reads (``model_card.json``)."""
WEIGHTS = "weights.safetensors"
CARD = "model_card.json"


def _package_version() -> str:
    from .. import __version__

    return __version__


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


_STRUCTURE = ("cell_types", "states", "compartments", "preprocessing", "feature_mean", "feature_std")


def card_sha256(card: dict) -> str:
    """Checksum of the whole card but itself: an edited output order, preprocessing, summary or metric is refused."""
    return hashlib.sha256(json.dumps({k: v for k, v in card.items() if k != "card_sha256"}, sort_keys=True, default=float).encode()).hexdigest()


def save_checkpoint(model, path, *, overwrite: bool = False, metadata: dict | None = None) -> Path:
    """Write ``model`` to the folder ``path``: ``weights.safetensors`` and ``model_card.json``.

    ``metadata`` (JSON-serialisable) is stored under the card's ``"metadata"`` key: training data,
    licences, metrics, intended use.
    """
    def write(tmp: Path) -> None:
        tmp.mkdir(parents=True)
        state = {k: v.detach().contiguous() for k, v in model.net.state_dict().items()}
        save_file(state, tmp / WEIGHTS)
        card = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "package_version": _package_version(),
            "weights_sha256": _sha256(tmp / WEIGHTS),
            **model.settings.to_card(),  # cell_types, states, state_names, compartments, compartment_labels, outputs, preprocessing
            "feature_mean": model.feature_mean_.tolist(),
            "feature_std": model.feature_std_.tolist(),
            "training_summary": model.training_summary_,
            "history": None if model.history_ is None else model.history_.to_dict(orient="list"),
            "metadata": metadata or {},
        }
        card["card_sha256"] = card_sha256(json.loads(json.dumps(card, default=float)))
        (tmp / CARD).write_text(json.dumps(card, indent=2, default=float))

    path = Path(path)
    if path.exists() and not path.is_dir():
        raise InvalidInputError(f"{path} is a file, not a checkpoint folder; choose another path.")
    return atomic_write(path, write, overwrite=overwrite)


@dataclass
class Checkpoint:
    """A checkpoint read back: its config, the network with its weights (eval mode), what training left."""

    config: HistoCellConfig
    net: HistoCellNet
    training_summary: dict
    history: pd.DataFrame | None
    card: dict


def load_checkpoint(path) -> Checkpoint:
    """Read a checkpoint folder, refusing a missing, corrupt or mismatched one."""
    path = Path(path)
    if not path.exists():
        backup = stale_backup(path)
        hint = f" A save to it was interrupted; the previous model is intact at {backup} (the next save to {path.name} restores it)." if backup else ""
        raise InvalidInputError(f"No checkpoint folder at {path}.{hint}")
    if not path.is_dir():
        raise InvalidInputError(f"{path} is a file; a checkpoint is the folder HistoCell.save writes.")
    for name in (CARD, WEIGHTS):
        if not (path / name).is_file():
            raise InvalidInputError(f"Checkpoint {path} is missing {name}.")
    try:
        card = json.loads((path / CARD).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise InvalidInputError(f"Checkpoint {path}: {CARD} is not valid JSON ({error}).") from None
    if not isinstance(card, dict) or card.get("format") != FORMAT:
        raise InvalidInputError(f"Checkpoint {path}: {CARD} is not a histocell-sd model card.")
    if card.get("format_version") != FORMAT_VERSION:
        raise InvalidInputError(
            f"Checkpoint {path} has format version {card.get('format_version')}; this histocell-sd "
            f"({_package_version()}) reads version {FORMAT_VERSION}. It was written by histocell-sd {card.get('package_version')}."
        )
    required = (*_STRUCTURE, "weights_sha256", "card_sha256")
    missing = [k for k in required if k not in card]
    if missing:
        raise InvalidInputError(f"Checkpoint {path}: model card lacks {missing}.")
    if _sha256(path / WEIGHTS) != card["weights_sha256"]:
        raise InvalidInputError(f"Checkpoint {path}: {WEIGHTS} does not match the card's checksum (corrupt or replaced).")
    if card_sha256(card) != card["card_sha256"]:
        raise InvalidInputError(
            f"Checkpoint {path}: the model card was edited after saving (cell types, states, preprocessing, training "
            "summary or metadata); it no longer matches the weights it was saved with."
        )
    try:
        config = HistoCellConfig.from_card(card)
        net = HistoCellNet.from_config(config)  # the architecture comes from the card, the weights from the checkpoint
    except (InvalidInputError, KeyError, TypeError, ValueError) as error:
        raise InvalidInputError(f"Checkpoint {path}: the model card is inconsistent ({error}).") from None
    try:
        state = load_file(path / WEIGHTS)
    except (SafetensorError, OSError, ValueError) as error:
        raise InvalidInputError(f"Checkpoint {path}: {WEIGHTS} is not a readable safetensors file ({error}).") from None
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as error:
        raise InvalidInputError(f"Checkpoint {path}: weights do not fit the model card ({error}).") from None
    net.eval()
    net.feature_mean = np.asarray(card["feature_mean"], np.float32)
    net.feature_std = np.asarray(card["feature_std"], np.float32)
    history = pd.DataFrame(card["history"]) if card.get("history") else None
    return Checkpoint(config=config, net=net, training_summary=card.get("training_summary") or {}, history=history, card=card)
