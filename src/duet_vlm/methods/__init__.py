"""Token-reduction methods: one file each, all ``Reducer`` subclasses."""

from .base import (
    Compose,
    LanguageStage,
    LayerView,
    Plan,
    Reducer,
    Selection,
    VisionReduction,
    VisionStage,
    VisionView,
)
from .duet import DominantContextualMerge, Duet, TextGuidedPrune
from .pio import PIO, SaliencyNMSPrune, saliency_nms
from .registry import METHODS, make
from .sparsevlm import SparseVLM, TextRaterPrune

__all__ = [
    "METHODS",
    "make",
    "Compose",
    "Selection",
    "SparseVLM",
    "DominantContextualMerge",
    "Duet",
    "PIO",
    "SaliencyNMSPrune",
    "saliency_nms",
    "LanguageStage",
    "LayerView",
    "Plan",
    "Reducer",
    "TextGuidedPrune",
    "TextRaterPrune",
    "VisionReduction",
    "VisionStage",
    "VisionView",
]
