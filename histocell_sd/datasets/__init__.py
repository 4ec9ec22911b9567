"""Embedded example data: the synthetic Visium (and Visium HD) + H&E generator and real BRCA-M2C and NuCLS tiles."""

from ._brca_m2c import BRCA_M2C_CLASSES, brca_m2c, brca_m2c_names, read_brca_m2c_patch
from ._cohort import synthetic_cohort
from ._nucls import NUCLS_CLASSES, NUCLS_MPP, nucls, nucls_tile_names, read_nucls_tile
from ._pseudo_spots import hex_grid, pseudo_spots
from ._stand_in import confused_probabilities, truth_as_predictions
from ._synthetic import PRESETS, TRUTH_LABELS_KEY, TRUTH_TABLE_KEY, synthetic_visium
from ._synthetic_cells import CELL_STATES, CELL_TYPES, COMPARTMENTS
from ._synthetic_hd import synthetic_visium_hd

__all__ = [
    "BRCA_M2C_CLASSES",
    "CELL_STATES",
    "CELL_TYPES",
    "COMPARTMENTS",
    "NUCLS_CLASSES",
    "NUCLS_MPP",
    "PRESETS",
    "TRUTH_LABELS_KEY",
    "TRUTH_TABLE_KEY",
    "brca_m2c",
    "brca_m2c_names",
    "confused_probabilities",
    "hex_grid",
    "nucls",
    "nucls_tile_names",
    "pseudo_spots",
    "read_brca_m2c_patch",
    "read_nucls_tile",
    "synthetic_cohort",
    "synthetic_visium",
    "synthetic_visium_hd",
    "truth_as_predictions",
]
