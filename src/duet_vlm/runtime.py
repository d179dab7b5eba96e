"""Applies a method's ``Plan`` to a model through module hooks. Knows no particular method.

Where things happen (LLaVA names; the adapter gives the modules for other families):

1. The vision feature layer: a pre-hook keeps its input (for the CLS-attention row and keys) and a
   forward hook its output (the features, CLS included). The tower keeps its attention backend.
2. The projector: a pre-hook swaps its input for the vision stage's ``k`` tokens per image, a forward
   hook pads the projected tokens back to the placeholder count with zeros, so transformers'
   placeholder check and ``masked_scatter`` run unchanged.
3. The language model's entry: in a prefill, the unused placeholder slots are removed from
   ``inputs_embeds``, ``attention_mask`` and ``position_ids`` — the decoder sees exactly the prompt
   of an image with ``k`` tokens. In decoding steps the full-length mask and positions that
   ``generate`` keeps are mapped onto that shorter sequence.
4. Each decoder layer: at a boundary the language stage picks the survivors and the layer's input,
   mask, positions and RoPE are gathered; later layers of the group reuse them. Each layer's KV
   cache therefore holds only its own tokens.
5. The language model's output: in a prefill, hidden states are scattered back to the input length
   (dropped slots are zeros) so logits and ``labels`` line up as transformers expects: the state of
   each kept token sits just before the next kept token, which is what the shifted loss reads.

Positions follow the reference by default ("contiguous": renumbered after every drop, decode
positions shifted per layer group); ``positions="original"`` keeps the original ones (FastV-style).
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field

import torch
from torch import nn

from .adapters import ModelAdapter, adapter_for
from .flops import DecoderDims
from .methods.base import LayerView, Plan, Reducer, Selection, VisionReduction, VisionView
from .selection import gather_tokens
from .stats import ReductionStats


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


def _rank_in(sorted_index: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Where each of ``positions`` sits in the ascending per-row ``sorted_index``."""
    return torch.searchsorted(sorted_index.contiguous(), positions.contiguous())


@dataclass
class _Group:
    """The sequence seen by the decoder layers between two boundaries, during the prefill."""

    index: torch.Tensor  # (B, L_g) positions in the LLM-entry sequence
    visual: torch.Tensor  # (B, n_images, n_g) positions of the visual tokens in this sequence
    visual_ids: torch.Tensor  # (B, n_images, n_g) the same tokens as indices into the entry visual block
    position_ids: torch.Tensor  # (B, L_g)
    position_embeddings: tuple[torch.Tensor, torch.Tensor]
    attention_mask: object = None


@dataclass
class _Prompt:
    """One prefill's bookkeeping, kept for the decoding steps that follow it."""

    full_length: int
    entry_index: torch.Tensor  # (B, L_entry) positions in the full input kept at the LLM entry
    images_per_row: int
    valid: torch.Tensor  # (B, L_entry)
    input_ids: torch.Tensor  # (B, L_entry)
    text_after_image: list[torch.Tensor]  # per row, positions in the entry sequence
    groups: list[_Group] = field(default_factory=list)
    decode_kwargs: dict[int, dict] = field(default_factory=dict)
    is_prefill: bool = True
    input_embeddings: torch.Tensor | None = None  # (B, L_entry, D)
    last_layer_input: torch.Tensor | None = None
    scratch: dict = field(default_factory=dict)

    @property
    def entry_length(self) -> int:
        return self.entry_index.shape[1]


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
        self.plan: Plan = reducer.resolve(self.adapter.geometry)
        self.schedule = self.plan.schedule
        self.boundaries = dict(self.schedule.boundaries)
        self._vision_input: torch.Tensor | None = None
        self._vision_output: torch.Tensor | None = None
        self._vision: VisionReduction | None = None
        self._labels: torch.Tensor | None = None
        self._image_mask: torch.Tensor | None = None
        self._input_ids: torch.Tensor | None = None
        self._prompt: _Prompt | None = None
        self._in_stage = False  # a stage is running a layer itself: hooks stand aside
        self._handles: list = []
        try:
            self._install()
        except BaseException:
            self.remove()
            raise
        _ATTACHED[model] = self

    # ----------------------------------------------------------------- installation
    def _install(self) -> None:
        a, add = self.adapter, self._handles.append
        if self.plan.vision is not None:
            add(a.vision_layer.register_forward_pre_hook(self._keep_vision_input, with_kwargs=True))
            add(a.vision_layer.register_forward_hook(self._keep_vision_output))
            add(a.projector.register_forward_pre_hook(self._reduce_vision_tokens))
            add(a.projector.register_forward_hook(self._pad_projected_tokens))
        if a.top is not None:
            add(a.top.register_forward_pre_hook(self._keep_labels, with_kwargs=True))
            add(a.top.register_forward_hook(self._forget_labels))
        add(a.base.register_forward_pre_hook(self._find_images, with_kwargs=True))
        add(a.language_model.register_forward_pre_hook(self._enter_language_model, with_kwargs=True))
        add(a.language_model.register_forward_hook(self._leave_language_model))
        for index, layer in enumerate(a.layers):
            add(layer.register_forward_pre_hook(self._layer_hook(index), with_kwargs=True))

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        if _ATTACHED.get(self.model) is self:
            del _ATTACHED[self.model]
        self._vision_input = self._vision_output = self._vision = None
        self._labels = self._image_mask = self._input_ids = self._prompt = None

    # ----------------------------------------------------------------- vision side
    def _keep_vision_input(self, module, args, kwargs):
        self._vision_input = args[0] if args else kwargs["hidden_states"]

    def _keep_vision_output(self, module, args, output):
        self._vision_output = output[0] if isinstance(output, tuple) else output

    def _reduce_vision_tokens(self, module, args):
        features, layer_input = self._vision_output, self._vision_input
        self._vision_output = self._vision_input = None
        if features is None or features.shape[0] != args[0].shape[0]:
            raise RuntimeError("the projector ran without a matching pass of the vision feature layer")
        cls_attention, keys = self.adapter.vision_scores(layer_input)
        view = VisionView(features, cls_attention, keys, self.adapter.geometry.grid, self.adapter.geometry.has_cls)
        keep = self.schedule.llm_input
        reduction = self.plan.vision.reduce(view, keep)
        expected = (features.shape[0], keep, features.shape[-1])
        if tuple(reduction.features.shape) != expected:
            raise RuntimeError(f"{type(self.plan.vision).__name__} returned {tuple(reduction.features.shape)}, expected {expected}")
        self._vision = reduction
        return (reduction.features.to(args[0].dtype), *args[1:])

    def _pad_projected_tokens(self, module, args, output):
        images, kept, hidden = output.shape
        padding = output.new_zeros(images, self.adapter.geometry.visual_tokens - kept, hidden)
        return torch.cat([output, padding], dim=1)

    # ----------------------------------------------------------------- inputs
    def _keep_labels(self, module, args, kwargs):
        self._labels = kwargs.get("labels")

    def _forget_labels(self, module, args, output):
        self._labels = None

    def _find_images(self, module, args, kwargs):
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        if input_ids is None:
            embeds = kwargs["inputs_embeds"]
            token = module.get_input_embeddings()(torch.tensor(self.adapter.image_token_id, device=embeds.device))
            self._image_mask = (embeds == token).all(-1)
            self._input_ids = torch.where(self._image_mask, self.adapter.image_token_id, -1)
        else:
            self._image_mask = input_ids == self.adapter.image_token_id
            self._input_ids = input_ids

    # ----------------------------------------------------------------- language model entry
    def _enter_language_model(self, module, args, kwargs):
        cache = kwargs.get("past_key_values")
        image_mask, self._image_mask = self._image_mask, None
        if cache is not None and cache.get_seq_length() > 0:
            if image_mask is not None and image_mask.any():
                raise NotImplementedError("duet-vlm reduces images in the prefill only, not in a continued cache")
            return self._continue_prompt(kwargs, cache)
        self._prompt = None
        if image_mask is None or not image_mask.any():
            return None
        return self._start_prompt(kwargs, image_mask)

    def _start_prompt(self, kwargs, image_mask: torch.Tensor):
        batch, length = image_mask.shape
        slots = self.adapter.geometry.visual_tokens
        counts = image_mask.sum(dim=1)
        if (counts != counts[0]).any() or counts[0] % slots:
            raise ValueError(
                f"every row must hold the same number of images of {slots} tokens; image tokens per row: {counts.tolist()}"
            )
        images = int(counts[0]) // slots
        if self.plan.vision is not None and (self._vision is None or self._vision.features.shape[0] != batch * images):
            raise RuntimeError(
                "image features were not computed under this reducer (pass pixel_values, not precomputed features)"
            )
        kept_slots = self.schedule.llm_input
        visual_full = image_mask.nonzero()[:, 1].view(batch, images, slots)
        keep = ~image_mask
        keep.scatter_(1, visual_full[..., :kept_slots].reshape(batch, -1), True)
        entry_index = keep.nonzero()[:, 1].view(batch, -1)
        entry_length = entry_index.shape[1]

        attention_mask = kwargs.get("attention_mask")
        if attention_mask is not None and attention_mask.dim() != 2:
            raise ValueError("duet-vlm needs a 2-D attention_mask (or None) at the language model input")
        if entry_length != length:
            kwargs["inputs_embeds"] = gather_tokens(kwargs["inputs_embeds"], entry_index)
            if attention_mask is not None:
                attention_mask = kwargs["attention_mask"] = attention_mask.gather(1, entry_index)
            kwargs["position_ids"] = self._entry_positions(kwargs.get("position_ids"), entry_index, length)
            if self.plan.positions == "original" and attention_mask is None and kwargs.get("past_key_values") is None:
                # Gapped positions without a mask would be read as packed sequences by transformers.
                kwargs["attention_mask"] = torch.ones_like(entry_index)
        valid = attention_mask.bool() if attention_mask is not None else torch.ones_like(entry_index, dtype=torch.bool)

        rank = keep.long().cumsum(dim=1) - 1
        visual_entry = rank.gather(1, visual_full[..., :kept_slots].reshape(batch, -1)).view(batch, images, kept_slots)
        input_ids = self._input_ids.gather(1, entry_index)
        labels = self._labels
        if labels is not None and labels.shape == image_mask.shape:
            instruction = labels.to(entry_index.device).gather(1, entry_index) == -100
        else:
            instruction = torch.ones_like(valid)
        last_image = rank.gather(1, visual_full[:, -1, -1:])  # (B, 1)
        positions = torch.arange(entry_length, device=entry_index.device)
        text = (positions[None] > last_image) & valid & instruction
        text_after = [row.nonzero()[:, 0] for row in text]
        text_after = [t if len(t) else positions[-1:] for t in text_after]
        self._prompt = _Prompt(length, entry_index, images, valid, input_ids, text_after)
        visual_ids = torch.arange(kept_slots, device=entry_index.device).expand(batch, images, -1)
        self._prompt.groups.append(_Group(positions.expand(batch, -1), visual_entry, visual_ids, None, None))
        return (), kwargs

    def _entry_positions(self, position_ids, entry_index: torch.Tensor, length: int):
        if position_ids is None:
            if self.plan.positions == "contiguous":
                return None  # the decoder numbers the shorter sequence 0..L-1 itself
            position_ids = torch.arange(length, device=entry_index.device)[None]
        position_ids = position_ids.expand(entry_index.shape[0], -1).gather(1, entry_index)
        if self.plan.positions == "contiguous":
            dropped_before = entry_index - torch.arange(entry_index.shape[1], device=entry_index.device)
            position_ids = position_ids - dropped_before
        return position_ids

    def _continue_prompt(self, kwargs, cache):
        prompt = self._prompt
        if prompt is None:
            return None
        prompt.is_prefill = False
        prompt.decode_kwargs.clear()
        shift = prompt.full_length - prompt.entry_length
        if shift == 0:
            return None
        attention_mask = kwargs.get("attention_mask")
        if attention_mask is not None:
            if attention_mask.dim() != 2 or attention_mask.shape[1] < prompt.full_length:
                raise ValueError("decoding under duet-vlm needs the full-length 2-D attention_mask generate() keeps")
            kwargs["attention_mask"] = torch.cat(
                [attention_mask.gather(1, prompt.entry_index), attention_mask[:, prompt.full_length :]], dim=1
            )
        position_ids = kwargs.get("position_ids")
        if self.plan.positions == "contiguous":
            if position_ids is not None:
                kwargs["position_ids"] = position_ids - shift
        elif position_ids is None:
            new = kwargs["inputs_embeds"].shape[1]
            device = kwargs["inputs_embeds"].device
            kwargs["position_ids"] = (cache.get_seq_length() + shift + torch.arange(new, device=device))[None]
        return (), kwargs

    # ----------------------------------------------------------------- decoder layers
    def _layer_hook(self, layer_index: int):
        def hook(module, args, kwargs):
            prompt = self._prompt
            if prompt is None or self._in_stage:
                return None
            group = self.schedule.group_of_layer(layer_index)
            if not prompt.is_prefill:
                if group == 0:
                    return None
                if layer_index in self.boundaries:
                    prompt.decode_kwargs[group] = self._decode_kwargs(prompt.groups[group], args, kwargs)
                kwargs.update(prompt.decode_kwargs[group])
                return args, kwargs
            hidden = args[0] if args else kwargs.pop("hidden_states")
            if layer_index == 0:
                entry = prompt.groups[0]
                entry.position_ids = kwargs["position_ids"].expand(entry.index.shape[0], -1)
                entry.position_embeddings = kwargs["position_embeddings"]
                entry.attention_mask = kwargs.get("attention_mask")
                prompt.input_embeddings = hidden
            if layer_index in self.boundaries:
                hidden = self._prune(layer_index, module, hidden, self.boundaries[layer_index])
            prompt.last_layer_input = hidden
            if group > 0:
                g = prompt.groups[group]
                kwargs.update(
                    attention_mask=g.attention_mask, position_ids=g.position_ids, position_embeddings=g.position_embeddings
                )
            return (hidden, *args[1:]), kwargs

        return hook

    def _prune(self, layer_index: int, layer: nn.Module, hidden: torch.Tensor, keep: int) -> torch.Tensor:
        prompt = self._prompt
        previous = prompt.groups[-1]
        batch = hidden.shape[0]
        text_after = [_rank_in(previous.index[b], prompt.text_after_image[b]) for b in range(batch)]
        layers = self.adapter.layers
        view = LayerView(
            layer_index=layer_index,
            layer=layer,
            hidden_states=hidden,
            position_embeddings=previous.position_embeddings,
            visual_index=previous.visual,
            visual_ids=previous.visual_ids,
            valid=prompt.valid.gather(1, previous.index),
            input_ids=prompt.input_ids.gather(1, previous.index),
            input_embeddings=gather_tokens(prompt.input_embeddings, previous.index),
            text_after_image=text_after,
            previous_layer=layers[layer_index - 1],
            previous_hidden_states=prompt.last_layer_input,
            scratch=prompt.scratch,
            attention_fn=self.adapter.text_to_visual_attention,
            run_layer_fn=lambda module, states: self._run_layer(module, states, previous),
            output_head_fn=self._output_head,
        )
        self._in_stage = True
        try:
            selection = self.plan.language.select(view, keep)
        finally:
            self._in_stage = False
        if not isinstance(selection, Selection):
            selection = Selection(selection)
        kept = selection.index
        n_visual = previous.visual.shape[-1]
        if kept.shape != (batch, prompt.images_per_row, keep) or (keep and (kept.min() < 0 or kept.max() >= n_visual)):
            raise RuntimeError(f"{type(self.plan.language).__name__}.select returned invalid indices {tuple(kept.shape)}")
        if selection.hidden_states is None:
            kept = kept.sort(dim=-1).values
        elif (kept.diff(dim=-1) <= 0).any():
            raise RuntimeError("a Selection with hidden_states must list its indices in ascending order")
        kept_positions = previous.visual.gather(2, kept).reshape(batch, -1)
        if selection.hidden_states is not None:
            replacement = selection.hidden_states.reshape(batch, -1, hidden.shape[-1]).to(hidden.dtype)
            hidden = hidden.scatter(1, kept_positions.unsqueeze(-1).expand_as(replacement), replacement)
        survivors = torch.ones(hidden.shape[:2], dtype=torch.bool, device=hidden.device)
        survivors.scatter_(1, previous.visual.reshape(batch, -1), False)
        survivors.scatter_(1, kept_positions, True)
        local = survivors.nonzero()[:, 1].view(batch, -1)
        rank = survivors.long().cumsum(dim=1) - 1
        position_ids = previous.position_ids.gather(1, local)
        if self.plan.positions == "contiguous":
            position_ids = position_ids - (local - torch.arange(local.shape[1], device=local.device))
        hidden = gather_tokens(hidden, local)
        index = previous.index.gather(1, local)
        prompt.groups.append(
            _Group(
                index=index,
                visual=rank.gather(1, kept_positions).view_as(kept),
                visual_ids=previous.visual_ids.gather(2, kept),
                position_ids=position_ids,
                position_embeddings=self.adapter.rotary_emb(hidden, position_ids),
                attention_mask=_gather_mask(prompt.groups[0].attention_mask, index, index),
            )
        )
        return hidden

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
        position_ids = kwargs["position_ids"]
        if self.plan.positions == "contiguous":
            position_ids = position_ids - (prompt.entry_length - group.index.shape[1])
        mask = kwargs.get("attention_mask")
        if mask is not None:
            tail = torch.arange(prompt.entry_length, mask.shape[-1], device=group.index.device)
            kv_index = torch.cat([group.index, tail.expand(group.index.shape[0], -1)], dim=1)
            mask = _gather_mask(mask, None, kv_index)
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
        self._record_stats()
        hidden = output.last_hidden_state
        final = prompt.entry_index.gather(1, prompt.groups[-1].index)
        if hidden.shape[1] == prompt.full_length:
            return None
        # The kept token j predicts token j+1 of the reduced sequence; place it just before that
        # token's original slot so transformers' shifted loss and logits_to_keep read it there.
        last = torch.full_like(final[:, :1], prompt.full_length - 1)
        targets = torch.cat([final[:, 1:] - 1, last], dim=1)
        full = hidden.new_zeros(hidden.shape[0], prompt.full_length, hidden.shape[-1])
        output.last_hidden_state = full.scatter(1, targets.unsqueeze(-1).expand_as(hidden), hidden)
        return output

    def _record_stats(self) -> None:
        prompt, schedule = self._prompt, self.schedule
        groups = prompt.groups
        per_layer = [groups[schedule.group_of_layer(l)].visual.shape[-1] for l in range(schedule.num_layers)]
        visual_entry = groups[0].visual.reshape(groups[0].visual.shape[0], -1)
        is_visual = torch.zeros_like(prompt.valid).scatter_(1, visual_entry, True)
        text_tokens = (prompt.valid & ~is_visual).sum(dim=1).tolist()
        vision = self._vision if self.plan.vision is not None else None
        stats = ReductionStats(
            tokens_per_layer=per_layer,
            visual_tokens=schedule.visual_tokens,
            llm_input_tokens=schedule.llm_input,
            text_tokens=text_tokens,
            vision_kept=vision.kept if vision is not None else None,
            vision_roles=dict(vision.roles) if vision is not None else {},
            stage_kept=[(layer, g.visual_ids) for (layer, _), g in zip(schedule.boundaries, groups[1:])],
        )
        dtype = next(self.adapter.language_model.parameters()).dtype
        stats.fill_costs(
            DecoderDims.from_config(self.adapter.text_config), prompt.images_per_row, torch.finfo(dtype).bits // 8
        )
        self.reducer.stats = stats


def attach(reducer: Reducer, model: nn.Module) -> Attachment:
    """Install ``reducer`` on ``model``; returns a handle whose ``remove()`` undoes it."""
    return Attachment(reducer, model)
