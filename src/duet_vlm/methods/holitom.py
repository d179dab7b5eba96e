"""HoliTom (Shao et al., NeurIPS 2025): holistic token merging for video LLMs, as the official code runs it
(``cokeshao/HoliTom`` ``e9b2972``: ``holitom/llava_arch.py`` and ``holitom/modeling_qwen2.py``).

Outside the language model a video's frames are cut into segments by a dynamic program that
maximises the tokens saved by temporal merging, each token that stays similar through its segment
is averaged over the segment's frames, and the tokens are then merged spatially; inside the language
model the less-attended visual tokens are merged into their most similar kept token once.

The merge algebra is pure and lives in ``duet_vlm.video_merge`` (re-exported here); this module is
the method: its two stages, its options and its budget.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

import torch

from ..geometry import Geometry
from ..options import check_number
from ..schedule import Schedule
from ..selection import gather_tokens
from ..video_merge import (  # noqa: F401 - the merge algebra, re-exported where it was defined before
    BETA,
    KNN,
    MAX_WINDOW,
    TAU,
    MergePlan,
    assemble,
    cluster_weights,
    exact_counts,
    frame_similarity,
    holitom_merge,
    merge_into_kept,
    official_counts,
    segment_frames,
    split_until,
    static_masks,
    static_runs,
    temporal_segments,
    token_counts,
    window_savings,
)
from .base import (
    LanguageStage,
    LayerView,
    Plan,
    Reducer,
    Selection,
    VisionReduction,
    VisionStage,
    VisionView,
    check_budget,
    compose_plan,
)
from .stages import LastTokenAttention
from .registry import register_method

# The official settings (scripts/eval_ov-7b_holitom.sh, holitom/llava_arch.py environment defaults);
# T, BETA, K and MAX_WINDOW_SIZE are the merge algebra's defaults (duet_vlm.video_merge).
REFERENCE_LAYER = (18, 28)  # HOLITOM_k=18 on Qwen2-7B's 28 decoder layers (LLaVA-OneVision-7B, LLaVA-Video-7B)
MERGE_RATIO = 0.5  # HOLITOM_r: half of the visual tokens merged at that layer
TAU_LOW, LOW_RETAIN = 0.65, 0.125  # T=0.65 at RETAIN_RATIO=0.10: below the midpoint of 0.10 and 0.15
ALLOCATIONS = ("video", "frame")


def runtime_takes_counts() -> bool:
    """Whether this duet-vlm's vision stages may give frames different token counts
    (``VisionReduction.counts``); HoliTom's own allocation needs it."""
    return "counts" in {spec.name for spec in dataclasses.fields(VisionReduction)}


# ----------------------------------------------------------------------------- the stages
@dataclass
class HoliTomMerge(VisionStage):
    """HoliTom's outer-LLM stage on each item's frames (``holitom_merge``): temporal segments, static
    tokens averaged over their segment, then attention and DPC-kNN spatial merging.

    The runtime stacks the views of an item's ``frames`` frames (item-major), so the stage looks
    across them. Similarities and merges are measured in the language model's space (``view.project``,
    as the official code merges the pooled projector outputs); the merged tokens are returned there
    (``VisionReduction.projected``) and, with the same weights, before the projector (``features``).
    Scores are ``view.cls_attention`` (attention received, the official SigLIP score; CLS attention
    on CLIP towers). Where the item's slots hold each frame's CLS token (Video-LLaVA) CLS is one of
    the frame's tokens and ranks first among its dynamic tokens; elsewhere it is not a token.

    ``per_frame``: every frame gets the same count (the runtime's rule without
    ``VisionReduction.counts``); otherwise frames get HoliTom's own counts (``counts``).
    """

    frames: int = 1
    cls_token: bool = False
    tau: float = TAU
    beta: float = BETA
    knn: int = KNN
    max_window: int = MAX_WINDOW
    per_frame: bool = True

    def reduce(self, view: VisionView, keep: int) -> VisionReduction:
        stacked = view.features.shape[0]
        if stacked % self.frames:
            raise RuntimeError(f"{stacked} stacked units are not items of {self.frames} frames")
        offset = int(view.has_cls and not self.cls_token)
        tokens = view.features[:, offset:]
        scores = view.cls_attention.float()
        if view.has_cls and self.cls_token:
            scores = torch.cat([torch.full_like(scores[:, :1], float("inf")), scores], dim=1)
        if scores.shape != tokens.shape[:2]:
            raise RuntimeError(f"scores {tuple(scores.shape)} do not match the tokens {tuple(tokens.shape[:2])}")
        merging = self.frames > 1  # a lone frame (an image) is only ranked, never merged
        directions = view.project(tokens) if merging and view.project is not None else tokens
        plans = []
        for first in range(0, stacked, self.frames):
            rows = slice(first, first + self.frames)
            plans.append(holitom_merge(
                directions[rows], scores[rows], keep * self.frames, self.tau, self.beta, self.knn, self.max_window,
                self.per_frame,
            ))
        width = keep if self.per_frame else max(int(plan.counts.max()) for plan in plans)
        features = torch.cat([plan.apply(tokens[i * self.frames : (i + 1) * self.frames], width)
                              for i, plan in enumerate(plans)])
        kept = torch.zeros(stacked, width, dtype=torch.long, device=tokens.device)
        for i, plan in enumerate(plans):
            kept[i * self.frames : (i + 1) * self.frames, : plan.kept.shape[1]] = plan.kept
        reduction = VisionReduction(features, kept + offset)
        if merging and view.project is not None:
            reduction.projected = torch.cat([plan.apply(directions[i * self.frames : (i + 1) * self.frames], width)
                                             for i, plan in enumerate(plans)])
        if not self.per_frame:
            reduction.counts = torch.cat([plan.counts for plan in plans])
        return reduction


@dataclass
class SimilarityMerge(LanguageStage):
    """HoliTom's inner-LLM stage: FastV's score (the last prompt token's attention in the layer
    before the boundary, mean over heads, on that layer's own input), the best ``keep`` stay and
    every other visual token of the item is merged into its most similar kept token
    (``merge_into_kept``) on the states entering the boundary layer; only the ``query x keys`` block
    of attention is formed, so the model keeps its attention backend."""

    merges = True

    reads: ClassVar[str | None] = "previous"  # scores with the layer before the boundary

    def score(self, view: LayerView) -> torch.Tensor:
        return LastTokenAttention().score(view)

    def select(self, view: LayerView, keep: int) -> Selection:
        index, merged = merge_into_kept(gather_tokens(view.hidden_states, view.visual_index), self.score(view), keep)
        return Selection(index, merged)


# ----------------------------------------------------------------------------- the method
@register_method("holitom")
@dataclass
class HoliTom(Reducer):
    """HoliTom (Shao et al., NeurIPS 2025, arXiv 2505.21334): "Holistic Token Merging for Fast Video
    Large Language Models". Official code ``cokeshao/HoliTom`` at ``e9b2972`` (``holitom/llava_arch.py``:
    the outer-LLM merge; ``holitom/modeling_qwen2.py``: the inner-LLM merge; ``scripts/``: settings).

    **Outer LLM** (``HoliTomMerge``, ``holitom_merge``): each video's frames are segmented by a dynamic
    program maximising the tokens temporal merging saves (a token is static in a segment when its
    cosine similarity to the same position of the previous frame stays above ``tau`` through it);
    static tokens are averaged over their segment (the merged token goes to the segment's first
    frame, "its first occurrence"); the ratio of tokens kept is then raised to what remains, and
    static tokens are merged by DPC-kNN clustering (a centre weighs ``beta`` against its members'
    mean), each frame's dynamic tokens chosen by the attention they receive. **Inner LLM**
    (``SimilarityMerge``): after ``layer`` decoder layers, half (``merge_ratio``) of each item's
    visual tokens, the ones the last prompt token attended to least in the layer before, are merged
    into their most similar kept token (pairwise averaging, in token order).

    Budget: ``budget`` is the layer average per item. The LLM-input count ``n`` (a whole number of
    frames) is solved so that ``(layer * n + (L - layer) * round(n * (1 - merge_ratio))) / L`` is
    closest to it; on LLaVA-1.5 (576 tokens, 32 layers, layer 21): 192 -> 232 tokens then 116
    (average 192.1), 128 -> 154 then 77 (127.5), 64 -> 77 then 38 (63.6).

    Args:
        budget: average visual tokens per decoder layer per image or video.
        retain_ratio: the official ``RETAIN_RATIO``: the fraction of each item's tokens entering the
            language model (per frame, rounded); overrides the solver.
        tau: the official ``T``, the similarity above which a token is static; ``None``: 0.80 (the
            scripts at ``RETAIN_RATIO`` 0.15-0.25), 0.65 when less than 12.5% of the tokens enter the
            language model (the scripts use 0.65 at 0.10; the switch is halfway to 0.15).
        beta: the official ``BETA`` (0.6): a cluster centre's weight against its members' mean.
        knn: the official ``K`` (7): DPC-kNN density neighbours (at most the cluster count).
        max_window: the official ``MAX_WINDOW_SIZE`` (1024): longest segment, in frames.
        layer: the official ``HOLITOM_k``: decoder layers before the inner merge; ``None``: 18 of 28
            (LLaVA-OneVision-7B) scaled to the depth, ``round(18 L / 28)`` (21 of 32, 4 of 6).
        merge_ratio: the official ``HOLITOM_r`` (0.5): the share of the visual tokens merged there;
            0 is "HoliTom (w/o M)", the outer merge alone.
        allocation: ``"video"``: HoliTom's own counts, which differ between frames (the budget is
            spread over the whole video, what makes the method holistic); it needs a runtime whose
            vision stages may return per-frame counts (``VisionReduction.counts``). ``"frame"``: the
            same count in every frame (the budget is spread per segment; a window is a segment only
            if its remaining tokens fill its frames, and its static tokens are dealt to its frames).
            ``None``: ``"video"`` where the runtime supports it, else ``"frame"``.
        positions: ``None``: contiguous on 1-D RoPE (the official LLaVA code renumbers the shortened
            input; after the inner merge it keeps the gaps, which the runtime does not offer next to
            renumbering), original under M-RoPE.

    Choices where paper and code are silent or disagree:

    - Families: the official code runs LLaVA-OneVision and LLaVA-Video (SigLIP, pooled frames). Here
      every family: Video-LLaVA frames (CLIP, CLS attention as the score, each frame's CLS one of its
      tokens, ranked first), Qwen2/2.5-VL videos (one frame per temporal slice of merged tokens,
      attention received; merged tokens take their centre's slot and so its M-RoPE position: the
      first frame of their segment, "first occurrence"). Qwen3-VL makes every temporal slice an item
      of its own, so there HoliTom cannot look across frames: each slice gets the one-frame rule.
    - Images: an image is a one-frame video, the official code's lone-frame path (the attention
      ranking, no temporal merge) followed by the inner merge; the official code leaves images to
      the inner merge alone, which the shared budget meaning cannot express for a vision method.
    - Exact counts: the official per-group rounding (``ceil`` per frame) overshoots its retain ratio
      (by 19-25% in the recorded cases) and is corrected by ``exact_counts``; when temporal merging
      leaves fewer tokens than the budget the least useful segments are split (``split_until``)
      where the official code would hand the LLM fewer tokens.
    - Merging space: similarities, DPC-kNN and averages in the language model's space (after the
      projector), as the official code computes on the pooled projector outputs; Video-LLaVA's
      merged tokens are projected first, then averaged.
    - Not offered: the official ``D`` (a share of each frame's dynamic tokens merged by DPC-kNN
      instead of chosen by attention) is 0 in every script, and any ``D > 0`` raises at ``e9b2972``
      (``merge_tokens_by_attention_density`` broadcasts the position mask); ``NO_BETA`` (plain
      cluster means) is off by default and not offered either.
    - Ties: DPC-kNN and attention ties go to the lower index (official: random noise / ``topk``).
    - Batches: every item (row) is merged on its own; the official inner merge reads the first
      row's first image only (batch size 1).
    - Inner merge in float32 (official: the model dtype, one pair at a time).
    """

    budget: int | None = None
    retain_ratio: float | None = None
    tau: float | None = None
    beta: float = BETA
    knn: int = KNN
    max_window: int = MAX_WINDOW
    layer: int | None = None
    merge_ratio: float = MERGE_RATIO
    allocation: str | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        check_budget(self.budget, required=False)
        # "a number in [0, 1]" first, then the bound the option's meaning adds (one message per rule).
        check_number("retain_ratio", self.retain_ratio, low=0, high=1, optional=True, kind="a number")
        check_number("retain_ratio", self.retain_ratio, low=0, low_open=True, optional=True,
                     note="the fraction of each item's tokens entering the LLM")
        check_number("tau", self.tau, low=-1, high=1, optional=True, kind="a number")
        check_number("beta", self.beta, low=0, high=1, kind="a number")
        check_number("knn", self.knn, integer=True, low=1)
        check_number("max_window", self.max_window, integer=True, low=1)
        check_number("merge_ratio", self.merge_ratio, low=0, high=1, kind="a number")
        check_number("merge_ratio", self.merge_ratio, high=1, high_open=True,
                     note="the share of the visual tokens merged inside the LLM")
        check_number("layer", self.layer, integer=True, low=1, optional=True)
        if self.allocation not in (None, *ALLOCATIONS):
            raise ValueError(f"allocation must be 'video', 'frame' or None, got {self.allocation!r}")
        if self.allocation == "video" and not runtime_takes_counts():
            raise ValueError(
                "allocation='video' gives frames different token counts, which this duet-vlm's runtime does not "
                "accept (no VisionReduction.counts); use allocation='frame' (the same count in every frame)"
            )

    def resolved_allocation(self) -> str:
        return self.allocation or ("video" if runtime_takes_counts() else "frame")

    def merge_layer(self, geometry: Geometry) -> int:
        layers = geometry.num_layers
        layer = self.layer
        if layer is None:
            layer = min(layers - 1, max(1, round(REFERENCE_LAYER[0] * layers / REFERENCE_LAYER[1])))
            layer = geometry.snap((layer,), SimilarityMerge.reads)[0]
        if not 0 < layer < layers:
            raise ValueError(f"layer={layer} but the language model has {layers} layers (merge after 1..{layers - 1})")
        return layer

    def schedule_for(self, geometry: Geometry, llm_input: int) -> Schedule:
        if not self.merge_ratio:
            return Schedule(geometry.num_layers, geometry.visual_tokens, llm_input)
        kept = round(llm_input * (1 - self.merge_ratio))  # the official round(n * (1 - r))
        return Schedule(geometry.num_layers, geometry.visual_tokens, llm_input, ((self.merge_layer(geometry), kept),))

    def language_stage(self) -> SimilarityMerge:
        return SimilarityMerge()

    def vision_stage_for(self, geometry: Geometry, keep: int) -> HoliTomMerge:
        tau = self.tau
        if tau is None:  # by the share of the frames' tokens entering the LLM, the official RETAIN_RATIO
            tau = TAU_LOW if keep < LOW_RETAIN * geometry.units * geometry.unit_tokens else TAU
        return HoliTomMerge(
            frames=geometry.units,
            cls_token=geometry.has_cls and geometry.unit_tokens == geometry.patches + 1,
            tau=tau, beta=self.beta, knn=self.knn,
            max_window=self.max_window, per_frame=self.resolved_allocation() == "frame",
        )

    def plan(self, geometry: Geometry) -> Plan:
        units = geometry.units
        if self.retain_ratio is not None:
            llm_input = min(round(self.retain_ratio * geometry.unit_tokens), geometry.unit_tokens) * units
            schedule = self.schedule_for(geometry, llm_input)
            language = self.language_stage() if schedule.boundaries else None
            return Plan(schedule, self.vision_stage_for(geometry, llm_input), language)
        if self.budget is None:
            raise ValueError("HoliTom needs a budget (or retain_ratio)")
        if not self.merge_ratio:
            keep = self.budget // units * units
            schedule = Schedule(geometry.num_layers, geometry.visual_tokens, keep)
            return Plan(schedule, self.vision_stage_for(geometry, keep))
        layer = self.merge_layer(geometry)
        try:
            return compose_plan(self, self, self.budget, geometry)
        except ValueError as error:
            raise ValueError(
                f"HoliTom cannot average {self.budget} visual tokens per layer on this item: merging "
                f"{self.merge_ratio:g} of them after layer {layer} of {geometry.num_layers} caps the average below "
                f"{self.schedule_for(geometry, geometry.visual_tokens).average:.1f} of its {geometry.visual_tokens}; "
                "use a smaller budget, merge_ratio=0 (HoliTom w/o M) or a later layer"
            ) from error
