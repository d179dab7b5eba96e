"""V2Drop (Chen, Liu et al., CVPR 2026): "Variation-aware Vision Token Dropping for Faster Large
Vision-Language Models" (arXiv 2509.01552; code ``xuyang-liu16/V2Drop``, read at ``219e03e``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..geometry import Geometry
from ..options import check_numbers
from ..plan import LanguageStage, LayerView
from ..schedule import Schedule, scaled_boundaries, solve_fraction
from ..selection import gather_tokens
from .base import Plan, Reducer, check_budget
from .registry import register_method

#: The released LLaVA-1.5 code's boundaries (``target_layer_indices = {3, 17, 22}`` of 32 decoder
#: layers), as shares of the depth so that other depths get the same shape. Its Qwen2-VL code drops
#: at 3, 16 and 22 of 28 (``layers=(3, 16, 22)``).
RELEASED_LAYERS = (3, 17, 22)
RELEASED_DEPTH = 32
#: The released LLaVA-1.5 code's keep ratios of the tokens remaining at each boundary (its Qwen2-VL
#: code keeps 0.25, 0.05 and 0). Its "0" keeps one token: the code keeps ``max(1, int(n * ratio))``.
RELEASED_RATIOS = (0.5, 0.5, 0.0)


def v2drop_counts(llm_input: int, ratios) -> list[int]:
    """The tokens each boundary keeps, the official rule: ``max(1, int(n * ratio))`` of the ``n``
    remaining (never more than remain).

    >>> v2drop_counts(576, RELEASED_RATIOS)
    [288, 144, 1]
    """
    counts, remaining = [], llm_input
    for ratio in ratios:
        remaining = min(remaining, max(1, int(remaining * ratio)))
        counts.append(remaining)
    return counts


def v2drop_schedule(num_layers: int, visual_tokens: int, llm_input: int, layers, ratios) -> Schedule:
    """The schedule of boundaries ``layers`` keeping ``ratios`` of what remains at each
    (``v2drop_counts``). Boundaries that fall on one layer (a shallow model, a snapped default)
    drop there in turn, as one boundary keeping the last count: with one score, the top of the top
    ``k`` is the top of all.

    >>> v2drop_schedule(32, 576, 576, (3, 17, 22), (0.5, 0.5, 0.0)).boundaries
    ((3, 288), (17, 144), (22, 1))
    >>> v2drop_schedule(32, 576, 576, (3, 17, 22), (0.5, 0.5, 0.0)).average
    202.8125
    """
    if len(layers) != len(ratios):
        raise ValueError(f"{len(layers)} boundary layers but {len(ratios)} keep ratios")
    kept = dict(zip(layers, v2drop_counts(llm_input, ratios)))  # (a later count of one layer wins)
    return Schedule(num_layers, visual_tokens, llm_input, tuple(sorted(kept.items())))


def released_shape(ratio: float, boundaries: int) -> tuple[float, ...]:
    """The released code's shape of keep ratios: ``ratio`` at every boundary but the last, which
    keeps "0" (one token); a single boundary keeps ``ratio``.

    >>> released_shape(0.5, 3)
    (0.5, 0.5, 0.0)
    """
    return (ratio,) if boundaries == 1 else (ratio,) * (boundaries - 1) + (0.0,)


@dataclass
class HiddenStateChange(LanguageStage):
    """V2Drop's score: how much the layer before the boundary changed each visual token,
    ``||h(l) - h(l-1)||_2`` between its input and its output (the residual stream), in the
    states' own dtype, as the official code computes it. The tokens that changed least go. Reads
    no attention: under FlashAttention and in vLLM nothing is computed again at a boundary.

    >>> HiddenStateChange().select(view, keep=288).shape      # doctest: +SKIP
    torch.Size([1, 1, 288])
    """

    reads: ClassVar[str | None] = None  # states only: any layer that follows one may take a boundary

    def score(self, view: LayerView) -> torch.Tensor:
        if view.previous_hidden_states is None:
            raise RuntimeError(f"layer {view.layer_index - 1} saw a different token set; its change cannot be read")
        current = gather_tokens(view.hidden_states, view.visual_index)
        previous = gather_tokens(view.previous_hidden_states, view.visual_index)
        return torch.norm(current - previous, p=2, dim=-1)


@register_method("v2drop")
@dataclass
class V2Drop(Reducer):
    """V2Drop (Chen, Liu et al., CVPR 2026): drop, at a few boundaries inside the language model,
    the visual tokens the layer before changed least (``HiddenStateChange``), in the prefill.

    The released code drops at layers 3, 17 and 22 of LLaVA-1.5's 32 (scaled to other depths),
    keeping 0.5, 0.5 and "0" of the tokens that remain (one token: ``max(1, int(n * ratio))``), and
    keeps the kept tokens' original positions. Its paper's schedules for "192 / 128 / 64" prune
    50 / 70 / 100 %, 72 / 75 / 100 % and 95 / 95 / 100 % (``ratios=(0.5, 0.3, 0.0)``, ``(0.28, 0.25,
    0.0)``, ``(0.05, 0.05, 0.0)``: 193.75, 131.0 and 66.7 tokens per layer under the code's rule).
    Neither is a budget rule, so a budget here solves one keep ratio ``r`` for the first boundaries,
    the last keeping "0" as the released code does (``ratios=(r, r, 0)``); a budget above that
    shape's reach (396 on LLaVA-1.5) keeps ``r`` at every boundary.

    Args:
        budget: average visual tokens per decoder layer per image (from 54 on LLaVA-1.5: the
            first three layers see every token). 192 / 128 / 64 keep 270 / 154 / 22 tokens from
            layer 3, 126 / 41 / 1 from layer 17 and 1 from layer 22.
        layers: boundaries as counts of layers completed (released: ``(3, 17, 22)`` on 32 layers).
        ratios: kept fraction of the tokens remaining at each boundary; overrides the solver
            (the released LLaVA code: ``(0.5, 0.5, 0.0)``; its Qwen2-VL code ``(0.25, 0.05, 0.0)``
            with ``layers=(3, 16, 22)``; the paper's, above).
        positions: ``"original"`` (the official code) or ``"contiguous"`` (refused under M-RoPE).

    Inside a ``Compose`` the shape is fixed (``ratios``, else the released ones) and the LLM-input
    count is solved.

    >>> V2Drop(budget=128).plan(Geometry(32, 576, (24, 24), True)).schedule.boundaries
    ((3, 154), (17, 41), (22, 1))
    """

    budget: int | None = None
    layers: tuple[int, ...] | None = None
    ratios: tuple[float, ...] | None = None

    default_positions: ClassVar[str | None] = "original"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_budget(self.budget, required=False)
        self.layers = check_numbers("layers", self.layers, integer=True, low=1, optional=True)
        self.ratios = check_numbers("ratios", self.ratios, low=0, high=1, optional=True)
        if self.layers is not None and not self.layers:
            raise ValueError("V2Drop needs at least one boundary layer")
        shape = len(self.layers) if self.layers is not None else len(RELEASED_LAYERS)
        if self.ratios is not None and len(self.ratios) != shape:
            raise ValueError(f"ratios {list(self.ratios)} need one keep ratio per boundary layer ({shape})")

    def boundary_layers(self, geometry: Geometry) -> tuple[int, ...]:
        """The given ``layers``, or the released ones scaled to the depth and moved where a boundary
        may sit (``Geometry.snap``), one per released boundary."""
        if self.layers is not None:
            return self.layers
        scaled = (scaled_boundaries(geometry.num_layers, (layer / RELEASED_DEPTH,))[0] for layer in RELEASED_LAYERS)
        return tuple(geometry.snap((layer,), HiddenStateChange.reads)[0] for layer in scaled)

    def schedule_for(self, geometry: Geometry, llm_input: int) -> Schedule:
        layers = self.boundary_layers(geometry)
        ratios = self.ratios if self.ratios is not None else released_shape(RELEASED_RATIOS[0], len(layers))
        return v2drop_schedule(geometry.num_layers, geometry.visual_tokens, llm_input, layers, ratios)

    def language_stage(self) -> HiddenStateChange:
        return HiddenStateChange()

    def plan(self, geometry: Geometry) -> Plan:
        if self.ratios is not None:
            schedule = self.schedule_for(geometry, geometry.visual_tokens)
        elif self.budget is None:
            raise ValueError("V2Drop needs a budget (or ratios)")
        else:
            layers = self.boundary_layers(geometry)

            def build(shape):
                return lambda ratio: v2drop_schedule(geometry.num_layers, geometry.visual_tokens, geometry.visual_tokens,
                                                     layers, shape(ratio, len(layers)))

            error = None
            for shape in (released_shape, lambda ratio, count: (ratio,) * count):  # the second: above the first's reach
                try:
                    schedule, _ = solve_fraction(self.budget, build(shape), "keep ratio")
                    break
                except ValueError as exc:
                    error = error or exc
            else:
                floor = build(released_shape)(0.0).average
                raise ValueError(
                    f"V2Drop at boundaries {list(layers)} cannot average {self.budget} visual tokens per layer: the "
                    f"{layers[0]} layers before the first see all {geometry.visual_tokens} tokens ({floor:.1f} per layer "
                    f"at the least); give earlier layers (make(\"v2drop\", budget={self.budget}, layers=...)) or cut "
                    f"tokens before the language model (Compose(make(\"visionzip\"), make(\"v2drop\"), "
                    f"budget={self.budget}))" if self.budget < floor - 1 else str(error)
                ) from None
        return Plan(schedule, language=self.language_stage())
