"""FastV (Chen et al., ECCV 2024): "An Image is Worth 1/2 Tokens After Layer 2"."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from ..geometry import Geometry
from ..schedule import Schedule
from .base import LanguageStage, LayerView, Plan, Reducer, check_budget
from .registry import register_method

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


@dataclass
class LastTokenAttention(LanguageStage):
    """FastV's score: attention from the last prompt token, as the layer before the boundary computed it.

    The last non-padding token of each row is the query (the ``:`` of ``ASSISTANT:`` at inference);
    the scores are that token's attention probabilities in decoder layer ``K - 1`` on its own input,
    averaged over heads, restricted to the visual tokens. The highest ``keep`` survive.

    >>> LastTokenAttention().select(view, keep=98).shape      # doctest: +SKIP
    torch.Size([1, 1, 98])
    """

    def score(self, view: LayerView) -> torch.Tensor:
        last = [row.nonzero()[-1] for row in view.valid]
        return view.text_to_visual_attention(last, previous_layer=True)


@dataclass
class PruneOnceAfterLayer(Reducer):
    """The schedule of a method that prunes once inside the language model: layers ``0 .. layer-1``
    see every visual token, ``keep`` of them run from ``layer`` on. ``keep`` is solved from the
    budget (``fastv_keep``), or given, or a ``ratio`` of the LLM input; inside a ``Compose``
    without either, the subclass's ``compose_ratio``. Subclasses name the language stage that picks
    the ``keep`` tokens (FastV, DART)."""

    budget: int | None = None
    layer: int = 2
    keep: int | None = None
    ratio: float | None = None

    default_positions: ClassVar[str | None] = "original"
    compose_ratio: ClassVar[float] = DEFAULT_RATIO

    def __post_init__(self) -> None:
        super().__post_init__()
        check_budget(self.budget, required=False)
        if isinstance(self.layer, bool) or not isinstance(self.layer, int) or self.layer < 1:
            raise ValueError(f"layer must be an int >= 1 (the score reads layer - 1), got {self.layer!r}")
        if self.keep is not None and (isinstance(self.keep, bool) or not isinstance(self.keep, int) or self.keep < 0):
            raise ValueError(f"keep must be an int >= 0, got {self.keep!r}")
        if self.ratio is not None and (
            isinstance(self.ratio, bool) or not isinstance(self.ratio, (int, float)) or not 0.0 <= self.ratio <= 1.0
        ):
            raise ValueError(f"ratio must lie in [0, 1], got {self.ratio!r}")
        if self.keep is not None and self.ratio is not None:
            raise ValueError("give keep or ratio, not both")

    def _check_layer(self, geometry: Geometry) -> None:
        if self.layer >= geometry.num_layers:
            raise ValueError(f"layer={self.layer} but the language model has {geometry.num_layers} layers")

    def schedule_for(self, geometry: Geometry, llm_input: int) -> Schedule:
        self._check_layer(geometry)
        if self.keep is not None:
            # Clamped rather than rejected: Compose's solver probes small LLM-input counts.
            keep = min(self.keep, llm_input)
        else:
            keep = int(llm_input * (self.ratio if self.ratio is not None else self.compose_ratio))
        return self._schedule(geometry, llm_input, keep)

    def _schedule(self, geometry: Geometry, llm_input: int, keep: int) -> Schedule:
        return Schedule(geometry.num_layers, geometry.visual_tokens, llm_input, ((self.layer, keep),))

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
            try:
                keep = fastv_keep(self.budget, geometry.num_layers, geometry.visual_tokens, self.layer)
            except ValueError:
                first = self.layer * geometry.visual_tokens / geometry.num_layers
                raise ValueError(
                    f"{name} after layer {self.layer} cannot average {self.budget} visual tokens per layer: the "
                    f"first {self.layer} layers alone give {first:.1f}; use a smaller `layer` or an explicit `keep`"
                ) from None
            schedule = self._schedule(geometry, geometry.visual_tokens, keep)
        return Plan(schedule, language=self.language_stage())


@register_method("fastv")
@dataclass
class FastV(PruneOnceAfterLayer):
    """FastV (Chen et al., ECCV 2024): drop visual tokens once, after decoder layer ``layer``.

    Layers ``0 .. layer-1`` see every visual token; from ``layer`` on only the ``keep`` tokens the
    last prompt token attended to most in layer ``layer - 1`` remain. Kept tokens keep their original
    RoPE positions (``positions="original"``), as in FastV's in-place code.

    Args:
        budget: average visual tokens per decoder layer per image. With ``layer=2`` on 32 layers
            and 576 tokens, 192 / 128 / 64 keep 166 / 98 / 30 tokens from layer 2 on.
        layer: ``K``, the number of decoder layers that run on all tokens (paper default 2).
        keep: explicit number of visual tokens kept from ``layer`` on; overrides the solver.
        ratio: explicit kept fraction of the LLM-input tokens (``1 - R`` in the paper); overrides the
            solver. Inside a ``Compose`` without ``keep`` or ``ratio`` the paper's 0.5 is used.
        positions: ``"original"`` (FastV) or ``"contiguous"`` (refused under M-RoPE).

    >>> reducer = FastV(budget=128)                               # doctest: +SKIP
    >>> with reducer(model): model.generate(**inputs)             # doctest: +SKIP
    >>> reducer.stats.tokens_per_layer[:3]                        # doctest: +SKIP
    [576, 576, 98]
    """

    def language_stage(self) -> LastTokenAttention:
        return LastTokenAttention()
