"""Preprocessing: nucleus segmentation (learnt and classical), morphology features, crops and segmentation metrics."""

from ..io._nuclei_store import FEATURES, store_nuclei
from ._crops import nucleus_crops
from ._metrics import aggregated_jaccard_index, detection_scores, match_points
from ._segment import segment_nuclei
from ._segment_array import segment_array
from ._segmenter import load_segmenter, segment_learnt

__all__ = [
    "FEATURES",
    "aggregated_jaccard_index",
    "detection_scores",
    "load_segmenter",
    "match_points",
    "nucleus_crops",
    "segment_array",
    "segment_learnt",
    "segment_nuclei",
    "store_nuclei",
]
