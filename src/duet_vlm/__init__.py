"""duet-vlm: DUET visual token reduction (and its baselines) for Hugging Face VLMs.

>>> import duet_vlm
>>> reducer = duet_vlm.Duet(budget=64)
>>> with reducer(model): model.generate(**inputs)       # doctest: +SKIP

The names below are imported when first used (PEP 562), so ``import duet_vlm`` alone, and the
command line's help, import neither torch nor transformers.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.2.0"  # pyproject.toml reads it; CHANGELOG.md says what each version holds

#: The methods, their stages, the registry and the interface (``duet_vlm.methods.__all__``; a test
#: keeps the two lists equal).
_METHOD_EXPORTS = (
    "Adaptive", "Compose", "InputStage", "LanguageStage", "PerItemRatio", "LayerView", "Plan", "Reducer", "Selection",
    "VisionReduction", "VisionStage", "VisionView", "METHODS", "from_dict", "make", "register_method", "Duet",
    "DominantContextualMerge", "TextGuidedPrune", "TextGuidedStates", "FastV", "LastTokenAttention", "Full", "PIO", "SaliencyNMSPrune",
    "saliency_nms", "GlobalLocalScan", "TrioScan", "Pool", "GridPool", "PyramidDrop", "LastInstructionAttention",
    "RandomDrop", "RandomPatches", "SparseVLM", "TextRaterPrune", "VisionZip", "DART", "DuplicationPrune", "DivPrune",
    "MaxMinDiversity", "CDPruner", "ConditionalDPPSelect", "VisPruner", "ImportantDiverse", "VScan", "HoliTom",
    "HoliTomMerge", "SimilarityMerge", "HiPrune", "HierarchicalSelect",
    "RandomHorizon", "UniformRandomPrune", "PixelPrune", "PixelPredict", "EnteredTokens", "VisionSelector",
    "LearnedSelect", "TokenScorer", "soft_top_k", "V2Drop", "HiddenStateChange", "ApET", "ApproximationErrorMerge",
    "ApproximationErrorPrune",
)

# name -> the module that defines it
_WHERE = {
    **{name: "methods" for name in _METHOD_EXPORTS},
    "Geometry": "adapters", "adapter_for": "adapters",
    "BudgetWarning": "plan", "ReducedHiddenStatesWarning": "plan",
    "REDUCER_FILE": "methods.registry", "load_reducer": "methods.registry", "save_reducer": "methods.registry",
    "Schedule": "schedule",
    "ReductionStats": "stats",
}

__all__ = [*_METHOD_EXPORTS, *sorted(set(_WHERE) - set(_METHOD_EXPORTS))]


def __getattr__(name: str):
    module = _WHERE.get(name)
    if module is None:  # a submodule (``duet_vlm.methods``), as ``import duet_vlm.methods`` gives it
        try:
            return importlib.import_module(f".{name}", __name__)
        except ModuleNotFoundError as error:
            if error.name != f"{__name__}.{name}":
                raise
            raise AttributeError(f"module 'duet_vlm' has no attribute {name!r}") from None
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # later reads skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


if TYPE_CHECKING:  # what the type checker and the API reference read
    from .adapters import Geometry, adapter_for
    from .methods import *  # noqa: F401,F403
    from .methods.registry import REDUCER_FILE, load_reducer, save_reducer
    from .plan import BudgetWarning, ReducedHiddenStatesWarning
    from .schedule import Schedule
    from .stats import ReductionStats
