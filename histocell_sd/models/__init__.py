"""Torch modules, losses, checkpoints and the HistoCell model class."""

from ._checkpoint import FORMAT_VERSION
from ._losses import bag_mean, symmetric_kl
from ._model import HistoCell

__all__ = ["FORMAT_VERSION", "HistoCell", "bag_mean", "symmetric_kl"]
