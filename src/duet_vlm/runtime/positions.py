"""Position handling, one strategy per scheme, each answering the same three questions: the
positions at the language model's entry, after a pruning boundary, and for a decoding step.

- ``Renumbered`` (1-D RoPE, ``positions="contiguous"``, the references of DUET, PyramidDrop,
  SparseVLM and PIO): kept tokens are renumbered after every drop, as if the prompt had been
  shorter; a decoding step's position moves back by what its layer segment dropped, so each layer's
  RoPE position is the length of its own cache.
- ``Original`` (1-D RoPE, ``positions="original"``, FastV): kept tokens keep their positions; a
  decoding step is numbered as the unreduced model numbers it, and only the mask changes.
- ``MultiAxis`` (M-RoPE: Qwen-VL's time/row/column positions): as ``Original``, on every axis;
  renumbering has no sound meaning there and is refused.

A strategy holds no state; the prefill's bookkeeping (``Compaction``s) is passed in.
"""

from __future__ import annotations

import torch

from ..compaction import Compaction


class Original:
    """Kept tokens keep the positions the unreduced model gives them."""

    name = "original"

    def at_entry(self, position_ids: torch.Tensor | None, entry: Compaction) -> torch.Tensor | None:
        """What the language model receives: the kept tokens' own positions (``(B, L)``, or
        M-RoPE's ``(3 or 4, B, L)``), 0 on alignment pads."""
        if position_ids is None:
            position_ids = torch.arange(entry.source_length, device=entry.index.device)[None]
        return entry.without_pads(entry.gather_positions(position_ids))

    def after_boundary(
        self, position_ids: torch.Tensor | None, rope_positions: torch.Tensor, step: Compaction
    ) -> tuple[torch.Tensor | None, torch.Tensor]:
        """``(position ids the layers receive, the rotary's input)`` of the survivors of ``step``.
        Under 1-D RoPE both are one tensor (``rope_positions is position_ids``) and stay one."""
        one_d = rope_positions is position_ids
        position_ids = step.gather_positions(position_ids)
        rope = position_ids if one_d else step.gather_positions(rope_positions)
        if step.pad is not None:
            position_ids = step.without_pads(position_ids) if position_ids is not None else None
            rope = position_ids if one_d else step.without_pads(rope)
        return position_ids, rope

    def decode_entry(self, position_ids: torch.Tensor | None, shift: torch.Tensor, unreduced_start: int,
                     new: int, entry: Compaction, dropped: int) -> torch.Tensor | None:
        """A decoding step's positions at the language model's entry: the unreduced numbering
        (``unreduced_start``: the unreduced cache's length) when ``generate`` passed none."""
        if position_ids is None:
            device = entry.index.device
            position_ids = (unreduced_start + torch.arange(new, device=device))[None].expand(entry.batch, -1)
        return position_ids

    def decode_group(self, position_ids: torch.Tensor, entry: Compaction, group: Compaction) -> torch.Tensor | None:
        """A decoding step's positions in a later layer segment; ``None``: the entry's stand."""
        return None


class MultiAxis(Original):
    """M-RoPE (Qwen-VL): every axis of a kept token keeps its position; a merged token takes its
    anchor's slot and so its position. The rotary's input and the layers' ``position_ids`` (the
    text row, or ``None``) are gathered separately (``ModelAdapter.split_positions``)."""

    name = "original"


class Renumbered:
    """Kept tokens are renumbered after every drop (1-D RoPE only)."""

    name = "contiguous"

    def at_entry(self, position_ids: torch.Tensor | None, entry: Compaction) -> torch.Tensor | None:
        if position_ids is not None and position_ids.dim() == 3:
            raise ValueError("3-D (M-RoPE) position_ids can only be kept, not renumbered")
        if position_ids is None:
            if entry.pad is None:
                return None  # the decoder numbers the shorter sequence 0..L-1 itself
            position_ids = torch.arange(entry.source_length, device=entry.index.device)[None]
        return entry.without_pads(entry.gather_positions(position_ids) - entry.dropped_before())

    def after_boundary(
        self, position_ids: torch.Tensor | None, rope_positions: torch.Tensor, step: Compaction
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if rope_positions is not position_ids:
            raise ValueError("multi-axis (M-RoPE) positions cannot be renumbered")
        # Each survivor moves back by the tokens dropped before it (alignment pads are not tokens).
        position_ids = step.without_pads(step.gather_positions(position_ids) - step.dropped_before())
        return position_ids, position_ids

    def decode_entry(self, position_ids: torch.Tensor | None, shift: torch.Tensor, unreduced_start: int,
                     new: int, entry: Compaction, dropped: int) -> torch.Tensor | None:
        """``shift``: ``(B,)`` tokens each row dropped at the entry; ``dropped``: the same as a
        Python int when no row has alignment pads (no device sync under torch.compile)."""
        if position_ids is None and entry.pad is not None:
            device = entry.index.device
            position_ids = (unreduced_start + torch.arange(new, device=device))[None].expand(entry.batch, -1)
        if position_ids is None:
            return None
        return position_ids - shift[:, None] if entry.pad is not None else position_ids - dropped

    def decode_group(self, position_ids: torch.Tensor, entry: Compaction, group: Compaction) -> torch.Tensor:
        if group.pad is None and entry.pad is None:
            return position_ids - (entry.length - group.length)
        return position_ids - (entry.present() - group.present())[:, None]


def scheme(mode: str, rope: str) -> Original | Renumbered:
    """The strategy for a resolved position mode on a model with ``rope`` (``"1d"`` or ``"mrope"``)."""
    if mode == "contiguous":
        return Renumbered()
    return MultiAxis() if rope == "mrope" else Original()
