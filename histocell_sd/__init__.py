"""histocell-sd: HistoCell super-resolution cell profiles from H&E, in the scverse."""

from importlib.metadata import PackageNotFoundError, version

from . import datasets, io, models, pl, pp, tl
from ._errors import InvalidInputError
from ._settings import settings
from .models import HistoCell

try:
    __version__ = version("histocell-sd")
except PackageNotFoundError:  # pragma: no cover - source tree without installation
    __version__ = "0.0.0"

__all__ = ["HistoCell", "InvalidInputError", "datasets", "io", "models", "pl", "pp", "tl", "__version__", "settings"]
