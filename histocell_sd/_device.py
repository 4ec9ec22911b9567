"""Which torch device a call runs on: ``device="auto"`` is CUDA when available, else the CPU."""

from __future__ import annotations

import re
from contextlib import contextmanager

from ._errors import InvalidInputError

_PATTERN = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


def check_device(device) -> str:
    """``device`` as a checked string (``"auto"``, ``"cpu"``, ``"cuda"``, ``"cuda:<i>"``)."""
    if not isinstance(device, str) or not _PATTERN.match(device):
        raise InvalidInputError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:<index>', got {device!r}.")
    return device


def resolve_device(device: str | None = None):
    """The :class:`torch.device` for ``device`` (None: ``hc.settings.device``); CUDA asked for but absent is refused."""
    import torch

    from ._settings import settings

    device = check_device(settings.device if device is None else device)
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise InvalidInputError(f"device={device!r} but no CUDA GPU is available here; use device='auto' or 'cpu'.")
        index = int(device.split(":")[1]) if ":" in device else 0
        if index >= torch.cuda.device_count():
            raise InvalidInputError(f"device={device!r} but only {torch.cuda.device_count()} CUDA device(s) exist.")
    return torch.device(device)


@contextmanager
def full_float32():
    """Run CUDA convolutions and matmuls in full float32 (no TF32) inside the block, so GPU and CPU predictions agree.

    cuDNN uses TF32 for float32 convolutions by default on Ampere and newer GPUs; that moves probabilities by up to
    ~1e-2. Inference is cheap enough to do exactly; training keeps torch's defaults.
    """
    import torch

    before = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = before
