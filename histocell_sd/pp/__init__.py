"""Preprocessing: nucleus segmentation, morphology features and segmentation metrics."""

from ._metrics import aggregated_jaccard_index, detection_scores, match_points
from ._nuclei import FEATURES, store_nuclei
from ._segment import segment_nuclei
from ._segment_array import segment_array

__all__ = [
    "FEATURES",
    "aggregated_jaccard_index",
    "detection_scores",
    "match_points",
    "segment_array",
    "segment_nuclei",
    "store_nuclei",
]
