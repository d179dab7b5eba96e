"""Applies a method's ``Plan`` to a model through module hooks. Knows no particular method or family.

The unit of work is the **visual item**: one image (all its tiles and newline tokens) or one video
(all its frames) in one row. The family adapter finds the items of a batch; each item gets the plan
its method solves for the item's own geometry, so rows of a batch may hold items of different sizes
and kinds. Where things happen:

1. Each vision tower's feature layer: a pre-hook keeps its input (for the scores and keys) and a
   forward hook its output (the pre-projector features). The tower keeps its attention backend.
2. The base model's entry: the adapter finds the visual items in ``input_ids``.
3. The language model's entry (the *feature site*): for every item with a vision stage, the stage
   reduces each unit's features, the model's projector maps them into the language model's space,
   and they are written into the unit's first slots; the other slots of the item are removed from
   ``inputs_embeds``, ``attention_mask`` and ``position_ids``. Transformers' own placeholder check,
   packing and ``masked_scatter`` run unchanged before this. Rows whose reduced prompts differ in
   length are left-padded; in decoding steps the full-length mask and positions that ``generate``
   keeps are mapped onto the shorter sequence.
4. Each decoder layer: at a boundary the language stage picks each item's survivors and the layer's
   input, mask, positions and RoPE are gathered; later layers of the group reuse them. Each layer's
   KV cache therefore holds only its own tokens.
5. The language model's output: in a prefill, hidden states are scattered back to the input length
   (dropped slots are zeros) so logits and ``labels`` line up as transformers expects: the state of
   each kept token sits just before the next kept token, which is what the shifted loss reads.

Positions follow the reference by default ("contiguous": renumbered after every drop, decode
positions shifted per layer group); ``positions="original"`` keeps the original ones (FastV-style).
"""

from __future__ import annotations

import warnings
import weakref
from dataclasses import dataclass, field

import torch
from torch import nn
from transformers.cache_utils import StaticCache
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, causal_mask_function

from .adapters import Capture, Geometry, ModelAdapter, VisualItem, adapter_for
from .flops import DecoderDims
from .methods.base import LayerView, Plan, PositionsError, Reducer, Selection, VisionReduction, VisionView
from .selection import gather_tokens
from .stats import ItemStats, ReductionStats


def _gather_mask(mask, q_index: torch.Tensor | None, kv_index: torch.Tensor):
    """Select query rows and key columns of a 2-D (flash) or 4-D (sdpa/eager) mask; ``None`` stays."""
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"duet-vlm cannot reduce tokens under a {type(mask).__name__} mask (use sdpa, eager or FA2)")
    if mask.dim() == 2:
        return mask.gather(1, kv_index)
    if mask.dim() != 4:
        raise ValueError(f"unexpected attention mask of shape {tuple(mask.shape)}")
    batch = kv_index.shape[0]
    mask = mask.expand(batch, -1, -1, -1)
    if q_index is not None:
        mask = mask.gather(2, q_index[:, None, :, None].expand(-1, mask.shape[1], -1, mask.shape[3]))
    return mask.gather(3, kv_index[:, None, None, :].expand(-1, mask.shape[1], mask.shape[2], -1))


def _gather_positions(positions: torch.Tensor | None, index: torch.Tensor) -> torch.Tensor | None:
    """Gather ``(..., B or 1, L)`` positions along their last (sequence) axis with ``(B, L')`` indices."""
    if positions is None:
        return None
    lead = positions.shape[:-2]
    positions = positions.expand(*lead, index.shape[0], -1)
    return positions.gather(-1, index.expand(*lead, -1, -1))


def _left_pad(rows: list[torch.Tensor], fill: int = 0) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Stack 1-D index tensors of different lengths, left-padded with ``fill``; the pad mask or ``None``."""
    width = max(len(r) for r in rows)
    if all(len(r) == width for r in rows):
        return torch.stack(rows), None
    padded = rows[0].new_full((len(rows), width), fill)
    pad = torch.ones(len(rows), width, dtype=torch.bool, device=rows[0].device)
    for b, r in enumerate(rows):
        padded[b, width - len(r) :] = r
        pad[b, width - len(r) :] = False
    return padded, pad


@dataclass
class _ItemState:
    """Where one item's surviving visual tokens sit in the current sequence."""

    item: VisualItem
    plan: Plan
    positions: torch.Tensor  # (n,) positions in the current group sequence of row ``item.row``
    ids: torch.Tensor  # (n,) indices into the item's block at the LLM entry (stable)


@dataclass
class _Group:
    """The sequence seen by the decoder layers between two boundaries, during the prefill."""

    index: torch.Tensor  # (B, L_g) positions in the LLM-entry sequence (pads: 0)
    pad: torch.Tensor | None  # (B, L_g) True on slots added to align rows of different lengths
    items: list[_ItemState]
    position_ids: torch.Tensor | None = None  # (B, L_g) what decoder layers receive (None: Qwen-VL)
    rope_positions: torch.Tensor | None = None  # (B, L_g), or (3, B, L_g) M-RoPE: the rotary's input
    position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None
    attention_mask: object = None

    def present(self) -> torch.Tensor:
        """``(B,)`` tokens of each row that are not alignment pads."""
        if self.pad is None:
            return torch.full((self.index.shape[0],), self.index.shape[1], device=self.index.device)
        return (~self.pad).sum(dim=1)


@dataclass
class _Prompt:
    """One prefill's bookkeeping, kept for the decoding steps that follow it."""

    full_length: int
    entry_index: torch.Tensor  # (B, L_entry) positions in the full input kept at the LLM entry
    valid: torch.Tensor  # (B, L_entry) False on padding (the user's and alignment pads)
    input_ids: torch.Tensor  # (B, L_entry)
    text_after_image: list[torch.Tensor]  # per row, positions in the entry sequence
    boundaries: list[int]  # union of the items' boundary layers (counts of layers completed)
    groups: list[_Group] = field(default_factory=list)
    decode_kwargs: dict[int, dict] = field(default_factory=dict)
    decode_mask: torch.Tensor | None = None  # the 2-D mask at the LLM entry in the current decoding step
    is_prefill: bool = True
    input_embeddings: torch.Tensor | None = None  # (B, L_entry, D)
    last_layer_input: torch.Tensor | None = None
    vision: list[tuple[VisualItem, VisionReduction]] = field(default_factory=list)
    scratch: dict = field(default_factory=dict)
    lm_position_ids: torch.Tensor | None = None  # what the language model received in the prefill
    # DeepStack: per item, (entry slots, layers, D) features added after the first decoder layers.
    additions: dict[int, torch.Tensor] = field(default_factory=dict)
    addition_layers: int = 0

    @property
    def entry_length(self) -> int:
        return self.entry_index.shape[1]

    def group_of_layer(self, layer: int) -> int:
        return sum(1 for boundary in self.boundaries if boundary <= layer)


# Models with a reducer attached: two reducers on one model would stack their hooks.
_ATTACHED: "weakref.WeakKeyDictionary[nn.Module, Attachment]" = weakref.WeakKeyDictionary()


class Attachment:
    """Hooks of one reducer on one model; ``remove()`` restores the model exactly."""

    def __init__(self, reducer: Reducer, model: nn.Module):
        if model in _ATTACHED:
            raise RuntimeError("a duet-vlm reducer is already attached to this model; remove it first")
        self.reducer = reducer
        self.model = model
        self.adapter: ModelAdapter = adapter_for(model)
        self._plans: dict[Geometry, Plan] = {}
        # Solving the default image's plan now turns a budget the model cannot reach into an error
        # at attach time rather than mid-forward; a no-op warning waits until an item is that size.
        # Families without a default size (Qwen-VL) have only a nominal one: a budget it cannot meet
        # may suit the real items, so only what fails for every size (positions) is an error here.
        self.plan: Plan | None = None
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                self.plan = self.reducer.resolve(self.adapter.geometry)
            except PositionsError:
                raise
            except ValueError:
                if not self.adapter.nominal_geometry:
                    raise
        # The default image's schedule; each item gets its own at its prefill.
        self.schedule = self.plan.schedule if self.plan is not None else None
        self._captures: dict[str, list[Capture]] = {}
        self._captures_used = False
        self._pending_inputs: dict[str, tuple[torch.Tensor, dict]] = {}
        self._pending_calls: dict[str, dict] = {}
        self._labels: torch.Tensor | None = None
        self._items: tuple[torch.Tensor, dict] | None = None  # the base model's inputs
        self._input_ids: torch.Tensor | None = None
        self._prompt: _Prompt | None = None
        self._in_stage = False  # a stage is running a layer itself: hooks stand aside
        self._head_rows: torch.Tensor | None = None  # where the last prefill's states sit, for the LM head
        self._handles: list = []
        try:
            self._install()
        except BaseException:
            self.remove()
            raise
        _ATTACHED[model] = self

    def plan_for(self, geometry: Geometry) -> Plan:
        plan = self._plans.get(geometry)
        if plan is None:
            plan = self._plans[geometry] = self.reducer.resolve(geometry)
        return plan

    # ----------------------------------------------------------------- installation
    def _install(self) -> None:
        a, add = self.adapter, self._handles.append
        # Captured for every reducer: the plan of an item (and whether it has a vision stage) is
        # only known once the item's size is, at the language model's entry.
        for name, layer in a.towers.items():
            add(layer.register_forward_pre_hook(self._keep_vision_input(name), with_kwargs=True))
            add(layer.register_forward_hook(self._keep_vision_output(name)))
        for name, module in a.tower_entries.items():
            add(module.register_forward_pre_hook(self._keep_tower_call(name), with_kwargs=True))
        if a.top is not None:
            add(a.top.register_forward_pre_hook(self._keep_labels, with_kwargs=True))
            add(a.top.register_forward_hook(self._forget_labels))
        add(a.base.register_forward_pre_hook(self._find_items, with_kwargs=True))
        add(a.language_model.register_forward_pre_hook(self._enter_language_model, with_kwargs=True))
        add(a.language_model.register_forward_hook(self._leave_language_model))
        if a.lm_head is not None:
            add(a.lm_head.register_forward_pre_hook(self._compact_head_input))
            add(a.lm_head.register_forward_hook(self._expand_head_output))
        for index, layer in enumerate(a.layers):
            add(layer.register_forward_pre_hook(self._layer_hook(index), with_kwargs=True))
            add(layer.register_forward_hook(self._add_layer_features(index)))

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        if _ATTACHED.get(self.model) is self:
            del _ATTACHED[self.model]
        self._captures, self._pending_inputs, self._pending_calls = {}, {}, {}
        self._labels = self._items = self._input_ids = self._prompt = self._head_rows = None

    # ----------------------------------------------------------------- vision side
    def _keep_vision_input(self, tower: str):
        def hook(module, args, kwargs):
            self._pending_inputs[tower] = (args[0] if args else kwargs["hidden_states"], kwargs)

        return hook

    def _keep_tower_call(self, tower: str):
        def hook(module, args, kwargs):
            self._pending_calls[tower] = {"entry_args": args, "entry_kwargs": kwargs}

        return hook

    def _keep_vision_output(self, tower: str):
        def hook(module, args, output):
            features = output[0] if isinstance(output, tuple) else output
            if self._captures_used:  # the first tower call of a new encoding: earlier captures are stale
                self._captures, self._captures_used = {}, False
            layer_input, layer_kwargs = self._pending_inputs.pop(tower)
            context = {"layer_kwargs": layer_kwargs, **self._pending_calls.get(tower, {})}
            self._captures.setdefault(tower, []).append(Capture(layer_input, features, contexts=(context,)))

        return hook

    def _take_captures(self) -> dict[str, Capture]:
        """Every tower's captures of the last encoding, concatenated over calls (one row per unit).

        They stay until a tower runs again: generate() without a cache encodes the images once and
        prefills at every step.
        """
        self._captures_used = True
        captures = self._captures
        return {
            tower: Capture(
                torch.cat([c.layer_input for c in calls]),
                torch.cat([c.output for c in calls]),
                tuple(c.output.shape[0] for c in calls),
                tuple(context for c in calls for context in c.contexts),
            )
            for tower, calls in captures.items()
        }

    def _reduce_vision(
        self,
        prompt_items: list[VisualItem],
        captures: dict[str, Capture],
        inputs_embeds: torch.Tensor,
        additions: dict[int, torch.Tensor],
    ) -> list[tuple[VisualItem, VisionReduction, torch.Tensor]]:
        """Run each item's vision stage and write its projected output into the slots the adapter
        names (``reduced_slots``). An item's DeepStack ``additions`` (``(slots, layers, D)``) are
        reduced with its features, by the same selection and the same merge, and replaced by the
        reduced ones (in slot order).

        Returns, for the items with a vision stage, what their stage kept and the slots it filled.
        """
        records: list[tuple[VisualItem, VisionReduction, torch.Tensor]] = []
        staged = [item for item in prompt_items if self.plan_for(item.geometry).vision is not None]
        if not staged:
            return records
        # generate() encodes each image once and repeats every row afterwards (num_return_sequences,
        # beams): r copies of a row read the captured rows of its first copy.
        needed: dict[str, int] = {}
        for item in prompt_items:
            needed[item.tower] = needed.get(item.tower, 0) + self.adapter.units_needed(item)
        repeat: dict[str, int] = {}
        for tower, count in needed.items():
            have = self.adapter.captured_units(captures[tower]) if tower in captures else 0
            if have == 0 or count % have:
                raise RuntimeError(
                    f"{tower} features were not computed under this reducer (pass pixel values, not precomputed "
                    f"features); {count} units expected, {have} captured"
                )
            repeat[tower] = max(1, count // have)
        # Items consume captured rows in row-major order; (tower, original row, j-th item) -> first row.
        first_row: dict[tuple, int] = {}
        item_key: dict[int, tuple] = {}
        cursor: dict[str, int] = {}
        seen_in_row: dict[tuple, int] = {}
        for item in prompt_items:
            r = repeat.get(item.tower, 1)
            j = seen_in_row.get((item.tower, item.row), 0)
            seen_in_row[(item.tower, item.row)] = j + 1
            key = item_key[id(item)] = (item.tower, item.row // r, j)
            if item.row % r == 0:
                first_row[key] = cursor.get(item.tower, 0)
                cursor[item.tower] = first_row[key] + self.adapter.units_needed(item)

        def source_row(item: VisualItem) -> int:
            return first_row[item_key[id(item)]]

        buckets: dict[tuple, list[VisualItem]] = {}
        for item in staged:
            buckets.setdefault((item.tower, item.geometry), []).append(item)
        signals: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        for (tower, geometry), items in buckets.items():
            plan = self.plan_for(geometry)
            if tower not in signals:
                signals[tower] = self.adapter.vision_signals(captures[tower], tower)
            units = geometry.units
            unit = self.adapter.unit_features(items, captures[tower], signals[tower], source_row, inputs_embeds)
            features = unit.features
            width = features.shape[-1]
            extra = [additions[id(item)] for item in items if id(item) in additions]
            if extra:  # every item of a bucket has them, or none
                # Reduced as extra channels of the same tokens: every vision stage selects from scores
                # and keys and merges channel-wise, so they get the same selection and the same merge.
                extra = torch.stack(extra).flatten(2).to(features.dtype)  # (items, slots, layers * D)
                features = torch.cat([features, extra.view(features.shape[0], features.shape[1], -1)], dim=-1)
            else:
                extra = None
            view = VisionView(features, unit.scores, unit.keys, geometry.grid, geometry.has_cls)
            keep = plan.schedule.llm_input // units
            reduction = plan.vision.reduce(view, keep)
            expected = (features.shape[0], keep, features.shape[-1])
            if tuple(reduction.features.shape) != expected:
                raise RuntimeError(
                    f"{type(plan.vision).__name__} returned {tuple(reduction.features.shape)}, expected {expected}"
                )
            reduced = reduction.features[..., :width]
            projected = self.adapter.project(items[0], reduced.to(unit.features.dtype))
            projected = projected.to(inputs_embeds.dtype).view(len(items), units, keep, -1)
            for i, item in enumerate(items):
                share = slice(i * units, (i + 1) * units)
                slots = self.adapter.reduced_slots(item, reduction.kept[share]).to(inputs_embeds.device)
                if len(slots.unique()) != len(slots):
                    raise RuntimeError(f"{type(plan.vision).__name__} put two outputs in one slot")
                inputs_embeds[item.row, slots] = projected[i].reshape(units * keep, -1)
                if extra is not None:
                    layers_d = additions[id(item)].shape[1:]
                    mine = reduction.features[share, :, width:].reshape(units * keep, *layers_d)
                    additions[id(item)] = mine[slots.argsort()]
                records.append(
                    (item, VisionReduction(
                        reduced[share], reduction.kept[share], {k: v[share] for k, v in reduction.roles.items()}
                    ), slots.sort().values)
                )
        return records

    # ----------------------------------------------------------------- inputs
    def _keep_labels(self, module, args, kwargs):
        self._labels = kwargs.get("labels")

    def _forget_labels(self, module, args, output):
        self._labels = None

    def _find_items(self, module, args, kwargs):
        videos = kwargs.get("pixel_values_videos")
        if isinstance(videos, torch.Tensor) and videos.dim() == 5 and videos.shape[0] and not videos.shape[1]:
            raise ValueError(f"pixel_values_videos of shape {tuple(videos.shape)}: a video with no frames")
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        if input_ids is None:
            embeds = kwargs["inputs_embeds"]
            table = module.get_input_embeddings()
            input_ids = torch.full(embeds.shape[:2], -1, dtype=torch.long, device=embeds.device)
            for token_id in self.adapter.placeholder_ids:
                token = table(torch.tensor(token_id, device=embeds.device))
                input_ids = torch.where((embeds == token).all(-1), token_id, input_ids)
        # Items are found at the language model's entry, after transformers' own placeholder checks
        # ran: a mismatch surfaces as transformers' error, not ours.
        self._input_ids = input_ids
        self._items = (input_ids, kwargs)
        return self._unreduced_decode_positions(input_ids, args, kwargs)

    def _unreduced_decode_positions(self, input_ids, args, kwargs):
        """A decoding step given neither positions nor a mask after a reduced prefill: a model that
        numbers it from the cache's length (Qwen-VL) would count the reduced cache. Pass the
        positions the unreduced model would use (the adapter's ``decode_position_ids``)."""
        prompt, cache = self._prompt, kwargs.get("past_key_values")
        if (
            prompt is None or cache is None
            or kwargs.get("position_ids") is not None or kwargs.get("attention_mask") is not None
        ):
            return None
        cached = cache.get_seq_length()
        if cached == 0 or prompt.full_length == prompt.entry_length:
            return None
        start = prompt.full_length + cached - prompt.entry_length  # the unreduced cache's length
        positions = self.adapter.decode_position_ids(start, input_ids.shape[1], input_ids.shape[0], input_ids.device)
        if positions is None:
            return None
        kwargs["position_ids"] = positions
        return args, kwargs

    # ----------------------------------------------------------------- language model entry
    def _enter_language_model(self, module, args, kwargs):
        cache = kwargs.get("past_key_values")
        found, self._items = self._items, None
        if isinstance(cache, StaticCache):
            raise NotImplementedError(
                "duet-vlm gives each decoder layer a cache of its own length; a static cache (cache_implementation="
                "'static', or torch.compile's default for generate) writes by absolute position. Use the default "
                "dynamic cache"
            )
        if cache is not None and cache.get_seq_length() > 0:
            # Placeholders on top of a cache: generate() resent part of a prompt whose cache a
            # vision-side reduction made shorter (a second turn passed with past_key_values).
            input_ids = found[0] if found is not None else None
            # One new token is a decoding step (the model may generate a placeholder id); only a
            # longer input can be a resent prompt. Keeps the decoding path free of data-dependent
            # branches (torch.compile).
            resent = input_ids is not None and input_ids.shape[1] > 1
            if resent and any(bool((input_ids == t).any()) for t in self.adapter.placeholder_ids):
                raise NotImplementedError(
                    "duet-vlm reduces visual items in a prefill, not on top of a cache (a reduced cache is shorter "
                    "than its prompt, so generate() resends part of it). To continue a conversation, pass the whole "
                    "conversation again without past_key_values"
                )
            return self._continue_prompt(kwargs, cache)
        self._prompt = None
        if found is None:
            return None
        return self._begin_prompt(found, kwargs)

    @torch.compiler.disable  # finds items and selects tokens (data-dependent): eager under torch.compile
    def _begin_prompt(self, found, kwargs):
        captures = self._take_captures()
        items = self.adapter.find_items(*found, captures)
        if not items:
            return None
        return self._start_prompt(kwargs, items, captures)

    def _start_prompt(self, kwargs, items: list[VisualItem], captures: dict[str, Capture]):
        input_ids = self._input_ids
        batch, length = input_ids.shape
        device = input_ids.device
        inputs_embeds = kwargs["inputs_embeds"]
        self.adapter.trace(items, captures, inputs_embeds)
        additions = self._take_additions(kwargs, items)
        if any(self.plan_for(i.geometry).vision is not None for i in items):
            inputs_embeds = inputs_embeds.clone()
        vision = self._reduce_vision(items, captures, inputs_embeds, additions)
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
        entry_index, entry_pad = _left_pad([row.nonzero()[:, 0] for row in keep])
        entry_length = entry_index.shape[1]

        attention_mask = kwargs.get("attention_mask")
        if attention_mask is not None and attention_mask.dim() != 2:
            raise ValueError("duet-vlm needs a 2-D attention_mask (or None) at the language model input")
        plans = [self.plan_for(item.geometry) for item in items]
        positions_mode = self._positions_mode(plans)
        if entry_length != length or entry_pad is not None:
            kwargs["inputs_embeds"] = gather_tokens(inputs_embeds, entry_index)
            if attention_mask is None and entry_pad is not None:
                attention_mask = torch.ones(batch, length, dtype=torch.long, device=device)
            if attention_mask is not None:
                attention_mask = attention_mask.gather(1, entry_index)
                if entry_pad is not None:
                    attention_mask = attention_mask.masked_fill(entry_pad, 0)
                kwargs["attention_mask"] = attention_mask
            kwargs["position_ids"] = self._entry_positions(
                kwargs.get("position_ids"), entry_index, entry_pad, length, positions_mode
            )
            if positions_mode == "original" and attention_mask is None and kwargs.get("past_key_values") is None:
                # Gapped positions without a mask would be read as packed sequences by transformers.
                kwargs["attention_mask"] = torch.ones_like(entry_index)
        elif kwargs["inputs_embeds"] is not inputs_embeds:
            kwargs["inputs_embeds"] = inputs_embeds
        valid = attention_mask.bool() if attention_mask is not None else torch.ones_like(entry_index, dtype=torch.bool)
        if entry_pad is not None:
            valid = valid & ~entry_pad

        # Rank of every full-input position among the kept ones, per row, in entry coordinates.
        offset = entry_pad.sum(dim=1, keepdim=True) if entry_pad is not None else 0
        rank = keep.long().cumsum(dim=1) - 1 + offset
        input_ids = input_ids.gather(1, entry_index)
        labels = self._labels
        if labels is not None and labels.shape == (batch, length):
            instruction = labels.to(device).gather(1, entry_index) == -100
        else:
            instruction = torch.ones_like(valid)
        positions = torch.arange(entry_length, device=device)
        text_after = []
        for b in range(batch):
            row_items = [i for i, item in enumerate(items) if item.row == b]
            after = positions > (rank[b, item_slots[row_items[-1]][-1]] if row_items else -1)
            chosen = (after & valid[b] & instruction[b] & ~is_visual[b].gather(0, entry_index[b])).nonzero()[:, 0]
            text_after.append(chosen if len(chosen) else positions[-1:])
        boundaries = sorted({layer for plan in plans for layer, _ in plan.schedule.boundaries})
        prompt = self._prompt = _Prompt(
            length, entry_index, valid, input_ids, text_after, boundaries,
            vision=[(item, reduction) for item, reduction, _ in vision],
            lm_position_ids=kwargs.get("position_ids"),
        )
        if additions:
            prompt.additions = additions
            prompt.addition_layers = next(iter(additions.values())).shape[1]
        states = [
            _ItemState(item, plan, rank[item.row, slots], torch.arange(len(slots), device=device))
            for item, plan, slots in zip(items, plans, item_slots)
        ]
        prompt.groups.append(_Group(positions.expand(batch, -1), entry_pad, states))
        return (), kwargs

    def _take_additions(self, kwargs, items: list[VisualItem]) -> dict[int, torch.Tensor]:
        """Each item's DeepStack features ``(slots, layers, D)``, taken out of the language model's
        arguments: the runtime adds them to the kept tokens (``_add_layer_features``)."""
        taken = self.adapter.take_layer_additions(kwargs)
        if taken is None:
            return {}
        mask, per_layer = taken
        stacked = torch.stack(list(per_layer), dim=1)  # (visual tokens in row-major order, layers, D)
        rank = mask.flatten().long().cumsum(0).view(mask.shape) - 1
        additions = {}
        for item in items:
            slots = torch.arange(item.start, item.start + item.length, device=mask.device)
            if not bool(mask[item.row, slots].all()):
                raise RuntimeError("DeepStack's visual positions do not cover a visual item")
            additions[id(item)] = stacked[rank[item.row, slots]]
        return additions

    def _add_layer_features(self, layer_index: int):
        def hook(module, args, output):
            prompt = self._prompt
            if prompt is None or not prompt.is_prefill or self._in_stage or layer_index >= prompt.addition_layers:
                return None
            hidden = output[0] if isinstance(output, tuple) else output
            group = prompt.groups[prompt.group_of_layer(layer_index)]
            added = self._with_layer_features(hidden, layer_index, group.items)
            if added is hidden:
                return None
            return (added, *output[1:]) if isinstance(output, tuple) else added

        return hook

    def _with_layer_features(self, hidden: torch.Tensor, layer_index: int, states, rows: list[int] | None = None):
        """``hidden`` (a layer's output) plus the DeepStack features the model adds after that layer,
        at the kept visual tokens of ``states``; ``rows`` are the batch rows ``hidden`` holds (all by
        default). Returns ``hidden`` itself when the layer adds nothing."""
        prompt = self._prompt
        if layer_index >= prompt.addition_layers:
            return hidden
        index_rows, positions, values = [], [], []
        for state in states:
            features = prompt.additions.get(id(state.item))
            if features is not None and (rows is None or state.item.row in rows):
                row = state.item.row if rows is None else rows.index(state.item.row)
                index_rows.append(torch.full_like(state.positions, row))
                positions.append(state.positions)
                values.append(features[state.ids.to(features.device), layer_index])
        if not index_rows:
            return hidden
        index = (torch.cat(index_rows), torch.cat(positions))
        return hidden.index_put(index, hidden[index] + torch.cat(values).to(hidden.dtype))

    @staticmethod
    def _positions_mode(plans: list[Plan]) -> str:
        # Only plans that drop tokens renumber anything; an item left whole has no say.
        modes = {plan.positions for plan in plans if not plan.schedule.is_identity} or {"contiguous"}
        if len(modes) > 1:
            raise ValueError(f"the items of one batch resolved to different position modes: {sorted(modes)}")
        return modes.pop()

    @staticmethod
    def _entry_positions(position_ids, entry_index, entry_pad, length: int, mode: str):
        if position_ids is not None and position_ids.dim() == 3:
            # M-RoPE ((3 or 4, B, L): text row first when 4): kept tokens keep their positions.
            if mode != "original":
                raise ValueError("3-D (M-RoPE) position_ids can only be kept, not renumbered")
            position_ids = _gather_positions(position_ids, entry_index)
            return position_ids.masked_fill(entry_pad[None], 0) if entry_pad is not None else position_ids
        if position_ids is None:
            if mode == "contiguous" and entry_pad is None:
                return None  # the decoder numbers the shorter sequence 0..L-1 itself
            position_ids = torch.arange(length, device=entry_index.device)[None]
        position_ids = position_ids.expand(entry_index.shape[0], -1).gather(1, entry_index)
        if mode == "contiguous":
            slot = torch.arange(entry_index.shape[1], device=entry_index.device)
            if entry_pad is not None:
                slot = slot - entry_pad.sum(dim=1, keepdim=True)
            position_ids = position_ids - (entry_index - slot)
        if entry_pad is not None:
            position_ids = position_ids.masked_fill(entry_pad, 0)
        return position_ids

    def _continue_prompt(self, kwargs, cache):
        prompt = self._prompt
        if prompt is None:
            return None
        if prompt.boundaries and cache.get_seq_length() < prompt.entry_length:
            # Assisted decoding prefills the prompt with the first drafts and crops them afterwards:
            # the drafts chose what Stage B kept, so the result would differ from greedy decoding.
            raise NotImplementedError(
                "the cache was cropped into the prefill (assisted or speculative decoding?): under a method that "
                "prunes inside the language model the drafted tokens changed what was kept. Use greedy, sampling or "
                "beam search, or a vision-side method (visionzip, pool, random)"
            )
        prompt.is_prefill = False
        prompt.decode_kwargs.clear()
        entry = prompt.groups[0]
        # Tokens each row dropped at the entry (alignment pads are not tokens of the row).
        shift = prompt.full_length - entry.present()  # (B,)
        attention_mask = kwargs.get("attention_mask")
        new = kwargs["inputs_embeds"].shape[1]
        device = kwargs["inputs_embeds"].device
        if attention_mask is None and entry.pad is not None:  # the alignment pads need masking
            length = prompt.full_length + cache.get_seq_length() - prompt.entry_length + new
            attention_mask = torch.ones(shift.shape[0], length, dtype=torch.long, device=device)
        if attention_mask is not None:
            if attention_mask.dim() != 2 or attention_mask.shape[1] < prompt.full_length:
                raise ValueError("decoding under duet-vlm needs the full-length 2-D attention_mask generate() keeps")
            head = attention_mask.gather(1, prompt.entry_index)
            if entry.pad is not None:
                head = head.masked_fill(entry.pad, 0)
            attention_mask = kwargs["attention_mask"] = torch.cat([head, attention_mask[:, prompt.full_length :]], dim=1)
        prompt.decode_mask = attention_mask
        if entry.pad is None and prompt.full_length == prompt.entry_length:  # nothing dropped at the entry
            return (), kwargs
        position_ids = kwargs.get("position_ids")
        mode = self._positions_mode([state.plan for state in entry.items])
        if position_ids is None and (mode == "original" or entry.pad is not None):
            full = cache.get_seq_length() + (prompt.full_length - prompt.entry_length)
            position_ids = (full + torch.arange(new, device=device))[None].expand(shift.shape[0], -1)
        if mode == "contiguous" and position_ids is not None:
            # Unpadded rows all dropped the same count: a Python int, no device sync (torch.compile).
            uniform = prompt.full_length - prompt.entry_length
            position_ids = position_ids - shift[:, None] if entry.pad is not None else position_ids - uniform
        if position_ids is not None:
            kwargs["position_ids"] = position_ids
        return (), kwargs

    # ----------------------------------------------------------------- decoder layers
    def _layer_hook(self, layer_index: int):
        def hook(module, args, kwargs):
            prompt = self._prompt
            if prompt is None or self._in_stage:
                return None
            if prompt.is_prefill:
                return self._prefill_layer(layer_index, module, args, kwargs)
            # A decoding step: what the compiled model runs over and over. Python state and tensor
            # arithmetic only (no data-dependent branch), so torch.compile traces it into its graph.
            group = prompt.group_of_layer(layer_index)
            if group == 0:
                return None
            if layer_index in prompt.boundaries:
                prompt.decode_kwargs[group] = self._decode_kwargs(prompt.groups[group], args, kwargs)
            kwargs.update(prompt.decode_kwargs[group])
            return args, kwargs

        return hook

    # Prefill-only work selects tokens (data-dependent shapes): torch.compile runs it eagerly
    # instead of breaking its graph at every selection. The hook passes every prefill layer here
    # without reading its index, so dynamo compiles the hook once, not once per layer.
    @torch.compiler.disable
    def _prefill_layer(self, layer_index: int, module, args, kwargs):
        prompt = self._prompt
        if layer_index != 0 and layer_index not in prompt.boundaries:
            return self._group_layer(layer_index, args, kwargs)
        hidden = args[0] if args else kwargs.pop("hidden_states")
        if layer_index == 0:
            entry = prompt.groups[0]
            entry.position_ids, entry.rope_positions = self.adapter.split_positions(
                prompt.lm_position_ids, kwargs, entry.index.shape[0]
            )
            entry.position_embeddings = kwargs["position_embeddings"]
            entry.attention_mask = kwargs.get("attention_mask")
            prompt.input_embeddings = hidden
        if layer_index in prompt.boundaries:
            hidden = self._prune(layer_index, module, hidden)
        return self._group_layer(layer_index, (hidden, *args[1:]), kwargs)

    def _group_layer(self, layer_index: int, args, kwargs):
        """A prefill layer's input is its group's sequence: the group's mask, positions and RoPE."""
        prompt = self._prompt
        hidden = args[0] if args else kwargs.pop("hidden_states")
        prompt.last_layer_input = hidden
        group = prompt.group_of_layer(layer_index)
        if group > 0:
            g = prompt.groups[group]
            kwargs.update(
                attention_mask=g.attention_mask, position_ids=g.position_ids, position_embeddings=g.position_embeddings
            )
        return (hidden, *args[1:]), kwargs

    def _stage_calls(self, layer_index: int, states: list[_ItemState]):
        """The language-stage calls of one boundary: ``(rows or None, [item states], keep)``.

        Items pruned at this boundary with the same plan and the same current count are ranked in one
        call. When every row holds the same sequence of such items the call covers the whole batch
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
        batch = self._prompt.entry_index.shape[0]
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

    def _prune(self, layer_index: int, layer: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        prompt = self._prompt
        previous = prompt.groups[-1]
        batch, length = hidden.shape[:2]
        device = hidden.device
        kept_ids: dict[int, torch.Tensor] = {}  # id(state) -> kept indices into state.positions
        replacements: list[tuple[int, torch.Tensor, torch.Tensor]] = []  # (row, positions, states)
        for rows, states, keep in self._stage_calls(layer_index, previous.items):
            row_list = rows if rows is not None else list(range(batch))
            items_per_row = len(states) // len(row_list)
            visual_index = torch.stack([s.positions for s in states]).view(len(row_list), items_per_row, -1)
            visual_ids = torch.stack([s.ids for s in states]).view(len(row_list), items_per_row, -1)
            view = self._layer_view(layer_index, layer, hidden, previous, row_list, visual_index, visual_ids, states)
            plan = states[0].plan
            self._in_stage = True
            try:
                selection = plan.language.select(view, keep)
            finally:
                self._in_stage = False
            if not isinstance(selection, Selection):
                selection = Selection(selection)
            kept = selection.index
            n_visual = visual_index.shape[-1]
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
                    replacements.append((state.item.row, state.positions[kept[r, j]], selection.hidden_states[r, j]))
        for row, positions, states in replacements:
            hidden = hidden.index_put((torch.full_like(positions, row), positions), states.to(hidden.dtype))

        survivors = torch.ones(batch, length, dtype=torch.bool, device=device)
        if previous.pad is not None:
            survivors &= ~previous.pad
        for state in previous.items:
            chosen = kept_ids.get(id(state))
            if chosen is not None:
                survivors[state.item.row, state.positions] = False
                survivors[state.item.row, state.positions[chosen]] = True
        local, pad = _left_pad([row.nonzero()[:, 0] for row in survivors])
        offset = pad.sum(dim=1, keepdim=True) if pad is not None else 0
        rank = survivors.long().cumsum(dim=1) - 1 + offset
        one_d = previous.rope_positions is previous.position_ids
        position_ids = _gather_positions(previous.position_ids, local)
        rope_positions = position_ids if one_d else _gather_positions(previous.rope_positions, local)
        if self._positions_mode([s.plan for s in previous.items]) == "contiguous":
            if not one_d:
                raise ValueError("multi-axis (M-RoPE) positions cannot be renumbered")
            # Renumber: each survivor moves back by the visual tokens dropped before it (pads are not tokens).
            dropped = ~survivors if previous.pad is None else ~survivors & ~previous.pad
            position_ids = rope_positions = position_ids - dropped.long().cumsum(dim=1).gather(1, local)
        if pad is not None:
            position_ids = position_ids.masked_fill(pad, 0) if position_ids is not None else None
            rope_positions = position_ids if one_d else rope_positions.masked_fill(pad, 0)
        hidden = gather_tokens(hidden, local)
        index = previous.index.gather(1, local)
        states = []
        for state in previous.items:
            chosen = kept_ids.get(id(state))
            positions, ids = (state.positions, state.ids) if chosen is None else (state.positions[chosen], state.ids[chosen])
            states.append(_ItemState(state.item, state.plan, rank[state.item.row, positions], ids))
        if pad is None and previous.pad is None and prompt.groups[0].pad is None:
            mask = _gather_mask(prompt.groups[0].attention_mask, index, index)
        else:
            valid = prompt.valid.gather(1, index) if pad is None else prompt.valid.gather(1, index) & ~pad
            mask = self._build_mask(hidden, valid, query_length=index.shape[1])
        prompt.groups.append(
            _Group(
                index=index,
                pad=pad,
                items=states,
                position_ids=position_ids,
                rope_positions=rope_positions,
                position_embeddings=self.adapter.rotary_emb(hidden, rope_positions),
                attention_mask=mask,
            )
        )
        return hidden

    def _build_mask(self, hidden: torch.Tensor, key_valid: torch.Tensor, query_length: int):
        """The causal mask transformers would build for this attention backend, over ``key_valid``
        keys of which the last ``query_length`` are the queries (a group's own sequence in a prefill,
        the new tokens in a decoding step)."""
        implementation = self.adapter.text_config._attn_implementation
        builder = ALL_MASK_ATTENTION_FUNCTIONS[implementation]
        kv_length = key_valid.shape[1]
        return builder(
            batch_size=key_valid.shape[0],
            q_length=query_length,
            kv_length=kv_length,
            q_offset=kv_length - query_length,
            kv_offset=0,
            mask_function=causal_mask_function,
            attention_mask=key_valid,
            allow_is_causal_skip=False,
            dtype=hidden.dtype,
            device=hidden.device,
        )

    def _layer_view(self, layer_index, layer, hidden, group: _Group, rows, visual_index, visual_ids, states) -> LayerView:
        """What a language stage sees: the whole batch, or only ``rows`` (a row ranked alone)."""
        prompt = self._prompt
        whole = len(rows) == hidden.shape[0]
        select = slice(None) if whole else torch.tensor(rows, device=hidden.device)

        def take(x):  # the rows of this call from a (B, ...) tensor; batch-1 broadcasts stay
            return x if x is None or whole or x.shape[0] == 1 else x[select]

        text_after = []
        for b in rows:
            present = group.index[b] if group.pad is None else group.index[b][~group.pad[b]]
            offset = 0 if group.pad is None else int(group.pad[b].sum())
            text_after.append(torch.searchsorted(present.contiguous(), prompt.text_after_image[b].contiguous()) + offset)
        valid = prompt.valid.gather(1, group.index)
        if group.pad is not None:
            valid = valid & ~group.pad
        cos, sin = group.position_embeddings
        call_group = _Group(
            group.index[select], None, [], position_ids=take(group.position_ids),
            position_embeddings=(take(cos), take(sin)), attention_mask=take(group.attention_mask),
        )
        # Per-prompt memory of a stage (e.g. SparseVLM's raters), one per call: rows and items.
        scratch = prompt.scratch.setdefault((tuple(rows), tuple((s.item.row, s.item.start) for s in states)), {})
        return LayerView(
            layer_index=layer_index,
            layer=layer,
            hidden_states=take(hidden),
            position_embeddings=call_group.position_embeddings,
            visual_index=visual_index,
            visual_ids=visual_ids,
            valid=take(valid),
            input_ids=take(prompt.input_ids.gather(1, group.index)),
            input_embeddings=take(gather_tokens(prompt.input_embeddings, group.index)),
            text_after_image=text_after,
            previous_layer=self.adapter.layers[layer_index - 1],
            previous_hidden_states=take(prompt.last_layer_input),
            scratch=scratch,
            attention_fn=self.adapter.text_to_visual_attention,
            run_layer_fn=lambda module, hidden_: self._with_layer_features(
                self._run_layer(module, hidden_, call_group), layer_index, states, None if whole else list(rows)
            ),
            output_head_fn=self._output_head,
        )

    def _run_layer(self, layer: nn.Module, hidden: torch.Tensor, group: _Group) -> torch.Tensor:
        output = layer(
            hidden,
            attention_mask=group.attention_mask,
            position_ids=group.position_ids,
            position_embeddings=group.position_embeddings,
            past_key_values=None,
            use_cache=False,
        )
        return output[0] if isinstance(output, tuple) else output

    def _output_head(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.adapter.lm_head is None:
            raise RuntimeError("this model has no LM head (attach the reducer to the ...ForConditionalGeneration)")
        return self.adapter.lm_head(self.adapter.final_norm(hidden))

    def _decode_kwargs(self, group: _Group, args, kwargs) -> dict:
        prompt = self._prompt
        hidden = args[0] if args else kwargs["hidden_states"]
        position_ids = kwargs.get("position_ids")
        entry = prompt.groups[0]
        # Original positions: the decoder's own positions and RoPE are already right; only the
        # mask changes. Renumbered ones (1-D RoPE only) shift by what this group dropped.
        contiguous = self._positions_mode([s.plan for s in group.items]) == "contiguous"
        if contiguous:
            dropped = entry.present() - group.present()  # (B,) tokens dropped after the entry
            if group.pad is None and entry.pad is None:
                position_ids = position_ids - (entry.index.shape[1] - group.index.shape[1])
            else:
                position_ids = position_ids - dropped[:, None]
        mask = kwargs.get("attention_mask")
        if group.pad is None and entry.pad is None:
            if mask is not None:
                tail = torch.arange(prompt.entry_length, mask.shape[-1], device=group.index.device)
                kv_index = torch.cat([group.index, tail.expand(group.index.shape[0], -1)], dim=1)
                mask = _gather_mask(mask, None, kv_index)
        else:
            head = prompt.valid.gather(1, group.index)
            if group.pad is not None:
                head = head & ~group.pad
            tail = prompt.decode_mask[:, prompt.entry_length :].bool()
            mask = self._build_mask(hidden, torch.cat([head, tail], dim=1), query_length=hidden.shape[1])
        if not contiguous:
            return dict(attention_mask=mask)
        return dict(
            attention_mask=mask,
            position_ids=position_ids,
            position_embeddings=self.adapter.rotary_emb(hidden, position_ids),
        )

    # ----------------------------------------------------------------- language model exit
    def _leave_language_model(self, module, args, output):
        prompt = self._prompt
        if prompt is None or not prompt.is_prefill:
            return None
        return self._finish_prefill(output)

    @torch.compiler.disable
    def _finish_prefill(self, output):
        prompt = self._prompt
        self._record_stats()
        hidden = output.last_hidden_state
        last = prompt.groups[-1]
        if hidden.shape[1] == prompt.full_length and last.pad is None and bool((prompt.entry_index == torch.arange(prompt.full_length, device=hidden.device)).all()):
            return None
        # The kept token j predicts token j+1 of the reduced sequence; place it just before that
        # token's original slot so transformers' shifted loss and logits_to_keep read it there.
        final = prompt.entry_index.gather(1, last.index)
        full = hidden.new_zeros(hidden.shape[0], prompt.full_length, hidden.shape[-1])
        if last.pad is None:
            end = torch.full_like(final[:, :1], prompt.full_length - 1)
            targets = torch.cat([final[:, 1:] - 1, end], dim=1)
            output.last_hidden_state = full.scatter(1, targets.unsqueeze(-1).expand_as(hidden), hidden)
            self._head_rows = targets
            return output
        for b in range(hidden.shape[0]):
            present = ~last.pad[b]
            row = final[b][present]
            targets = torch.cat([row[1:] - 1, row.new_tensor([prompt.full_length - 1])])
            full[b, targets] = hidden[b][present]
        output.last_hidden_state = full
        return output

    # A full forward (training, scoring) runs the LM head on every position, though dropped slots
    # only hold zeros: run it on the kept states alone and put the logits where they were.
    def _compact_head_input(self, module, args):
        rows = self._head_rows
        if rows is None:
            return None
        if args[0].shape[1] != self._prompt.full_length:  # logits_to_keep sliced it already
            self._head_rows = None
            return None
        return (gather_tokens(args[0], rows), *args[1:])

    def _expand_head_output(self, module, args, output):
        rows, self._head_rows = self._head_rows, None
        if rows is None:
            return None
        full = output.new_zeros(output.shape[0], self._prompt.full_length, output.shape[-1])
        if getattr(module, "bias", None) is not None:  # what the head gives a zero state
            full = full + module.bias.to(full.dtype)
        return full.scatter(1, rows.unsqueeze(-1).expand_as(output), output)

    def _item_stats(self, index: int, state: _ItemState, reduction: VisionReduction | None) -> ItemStats:
        prompt, item = self._prompt, state.item
        counts = [len(prompt.groups[prompt.group_of_layer(l)].items[index].ids) for l in range(len(self.adapter.layers))]
        views, cells = self.adapter.cell_views(item)
        stats = ItemStats(
            row=item.row,
            modality=item.geometry.modality,
            tokens=item.geometry.visual_tokens,
            units=item.geometry.units,
            tokens_per_layer=counts,
            kept_ids=prompt.groups[-1].items[index].ids,
            stage_ids=[(layer, group.items[index].ids) for layer, group in zip(prompt.boundaries, prompt.groups[1:])],
            views=views,
            cells=cells,
        )
        if reduction is None:
            stats.entry_units = self.adapter.slot_units(item)
            stats.entry_slots = torch.arange(item.length)
        else:
            stats.vision_kept = reduction.kept
            stats.entry_slots = self.adapter.vision_slots(item, reduction.kept)
            units, per_unit = reduction.kept.shape
            stats.entry_units = (
                torch.arange(units).repeat_interleave(per_unit)
                if units > 1
                else self.adapter.view_units(item, reduction.kept[0]).cpu()
            )
        return stats

    def _record_stats(self) -> None:
        prompt = self._prompt
        num_layers = len(self.adapter.layers)
        entry = prompt.groups[0]
        vision = prompt.vision
        vision_by_item = {id(item): reduction for item, reduction in vision}
        per_item = [self._item_stats(i, state, vision_by_item.get(id(state.item))) for i, state in enumerate(entry.items)]
        stages = [(layer, g) for layer, g in zip(prompt.boundaries, prompt.groups[1:])]
        uniform = len({(s.tokens, s.units, tuple(s.tokens_per_layer)) for s in per_item}) == 1
        rows = entry.index.shape[0]
        first = per_item[0]
        if uniform and len(per_item) % rows == 0:
            images = len(per_item) // rows
            stage_kept = [
                (layer, torch.stack([s.ids for s in g.items]).view(rows, images, -1)) for layer, g in stages
            ]
            vision_kept = torch.cat([r.kept for _, r in vision]) if vision else None
            roles = {k: torch.cat([r.roles[k] for _, r in vision]) for k in vision[0][1].roles} if vision else {}
            tokens_per_layer, visual_tokens, llm_input = first.tokens_per_layer, first.tokens, first.tokens_per_layer[0]
        else:
            stage_kept, vision_kept, roles = [], None, {}
            mean = [sum(s.tokens_per_layer[l] for s in per_item) / len(per_item) for l in range(num_layers)]
            tokens_per_layer = mean
            visual_tokens = sum(s.tokens for s in per_item) / len(per_item)
            llm_input = mean[0]
        valid = prompt.valid
        is_visual = torch.zeros_like(valid)
        for state in entry.items:
            is_visual[state.item.row, state.positions] = True
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
        dtype = next(self.adapter.language_model.parameters()).dtype
        stats.fill_costs(DecoderDims.from_config(self.adapter.text_config), torch.finfo(dtype).bits // 8)
        self.reducer.stats = stats


def attach(reducer: Reducer, model: nn.Module) -> Attachment:
    """Install ``reducer`` on ``model``; returns a handle whose ``remove()`` undoes it."""
    return Attachment(reducer, model)
