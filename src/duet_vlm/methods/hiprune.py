"""HiPrune (Liu et al., ACL 2026 Findings): "Training-Free Visual Token Pruning via Hierarchical Attention
in Vision-Language Models" (arXiv 2508.00553; official code ``Danielement321/HiPrune`` ``6e83a12``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..geometry import Geometry
from ..options import check_number
from ..plan import VisionReduction, VisionStage, VisionView
from ..schedule import Schedule
from ..selection import gather_tokens
from .base import Plan, Reducer, check_budget, per_unit
from .registry import register_method

#: The official object layers, 1-based as ``HIPRUNE_OBJECT_LAYER`` counts them, and the tower depth
#: they were chosen on: 9 of CLIP-L's 24 layers (LLaVA-1.5, LLaVA-NeXT), 16 of Qwen2.5-VL's 32 blocks.
OFFICIAL_OBJECT_LAYER = {"1d": (9, 24), "mrope": (16, 32)}


def object_layer_for(geometry: Geometry) -> int:
    """The 0-based encoder layer whose attention picks the anchors on a model of ``geometry``: the
    official layer of its path (LLaVA's under 1-D RoPE, Qwen2.5-VL's under M-RoPE), at the same
    relative depth on a tower of another depth (``round(9 * depth / 24)``: the 9th of 24, the 10th of
    SigLIP's 27, the 2nd of a 4-layer test tower).

    >>> object_layer_for(Geometry(32, 576, (24, 24), True, encoder_depth=24))
    8
    >>> object_layer_for(Geometry(28, 64, (8, 8), False, rope="mrope", encoder_depth=32))
    15
    """
    layer, depth = OFFICIAL_OBJECT_LAYER["mrope" if geometry.rope == "mrope" else "1d"]
    if geometry.encoder_depth and geometry.encoder_depth != depth:
        layer = max(1, round(layer * geometry.encoder_depth / depth))
    return layer - 1


def first_unique(indices: torch.Tensor) -> torch.Tensor:
    """The distinct values of ``indices`` in the order they first occur.

    >>> first_unique(torch.tensor([5, 3, 5, 1, 3])).tolist()
    [5, 3, 1]
    """
    values, inverse = torch.unique(indices, return_inverse=True)
    positions = torch.arange(len(indices), device=indices.device)
    first = torch.full((len(values),), len(indices), device=indices.device).scatter_reduce(
        0, inverse, positions, reduce="amin"
    )
    return values[first.argsort()]


def hiprune_select(
    object_scores: torch.Tensor, register_scores: torch.Tensor, keep: int, alpha: float, cols: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(kept, anchors)``: HiPrune's ``keep`` patch indices of one unit, ascending, and its anchors.

    ``round(keep * alpha / 5)`` anchors are the patches ``object_scores`` ranks highest; each brings
    its four buffer patches ``p - 1, p + 1, p - cols, p + cols`` (raster neighbours, clamped into
    ``[0, P)``, as the official code writes them: a row's first and last patches take their other
    neighbour from the row before or after); the rest of ``keep`` are the registers, the patches
    ``register_scores`` ranks highest among those not yet chosen. Where anchors and buffers alone
    exceed ``keep`` (a small budget with a large ``alpha``), the first ``keep`` of them in that order
    (anchors, then each direction) are kept; the official code fails there.

    >>> scores = torch.zeros(16); scores[5] = 1.0
    >>> registers = torch.arange(16.0)
    >>> kept, anchors = hiprune_select(scores, registers, keep=8, alpha=0.5, cols=4)
    >>> kept.tolist(), anchors.tolist()   # anchor 5, buffers 4 6 1 9, registers 15 14 13
    ([1, 4, 5, 6, 9, 13, 14, 15], [5])
    """
    patches = object_scores.shape[0]
    if not 0 < keep <= patches:
        raise ValueError(f"HiPrune cannot keep {keep} of {patches} patches")
    anchors = object_scores.topk(round(keep * alpha / 5)).indices
    near = torch.cat([anchors, anchors - 1, anchors + 1, anchors - cols, anchors + cols]).clamp(0, patches - 1)
    chosen = first_unique(near)[:keep]
    taken = torch.zeros(patches, dtype=torch.bool, device=object_scores.device)
    taken[chosen] = True
    registers = register_scores.float().masked_fill(taken, float("-inf")).topk(keep - len(chosen)).indices
    return torch.cat([chosen, registers]).sort().values, anchors


@dataclass
class HierarchicalSelect(VisionStage):
    """HiPrune's selection: anchors by a middle encoder layer's attention, their raster neighbours as
    buffers, registers by the feature layer's, ranked by the attention each patch receives from
    every token (``received``: no CLS token needed; where there is one, it is a query like every
    other token and is never kept).

    ``object_layer``: the encoder layer (an index, negative from the end) whose attention picks the
    anchors. The registers are ranked by the feature layer's, the layer whose output the projector
    reads (official: ``mm_vision_select_layer``, -2, on LLaVA; the last block on Qwen2.5-VL).

    >>> HierarchicalSelect(object_layer=8, alpha=0.1).encoder_layers()
    (8,)
    """

    received: ClassVar[bool] = True

    object_layer: int | str = 8
    alpha: float = 0.1

    def encoder_layers(self) -> tuple:
        return (self.object_layer,)

    def reduce(self, view: VisionView, keep: int) -> VisionReduction:
        offset = int(view.has_cls)  # the CLS token is never kept
        kept, anchors = zip(*(
            hiprune_select(object_scores, register_scores, keep, self.alpha, view.grid[1])
            for object_scores, register_scores in zip(view.attention[self.object_layer], view.cls_attention)
        ))
        kept = torch.stack(kept) + offset
        return VisionReduction(gather_tokens(view.features, kept), kept, {"anchors": torch.stack(anchors) + offset})


@register_method("hiprune")
@dataclass
class HiPrune(Reducer):
    """HiPrune (Liu et al., ACL 2026 Findings; official code ``Danielement321/HiPrune`` ``6e83a12``,
    ``LLaVA/llava/model/llava_arch.py`` ``encode_images`` and ``Qwen2_5_VL/qwen2_5_vl_HiPrune.py``).

    Training-free and CLS-free: ``budget`` patches per image enter the language model, chosen before
    the projector from the vision encoder's own attention (``HierarchicalSelect``): ``round(budget *
    alpha / 5)`` anchors that a middle (object) layer attends to most, each with its four raster
    neighbours as buffers, and registers that the feature layer attends to most for the rest. The
    score is the attention each patch receives, averaged over heads and summed over every query
    (the official code averages over queries: the same ranking); a Qwen merged token's is the mean of
    its patches', as in the official Qwen code. Text-agnostic, a fixed count per image.

    Choices where the official code has none or differs: every family, not only LLaVA-1.5/-NeXT and
    Qwen2.5-VL (the object layer at the official relative depth, ``object_layer_for``); already chosen
    anchors and buffers are excluded from the registers (the official code subtracts 1 from their
    scores, which excludes them on LLaVA, where a mean over queries is below 1, but not always on
    Qwen, where it sums and may pick a token twice, keeping fewer than the budget); anchors and
    buffers beyond the budget are cut (``hiprune_select``).

    Args:
        budget: visual tokens per image (per frame count for a video) entering the language model
            (official LLaVA-1.5: 192 / 128 / 64).
        alpha: the anchors-and-buffers share (official 0.1: 4, 3 and 1 anchors at 192, 128, 64).
        object_layer: the 0-based encoder layer of the anchors (or ``"first_full_attention"``,
            ``"last"``); ``None``: the official one of the model's path (``object_layer_for``: 8 on
            LLaVA's CLIP-L, 15 on Qwen2.5-VL).

    >>> reducer = duet_vlm.make("hiprune", budget=64)            # doctest: +SKIP
    >>> with reducer(model): model.generate(**inputs)            # doctest: +SKIP
    >>> reducer.stats.vision_roles["anchors"].shape              # doctest: +SKIP
    torch.Size([1, 1])
    """

    budget: int | None = None
    alpha: float = 0.1
    object_layer: int | str | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        check_budget(self.budget, required=False)
        check_number("alpha", self.alpha, low=0, high=1)
        layer = self.object_layer
        if layer is not None and not (type(layer) is int or layer in ("first_full_attention", "last")):
            raise ValueError(
                "object_layer is an encoder layer index (negative from the end), 'first_full_attention' or 'last', "
                f"got {layer!r}"
            )

    def encoder_layers(self, geometry: Geometry) -> tuple:
        return self.vision_stage_for(geometry, 1).encoder_layers()

    def vision_stage_for(self, geometry: Geometry, keep: int) -> HierarchicalSelect:
        layer = self.object_layer if self.object_layer is not None else object_layer_for(geometry)
        return HierarchicalSelect(object_layer=layer, alpha=self.alpha)

    def plan(self, geometry: Geometry) -> Plan:
        if self.budget is None:
            raise ValueError("HiPrune needs a budget (visual tokens per image entering the language model)")
        keep = per_unit(geometry, self.budget) * geometry.units
        if keep > geometry.visual_tokens:
            raise ValueError(f"{keep} tokens exceed the {geometry.visual_tokens} visual tokens per image")
        schedule = Schedule(geometry.num_layers, geometry.visual_tokens, keep)
        return Plan(schedule, vision=self.vision_stage_for(geometry, keep))
