"""A pruning boundary in the prefill: the language stages choose, and the sequence is compacted.

Items pruned at a boundary with the same plan and the same current count are ranked in one stage
call; each call sees a ``LayerView`` of its rows. The survivors define a ``Compaction`` of the
previous group's sequence, which gives the next group its hidden states, mask, positions and RoPE.
"""

from __future__ import annotations

import torch
from torch import nn

from ..compaction import Compaction
from ..plan import LayerView, Selection
from .binding import Binding
from .masks import causal_mask, gather_mask
from .prefill import Group, ItemState, Prompt


def stage_calls(layer_index: int, states: list[ItemState], batch: int):
    """The language-stage calls of one boundary: ``(rows or None, [item states], keep)``.

    When every row holds the same sequence of items pruned here the call covers the whole batch
    (``rows=None``); otherwise each row is called alone, which is what a row run alone computes.
    """
    per_row: dict[int, list[tuple]] = {}
    for state in states:
        keep = dict(state.plan.schedule.boundaries).get(layer_index)
        if keep is None:
            continue
        key = (id(state.plan), len(state.positions), keep)
        per_row.setdefault(state.item.row, []).append((key, state))
    if not per_row:
        return []
    signatures = [tuple(key for key, _ in per_row.get(b, [])) for b in range(batch)]
    calls = []
    if all(s == signatures[0] for s in signatures):
        for key in dict.fromkeys(signatures[0]):
            chosen = [state for b in range(batch) for k, state in per_row[b] if k == key]
            calls.append((None, chosen, key[2]))
        return calls
    for b, entries in per_row.items():
        for key in dict.fromkeys(k for k, _ in entries):
            calls.append(([b], [state for k, state in entries if k == key], key[2]))
    return calls


def run_layer(layer: nn.Module, hidden: torch.Tensor, group: Group) -> torch.Tensor:
    """``layer`` on ``hidden`` with ``group``'s mask and positions, outside the KV cache.

    A stage's own extra pass (PIO's proxy loss, a scoring probe), not one of the model's layer
    calls: ``forward`` directly, so module hooks (transformers' output recorder for
    ``output_hidden_states``/``output_attentions``) do not count it as a layer's output."""
    output = layer.forward(
        hidden,
        attention_mask=group.attention_mask,
        position_ids=group.position_ids,
        position_embeddings=group.position_embeddings,
        past_key_values=None,
        use_cache=False,
    )
    return output[0] if isinstance(output, tuple) else output


def output_head(binding: Binding, hidden: torch.Tensor) -> torch.Tensor:
    adapter = binding.adapter
    if adapter.lm_head is None:
        raise RuntimeError("this model has no LM head (attach the reducer to the ...ForConditionalGeneration)")
    return adapter.lm_head(adapter.final_norm(hidden))


def layer_view(binding: Binding, prompt: Prompt, layer_index: int, layer: nn.Module, hidden: torch.Tensor,
               group: Group, rows: list[int], states: list[ItemState]) -> LayerView:
    """What a language stage sees: the whole batch, or only ``rows`` (a row ranked alone)."""
    whole = len(rows) == hidden.shape[0]
    select = slice(None) if whole else torch.tensor(rows, device=hidden.device)

    def take(x):  # the rows of this call from a (B, ...) tensor; batch-1 broadcasts stay
        return x if x is None or whole or x.shape[0] == 1 else x[select]

    steps = group.steps
    text_after = []
    for b in rows:
        present = steps.index[b] if steps.pad is None else steps.index[b][~steps.pad[b]]
        offset = 0 if steps.pad is None else int(steps.pad[b].sum())
        text_after.append(torch.searchsorted(present.contiguous(), prompt.text_after_image[b].contiguous()) + offset)
    cos, sin = group.position_embeddings
    call_group = Group(
        steps, [], position_ids=take(group.position_ids),
        position_embeddings=(take(cos), take(sin)), attention_mask=take(group.attention_mask),
    )
    visual_index = torch.stack([s.positions for s in states]).view(len(rows), len(states) // len(rows), -1)
    visual_ids = torch.stack([s.ids for s in states]).view(visual_index.shape)
    # Per-prompt memory of a stage (e.g. SparseVLM's raters), one per call: rows and items.
    scratch = prompt.scratch.setdefault((tuple(rows), tuple((s.item.row, s.item.start) for s in states)), {})
    previous_input = prompt.boundary_inputs.get(layer_index, prompt.last_layer_input)
    return LayerView(
        layer_index=layer_index,
        layer=layer,
        hidden_states=take(hidden),
        position_embeddings=call_group.position_embeddings,
        visual_index=visual_index,
        visual_ids=visual_ids,
        valid=take(steps.valid(prompt.valid)),
        input_ids=take(steps.gather(prompt.input_ids)),
        input_embeddings=None if prompt.input_embeddings is None else take(steps.gather(prompt.input_embeddings)),
        text_after_image=text_after,
        previous_layer=binding.adapter.layers[layer_index - 1],
        previous_hidden_states=take(previous_input),
        scratch=scratch,
        attention_fn=binding.adapter.text_to_visual_attention,
        run_layer_fn=lambda module, hidden_, index: prompt.with_layer_features(
            run_layer(module, hidden_, call_group), index, states, None if whole else list(rows)
        ),
        output_head_fn=lambda hidden_: output_head(binding, hidden_),
        final_norm_fn=binding.adapter.final_norm,
        keys_fn=binding.adapter.layer_keys,
    )


def select(binding: Binding, call, prompt: Prompt, layer_index: int, layer: nn.Module, hidden: torch.Tensor,
           previous: Group):
    """Run the language stages of this boundary. Returns ``hidden`` with any recycled states written
    in, and per item state (by ``id``) the indices (into its positions) that survive."""
    batch = hidden.shape[0]
    kept_ids: dict[int, torch.Tensor] = {}
    replacements: list[tuple[int, torch.Tensor, torch.Tensor]] = []  # (row, positions, states)
    for rows, states, keep in stage_calls(layer_index, previous.items, batch):
        row_list = rows if rows is not None else list(range(batch))
        view = layer_view(binding, prompt, layer_index, layer, hidden, previous, row_list, states)
        plan = states[0].plan
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
        for i, state in enumerate(states):
            r, j = divmod(i, items_per_row)
            kept_ids[id(state)] = kept[r, j]
            if selection.hidden_states is not None:
                replacements.append((state, kept[r, j], selection.hidden_states[r, j]))
    order = {id(state): index for index, state in enumerate(previous.items)}
    recycled = prompt.recycled.setdefault(layer_index, {})
    for state, kept, states in replacements:
        recycled[order[id(state)]] = states
    return recycle(hidden, replacements), kept_ids


def recycle(hidden: torch.Tensor, replacements) -> torch.Tensor:
    """``hidden`` with recycled states written into kept slots: ``(item state, kept, states)``."""
    for state, kept, states in replacements:
        positions = state.positions[kept]
        hidden = hidden.index_put((torch.full_like(positions, state.item.row), positions), states.to(hidden.dtype))
    return hidden


def reuse(prompt: Prompt, layer_index: int, hidden: torch.Tensor, previous: Group):
    """The selection of the prefill this one extends (``prompt.reference``), item by item: the same
    tokens survive and the same recycled states fill their slots, so generating without a cache
    equals generating with one (where the prefill chose once)."""
    reference, rows = prompt.reference
    theirs = reference.groups[prompt.group_of_layer(layer_index)].items
    index_of = {(item.row, item.start): k for k, item in enumerate(reference.items)}
    recycled = reference.recycled.get(layer_index, {})
    kept_ids, replacements = {}, []
    for state in previous.items:
        if dict(state.plan.schedule.boundaries).get(layer_index) is None:
            continue
        k = index_of[(rows[state.item.row], state.item.start)]
        kept = torch.searchsorted(state.ids, theirs[k].ids.to(state.ids.device))
        kept_ids[id(state)] = kept
        if k in recycled:
            replacements.append((state, kept, recycled[k]))
    return recycle(hidden, replacements), kept_ids


def prune(binding: Binding, call, prompt: Prompt, layer_index: int, layer: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """Choose the survivors of boundary ``layer_index`` and return the next group's hidden states;
    the group (its compaction, items, mask, positions, RoPE) is stored in ``prompt.groups``.

    A backward pass that recomputes this layer (gradient checkpointing) computes the same group
    again and replaces it."""
    number = prompt.group_of_layer(layer_index)
    previous = prompt.groups[number - 1]
    if prompt.reference is not None:
        hidden, kept_ids = reuse(prompt, layer_index, hidden, previous)
    else:
        hidden, kept_ids = select(binding, call, prompt, layer_index, layer, hidden, previous)
    survivors = torch.ones(hidden.shape[:2], dtype=torch.bool, device=hidden.device)
    if previous.steps.pad is not None:
        survivors &= ~previous.steps.pad
    for state in previous.items:
        chosen = kept_ids.get(id(state))
        if chosen is not None:
            survivors[state.item.row, state.positions] = False
            survivors[state.item.row, state.positions[chosen]] = True
    local = Compaction.from_keep(survivors, source_pad=previous.steps.pad)
    position_ids, rope_positions = prompt.positions.after_boundary(previous.position_ids, previous.rope_positions, local)
    hidden = local.gather(hidden)
    steps = previous.steps.then(local)
    rank = local.rank()
    states = []
    for state in previous.items:
        chosen = kept_ids.get(id(state))
        positions, ids = (state.positions, state.ids) if chosen is None else (state.positions[chosen], state.ids[chosen])
        states.append(ItemState(state.item, state.plan, rank[state.item.row, positions], ids))
    entry = prompt.groups[0]
    if steps.pad is None and previous.steps.pad is None and entry.steps.pad is None:
        mask = gather_mask(entry.attention_mask, steps.index, steps.index)
    else:
        mask = causal_mask(binding.text_config, hidden, steps.valid(prompt.valid), query_length=steps.length)
    group = Group(
        steps, states, position_ids, rope_positions,
        position_embeddings=binding.adapter.rotary_emb(hidden, rope_positions), attention_mask=mask,
    )
    if number < len(prompt.groups):
        prompt.groups[number] = group
    else:
        prompt.groups.append(group)
    return hidden
