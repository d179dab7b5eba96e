"""A pruning boundary in the prefill: the language stages choose, and the sequence is compacted.

Items pruned at a boundary with the same plan and the same current count are ranked in one stage
call; each call sees its segment's ``LayerView`` of its rows (``stage_view``). The survivors define
a ``Compaction`` of the previous segment's sequence, which gives the next segment its hidden states,
mask, positions and RoPE.
"""

from __future__ import annotations

import torch
from torch import nn

from ..compaction import Compaction
from ..plan import Plan, Selection
from .binding import Binding
from .inputs import LayerInputs
from .stage_view import stage_view
from .state import Placement, PrefillState, Segment


def stage_calls(layer_index: int, placements: list[Placement], batch: int):
    """The language-stage calls of one boundary: ``(rows or None, [placements], keep)``.

    When every row holds the same sequence of items pruned here the call covers the whole batch
    (``rows=None``); otherwise each row is called alone, which is what a row run alone computes.
    """
    plans: list[Plan] = []  # distinct plans, by identity: a call ranks items of one plan

    def plan_key(plan: Plan) -> int:
        index = next((i for i, known in enumerate(plans) if known is plan), None)
        if index is None:
            plans.append(plan)
            index = len(plans) - 1
        return index

    per_row: dict[int, list[tuple]] = {}
    for placement in placements:
        keep = placement.item.prunes_at(layer_index)
        if keep is None:
            continue
        key = (plan_key(placement.item.plan), len(placement.positions), keep)
        per_row.setdefault(placement.item.row, []).append((key, placement))
    if not per_row:
        return []
    signatures = [tuple(key for key, _ in per_row.get(b, [])) for b in range(batch)]
    calls = []
    if all(s == signatures[0] for s in signatures):
        for key in dict.fromkeys(signatures[0]):
            chosen = [placement for b in range(batch) for k, placement in per_row[b] if k == key]
            calls.append((None, chosen, key[2]))
        return calls
    for b, entries in per_row.items():
        for key in dict.fromkeys(k for k, _ in entries):
            calls.append(([b], [placement for k, placement in entries if k == key], key[2]))
    return calls


def drops_all(keep: int) -> bool:
    """Whether a stage call keeping ``keep`` tokens of each item need not run: with none kept, every
    token goes whatever the stage would score or merge (DUET's last boundary, ratio 0.0)."""
    return keep == 0


def select(binding: Binding, call, state: PrefillState, layer_index: int, layer: nn.Module, hidden: torch.Tensor,
           previous: Segment):
    """Run the language stages of this boundary. Returns ``hidden`` with any recycled states written
    in, and per placement the indices (into its positions) that survive."""
    batch = hidden.shape[0]
    kept_ids: dict[Placement, torch.Tensor] = {}
    replacements: list[tuple[Placement, torch.Tensor, torch.Tensor]] = []  # (placement, kept, states)
    for rows, placements, keep in stage_calls(layer_index, previous.placements, batch):
        if drops_all(keep):  # no view built, nothing scored
            for placement in placements:
                kept_ids[placement] = placement.positions.new_empty(0)
            continue
        row_list = rows if rows is not None else list(range(batch))
        view = stage_view(previous, state, binding.adapter, layer_index, layer, hidden, row_list, placements)
        plan = placements[0].item.plan
        call.in_stage = True
        try:
            selection = plan.language.select(view, keep)
        finally:
            call.in_stage = False
        if not isinstance(selection, Selection):
            selection = Selection(selection)
        kept = selection.index
        items_per_row, n_visual = view.visual_index.shape[1:]
        if kept.shape != (len(row_list), items_per_row, keep) or (keep and (kept.min() < 0 or kept.max() >= n_visual)):
            raise RuntimeError(f"{type(plan.language).__name__}.select returned invalid indices {tuple(kept.shape)}")
        if selection.hidden_states is None:
            kept = kept.sort(dim=-1).values
        elif (kept.diff(dim=-1) <= 0).any():
            raise RuntimeError("a Selection with hidden_states must list its indices in ascending order")
        for i, placement in enumerate(placements):
            r, j = divmod(i, items_per_row)
            kept_ids[placement] = kept[r, j]
            if selection.hidden_states is not None:
                replacements.append((placement, kept[r, j], selection.hidden_states[r, j]))
    for placement, _, states in replacements:
        placement.item.recycled[layer_index] = states
    return recycle(hidden, replacements), kept_ids


def recycle(hidden: torch.Tensor, replacements) -> torch.Tensor:
    """``hidden`` with recycled states written into kept slots: ``(placement, kept, states)``."""
    for placement, kept, states in replacements:
        positions = placement.positions[kept]
        hidden = hidden.index_put((torch.full_like(positions, placement.item.row), positions), states.to(hidden.dtype))
    return hidden


def reuse(state: PrefillState, layer_index: int, hidden: torch.Tensor, previous: Segment):
    """The selection of the prefill this one extends (``state.reference``), item by item: the same
    tokens survive and the same recycled states fill their slots, so generating without a cache
    equals generating with one (where the prefill chose once)."""
    reference, rows = state.reference
    theirs = reference.segments[state.segment_of_layer(layer_index)].placements
    index_of = {(item.row, item.source.start): k for k, item in enumerate(reference.items)}
    kept_ids, replacements = {}, []
    for placement in previous.placements:
        if placement.item.prunes_at(layer_index) is None:
            continue
        k = index_of[(rows[placement.item.row], placement.item.source.start)]
        kept = torch.searchsorted(placement.ids, theirs[k].ids.to(placement.ids.device))
        kept_ids[placement] = kept
        recycled = reference.items[k].recycled.get(layer_index)
        if recycled is not None:
            replacements.append((placement, kept, recycled))
    return recycle(hidden, replacements), kept_ids


def prune(binding: Binding, call, state: PrefillState, layer_index: int, layer: nn.Module,
          hidden: torch.Tensor) -> torch.Tensor:
    """Choose the survivors of boundary ``layer_index`` and return the next segment's hidden states;
    the segment (its compaction, placements, mask, positions, RoPE) is stored in ``state.segments``.

    A backward pass that recomputes this layer (gradient checkpointing) computes the same segment
    again and replaces it."""
    number = state.segment_of_layer(layer_index)
    previous = state.segments[number - 1]
    if state.reference is not None:
        hidden, kept_ids = reuse(state, layer_index, hidden, previous)
    else:
        hidden, kept_ids = select(binding, call, state, layer_index, layer, hidden, previous)
    survivors = torch.ones(hidden.shape[:2], dtype=torch.bool, device=hidden.device)
    if previous.steps.pad is not None:
        survivors &= ~previous.steps.pad
    for placement in previous.placements:
        chosen = kept_ids.get(placement)
        if chosen is not None:
            survivors[placement.item.row, placement.positions] = False
            survivors[placement.item.row, placement.positions[chosen]] = True
    local = Compaction.from_keep(survivors, source_pad=previous.steps.pad)
    position_ids, rope_positions = state.numbering.after_boundary(
        previous.inputs.position_ids, previous.inputs.rope_positions, local
    )
    hidden = local.gather(hidden)
    steps = previous.steps.then(local)
    rank = local.rank()
    placements = []
    for placement in previous.placements:
        chosen = kept_ids.get(placement)
        positions, ids = (placement.positions, placement.ids) if chosen is None else (
            placement.positions[chosen], placement.ids[chosen]
        )
        placements.append(Placement(placement.item, rank[placement.item.row, positions], ids))
    valid = steps.valid(state.tokens.valid)
    types = None if state.tokens.types is None else steps.gather(state.tokens.types)
    entry = state.segments[0]
    unpadded = steps.pad is None and previous.steps.pad is None and entry.steps.pad is None
    masks = binding.scheme.segment_masks(hidden, valid, types, entry.inputs.masks, steps.index if unpadded else None)
    inputs = LayerInputs(position_ids, rope_positions, binding.scheme.rope(hidden, rope_positions), masks)
    segment = Segment(steps, placements, inputs)
    if number < len(state.segments):
        state.segments[number] = segment
    else:
        state.segments.append(segment)
    return hidden
