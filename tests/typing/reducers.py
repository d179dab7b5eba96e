"""Checked by mypy (tests/test_protocol.py), never run: every registered method, the wrappers and a
composition are ``RuntimeReducer``s, with the runtime's signatures."""

from typing import Callable

from duet_vlm.methods import (
    ApET, CDPruner, DART, PIO, Adaptive, Compose, DivPrune, Duet, FastV, Full, HiPrune, HoliTom, PixelPrune, Pool, PyramidDrop,
    RandomDrop, RandomHorizon, SparseVLM, TrioScan, V2Drop, VisionSelector, VisionZip, VisPruner, VScan, make,
)
from duet_vlm.methods.base import PerItemRatio, Reducer
from duet_vlm.runtime import RuntimeReducer


def as_runtime(reducer: RuntimeReducer) -> RuntimeReducer:
    return reducer.with_budget(64)


# each class builds a RuntimeReducer (tests/test_protocol.py checks that this list is every registered method)
classes: list[Callable[..., RuntimeReducer]] = [
    ApET, CDPruner, DART, PIO, Adaptive, Compose, DivPrune, Duet, FastV, Full, HiPrune, HoliTom, PixelPrune, Pool, PyramidDrop,
    RandomDrop, RandomHorizon, SparseVLM, TrioScan, V2Drop, VisionSelector, VisionZip, VisPruner, VScan, PerItemRatio,
]


def subclass(cls: type[Reducer]) -> RuntimeReducer:
    return cls.__new__(cls)
built: list[RuntimeReducer] = [Duet(budget=64), make("fastv", budget=64), Compose(make("visionzip"), make("fastv"), budget=64)]
as_runtime(Duet(budget=64))
