"""Token-reduction methods: one file each, all ``Reducer`` subclasses that register themselves."""

from .base import (
    Compose,
    InputStage,
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
# Imported in the registry's order (each module registers its method): the order of listings.
from .duet import DominantContextualMerge, Duet, TextGuidedPrune, TextGuidedStates
from .trio_scan import GlobalLocalScan, TrioScan  # registered before pio, as the tables list them
from .pio import PIO, SaliencyNMSPrune, saliency_nms
from .fastv import FastV, LastTokenAttention
from .pyramiddrop import LastInstructionAttention, PyramidDrop
from .visionzip import VisionZip
from .random_drop import RandomDrop, RandomPatches
from .pool import GridPool, Pool
from .full import Full
from .sparsevlm import SparseVLM, TextRaterPrune
from .registry import METHODS, from_dict, make, register_method
from .adaptive import Adaptive

# The field's newer methods (issue #24).
from .dart import DART, DuplicationPrune
from .divprune import DivPrune, MaxMinDiversity
from .cdpruner import CDPruner, ConditionalDPPSelect
from .vispruner import ImportantDiverse, VisPruner
from .vscan import VScan
from .holitom import HoliTom, HoliTomMerge, SimilarityMerge

# Methods that reach where the others cannot (issue #36).
from .hiprune import HierarchicalSelect, HiPrune
from .random_horizon import RandomHorizon, UniformRandomPrune
from .pixelprune import EnteredTokens, PixelPredict, PixelPrune
from .visionselector import LearnedSelect, TokenScorer, VisionSelector, soft_top_k

# Methods that score without attention weights (issue #79).
from .v2drop import HiddenStateChange, V2Drop
from .apet import ApET, ApproximationErrorMerge, ApproximationErrorPrune

__all__ = [
    # the interface
    "Adaptive",
    "Compose",
    "InputStage",
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
    "from_dict",
    "make",
    "register_method",
    # methods and their stages
    "Duet",
    "DominantContextualMerge",
    "TextGuidedPrune",
    "TextGuidedStates",
    "FastV",
    "LastTokenAttention",
    "Full",
    "PIO",
    "SaliencyNMSPrune",
    "saliency_nms",
    "GlobalLocalScan",
    "TrioScan",
    "Pool",
    "GridPool",
    "PyramidDrop",
    "LastInstructionAttention",
    "RandomDrop",
    "RandomPatches",
    "SparseVLM",
    "TextRaterPrune",
    "VisionZip",
    "DART",
    "DuplicationPrune",
    "DivPrune",
    "MaxMinDiversity",
    "CDPruner",
    "ConditionalDPPSelect",
    "VisPruner",
    "ImportantDiverse",
    "VScan",
    "HoliTom",
    "HoliTomMerge",
    "SimilarityMerge",
    "HiPrune",
    "HierarchicalSelect",
    "RandomHorizon",
    "UniformRandomPrune",
    "PixelPrune",
    "PixelPredict",
    "EnteredTokens",
    "VisionSelector",
    "LearnedSelect",
    "TokenScorer",
    "soft_top_k",
    "V2Drop",
    "HiddenStateChange",
    "ApET",
    "ApproximationErrorMerge",
    "ApproximationErrorPrune",
]
