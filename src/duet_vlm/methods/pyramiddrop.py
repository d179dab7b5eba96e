"""PyramidDrop (Xing et al., CVPR 2025): visual redundancy reduction in stages of the language model."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable


from ..geometry import Geometry
from ..options import check_number, check_numbers
from ..schedule import Schedule, ratio_schedule, scaled_boundaries, solve_fraction
from .base import Plan, Reducer, check_budget
from .registry import register_method
from .stages import LastInstructionAttention  # noqa: F401 - shared with VScan, re-exported

# The reference's LLaVA-1.5 boundaries [8, 16, 24] and lambda = 0.5, as fractions of depth so that
# other depths get the same shape.
DEFAULT_FRACTIONS = (0.25, 0.5, 0.75)
DEFAULT_DECAY = 0.5
# The author's advice for budgets below the reference configuration's own average (270 of 576 on
# LLaVA-1.5): earlier boundaries [2, 8, 16] with lambda solved (PyramidDrop issue #29). Solving
# lambda on [8, 16, 24] instead would starve the later layers (its floor is 144, where 145 gives
# 576/4/0/0).
EARLY_FRACTIONS = (2 / 32, 8 / 32, 16 / 32)


def decay_ratios(decay: float, stages: int) -> tuple[float, ...]:
    """PyramidDrop's keep ratios ``lambda, lambda^2, ...`` (fractions of the LLM-input count).

    >>> decay_ratios(0.5, 3)
    (0.5, 0.25, 0.125)
    """
    return tuple(decay ** (s + 1) for s in range(stages))


def solve_decay(budget: int, build: Callable[[float], Schedule], iterations: int = 60) -> tuple[Schedule, float]:
    """The schedule ``build(lambda)``, lambda in [0, 1], that averages closest to ``budget``, and lambda
    (``schedule.solve_fraction``: ties go to fewer tokens; an error when none comes within 1 token)."""
    return solve_fraction(budget, build, "lambda", iterations)


def pyramid_schedule(
    budget: int, num_layers: int, visual_tokens: int, layers: tuple[int, ...] | None = None, snap=tuple
) -> tuple[Schedule, float]:
    """PyramidDrop's schedule for a layer-averaged ``budget``, and the ``lambda`` solved for it.

    Boundaries are ``layers`` when given; otherwise [8, 16, 24] (scaled to the depth) for budgets at
    or above the reference configuration's average (lambda 0.5: 270 on LLaVA-1.5), else [2, 8, 16].
    ``lambda`` is solved so that the average is within 1 token of the budget. On LLaVA-1.5 (32
    layers, 576 tokens): 192 -> lambda 0.561, 576/322/180/101 tokens; 128 -> lambda 0.421,
    576/242/102/42; 64 -> lambda 0.193, 576/111/21/4 (all with [2, 8, 16]). ``snap`` moves the
    default boundaries to layers that can score (``Geometry.snap``, on a hybrid language model).

    >>> pyramid_schedule(128, 32, 576)[0].boundaries
    ((2, 242), (8, 102), (16, 42))
    """

    def builder(shape):
        return lambda d: ratio_schedule(num_layers, visual_tokens, visual_tokens, shape, decay_ratios(d, len(shape)))

    if layers is not None:
        shapes = [tuple(layers)]
    else:
        default, early = (snap(scaled_boundaries(num_layers, f)) for f in (DEFAULT_FRACTIONS, EARLY_FRACTIONS))
        shapes = [default] if budget >= builder(default)(DEFAULT_DECAY).average else [early, default]
    error = None
    for shape in shapes:
        build = builder(shape)
        try:
            schedule, decay = solve_decay(budget, build)
        except ValueError as exc:
            error = exc
            continue
        return schedule, decay
    floors = {shape: builder(shape)(0.0).average for shape in shapes}
    lowest = min(floors, key=floors.get)
    if budget < floors[lowest] - 1:  # below every shape's floor: say what reaches lower
        raise ValueError(_below_the_floor(budget, num_layers, visual_tokens, lowest, floors[lowest], builder, snap))
    raise error  # the averages jump over the budget: the closest one


def _below_the_floor(budget: int, num_layers: int, visual_tokens: int, shape: tuple[int, ...], floor: float,
                     builder, snap) -> str:
    """Why ``shape`` (the lowest of the shapes tried) cannot average ``budget``: at lambda 0 the layers
    before its first boundary keep every token; the lowest budget it reaches, and what reaches lower."""
    said = (f"no lambda in [0, 1] makes boundaries {list(shape)} average {budget} visual tokens per layer: even at "
            f"lambda 0 the {shape[0]} layers before the first boundary keep all {visual_tokens} tokens, {floor:.1f} per "
            f"layer over {num_layers}, so {math.ceil(floor - 1)} is the lowest budget it reaches")
    for first in range(shape[0] - 1, 0, -1):  # the latest earlier first boundary that reaches the budget
        earlier = (first, *shape[1:])
        if snap(earlier) != earlier:  # a layer that cannot score (a hybrid model's linear attention)
            continue
        try:
            solve_decay(budget, builder(earlier))
        except ValueError:
            continue
        said += f"; earlier boundaries reach it: make(\"pyramiddrop\", budget={budget}, layers={earlier})"
        break
    return (f"{said}; or cut tokens before the language model: a vision-side method (make(\"visionzip\", "
            f"budget={budget})) or one composed with PyramidDrop (Compose(make(\"visionzip\"), make(\"pyramiddrop\"), "
            f"budget={budget}))")


@register_method("pyramiddrop")
@dataclass
class PyramidDrop(Reducer):
    """PyramidDrop (Xing et al., CVPR 2025): rank and drop visual tokens at several layer boundaries.

    After each boundary ``layers[s]`` the ``int(n * ratios[s])`` visual tokens (``n`` = tokens at the
    LLM input) the last instruction token attends to most survive, scored with the next layer's
    norm, q/k projections and RoPE on the current states. Ratios are ``lambda^(s+1)``. Positions are
    renumbered after each drop, as in the reference.

    Budget rule: boundaries [8, 16, 24] (scaled to the depth) with ``lambda`` solved from the budget
    when that shape can reach it; the default shape cannot go below a quarter of the tokens (144 on
    LLaVA-1.5), so lower budgets use [2, 8, 16], the author's suggestion. See ``pyramid_schedule``.

    Args:
        budget: average visual tokens per decoder layer per image.
        layers: boundaries as counts of layers completed (reference ``(8, 16, 24)``).
        ratios: kept fraction of the LLM-input count after each boundary; overrides the solver.
        decay: ``lambda`` (reference 0.5): ratios ``lambda, lambda^2, ...``; overrides the solver.
        positions: ``"contiguous"`` (the reference) or ``"original"``;
            ``None`` (default): contiguous on 1-D RoPE models, original under M-RoPE (Qwen-VL),
            where renumbering is refused.

    Inside a ``Compose`` (pruning the tokens a vision-side method passed on) the shape is fixed:
    ``layers`` or [8, 16, 24], ``ratios`` or ``decay`` or 0.5, and the LLM-input count is solved.

    >>> reducer = PyramidDrop(budget=128)                        # doctest: +SKIP
    >>> with reducer(model): model.generate(**inputs)            # doctest: +SKIP
    >>> sorted(set(reducer.stats.tokens_per_layer), reverse=True) # doctest: +SKIP
    [576, 242, 102, 42]
    """

    budget: int | None = None
    layers: tuple[int, ...] | None = None
    ratios: tuple[float, ...] | None = None
    decay: float | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        check_budget(self.budget, required=False)
        self.layers = check_numbers("layers", self.layers, integer=True, low=1, optional=True)
        self.ratios = check_numbers("ratios", self.ratios, low=0, high=1, optional=True)
        check_number("decay", self.decay, low=0, high=1, optional=True)
        if self.ratios is not None and self.decay is not None:
            raise ValueError("give ratios or decay, not both")
        if self.ratios is not None and (self.layers is None or len(self.layers) != len(self.ratios)):
            raise ValueError("explicit ratios need layers of the same length")
        if self.layers is not None and not self.layers:
            raise ValueError("PyramidDrop needs at least one boundary layer")

    def _shape(self, geometry: Geometry) -> tuple[tuple[int, ...], tuple[float, ...]]:
        layers = self.layers if self.layers is not None else geometry.snap(
            scaled_boundaries(geometry.num_layers, DEFAULT_FRACTIONS), LastInstructionAttention.reads
        )
        if self.ratios is not None:
            return layers, self.ratios
        decay = self.decay if self.decay is not None else DEFAULT_DECAY
        return layers, decay_ratios(decay, len(layers))

    def schedule_for(self, geometry: Geometry, llm_input: int) -> Schedule:
        layers, ratios = self._shape(geometry)
        return ratio_schedule(geometry.num_layers, geometry.visual_tokens, llm_input, layers, ratios)

    def language_stage(self) -> LastInstructionAttention:
        return LastInstructionAttention()

    def plan(self, geometry: Geometry) -> Plan:
        if self.ratios is not None or self.decay is not None:
            schedule = self.schedule_for(geometry, geometry.visual_tokens)
        elif self.budget is None:
            raise ValueError("PyramidDrop needs a budget (or ratios / decay)")
        else:
            schedule, _ = pyramid_schedule(
                self.budget, geometry.num_layers, geometry.visual_tokens, self.layers,
                snap=lambda layers: geometry.snap(layers, LastInstructionAttention.reads),
            )
        return Plan(schedule, language=self.language_stage())
