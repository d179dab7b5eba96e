"""No reduction: the unreduced model under the same harness (statistics, FLOPs, KV bytes)."""

from __future__ import annotations

from dataclasses import dataclass

from ..geometry import Geometry
from ..schedule import Schedule
from .base import Plan, Reducer, check_budget
from .registry import register_method


@register_method("full")
@dataclass
class Full(Reducer):
    """Keeps every visual token; outputs are bit-identical to the model without a reducer.

    Useful as the reference row of a comparison: ``reducer.stats`` reports the full model's token
    counts, FLOPs and KV-cache bytes. ``budget`` is accepted (and validated) so that every
    registered method takes the same arguments, and otherwise ignored.

    >>> reducer = Full()                                         # doctest: +SKIP
    >>> with reducer(model): model.generate(**inputs)            # doctest: +SKIP
    >>> reducer.stats.average_tokens                             # doctest: +SKIP
    576.0
    """

    budget: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        check_budget(self.budget, required=False)

    def resolve(self, geometry: Geometry, quiet: bool = False) -> Plan:
        # No "budget >= tokens" warning: the budget is ignored by design.
        return self.plan(geometry)

    def plan(self, geometry: Geometry) -> Plan:
        return Plan(Schedule(geometry.num_layers, geometry.visual_tokens, geometry.visual_tokens))
