"""histocell-sd: HistoCell super-resolution cell profiles from H&E, in the scverse."""

from importlib.metadata import PackageNotFoundError, version

from . import datasets, io, pl
from ._errors import InvalidInputError

try:
    __version__ = version("histocell-sd")
except PackageNotFoundError:  # pragma: no cover - source tree without installation
    __version__ = "0.0.0"

__all__ = ["InvalidInputError", "datasets", "io", "pl", "__version__"]
