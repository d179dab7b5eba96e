"""The reducer every method is: a ``plan`` per item geometry, attached to a model through the runtime.

A method is a ``Reducer`` whose ``plan`` returns a ``duet_vlm.plan.Plan`` (the interface types live
there, below the runtime). Methods register themselves by name (``register_method``), declare
their options as dataclass fields, and round-trip through a plain dict (``to_dict`` /
``duet_vlm.from_dict``), so a results file records exactly what ran and can rebuild it.
"""

from __future__ import annotations

import dataclasses
import threading
import warnings
from abc import ABC, abstractmethod
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, ClassVar, Iterator

from torch import nn

from ..geometry import Geometry
from ..options import check_number
from ..plan import (  # noqa: F401 - re-exported: the interface methods are written against
    BudgetWarning,
    InputStage,
    LanguageStage,
    LayerKindError,
    LayerView,
    Plan,
    PositionsError,
    Selection,
    VisionReduction,
    VisionStage,
    VisionView,
    check_boundaries,
    check_positions,
    resolve_positions,
)
from ..runtime import attach as attach_runtime
from ..schedule import Schedule, solve_llm_input
from ..stats import DeferredStats, ReductionStats
from ..unwrap import unwrap_model


def per_unit(geometry: Geometry | None, keep: int) -> int:
    """Tokens per unit (per frame of a video) of a vision stage that keeps ``keep`` per item; a
    video is refused a count below one token per frame."""
    if geometry is None:
        return keep
    if keep < geometry.units:
        where = f"{geometry.units} frames (a vision stage keeps the same count in every frame)" if geometry.units > 1 else "an image"
        raise ValueError(
            f"{keep} visual tokens cannot be split over {where}: give a budget of at least one token per frame"
        )
    return keep // geometry.units


def check_budget(budget: int | None, required: bool = True) -> None:
    """Budgets are whole numbers of visual tokens per layer per image."""
    check_number("budget", budget, integer=True, low=0, low_open=True, optional=not required,
                 note="visual tokens per layer per image")


class CallStats:
    """The statistics of the last prefill, per thread, so that threads sharing one reducer each read
    their own call's; a thread that made no call reads the newest any thread recorded (e.g. a
    ``generate`` run in a background thread with a streamer). The runtime records them deferred
    (``DeferredStats``): they are computed when first read. Not copied with the reducer."""

    def __init__(self) -> None:
        self._local = threading.local()
        self.newest: ReductionStats | None = None

    def get(self) -> ReductionStats | None:
        stats = getattr(self._local, "stats", self.newest)
        return stats.resolve() if isinstance(stats, DeferredStats) else stats

    def set(self, stats: ReductionStats | DeferredStats | None) -> None:
        self._local.stats = self.newest = stats

    def __deepcopy__(self, memo) -> "CallStats":
        return CallStats()

    def __reduce__(self):
        return CallStats, ()


class CallOptions(threading.local):
    """Options of the calls one thread makes (``Reducer.per_row``); not copied with the reducer."""

    def __deepcopy__(self, memo) -> "CallOptions":
        return CallOptions()

    def __reduce__(self):
        return CallOptions, ()


@dataclass
class Reducer(ABC):
    """Base of every method: attach it to a model as a context manager or persistently.

    A method overrides ``plan``. Methods that can serve as one half of a ``Compose`` also implement
    ``vision_stage_for`` (vision-side methods) or ``schedule_for`` and ``language_stage``
    (language-side methods).

    ``positions`` is declared here once for every method: ``"contiguous"`` renumbers kept tokens
    after every drop (the references of DUET, PyramidDrop, SparseVLM and PIO), ``"original"`` keeps
    their positions (FastV); ``None`` takes the method's ``default_positions``, else the model's
    default (contiguous under 1-D RoPE, original under M-RoPE, where renumbering is refused).

    >>> reducer = duet_vlm.Duet(budget=64)                      # doctest: +SKIP
    >>> with reducer(model):                                    # doctest: +SKIP
    ...     model.generate(**inputs, max_new_tokens=32)
    >>> reducer.stats.tokens_per_layer                          # doctest: +SKIP
    """

    positions: str | None = field(default=None, kw_only=True)

    #: the name the method is registered under (``register_method``).
    method_name: ClassVar[str] = ""
    #: the position mode used when ``positions`` is ``None`` (``None``: the model's default).
    default_positions: ClassVar[str | None] = None
    #: fields that are objects rather than settings: left out of ``to_dict``, passed to ``from_dict``.
    runtime_fields: ClassVar[tuple[str, ...]] = ()
    #: the method is given a budget or a ratio (``make(name, budget=...)``); ``False``: each item's
    #: count follows its content and no budget is taken (PixelPrune).
    takes_budget: ClassVar[bool] = True

    def __post_init__(self) -> None:
        check_positions(self.positions)
        if self.positions is None:
            self.positions = self.default_positions

    @classmethod
    def prunes_in_language_model(cls) -> bool:
        """Whether the method drops tokens inside the language model (it has a language stage):
        where ``positions`` decides how the survivors are numbered. A vision-side method hands the
        language model a shorter input, whose numbering ``positions`` also sets."""
        return cls.language_stage is not Reducer.language_stage

    @property
    def position_mode(self) -> str | None:
        """The position mode asked for (``None``: the model's default)."""
        return self.positions

    # Statistics belong to the call that made them (``CallStats``).
    @property
    def stats(self) -> ReductionStats | None:
        """What the last prefill of this thread reduced (``None`` before any call), computed the
        first time it is read after that prefill."""
        return self._call_stats().get()

    @stats.setter
    def stats(self, value: ReductionStats | DeferredStats | None) -> None:
        self._call_stats().set(value)

    def _call_stats(self) -> CallStats:
        box = self.__dict__.get("_stats")
        if box is None:
            box = self.__dict__.setdefault("_stats", CallStats())
        return box

    # ----------------------------------------------------------------- budgets per call and per item
    #: whether ``item_budget`` chooses each item's budget from its content (``Adaptive``).
    adapts_to_content: ClassVar[bool] = False

    def item_budget(self, view: VisionView, geometry: Geometry) -> int | None:
        """The budget of one item chosen from its own vision-encoder view (``None``: the reducer's)."""
        return None

    def with_budget(self, budget: int) -> "Reducer":
        """The same method at another budget (what a per-row or per-item budget runs)."""
        if not any(spec.name == "budget" for spec in dataclasses.fields(self)):
            raise TypeError(f"{type(self).__name__} has no budget to set per row or per item")
        return dataclasses.replace(self, budget=budget)

    @contextmanager
    def per_row(self, budget=None, ratio=None) -> Iterator["Reducer"]:
        """Budgets (average visual tokens per layer per item) or ratios (of each item's tokens) per
        row, for the calls this thread makes inside: one server batch, several users' budgets. A
        padded batch with per-row budgets equals each row run alone with its own.

        >>> with reducer(model), reducer.per_row(budget=[64, 192]):   # doctest: +SKIP
        ...     model.generate(**two_rows)
        """
        if (budget is None) == (ratio is None):
            raise ValueError("give per-row budgets or per-row ratios (one list)")
        values = list(budget if budget is not None else ratio)
        if not values:
            raise ValueError("per-row budgets: give one value per row of the batch")
        for value in values:
            if budget is not None:
                check_budget(value)
            else:
                check_number("per-row ratios", value, low=0, high=1, low_open=True)
        if ratio is not None:
            values = [lambda geometry, r=r: max(1, round(r * geometry.visual_tokens)) for r in values]
        options = self._call_options()
        previous, options.rows = getattr(options, "rows", None), values
        try:
            yield self
        finally:
            options.rows = previous

    def row_budgets(self, batch: int, input_ids=None) -> list | None:
        """The per-row budgets set for this thread's call (``per_row``), one per row of a batch of
        ``batch`` (rows that ``generate`` repeated for beams or several sequences share their row's:
        given ``input_ids``, a batch is taken as repeated rows only when each group's rows are equal,
        so a list shorter than the batch is an error, not a silent repeat)."""
        rows = getattr(self._call_options(), "rows", None)
        if rows is None:
            return None
        repeat = batch // len(rows)
        if batch % len(rows) or (repeat > 1 and input_ids is not None and not bool(
                (input_ids.view(len(rows), repeat, -1) == input_ids[::repeat, None]).all())):
            raise ValueError(f"per-row budgets: {len(rows)} given for a batch of {batch} rows (give one per row)")
        return [value for value in rows for _ in range(repeat)]

    def _call_options(self) -> threading.local:
        box = self.__dict__.get("_options")
        if box is None:
            box = self.__dict__.setdefault("_options", CallOptions())
        return box

    @abstractmethod
    def plan(self, geometry: Geometry) -> Plan:
        """Resolve the budget into stages and a schedule for this model geometry."""

    def input_stage(self) -> InputStage | None:
        """The stage that chooses, from the pixels, which patches enter the vision encoder at all
        (``None``: every patch does)."""
        return None

    def vision_stage_for(self, geometry: Geometry, keep: int) -> VisionStage:
        """The vision stage configured to pass ``keep`` tokens per image to the language model."""
        raise NotImplementedError(f"{type(self).__name__} has no vision-side stage")

    def encoder_layers(self, geometry: Geometry) -> tuple:
        """Encoder layers besides the feature layer that this method's vision stage reads on a model
        of ``geometry`` (``VisionStage.encoder_layers``): the runtime taps their inputs."""
        return ()

    def schedule_for(self, geometry: Geometry, llm_input: int) -> Schedule:
        """The pruning schedule when ``llm_input`` visual tokens per image enter the language model."""
        raise NotImplementedError(f"{type(self).__name__} has no language-side stage")

    def language_stage(self) -> LanguageStage:
        raise NotImplementedError(f"{type(self).__name__} has no language-side stage")

    def resolve(self, geometry: Geometry, quiet: bool = False) -> Plan:
        """``plan`` with the shared rules: a budget at or above the token count is a no-op (said once
        per reducer and item size, unless ``quiet``), and the plan's position mode is this reducer's,
        resolved for the model."""
        mode = resolve_positions(self.position_mode, geometry)  # refused before any budget error
        budget = getattr(self, "budget", None)
        if budget is not None and budget >= geometry.visual_tokens:
            said = self.__dict__.setdefault("_said", set())
            if not quiet and (budget, geometry.visual_tokens) not in said:
                said.add((budget, geometry.visual_tokens))
                warnings.warn(
                    f"budget {budget} >= {geometry.visual_tokens} visual tokens per {geometry.modality}: "
                    "nothing is reduced",
                    BudgetWarning,
                    stacklevel=2,
                )
            plan = Plan(Schedule(geometry.num_layers, geometry.visual_tokens, geometry.visual_tokens))
        else:
            plan = self.plan(geometry)
        check_boundaries(plan, geometry)
        plan.positions = mode
        return plan

    def attach(self, model: nn.Module):
        """Install the hooks until ``handle.remove()``; for Trainers and evaluators."""
        return attach_runtime(self, unwrap_model(model))

    @contextmanager
    def __call__(self, model: nn.Module) -> Iterator[nn.Module]:
        handle = self.attach(model)
        try:
            yield model
        finally:
            handle.remove()

    # ----------------------------------------------------------------- records
    def save_objects(self, directory) -> None:
        """Write what ``to_dict`` leaves out and a saved model needs (a trained scorer) into
        ``directory``, beside the model (``save_reducer`` calls it); nothing for most methods."""

    @classmethod
    def load_objects(cls, directory) -> dict[str, Any]:
        """What ``save_objects`` wrote into ``directory``, as ``from_dict``'s objects (``load_reducer``
        passes them)."""
        return {}

    def to_dict(self) -> dict[str, Any]:
        """Every setting as plain data, with the method's registered name: ``from_dict`` rebuilds
        an equal reducer (objects such as a tokenizer are passed to ``from_dict`` again).

        >>> Duet(budget=64).to_dict()["method"], Duet(budget=64).to_dict()["budget"]   # doctest: +SKIP
        ('duet', 64)
        """
        if not self.method_name:
            raise TypeError(f"{type(self).__name__} is not a registered method (register_method)")
        record: dict[str, Any] = {"method": self.method_name}
        for spec in dataclasses.fields(self):
            if spec.name in self.runtime_fields:
                continue
            record[spec.name] = _plain(spec.name, getattr(self, spec.name))
        return record


def _plain(name: str, value: Any) -> Any:
    """A setting as JSON-ready data (tuples become lists, reducers their dicts)."""
    if isinstance(value, Reducer):
        return value.to_dict()
    if isinstance(value, (tuple, list)):
        return [_plain(name, v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise ValueError(f"the setting {name}={value!r} is not plain data and cannot be recorded (to_dict)")


@dataclass
class PerItemRatio(Reducer):
    """Any method with its budget set, for each visual item, to ``ratio`` of the item's own tokens.

    Anyres images and videos differ in size, so one absolute budget means a different reduction for
    each of them; ``ratio=0.25`` keeps a quarter of every item (its layer average, rounded).
    ``duet_vlm.make(name, ratio=...)`` builds one.

    >>> reducer = make("duet", ratio=0.25)                         # doctest: +SKIP
    >>> with reducer(model): model.generate(**inputs)              # doctest: +SKIP
    """

    method: type[Reducer]
    ratio: float
    options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        super().__post_init__()
        check_number("ratio", self.ratio, low=0, high=1, low_open=True, note="the kept fraction of each item's tokens")
        if self.positions is None:
            self.positions = self.method.default_positions
        self.build(1)  # validate the options now, not at the first forward
        # Only the options that differ from the method's defaults: equal reducers compare equal,
        # however they were written (``make`` or ``from_dict``).
        # A default of a type of its own (``shapes.DefaultLayer``: it snaps, a given layer does not)
        # differs from the same number given.
        defaults = {spec.name: spec.default for spec in dataclasses.fields(self.method)}
        self.options = {k: v for k, v in self.options.items()
                        if k not in defaults or defaults[k] != v or type(defaults[k]) is not type(v)}

    @property
    def position_mode(self) -> str | None:
        return self.build(1).position_mode

    def build(self, budget: int) -> Reducer:
        """The method with an absolute budget."""
        return self.method(budget=budget, positions=self.positions, **self.options)

    def encoder_layers(self, geometry: Geometry) -> tuple:
        return self.build(1).encoder_layers(geometry)

    def budget_for(self, geometry: Geometry) -> int:
        return max(1, round(self.ratio * geometry.visual_tokens))

    def with_budget(self, budget: int) -> Reducer:
        return self.build(budget)

    def resolve(self, geometry: Geometry, quiet: bool = False) -> Plan:
        return self.build(self.budget_for(geometry)).resolve(geometry, quiet)

    def plan(self, geometry: Geometry) -> Plan:
        return self.build(self.budget_for(geometry)).plan(geometry)

    def to_dict(self) -> dict[str, Any]:
        record = self.build(1).to_dict()
        del record["budget"]
        return {**record, "ratio": self.ratio}


def compose_plan(vision: Reducer, language: Reducer, budget: int, geometry: Geometry) -> Plan:
    """Split one budget between a vision-side and a language-side method.

    The LLM-input count is solved so that the language method's schedule averages ``budget``; the
    vision method is then configured to deliver exactly that many tokens.
    """
    schedule = solve_llm_input(budget, lambda n: language.schedule_for(geometry, n), step=geometry.units)
    language_stage = language.language_stage() if schedule.boundaries else None
    return Plan(schedule, vision.vision_stage_for(geometry, schedule.llm_input), language_stage)


@dataclass
class Compose(Reducer):
    """A vision-side method followed by a language-side method under one budget.

    DUET is VisionZip-style merging followed by PyramidDrop-style pruning; other pairs combine the
    same way, e.g. VisionZip tokens pruned further by FastV:

    >>> reducer = Compose(make("visionzip"), make("pyramiddrop"), budget=128)   # doctest: +SKIP
    """

    vision: Reducer
    language: Reducer
    budget: int

    method_name: ClassVar[str] = "compose"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_budget(self.budget)

    def encoder_layers(self, geometry: Geometry) -> tuple:
        return self.vision.encoder_layers(geometry)

    def plan(self, geometry: Geometry) -> Plan:
        return compose_plan(self.vision, self.language, self.budget, geometry)
