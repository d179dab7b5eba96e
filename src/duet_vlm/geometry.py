"""The shape facts of one visual item that a budget solver needs (no model, no method)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Geometry:
    """Shape facts of one visual item that a budget solver needs.

    Attributes:
        num_layers: decoder layers of the language model.
        visual_tokens: placeholder slots of the item in the LLM input (576 for a LLaVA-1.5 image;
            frames x tokens per frame for a video; tiles, unpadding and newline tokens included for
            an anyres image).
        grid: patch grid ``(rows, cols)`` of one unit (a frame, or the image's base tile).
        has_cls: each unit's vision tokens start with a CLS token (index 0).
        units: how many units the item has (frames of a video; 1 for an image). Vision stages run
            per unit with ``llm_input // units`` tokens each, so a vision stage's token count is a
            multiple of ``units``.
        modality: ``"image"`` or ``"video"``.
        trailing: structural slots after the last unit (LLaVA-OneVision's newline after a video).
        rope: ``"1d"`` (one position per token) or ``"mrope"`` (Qwen-VL's 3-D time/row/column
            positions, under which kept tokens must keep their positions).
        encoder_depth: layers (blocks) of the vision tower that encoded it; 0 where unknown.

    >>> Geometry(32, 576, (24, 24), True).unit_tokens
    576
    """

    num_layers: int
    visual_tokens: int
    grid: tuple[int, int]
    has_cls: bool
    units: int = 1
    modality: str = "image"
    trailing: int = 0
    rope: str = "1d"
    encoder_depth: int = 0

    def __post_init__(self) -> None:
        if self.units < 1 or (self.visual_tokens - self.trailing) % self.units:
            raise ValueError(f"{self.visual_tokens} visual tokens do not split into {self.units} equal units")

    @property
    def unit_tokens(self) -> int:
        """Placeholder slots of one unit (a frame)."""
        return (self.visual_tokens - self.trailing) // self.units

    @property
    def patches(self) -> int:
        """Patches of one unit's grid (CLS excluded)."""
        return self.grid[0] * self.grid[1]
