"""duet-vlm: DUET visual token reduction (and its baselines) for Hugging Face VLMs.

>>> import duet_vlm
>>> reducer = duet_vlm.Duet(budget=64)
>>> with reducer(model): model.generate(**inputs)       # doctest: +SKIP
"""

from . import methods
from .adapters import Geometry, adapter_for
from .plan import BudgetWarning, ReducedHiddenStatesWarning
from .methods import *  # noqa: F401,F403 - the methods, their stages, the registry and the interface
from .methods.registry import REDUCER_FILE, load_reducer, save_reducer
from .schedule import Schedule
from .stats import ReductionStats

__version__ = "0.2.0"  # pyproject.toml reads it; CHANGELOG.md says what each version holds

__all__ = [
    *methods.__all__, "BudgetWarning", "Geometry", "REDUCER_FILE", "ReducedHiddenStatesWarning", "ReductionStats", "Schedule",
    "adapter_for", "load_reducer", "save_reducer",
]
