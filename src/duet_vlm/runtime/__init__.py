"""Applies a method's ``Plan`` to a model through module hooks. Knows no particular method or family.

The unit of work is the **visual item**: one image (all its tiles and newline tokens) or one video
(all its frames) in one row. The family adapter finds the items of a batch; each item gets the plan
its method solves for the item's own geometry, so rows of a batch may hold items of different sizes
and kinds. One prefill is a chain of compactions (``duet_vlm.compaction``): the full input becomes
the language model's entry sequence (``prefill``), each pruning boundary shortens it (``boundary``),
and the kept states go back to the input's length for the logits (``exit``). Decoding steps attend
over each layer segment's own cache (``decoding``). Positions follow one strategy per scheme
(``positions``); masks and RoPE per layer kind come from the family's ``LayerScheme``
(``duet_vlm.adapters.scheme``). What a call computes lives in that call's state (``calls``), so threads may share
an attached model. ``attachment`` alone registers hooks.
"""

from .attachment import Attachment, attach
from ..adapters.scheme import gather_mask
from .protocol import RuntimeReducer

__all__ = ["Attachment", "RuntimeReducer", "attach", "gather_mask"]
