"""Name -> method class, and ``make(name, budget=...)``: the same budget meaning for every method."""

from __future__ import annotations

from .base import PerItemRatio, Reducer
from .duet import Duet
from .pio import PIO
from .fastv import FastV
from .full import Full
from .pool import Pool
from .pyramiddrop import PyramidDrop
from .random_drop import RandomDrop
from .visionzip import VisionZip
from .sparsevlm import SparseVLM

METHODS: dict[str, type[Reducer]] = {
    "duet": Duet,
    "pio": PIO,
    "fastv": FastV,
    "pyramiddrop": PyramidDrop,
    "visionzip": VisionZip,
    "random": RandomDrop,
    "pool": Pool,
    "full": Full,
    "sparsevlm": SparseVLM,
}


def make(name: str, budget: int | None = None, ratio: float | None = None, **options) -> Reducer:
    """Build a registered method by name, with an absolute ``budget`` (average visual tokens per
    decoder layer, per visual item) or a ``ratio`` of each item's own tokens.

    >>> reducer = make("duet", budget=128)
    >>> with reducer(model): model.generate(**inputs)      # doctest: +SKIP
    >>> make("visionzip", ratio=0.25)                       # doctest: +SKIP
    """
    try:
        method = METHODS[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; registered: {', '.join(sorted(METHODS))}") from None
    if ratio is not None:
        if budget is not None:
            raise ValueError("give a budget or a ratio, not both")
        method(budget=1, **options)  # validate the options now, not at the first forward
        return PerItemRatio(lambda b: method(budget=b, **options), ratio)
    return method(budget=budget, **options) if budget is not None else method(**options)
