"""One step of a prefill's token reduction, as a value: which positions of a sequence survive.

A prefill under a reducer is a chain of compactions: the full input becomes the language model's
input (a vision stage left fewer slots), each pruning boundary shortens that sequence again, and at
the end the kept states are scattered back to the input's length for the logits. Rows of a batch
may keep different counts; a compacted batch is then left-padded (the convention of ``generate``),
and ``pad`` marks the alignment slots, which are not tokens of their row.

>>> keep = torch.tensor([[True, False, True, True], [False, True, True, False]])
>>> step = Compaction.from_keep(keep)
>>> step.index.tolist(), step.pad.tolist()
([[0, 2, 3], [0, 1, 2]], [[False, False, False], [True, False, False]])
>>> step.gather(torch.arange(8).view(2, 4)).tolist()
[[0, 2, 3], [4, 5, 6]]
>>> step.scatter(step.gather(torch.arange(8).view(2, 4) + 1)).tolist()
[[1, 0, 3, 4], [0, 6, 7, 0]]
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Compaction:
    """The positions of a ``(B, L)`` source sequence that survive, as a left-padded index.

    Attributes:
        keep: ``(B, L)`` True where a source position survives.
        index: ``(B, L')`` for each slot of the compacted sequence, its source position (0 on pads).
        pad: ``(B, L')`` True on the left-padding slots added to align rows that kept fewer
            positions; ``None`` when every row kept the same number.
        source_pad: ``(B, L)`` alignment pads of the source sequence (neither kept nor dropped
            tokens: renumbering does not count them); ``None`` when it had none.
    """

    keep: torch.Tensor
    index: torch.Tensor
    pad: torch.Tensor | None
    source_pad: torch.Tensor | None = None

    @classmethod
    def from_keep(cls, keep: torch.Tensor, source_pad: torch.Tensor | None = None) -> "Compaction":
        """The compaction keeping ``keep`` (``(B, L)`` bool); ``source_pad`` positions must not be kept.

        >>> Compaction.from_keep(torch.tensor([[True, True, False]])).index.tolist()
        [[0, 1]]
        """
        batch = keep.shape[0]
        # Each row's kept positions in order, row after row. Where every row kept the same count
        # (one row always) that is the index itself, with no pads: four tensor operations instead
        # of a dozen, which a boundary inside the forward pays at tens of microseconds each.
        kept = torch.arange(keep.shape[1], device=keep.device).expand_as(keep).masked_select(keep)
        counts = None if batch == 1 else keep.sum(dim=1)
        width = kept.numel() if counts is None else (int(counts.max()) if batch else 0)
        if kept.numel() == width * batch:
            return cls(keep, kept.view(batch, width), None, source_pad)
        lead = width - counts  # alignment pads each row needs
        rows, positions = keep.nonzero(as_tuple=True)
        slot = (keep.long().cumsum(dim=1) - 1 + lead[:, None])[rows, positions]
        index = torch.zeros(keep.shape[0], width, dtype=torch.long, device=keep.device)
        index[rows, slot] = positions
        pad = None
        if bool((lead > 0).any()):
            pad = torch.arange(width, device=keep.device)[None, :] < lead[:, None]
        return cls(keep, index, pad, source_pad)

    @classmethod
    def identity(cls, batch: int, length: int, device=None) -> "Compaction":
        """Every position kept."""
        return cls.from_keep(torch.ones(batch, length, dtype=torch.bool, device=device))

    def output_identity(self) -> "Compaction":
        """The identity on this compaction's output sequence: every slot kept where it is, the
        alignment pads staying pads. The first link of the chain of a sequence's own compactions.

        >>> step = Compaction.from_keep(torch.tensor([[True, True], [False, True]]))
        >>> step.output_identity().then(step.output_identity()).index.tolist()
        [[0, 1], [0, 1]]
        """
        index = torch.arange(self.length, device=self.index.device).expand(self.batch, -1)
        keep = torch.ones_like(index, dtype=torch.bool) if self.pad is None else ~self.pad
        return Compaction(keep, index, self.pad, self.pad)

    @property
    def batch(self) -> int:
        return self.index.shape[0]

    @property
    def length(self) -> int:
        """``L'``: slots of the compacted sequence, alignment pads included."""
        return self.index.shape[1]

    @property
    def source_length(self) -> int:
        return self.keep.shape[1]

    @property
    def is_identity(self) -> bool:
        """Every source position survives in place (no pads, nothing dropped)."""
        return self.pad is None and self.length == self.source_length

    def present(self) -> torch.Tensor:
        """``(B,)`` kept positions of each row (its alignment pads are not counted)."""
        if self.pad is None:
            return torch.full((self.batch,), self.length, device=self.index.device)
        return (~self.pad).sum(dim=1)

    def rank(self) -> torch.Tensor:
        """``(B, L)``: the slot each kept source position takes in the compacted sequence
        (meaningless at dropped positions)."""
        offset = self.pad.sum(dim=1, keepdim=True) if self.pad is not None else 0
        return self.keep.long().cumsum(dim=1) - 1 + offset

    def dropped_before(self) -> torch.Tensor:
        """``(B, L')``: for each slot, the source tokens dropped at or before its position (source
        pads are not tokens), i.e. how far renumbering moves it back."""
        dropped = ~self.keep if self.source_pad is None else ~self.keep & ~self.source_pad
        return dropped.long().cumsum(dim=1).gather(1, self.index)

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """``(B or 1, L, ...)`` -> ``(B, L', ...)`` along the sequence axis (pads read position 0)."""
        x = x.expand(self.batch, *x.shape[1:])
        index = self.index.view(*self.index.shape, *([1] * (x.dim() - 2))).expand(-1, -1, *x.shape[2:])
        return x.gather(1, index)

    def gather_positions(self, positions: torch.Tensor | None) -> torch.Tensor | None:
        """``(..., B or 1, L)`` position ids (1-D, or M-RoPE's axes first) gathered along their last axis."""
        if positions is None:
            return None
        lead = positions.shape[:-2]
        positions = positions.expand(*lead, self.batch, -1)
        return positions.gather(-1, self.index.expand(*lead, -1, -1))

    def gather_mask(self, mask: torch.Tensor) -> torch.Tensor:
        """A ``(B, L)`` 2-D attention mask of the source, compacted; pads are masked out."""
        mask = mask.gather(1, self.index)
        return mask.masked_fill(self.pad, 0) if self.pad is not None else mask

    def valid(self, source_valid: torch.Tensor) -> torch.Tensor:
        """``(B, L')`` bool: the source's valid (non-padding) flags at the kept slots, False on pads."""
        valid = source_valid.gather(1, self.index)
        return valid & ~self.pad if self.pad is not None else valid

    def without_pads(self, positions: torch.Tensor) -> torch.Tensor:
        """``positions`` (``(..., B, L')``) with 0 on the alignment pads."""
        return positions.masked_fill(self.pad, 0) if self.pad is not None else positions

    def then(self, step: "Compaction") -> "Compaction":
        """This compaction followed by ``step`` (a compaction of this one's output): one compaction
        of the original source.

        >>> a = Compaction.from_keep(torch.tensor([[True, False, True, True]]))
        >>> a.then(Compaction.from_keep(torch.tensor([[True, False, True]]))).index.tolist()
        [[0, 3]]
        """
        index = self.index.gather(1, step.index)
        keep = torch.zeros_like(self.keep)
        if step.pad is None:  # every slot of ``step`` is a kept token (none of this one's pads)
            return Compaction(keep.scatter_(1, index, True), index, None, self.source_pad)
        present = ~step.pad
        rows = torch.arange(self.batch, device=index.device)[:, None].expand_as(index)
        keep[rows[present], index[present]] = True
        return Compaction(keep, index, step.pad, self.source_pad)

    def scatter(self, x: torch.Tensor, fill: float = 0) -> torch.Tensor:
        """``(B, L', ...)`` -> ``(B, L, ...)``: each slot back at its source position; dropped
        positions hold ``fill`` and alignment pads are discarded."""
        return self.scatter_to(x, self.index, fill)

    def next_slots(self) -> torch.Tensor:
        """``(B, L')``: for each slot, the source position just before the next kept one (the last
        kept slot: the source's last position). A causal model's state at a kept token predicts the
        next kept token; placed there, transformers' shifted loss and ``logits_to_keep`` read it as
        they would read the unreduced model's state."""
        end = torch.full_like(self.index[:, :1], self.source_length - 1)
        return torch.cat([self.index[:, 1:] - 1, end], dim=1)

    def scatter_to(self, x: torch.Tensor, targets: torch.Tensor, fill: float = 0) -> torch.Tensor:
        """``(B, L', ...)`` -> ``(B, L, ...)`` with slot ``j`` written at ``targets[:, j]``; alignment
        pads are discarded (written to a spare position that is cut off)."""
        if self.pad is not None:
            targets = targets.masked_fill(self.pad, self.source_length)
        extra = 0 if self.pad is None else 1
        full = x.new_full((x.shape[0], self.source_length + extra, *x.shape[2:]), fill)
        index = targets.view(*targets.shape, *([1] * (x.dim() - 2))).expand_as(x)
        full.scatter_(1, index, x)  # in place: ``full`` is new, and a copy would be one more (B, L, ...) at the peak
        return full[:, : self.source_length] if extra else full
