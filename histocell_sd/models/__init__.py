"""Torch modules, losses, checkpoints and the HistoCell model class."""

from ._checkpoint import FORMAT_VERSION
from ._encoder import encoder_card
from ._losses import bag_mean, symmetric_kl
from ._model import HistoCell
from ._modules import NucleusEncoder
from ._pretrained import PRETRAINED, pretrained

__all__ = ["FORMAT_VERSION", "PRETRAINED", "HistoCell", "NucleusEncoder", "bag_mean", "encoder_card", "pretrained", "symmetric_kl"]
