"""TRIO's vision-encoder scan (PIO-FVLM's "VE" stage), as the official code runs it (``ocy1/TRIO`` ``ec85d99``)."""

from __future__ import annotations

from dataclasses import dataclass


from ..geometry import Geometry
from ..plan import Plan
from ..schedule import Schedule
from .base import Reducer, check_budget, per_unit
from .registry import register_method
from .shapes import QWEN_KEEP_RATIO, ScanThenPrune, third_keeps  # noqa: F401 - shared with PIO and VScan
from .stages import GlobalLocalScan, merge_into_nearest, scan_for, window_scan  # noqa: F401 - re-exported


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


