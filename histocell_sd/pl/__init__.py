"""Plots: overlays on the H&E (spatialdata-plot) and seaborn summaries."""

from ._architecture import niches
from ._proportions import spot_proportions

__all__ = ["niches", "spot_proportions"]
from ._cohort import kaplan_meier, screen_crops

__all__ += ["kaplan_meier", "screen_crops"]
