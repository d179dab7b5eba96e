"""Reducer shapes that more than one method shares: a schedule, its options and its budget solver.

``PruneOnceAfterLayer`` (FastV, DART) prunes once inside the language model; ``ScanThenPrune`` (TRIO's
``pio``, VScan) scans the vision encoder, then prunes a third at boundaries. A subclass names its
language stage. Methods import these from here, never from another method.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

from ..geometry import Geometry
from ..options import check_number, check_numbers
from ..plan import check_boundary_layers
from ..schedule import Schedule, scaled_boundaries, solve_llm_input
from .base import Plan, Reducer, check_budget, per_unit
from .stages import GlobalLocalScan, scan_for

# FastV's paper default R = 50%: used when FastV prunes after a vision-side method in a Compose and
# neither ``keep`` nor ``ratio`` is given.
DEFAULT_RATIO = 0.5


def fastv_keep(budget: int, num_layers: int, visual_tokens: int, layer: int) -> int:
    """Visual tokens to keep from decoder layer ``layer`` on so that the layer average is ``budget``.

    The first ``layer`` layers see all ``visual_tokens``, so the average is
    ``(layer * visual_tokens + (num_layers - layer) * keep) / num_layers``; the closest ``keep``
    wins (ties: fewer tokens). Raises ``ValueError`` when no ``keep`` comes within 1 token.

    >>> [fastv_keep(b, 32, 576, 2) for b in (192, 128, 64)]
    [166, 98, 30]
    """
    if not 0 < layer < num_layers:
        raise ValueError(f"FastV prunes after layer {layer}; it must lie in (0, {num_layers})")

    def average(keep: int) -> float:
        return (layer * visual_tokens + (num_layers - layer) * keep) / num_layers

    exact = (budget * num_layers - layer * visual_tokens) / (num_layers - layer)
    candidates = {min(visual_tokens, max(0, f(exact))) for f in (math.floor, math.ceil)}
    best = min(candidates, key=lambda keep: (abs(average(keep) - budget), keep))
    if abs(average(best) - budget) > 1:
        raise ValueError(
            f"FastV after layer {layer} cannot average {budget} visual tokens per layer: the first {layer} "
            f"layers alone give {average(0):.1f}; use a smaller `layer` or an explicit `keep`"
        )
    return best


class DefaultLayer(int):
    """A method's default boundary layer (an ``int``, equal to and recorded as that number): on a
    hybrid language model it moves to the nearest layer where the stage can score (``Geometry.snap``),
    while a layer the user gives is honoured, or refused with ``LayerKindError`` where the stage cannot
    score there. ``to_dict`` records it as the number, which ``from_dict`` reads back as the default."""

    __slots__ = ()


@dataclass
class PruneOnceAfterLayer(Reducer):
    """The schedule of a method that prunes once inside the language model: layers ``0 .. layer-1``
    see every visual token, ``keep`` of them run from ``layer`` on. ``keep`` is solved from the
    budget (``fastv_keep``), or given, or a ``ratio`` of the LLM input; inside a ``Compose``
    without either, the subclass's ``compose_ratio``. Subclasses name the language stage that picks
    the ``keep`` tokens (FastV, DART)."""

    budget: int | None = None
    layer: int | None = DefaultLayer(2)
    keep: int | None = None
    ratio: float | None = None

    default_positions: ClassVar[str | None] = "original"
    compose_ratio: ClassVar[float] = DEFAULT_RATIO
    #: where ``layer=None`` puts the boundary: this share of the decoder's depth (a subclass whose
    #: default is relative to the depth); ``None``: ``layer`` must be given.
    depth_share: ClassVar[float | None] = None

    def __post_init__(self) -> None:
        super().__post_init__()
        check_budget(self.budget, required=False)
        check_number("layer", self.layer, integer=True, low=1, note="the score reads layer - 1",
                     optional=self.depth_share is not None)
        check_number("keep", self.keep, integer=True, low=0, optional=True)
        check_number("ratio", self.ratio, low=0, high=1, optional=True)
        if self.keep is not None and self.ratio is not None:
            raise ValueError("give keep or ratio, not both")

    def layer_on(self, geometry: Geometry) -> int:
        """``layer``, or where ``depth_share`` puts it on this model (at least 1)."""
        if self.layer is not None:
            return self.layer
        return max(1, round(self.depth_share * geometry.num_layers))

    def _check_layer(self, geometry: Geometry) -> None:
        if self.layer_on(geometry) >= geometry.num_layers:
            raise ValueError(f"layer={self.layer_on(geometry)} but the language model has {geometry.num_layers} layers")

    def schedule_for(self, geometry: Geometry, llm_input: int) -> Schedule:
        self._check_layer(geometry)
        if self.keep is not None:
            # Clamped rather than rejected: Compose's solver probes small LLM-input counts.
            keep = min(self.keep, llm_input)
        else:
            keep = int(llm_input * (self.ratio if self.ratio is not None else self.compose_ratio))
        return self._schedule(geometry, llm_input, keep)

    def boundary(self, geometry: Geometry) -> int:
        """An explicit ``layer`` as given (``check_boundaries`` refuses it where the stage cannot
        score); the default one, on a hybrid language model, moved to the nearest layer after which
        the stage can score (``Geometry.snap``: the layer before it computes attention)."""
        layer = self.layer_on(geometry)
        if self.layer is not None and not isinstance(self.layer, DefaultLayer):
            check_boundary_layers(type(self.language_stage()), (layer,), geometry)  # before the budget is solved
            return layer
        return geometry.snap((layer,), self.language_stage().reads)[0]

    def _schedule(self, geometry: Geometry, llm_input: int, keep: int) -> Schedule:
        return Schedule(geometry.num_layers, geometry.visual_tokens, llm_input, ((self.boundary(geometry), keep),))

    def plan(self, geometry: Geometry) -> Plan:
        self._check_layer(geometry)
        name = type(self).__name__
        if self.keep is not None or self.ratio is not None:
            if self.keep is not None and self.keep > geometry.visual_tokens:
                raise ValueError(f"keep={self.keep} exceeds the {geometry.visual_tokens} visual tokens per item")
            schedule = self.schedule_for(geometry, geometry.visual_tokens)
        else:
            if self.budget is None:
                raise ValueError(f"{name} needs a budget (or keep / ratio)")
            layer = self.boundary(geometry)
            try:
                keep = fastv_keep(self.budget, geometry.num_layers, geometry.visual_tokens, layer)
            except ValueError:
                first = layer * geometry.visual_tokens / geometry.num_layers
                raise ValueError(
                    f"{name} after layer {layer} cannot average {self.budget} visual tokens per layer: the "
                    f"first {layer} layers alone give {first:.1f}; use a smaller `layer` or an explicit `keep`"
                ) from None
            schedule = self._schedule(geometry, geometry.visual_tokens, keep)
        return Plan(schedule, language=self.language_stage())


#: The official Qwen2.5-VL READMEs' keep ratio at the boundary (TRIO and VScan: ``int(0.333 * n)``).
QWEN_KEEP_RATIO = 0.333


def third_keeps(
    llm_input: int, stages: int, keep: tuple[int, ...] | None = None, ratios: tuple[float, ...] | None = None,
    mrope: bool = False,
) -> tuple[int, ...]:
    """Visual tokens per item after each of ``stages`` boundaries when ``llm_input`` enter the LLM.

    Explicit ``keep`` counts are capped by the tokens present (the official ``min(image_token_list[s],
    image_tokens)``); ``ratios`` are fractions of the current count (``int(r * n)``, the official Qwen
    rule); by default a third: ``round(n / 3)`` (the official LLaVA READMEs' 96 -> 32), ``int(0.333 * n)``
    under M-RoPE (the official Qwen2.5-VL READMEs' ratio, as their code applies it).

    >>> third_keeps(96, 1), third_keeps(288, 1), third_keeps(288, 1, mrope=True)
    ((32,), (96,), (95,))
    >>> third_keeps(96, 2, keep=(64, 100)), third_keeps(100, 2, ratios=(0.5, 0.5))
    ((64, 64), (50, 25))
    """
    keeps, current = [], llm_input
    for stage in range(stages):
        if keep is not None:
            current = min(keep[stage], current)
        elif ratios is not None:
            current = int(ratios[stage] * current)
        elif mrope:
            current = int(QWEN_KEEP_RATIO * current)
        else:
            current = round(current / 3)
        keeps.append(current)
    return tuple(keeps)


@dataclass
class ScanThenPrune(Reducer):
    """The shape TRIO (``pio``) and VScan share: TRIO's vision-encoder scan brings each item to ``N``
    tokens, then boundaries inside the language model keep a third (by default after half the
    depth). A subclass gives the language stage; this class owns the options, their checks, the
    schedule and the budget solver.

    ``N`` is solved so that ``N`` for the first half of the layers and a third of it after the
    boundary average the budget: on LLaVA-1.5 (576 tokens, 32 layers) 64 -> 96 -> 32 after layer 16
    (the official READMEs' default), 128 -> 192 -> 64, 192 -> 288 -> 96. The default shape averages
    at most two thirds of an item's tokens. Explicit ``llm_input`` or ``vision_ratio`` (``N`` as
    ``int(r * tokens)``), ``layers`` (1-based "after layer l"; ``()`` for the scan alone) and ``keep``
    (absolute) or ``ratios`` (of the current count) override the solver.
    """

    budget: int | None = None
    llm_input: int | None = None
    vision_ratio: float | None = None
    layers: tuple[int, ...] | None = None
    keep: tuple[int, ...] | None = None
    ratios: tuple[float, ...] | None = None
    window: int | None = None
    local_share: float = 0.5
    local_layer: int | str | None = None
    global_layer: int | str | None = None

    #: what a budget above the default shape's ceiling should try instead.
    ceiling_hint: ClassVar[str] = "give larger ratios/keep, later layers, or layers=() for the scan alone"

    def __post_init__(self) -> None:
        super().__post_init__()
        self.layers = check_numbers("layers", self.layers, integer=True, low=1, optional=True)
        if self.layers is not None and list(self.layers) != sorted(set(self.layers)):
            raise ValueError(f"layers must be strictly increasing, got {self.layers}")
        self.keep = check_numbers("keep", self.keep, integer=True, low=0, optional=True)
        self.ratios = check_numbers("ratios", self.ratios, low=0, high=1, optional=True)
        if self.keep is not None and self.ratios is not None:
            raise ValueError("give keep or ratios, not both")
        shape = self.keep if self.keep is not None else self.ratios
        stages = len(self.layers) if self.layers is not None else 1
        if shape is not None and len(shape) != stages:
            raise ValueError(
                f"{stages} boundary layer(s) but {len(shape)} keep counts/ratios"
                + ("" if self.layers is not None else " (give layers with more than one)")
            )
        check_number("llm_input", self.llm_input, integer=True, low=0, low_open=True, optional=True,
                     note="tokens per item entering the LLM")
        check_number("vision_ratio", self.vision_ratio, low=0, high=1, low_open=True, optional=True)
        if self.llm_input is not None and self.vision_ratio is not None:
            raise ValueError("give llm_input or vision_ratio, not both")
        check_budget(self.budget, required=False)  # a half of a Compose needs none
        self.vision_stage_for(Geometry(1, 1, (1, 1), False), 1)  # validate the scan's options now

    @classmethod
    def qwen_reference(cls, **overrides):
        """The official Qwen2.5-VL READMEs' setting: ``int(0.167 * n)`` of each image's tokens after
        the encoder, then ``int(0.333 * n)`` of those after decoder layer 14 (of 28): 11.1% on average."""
        return cls(**{**dict(vision_ratio=0.167, layers=(14,), ratios=(QWEN_KEEP_RATIO,)), **overrides})

    def vision_stage_for(self, geometry: Geometry, keep: int) -> GlobalLocalScan:
        return scan_for(geometry, self.window, self.local_share, self.local_layer, self.global_layer)

    def encoder_layers(self, geometry: Geometry) -> tuple:
        return self.vision_stage_for(geometry, 1).encoder_layers()

    def schedule_for(self, geometry: Geometry, llm_input: int) -> Schedule:
        """The boundaries after ``llm_input`` tokens enter (``third_keeps``), by default one at half the depth."""
        layers = self.layers if self.layers is not None else geometry.snap(
            scaled_boundaries(geometry.num_layers, (0.5,)), self.language_stage_for(geometry).reads
        )
        if layers and layers[-1] >= geometry.num_layers:
            raise ValueError(f"boundary layers must lie inside (0, {geometry.num_layers}), got {layers}")
        keeps = third_keeps(llm_input, len(layers), self.keep, self.ratios, geometry.rope == "mrope")
        return Schedule(geometry.num_layers, geometry.visual_tokens, llm_input, tuple(zip(layers, keeps)))

    def language_stage_for(self, geometry: Geometry):
        """The language stage on a model of ``geometry`` (``language_stage`` by default)."""
        return self.language_stage()

    def plan(self, geometry: Geometry) -> Plan:
        visual = geometry.visual_tokens
        if self.llm_input is not None or self.vision_ratio is not None:
            n = self.llm_input if self.llm_input is not None else int(self.vision_ratio * visual)
            n = per_unit(geometry, min(n, visual)) * geometry.units
            schedule = self.schedule_for(geometry, n)
        elif self.budget is None:
            raise ValueError(f"{type(self).__name__} needs a budget (or llm_input / vision_ratio)")
        else:
            maximum = self.schedule_for(geometry, visual).average
            if self.budget > maximum + 1:
                raise ValueError(
                    f"{type(self).__name__} with the vision scan averages at most {maximum:g} visual tokens per "
                    f"layer with this schedule (budget {self.budget}); {self.ceiling_hint}"
                )
            schedule = solve_llm_input(self.budget, lambda n: self.schedule_for(geometry, n), step=geometry.units)
        language = self.language_stage_for(geometry) if schedule.boundaries else None
        vision = self.vision_stage_for(geometry, schedule.llm_input) if schedule.llm_input < visual else None
        return Plan(schedule, vision, language)

