"""Tools, by pipeline stage: prediction (`_prediction`), deconvolution and its refinement (`_deconvolution`),
spatial analysis (`_spatial`) and cohorts (`_cohort`)."""

from ._deconvolution.deconvolve import deconvolve
from ._deconvolution.refine import refine_deconvolution
from ._prediction.evaluate import classification_scores, spot_pearson, transfer_truth
from ._prediction.predict import predict
from ._spatial.architecture import tissue_architecture
from ._spatial.graph import cell_graph
from ._spatial.indicators import INDICATORS, spatial_indicators

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
from ._cohort.run_cohort import run_cohort
from ._cohort.screen import PhenotypeScreen, screen_phenotype
from ._cohort.stats import benjamini_hochberg, response_association, survival

__all__ += ["PhenotypeScreen", "benjamini_hochberg", "response_association", "run_cohort", "screen_phenotype", "survival"]
