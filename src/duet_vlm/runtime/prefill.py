"""A prefill's bookkeeping: the language model's entry, its layer groups, and where items sit.

At the language model's entry the items' vision stages run (``vision.reduce_vision``) and the
slots they left empty are compacted away (``Prompt.entry``: full input -> entry sequence). Each
pruning boundary then compacts the entry sequence further (``Group.steps``); decoder layers between
two boundaries see one group's sequence, mask, positions and RoPE. The prompt stays with its call
for the decoding steps that follow.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..adapters import Capture, VisualItem
from ..compaction import Compaction
from ..plan import Plan
from .binding import Binding
from .guards import check_prefill, reads_text
from .positions import Original, Renumbered, scheme
from .taps import same_encoding
from .vision import EntryChoice, item_views, reduce_vision, take_additions


@dataclass
class ItemState:
    """Where one item's surviving visual tokens sit in a group's sequence."""

    item: VisualItem
    plan: Plan
    positions: torch.Tensor  # (n,) positions in the group's sequence of row ``item.row``
    ids: torch.Tensor  # (n,) indices into the item's block at the LLM entry (stable)


@dataclass
class Group:
    """The sequence seen by the decoder layers between two boundaries, during the prefill."""

    steps: Compaction  # entry sequence -> this group's sequence (group 0: the entry's own alignment)
    items: list[ItemState]
    position_ids: torch.Tensor | None = None  # (B, L_g) what decoder layers receive (None: Qwen-VL)
    rope_positions: torch.Tensor | None = None  # (B, L_g), or (3, B, L_g) M-RoPE: the rotary's input
    position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None
    attention_mask: object = None


@dataclass
class Prompt:
    """One prefill's bookkeeping, kept for the decoding steps that follow it."""

    entry: Compaction  # full input -> the language model's entry
    valid: torch.Tensor  # (B, L_entry) False on padding (the user's and alignment pads)
    input_ids: torch.Tensor  # (B, L_entry)
    text_after_image: list[torch.Tensor]  # per row, positions in the entry sequence
    boundaries: list[int]  # union of the items' boundary layers (counts of layers completed)
    positions: Original | Renumbered
    groups: list[Group] = field(default_factory=list)
    decode_kwargs: dict[int, dict] = field(default_factory=dict)
    decode_mask: torch.Tensor | None = None  # the 2-D mask at the LLM entry in the current decoding step
    is_prefill: bool = True
    input_embeddings: torch.Tensor | None = None  # (B, L_entry, D)
    last_layer_input: torch.Tensor | None = None
    # Per boundary layer, the input of the layer before it (what FastV scores with), kept when a
    # backward pass may recompute the boundary (gradient checkpointing) after later layers ran.
    boundary_inputs: dict[int, torch.Tensor] = field(default_factory=dict)
    vision: list[tuple[VisualItem, EntryChoice]] = field(default_factory=list)
    scratch: dict = field(default_factory=dict)
    lm_position_ids: torch.Tensor | None = None  # what the language model received in the prefill
    # DeepStack: per item, (entry slots, layers, D) features added after the first decoder layers.
    additions: dict[int, torch.Tensor] = field(default_factory=dict)
    addition_layers: int = 0
    source_ids: torch.Tensor | None = None  # (B, L) the full input ids
    items: list[VisualItem] = field(default_factory=list)
    # Per boundary layer, per item (its index in ``items``): the states a stage recycled into its
    # kept slots (``Selection.hidden_states``), for a prefill that reuses this one's selection.
    recycled: dict[int, dict[int, torch.Tensor]] = field(default_factory=dict)
    # ``(earlier prompt, its row for each row of this one)``: this prefill extends an earlier one of
    # the same encoding (generate without a cache) and keeps its selection instead of choosing again.
    reference: tuple["Prompt", list[int]] | None = None

    @property
    def full_length(self) -> int:
        return self.entry.source_length

    @property
    def entry_length(self) -> int:
        return self.entry.length

    def release_prefill_state(self) -> None:
        """Drop what only the prefill's layers and stages read (states, masks, RoPE of every group):
        decoding steps need the compactions and the valid flags alone."""
        self.input_embeddings = self.last_layer_input = None
        self.boundary_inputs, self.scratch = {}, {}
        for group in self.groups:
            group.attention_mask = group.position_embeddings = None
            group.position_ids = group.rope_positions = None

    def group_of_layer(self, layer: int) -> int:
        return sum(1 for boundary in self.boundaries if boundary <= layer)

    def with_layer_features(self, hidden: torch.Tensor, layer_index: int, states, rows: list[int] | None = None):
        """``hidden`` (a layer's output) plus the DeepStack features the model adds after that layer,
        at the kept visual tokens of ``states``; ``rows`` are the batch rows ``hidden`` holds (all by
        default). Returns ``hidden`` itself when the layer adds nothing."""
        if layer_index >= self.addition_layers:
            return hidden
        index_rows, positions, values = [], [], []
        for state in states:
            features = self.additions.get(id(state.item))
            if features is not None and (rows is None or state.item.row in rows):
                row = state.item.row if rows is None else rows.index(state.item.row)
                index_rows.append(torch.full_like(state.positions, row))
                positions.append(state.positions)
                values.append(features[state.ids.to(features.device), layer_index])
        if not index_rows:
            return hidden
        index = (torch.cat(index_rows), torch.cat(positions))
        return hidden.index_put(index, hidden[index] + torch.cat(values).to(hidden.dtype))


def extends(reference: Prompt, input_ids: torch.Tensor, items: list[VisualItem]) -> list[int] | None:
    """For each row of ``input_ids``, a row of ``reference`` whose whole input it continues with the
    same items (generate without a cache appends tokens; beams may reorder rows), or ``None``."""
    width = reference.full_length
    if input_ids.shape[1] < width or reference.source_ids.device != input_ids.device:
        return None
    rows = []
    for b in range(input_ids.shape[0]):
        same = (reference.source_ids == input_ids[b, :width]).all(dim=1).nonzero()[:, 0]
        if not len(same):
            return None
        rows.append(int(same[0]))
    for b, r in enumerate(rows):
        mine = [(item.start, item.length) for item in items if item.row == b]
        theirs = [(item.start, item.length) for item in reference.items if item.row == r]
        if mine != theirs:
            return None
    return rows


def positions_mode(plans: list[Plan]) -> str:
    """The batch's position mode. Only plans that drop tokens renumber anything; an item left whole
    has no say."""
    modes = {plan.positions for plan in plans if not plan.schedule.is_identity} or {"contiguous"}
    if len(modes) > 1:
        raise ValueError(f"the items of one batch resolved to different position modes: {sorted(modes)}")
    return modes.pop()


def item_plans(binding: Binding, items: list[VisualItem], captures, inputs_embeds, signals: dict,
               row_budgets: list | None) -> list[Plan]:
    """Each item's plan: for the budget its row was given (``reducer.per_row``), or the one the
    reducer chooses from the item's own content (``Adaptive``), else the reducer's own."""
    if row_budgets is not None:
        budgets = [row_budgets[item.row] for item in items]
        budgets = [b(item.geometry) if callable(b) else b for b, item in zip(budgets, items)]
    elif binding.reducer.adapts_to_content:
        views = item_views(binding, items, captures, inputs_embeds, signals)
        budgets = [binding.reducer.item_budget(view, item.geometry) for view, item in zip(views, items)]
    else:
        budgets = [None] * len(items)
    return [binding.plan_for(item.geometry, budget) for item, budget in zip(items, budgets)]


def _text_tokens(input_ids: torch.Tensor, items: list[VisualItem], mask, labels) -> torch.Tensor:
    """``(B, L)`` True on each row's text: not visual, not padding, and (with labels) not an answer."""
    text = torch.ones_like(input_ids, dtype=torch.bool)
    for item in items:
        text[item.row, item.start : item.start + item.length] = False
    if isinstance(mask, torch.Tensor) and mask.shape == input_ids.shape:
        text &= mask.bool()
    if labels is not None and labels.shape == input_ids.shape:
        text &= labels.to(text.device) == -100
    return text


def start_prompt(
    binding: Binding,
    input_ids: torch.Tensor,
    labels: torch.Tensor | None,
    kwargs: dict,
    items: list[VisualItem],
    captures: dict[str, Capture],
    reference: tuple[Prompt, list[int]] | None = None,
    row_budgets: list | None = None,
) -> Prompt:
    """Reduce the items at the language model's entry and compact ``kwargs`` (its arguments) in
    place: ``inputs_embeds``, ``attention_mask`` and ``position_ids`` become the entry sequence's."""
    adapter = binding.adapter
    batch, length = input_ids.shape
    device = input_ids.device
    inputs_embeds = kwargs["inputs_embeds"]
    adapter.trace(items, captures, inputs_embeds)
    additions = take_additions(binding, kwargs, items)
    signals: dict = {}
    plans = item_plans(binding, items, captures, inputs_embeds, signals, row_budgets)
    if any(plan.vision is not None for plan in plans):
        inputs_embeds = inputs_embeds.clone()
    text = None
    if reads_text(plans):
        text = _text_tokens(input_ids, items, kwargs.get("attention_mask"), labels)
        if reference is not None:  # generating without a cache: the text the first prefill read
            text[:, reference[0].full_length :] = False
    by_item = {id(item): plan for item, plan in zip(items, plans)}
    vision = reduce_vision(binding, items, captures, inputs_embeds, additions, by_item, signals, text)
    slots_by_vision = {id(item): slots for item, _, slots in vision}

    keep = torch.ones(batch, length, dtype=torch.bool, device=device)
    is_visual = torch.zeros_like(keep)
    item_slots = []
    for item in items:
        is_visual[item.row, item.start : item.start + item.length] = True
        slots = slots_by_vision.get(id(item))
        if slots is None:
            slots = torch.arange(item.start, item.start + item.length, device=device)
        item_slots.append(slots)
        keep[item.row, item.start : item.start + item.length] = False
        keep[item.row, slots] = True
    entry = Compaction.from_keep(keep)

    attention_mask = kwargs.get("attention_mask")
    if attention_mask is not None and attention_mask.dim() != 2:
        raise ValueError("duet-vlm needs a 2-D attention_mask (or None) at the language model input")
    mode = positions_mode(plans)
    positions = scheme(mode, items[0].geometry.rope)
    if not entry.is_identity:
        kwargs["inputs_embeds"] = entry.gather(inputs_embeds)
        if attention_mask is None and entry.pad is not None:
            attention_mask = torch.ones(batch, length, dtype=torch.long, device=device)
        if attention_mask is not None:
            attention_mask = kwargs["attention_mask"] = entry.gather_mask(attention_mask)
        kwargs["position_ids"] = positions.at_entry(kwargs.get("position_ids"), entry)
        if mode == "original" and attention_mask is None and kwargs.get("past_key_values") is None:
            # Gapped positions without a mask would be read as packed sequences by transformers.
            kwargs["attention_mask"] = torch.ones_like(entry.index)
    elif kwargs["inputs_embeds"] is not inputs_embeds:
        kwargs["inputs_embeds"] = inputs_embeds
    valid = attention_mask.bool() if attention_mask is not None else torch.ones_like(entry.index, dtype=torch.bool)
    if entry.pad is not None:
        valid = valid & ~entry.pad

    rank = entry.rank()  # every full-input position's slot among the kept ones, per row
    entry_ids = entry.gather(input_ids)
    if labels is not None and labels.shape == (batch, length):
        instruction = entry.gather(labels.to(device)) == -100
    else:
        instruction = torch.ones_like(valid)
    slots = torch.arange(entry.length, device=device)
    visual_at_entry = entry.gather(is_visual)
    text_after = []
    for b in range(batch):
        row_items = [i for i, item in enumerate(items) if item.row == b]
        after = slots > (rank[b, item_slots[row_items[-1]][-1]] if row_items else -1)
        chosen = (after & valid[b] & instruction[b] & ~visual_at_entry[b]).nonzero()[:, 0]
        text_after.append(chosen if len(chosen) else slots[-1:])
    boundaries = sorted({layer for plan in plans for layer, _ in plan.schedule.boundaries})
    prompt = Prompt(
        entry, valid, entry_ids, text_after, boundaries, positions,
        vision=[(item, reduction) for item, reduction, _ in vision],
        lm_position_ids=kwargs.get("position_ids"),
    )
    prompt.source_ids, prompt.items, prompt.reference = input_ids, items, reference
    if additions:
        prompt.additions = additions
        prompt.addition_layers = next(iter(additions.values())).shape[1]
    states = [
        ItemState(item, plan, rank[item.row, item_slots_], torch.arange(len(item_slots_), device=device))
        for item, plan, item_slots_ in zip(items, plans, item_slots)
    ]
    prompt.groups.append(Group(entry.output_identity(), states))
    return prompt


def open_prompt(binding: Binding, call, found: tuple[torch.Tensor, dict], kwargs: dict) -> Prompt | None:
    """The prefill of ``call`` at the language model's entry (``None``: no visual items). A prefill
    without a cache that continues the call's earlier one of the same encoding (generate without a
    cache) keeps that one's selection."""
    input_ids = found[0]
    encoding = call.captures.encoding()
    captures = call.captures.take()
    items = binding.adapter.find_items(*found, captures)
    if not items:
        return None
    cache = kwargs.get("past_key_values")
    row_budgets = binding.reducer.row_budgets(input_ids.shape[0], input_ids)
    plans = [binding.plan_for(item.geometry) for item in items]
    check_prefill(plans, call, cache)
    reference = None
    if cache is None and not torch.is_grad_enabled() and call.reference is not None:
        rows = extends(call.reference, input_ids, items) if same_encoding(call.reference_encoding, encoding) else None
        reference = (call.reference, rows) if rows is not None else None
    call.prompt = start_prompt(binding, input_ids, call.labels, kwargs, items, captures, reference, row_budgets)
    if cache is not None:
        # Decoding steps follow on the cache and never read the encoding again; without a cache
        # generate() prefills again at every step from the same encoding, so it stays.
        call.captures.clear()
        call.reference = None
    elif reference is None and not torch.is_grad_enabled() and (call.prompt.boundaries or reads_text(plans)):
        call.reference, call.reference_encoding = call.prompt, encoding
    return call.prompt
