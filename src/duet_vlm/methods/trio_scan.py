"""TRIO's vision-encoder scan (PIO-FVLM's "VE" stage), as the official code runs it (``ocy1/TRIO`` ``ec85d99``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from ..geometry import Geometry
from ..plan import Plan, VisionReduction, VisionStage, VisionView
from ..schedule import Schedule, scaled_boundaries, solve_llm_input
from .base import Reducer, check_budget, per_unit
from .registry import register_method


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


def merge_into_nearest(values: torch.Tensor, directions: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """Each non-kept token of ``values`` (``(T, C)``) averaged into the kept token whose ``directions``
    row is most cosine-similar: ``(kept token + its assigned tokens) / (1 + count)``, in ``kept``
    order (the official ``token_merging``, scaling 1)."""
    mask = torch.zeros(values.shape[0], dtype=torch.bool, device=values.device)
    mask[kept] = True
    rest = (~mask).nonzero()[:, 0]
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
        if isinstance(self.window, bool) or not isinstance(self.window, int) or self.window < 1:
            raise ValueError(f"window must be a positive int (tokens per side), got {self.window!r}")
        if isinstance(self.local_share, bool) or not isinstance(self.local_share, (int, float)):
            raise ValueError(f"local_share must be a number in [0, 1], got {self.local_share!r}")
        if not 0 <= self.local_share <= 1:
            raise ValueError(f"local_share must lie in [0, 1], got {self.local_share}")

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


@register_method("trio_scan")
@dataclass
class TrioScan(Reducer):
    """TRIO's vision-encoder scan alone (PIO-FVLM / TRIO, Ouyang et al. 2026; official code ``ocy1/TRIO``
    ``ec85d99``, ``llava/model/llava_arch.py`` ``encode_images`` and ``qwen/model/qwen2_5_vl_utils.py``).

    The language model receives ``budget`` tokens per image: half chosen per window by a shallow
    layer's CLS attention, half globally by a deep layer's, every other patch merged into its
    nearest kept one after the projector (``GlobalLocalScan``). Usable alone, in ``Compose`` with a
    language-side method, and as PIO's ``vision=True`` stage.

    Choices where the official code has none: every family, not only LLaVA-1.5 and Qwen2.5-VL (towers
    without CLS score by attention received, as the official Qwen path does; an anyres image's slots
    are scanned in runs of ``window**2``; a video is scanned frame by frame); exactly ``budget``
    tokens even when ``int(budget * local_share)`` is not a multiple of the window count (the
    official LLaVA code then keeps fewer; the global scan takes the rest here); towers of another
    depth than CLIP-L's 24 layers read the shallow map at the same relative depth (``scan_for``).

    Args:
        budget: visual tokens per image entering the language model (per frame count for a video).
        window: window side in tokens (official: 6 on LLaVA's patch grid, 4 on Qwen's merged grid).
        local_share: share of the tokens chosen by the window scan (official 0.5).
        local_layer, global_layer: the shallow and deep encoder layers (official LLaVA: 5 and -2;
            Qwen2.5-VL: ``"first_full_attention"`` and ``"last"``); ``None``: the model path's.

    >>> reducer = duet_vlm.make("trio_scan", budget=96)                     # doctest: +SKIP
    >>> duet_vlm.Compose(duet_vlm.TrioScan(), duet_vlm.make("fastv"), budget=64)   # doctest: +SKIP
    """

    budget: int | None = None
    window: int | None = None
    local_share: float = 0.5
    local_layer: int | str | None = None
    global_layer: int | str | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        check_budget(self.budget, required=False)
        self.vision_stage_for(Geometry(1, 1, (1, 1), False), 1)  # validate the stage options now

    def encoder_layers(self, geometry: Geometry) -> tuple:
        return self.vision_stage_for(geometry, 1).encoder_layers()

    def vision_stage_for(self, geometry: Geometry, keep: int) -> GlobalLocalScan:
        return scan_for(geometry, self.window, self.local_share, self.local_layer, self.global_layer)

    def plan(self, geometry: Geometry) -> Plan:
        if self.budget is None:
            raise ValueError("TrioScan needs a budget (visual tokens per image entering the language model)")
        keep = per_unit(geometry, self.budget) * geometry.units
        schedule = Schedule(geometry.num_layers, geometry.visual_tokens, keep)
        return Plan(schedule, vision=self.vision_stage_for(geometry, keep))


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


def int_tuple(name: str, values, minimum: int) -> tuple[int, ...]:
    if isinstance(values, int) and not isinstance(values, bool):
        values = (values,)
    if isinstance(values, (str, bytes)) or not hasattr(values, "__iter__"):
        raise ValueError(f"{name} must be a sequence of ints >= {minimum}, got {values!r}")
    values = tuple(values)
    if any(isinstance(v, bool) or not isinstance(v, int) or v < minimum for v in values):
        raise ValueError(f"{name} must be ints >= {minimum}, got {values}")
    return values


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
        if self.layers is not None:
            self.layers = int_tuple("layers", self.layers, minimum=1)
            if list(self.layers) != sorted(set(self.layers)):
                raise ValueError(f"layers must be strictly increasing, got {self.layers}")
        if self.keep is not None:
            self.keep = int_tuple("keep", self.keep, minimum=0)
        if self.ratios is not None:
            self.ratios = (self.ratios,) if isinstance(self.ratios, (int, float)) else tuple(self.ratios)
            if any(isinstance(r, bool) or not isinstance(r, (int, float)) or not 0 <= r <= 1 for r in self.ratios):
                raise ValueError(f"ratios must lie in [0, 1], got {self.ratios}")
        if self.keep is not None and self.ratios is not None:
            raise ValueError("give keep or ratios, not both")
        shape = self.keep if self.keep is not None else self.ratios
        stages = len(self.layers) if self.layers is not None else 1
        if shape is not None and len(shape) != stages:
            raise ValueError(
                f"{stages} boundary layer(s) but {len(shape)} keep counts/ratios"
                + ("" if self.layers is not None else " (give layers with more than one)")
            )
        if self.llm_input is not None and (
            isinstance(self.llm_input, bool) or not isinstance(self.llm_input, int) or self.llm_input < 1
        ):
            raise ValueError(f"llm_input must be a positive int (tokens per item entering the LLM), got {self.llm_input!r}")
        if self.vision_ratio is not None and (
            isinstance(self.vision_ratio, bool) or not isinstance(self.vision_ratio, (int, float))
            or not 0 < self.vision_ratio <= 1
        ):
            raise ValueError(f"vision_ratio must lie in (0, 1], got {self.vision_ratio!r}")
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
        layers = self.layers if self.layers is not None else scaled_boundaries(geometry.num_layers, (0.5,))
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
