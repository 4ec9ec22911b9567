"""Plots: overlays on the H&E (spatialdata-plot) and seaborn summaries."""

from ._architecture import niches
from ._model import cell_types, confusion_matrix, predicted_vs_true, training_curve
from ._proportions import spot_proportions

__all__ = ["cell_types", "confusion_matrix", "niches", "predicted_vs_true", "spot_proportions", "training_curve"]
from ._cohort import kaplan_meier, screen_crops

__all__ += ["kaplan_meier", "screen_crops"]
