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
from .fastv import FastV, LastTokenAttention
from .full import Full
from .pool import GridPool, Pool
from .pyramiddrop import LastInstructionAttention, PyramidDrop
from .random_drop import RandomDrop, RandomPatches
from .visionzip import VisionZip
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
    "FastV",
    "Full",
    "GridPool",
    "LastInstructionAttention",
    "LastTokenAttention",
    "Pool",
    "PyramidDrop",
    "RandomDrop",
    "RandomPatches",
    "VisionZip",
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
