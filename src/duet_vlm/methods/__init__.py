"""Token-reduction methods: one file each, all ``Reducer`` subclasses."""

from .base import LanguageStage, LayerView, Plan, Reducer, VisionReduction, VisionStage, VisionView
from .duet import DominantContextualMerge, Duet, TextGuidedPrune

__all__ = [
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
