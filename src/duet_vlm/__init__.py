"""duet-vlm: DUET visual token reduction (and its baselines) for Hugging Face VLMs.

>>> import duet_vlm
>>> reducer = duet_vlm.Duet(budget=64)
>>> with reducer(model): model.generate(**inputs)       # doctest: +SKIP
"""

from .adapters import Geometry, adapter_for
from .methods import (
    Compose,
    Selection,
    DominantContextualMerge,
    Duet,
    LanguageStage,
    LayerView,
    Plan,
    Reducer,
    TextGuidedPrune,
    VisionReduction,
    VisionStage,
    VisionView,
)
from .methods import METHODS, make
from .methods import PIO, SaliencyNMSPrune, saliency_nms
from .methods import FastV, Full, Pool, PyramidDrop, RandomDrop, VisionZip
from .methods import SparseVLM, TextRaterPrune
from .schedule import Schedule
from .stats import ReductionStats

__version__ = "0.1.0"

__all__ = [
    "METHODS",
    "make",
    "Compose",
    "Selection",
    "DominantContextualMerge",
    "Duet",
    "PIO",
    "SaliencyNMSPrune",
    "saliency_nms",
    "FastV",
    "Full",
    "Pool",
    "PyramidDrop",
    "RandomDrop",
    "VisionZip",
    "Geometry",
    "LanguageStage",
    "LayerView",
    "Plan",
    "Reducer",
    "ReductionStats",
    "Schedule",
    "SparseVLM",
    "TextGuidedPrune",
    "TextRaterPrune",
    "VisionReduction",
    "VisionStage",
    "VisionView",
    "adapter_for",
]
