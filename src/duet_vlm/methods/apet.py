"""ApET (Ma et al., CVPR 2026 Highlight): "Approximation-Error Guided Token Compression for Efficient
VLMs" (arXiv 2602.19870; code ``MaQianKun0/ApET``, read at ``70cc01b``: ``llava/model/llava_arch.py``
``encode_images`` and ``token_merging`` before the language model, ``llava/model/modeling_llama_x.py``
``layer_prune`` inside it, ``llava/model/utils.py`` ``fps``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..geometry import Geometry
from ..options import check_number
from ..plan import LanguageStage, LayerView, Selection, VisionReduction, VisionStage, VisionView
from ..schedule import Schedule, scaled_boundaries, solve_fraction, solve_llm_input
from ..selection import gather_tokens
from .base import Plan, Reducer, check_budget, per_unit
from .registry import register_method
from .stages import merge_into_nearest

#: The released LLaVA-1.5 setting (its README and every script): ``--visual_token_num 96``
#: (tokens out of the vision side), ``--layer_list '[16]'`` and ``--image_token_list '[32]'`` (32 of
#: them from decoder layer 16 of 32), ``--basis_token_num 10``. It averages 64 tokens per layer.
RELEASED_LAYER, RELEASED_DEPTH = 16, 32
RELEASED_INNER_RATIO = 32 / 96
BASIS = 10
RIDGE = 1e-5  # the official ``G.diagonal().add_(1e-5)``


def basis_start(seed: int, draw: int, tokens: int) -> int:
    """Where farthest-point sampling starts: the official ``torch.randint(0, N, (B,))`` on torch's
    global generator, here the ``draw``-th number (0: the vision side, 1: inside the language model)
    of a generator seeded with ``seed`` alone, so that a unit's result never depends on its batch.
    For one image under ``torch.manual_seed(seed)`` the official code draws the same two numbers.

    >>> basis_start(0, 0, 576) == basis_start(0, 0, 576)
    True
    """
    generator = torch.Generator().manual_seed(seed)
    return int(torch.randint(0, tokens, (draw + 1,), generator=generator)[-1])


def farthest_points(tokens: torch.Tensor, count: int, start: int) -> torch.Tensor:
    """``count`` indices of ``tokens`` (``(N, D)``) by farthest-point sampling from ``start``: each
    next one the token farthest (squared Euclidean distance, float32 running minimum) from all
    chosen so far; ties go to the lower index. The official ``fps`` for one unit.

    >>> farthest_points(torch.tensor([[0.0], [1.0], [5.0], [2.0]]), 3, 0).tolist()
    [0, 2, 3]
    """
    chosen = torch.empty(count, dtype=torch.long, device=tokens.device)
    distance = torch.full((tokens.shape[0],), 1e10, device=tokens.device)
    farthest = torch.tensor(start, device=tokens.device)
    for i in range(count):
        chosen[i] = farthest
        distance = torch.minimum(distance, ((tokens - tokens[farthest]) ** 2).sum(-1))
        farthest = distance.argmax()
    return chosen


def reconstruction_errors(tokens: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """``(N,)`` float32: how far each token lies from its ridge least-squares reconstruction by the
    ``basis`` tokens, ``||x - c B||`` with ``c = (B B^T + 1e-5 I)^-1 B x``, the official score
    (computed in float32 whatever the model's dtype). With no basis, each token's norm.

    >>> basis = torch.tensor([[1.0, 0.0]])
    >>> [round(error, 3) for error in reconstruction_errors(torch.tensor([[2.0, 0.0], [0.0, 3.0]]), basis).tolist()]
    [0.0, 3.0]
    """
    tokens, basis = tokens.float(), basis.float()
    if not len(basis):
        return tokens.norm(dim=-1)
    gram = basis @ basis.T
    gram.diagonal().add_(RIDGE)
    coefficients = torch.linalg.solve(gram, basis @ tokens.T).T
    return torch.norm(tokens - coefficients @ basis, dim=-1)


def basis_and_errors(tokens: torch.Tensor, count: int, start: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``count`` basis tokens of ``tokens`` (``farthest_points`` from ``start``) and every token's
    reconstruction error from them (``reconstruction_errors``), without gradient."""
    with torch.no_grad():
        detached = tokens.detach()
        seeds = farthest_points(detached, count, start)
        return seeds, reconstruction_errors(detached, detached[seeds])


@dataclass
class Approximation:
    """One unit's ApET reduction: ``kept`` (ascending indices), ``states`` (their new states, in
    ``kept`` order), ``basis`` (the slots that took the basis tokens' states) and ``errors``
    (every token's reconstruction error)."""

    kept: torch.Tensor
    states: torch.Tensor
    basis: torch.Tensor
    errors: torch.Tensor


def approximate(tokens: torch.Tensor, keep: int, basis: int, start: int, *, basis_slots: str,
                merge_dtype: torch.dtype | None = None) -> Approximation:
    """ApET on one unit's ``tokens`` (``(N, D)``), keeping ``keep`` of them, as the official code does:

    1. ``basis`` tokens by farthest-point sampling from ``start`` (``farthest_points``);
    2. every token's reconstruction error from them (``reconstruction_errors``); the ``keep`` with
       the largest errors stay;
    3. the ``basis`` stayers with the smallest errors give their slots to the basis tokens' states:
       in slot order with ``basis_slots="position"`` (the vision side writes them through a mask),
       in error order with ``"rank"`` (inside the language model it indexes with the ranked list);
    4. every token that did not stay is averaged into the stayer (not a basis slot) whose state is
       most cosine-similar: ``(stayer + members) / (1 + count)`` (``merge_into_nearest``), in
       ``merge_dtype`` (the vision side merges in the tower's dtype, the language side in float32).

    A unit keeps at least one token fewer than ``keep`` as merge targets: ``basis`` is cut to
    ``keep - 1`` (the official code needs ``keep > basis``). ``keep >= N`` returns the unit as it is.
    Selection runs without gradient; the merged states carry it.
    """
    if basis_slots not in ("position", "rank"):
        raise ValueError(f"basis_slots must be 'position' or 'rank', got {basis_slots!r}")
    n = tokens.shape[0]
    if not 0 < keep:
        raise ValueError(f"ApET keeps at least one token, got {keep}")
    if keep >= n:
        every = torch.arange(n, device=tokens.device)
        empty = every[:0]
        return Approximation(every, tokens, empty, torch.zeros(n, device=tokens.device))
    count = min(basis, keep - 1)
    seeds, errors = basis_and_errors(tokens, count, start)
    order = errors.topk(keep).indices
    values = tokens if merge_dtype is None else tokens.to(merge_dtype)
    slots = order[keep - count:]
    if basis_slots == "position":
        slots = slots.sort().values
    values = values.index_put((slots,), values[seeds])
    targets = order[: keep - count]
    dropped = torch.ones(n, dtype=torch.bool, device=tokens.device)
    dropped[order] = False
    values = values.index_put((targets,), merge_into_nearest(values, values, targets, sources=dropped.nonzero()[:, 0]))
    kept = order.sort().values
    return Approximation(kept, values[kept].to(tokens.dtype), slots, errors)


@dataclass
class ApproximationErrorMerge(VisionStage):
    """ApET's vision side (``encode_images``): on each unit's patches (CLS left out, as the official
    code cuts it), ``approximate`` with the basis tokens' states written in slot order and the merge in
    the tower's dtype, before the projector.

    >>> ApproximationErrorMerge().reduce(view, keep=96).features.shape      # doctest: +SKIP
    torch.Size([1, 96, 1024])
    """

    basis: int = BASIS
    seed: int = 0

    def reduce(self, view: VisionView, keep: int) -> VisionReduction:
        start = int(view.has_cls)
        patches = view.features[:, start:]
        units = [approximate(unit, keep, self.basis, basis_start(self.seed, 0, unit.shape[0]), basis_slots="position")
                 for unit in patches]
        features = torch.stack([unit.states for unit in units])
        kept = torch.stack([unit.kept for unit in units]) + start
        basis = torch.stack([unit.basis for unit in units]) + start
        return VisionReduction(features, kept, {"basis": basis})


@dataclass
class ApproximationErrorPrune(LanguageStage):
    """ApET's stage inside the language model (``layer_prune``): on each item's visual tokens as they
    enter the boundary layer, ``approximate`` with the basis tokens' states written in error order
    and the merge in float32 (the states then return to the model's dtype). Reads no attention: under
    FlashAttention and in vLLM nothing is computed again at a boundary.

    >>> ApproximationErrorPrune().select(view, keep=32).index.shape      # doctest: +SKIP
    torch.Size([1, 1, 32])
    """

    basis: int = BASIS
    seed: int = 0

    merges = True
    reads: ClassVar[str | None] = None

    def score(self, view: LayerView) -> torch.Tensor:
        """``(B, n_images, n)`` each token's reconstruction error from its item's ``basis`` tokens
        (the ranking ``select`` starts from)."""
        tokens = gather_tokens(view.hidden_states, view.visual_index)
        flat = tokens.reshape(-1, *tokens.shape[2:])
        errors = [basis_and_errors(unit, min(self.basis, unit.shape[0]), basis_start(self.seed, 1, unit.shape[0]))[1]
                  for unit in flat]
        return torch.stack(errors).view(tokens.shape[:3])

    def select(self, view: LayerView, keep: int) -> Selection:
        tokens = gather_tokens(view.hidden_states, view.visual_index)
        units = [approximate(unit, keep, self.basis, basis_start(self.seed, 1, unit.shape[0]), basis_slots="rank",
                             merge_dtype=torch.float32) for unit in tokens.reshape(-1, *tokens.shape[2:])]
        index = torch.stack([unit.kept for unit in units]).view(*tokens.shape[:2], keep)
        states = torch.stack([unit.states for unit in units]).view(*tokens.shape[:2], keep, tokens.shape[-1])
        return Selection(index, states)


@register_method("apet")
@dataclass
class ApET(Reducer):
    """ApET (Ma et al., CVPR 2026 Highlight): visual tokens chosen by how badly a few basis tokens
    reconstruct them, with no attention read anywhere. Twice, with one rule (``approximate``): on the
    vision tower's output before the projector (``ApproximationErrorMerge``), and on the states
    entering one decoder layer (``ApproximationErrorPrune``). Each time ``basis`` tokens are picked by
    farthest-point sampling, the tokens with the largest ridge reconstruction error stay, the basis
    tokens take the slots of the stayers with the smallest, and every other token is averaged into
    its most similar stayer.

    The released LLaVA-1.5 setting hands the language model 96 tokens and keeps 32 of them from
    layer 16 of 32 (64 per layer on average), with 10 basis tokens. A budget keeps that shape: the
    inner boundary at half the depth keeping a third of what entered (``inner_ratio``), the count
    entering solved. 192 / 128 / 64 hand over 288 / 192 / 96 and keep 96 / 64 / 32. A budget above
    that shape's reach (384 on LLaVA-1.5) hands over every token and solves the share kept inside.

    Args:
        budget: average visual tokens per decoder layer per image.
        basis: basis tokens per unit (official ``--basis_token_num``, 10); cut to one fewer than a
            stage keeps.
        layer: the inner boundary, as layers completed (``None``: 16 of 32, scaled to the depth).
        inner_ratio: kept share, at the inner boundary, of the tokens that entered (official 32 / 96;
            ``round(n * inner_ratio)``, at least one).
        seed: seeds where farthest-point sampling starts (``basis_start``): the official code draws it
            from torch's global generator.
        positions: ``None``, the model's default: ``"contiguous"`` under 1-D RoPE (the official code
            renumbers after each stage), ``"original"`` under M-RoPE.

    Where this differs from the released code, and why:

    - the sampling start comes from a generator of ``seed`` alone, per unit (the official draw reads
      torch's global generator, once per batch of images and once per row inside the model), so a
      row's result does not depend on its batch; one image reproduces the official draws;
    - the released code casts the merged states to float16 (``.half()``), the dtype its checkpoints
      run in; here they return to the model's dtype;
    - the official image path assumes a CLS token (``image_features[:, 1:]``); a tower without one
      hands all its tokens.

    >>> ApET(budget=64).plan(Geometry(32, 576, (24, 24), True)).schedule.boundaries
    ((16, 32),)
    """

    budget: int | None = None
    basis: int = BASIS
    layer: int | None = None
    inner_ratio: float = RELEASED_INNER_RATIO
    seed: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        check_budget(self.budget, required=False)
        check_number("basis", self.basis, integer=True, low=1, note="basis tokens per unit")
        check_number("layer", self.layer, integer=True, low=1, optional=True, note="layers before the inner boundary")
        check_number("inner_ratio", self.inner_ratio, low=0, high=1, low_open=True)
        check_number("seed", self.seed, integer=True)

    def inner_layer(self, geometry: Geometry) -> int:
        """The given ``layer``, or 16 of 32 scaled to the depth and moved where a boundary may sit."""
        if self.layer is not None:
            if self.layer >= geometry.num_layers:
                raise ValueError(f"layer={self.layer} but the language model has {geometry.num_layers} layers "
                                 f"(the inner boundary follows 1..{geometry.num_layers - 1})")
            return self.layer
        scaled = scaled_boundaries(geometry.num_layers, (RELEASED_LAYER / RELEASED_DEPTH,))[0]
        return geometry.snap((scaled,), ApproximationErrorPrune.reads)[0]

    def schedule_for(self, geometry: Geometry, llm_input: int) -> Schedule:
        inner = min(llm_input, max(1, round(llm_input * self.inner_ratio))) if llm_input else 0
        return Schedule(geometry.num_layers, geometry.visual_tokens, llm_input, ((self.inner_layer(geometry), inner),))

    def language_stage(self) -> ApproximationErrorPrune:
        return ApproximationErrorPrune(self.basis, self.seed)

    def vision_stage_for(self, geometry: Geometry, keep: int) -> ApproximationErrorMerge:
        return ApproximationErrorMerge(self.basis, self.seed)

    def plan(self, geometry: Geometry) -> Plan:
        if self.budget is None:
            raise ValueError("ApET needs a budget")
        whole = self.schedule_for(geometry, geometry.visual_tokens)
        if self.budget > whole.average + 1:  # above the shape's reach: every token enters, more stay inside
            layer = whole.boundaries[0][0]
            schedule, _ = solve_fraction(self.budget, lambda ratio: Schedule(
                geometry.num_layers, geometry.visual_tokens, geometry.visual_tokens,
                ((layer, max(1, round(geometry.visual_tokens * ratio))),)), "inner keep ratio")
            return Plan(schedule, language=self.language_stage())
        schedule = solve_llm_input(self.budget, lambda n: self.schedule_for(geometry, n), step=geometry.units)
        per_unit(geometry, schedule.llm_input)
        vision = self.vision_stage_for(geometry, schedule.llm_input) if schedule.llm_input < geometry.visual_tokens else None
        return Plan(schedule, vision, self.language_stage())
