"""Token-reduction methods: one file each, all ``Reducer`` subclasses."""

from .base import (
    Compose,
    LanguageStage,
    PerItemRatio,
    LayerView,
    Plan,
    Reducer,
    Selection,
    VisionReduction,
    VisionStage,
    VisionView,
)
from .duet import DominantContextualMerge, Duet, TextGuidedPrune
from .fastv import FastV, LastTokenAttention
from .full import Full
from .pio import PIO, SaliencyNMSPrune, saliency_nms
from .pool import GridPool, Pool
from .pyramiddrop import LastInstructionAttention, PyramidDrop
from .random_drop import RandomDrop, RandomPatches
from .registry import METHODS, make
from .sparsevlm import SparseVLM, TextRaterPrune
from .visionzip import VisionZip

__all__ = [
    # the interface
    "Compose",
    "LanguageStage",
    "PerItemRatio",
    "LayerView",
    "Plan",
    "Reducer",
    "Selection",
    "VisionReduction",
    "VisionStage",
    "VisionView",
    # the registry
    "METHODS",
    "make",
    # methods and their stages
    "Duet",
    "DominantContextualMerge",
    "TextGuidedPrune",
    "FastV",
    "LastTokenAttention",
    "Full",
    "PIO",
    "SaliencyNMSPrune",
    "saliency_nms",
    "Pool",
    "GridPool",
    "PyramidDrop",
    "LastInstructionAttention",
    "RandomDrop",
    "RandomPatches",
    "SparseVLM",
    "TextRaterPrune",
    "VisionZip",
]
