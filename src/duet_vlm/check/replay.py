"""The ideal of one reduced prefill, rebuilt on the user's model: its unpatched decoder layers fed the
kept tokens.

A reduced prefill is run once with probes behind the reducer's hooks: they record what the
language model receives at its entry (the kept tokens' embeddings as the vision stage made them,
and their positions) and what its last decoder layer returns. The replay then runs the model's own
decoder layers directly, with no reducer attached, on the entry states: at each pruning boundary
it keeps the tokens the reducer's statistics name (``ItemStats.stage_ids``), renumbers them (1-D
RoPE, ``contiguous``) or keeps their positions (``original``, M-RoPE), and builds every layer's
mask and rotary embedding with the model's own functions for that shorter sequence. What the
runtime does on top of the plain layers (compaction, masks, positions, RoPE, the cache) is what
the comparison checks. The masks and RoPE of each run of layers are the family's layer scheme's
for a whole sequence (``LayerScheme.sequence_masks``, ``rope``), as the benchmarks' ideal
(``bench.ideal.IdealModel``) builds them. What the reducer's hooks add to a layer's output (Qwen3-VL's DeepStack
rows of the kept tokens) is taken from the run too. A language stage that merges tokens
(``LanguageStage.merges``) gives the kept visual slots states of its own: there the replay takes
those rows from the reduced run.

Not replayed (``NotReplayable`` says why): a model whose layers take per-token inputs (Gemma 4's
per-layer inputs, and its KV-shared layers), a batch of more than one row or with padding (the check
replays each row alone).
"""

from __future__ import annotations

import torch

from ..adapters import adapter_for
from ..adapters.scheme import rope_of
from ..bench.ideal import rope_split
from ..compat import with_cache
from ..plan import resolve_positions


class NotReplayable(Exception):
    """The check's ideal cannot be built for this model or input (the message says why)."""


class EntryProbe:
    """Hooks registered after a reducer's: the language model's entry arguments as the reducer hands
    them on, layer 0's input states, the input states of each layer whose length differs from the
    layer's before it (a boundary), and the last decoder layer's output states (one prefill)."""

    def __init__(self, model):
        language_model = model.model.language_model
        layers = language_model.layers
        self.kwargs: dict = {}
        self.hidden: torch.Tensor | None = None
        self.last: torch.Tensor | None = None
        self.boundary_inputs: dict[int, torch.Tensor] = {}
        self.additions: dict[int, torch.Tensor] = {}  # what the reducer's hooks added to a layer's output
        self._length: int | None = None
        self._raw: dict[int, torch.Tensor] = {}

        def entry(module, args, kwargs):
            if not self.kwargs:
                self.kwargs = dict(kwargs)

        def layer_input(index):
            def record(module, args, kwargs):
                if self.last is not None:
                    return  # a later call (a decoding step)
                hidden = args[0] if args else kwargs["hidden_states"]
                if index == 0:
                    self.hidden = hidden
                elif hidden.shape[1] != self._length:
                    self.boundary_inputs[index] = hidden
                self._length = hidden.shape[1]
            return record

        def raw(index):
            def record(module, args, output):
                if self.last is None and index not in self._raw:
                    self._raw[index] = output[0] if isinstance(output, tuple) else output
            return record

        def final(index):
            def record(module, args, output):
                hidden = output[0] if isinstance(output, tuple) else output
                if self.last is None and index not in self.additions:
                    before = self._raw.get(index)
                    if before is not None and before is not hidden and not torch.equal(before, hidden):
                        self.additions[index] = hidden - before
                if index == len(layers) - 1 and self.last is None:
                    self.last = hidden
            return record

        self.handles = [
            language_model.register_forward_pre_hook(entry, with_kwargs=True),
            *(layer.register_forward_pre_hook(layer_input(i), with_kwargs=True) for i, layer in enumerate(layers)),
            *(layer.register_forward_hook(raw(i), prepend=True) for i, layer in enumerate(layers)),
            *(layer.register_forward_hook(final(i)) for i, layer in enumerate(layers)),
        ]

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


class Replay:
    """The decoder layers of ``model`` run directly on a recorded entry, boundary by boundary."""

    def __init__(self, model, reducer, inputs: dict, probe: EntryProbe):
        adapter = adapter_for(model)
        self.scheme = adapter.scheme
        if self.scheme.layer_token_argument is not None:
            raise NotReplayable(f"{adapter.family}'s per-layer inputs and KV-shared layers are not replayed by the check "
                                "(the test suite's hand-built ideal covers them on a tiny model)")
        ids = inputs["input_ids"]
        if ids.shape[0] != 1 or ("attention_mask" in inputs and not bool(inputs["attention_mask"].all())):
            raise NotReplayable("the replay takes one row without padding")
        if probe.hidden is None or probe.last is None:
            raise NotReplayable("the prefill never reached the decoder layers")
        self.model, self.reducer = model, reducer
        self.language_model = model.model.language_model
        self.text_config = self.language_model.config
        # Where each item's placeholders are (the runs of its tokens); its plan's shape is the statistics'.
        self.items = adapter.find_items(ids, inputs)
        stats = reducer.stats.items
        if len(stats) != len(self.items):
            raise NotReplayable(f"{len(self.items)} visual items in the prompt, {len(stats)} in the reducer's statistics")
        self.mode = resolve_positions(reducer.position_mode, stats[0].geometry) if stats else "contiguous"
        # The entry sequence: each item's run of placeholders replaced by its first layer's tokens.
        blocks, shift = [], 0
        for item, item_stats in zip(self.items, stats):
            entered = item_stats.tokens_per_layer[0]
            blocks.append((item.start - shift, entered, item_stats))
            shift += item.length - entered
        length = ids.shape[1] - shift
        if probe.hidden.shape[1] != length:
            raise NotReplayable(f"the decoder's entry holds {probe.hidden.shape[1]} tokens; the statistics say {length}")
        self.entry_hidden = probe.hidden
        self.text = torch.ones(length, dtype=torch.bool)
        self.image = torch.zeros(length, dtype=torch.bool)
        for start, entered, _ in blocks:
            self.text[start : start + entered] = False
            self.image[start : start + entered] = True
        self.blocks = blocks
        positions = probe.kwargs.get("position_ids")
        if positions is None:
            positions = torch.arange(length, device=probe.hidden.device)[None]
        self.entry_positions = positions
        # Qwen3-VL's DeepStack rows: the reducer's hooks add the kept tokens' rows to the outputs of
        # the first layers; the replay adds the same values (taken from the run, like the entry).
        self.additions = probe.additions
        # A stage that merges (SparseVLM's recycled tokens, HoliTom) puts states of its own into the
        # kept slots: at its boundaries the visual rows are taken from the reduced run (as the vision
        # stage's tokens are at the entry), and the text rows and every layer are the replay's own.
        plans = [reducer.resolve(item.geometry, quiet=True) for item in stats]
        self.merged = {layer: hidden for layer, hidden in probe.boundary_inputs.items()
                       if any(plan.language is not None and type(plan.language).merges for plan in plans)}

    def boundaries(self) -> dict[int, torch.Tensor]:
        """``{layer: the entry tokens that enter it}`` at every layer where some item's count drops."""
        layers: dict[int, torch.Tensor] = {}
        for _, _, item_stats in self.blocks:
            for layer, _ in item_stats.stage_ids:
                layers[layer] = None
        for layer in sorted(layers):
            keep = self.text.clone()
            for start, entered, item_stats in self.blocks:
                ids = torch.arange(entered)  # an item without a boundary here keeps its last survivors
                for at, survivors in item_stats.stage_ids:
                    if at <= layer:
                        ids = survivors.to("cpu").long()
                keep[start + ids] = True
            layers[layer] = keep.nonzero()[:, 0]
        return layers

    @torch.no_grad()
    def run(self) -> torch.Tensor:
        """The last decoder layer's output states of the ideal (before the final norm)."""
        layers, scheme = self.language_model.layers, self.scheme
        boundaries = self.boundaries()
        hidden, positions = self.entry_hidden, self.entry_positions
        current = torch.arange(hidden.shape[1])
        masks = rope = None
        for index, layer in enumerate(layers):
            if index in boundaries or masks is None:
                if index in boundaries:
                    keep = torch.isin(current, boundaries[index])
                    current = current[keep]
                    hidden = hidden[:, keep.to(hidden.device)]
                    if index in self.merged:
                        visual = self.image[current].to(hidden.device)
                        hidden = torch.where(visual[None, :, None], self.merged[index], hidden)
                    if self.mode == "contiguous" and positions.dim() == 2:
                        positions = torch.arange(len(current), device=positions.device)[None]
                    else:
                        positions = positions[..., keep.to(positions.device)]
                rotary, layer_positions = rope_split(positions)
                valid = torch.ones(1, hidden.shape[1], dtype=torch.bool, device=hidden.device)
                masks = scheme.sequence_masks(hidden, valid, self.image[current].long()[None].to(hidden.device))
                rope = scheme.rope(hidden, rotary)
            kind = scheme.kinds[index]
            out = layer(hidden, attention_mask=masks.get(kind), position_ids=layer_positions,
                        position_embeddings=rope_of(rope, kind), **with_cache(None), use_cache=False)
            hidden = out[0] if isinstance(out, tuple) else out
            if index in self.additions:
                hidden = hidden + self.additions[index]
        return hidden
