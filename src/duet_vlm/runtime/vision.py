"""Applying vision stages at the language model's entry (the *feature site*).

``vision_step`` is the prefill's one call into the vision side: each item's DeepStack features, its
budget (its row's, or chosen from its own content), its plan, and its vision stage. For every item whose plan has a vision stage, the stage reduces each unit's captured features, the
model's projector maps the result into the language model's space, and the adapter names the
slots it is written into. Rows that ``generate`` repeated (beams, several sequences) read the
captured rows of their first copy. Qwen3-VL's DeepStack features ride along as extra channels of
the same tokens, so they get the same selection and the same merge.
"""

from __future__ import annotations

import torch

from typing import Callable

from ..adapters import Capture, VisualItem
from ..plan import Plan, VisionView, apply_vision_stage
from .binding import Binding
from .sharded import check_full, same_stage_calls
from .state import EntryChoice, Item


def vision_step(binding: Binding, found: list[VisualItem], captures: dict[str, Capture], kwargs: dict,
                row_budgets: list | None, text_of: Callable[[list[Plan]], torch.Tensor | None]) -> list[Item]:
    """Every item of a prefill with its plan, its vision stage run: its DeepStack features taken out
    of the language model's arguments (``kwargs``), its budget (its row's from ``row_budgets``, or the
    reducer's choice from its own content), its plan, and its stage's output written into a copy of
    ``kwargs["inputs_embeds"]``. ``text_of(plans)``: ``(B, L)`` True on each row's text tokens, or
    ``None`` where no stage reads the text. The towers' signals are computed once for all of it."""
    signals: dict = {}  # (tower, layers, received) -> the tower's signals, this prefill's
    additions = take_additions(binding, kwargs, found)
    budgets = item_budgets(binding, found, captures, kwargs["inputs_embeds"], signals, row_budgets)
    items = [Item(source, binding.plan_for(source.geometry, budget), budget, additions=extra)
             for source, budget, extra in zip(found, budgets, additions)]
    if any(item.plan.vision is not None for item in items):
        kwargs["inputs_embeds"] = kwargs["inputs_embeds"].clone()
        reduce_vision(binding, items, captures, kwargs["inputs_embeds"], signals, text_of([item.plan for item in items]))
    return items


def item_budgets(binding: Binding, items: list[VisualItem], captures, inputs_embeds, signals: dict,
                 row_budgets: list | None) -> list[int | None]:
    """Each item's budget: the one its row was given (``reducer.per_row``), or the one the reducer
    chooses from the item's own content (``Adaptive``), else ``None`` (the reducer's own)."""
    if row_budgets is not None:
        return row_item_budgets(items, row_budgets)
    if binding.reducer.adapts_to_content:
        views = item_views(binding, items, captures, inputs_embeds, signals)
        budgets = [binding.reducer.item_budget(view, item.geometry) for view, item in zip(views, items)]
        same_stage_calls(binding.adapter, inputs_embeds.shape[0], items, budgets)  # ZeRO-3: plans alike
        return budgets
    return [None] * len(items)


def row_item_budgets(items: list[VisualItem], row_budgets: list | None) -> list:
    """Each item's budget from its row's (``reducer.per_row``; ``None``: the reducer's own)."""
    if row_budgets is None:
        return [None] * len(items)
    budgets = [row_budgets[item.row] for item in items]
    return [b(item.geometry) if callable(b) else b for b, item in zip(budgets, items)]


def source_rows(binding: Binding, items: list[VisualItem], captures: dict[str, Capture]):
    """``first_row(item)``: the first captured row (unit) each item reads.

    Items consume captured rows in row-major order; ``generate`` encodes each image once and
    repeats every row afterwards, so ``r`` copies of a row read the rows of its first copy.
    """
    adapter = binding.adapter
    needed: dict[str, int] = {}
    for item in items:
        needed[item.tower] = needed.get(item.tower, 0) + adapter.units_needed(item)
    repeat: dict[str, int] = {}
    for tower, count in needed.items():
        have = adapter.captured_units(captures[tower]) if tower in captures else 0
        if have == 0 or count % have:
            raise RuntimeError(
                f"{tower} features were not computed under this reducer (pass pixel values, not precomputed "
                f"features); {count} units expected, {have} captured"
            )
        repeat[tower] = max(1, count // have)
    first_row: dict[tuple, int] = {}
    item_key: dict[tuple, tuple] = {}  # (tower, row, first slot): an item's place in the batch
    cursor: dict[str, int] = {}
    seen_in_row: dict[tuple, int] = {}
    for item in items:
        r = repeat.get(item.tower, 1)
        j = seen_in_row.get((item.tower, item.row), 0)
        seen_in_row[(item.tower, item.row)] = j + 1
        key = item_key[(item.tower, item.row, item.start)] = (item.tower, item.row // r, j)
        if item.row % r == 0:
            first_row[key] = cursor.get(item.tower, 0)
            cursor[item.tower] = first_row[key] + adapter.units_needed(item)
    return lambda item: first_row[item_key[(item.tower, item.row, item.start)]]


def reduce_vision(
    binding: Binding,
    items: list[Item],
    captures: dict[str, Capture],
    inputs_embeds: torch.Tensor,
    signals: dict,
    text: torch.Tensor | None = None,
) -> None:
    """Run each item's vision stage and write its projected output into ``inputs_embeds`` at the
    slots the adapter names (``reduced_slots``): each item with a stage gets its ``choice`` and its
    ``slots``, and its DeepStack ``additions`` reduced with its features (in slot order).

    ``signals``: the towers' scores computed so far this prefill (``signals_of``). ``text``: ``(B,
    L)`` True on each row's text tokens, for stages that read the prompt's text.
    """
    adapter = binding.adapter
    staged = [item for item in items if item.plan.vision is not None]
    if not staged:
        return
    first_row = source_rows(binding, [item.source for item in items], captures)
    buckets: list[tuple[tuple, list[Item]]] = []  # items of one shape and one plan are reduced together
    for item in staged:
        key = (item.source.tower, item.source.geometry)
        bucket = next((b for k, b in buckets if k == key and b[0].plan is item.plan), None)
        if bucket is None:
            buckets.append((key, [item]))
        else:
            bucket.append(item)
    layers: dict[str, set] = {}
    for (tower, _), bucket in buckets:
        layers.setdefault(tower, set()).update(bucket[0].plan.vision.encoder_layers())
    for (tower, geometry), bucket in buckets:
        plan = bucket[0].plan
        tower_signals = signals_of(
            binding, signals, captures, tower, tuple(sorted(layers[tower], key=str)), plan.vision.received
        )
        units = geometry.units
        sources = [item.source for item in bucket]
        unit = adapter.unit_features(sources, captures[tower], tower_signals, first_row, inputs_embeds)
        features = unit.features
        width = features.shape[-1]
        extra = [item.additions for item in bucket if item.additions is not None]
        if extra:  # every item of a bucket has them, or none
            # Reduced as extra channels of the same tokens: every vision stage selects from scores
            # and keys and merges channel-wise, so they get the same selection and the same merge.
            extra = torch.stack(extra).flatten(2).to(features.dtype)  # (items, slots, layers * D)
            features = torch.cat([features, extra.view(features.shape[0], features.shape[1], -1)], dim=-1)
        else:
            extra = None
        source = sources[0]
        view = VisionView(
            features, unit.scores, unit.keys, geometry.grid, geometry.has_cls, unit.attention,
            project=lambda f, item=source, width=width: adapter.project(item, f[..., :width].to(unit.features.dtype)),
            entered=unit.entered,
        )
        if plan.vision.needs_text and text is not None:
            view.text = [inputs_embeds[i.row, text[i.row]] for i in sources for _ in range(units)]
        applied = apply_vision_stage(plan.vision, view, plan.schedule.llm_input // units, units)
        reduction, counts, valid = applied.reduction, applied.counts, applied.valid
        n = reduction.features.shape[1]
        projected = applied.projected.to(inputs_embeds.dtype).view(len(bucket), units, n, -1)
        for i, item in enumerate(bucket):
            share = slice(i * units, (i + 1) * units)
            mine = valid[share].reshape(-1)
            slots = adapter.reduced_slots(item.source, reduction.kept[share]).cpu()[mine].to(inputs_embeds.device)
            if len(slots.unique()) != len(slots):
                raise RuntimeError(f"{type(plan.vision).__name__} put two outputs in one slot")
            mine = mine.to(inputs_embeds.device)
            inputs_embeds[item.row, slots] = projected[i].reshape(units * n, -1)[mine]
            if extra is not None:
                layers_d = item.additions.shape[1:]
                theirs = reduction.features[share, :, width:].reshape(units * n, *layers_d)[mine]
                item.additions = theirs[slots.argsort()]
            item.choice = EntryChoice(
                reduction.kept[share], {k: v[share] for k, v in reduction.roles.items()},
                counts=None if reduction.counts is None else counts[share],
            )
            item.slots = slots.sort().values


def signals_of(
    binding: Binding, cache: dict, captures: dict[str, Capture], tower: str, layers: tuple = (), received: bool = False
):
    """``tower``'s scores and keys (and those of ``layers``), computed once per prefill; with
    ``received``, the attention received (``VisionStage.received``)."""
    for (cached_tower, cached_layers, cached_received), signals in cache.items():
        if cached_tower == tower and cached_received == received and set(layers) <= set(cached_layers):
            return signals
    adapter = binding.adapter
    # The tower returned: under FSDP2 the layers the signals read were kept unsharded (the taps).
    check_full(adapter.towers.get(tower), *(adapter.encoder_layer(tower, layer) for layer in layers))
    signals = cache[(tower, layers, received)] = adapter.vision_signals(captures[tower], tower, layers, received)
    return signals


def item_views(binding: Binding, items: list[VisualItem], captures: dict[str, Capture], inputs_embeds, cache: dict):
    """Each item's ``VisionView`` of its own units (features, scores, keys), for choosing its budget
    from its content before its plan is known."""
    first_row = source_rows(binding, items, captures)
    views = []
    for item in items:
        tower_signals = signals_of(binding, cache, captures, item.tower)
        unit = binding.adapter.unit_features([item], captures[item.tower], tower_signals, first_row, inputs_embeds)
        views.append(VisionView(
            unit.features, unit.scores, unit.keys, item.geometry.grid, item.geometry.has_cls, entered=unit.entered
        ))
    return views


def take_additions(binding: Binding, kwargs: dict, items: list[VisualItem]) -> list[torch.Tensor | None]:
    """Each item's DeepStack features ``(slots, layers, D)`` (``None`` for every item of a family
    without them), taken out of the language model's arguments: the runtime adds them to the kept
    tokens itself (``PrefillState.with_layer_features``)."""
    taken = binding.adapter.take_layer_additions(kwargs)
    if taken is None:
        return [None] * len(items)
    mask, per_layer = taken
    stacked = torch.stack(list(per_layer), dim=1)  # (visual tokens in row-major order, layers, D)
    rank = mask.flatten().long().cumsum(0).view(mask.shape) - 1
    additions = []
    for item in items:
        slots = torch.arange(item.start, item.start + item.length, device=mask.device)
        if not bool(mask[item.row, slots].all()):
            raise RuntimeError("DeepStack's visual positions do not cover a visual item")
        additions.append(stacked[rank[item.row, slots]])
    return additions
