"""DivPrune (Alvar et al., CVPR 2025): "DivPrune: Diversity-based Visual Token Pruning for Large
Multimodal Models" (arXiv 2503.02175), as the official code runs it (``vbdi/divprune`` ``799e2d9``)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..geometry import Geometry
from ..plan import Plan, VisionReduction, VisionStage, VisionView
from ..schedule import Schedule
from ..selection import gather_tokens
from .base import Reducer, check_budget, per_unit
from .registry import register_method


def cosine_distance(features: torch.Tensor) -> torch.Tensor:
    """``(..., n, n)`` pairwise cosine distance ``1 - cos`` of ``(..., n, d)`` features, in float32.

    >>> cosine_distance(torch.tensor([[1.0, 0.0], [0.0, 2.0], [-3.0, 0.0]])).tolist()
    [[0.0, 1.0, 2.0], [1.0, 0.0, 1.0], [2.0, 1.0, 0.0]]
    """
    unit = F.normalize(features.detach().float(), dim=-1)
    return 1.0 - unit @ unit.transpose(-1, -2)


def max_min_greedy(distance: torch.Tensor, keep: int) -> torch.Tensor:
    """The greedy solution of the max-min diversity problem on ``(..., n, n)`` distances:
    ``(..., keep)`` indices, in the order they were chosen.

    The first token is the most isolated one: the token whose nearest other token is farthest
    (``min`` down its column, the diagonal left out). Each next token is, of those not yet chosen,
    the one farthest from the chosen set: the largest ``min(distance[s, j] for s in chosen)``.
    Ties go to the lower index. Exactly ``keep`` distinct tokens per row, even among duplicates.

    ``O(keep * n)`` per row: a running minimum over the chosen set, one tensor op per step for all
    rows at once.

    >>> max_min_greedy(torch.tensor([[0.0, 1.0, 4.0], [1.0, 0.0, 2.0], [4.0, 2.0, 0.0]]), 2).tolist()
    [2, 0]
    """
    n = distance.shape[-1]
    if distance.shape[-2] != n:
        raise ValueError(f"distances must be square, got {tuple(distance.shape)}")
    if isinstance(keep, bool) or not isinstance(keep, int) or not 0 <= keep <= n:
        raise ValueError(f"cannot keep {keep!r} of {n} tokens")
    lead = distance.shape[:-2]
    distance = distance.reshape(-1, n, n)
    units = distance.shape[0]
    rows = torch.arange(units, device=distance.device)
    chosen = torch.empty(units, keep, dtype=torch.long, device=distance.device)
    taken = torch.zeros(units, n, dtype=torch.bool, device=distance.device)
    eye = torch.eye(n, dtype=torch.bool, device=distance.device)
    # Step 0: each token's distance to its nearest other token (down a column, as the official
    # code reads the matrix); a single token has none and is chosen alone.
    score = distance.masked_fill(eye, float("inf")).amin(dim=-2) if n > 1 else distance.new_zeros(units, n)
    nearest_chosen = None
    for step in range(keep):
        pick = score.masked_fill(taken, float("-inf")).argmax(dim=-1)  # first maximum: the lower index
        chosen[:, step] = pick
        taken[rows, pick] = True
        row = distance[rows, pick]  # (units, n): distances from the new token
        nearest_chosen = row if nearest_chosen is None else torch.minimum(nearest_chosen, row)
        score = nearest_chosen
    return chosen.reshape(*lead, keep)


def divprune_select(features: torch.Tensor, keep: int) -> torch.Tensor:
    """DivPrune's choice among each row of tokens: ``max_min_greedy`` on their cosine distances;
    ``(..., keep)`` indices in the order they were chosen.

    Cost per row of ``n`` tokens of width ``d``: ``O(n^2 d)`` for the distance matrix (one batched
    matmul, ``O(n^2)`` memory) and ``O(keep * n)`` for the greedy steps.

    Args:
        features: ``(..., n, d)`` token features; only their directions matter.
        keep: tokens to choose per row, ``0 <= keep <= n``.

    >>> divprune_select(torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [-1.0, 0.1]]), 3).tolist()
    [3, 0, 2]
    """
    n = features.shape[-2]
    distance = cosine_distance(features.reshape(-1, n, features.shape[-1]))
    return max_min_greedy(distance, keep).reshape(*features.shape[:-2], keep)


@dataclass
class MaxMinDiversity(VisionStage):
    """DivPrune's stage: per unit, the ``keep`` patches ``divprune_select`` chooses in the language
    model's input space, in their original order; the rest are dropped (nothing is merged).

    Distances are computed on the projector's output (``VisionView.project``; the features
    themselves when a view has no projector), the CLS token is never a candidate, and the kept
    tokens' projected features are passed on as they are.

    >>> MaxMinDiversity().reduce(view, keep=64).kept.shape     # doctest: +SKIP
    torch.Size([1, 64])
    """

    def reduce(self, view: VisionView, keep: int) -> VisionReduction:
        start = int(view.has_cls)
        patches = view.features[:, start:]
        space = view.project(patches) if view.project is not None else patches
        order = divprune_select(space, keep)
        kept = order.sort(dim=-1).values
        reduction = VisionReduction(gather_tokens(patches, kept), kept + start, {"first": order[:, :1] + start})
        if view.project is not None:
            reduction.projected = gather_tokens(space, kept)
        return reduction


@register_method("divprune")
@dataclass
class DivPrune(Reducer):
    """DivPrune (Alvar, Singh, Akbari, Zhang; CVPR 2025): the most diverse subset of visual tokens,
    chosen before the language model.

    Pruning is posed as a max-min diversity problem (keep the subset whose smallest pairwise
    distance is largest) and solved greedily (``divprune_select``): start from the token whose
    nearest neighbour is farthest, then repeatedly add the token farthest from the chosen set.
    Text-agnostic, no attention scores, nothing merged.

    As the official code runs it (``vbdi/divprune`` ``799e2d9``, ``LLaVA/llava/model/llava_arch.py``:
    ``DivPrune``, ``pairwise_cosine_similarity``, the ``LAYER_INDEX=0`` branch of
    ``prepare_inputs_labels_for_multimodal``):

    - Features: the visual tokens as they enter the language model, i.e. the projector's output
      (CLS excluded: LLaVA's ``select_feature="patch"``). Distance: cosine, ``1 - cos``.
    - First token: the argmax of each token's distance to its nearest other token (the official
      second-smallest entry of each column, the smallest being the token itself); then the argmax
      of the minimum distance to the chosen tokens. The kept tokens enter in their original order
      (the official code sorts the kept positions) and are renumbered contiguously (it passes no
      ``position_ids``).
    - Count: the official ``int(round(SUBSET_RATIO * tokens))`` (default ratio 0.098: 56 of 576) is
      ``make("divprune", ratio=0.098)``; ``budget`` is the count itself.
    - No hyperparameter besides the count. The recorded official outputs replay in
      ``tests/test_divprune.py`` (picks, lengths, positions, logits, greedy tokens).

    Cost per unit of ``n`` candidates of width ``D``: ``O(n^2 D)`` time and ``O(n^2)`` memory for the
    distance matrix, ``O(keep * n)`` for the greedy (the official loop re-reduces the chosen rows at
    every step: ``O(keep^2 * n)``); one Python iteration per kept token, batched over all units.

    Budget: every decoder layer sees the ``budget`` kept tokens, so the layer average is the budget
    exactly (192, 128, 64 on LLaVA-1.5: 192, 128, 64 of 576 tokens in all 32 layers). A video keeps
    ``budget // frames`` per frame.

    Choices where the paper and code are silent or differ:

    - Selected tokens are never chosen again: the official loop does not mask them (a chosen token
      scores its self-distance, ~0), which only matters once every unchosen token duplicates a
      chosen one; here exactly ``keep`` distinct tokens are kept.
    - The first step excludes each token's own distance by masking the diagonal, where the official
      code takes the second-smallest entry (equal unless duplicates meet rounding noise).
    - Distances in float32 whatever the model's dtype (the official code runs in the model's fp16).
    - Batches: each image independently (the official code prunes only the first image of the first
      row, and needs the image at token 35); padded batches equal their rows.
    - Families: the candidates are each unit's patch tokens in the language model's space: LLaVA-1.5,
      LLaVA-NeXT and Video-LLaVA project the encoder's patches; Qwen-VL's merged tokens and
      LLaVA-OneVision's pooled video tokens already are that space. An anyres image (LLaVA-NeXT,
      OneVision) is one unit of all its tiles' patch slots; its newline slots are not candidates and
      are dropped (the official LLaVA-1.6 path scores them too). Towers without CLS (SigLIP) lose
      nothing: DivPrune reads no attention.
    - Qwen3-VL's DeepStack features ride along with their tokens (the same selection).
    - Videos: the official repository has no video path (the paper's LLaVA-NeXT-Video runs are not
      released; its ``tflops.py`` counts a video's tokens as one set); vision stages run per frame
      here, so each frame keeps ``budget // frames`` (the same count per frame, the budget within a
      frame count; a budget below one token per frame is refused).

    Args:
        budget: visual tokens per image entering the language model (= the layer average).

    >>> reducer = duet_vlm.make("divprune", budget=64)                      # doctest: +SKIP
    >>> with reducer(model): model.generate(**inputs)                        # doctest: +SKIP
    >>> duet_vlm.Compose(duet_vlm.make("divprune"), duet_vlm.make("fastv"), budget=64)   # doctest: +SKIP
    """

    budget: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        check_budget(self.budget, required=False)

    def vision_stage_for(self, geometry: Geometry, keep: int) -> MaxMinDiversity:
        per_frame = per_unit(geometry, keep)
        if per_frame < 1:
            raise ValueError(
                f"DivPrune keeps the same count in every frame: {keep} tokens are fewer than one for each of "
                f"the {geometry.units} frames (a budget of at least {geometry.units} is needed)"
            )
        keep = per_frame
        if keep > geometry.patches:
            raise ValueError(f"DivPrune cannot keep {keep} of the {geometry.patches} patch tokens per unit")
        return MaxMinDiversity()

    def plan(self, geometry: Geometry) -> Plan:
        if self.budget is None:
            raise ValueError("DivPrune needs a budget (visual tokens per image entering the language model)")
        if self.budget < geometry.units:
            raise ValueError(
                f"DivPrune keeps the same count in every frame: a budget of {self.budget} is less than one token "
                f"for each of the {geometry.units} frames"
            )
        keep = self.budget // geometry.units * geometry.units  # the same count in every frame
        stage = self.vision_stage_for(geometry, keep)
        return Plan(Schedule(geometry.num_layers, geometry.visual_tokens, keep), vision=stage)
