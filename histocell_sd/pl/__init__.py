"""Plots: overlays on the H&E (spatialdata-plot) and seaborn summaries."""

from ._proportions import spot_proportions

__all__ = ["spot_proportions"]
