"""Networks shipped in the package: safetensors weights + a JSON card, loaded without pickle."""

from __future__ import annotations

import hashlib
import json
from importlib.resources import files
from pathlib import Path

from ._errors import InvalidInputError

FORMAT = "histocell-sd/network"
FORMAT_VERSION = 1
WEIGHTS = "weights.safetensors"
CARD = "card.json"


def shipped_dir(name: str) -> Path:
    """Folder of the network ``name`` shipped in ``histocell_sd/weights``."""
    return Path(str(files("histocell_sd") / "weights" / name))


def sha256(path: Path) -> str:
    """Hex SHA-256 of a file's bytes."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def read_card(path, kind: str) -> dict:
    """The validated card of the network folder ``path`` (a ``kind`` network), refusing a missing or corrupt one."""
    path = Path(path)
    for name in (CARD, WEIGHTS):
        if not (path / name).is_file():
            raise InvalidInputError(f"The {kind} network at {path} is missing {name}.")
    try:
        card = json.loads((path / CARD).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise InvalidInputError(f"The {kind} network at {path}: {CARD} is not valid JSON ({error}).") from None
    if not isinstance(card, dict) or card.get("format") != FORMAT:
        raise InvalidInputError(f"The {kind} network at {path}: {CARD} is not a histocell-sd network card.")
    if card.get("format_version") != FORMAT_VERSION:
        raise InvalidInputError(f"The {kind} network at {path} has card version {card.get('format_version')}; this histocell-sd reads {FORMAT_VERSION}.")
    if card.get("kind") != kind:
        raise InvalidInputError(f"The network at {path} is a {card.get('kind')!r} network, not a {kind!r} network.")
    for key in ("architecture", "preprocessing", "weights_sha256"):
        if key not in card:
            raise InvalidInputError(f"The {kind} network at {path}: {CARD} lacks {key!r}.")
    if sha256(path / WEIGHTS) != card["weights_sha256"]:
        raise InvalidInputError(f"The {kind} network at {path}: {WEIGHTS} does not match the card's checksum (corrupt or replaced).")
    return card


def load_weights(path, kind: str) -> tuple[dict, dict]:
    """``(state_dict, card)`` of the network folder ``path``; never unpickles."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    card = read_card(path, kind)
    try:
        state = load_file(Path(path) / WEIGHTS)
    except (SafetensorError, OSError, ValueError) as error:
        raise InvalidInputError(f"The {kind} network at {path}: {WEIGHTS} cannot be read ({error}).") from None
    return state, card


def write_network(path, state: dict, card: dict) -> Path:
    """Write ``state`` (tensors) and ``card`` to the new folder ``path`` (atomically; an existing path is refused)."""
    from safetensors.torch import save_file

    from ._utils import atomic_write

    def write(tmp: Path) -> None:
        tmp.mkdir(parents=True)
        save_file({k: v.detach().contiguous() for k, v in state.items()}, tmp / WEIGHTS)
        full = {"format": FORMAT, "format_version": FORMAT_VERSION, **card, "weights_sha256": sha256(tmp / WEIGHTS)}
        (tmp / CARD).write_text(json.dumps(full, indent=1, default=float) + "\n")

    return atomic_write(path, write)
