"""Package-wide settings: ``hc.settings``."""

from __future__ import annotations

import os

from ._errors import InvalidInputError


class Settings:
    """Package-wide settings, read by every function (``hc.settings``).

    Attributes
    ----------
    progress
        Show progress bars. ``False`` silences every bar whatever a call's ``progress=`` says (a call's
        ``progress=False`` silences its own). Default: on, unless the environment variable
        ``HISTOCELL_SD_PROGRESS`` is ``0``. A bar appears only once its work has run for a second, so the
        many small calls of a notebook stay quiet and only long steps (training, segmenting a slide) show one.
    device
        Torch device of ``HistoCell.fit``/``predict``, the learnt segmenter and Tangram when a call passes
        ``device=None``: ``"auto"`` (CUDA when available, else the CPU), ``"cpu"``, ``"cuda"`` or ``"cuda:<i>"``.
    """

    def __init__(self) -> None:
        self.progress = os.environ.get("HISTOCELL_SD_PROGRESS", "1").strip().lower() not in {"0", "false", "no", "off"}
        self.device = "auto"

    @property
    def progress(self) -> bool:
        return self._progress

    @progress.setter
    def progress(self, value: bool) -> None:
        if not isinstance(value, bool):
            raise InvalidInputError(f"settings.progress must be True or False, got {value!r}.")
        self._progress = value

    @property
    def device(self) -> str:
        return self._device

    @device.setter
    def device(self, value: str) -> None:
        from ._device import check_device

        self._device = check_device(value)

    def __repr__(self) -> str:
        return f"histocell-sd settings: progress={self.progress}, device={self.device!r}"


settings = Settings()
