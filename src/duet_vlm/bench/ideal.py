"""The one ideal model of every benchmark: what a reduction would cost if choosing the tokens were free."""

from __future__ import annotations

from itertools import groupby
from typing import Callable, NamedTuple

import torch
from torch import nn

from ..adapters import adapter_for
from ..adapters.scheme import rope_of
from ..compaction import Compaction
from ..compat import with_cache


class _Entered(Exception):
    """Raised by the pre-hook that records the language model's arguments: nothing after it runs."""


def rope_split(positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(rotary input, the layers' position ids)`` as the language models split their ``position_ids``:
    M-RoPE's ``(4, B, L)`` carries the text positions in its first row, ``(3, B, L)`` is all rotary
    (its layers get none), and 1-D positions are both."""
    if positions.dim() == 3:
        if positions.shape[0] == 4:
            return positions[1:], positions[0]
        return positions, None
    return positions, positions


class Group(NamedTuple):
    """One run of decoder layers that see the same tokens."""

    step: Compaction | None  # the previous group's sequence -> this one's (None: the same tokens)
    valid: torch.Tensor  # (B, L) False on padding
    original: torch.Tensor | None  # (3, B, L) the kept tokens' M-RoPE positions (None: 1-D RoPE)
    text: torch.Tensor | None  # (B, L) the text positions the model gives its layers under M-RoPE, if any
    types: torch.Tensor | None  # (B, L) what the masks read besides padding (Gemma's token types)
    start: int  # its first layer's index
    layers: nn.ModuleList
    heads: dict  # {kind: layer}: where a padded decoding step's mask of each mapped kind is built


class IdealModel:
    """The unpatched model run on reduced token counts, with no scoring and no bookkeeping.

    Layer ``l`` of the decoder sees every text token and the first ``visual_per_layer[l]`` visual slots
    of each row (any slots cost the same). The prompt enters the decoder compacted to
    ``visual_per_layer[0]`` slots (``entry``); where the count drops, the sequence is compacted once
    more for the next run of layers (each group's ``step``), whose positions are renumbered and RoPE
    recomputed (1-D RoPE), or, under M-RoPE, the kept tokens' own (time, row, column) positions
    gathered from the unreduced prompt's (never renumbered) and RoPE recomputed from them. Each layer
    is the model's own module called directly, so with a ``DynamicCache`` each layer's cache holds
    exactly its own tokens and a decoding step attends over those per-layer lengths.

    Nothing in it knows a family: the family's adapter gives the visual tokens of the kept slots
    (``ModelAdapter.ideal_visual``: the tower on every tile, frame or patch as the model runs it,
    the projector on the kept tokens only), and its layer scheme (``adapters.scheme``) each layer's
    kind, the masks of each run of layers (``LayerScheme.sequence_masks``: causal, padded, sliding,
    image blocks, recurrent, as the language model builds them for that sequence), its RoPE per
    kind and the per-token inputs its layers take (``LayerScheme.layer_token_inputs``: Gemma 4's).
    The prompt's M-RoPE positions are the unpatched model's own: under M-RoPE the arguments it
    hands its language model are recorded once, at construction. With nothing dropped the ideal is the
    unreduced model.

    ``decode`` runs the decoder alone on entry states. ``embeddings``, ``forward``, ``generate`` and
    ``loss`` start from the pixels. ``generate`` is a bare greedy loop (embed, layers, norm, LM head
    on the last position, argmax); ``loss`` is a training forward. A family whose language model
    adds visual features inside its layers (Qwen3-VL's DeepStack) is refused.

    >>> ideal = IdealModel(model, inputs, [205] * 16 + [102] * 8 + [0] * 8)      # doctest: +SKIP
    >>> tokens, cache = ideal.generate(32)                                        # doctest: +SKIP
    """

    def __init__(self, model, inputs: dict[str, torch.Tensor], visual_per_layer: list[int]):
        base = model.model
        self.model, self.base, self.language_model = model, base, base.language_model
        self.adapter = adapter_for(model)
        self.scheme = self.adapter.scheme
        self.inputs = inputs
        ids = inputs["input_ids"]
        mask = inputs.get("attention_mask")
        self.input_ids = ids
        # Under M-RoPE the unpatched model's own positions (1-D positions are renumbered per group).
        arguments = self._language_arguments() if self.adapter.geometry.rope == "mrope" else {}
        if self.adapter.take_layer_additions(dict(arguments)) is not None:
            raise NotImplementedError(f"the ideal does not add the visual features {self.adapter.family}'s "
                                      "language model adds inside its layers (DeepStack)")
        visual = torch.isin(ids, torch.tensor(sorted(self.adapter.placeholder_ids), device=ids.device))
        rank = visual.long().cumsum(dim=1) - 1
        runs = [(count, len(list(run))) for count, run in groupby(visual_per_layer)]
        self.visual = visual
        self.entry_visual = visual & (rank < runs[0][0])  # visual slots that enter the decoder
        self.entry = Compaction.from_keep(self.entry_visual | ~visual)
        self.entry_ids, self.entry_visual_slots = self.entry.gather(ids), self.entry.gather(self.entry_visual)
        # M-RoPE: the unreduced prompt's (3, B, L) positions, of which each group keeps its tokens'.
        original = text_original = None
        positions = arguments.get("position_ids")
        if positions is not None and positions.dim() == 3:
            original, text_original = rope_split(positions.expand(-1, ids.shape[0], -1))
            self.next_position = original.amax(dim=(0, 2))[:, None] + 1  # (B, 1) a decoding step's first position
        types = self.scheme.token_types(ids, inputs, [])  # what the masks read besides padding (Gemma's)
        self.groups: list[Group] = []
        segment, start = self.entry, 0
        for count, size in runs:
            step = Compaction.from_keep(segment.gather(~visual | (rank < count)))
            segment = segment.then(step)
            valid = torch.ones_like(segment.index, dtype=torch.bool) if mask is None else mask.gather(1, segment.index).bool()
            self.groups.append(Group(
                None if step.is_identity else step, valid, segment.gather_positions(original),
                segment.gather_positions(text_original), None if types is None else segment.gather(types),
                start, self.language_model.layers[start : start + size], self.scheme.heads(start, start + size),
            ))
            start += size
        self.exit = segment  # the prompt's tokens that reach the last layer

    def _language_arguments(self) -> dict:
        """What the unpatched model hands its language model for ``inputs`` (recorded; the language
        model itself does not run)."""
        recorded: dict = {}

        def record(module, args, kwargs):
            recorded.update(kwargs)
            raise _Entered

        handle = self.language_model.register_forward_pre_hook(record, with_kwargs=True)
        try:
            with torch.no_grad():
                self.base(**self.inputs)
        except _Entered:
            pass
        finally:
            handle.remove()
        if "inputs_embeds" not in recorded:
            raise NotImplementedError("the ideal reads the language model's keyword arguments; this model passed none")
        return recorded

    def embeddings(self) -> torch.Tensor:
        """``(B, entry.length, width)`` the entry sequence's input embeddings: the text's, and the kept
        count of projected visual tokens in the first visual slots (any slots cost the same)."""
        visual = self.adapter.ideal_visual(self.inputs, self.visual, self.entry_visual)
        # the model's own embedding of the text (a placeholder's row is replaced or dropped)
        embeds = self.model.get_input_embeddings()(self.input_ids.masked_fill(self.visual, 0))
        embeds = embeds.masked_scatter(self.entry_visual[..., None], visual.to(embeds.dtype))
        return self.entry.gather(embeds)

    @staticmethod
    def _positions(valid: torch.Tensor, original: torch.Tensor | None, text: torch.Tensor | None):
        """``(rotary positions, the layers' position ids)`` of a group: its kept tokens' M-RoPE
        positions (and the text row the model gives its layers, if any), or 1-D renumbered ones."""
        if original is not None:
            return original, text
        renumbered = (valid.long().cumsum(dim=1) - 1).clamp(min=0)
        return renumbered, renumbered

    def decode(self, hidden: torch.Tensor, cache=None, last: int | None = None) -> torch.Tensor:
        """The decoder on the entry sequence's states ``hidden`` (``(B, entry.length, width)``): the
        final-normed states of the last layer group's sequence. ``last``: the forward's
        ``logits_to_keep``; the layers from the scheme's ``queries_cut_from`` on (Gemma 4's KV-shared
        layers, which read every key from an earlier layer) then get only the last ``last`` tokens,
        as the model passes them."""
        scheme = self.scheme
        self.positions = []
        cut = scheme.queries_cut_from if last is not None else None
        # Each layer's per-token input (Gemma 4's, from the entry's embeddings as the model makes it)
        # and what the layers share while they run (Gemma 4's keys and values).
        per_layer = scheme.layer_token_inputs(self.language_model, hidden, self.entry_ids, self.entry_visual_slots)
        shared = scheme.layer_call_kwargs()
        name = None if scheme.layer_token_argument is None else scheme.layer_token_argument[0]
        for group in self.groups:
            if group.step is not None:
                hidden = group.step.gather(hidden)
                per_layer = None if per_layer is None else group.step.gather(per_layer)
            rotary, positions = self._positions(group.valid, group.original, group.text)
            self.positions.append(group.valid.sum(dim=1, keepdim=True))
            rope = scheme.rope(hidden, rotary)
            masks = scheme.sequence_masks(hidden, group.valid, group.types)
            if cut is not None and group.step is not None and group.start >= cut and hidden.shape[1] == last:
                raise ValueError("the ideal reduces after the layers that take only the last queries began")
            for index, layer in enumerate(group.layers, group.start):
                if cut is not None and index == cut:  # the model's own cut to the last queries
                    hidden = hidden[:, -last:]
                    per_layer = None if per_layer is None else per_layer[:, -last:]
                    masks = {k: None if m is None else m[..., -last:, :] for k, m in masks.items()}
                    rope = {k: (c[:, -last:], s[:, -last:]) for k, (c, s) in rope.items()}
                    positions = None if positions is None else positions[..., -last:]
                kind = scheme.kinds[index]
                extra = dict(shared)
                if name is not None:
                    extra[name] = per_layer[:, :, index]
                out = layer(hidden, attention_mask=masks[kind], position_ids=positions, **with_cache(cache),
                            use_cache=cache is not None, position_embeddings=rope_of(rope, kind), **extra)
                hidden = out[0] if isinstance(out, tuple) else out
        return self.language_model.norm(hidden)

    def forward(self, cache=None) -> torch.Tensor:
        """The prompt through the tower, the projector and the decoder (``decode``)."""
        return self.decode(self.embeddings(), cache)

    def new_cache(self):
        """An empty cache for the language model, as its own forward makes one (``DynamicCache``)."""
        from transformers import DynamicCache

        return DynamicCache(config=self.language_model.config)

    def generate(self, new_tokens: int, on_token: Callable[[], None] | None = None):
        """Greedy decoding of exactly ``new_tokens`` tokens; ``on_token()`` after each one. Returns the
        tokens ``(B, new_tokens)`` and the cache."""
        scheme = self.scheme
        if scheme.layer_token_argument is not None:
            raise NotImplementedError("the ideal does not decode a model whose layers take per-token inputs "
                                      "(Gemma 4's per-layer inputs of each new token)")
        head = self.model.lm_head
        with torch.no_grad():
            cache = self.new_cache()
            token = head(self.forward(cache)[:, -1]).argmax(-1)
            tokens = [token]
            if on_token:
                on_token()
            for step in range(new_tokens - 1):
                hidden = self.language_model.embed_tokens(token[:, None])
                for group, length in zip(self.groups, self.positions):
                    # M-RoPE: the unreduced numbering (after the prompt's largest position); 1-D: renumbered
                    mrope = group.original is not None
                    positions = (self.next_position if mrope else length) + step
                    rope = scheme.rope(hidden, positions)
                    keys = torch.cat([group.valid, group.valid.new_ones(group.valid.shape[0], step + 1)], dim=1)
                    masks = {}  # no padding: the backend's causal path (a sliding cache returns at most its window)
                    if not bool(keys.all()):  # each mapped kind's mask over its cache, at the group's first layer of it
                        masks = {kind: scheme.segment_step_mask(kind, index, hidden, None, cache, None, lambda: keys)
                                 for kind, index in group.heads.items()}
                    for index, layer in enumerate(group.layers, group.start):
                        kind = scheme.kinds[index]
                        out = layer(hidden, attention_mask=masks.get(kind), position_ids=None if mrope else positions,
                                    **with_cache(cache), use_cache=True, position_embeddings=rope_of(rope, kind))
                        hidden = out[0] if isinstance(out, tuple) else out
                token = head(self.language_model.norm(hidden)[:, -1]).argmax(-1)
                tokens.append(token)
                if on_token:
                    on_token()
        return torch.stack(tokens, dim=1), cache

    def loss(self, labels: torch.Tensor) -> torch.Tensor:
        """A training forward: the LM head over the last group's sequence and the shifted cross-entropy
        with ``labels`` (full-prompt coordinates; -100 is ignored) read at the tokens that reach it."""
        hidden = self.forward()
        logits = self.model.lm_head(hidden).float()
        kept = self.exit.gather(labels)
        return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), kept[:, 1:].flatten(), ignore_index=-100)
