"""What a prefill reduced, per item and in sum: the call's ``ReductionStats``.

A call's stats are deferred (``stats.DeferredStats``, kept by ``UnreadStats``): a reduced prefill's
exit takes what they read (``PrefillRecord``, references and no arithmetic), and ``prefill_stats``
computes them from that record when they are first read.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from functools import partial

import torch

from ..adapters import VisualItem
from ..flops import DecoderDims
from ..stats import DeferredStats, ItemStats, ReductionStats
from .binding import Binding
from .state import EntryChoice, PrefillState


@dataclass(frozen=True)
class ItemRecord:
    """One item of a finished prefill, as its stats read it."""

    source: VisualItem
    choice: EntryChoice | None
    budget: int | None
    positions: torch.Tensor  # its tokens' positions in the entry sequence
    ids: tuple[torch.Tensor, ...]  # per segment, the entry tokens it keeps there


@dataclass(frozen=True)
class PrefillRecord:
    """What a finished prefill's stats read, taken at the language model's exit. The prefill's state
    lives on through the decoding steps, which replace its parts (a cropped prompt's tokens) but never
    change a tensor in place: references taken here keep what the prefill decided."""

    boundaries: tuple[int, ...]
    layer_segments: tuple[int, ...]  # each decoder layer's segment (``PrefillState.layer_roles``)
    items: tuple[ItemRecord, ...]  # in the entry's order
    choices: tuple[EntryChoice, ...]  # the vision stages' choices, in the prefill's item order
    rows: int
    valid: torch.Tensor  # (B, L_entry) the entry sequence's tokens (not padding)

    @classmethod
    def of(cls, prompt: PrefillState, layers: int) -> "PrefillRecord":
        segments = prompt.segments
        items = tuple(
            ItemRecord(placement.item.source, placement.item.choice, placement.item.budget, placement.positions,
                       tuple(segment.placements[index].ids for segment in segments))
            for index, placement in enumerate(segments[0].placements)
        )
        choices = tuple(item.choice for item in prompt.items if item.choice is not None)
        layer_segments = tuple(number for number, _, _ in prompt.layer_roles(layers))
        return cls(tuple(prompt.boundaries), layer_segments, items, choices, segments[0].steps.batch, prompt.tokens.valid)


class UnreadStats:
    """The stats an attachment recorded (``DeferredStats``), each computed when first read; ``compute``
    computes those still unread when the reducer is removed, since a record holds the model's adapter."""

    def __init__(self) -> None:
        self._unread: weakref.WeakSet[DeferredStats] = weakref.WeakSet()

    def record(self, reducer, compute, *args) -> None:
        """``reducer.stats`` become ``compute(*args)``, computed when first read."""
        stats = DeferredStats(partial(compute, *args))
        self._unread.add(stats)
        reducer.stats = stats

    def compute(self) -> None:
        for stats in list(self._unread):
            stats.resolve()
        self._unread.clear()


def item_stats(binding: Binding, record: PrefillRecord, item: ItemRecord) -> ItemStats:
    adapter, source, reduction = binding.adapter, item.source, item.choice
    counts = [len(item.ids[number]) for number in record.layer_segments]
    views, cells = adapter.cell_views(source)
    stats = ItemStats(
        row=source.row,
        modality=source.geometry.modality,
        tokens=source.geometry.visual_tokens,
        units=source.geometry.units,
        tokens_per_layer=counts,
        kept_ids=item.ids[-1],
        stage_ids=list(zip(record.boundaries, item.ids[1:])),
        views=views,
        cells=cells,
        geometry=source.geometry,
        budget=item.budget,
    )
    if reduction is None:
        stats.entry_units = adapter.slot_units(source)
        stats.entry_slots = torch.arange(source.length)
    else:
        never = reduction.roles.get("never_encoded")  # tokens an input stage kept out of the encoder
        if never is not None:
            valid = never.cpu() >= 0
            stats.never_encoded = adapter.vision_slots(source, never.clamp(min=0))[valid.reshape(-1)]
        stats.vision_kept = entry_kept(reduction)
        valid = stats.vision_kept.cpu() >= 0
        stats.entry_slots = adapter.vision_slots(source, reduction.kept)[valid.reshape(-1)]
        units = reduction.kept.shape[0]
        stats.entry_units = (
            torch.arange(units).repeat_interleave(valid.sum(dim=1))
            if units > 1
            else adapter.view_units(source, reduction.kept[0][valid[0].to(reduction.kept.device)]).cpu()
        )
    return stats


def entry_kept(reduction: EntryChoice) -> torch.Tensor:
    """``(units, n)`` the vision-token index each output stands for, -1 past a unit's count (a stage
    whose units keep different numbers of tokens)."""
    if reduction.counts is None:
        return reduction.kept
    columns = torch.arange(reduction.kept.shape[1], device=reduction.kept.device)
    return reduction.kept.masked_fill(columns[None, :] >= reduction.counts.to(reduction.kept.device)[:, None], -1)


def prefill_stats(binding: Binding, record: PrefillRecord) -> ReductionStats:
    """The stats of a finished prefill, from its record."""
    num_layers = len(binding.adapter.layers)
    vision = record.choices
    per_item = [item_stats(binding, record, item) for item in record.items]
    uniform = len({(s.tokens, s.units, tuple(s.tokens_per_layer)) for s in per_item}) == 1
    rows = record.rows
    first = per_item[0]
    if uniform and len(per_item) % rows == 0:
        images = len(per_item) // rows
        stage_kept = [(layer, torch.stack([item.ids[number] for item in record.items]).view(rows, images, -1))
                      for number, layer in enumerate(record.boundaries, start=1)]
        kept = [entry_kept(choice) for choice in vision]
        width = max((k.shape[1] for k in kept), default=0)
        vision_kept = torch.cat([torch.nn.functional.pad(k, (0, width - k.shape[1]), value=-1) for k in kept]) if vision else None
        roles = {k: torch.cat([choice.roles[k] for choice in vision]) for k in vision[0].roles} if vision else {}
        tokens_per_layer, visual_tokens, llm_input = first.tokens_per_layer, first.tokens, first.tokens_per_layer[0]
    else:
        stage_kept, vision_kept, roles = [], None, {}
        mean = [sum(s.tokens_per_layer[l] for s in per_item) / len(per_item) for l in range(num_layers)]
        tokens_per_layer = mean
        visual_tokens = sum(s.tokens for s in per_item) / len(per_item)
        llm_input = mean[0]
    valid = record.valid
    is_visual = torch.zeros_like(valid)
    for item in record.items:
        is_visual[item.source.row, item.positions] = True
    text_tokens = (valid & ~is_visual).sum(dim=1).tolist()
    stats = ReductionStats(
        tokens_per_layer=tokens_per_layer,
        visual_tokens=visual_tokens,
        llm_input_tokens=llm_input,
        text_tokens=text_tokens,
        vision_kept=vision_kept,
        vision_roles=roles,
        stage_kept=stage_kept,
        items=per_item,
    )
    return with_costs(binding, stats)


def text_only_stats(binding: Binding, input_ids: torch.Tensor, mask) -> ReductionStats:
    """A prefill without visual items: nothing reduced, no items; its text costs (``mask``: the
    language model's attention mask)."""
    if isinstance(mask, torch.Tensor) and mask.dim() == 2:
        text = mask.bool().sum(dim=1).tolist()
    else:
        text = [input_ids.shape[1]] * input_ids.shape[0]
    layers = len(binding.adapter.layers)
    return with_costs(binding, ReductionStats(tokens_per_layer=[0] * layers, visual_tokens=0, llm_input_tokens=0, text_tokens=text))


def whole_stats(binding: Binding, input_ids: torch.Tensor, items: list) -> ReductionStats:
    """A prefill left whole (``prefill.WholeItems``): every item's tokens enter every layer. Without a
    2-D mask, every token of a row that is not visual counts as text."""
    layers = len(binding.adapter.layers)
    per_item = [ItemStats(row=item.row, modality=item.geometry.modality, tokens=item.geometry.visual_tokens,
                          units=item.geometry.units, tokens_per_layer=[item.geometry.visual_tokens] * layers,
                          entry_slots=torch.arange(item.length), geometry=item.geometry) for item in items]
    text = [input_ids.shape[1] - sum(item.length for item in items if item.row == row) for row in range(input_ids.shape[0])]
    mean = sum(s.tokens for s in per_item) / len(per_item)
    stats = ReductionStats(tokens_per_layer=[mean] * layers, visual_tokens=mean, llm_input_tokens=mean, text_tokens=text,
                           items=per_item)
    return with_costs(binding, stats)


def with_costs(binding: Binding, stats: ReductionStats) -> ReductionStats:
    language_model = binding.adapter.language_model
    dtype = next(language_model.parameters()).dtype
    stats.fill_costs(DecoderDims.from_config(binding.text_config), torch.finfo(dtype).bits // 8)
    return stats
