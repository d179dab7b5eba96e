"""What every call on an attached model shares: the reducer, the family adapter, the solved plans."""

from __future__ import annotations

import threading

from ..adapters import Geometry, ModelAdapter
from ..plan import LayerKindError, Plan, PositionsError
from .protocol import RuntimeReducer


class Binding:
    """A reducer bound to a model's adapter; plans are solved once per item geometry (thread-safe).

    The default image's plan is solved at once, so a budget the model cannot reach is an error at
    attach time rather than mid-forward; a no-op warning waits until an item is that size. Families
    without a default size (Qwen-VL) have only a nominal one: a budget it cannot meet may suit the
    real items, so only what fails for every size (positions) is an error there.
    """

    def __init__(self, reducer: RuntimeReducer, adapter: ModelAdapter):
        self.reducer = reducer
        self.adapter = adapter
        #: the language side: each decoder layer's kind, and the mask and RoPE each kind gets.
        self.scheme = adapter.scheme
        self._plans: dict[Geometry, Plan] = {}
        self._lock = threading.Lock()
        self.plan: Plan | None = None
        try:
            self.plan = reducer.resolve(adapter.geometry, quiet=True)
        except (PositionsError, LayerKindError):  # wrong for every item size: refused at attach
            raise
        except ValueError:
            if not adapter.nominal_geometry:
                raise
        #: the default image's schedule; each item gets its own at its prefill.
        self.schedule = self.plan.schedule if self.plan is not None else None

    def plan_for(self, geometry: Geometry, budget: int | None = None) -> Plan:
        """The plan of an item of ``geometry``: the reducer's, or the same method at ``budget``."""
        key = (geometry, budget)
        plan = self._plans.get(key)
        if plan is None:
            with self._lock:
                plan = self._plans.get(key)
                if plan is None:
                    reducer = self.reducer if budget is None else self.reducer.with_budget(budget)
                    plan = self._plans[key] = reducer.resolve(geometry)
        return plan

    @property
    def text_config(self):
        return self.adapter.text_config
