"""The language model's exit in a prefill: states back at the input's length, and a compact LM head.

The kept token ``j`` predicts kept token ``j + 1`` of the reduced sequence; its state is placed just
before that token's original slot (``Compaction.next_slots``), so transformers' shifted loss and
``logits_to_keep`` read it where they read the unreduced model's state. Dropped slots hold zeros.
A full forward (training, scoring) would run the LM head on every position, though dropped ones
only hold zeros: the head runs on the kept states alone and its logits are put where they were.
"""

from __future__ import annotations

import torch

from .inputs import check_last_kept
from .state import PrefillState


def finish_prefill(prompt: PrefillState, output):
    """Scatter the last segment's states back to the input's length. Returns ``(output or None, the
    slots the states went to, or None)``; the latter lets the LM head run on those rows alone."""
    hidden = output.last_hidden_state
    final = prompt.entry.then(prompt.segments[-1].steps)  # full input -> the last segment's sequence
    if final.is_identity:
        return None, None
    if hidden.shape[1] != final.length:
        # The model computed only the last ``logits_to_keep`` tokens (Gemma 4's KV-shared layers):
        # they are the input's last, which the unpatched model returns too.
        check_last_kept(final, hidden.shape[1], prompt.full_length)
        return None, None
    targets = final.next_slots()
    output.last_hidden_state = final.scatter_to(hidden, targets)
    return output, (targets if final.pad is None else None)


def compact_head_input(prompt: PrefillState, rows: torch.Tensor, args: tuple) -> tuple | None:
    """The LM head's input reduced to the kept states' slots (unless ``logits_to_keep`` sliced it)."""
    if args[0].shape[1] != prompt.full_length:
        return None
    index = rows.unsqueeze(-1).expand(-1, -1, args[0].shape[-1])
    return (args[0].gather(1, index), *args[1:])


def expand_head_output(prompt: PrefillState, rows: torch.Tensor, head, output: torch.Tensor) -> torch.Tensor:
    """The compact head's logits at their slots; other slots get what the head gives a zero state."""
    full = output.new_zeros(output.shape[0], prompt.full_length, output.shape[-1])
    if getattr(head, "bias", None) is not None:
        full = full + head.bias.to(full.dtype)
    # In place: ``full`` is this call's own, and a copy would be one more (B, L, vocabulary) at the peak.
    return full.scatter_(1, rows.unsqueeze(-1).expand_as(output), output)
