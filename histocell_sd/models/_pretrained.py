"""Ready-to-use HistoCell checkpoints shipped in the package (trained by scripts/train_pretrained.py)."""

from __future__ import annotations

from .._errors import InvalidInputError
from .._shipped import shipped_dir
from ._model import HistoCell

PRETRAINED = {
    "tumor_stromal_lymphocyte": (
        "Tumour/epithelial, stromal and lymphocyte nuclei in H&E at any µm/px (resampled to 0.5 µm/px); "
        "weak supervision from Visium-like pseudo-spot proportions of BRCA-M2C (breast cancer, TCGA)."
    ),
}
"""Names of the shipped checkpoints and what each predicts."""


def pretrained(name: str = "tumor_stromal_lymphocyte") -> HistoCell:
    """A trained :class:`HistoCell` shipped with the package (nothing is downloaded).

    Parameters
    ----------
    name
        One of :data:`PRETRAINED`.

    Returns
    -------
    HistoCell
        The model in eval mode; ``model.model_card_`` holds its card: training data, licences, metrics and
        intended use (``model.model_card_["metadata"]``).
    """
    if not isinstance(name, str) or name not in PRETRAINED:
        raise InvalidInputError(f"Unknown pretrained model {name!r}; choose from {sorted(PRETRAINED)}.")
    return HistoCell.load(shipped_dir(name))
