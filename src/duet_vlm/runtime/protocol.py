"""What the runtime may ask of a reducer: the whole of the methods' side of the contract.

The runtime knows no method. It holds a reducer only through this protocol: it solves plans
(``resolve``, ``with_budget`` for per-row and per-item budgets), asks which encoder layers to tap,
asks for budgets chosen per row (``row_budgets``) or per item from its content (``item_budget``,
when ``adapts_to_content``), and writes what a call reduced into ``stats``. ``duet_vlm.Reducer``
implements it; the type checker checks every registered method against it
(``tests/test_protocol.py`` runs mypy on ``tests/typing/reducers.py``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar, Protocol, runtime_checkable

if TYPE_CHECKING:
    import torch

    from ..geometry import Geometry
    from ..plan import InputStage, Plan, VisionView
    from ..stats import ReductionStats


@runtime_checkable
class RuntimeReducer(Protocol):
    """A reducer as the runtime sees it (``duet_vlm.Reducer`` and everything that subclasses it)."""

    #: the registered name (``make(name)``); a wrapper's wrapped method may name it instead
    #: (``PerItemRatio.method``), read by the runtime's messages only.
    method_name: ClassVar[str]
    #: whether ``item_budget`` chooses each item's budget from its content.
    adapts_to_content: ClassVar[bool]

    @property
    def stats(self) -> ReductionStats | None:
        """What the calling thread's last prefill reduced; the runtime sets it after each call."""

    @stats.setter
    def stats(self, value: ReductionStats | None) -> None: ...

    def resolve(self, geometry: Geometry, quiet: bool = False) -> Plan:
        """The plan for an item of ``geometry`` (the budget solved, the position mode resolved)."""
        ...

    def with_budget(self, budget: int) -> RuntimeReducer:
        """The same method at another budget (a row's or an item's own)."""
        ...

    def encoder_layers(self, geometry: Geometry) -> tuple:
        """Encoder layers besides the feature layer whose inputs the runtime must tap."""
        ...

    def row_budgets(self, batch: int, input_ids: torch.Tensor | None = None) -> list | None:
        """Budgets set per row for the calling thread's call, one per row of the batch, or ``None``."""
        ...

    def item_budget(self, view: VisionView, geometry: Geometry) -> int | None:
        """An item's budget chosen from its own vision-encoder view (``None``: the reducer's)."""
        ...

    def input_stage(self) -> InputStage | None:
        """The stage choosing which patches enter the vision encoder (``None``: all of them)."""
        ...
