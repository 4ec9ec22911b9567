"""Tools: predictions into SpatialData, cell graph, tissue architecture, spatial indicators, cohorts."""

from ._architecture import tissue_architecture
from ._deconvolve import deconvolve
from ._evaluate import classification_scores, spot_pearson, transfer_truth
from ._graph import cell_graph
from ._indicators import INDICATORS, spatial_indicators
from ._predict import predict
from ._refine import refine_deconvolution

__all__ = [
    "INDICATORS",
    "cell_graph",
    "classification_scores",
    "deconvolve",
    "predict",
    "refine_deconvolution",
    "spatial_indicators",
    "spot_pearson",
    "tissue_architecture",
    "transfer_truth",
]
from ._cohort_stats import benjamini_hochberg, response_association, survival
from ._run_cohort import run_cohort
from ._screen import PhenotypeScreen, screen_phenotype

__all__ += ["PhenotypeScreen", "benjamini_hochberg", "response_association", "run_cohort", "screen_phenotype", "survival"]
