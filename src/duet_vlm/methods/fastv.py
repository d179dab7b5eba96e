"""FastV (Chen et al., ECCV 2024): "An Image is Worth 1/2 Tokens After Layer 2"."""

from __future__ import annotations

from dataclasses import dataclass


from .registry import register_method
from .stages import LastTokenAttention  # noqa: F401 - shared with HoliTom, re-exported
from .shapes import DEFAULT_RATIO, PruneOnceAfterLayer, fastv_keep  # noqa: F401 - shared with DART, re-exported


@register_method("fastv")
@dataclass
class FastV(PruneOnceAfterLayer):
    """FastV (Chen et al., ECCV 2024): drop visual tokens once, after decoder layer ``layer``.

    Layers ``0 .. layer-1`` see every visual token; from ``layer`` on only the ``keep`` tokens the
    last prompt token attended to most in layer ``layer - 1`` remain. Kept tokens keep their original
    RoPE positions (``positions="original"``), as in FastV's in-place code.

    Args:
        budget: average visual tokens per decoder layer per image. With ``layer=2`` on 32 layers
            and 576 tokens, 192 / 128 / 64 keep 166 / 98 / 30 tokens from layer 2 on.
        layer: ``K``, the number of decoder layers that run on all tokens (paper default 2).
        keep: explicit number of visual tokens kept from ``layer`` on; overrides the solver.
        ratio: explicit kept fraction of the LLM-input tokens (``1 - R`` in the paper); overrides the
            solver. Inside a ``Compose`` without ``keep`` or ``ratio`` the paper's 0.5 is used.
        positions: ``"original"`` (FastV) or ``"contiguous"`` (refused under M-RoPE).

    >>> reducer = FastV(budget=128)                               # doctest: +SKIP
    >>> with reducer(model): model.generate(**inputs)             # doctest: +SKIP
    >>> reducer.stats.tokens_per_layer[:3]                        # doctest: +SKIP
    [576, 576, 98]
    """

    def language_stage(self) -> LastTokenAttention:
        return LastTokenAttention()
