"""What a prefill reduced, per item and in sum: the call's ``ReductionStats``."""

from __future__ import annotations

import torch

from ..flops import DecoderDims
from ..stats import ItemStats, ReductionStats
from .binding import Binding
from .state import EntryChoice, Placement, PrefillState


def item_stats(binding: Binding, prompt: PrefillState, index: int, placement: Placement) -> ItemStats:
    adapter, item, reduction = binding.adapter, placement.item.source, placement.item.choice
    segments = prompt.segments
    counts = [len(segments[prompt.segment_of_layer(l)].placements[index].ids) for l in range(len(adapter.layers))]
    views, cells = adapter.cell_views(item)
    stats = ItemStats(
        row=item.row,
        modality=item.geometry.modality,
        tokens=item.geometry.visual_tokens,
        units=item.geometry.units,
        tokens_per_layer=counts,
        kept_ids=segments[-1].placements[index].ids,
        stage_ids=[(layer, segment.placements[index].ids) for layer, segment in zip(prompt.boundaries, segments[1:])],
        views=views,
        cells=cells,
        geometry=item.geometry,
        budget=placement.item.budget,
    )
    if reduction is None:
        stats.entry_units = adapter.slot_units(item)
        stats.entry_slots = torch.arange(item.length)
    else:
        never = reduction.roles.get("never_encoded")  # tokens an input stage kept out of the encoder
        if never is not None:
            valid = never.cpu() >= 0
            stats.never_encoded = adapter.vision_slots(item, never.clamp(min=0))[valid.reshape(-1)]
        stats.vision_kept = entry_kept(reduction)
        valid = stats.vision_kept.cpu() >= 0
        stats.entry_slots = adapter.vision_slots(item, reduction.kept)[valid.reshape(-1)]
        units = reduction.kept.shape[0]
        stats.entry_units = (
            torch.arange(units).repeat_interleave(valid.sum(dim=1))
            if units > 1
            else adapter.view_units(item, reduction.kept[0][valid[0].to(reduction.kept.device)]).cpu()
        )
    return stats


def entry_kept(reduction: EntryChoice) -> torch.Tensor:
    """``(units, n)`` the vision-token index each output stands for, -1 past a unit's count (a stage
    whose units keep different numbers of tokens)."""
    if reduction.counts is None:
        return reduction.kept
    columns = torch.arange(reduction.kept.shape[1], device=reduction.kept.device)
    return reduction.kept.masked_fill(columns[None, :] >= reduction.counts.to(reduction.kept.device)[:, None], -1)


def prefill_stats(binding: Binding, prompt: PrefillState) -> ReductionStats:
    """The stats of a finished prefill (every segment is known)."""
    num_layers = len(binding.adapter.layers)
    entry = prompt.segments[0]
    vision = [item.choice for item in prompt.items if item.choice is not None]
    per_item = [item_stats(binding, prompt, i, placement) for i, placement in enumerate(entry.placements)]
    stages = list(zip(prompt.boundaries, prompt.segments[1:]))
    uniform = len({(s.tokens, s.units, tuple(s.tokens_per_layer)) for s in per_item}) == 1
    rows = entry.steps.batch
    first = per_item[0]
    if uniform and len(per_item) % rows == 0:
        images = len(per_item) // rows
        stage_kept = [(layer, torch.stack([p.ids for p in g.placements]).view(rows, images, -1)) for layer, g in stages]
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
    valid = prompt.tokens.valid
    is_visual = torch.zeros_like(valid)
    for placement in entry.placements:
        is_visual[placement.item.row, placement.positions] = True
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


def text_only_stats(binding: Binding, input_ids: torch.Tensor, kwargs: dict) -> ReductionStats:
    """A prefill without visual items: nothing reduced, no items; its text costs."""
    mask = kwargs.get("attention_mask")
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
