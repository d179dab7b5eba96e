"""Opening a prefill at the language model's entry: its items planned, their vision stages run, the
sequence compacted, and its ``PrefillState`` opened (``duet_vlm.runtime.state``).

At the entry each item gets its plan, the items' vision stages run (``vision.vision_step``) and
the slots they left empty are compacted away (the entry ``Compaction``: full input -> entry
sequence). Each pruning boundary then compacts the entry sequence further (``boundary``); decoder
layers between two boundaries see one segment's sequence, mask, positions and RoPE. The state stays
with its call for the decoding steps that follow.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..adapters import Capture, UnreducibleInput, VisualItem
from ..compaction import Compaction
from ..compat import cache_of, check_checkpointing, check_reencoded
from ..plan import Plan
from .binding import Binding
from .entry import reduces_nothing
from .guards import check_prefill, reads_text
from .positions import Original, Renumbered, scheme
from .sharded import same_stage_calls
from .state import Item, Placement, PrefillState, Scratch, Segment, Tokens
from .static import open_static
from .taps import same_encoding
from .vision import row_item_budgets, vision_step


def extends(reference: PrefillState, input_ids: torch.Tensor, items: list[VisualItem]) -> list[int] | None:
    """For each row of ``input_ids``, a row of ``reference`` whose whole input it continues with the
    same items (generate without a cache appends tokens; beams may reorder rows), or ``None``."""
    width = reference.full_length
    source_ids = reference.tokens.source_ids
    if input_ids.shape[1] < width or source_ids.device != input_ids.device:
        return None
    rows = []
    for b in range(input_ids.shape[0]):
        same = (source_ids == input_ids[b, :width]).all(dim=1).nonzero()[:, 0]
        if not len(same):
            return None
        rows.append(int(same[0]))
    for b, r in enumerate(rows):
        mine = [(item.start, item.length) for item in items if item.row == b]
        theirs = [(item.source.start, item.source.length) for item in reference.items if item.row == r]
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


def start_prefill(binding: Binding, input_ids: torch.Tensor, labels: torch.Tensor | None, kwargs: dict,
                  found: list[VisualItem], captures: dict[str, Capture],
                  reference: tuple[PrefillState, list[int]] | None = None, row_budgets: list | None = None) -> PrefillState:
    """Reduce the items at the language model's entry and compact ``kwargs`` (its arguments) in
    place: ``inputs_embeds``, ``attention_mask`` and ``position_ids`` become the entry sequence's."""
    binding.adapter.trace(found, captures, kwargs["inputs_embeds"])

    def text_of(plans: list[Plan]) -> torch.Tensor | None:  # the prompt's text, for stages that read it
        if not reads_text(plans):
            return None
        text = _text_tokens(input_ids, found, kwargs.get("attention_mask"), labels)
        if reference is not None:  # generating without a cache: the text the first prefill read
            text[:, reference[0].full_length :] = False
        return text

    items = vision_step(binding, found, captures, kwargs, row_budgets, text_of)
    entry = entry_compaction(items, input_ids)
    numbering = scheme(positions_mode([item.plan for item in items]), found[0].geometry.rope)
    lm_position_ids, mask = compact_entry(entry, numbering, kwargs, binding.scheme.token_arguments)
    rank = entry.rank()  # every full-input position's slot among the kept ones, per row
    tokens = entry_tokens(entry, rank, items, input_ids, labels, mask)
    placements = [Placement(item, rank[item.row, item.slots], torch.arange(len(item.slots), device=input_ids.device))
                  for item in items]
    segment = Segment(entry.output_identity(), placements)
    return PrefillState(entry, items, [segment], numbering, tokens, Scratch(lm_position_ids), reference=reference)


def entry_compaction(items: list[Item], input_ids: torch.Tensor) -> Compaction:
    """Full input -> entry sequence: every slot but the ones items' vision stages left empty. Sets
    the slots of the items without a vision stage (all of theirs)."""
    keep = torch.ones_like(input_ids, dtype=torch.bool)
    for item in items:
        source = item.source
        if item.slots is None:
            item.slots = torch.arange(source.start, source.start + source.length, device=input_ids.device)
        keep[source.row, source.start : source.start + source.length] = False
        keep[source.row, item.slots] = True
    return Compaction.from_keep(keep)


def compact_entry(entry: Compaction, numbering: Original | Renumbered, kwargs: dict, token_arguments=()) -> tuple:
    """Compact the language model's arguments to the entry sequence, in place (``inputs_embeds``
    and the family's other per-token arguments, ``LayerScheme.token_arguments``); returns the
    position ids the language model then receives, and the user's 2-D mask at the entry (``None``:
    none)."""
    attention_mask = kwargs.get("attention_mask")
    if attention_mask is not None and not (isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 2):
        raise ValueError("duet-vlm needs a 2-D attention_mask (or None) at the language model input")
    if not entry.is_identity:
        kwargs["inputs_embeds"] = entry.gather(kwargs["inputs_embeds"])
        for name in token_arguments:
            if isinstance(kwargs.get(name), torch.Tensor):
                kwargs[name] = entry.gather(kwargs[name])
        if attention_mask is None and entry.pad is not None:
            attention_mask = torch.ones(entry.batch, entry.source_length, dtype=torch.long, device=entry.index.device)
        if attention_mask is not None:
            attention_mask = kwargs["attention_mask"] = entry.gather_mask(attention_mask)
        kwargs["position_ids"] = numbering.at_entry(kwargs.get("position_ids"), entry)
        if isinstance(numbering, Original) and attention_mask is None and cache_of(kwargs) is None:
            # Gapped positions without a mask would be read as packed sequences by transformers.
            kwargs["attention_mask"] = torch.ones_like(entry.index)
    return kwargs.get("position_ids"), attention_mask


def entry_tokens(entry: Compaction, rank: torch.Tensor, items: list[Item], input_ids: torch.Tensor, labels,
                 mask: torch.Tensor | None) -> Tokens:
    """The prompt's tokens at the entry (``mask``: the 2-D mask at the entry, or ``None``; ``rank``:
    ``entry.rank()``): ids, valid flags, and per row the instruction after its last item (what
    language stages query with)."""
    batch, length = input_ids.shape
    device = input_ids.device
    valid = mask.bool() if mask is not None else torch.ones_like(entry.index, dtype=torch.bool)
    if entry.pad is not None:
        valid = valid & ~entry.pad
    is_visual = torch.zeros_like(input_ids, dtype=torch.bool)
    for item in items:
        is_visual[item.row, item.source.start : item.source.start + item.source.length] = True
    if labels is not None and labels.shape == (batch, length):
        instruction = entry.gather(labels.to(device)) == -100
    else:
        instruction = torch.ones_like(valid)
    slots = torch.arange(entry.length, device=device)
    visual_at_entry = entry.gather(is_visual)
    text_after = []
    for b in range(batch):
        row_items = [item for item in items if item.row == b]
        after = slots > (rank[b, row_items[-1].slots[-1]] if row_items else -1)
        chosen = (after & valid[b] & instruction[b] & ~visual_at_entry[b]).nonzero()[:, 0]
        text_after.append(chosen if len(chosen) else slots[-1:])
    return Tokens(input_ids, entry.gather(input_ids), valid, text_after)


@dataclass(frozen=True)
class WholeItems:
    """A prefill left to the unpatched model: nothing in it is reduced, and the model's masks were
    built before it (``generate`` with a static cache builds them, 4-D or one per layer type), so no
    2-D mask is there to keep the books with. ``record.whole_stats`` reports its items unreduced."""

    items: list


def open_prefill(binding: Binding, call, found: tuple[torch.Tensor, dict], kwargs: dict) -> PrefillState | WholeItems | None:
    """The prefill of ``call`` at the language model's entry (``None``: no visual items; ``WholeItems``:
    nothing reduced, left to the unpatched model). A prefill without a cache that continues the call's
    earlier one of the same encoding (generate without a cache) keeps that one's selection."""
    input_ids = found[0]
    encoding = call.captures.encoding()
    captures = call.captures.take()
    try:
        items = binding.adapter.find_items(*found, captures)
    except UnreducibleInput:
        if not reduces_nothing(binding, None):
            raise
        items = []  # full: the unpatched model's forward
    row_budgets = binding.reducer.row_budgets(input_ids.shape[0], input_ids) if items else None
    # ZeRO-3: every rank's stage calls alike, before any stage reads (each item's row budget, if any)
    same_stage_calls(binding.adapter, input_ids.shape[0], items, row_item_budgets(items, row_budgets))
    if not items:
        return None
    cache = cache_of(kwargs)
    plans = [binding.plan_for(item.geometry) for item in items]
    check_prefill(plans, call, cache)
    if torch.is_grad_enabled() and not all(plan.schedule.is_identity for plan in plans):
        check_checkpointing(binding.adapter.layers)
    user_mask = found[1].get("attention_mask")
    if user_mask is not None and not (isinstance(user_mask, torch.Tensor) and user_mask.dim() == 2):
        if all(plan.schedule.is_identity for plan in plans):
            return WholeItems(items)
    reference = None
    if cache is None and not torch.is_grad_enabled() and call.reference is not None:
        if same_encoding(call.reference_encoding, encoding):
            rows = extends(call.reference, input_ids, items)
        else:  # images encoded again: a new prompt, unless a release's generate re-encodes at every step
            rows = None
            check_reencoded(binding.adapter.family, lambda: extends(call.reference, input_ids, items) is not None)
        reference = (call.reference, rows) if rows is not None else None
    language = binding.scheme
    types = language.token_types(input_ids, found[1], items)
    built = language.enter(kwargs, found[1].get("attention_mask"))  # the masks the base model built, if any
    call.prompt = start_prefill(binding, input_ids, call.labels, kwargs, items, captures, reference, row_budgets)
    open_static(call.prompt, cache, found[1].get("attention_mask"), language.text_config._attn_implementation)
    tokens = call.prompt.tokens
    if types is not None:
        tokens.types = call.prompt.entry.gather(types)
    language.entry_masks(built, kwargs, call.prompt.entry.is_identity, tokens.valid, tokens.types)
    if cache is not None:
        # Decoding steps follow on the cache and never read the encoding again; without a cache
        # generate() prefills again at every step from the same encoding, so it stays.
        call.captures.clear()
        call.reference = None
    elif reference is None and not torch.is_grad_enabled() and (call.prompt.boundaries or reads_text(plans)):
        call.reference, call.reference_encoding = call.prompt, encoding
    return call.prompt
