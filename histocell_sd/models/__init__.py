"""The HistoCell model class and its parts: config, torch network, training, checkpoints, losses."""

from ._checkpoint import FORMAT_VERSION, card_sha256
from ._config import HistoCellConfig
from ._encoder import encoder_card
from ._inputs import SampleInputs
from ._losses import bag_mean, spot_posteriors, symmetric_kl
from ._model import HistoCell
from ._modules import NeighbourAttention, NucleusEncoder
from ._network import HistoCellNet
from ._pretrained import PRETRAINED, pretrained
from ._trainer import stage_epochs

__all__ = [
    "FORMAT_VERSION", "PRETRAINED", "HistoCell", "HistoCellConfig", "HistoCellNet", "NeighbourAttention", "NucleusEncoder",
    "SampleInputs", "bag_mean", "card_sha256", "encoder_card", "pretrained", "spot_posteriors", "stage_epochs", "symmetric_kl",
]  # fmt: skip
