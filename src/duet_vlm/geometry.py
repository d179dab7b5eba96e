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
        attention_layers: the decoder layers that compute softmax attention, in a language model
            that mixes layer kinds (Qwen3.5: Gated-DeltaNet linear attention in the others, which
            give no attention scores and keep a fixed-size state, not a per-token KV cache);
            ``None``: every layer. A language stage scores only with these (``boundary_layers``).
        last_boundary: the deepest boundary a reduction may take, in a language model whose later
            layers reuse the keys and values of earlier ones (Gemma 4's KV sharing: from the first
            layer that stores them for sharing on, every layer must see the sequence the storing
            layer saw); ``None``: any layer.

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
    attention_layers: tuple[int, ...] | None = None
    last_boundary: int | None = None

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

    def boundary_layers(self, reads: str | None) -> tuple[int, ...]:
        """The boundaries (counts of layers completed) where a language stage that scores with the
        layer after the boundary (``reads="layer"``), the layer before it (``"previous"``), or no
        layer's attention (``None``) can run. Every boundary lies after the first attention layer:
        that layer sees the whole prompt, as ``generate`` reads the prompt's length from its cache.

        >>> Geometry(8, 16, (4, 4), False, attention_layers=(1, 3, 5, 7)).boundary_layers("layer")
        (3, 5, 7)
        >>> Geometry(8, 16, (4, 4), False, attention_layers=(1, 3, 5, 7)).boundary_layers("previous")
        (2, 4, 6)
        >>> Geometry(8, 16, (4, 4), False, last_boundary=3).boundary_layers("layer")
        (1, 2, 3)
        """
        attention = range(self.num_layers) if self.attention_layers is None else self.attention_layers
        first = min(attention, default=self.num_layers)
        if reads == "layer":
            allowed = [layer for layer in attention if layer > first]
        elif reads == "previous":
            allowed = [layer + 1 for layer in attention]
        else:
            allowed = list(range(first + 1, self.num_layers))
        last = self.num_layers - 1 if self.last_boundary is None else self.last_boundary
        return tuple(layer for layer in allowed if 0 < layer <= last and layer < self.num_layers)

    def snap(self, layers, reads: str | None) -> tuple[int, ...]:
        """``layers`` (a method's default boundaries) moved each to the nearest boundary where its
        stage can score (``boundary_layers``; a tie goes to the earlier layer, which leaves more
        budgets reachable), duplicates merged. Unchanged when every layer is an attention layer and
        any layer may take a boundary, or when no boundary can score (the plan is then refused with
        the reason: ``check_boundaries``).

        >>> Geometry(8, 16, (4, 4), False, attention_layers=(1, 3, 5, 7)).snap((4, 6), "layer")
        (3, 5)
        >>> Geometry(8, 16, (4, 4), False, last_boundary=3).snap((2, 4, 6), "previous")
        (2, 3)
        """
        if self.attention_layers is None and self.last_boundary is None:
            return tuple(layers)
        allowed = self.boundary_layers(reads)
        if not allowed:
            return tuple(layers)
        return tuple(sorted({min(allowed, key=lambda b: (abs(b - layer), b)) for layer in layers}))
