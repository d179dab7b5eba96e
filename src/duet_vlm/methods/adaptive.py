"""Budgets that follow the content: any method, each item's budget chosen from what it holds."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar, Iterable, NamedTuple

import torch
from torch import nn

from ..content import SIGNALS, THRESHOLD_RANGES, Curve, calibrate_threshold, curve
from ..geometry import Geometry
from ..options import check_number
from ..plan import Plan, VisionView
from .base import PerItemRatio, Reducer


class Recorded(NamedTuple):
    """One visual item seen while calibrating: its signal curve (which reads the vision encoder
    only, so any method's ``Adaptive`` can ``fit`` it) and its geometry."""

    curve: Curve
    geometry: Geometry


@dataclass
class Adaptive(Reducer):
    """Any method with a budget, each item's budget chosen from a signal of that item alone.

    The method's own budget (or ratio) is the average to meet over the data. An item's budget is
    its ``signal`` curve's count at ``threshold`` (``duet_vlm.content``: the tokens covering a share
    of its attention, its distinct tokens, or its effective rank), clamped to ``floor`` and
    ``ceiling`` times the average, then moved towards the average to the nearest budget the method
    reaches on the item (``reach``: e.g. FastV and PyramidDrop keep every token in their first
    layers, so they cannot average a few tokens); ``calibrate`` finds the threshold at which sample
    data averages the method's budget. Each item's count depends on that item alone, so a padded batch still
    equals each row run alone; ``reducer.stats.items`` has every item's counts.

    The rule, and why (measured on the shipped demo model: ``python -m duet_vlm.demo.adaptive_study``,
    README "Content-adaptive budgets"): the signal is the one with the best validation accuracy
    averaged over DUET, VisionZip and PyramidDrop at budget 64, against the fixed budget at the same
    average; that is ``rank``, the default. ``rank`` moves an item's budget least (a standard
    deviation of about 4 tokens at 64) and stays within noise of the fixed budget. ``coverage``
    spreads budgets the most (floor to ceiling) but gives scenes with few objects the most tokens
    (its counts correlate about -0.3 to -0.4 with the number of objects), and PyramidDrop, whose
    accuracy falls steeply below its budget, loses about 20 points with it. ``distinct`` lies in
    between. No signal beat the fixed budget on that model: adaptive budgets stay an option, and
    a model whose encoder's attention follows its objects may rank the signals otherwise (calibrate
    and compare on your own validation data: ``duet-vlm eval --adaptive SIGNAL``).

    Args:
        reducer: the method (``make(name, budget=...)`` or ``ratio=...``).
        signal: ``"rank"`` (default), ``"coverage"`` or ``"distinct"``.
        threshold: the calibrated threshold (``calibrate`` sets it).
        floor, ceiling: bounds of an item's budget, as fractions of the average (defaults 0.25, 2).

    >>> adaptive = Adaptive(make("duet", budget=128)).calibrate(model, batches)   # doctest: +SKIP
    >>> with adaptive(model): model.generate(**inputs)                            # doctest: +SKIP
    """

    reducer: Reducer
    signal: str = "rank"
    threshold: float | None = None
    floor: float = 0.25
    ceiling: float = 2.0

    method_name: ClassVar[str] = "adaptive"
    adapts_to_content: ClassVar[bool] = True

    # Items seen while calibrating (``calibrate``): their curves and average budgets.
    _recorded: list | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.reducer, Reducer) or isinstance(self.reducer, Adaptive):
            raise ValueError("Adaptive wraps one method with a budget (make(name, budget=...) or ratio=...)")
        if self.signal not in SIGNALS:
            raise ValueError(f"signal must be one of {SIGNALS}, got {self.signal!r}")
        low, high = THRESHOLD_RANGES[self.signal]
        check_number(f"threshold of the {self.signal} signal", self.threshold, low=low, high=high, optional=True)
        check_number("floor", self.floor, low=0, high=1, low_open=True, note="a fraction of the average budget")
        check_number("ceiling", self.ceiling, low=1, note="a multiple of the average budget")
        self.average_budget(Geometry(1, 10**6, (1, 1), False))  # a method without a budget is refused now

    def average_budget(self, geometry: Geometry) -> int:
        """The average an item of ``geometry`` is calibrated towards (the method's budget or ratio)."""
        if isinstance(self.reducer, PerItemRatio):
            return self.reducer.budget_for(geometry)
        budget = getattr(self.reducer, "budget", None)
        if budget is None:
            raise ValueError(f"Adaptive needs a method with a budget or a ratio, got {type(self.reducer).__name__}")
        return budget

    def item_budget(self, view: VisionView, geometry: Geometry) -> int | None:
        item_curve = curve(self.signal, view.cls_attention, view.keys, view.features)
        if self._recorded is not None:  # calibrating: the method's own budget, the curve noted
            self._recorded.append(Recorded(item_curve, geometry))
            return None
        if self.threshold is None:
            raise ValueError("Adaptive has no threshold: calibrate it on sample data first (calibrate), or give one")
        return self.budget_of(item_curve.count(self.threshold), geometry)

    def bounds(self, geometry: Geometry) -> tuple[int, int]:
        """The lowest and highest budget of an item of ``geometry``: ``floor`` and ``ceiling`` times
        its average, at least 1 and at most its tokens."""
        average = self.average_budget(geometry)
        low = max(round(self.floor * average), 1)
        return min(low, geometry.visual_tokens), max(low, min(round(self.ceiling * average), geometry.visual_tokens))

    def budget_of(self, count: int, geometry: Geometry) -> int:
        """An item's budget for its signal's ``count``: clamped to ``bounds``, then ``reach``ed."""
        low, high = self.bounds(geometry)
        return self.reach(min(max(count, low), high), geometry)

    def reach(self, budget: int, geometry: Geometry) -> int:
        """``budget``, or the nearest budget towards the item's average that the method reaches on an
        item of ``geometry`` (its solver refuses the others). Each budget is tried once per geometry."""
        cache = self.__dict__.setdefault("_reach", {})
        found = cache.get((geometry, budget))
        if found is not None:
            return found
        average = min(self.average_budget(geometry), geometry.visual_tokens)
        step = 1 if budget < average else -1
        tried, candidate = [], budget
        while candidate != average and (geometry, candidate) not in cache and not self._reaches(candidate, geometry):
            tried.append(candidate)
            candidate += step
        found = cache.get((geometry, candidate), candidate)
        for budget_tried in [*tried, budget]:
            cache[(geometry, budget_tried)] = found
        return found

    def _reaches(self, budget: int, geometry: Geometry) -> bool:
        try:
            self.reducer.with_budget(budget).resolve(geometry, quiet=True)
        except ValueError:
            return False
        return True

    def record(self, model: nn.Module, batches: Iterable[dict[str, Any]]) -> list[Recorded]:
        """Every visual item of ``batches`` (model inputs): its signal curve and its geometry. Runs the
        model once per batch with the method at its own budget."""
        recorder = dataclasses.replace(self, threshold=None)
        recorder._recorded = recorded = []
        with torch.no_grad(), recorder(model):
            for batch in batches:
                model(**batch)
        return recorded

    def fit(self, recorded: list[Recorded]) -> "Adaptive":
        """A copy whose threshold makes the ``recorded`` items (``record``) average their budgets (the
        method's budget, or its ratio of each item's tokens)."""
        if not recorded:
            raise ValueError("calibration saw no image or video: give batches with visual items")
        averages = [min(self.average_budget(item.geometry), item.geometry.visual_tokens) for item in recorded]
        floors, ceilings = zip(*(self.bounds(item.geometry) for item in recorded))
        low, high = THRESHOLD_RANGES[self.signal]
        threshold = calibrate_threshold([item.curve for item in recorded], averages, list(floors), list(ceilings),
                                        low, high, snap=lambda i, count: self.reach(count, recorded[i].geometry))
        return dataclasses.replace(self, threshold=threshold)

    def counts(self, recorded: list[Recorded]) -> list[int]:
        """Each ``recorded`` item's budget at this reducer's threshold (what a run would give it)."""
        if self.threshold is None:
            raise ValueError("Adaptive has no threshold: calibrate it on sample data first (calibrate), or give one")
        return [self.budget_of(item.curve.count(self.threshold), item.geometry) for item in recorded]

    def calibrate(self, model: nn.Module, batches: Iterable[dict[str, Any]]) -> "Adaptive":
        """A copy whose threshold makes the items of ``batches`` (model inputs) average the method's
        budget (``fit(record(model, batches))``). Runs the model once per batch with the method at
        its own budget."""
        return self.fit(self.record(model, batches))

    # The method itself, at each item's budget.
    def plan(self, geometry: Geometry) -> Plan:
        return self.reducer.plan(geometry)

    def resolve(self, geometry: Geometry, quiet: bool = False) -> Plan:
        return self.reducer.resolve(geometry, quiet)

    def with_budget(self, budget: int) -> Reducer:
        return self.reducer.with_budget(budget)

    def encoder_layers(self, geometry: Geometry) -> tuple:
        return self.reducer.encoder_layers(geometry)

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.method_name, "reducer": self.reducer.to_dict(), "signal": self.signal,
            "threshold": self.threshold, "floor": self.floor, "ceiling": self.ceiling, "positions": self.positions,
        }
