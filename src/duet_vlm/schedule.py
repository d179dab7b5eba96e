"""Token schedules: how many visual tokens of one image enter each decoder layer.

The budget convention is PyramidDrop's and DUET's: the **average number of visual tokens per
decoder layer, per image**. A vision-side method that keeps ``k`` tokens has average ``k``; a
schedule that keeps 307 tokens for 16 layers, 153 for 8 and 0 for 8 has average 191.75.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable


@dataclass(frozen=True)
class Schedule:
    """Visual tokens per image at the LLM input and after each pruning boundary.

    Attributes:
        num_layers: decoder layers of the language model.
        visual_tokens: visual tokens per image the unreduced model would process.
        llm_input: visual tokens per image entering decoder layer 0 (after any vision-side stage).
        boundaries: ``(layer, keep)`` pairs: after ``layer`` decoder layers have run (1-based count),
            ``keep`` visual tokens per image remain. Layers strictly increasing, keeps non-increasing.

    >>> Schedule(32, 576, 307, ((16, 153), (24, 0))).average
    191.75
    """

    num_layers: int
    visual_tokens: int
    llm_input: int
    boundaries: tuple[tuple[int, int], ...] = ()

    def __post_init__(self) -> None:
        if not 0 <= self.llm_input <= self.visual_tokens:
            raise ValueError(f"llm_input={self.llm_input} must lie in [0, {self.visual_tokens}]")
        previous_layer, previous_keep = 0, self.llm_input
        for layer, keep in self.boundaries:
            if not previous_layer < layer < self.num_layers:
                raise ValueError(
                    f"boundary layers must be increasing and inside (0, {self.num_layers}), got {self.boundaries}"
                )
            if not 0 <= keep <= previous_keep:
                raise ValueError(f"kept counts must be non-increasing from {self.llm_input}, got {self.boundaries}")
            previous_layer, previous_keep = layer, keep

    @property
    def tokens_per_layer(self) -> list[int]:
        """Visual tokens per image entering each decoder layer (0-based)."""
        counts, current, stages = [], self.llm_input, dict(self.boundaries)
        for layer in range(self.num_layers):
            current = stages.get(layer, current)
            counts.append(current)
        return counts

    @property
    def average(self) -> float:
        return sum(self.tokens_per_layer) / self.num_layers

    @property
    def is_identity(self) -> bool:
        return self.llm_input == self.visual_tokens and all(k == self.visual_tokens for _, k in self.boundaries)

    def group_of_layer(self, layer: int) -> int:
        """How many boundaries lie at or before 0-based ``layer`` (0 = the LLM-input group)."""
        return sum(1 for boundary, _ in self.boundaries if boundary <= layer)


def scaled_boundaries(num_layers: int, fractions: tuple[float, ...]) -> tuple[int, ...]:
    """Boundary layers at the given fractions of depth, e.g. (0.5, 0.75) -> (16, 24) for 32 layers."""
    layers = tuple(min(num_layers - 1, max(1, round(f * num_layers))) for f in fractions)
    return tuple(sorted(set(layers)))


def ratio_schedule(
    num_layers: int, visual_tokens: int, llm_input: int, layers: tuple[int, ...], ratios: tuple[float, ...]
) -> Schedule:
    """Schedule with the reference's rule: after ``layers[s]`` keep ``int(llm_input * ratios[s])``.

    Ratios are absolute fractions of the LLM-input count, not per-stage factors (as in the official
    PyramidDrop and DUET code).
    """
    if len(layers) != len(ratios):
        raise ValueError(f"{len(layers)} boundary layers but {len(ratios)} keep ratios")
    if any(not 0.0 <= r <= 1.0 for r in ratios):
        raise ValueError(f"keep ratios must lie in [0, 1], got {ratios}")
    return Schedule(
        num_layers, visual_tokens, llm_input, tuple((l, int(llm_input * r)) for l, r in zip(layers, ratios))
    )


def solve_llm_input(budget: int, build, step: int = 1) -> Schedule:
    """The schedule ``build(n)`` whose average is closest to ``budget`` (ties: fewer tokens).

    ``build`` maps an LLM-input count ``n`` to a schedule; its average must not decrease with ``n``.
    Only multiples of ``step`` are tried (a video's vision stage keeps the same count per frame).
    Raises ``ValueError`` when no ``n`` comes within 1 token (``step`` tokens) of the budget.
    """
    low, high = 0, build(0).visual_tokens // step
    while low < high:  # smallest multiple whose average reaches the budget
        middle = (low + high) // 2
        if build(middle * step).average >= budget:
            high = middle
        else:
            low = middle + 1
    candidates = [build(m * step) for m in {max(0, low - 1), low}]
    best = min(candidates, key=lambda s: (abs(s.average - budget), s.llm_input))
    if abs(best.average - budget) > max(1, step):  # with frames, within a frame count
        raise ValueError(
            f"no schedule of this shape averages {budget} visual tokens per layer (closest: {best.average:.2f})"
        )
    return best


def solve_fraction(budget: int, build: Callable[[float], Schedule], name: str, iterations: int = 60) -> tuple[Schedule, float]:
    """The schedule ``build(x)``, ``x`` in [0, 1] (a method's one free fraction, called ``name`` in
    its error), that averages closest to ``budget``, and ``x``.

    ``build``'s average must not decrease with ``x`` (true for ``int(n * x^s)``). Ties go to fewer
    tokens. Raises ``ValueError`` when no ``x`` comes within 1 token of the budget.
    """
    low, high = 0.0, 1.0
    if build(high).average >= budget:
        for _ in range(iterations):  # smallest x whose average reaches the budget
            middle = (low + high) / 2
            if build(middle).average >= budget:
                high = middle
            else:
                low = middle
    candidates = [(x, build(x)) for x in (low, high)]
    fraction, schedule = min(candidates, key=lambda c: (abs(c[1].average - budget), c[1].average))
    if abs(schedule.average - budget) > 1:
        raise ValueError(
            f"no {name} in [0, 1] makes boundaries {[l for l, _ in schedule.boundaries]} average {budget} "
            f"visual tokens per layer (closest: {schedule.average:.2f})"
        )
    return schedule, fraction
