"""Embedded example data: the synthetic Visium + H&E generator and real NuCLS tiles."""

from ._nucls import NUCLS_CLASSES, NUCLS_MPP, nucls, nucls_tile_names, read_nucls_tile
from ._cohort import confused_probabilities, synthetic_cohort, truth_as_predictions
from ._synthetic import PRESETS, TRUTH_LABELS_KEY, TRUTH_TABLE_KEY, synthetic_visium
from ._synthetic_cells import CELL_STATES, CELL_TYPES, COMPARTMENTS

__all__ = [
    "CELL_STATES",
    "CELL_TYPES",
    "COMPARTMENTS",
    "NUCLS_CLASSES",
    "NUCLS_MPP",
    "PRESETS",
    "TRUTH_LABELS_KEY",
    "TRUTH_TABLE_KEY",
    "confused_probabilities",
    "nucls",
    "nucls_tile_names",
    "read_nucls_tile",
    "synthetic_cohort",
    "synthetic_visium",
    "truth_as_predictions",
]
