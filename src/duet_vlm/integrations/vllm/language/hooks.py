"""The model's side: hooks on a vLLM language model's decoder layers that run a step's drops
(``LanguageStages``), with the method's own ``LanguageStage.select`` (the code of the Hugging Face
path) choosing each dropping request's tokens at a boundary from a ``LayerView`` of the step's rows."""

from __future__ import annotations

import dataclasses
import inspect

import torch

from . import ops
from ....adapters.scheme import visual_attention
from ....plan import LayerView, Selection
from ....runtime.boundary import drops_all
from ..select import all_heads
from .checks import StageNotServed
from .scheme import DecoderScheme
from .steps import RowDrop, StepPlan

#: when a list (tests, with vLLM's engine in their process): each boundary's choice is appended as
#: ``(request id, layer, item, ids)``, ``ids`` the kept tokens' indices into the item's visual block
#: entering the language model (``ReductionStats.stage_kept``'s).
TRACE: list | None = None


@dataclasses.dataclass
class StepState:
    """What the hooks keep through one forward of a step that drops or renumbers."""

    step: StepPlan
    renumbers: bool  # some request's positions change in some layer (``StepPlan.renumbers``)
    embeddings: torch.Tensor | None  # the step's input embeddings (SparseVLM's raters read them)
    index: torch.Tensor | None = None  # the step's rows the layers hold now (None: all, before any boundary)
    positions: torch.Tensor | None = None  # the held rows' positions (None: the decoder's own)
    captured: dict = dataclasses.field(default_factory=dict)  # layer -> its rotated (queries, keys), as it ran
    inputs: dict = dataclasses.field(default_factory=dict)  # layer -> its input as one residual stream
    ids: dict = dataclasses.field(default_factory=dict)  # (batch index, item) -> kept ids into the item's block
    scratch: dict = dataclasses.field(default_factory=dict)  # (request, item) -> a stage's ``LayerView.scratch``
    layer_qk: tuple | None = None  # (layer, its queries and keys) computed at a boundary that reads "layer"
    renumbered: dict = dataclasses.field(default_factory=dict)  # drops per request -> (positions, held, renumbered)


class LanguageStages:
    """Hooks on a vLLM language model's decoder layers that run each step's drops (``StepPlan``,
    handed over by the runner before the forward: ``next_step``): a stage's scores from the step's
    own queries and keys, the gather at a boundary, the kept rows' positions in the layers after it,
    and the output scattered back to the step's rows."""

    def __init__(self, owner, scheme: DecoderScheme) -> None:
        self.owner = owner  # the model the runner calls (its forward returns the decoder's output rows)
        self.scheme = scheme  # what each layer takes, which score and slide, how they compute queries and keys
        self.layers = scheme.layers
        self.norm = scheme.norm  # the final norm (DART compares states through it)
        self.handles = []
        self.pending: StepPlan | None = None  # the next forward's step (``next_step``)
        self.state: StepState | None = None  # the running forward's, where it drops or renumbers
        self.traced: frozenset[int] = frozenset()  # the layers a compiled graph may gather at (``trace``)
        self.scored: frozenset[int] = frozenset()  # of those, where it records the layer before's attention
        self.first_traced = len(self.layers)  # the first layer whose hooks put operators in that graph
        # a step that drops nothing but renumbers (decoding after a contiguous drop): each layer's
        # positions less ``offsets[layer, row]``, written before the forward (``reserve``, ``_shift``)
        self.offsets: torch.Tensor | None = None
        self.shifting = False  # this step's offsets are not all zero
        self.written = 0  # the columns of ``offsets`` that may be nonzero
        ops.install(self)
        shared = scheme.shares_kv()
        for index, layer in enumerate(self.layers):
            self.handles.append(layer.register_forward_pre_hook(self._before_layer(index, inspect.signature(layer.forward)),
                                                                with_kwargs=True))
            attention = scheme.attention(index)
            # no stage scores with a linear-attention layer (it has none) or with one that reads an earlier
            # layer's keys and values (Gemma 4's: it computes no keys, and every boundary lies before it)
            if attention is not None and index not in shared:
                self.handles.append(attention.register_forward_pre_hook(self._at_attention(index)))
        # on the whole model, which the runner calls: vLLM's compiled decoder class calls its own
        # ``forward`` directly (``support_torch_compile``), past any hook on the decoder module
        self.handles.append(owner.register_forward_pre_hook(self._enter, with_kwargs=True))
        self.handles.append(owner.register_forward_hook(self._leave))

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        ops.uninstall(self)

    def trace(self, rows_fixed_before: int = 0, previous: bool = True) -> None:
        """Where vLLM compiles the decoder (set before its warm-up traces it): the layers at which its
        graph may gather kept rows (``ops``), every layer from ``rows_fixed_before`` on (from the
        second), before which the decoder's own loop adds rows to the layers' output (Qwen3-VL's
        DeepStack rows, added to the step's rows whatever a hook held). Every one of them, not only
        where the server's method drops at a typical item: where a method places its boundaries
        depends on the budget and the item's tokens (PyramidDrop's earlier boundaries at a low
        budget, a horizon moved forward), which requests choose. ``previous``: some method the
        server runs scores with the layer before a boundary (``LanguageStage.reads``), so the graph
        records each of those layers' queries and keys (``ops.attention``, a copy at every step);
        where none does, it records none. A step that drops or renumbers at these layers, and reads
        only what the graph records, runs the compiled graph; any other runs the decoder eagerly
        (vLLM's per-call bypass)."""
        self.traced = frozenset(range(max(rows_fixed_before, 1), len(self.layers)))
        self.scored = self.traced if previous else frozenset()
        self.first_traced = min(self.traced) - 1 if self.traced else len(self.layers)

    def compiled_step(self, step: StepPlan) -> bool:
        """Whether the compiled graph's operators run ``step``'s drops and renumbering: all its
        boundaries traced, and where a stage reads the layer before a boundary, recorded there."""
        layers = set(step.boundaries).union(*(plan.boundaries() for plan in step.renumbering()))
        if not (self.traced and layers <= self.traced):
            return False
        return all(plan.language.reads != "previous" or {layer for layer, _ in plan.schedule.boundaries} <= self.scored
                   for drop in step.drops.values() for plan in drop.request.plans)

    def reserve(self, rows: int, device) -> None:
        """Make the buffer of position offsets (``offsets``: a row per decoder layer, a column per row
        of the runner's largest step), once: a step that renumbers without dropping (a decoding step
        after a contiguous drop) writes it before its forward, and every layer's operator subtracts its
        row, so that such a step runs the same operations on the same buffers whatever it renumbers,
        as a captured CUDA graph would replay them. Called by the runner before each step."""
        if self.offsets is None or self.offsets.shape[1] < rows:
            self.offsets = torch.zeros(len(self.layers), rows, dtype=torch.long, device=device)
            self.written = 0

    def shifted(self, index: int, positions: torch.Tensor) -> torch.Tensor:
        """Decoder layer ``index``'s positions in a step that drops nothing: the step's less the layer's
        row of ``offsets`` (a row of positions, or M-RoPE's ``(3, rows)``, which renumbers nothing)."""
        return positions - self.offsets[index, : positions.shape[-1]]

    def layer_inputs(self, index: int, positions, hidden, residual, own):
        """What the hooks hand decoder layer ``index`` at a step (``ops.layer``): its positions, hidden
        states, residual stream and per-layer input, the held rows' after a boundary; where the step
        drops nothing, its positions less the layer's offsets (``reserve``), zero where nothing renumbers."""
        state = self.state
        if state is None:
            if self.offsets is not None:
                positions = self.shifted(index, positions)
            return positions, hidden, residual, own
        out = self._layer_args(index, state, (positions, hidden, residual), own)
        if any(state.inputs.get(index) is value for value in (hidden, out[1])):  # (an operator's input and
            state.inputs[index] = state.inputs[index].clone()  # output are the graph's to reuse)
        return out

    def attention_inputs(self, index: int, query, key, copy: bool = False) -> None:
        """Layer ``index``'s rotated queries and keys at a step, kept where a boundary reads them
        (``copy``: copies, for ``ops.attention``, whose inputs are the graph's to reuse)."""
        state = self.state
        if state is not None and index + 1 in state.step.boundaries:
            state.captured[index] = (query.clone(), key.clone()) if copy else (query, key)

    def next_step(self, step: StepPlan | None) -> None:
        """The runner's plan of the step its next forward runs (``None``: nothing drops in it)."""
        self.pending = step

    def held(self) -> torch.Tensor | None:
        """The step's rows the layers hold now (``None``: all of them, before any boundary)."""
        return None if self.state is None else self.state.index

    # a step's life: entry, each layer's attention and input, exit
    def _shift(self, step: StepPlan | None, rows: int) -> None:
        """Write the step's position offsets (``reserve``): each layer's tokens dropped before it, on the
        rows of a request past its prompt whose kept tokens were renumbered (``StepPlan.renumbering_requests``:
        in a step that drops nothing, those), zero elsewhere; nothing to write where no column may be
        nonzero and nothing renumbers. A step that drops keeps its state instead (``StepState``)."""
        renumbering = [] if step is None or step.drops else step.renumbering_requests()
        self.shifting = bool(renumbering)
        if self.offsets is None or not (renumbering or self.written):
            return
        columns = max(rows, self.written) if renumbering else self.written
        values = torch.zeros(len(self.layers), columns, dtype=torch.long)
        for index, plan in renumbering:
            start, count = step.rows[index]
            values[:, start : start + count] = torch.tensor(plan.dropped[: len(self.layers)])[:, None]
        self.offsets[:, :columns].copy_(values)
        self.written = rows if renumbering else 0

    def _enter(self, module, args, kwargs):
        self.state = None
        step = self.pending
        positions = kwargs.get("positions")
        if step is not None and isinstance(positions, torch.Tensor):
            rows = sum(count for _, count in step.rows)
            if positions.shape[-1] != rows:
                raise RuntimeError(f"a step of {rows} tokens reached the model padded to {positions.shape[-1]} (CUDA "
                                   "graphs, data parallelism?); dropping inside the language model runs unpadded steps")
        self._shift(step, positions.shape[-1] if isinstance(positions, torch.Tensor) else 0)
        if step is None:
            return
        renumbers = step.renumbers()
        if not (step.slots or step.drops or renumbers):
            return
        from vllm.forward_context import get_forward_context

        context = get_forward_context()
        if step.slots:
            # the compacted layers' slots, into the dictionary vLLM's attention reads its slots from
            # (either runner builds it before the forward, from one slot row per KV-cache group)
            context.slot_mapping.update(step.slots)
        if step.drops:
            # the step's input embeddings (SparseVLM's raters read them), and per request what a stage
            # computes once per prefill and reads at a later boundary (``LayerView.scratch``)
            self.state = StepState(step, renumbers, kwargs.get("inputs_embeds"))
        if step.drops or renumbers:
            # a step whose row count or positions change between layers runs vLLM's compiled model
            # where its graph's operators run its boundaries (``trace``), the decoder eagerly with these
            # hooks otherwise (vLLM's per-call bypass); in every step, the decoding of what dropped
            # included, each compacted layer's metadata and slots reach its attention through the
            # forward context. A step that renumbers without dropping holds no state: its offsets
            # are written (``_shift``)
            context.skip_compiled = not self.compiled_step(step)

    def _at_attention(self, index: int):
        def hook(module, args):
            if torch.compiler.is_compiling():  # traced at warm-up: the operator records them at each step
                if index + 1 not in self.scored:
                    return None
                return (*torch.ops.duet_vlm.attention(index, args[0], args[1]), *args[2:])
            self.attention_inputs(index, args[0], args[1])  # this layer's rotated queries and keys

        return hook

    def _before_layer(self, index: int, signature: inspect.Signature):
        names = self.scheme.arguments  # (positions, hidden states, residual stream), as the layer names them
        per_layer_input = self.scheme.per_layer_input  # an input of the layer's own per token (Gemma 4's)
        order = list(signature.parameters)

        def traced(args, kwargs):  # at warm-up, where vLLM traces the decoder: the operator, run at each step
            if index < self.first_traced:
                return None
            named = dict(zip(order, args))
            named.update(kwargs)
            residual, own = named[names[2]], named.get(per_layer_input) if per_layer_input is not None else None
            out = torch.ops.duet_vlm.layer(index, index in self.traced, named[names[0]], named[names[1]], residual, own)
            named.update(zip(names, out[:2]))
            if residual is not None:
                named[names[2]] = out[2]
            if own is not None:
                named[per_layer_input] = out[3]
            return (), named

        def hook(module, args, kwargs):
            if torch.compiler.is_compiling():
                return traced(args, kwargs)
            state = self.state
            if state is None:
                if not self.shifting:
                    return None
                call = signature.bind(*args, **kwargs)  # a step that renumbers without dropping
                call.arguments[names[0]] = self.shifted(index, call.arguments[names[0]])
                return call.args, call.kwargs
            # the layer's positions, hidden states and residual stream, by name: a decoder's loop may
            # pass them in order (most families) or by keyword (Qwen3.5's)
            call = signature.bind(*args, **kwargs)
            named = call.arguments
            own = named.get(per_layer_input) if per_layer_input is not None else None
            *args, own = self._layer_args(index, state, tuple(named[name] for name in names), own)
            for name, value in zip(names, args):
                named[name] = value
            if own is not None:
                named[per_layer_input] = own
            return call.args, call.kwargs

        return hook

    def _layer_args(self, index: int, state: StepState, args: tuple, own) -> tuple:
        """Layer ``index``'s (positions, hidden states, residual stream) and per-layer input (``own``,
        Gemma 4's; None where it has none) as the hooks hand them on: its input recorded where the
        next layer is a boundary, the held rows' positions after one, the kept rows at one, the
        positions renumbered where a request's plan does, and the per-layer input of the held rows
        (the decoder's loop hands it all the step's)."""
        step = state.step
        if state.positions is not None:  # the decoder's loop hands every layer all the step's positions
            args = (state.positions, *args[1:])
        if index in step.boundaries:
            args = self._boundary(index, step, args)
        if index + 1 in step.boundaries:  # its input, as the Hugging Face path's residual stream (the rows
            state.inputs[index] = stream(args[1], args[2])  # kept, where a boundary is here too)
        if state.renumbers:
            args = (self._renumbered(index, step, args[0]), *args[1:])
        if own is not None and state.index is not None:
            own = own[state.index]
        return (*args[:3], own)

    def _boundary(self, index: int, step: StepPlan, args):
        positions, hidden, residual = args[0], args[1], args[2]
        states = stream(hidden, residual)
        state = self.state
        current = state.index  # the step's rows still held (None: all)
        captured = state.captured.pop(index - 1, None)
        gathered = False  # ``captured`` holds every rank's heads (``rank_heads``, once, where an item reads it)
        previous = state.inputs.pop(index - 1, None)
        held = torch.arange(hidden.shape[0], device=hidden.device) if current is None else current
        keep_rows = torch.ones(held.shape[0], dtype=torch.bool, device=hidden.device)
        replaced = []  # (rows, states) of merged tokens
        # where each of the step's rows sits among the held rows (-1: dropped)
        where = torch.full((sum(count for _, count in step.rows),), -1, dtype=torch.long, device=hidden.device)
        where[held] = torch.arange(held.shape[0], device=hidden.device)
        for key, drop in step.drops.items():
            plan = drop.request
            for item, ((offset, length), item_plan) in enumerate(zip(plan.spans, plan.plans)):
                held_per_layer = item_plan.schedule.tokens_per_layer
                before, keep = held_per_layer[index - 1], held_per_layer[index]
                if index not in dict(item_plan.schedule.boundaries):  # no boundary of this item here (a
                    continue  # boundary may keep every token, and a stage that merges still changes them)
                rows = self._item_rows(drop, offset, length, where)  # this item's tokens still held
                if rows.shape[0] != before:
                    raise RuntimeError(f"an item holds {rows.shape[0]} tokens at layer {index}, its plan {before}")
                ids = state.ids.get((key, item))
                if ids is None:
                    ids = torch.arange(length, device=hidden.device)
                stage = item_plan.language
                replacement = None
                if drops_all(keep):  # every token goes, whatever the stage would score
                    chosen = rows.new_empty(0)
                else:
                    if stage.reads == "layer":  # this layer's own queries and keys, on the held rows
                        if state.layer_qk is None or state.layer_qk[0] != index:
                            rotated = self._renumbered(index, step, positions) if state.renumbers else positions
                            state.layer_qk = (index, rank_heads(self.scheme.queries_and_keys(index, rotated, hidden, residual)))
                        scored, scorer = state.layer_qk[1], index
                    elif stage.reads == "previous":  # the queries and keys layer K-1 computed, as it ran
                        if captured is not None and not gathered:
                            captured, gathered = rank_heads(captured), True
                        scored, scorer = captured, index - 1
                    else:  # no layer's attention (random at the horizon, V2Drop's change of state)
                        scored, scorer = None, None
                    chosen, replacement = self._select(index, drop, item, rows, ids, keep, scored, previous, where,
                                                       states, scorer)
                if replacement is not None:  # merged tokens: these states take the kept tokens' slots
                    replaced.append((rows[chosen], replacement))
                dropped = torch.ones(before, dtype=torch.bool, device=hidden.device)
                dropped[chosen] = False
                keep_rows[rows[dropped]] = False
                state.ids[(key, item)] = ids[chosen]
                if TRACE is not None:
                    TRACE.append((drop.req_id, index, item, ids[chosen].cpu()))
        kept = keep_rows.nonzero().squeeze(-1)
        state.index = held[kept]
        state.positions = positions[..., kept]  # a row of positions, or M-RoPE's (3, rows)
        hidden, residual = hidden[kept], residual[kept] if residual is not None else None
        if replaced:  # a merged token's stream is its state: all of it in the residual (the next layer adds 0)
            at = torch.full((keep_rows.shape[0],), -1, dtype=torch.long, device=hidden.device)
            at[kept] = torch.arange(kept.shape[0], device=hidden.device)
            for rows, merged in replaced:
                if residual is None:
                    hidden[at[rows]] = merged.to(hidden.dtype)
                else:
                    hidden[at[rows]] = 0
                    residual[at[rows]] = merged.to(residual.dtype)
        return (positions[..., kept], hidden, residual, *args[3:])

    def _renumbered(self, index: int, step: StepPlan, positions: torch.Tensor) -> torch.Tensor:
        """The held rows' positions in layer ``index`` where requests renumber their kept tokens
        (``positions="contiguous"``, the Hugging Face path's): a request that dropped in this step
        counts its held rows from its first, one that dropped before counts on from its kept tokens
        (its position less the tokens dropped before this layer); the others keep theirs. The same
        for every layer of a segment: made once per segment (held rows, positions, counts dropped)."""
        current = self.state.index
        dropped = tuple(plan.dropped_before(index) if plan is not None else 0 for plan, _ in step.batch)
        made = self.state.renumbered.get(dropped)
        if made is not None and made[0] is positions and made[1] is current:
            return made[2]
        held = current
        if held is None:
            held = torch.arange(positions.shape[-1], device=positions.device)
        renumbered = positions.clone()
        for batch_index, (plan, computed) in enumerate(step.batch):
            if plan is None or not plan.contiguous:
                continue
            start, count = step.rows[batch_index]
            mine = ((held >= start) & (held < start + count)).nonzero().squeeze(-1)
            if batch_index in step.drops:
                renumbered[..., mine] = computed + torch.arange(mine.shape[0], device=positions.device).to(positions.dtype)
            elif computed >= plan.prompt:
                renumbered[..., mine] = positions[..., mine] - plan.dropped_before(index)
        self.state.renumbered[dropped] = (positions, current, renumbered)
        return renumbered

    def _item_rows(self, drop: RowDrop, offset: int, length: int, where: torch.Tensor) -> torch.Tensor:
        """The held-row indices of an item's tokens that are still held (ascending)."""
        step_rows = torch.arange(drop.start + offset - drop.computed, drop.start + offset - drop.computed + length,
                                 device=where.device)
        rows = where[step_rows]
        return rows[rows >= 0]

    def _select(self, index: int, drop: RowDrop, item: int, rows: torch.Tensor, ids: torch.Tensor, keep: int, scored,
                previous, where, hidden, scorer: int | None):
        """The method's own choice (``LanguageStage.select``) among an item's held ``rows`` (``ids``:
        their indices into the item's visual block), from a ``LayerView`` of the request's held rows
        in this step: its prompt tokens valid (a request computed again after preemption holds its
        generated tokens too), its residual stream at the boundary and before it (``previous``, the
        input of the layer before, on the rows held there), its input embeddings where the stage
        reads them, and the queries and keys of decoder layer ``scorer`` (``scored``; ``None``: the
        stage reads no layer's attention). Returns the kept tokens' indices among
        ``rows`` (ascending) and, where the stage merges, the states that take their slots."""
        stage = drop.request.plans[item].language
        step_rows = torch.arange(drop.start, drop.start + drop.count, device=where.device)
        mapped = where[step_rows]
        held = mapped >= 0
        request_rows = mapped[held]
        place = (step_rows - drop.start + drop.computed)[held]  # each held row's position in the request
        valid = (place < drop.request.prompt)[None]
        last_item = max(offset + length for offset, length in drop.request.spans)
        after_image = ((place >= last_item) & (place < drop.request.prompt)).nonzero().squeeze(-1)
        local = torch.searchsorted(request_rows, rows)  # the item's rows among the request's rows
        query = key = None
        if scorer is not None:
            if scored is None:  # layer ``scorer``'s (queries, keys)
                raise RuntimeError(f"layer {scorer} did not run before layer {index} in this step; its attention cannot be read")
            query, key = (values[request_rows] for values in scored)
        if previous is not None:  # the residual stream the layer before read
            previous = previous[request_rows][None]
        length = request_rows.shape[0]

        def attention(layer, hidden_states, rope, queries, key_valid, visual_index, layer_keys=None):
            # a sliding layer's window (vLLM's ``Attention.sliding_window``, None where it has none) counts
            # the request's rows the layer holds, as its cache and the Hugging Face path's scores count it:
            # the scoring layer's own window, not the boundary layer's
            attn = self.scheme.attention(scorer)
            return gathered_scores(query, key, attn.head_size, attn.impl.scale, self.scheme.window(scorer), queries,
                                   key_valid, visual_index)

        def keys(layer, hidden_states, rope, key_valid):  # (1, L, H_kv * d), rotated, as the layer computed them
            if scorer is None or layer is not self.layers[scorer]:
                raise StageNotServed(f"{type(stage).__name__} reads the keys of a layer the plugin did not capture")
            return key[None]

        def final_norm(states):  # vLLM's fused norms may write into their inputs
            return self.norm(states.clone())

        embeddings = None
        if stage.needs_input_embeddings:
            entered = self.state.embeddings
            if entered is None:
                raise StageNotServed(f"{type(stage).__name__} reads the input embeddings, which this step did not pass")
            held_rows = self.state.index
            embeddings = (entered if held_rows is None else entered[held_rows])[request_rows][None]

        view = LayerView(
            layer_index=index, layer=self.layers[index], hidden_states=hidden[request_rows][None],
            position_embeddings=(None, None), visual_index=local.view(1, 1, -1), visual_ids=ids.view(1, 1, -1),
            valid=valid, input_ids=None, input_embeddings=embeddings, text_after_image=[after_image],
            previous_layer=self.layers[index - 1], previous_hidden_states=previous,
            scratch=self.state.scratch.setdefault((drop.req_id, item), {}),
            attention_fn=attention, run_layer_fn=_unavailable, output_head_fn=_unavailable, final_norm_fn=final_norm,
            keys_fn=keys,
            previous_layer_keys=key.view(1, length, -1, self.scheme.attention(scorer).head_size).transpose(1, 2)
            if stage.reads == "previous" else None,
        )
        selection = stage.select(view, keep)
        if isinstance(selection, Selection):  # ascending, each state for its index's slot where it merges
            states = selection.hidden_states
            return selection.index.reshape(-1), None if states is None else states.reshape(-1, states.shape[-1])
        return selection.reshape(-1).sort().values, None

    def _leave(self, module, args, output):
        state, self.state = self.state, None
        if state is None or state.index is None or not isinstance(output, torch.Tensor):
            return output
        step = state.step
        total = sum(count for _, count in step.rows)
        full = output.new_zeros((total, *output.shape[1:]))
        full[state.index] = output
        return full


def rank_heads(qk: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """A decoder layer's queries and keys ``(rows, heads * d)`` with every tensor-parallel rank's
    heads, in rank order (vLLM's column-parallel ``qkv_proj`` gives each rank a contiguous run of the
    heads), on every rank (``select.all_heads``, the vision towers' gather): the scores average over
    all heads, as one process's do, so every rank keeps the same tokens. Where a model has fewer
    key-value heads than ranks, vLLM gives each rank a copy of its group's head, and the gathered keys
    hold each copy: query head ``h`` still meets its own group's keys (``h // (heads / kv heads)``)."""
    from vllm.distributed import get_tensor_model_parallel_world_size

    return all_heads(qk, -1, get_tensor_model_parallel_world_size())


def gathered_scores(query: torch.Tensor, key: torch.Tensor, head_dim: int, scale: float, window: int | None,
                    queries, key_valid, visual_index) -> torch.Tensor:
    """A stage's attention scores from a layer's rotated queries and keys ``(rows, heads * d)`` with
    every tensor-parallel rank's heads (``rank_heads``): the head counts come from the gathered widths
    (a rank's module knows its own heads only), ``heads / kv heads`` query heads per key head (a key
    head copied to each rank counts once per copy, and its query heads meet their own copy); one
    ``visual_attention`` per query row, as the Hugging Face path's."""
    length = query.shape[0]
    heads, kv_heads = query.shape[-1] // head_dim, key.shape[-1] // head_dim
    q = query.view(1, length, heads, head_dim).transpose(1, 2)
    k = key.view(1, length, kv_heads, head_dim).transpose(1, 2)
    out = [visual_attention(q[row : row + 1, :, queries[row]], k, queries[row], key_valid[row], visual_index[row],
                            scale, heads // kv_heads, window) for row in range(len(queries))]
    return torch.stack(out)


def stream(hidden: torch.Tensor, residual: torch.Tensor | None) -> torch.Tensor:
    """A vLLM decoder layer's input as one residual stream (vLLM hands the last sublayer's output
    and the stream before it apart, and adds them in the next layer's input norm)."""
    return hidden if residual is None else hidden + residual


def _unavailable(*args, **kwargs):
    raise StageNotServed("this language stage runs a layer or the LM head on intermediate states, which the plugin "
                         "does not serve yet")
