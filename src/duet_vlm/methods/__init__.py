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
from .registry import METHODS, make

__all__ = [
    "METHODS",
    "make",
    "Compose",
    "Selection",
    "DominantContextualMerge",
    "Duet",
    "LanguageStage",
    "LayerView",
    "Plan",
    "Reducer",
    "TextGuidedPrune",
    "VisionReduction",
    "VisionStage",
    "VisionView",
]
