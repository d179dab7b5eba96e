"""The one place that installs hooks on a model (with ``patch_subsets`` for an input stage);
``remove()`` restores it exactly.

Where each hook sits and what it hands to the rest of the runtime:

1. Each vision tower's entry module and feature layer (``taps``): the feature layer's input and
   output, per tower call, for the call that owns them.
2. The top model (``labels``) and the base model (``input_ids`` and the forward's arguments); the
   base model's end also closes the call's forward, and a forward that raised clears its state.
3. The language model's entry (the *feature site*): vision stages run and the sequence is
   compacted (``prefill.start_prefill``); in a decoding step the mask and positions are mapped
   (``decoding.continue_prompt``).
4. Each decoder layer: at a boundary the language stages choose (``boundary.prune``); other layers
   take their segment's mask, positions and RoPE.
5. The language model's exit and the LM head (``exit``), and the call's statistics (``record``).

While attached, each hooked module holds its own class's forward (``retrace``), so that a graph
``torch.compile`` traced without the hooks is traced again instead of running without them.

Prefill work selects tokens (data-dependent shapes), so it sits behind ``torch.compiler.disable``
(dynamo runs it eagerly instead of breaking its graph at every selection); a decoding step is
Python state and tensor arithmetic that ``torch.compile`` traces into its graph.
"""

from __future__ import annotations

import threading
import weakref

import torch
from torch import nn

from ..adapters import ModelAdapter, adapter_for
from ..compat import cache_of, images_of
from .binding import Binding
from .boundary import prune
from .calls import CallStore
from .decoding import continue_step, decoding_layer, unreduced_decode_positions
from .entry import (
    base_input_ids,
    brings_visual_items,
    check_new_items_on_cache,
    check_turn_on_cache,
    reduces_nothing,
)
from .exit import compact_head_input, expand_head_output, finish_prefill
from .inputs import segment_layer_inputs, token_argument
from .patch_subsets import input_stage_of, patch_subset_hooks
from .prefill import WholeItems, open_prefill
from .protocol import RuntimeReducer
from .record import PrefillRecord, UnreadStats, prefill_stats, text_only_stats, whole_stats
from .retrace import ForwardMarks, unmarked_refusal
from .static import cache_state, entry_mask, prefill_layer, static_layers

# Models with a reducer attached: two reducers on one model would stack their hooks. A model's
# slot is taken (checked and reserved) under the lock, so of two threads attaching at once one wins.
_ATTACHED: "weakref.WeakKeyDictionary[nn.Module, Attachment]" = weakref.WeakKeyDictionary()
_ATTACHING = threading.Lock()


class Attachment:
    """Hooks of one reducer on one model; ``remove()`` restores the model exactly."""

    def __init__(self, reducer: RuntimeReducer, model: nn.Module):
        self.model = model
        self._handles: list = []
        self._stats = UnreadStats()
        with _ATTACHING:
            if model in _ATTACHED:
                raise RuntimeError("a duet-vlm reducer is already attached to this model; remove it first")
            _ATTACHED[model] = self
        try:
            self.reducer = reducer
            self.adapter: ModelAdapter = adapter_for(model)
            self.binding = Binding(reducer, self.adapter)
            self.plan, self.schedule = self.binding.plan, self.binding.schedule
            self.calls = CallStore()
            self._marks: ForwardMarks | None = None
            self._install()
            self._marks = ForwardMarks(model, self._handles)
            refusal = unmarked_refusal(model, self._marks)
            if refusal is not None:
                raise RuntimeError(refusal)
        except BaseException:
            self.remove()
            raise

    def plan_for(self, geometry):
        return self.binding.plan_for(geometry)

    def _install(self) -> None:
        a, add = self.adapter, self._handles.append
        # Captured for every reducer: the plan of an item (and whether it has a vision stage) is
        # only known once the item's size is, at the language model's entry.
        for name, layer in a.towers.items():
            add(layer.register_forward_pre_hook(self._keep_vision_input(name), with_kwargs=True))
            add(layer.register_forward_hook(self._keep_vision_output(name)))
        input_stage = input_stage_of(self.reducer, a)
        for name, module in a.tower_entries.items():
            add(module.register_forward_pre_hook(self._enter_tower(name), with_kwargs=True))
            if input_stage is not None:
                self._handles += patch_subset_hooks(a, lambda: self.calls.current().captures, name, module, input_stage)
            for layer in self.reducer.encoder_layers(a.geometry):  # other encoder layers a vision stage reads
                add(a.encoder_layer(name, layer).register_forward_pre_hook(self._keep_layer_input(name, layer), with_kwargs=True))
            add(module.register_forward_hook(self._leave_tower(name)))
        if a.top is not None:
            add(a.top.register_forward_pre_hook(self._keep_labels, with_kwargs=True))
            add(a.top.register_forward_hook(self._forget_labels))
        add(a.base.register_forward_pre_hook(self._find_items, with_kwargs=True))
        add(a.base.register_forward_hook(self._end_forward))
        add(a.language_model.register_forward_pre_hook(self._enter_language_model, with_kwargs=True))
        add(a.language_model.register_forward_hook(self._leave_language_model))
        if a.lm_head is not None:
            add(a.lm_head.register_forward_pre_hook(self._compact_head_input))
            add(a.lm_head.register_forward_hook(self._expand_head_output))
        # A family whose language model adds visual features after its first layers (DeepStack):
        # the runtime adds them to the kept tokens itself, after each of those layers.
        adds_features = type(a).take_layer_additions is not ModelAdapter.take_layer_additions
        for index, layer in enumerate(a.layers):
            add(layer.register_forward_pre_hook(self._layer_hook(index), with_kwargs=True))
            if adds_features:
                add(layer.register_forward_hook(self._add_layer_features(index)))

    def remove(self) -> None:
        if getattr(self, "_marks", None) is not None:
            self._marks.remove()
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        with _ATTACHING:
            if _ATTACHED.get(self.model) is self:
                del _ATTACHED[self.model]
        self.calls = CallStore()
        self._stats.compute()  # readable after removal, without holding the model

    # ----------------------------------------------------------------- vision towers
    def _enter_tower(self, tower: str):
        def hook(module, args, kwargs):
            self.calls.current().captures.enter_tower(tower, args, kwargs)

        return hook

    def _leave_tower(self, tower: str):
        def hook(module, args, output):
            self.calls.current().captures.leave_tower(tower, output)

        return hook

    def _keep_vision_input(self, tower: str):
        def hook(module, args, kwargs):
            call = self.calls.current()
            call.captures.keep_input(tower, args, kwargs)
            call.kept.keep(module)  # FSDP2: the signals read it after the tower returns

        return hook

    def _keep_layer_input(self, tower: str, layer):
        def hook(module, args, kwargs):
            call = self.calls.current()
            call.captures.keep_layer_input(tower, layer, args, kwargs)
            call.kept.keep(module)

        return hook

    def _keep_vision_output(self, tower: str):
        def hook(module, args, output):
            self.calls.current().captures.keep_output(tower, output)

        return hook

    # ----------------------------------------------------------------- a forward's inputs
    def _keep_labels(self, module, args, kwargs):
        call = self.calls.current()
        call.labels, call.logits_to_keep = kwargs.get("labels"), kwargs.get("logits_to_keep")
        call.hidden_states_asked = bool(kwargs.get("output_hidden_states"))

    def _forget_labels(self, module, args, output):
        self.calls.current().labels = None

    def _find_items(self, module, args, kwargs):
        call = self.calls.current()
        if call.forwards:  # the last forward of this thread never reached its end: it raised
            call.forget()
        call.forwards += 1
        check_new_items_on_cache(self.binding, call.prompt, kwargs)
        encoded = kwargs.get("mm_encoder_outputs")
        if images_of(kwargs) is not None or kwargs.get("pixel_values_videos") is not None:
            call.captures.clear()  # this forward encodes its own pixels: earlier captures are stale
        elif encoded:  # generate() encoded them: keep exactly the captures of that encoding
            call.captures.keep_only(encoded.values())
        input_ids = base_input_ids(self.adapter, module, args, kwargs)
        # Items are found at the language model's entry, after transformers' own placeholder checks
        # ran: a mismatch surfaces as transformers' error, not ours.
        call.found = (input_ids, kwargs)
        # a static cache's masks, built by generate for the unreduced prompt: the 2-D mask instead
        layers = static_layers(cache_of(kwargs))
        changed = layers is not None and entry_mask(
            self.binding.scheme, call.prompt, kwargs, layers, reduces_nothing(self.binding, call.prompt),
            brings_visual_items(kwargs),
        )
        if unreduced_decode_positions(self.binding, call.prompt, input_ids, kwargs) or changed:
            return args, kwargs
        return None

    def _end_forward(self, module, args, output):
        call = self.calls.current()
        call.forwards = max(0, call.forwards - 1)
        call.found = None
        call.kept.release()

    # ----------------------------------------------------------------- language model entry
    def _enter_language_model(self, module, args, kwargs):
        call = self.calls.current()
        cache = cache_of(kwargs)
        found, call.found = call.found, None
        cached, on_cache = cache_state(cache)
        if on_cache:
            check_turn_on_cache(self.binding, call.prompt, found, kwargs, cached)
            if call.prompt is None:
                return None
            return continue_step(self.binding, call.prompt, kwargs, cache, found, cached)
        call.prompt = None
        if found is None:
            return None
        return self._begin_prompt(call, found, kwargs)

    @torch.compiler.disable  # finds items and selects tokens (data-dependent): eager under torch.compile
    def _begin_prompt(self, call, found, kwargs):
        opened = open_prefill(self.binding, call, found, kwargs)
        call.kept.release()  # the vision signals are read: the tower's layers may be freed
        if opened is None:
            self._stats.record(self.reducer, text_only_stats, self.binding, found[0], kwargs.get("attention_mask"))
            return None
        if isinstance(opened, WholeItems):
            call.prompt = None
            self._stats.record(self.reducer, whole_stats, self.binding, found[0], opened.items)
            return None
        self.calls.remember_grad_call(call)
        return (), kwargs

    # ----------------------------------------------------------------- decoder layers
    def _layer_hook(self, layer_index: int):
        def hook(module, args, kwargs):
            call = self.calls.for_layers()
            prompt = call.prompt
            if prompt is None or call.in_stage:
                return None
            if prompt.is_prefill:
                return self._prefill_layer(call, layer_index, module, args, kwargs)
            # A decoding step: what the compiled model runs over and over. Python state and tensor
            # arithmetic only (no data-dependent branch), so torch.compile traces it into its graph.
            return decoding_layer(self.binding.scheme, prompt, layer_index, args, kwargs)

        return hook

    # Prefill-only work selects tokens (data-dependent shapes): torch.compile runs it eagerly
    # instead of breaking its graph at every selection. The hook passes every prefill layer here
    # without reading its index, so dynamo compiles the hook once, not once per layer.
    @torch.compiler.disable
    def _prefill_layer(self, call, layer_index: int, module, args, kwargs):
        prompt = call.prompt
        scratch = prompt.scratch
        hidden = args[0] if args else kwargs.pop("hidden_states")
        scheme = self.binding.scheme
        kind = scheme.kinds[layer_index]
        number, opens, precedes = prompt.layer_roles(len(scheme.kinds))[layer_index]
        if layer_index == scheme.first_of_kind[kind]:  # the mask and RoPE the model built for this kind
            prompt.segments[0].inputs.keep(kind, kwargs)
        if layer_index == 0:
            entry = prompt.segments[0].inputs
            entry.position_ids, entry.rope_positions = self.adapter.split_positions(
                scratch.lm_position_ids, kwargs, prompt.segments[0].steps.batch
            )
            if any(item.plan.language is not None and item.plan.language.needs_input_embeddings for item in prompt.items):
                scratch.input_embeddings = hidden
        spec = scheme.layer_token_argument
        if spec is not None and (opens or precedes):
            # a stage may run this layer outside the forward (PIO's probe): keep its per-token argument
            scratch.layer_arguments[layer_index] = token_argument(spec, args, kwargs)
        if opens:
            if torch.is_grad_enabled():  # a backward pass may recompute this boundary after later layers
                scratch.boundary_inputs.setdefault(layer_index, scratch.last_layer_input)
            elif scratch.last_layer_input is not None:  # what a stage scoring with the layer before reads
                scratch.last_layer_keys = scheme.cached_layer_keys(
                    self.adapter.layers[layer_index - 1], layer_index - 1, cache_of(kwargs), scratch.last_layer_input
                )
            hidden = prune(self.binding, call, prompt, layer_index, module, hidden)
            scratch.last_layer_keys = None
            call.kept.release()  # the layer before the boundary is read
        if precedes:  # FSDP2: a stage may read this layer after its forward
            call.kept.keep(module)
        # Kept only where a boundary follows (a stage may score with the layer before it), so no
        # layer's input outlives the next layer.
        scratch.last_layer_input = hidden if precedes else None
        if number > 0:
            args, kwargs = segment_layer_inputs(scheme, prompt, number, layer_index, kind, hidden, args, kwargs)
        else:
            args = (hidden, *args[1:])
        tokens = prompt.segments[number].steps.length
        return args, prefill_layer(prompt, scheme, cache_of(kwargs), layer_index, tokens, args[0], kwargs)

    def _add_layer_features(self, layer_index: int):
        def hook(module, args, output):
            call = self.calls.for_layers()
            prompt = call.prompt
            if prompt is None or not prompt.is_prefill or call.in_stage or layer_index >= prompt.addition_layers:
                return None
            hidden = output[0] if isinstance(output, tuple) else output
            segment = prompt.segments[prompt.segment_of_layer(layer_index)]
            added = prompt.with_layer_features(hidden, layer_index, segment.placements)
            if added is hidden:
                return None
            return (added, *output[1:]) if isinstance(output, tuple) else added

        return hook

    # ----------------------------------------------------------------- language model exit
    def _leave_language_model(self, module, args, output):
        call = self.calls.current()
        prompt = call.prompt
        if prompt is None or not prompt.is_prefill:
            return None
        return self._finish_prefill(call, output)

    @torch.compiler.disable
    def _finish_prefill(self, call, output):
        prompt = call.prompt
        record = PrefillRecord.of(prompt, len(self.adapter.layers))
        self._stats.record(self.reducer, prefill_stats, self.binding, record)
        output, call.head_rows = finish_prefill(prompt, output)
        if not torch.is_grad_enabled():
            # Only a backward pass (gradient checkpointing) would run the prefill's layers again:
            # without one, what they alone read need not live through the decoding steps.
            prompt.end_prefill()
        return output

    def _compact_head_input(self, module, args):
        call = self.calls.current()
        rows = call.head_rows
        if rows is None:
            return None
        compact = compact_head_input(call.prompt, rows, args)
        if compact is None:  # logits_to_keep sliced it already
            call.head_rows = None
        return compact

    def _expand_head_output(self, module, args, output):
        call = self.calls.current()
        rows, call.head_rows = call.head_rows, None
        if rows is None:
            return None
        return expand_head_output(call.prompt, rows, module, output)


def attach(reducer: RuntimeReducer, model: nn.Module) -> Attachment:
    """Install ``reducer`` on ``model``; returns a handle whose ``remove()`` undoes it."""
    return Attachment(reducer, model)
