"""Stages that more than one method runs: each method imports them from here, never from another method.

A stage is one step a plan applies (a ``VisionStage`` before the language model, a ``LanguageStage``
at its boundaries). The methods that introduced them (DUET's Stage A, FastV's and PyramidDrop's
scores, TRIO's encoder scan) and the methods that reuse them (VisionZip, HoliTom, VScan, PIO) both
import them from this module, so no method depends on another (the ``methods-independent`` import
contract).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from ..geometry import Geometry
from ..options import check_number
from ..plan import LanguageStage, LayerView, VisionReduction, VisionStage, VisionView
from ..selection import merge_dominant_contextual

CONTEXTUAL_SHARE = 10 / 64
#: What may rank Stage A's patches (``DominantContextualMerge.score``).
STAGE_A_SCORES = ("attention", "norm")


def check_stage_a_counts(dominant: int | None, contextual: int | None) -> None:
    """Explicit dominant/contextual counts are ints >= 0; dominant includes CLS, so >= 1."""
    check_number("dominant", dominant, integer=True, low=0, optional=True)
    check_number("contextual", contextual, integer=True, low=0, optional=True)
    if dominant is not None and dominant < 1:
        raise ValueError(f"dominant counts the CLS token and must be >= 1, got {dominant!r}")


def contextual_count(keep: int, dominant: int | None, contextual: int | None, default: int) -> int:
    """How many of ``keep`` Stage-A tokens are contextual: as given, implied by ``dominant``, or ``default``."""
    if contextual is None:
        contextual = keep - dominant if dominant is not None else default
    if not 0 <= contextual < keep:
        raise ValueError(f"cannot split {keep} tokens into dominant (CLS included) + {contextual} contextual")
    return contextual


@dataclass
class DominantContextualMerge(VisionStage):
    """Stage A (V2V): CLS-attention dominant tokens plus merged contextual tokens.

    Keeps CLS and the ``keep - contextual - 1`` patches the CLS token attends to most (raster
    order), then ``contextual`` tokens, each an anchor plus the mean of the pool members most similar
    to it (see ``duet_vlm.selection.merge_dominant_contextual``). ``cluster_width=None`` gives
    VisionZip's spatially uniform anchors over all residual tokens.

    ``score``: what ranks the patches. ``"attention"`` (the published rule): the CLS token's attention,
    or on a tower without one the substitute its adapter computes (``VisionView.cls_attention``);
    ``"norm"``: each token's feature norm (float32), which reads no attention.

    >>> stage = DominantContextualMerge(contextual=7, cluster_width=4)
    >>> stage.reduce(view, keep=307).features.shape      # doctest: +SKIP
    torch.Size([1, 307, 1024])
    """

    contextual: int = 7
    cluster_width: int | None = 4
    score: str = "attention"

    def __post_init__(self) -> None:
        if self.score not in STAGE_A_SCORES:
            raise ValueError(f"Stage A's score must be one of {', '.join(STAGE_A_SCORES)}, got {self.score!r}")

    def reduce(self, view: VisionView, keep: int) -> VisionReduction:
        contextual = min(self.contextual, keep - 1)
        importance = view.cls_attention
        if self.score == "norm":
            importance = view.features[:, int(view.has_cls):].float().norm(dim=-1)
        merged = merge_dominant_contextual(
            view.features, importance, view.keys, keep - contextual, contextual, self.cluster_width, view.has_cls
        )
        roles = {"dominant": merged.dominant, "anchors": merged.anchors, "members": merged.members}
        return VisionReduction(merged.features, merged.kept, roles)


@dataclass
class LastTokenAttention(LanguageStage):
    """FastV's score: attention from the last prompt token, as the layer before the boundary computed it.

    The last non-padding token of each row is the query (the ``:`` of ``ASSISTANT:`` at inference);
    the scores are that token's attention probabilities in decoder layer ``K - 1`` on its own input,
    averaged over heads, restricted to the visual tokens. The highest ``keep`` survive.

    >>> LastTokenAttention().select(view, keep=98).shape      # doctest: +SKIP
    torch.Size([1, 1, 98])
    """

    reads: ClassVar[str | None] = "previous"  # scores with the layer before the boundary

    def score(self, view: LayerView) -> torch.Tensor:
        last = [row.nonzero()[-1] for row in view.valid]
        return view.text_to_visual_attention(last, previous_layer=True)


@dataclass
class LastInstructionAttention(LanguageStage):
    """PyramidDrop's score: attention from the last instruction token, with the next layer's projections.

    At inference the last instruction token is the last prompt token. In training
    ``view.text_after_image`` holds only instruction tokens (label -100), so its last entry is the
    token just before the final answer; the reference uses the token before *each* answer span and
    averages, so multi-turn samples are approximated by their last turn.

    >>> LastInstructionAttention().select(view, keep=144).shape    # doctest: +SKIP
    torch.Size([1, 1, 144])
    """

    def score(self, view: LayerView) -> torch.Tensor:
        return view.text_to_visual_attention([positions[-1:] for positions in view.text_after_image])


def window_scan(scores: torch.Tensor, grid: tuple[int, int], window: int, count: int) -> torch.Tensor:
    """``count`` tokens of one unit, best first, at most ``ceil(count / windows)`` from each
    ``window x window`` window of the ``grid`` (tokens past the last whole window belong to it).

    This is the official Qwen2.5-VL ``window_selection``; when ``count`` is a multiple of the window
    count it keeps exactly each window's top ``count / windows``, the official LLaVA rule
    (``window_cls_selection``). A grid with one row (an anyres image's slot sequence) is scanned in
    windows of ``window**2`` consecutive tokens.

    >>> window_scan(torch.tensor([4.0, 3.0, 2.0, 1.0]), (1, 4), 1, 2).tolist()   # windows of 1 token
    [0, 1]
    >>> window_scan(torch.tensor([9.0, 8.0, 1.0, 2.0]), (2, 2), 1, 2).tolist()  # 4 windows of 1: caps of 1
    [0, 1]
    """
    rows, cols = grid
    wr, wc = (window, window) if rows > 1 else (1, window * window)
    wr, wc = min(wr, rows), min(wc, cols)
    windows_r, windows_c = rows // wr, cols // wc
    cap = -(-count // (windows_r * windows_c))
    order = scores.argsort(descending=True)
    window_of = (order // cols // wr).clamp(max=windows_r - 1) * windows_c + (order % cols // wc).clamp(max=windows_c - 1)
    # Rank of each token within its window in score order: taken while below the cap.
    same = window_of[:, None] == window_of[None, :]
    rank_in_window = (same.tril(-1)).sum(dim=1)
    return order[rank_in_window < cap][:count]


def merge_into_nearest(values: torch.Tensor, directions: torch.Tensor, kept: torch.Tensor,
                       sources: torch.Tensor | None = None) -> torch.Tensor:
    """Each non-kept token of ``values`` (``(T, C)``) averaged into the kept token whose ``directions``
    row is most cosine-similar: ``(kept token + its assigned tokens) / (1 + count)``, in ``kept``
    order (the official ``token_merging``, scaling 1). ``sources``: the tokens merged (default:
    every token not in ``kept``)."""
    if sources is None:
        mask = torch.zeros(values.shape[0], dtype=torch.bool, device=values.device)
        mask[kept] = True
        rest = (~mask).nonzero()[:, 0]
    else:
        rest = sources
    if not len(rest):
        return values[kept]
    unit = F.normalize(directions.float(), dim=-1)
    nearest = (unit[rest] @ unit[kept].T).argmax(dim=1)
    merged = values[kept].clone()
    merged.index_add_(0, nearest, values[rest])
    count = torch.zeros(len(kept), dtype=torch.int, device=values.device)
    count.index_add_(0, nearest, torch.ones_like(nearest, dtype=torch.int))
    return merged / (1 + count)[:, None]


@dataclass
class GlobalLocalScan(VisionStage):
    """TRIO's VE stage: a local scan of windows at a shallow layer and a global scan at a deep one,
    then every other token merged into its nearest kept token after the projector.

    Of ``keep`` tokens per unit, ``int(keep * local_share)`` are the best by the shallow layer's CLS
    attention within windows (``window_scan``); the rest are the best by the deep layer's attention
    over everything not yet taken. CLS is not kept. Each dropped patch is averaged into the kept
    patch it is most cosine-similar to in the language model's space (the projector's output), so
    nothing is discarded outright. Towers without CLS score by the attention a token receives, as
    the official Qwen2.5-VL path does.

    >>> GlobalLocalScan(window=6, local_layer=5, global_layer=-2).encoder_layers()
    (5, -2)
    """

    window: int = 6
    local_share: float = 0.5
    local_layer: int | str = 5
    global_layer: int | str = -2

    def __post_init__(self) -> None:
        check_number("window", self.window, integer=True, low=0, low_open=True, note="tokens per side")
        check_number("local_share", self.local_share, low=0, high=1)

    def encoder_layers(self) -> tuple:
        return tuple(dict.fromkeys((self.local_layer, self.global_layer)))

    def reduce(self, view: VisionView, keep: int) -> VisionReduction:
        start = int(view.has_cls)
        patches = view.features[:, start:]
        local_scores, global_scores = view.attention[self.local_layer], view.attention[self.global_layer]
        directions = view.project(patches) if view.project is not None else patches
        local_count = int(keep * self.local_share)
        features, projected, kept_all, local_all = [], [], [], []
        for unit in range(patches.shape[0]):
            local = window_scan(local_scores[unit], view.grid, self.window, local_count)
            rest = global_scores[unit].clone()
            rest[local] = 0  # the official code zeroes the local picks before the global top-k
            global_ = rest.topk(keep - len(local)).indices
            kept = torch.cat([local, global_]).sort().values
            features.append(merge_into_nearest(patches[unit], directions[unit], kept))
            if view.project is not None:
                projected.append(merge_into_nearest(directions[unit], directions[unit], kept))
            kept_all.append(kept + start)
            local_all.append(local + start)
        reduction = VisionReduction(torch.stack(features), torch.stack(kept_all), {"local": torch.stack(local_all)})
        if projected:
            reduction.projected = torch.stack(projected)
        return reduction


def scan_for(geometry: Geometry, window: int | None, local_share: float, local_layer, global_layer) -> GlobalLocalScan:
    """The scan with the official defaults of the model's path where an option is ``None``: LLaVA's
    (windows of 6 on the 24x24 CLIP grid, layers 5 and -2) on 1-D RoPE models, Qwen2.5-VL's (windows
    of 4 merged tokens, the first full-attention block and the last block) under M-RoPE. Layer 5 is
    the official choice for CLIP-L's 24 layers; a tower of another depth reads the layer at the same
    relative depth (``round(5 * depth / 24)``: 6 of SigLIP's 27, 1 of a 4-layer test tower)."""
    qwen = geometry.rope == "mrope"
    shallow = round(5 * geometry.encoder_depth / 24) if geometry.encoder_depth else 5
    return GlobalLocalScan(
        window=window if window is not None else (4 if qwen else 6),
        local_share=local_share,
        local_layer=local_layer if local_layer is not None else ("first_full_attention" if qwen else shallow),
        global_layer=global_layer if global_layer is not None else ("last" if qwen else -2),
    )

