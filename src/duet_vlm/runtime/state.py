"""One prefill's state: its items, the segments of decoder layers between its boundaries, its numbering.

A call's prefill is one ``PrefillState``. It holds the entry ``Compaction`` (full input -> the
language model's entry sequence), the ``Item``s (each visual item with everything the prefill
decided for it: its plan, what its vision stage kept, the slots it fills, its DeepStack features,
the states a language stage recycled), the ``Segment``s (the sequence the decoder layers between two
boundaries see, after transformers' ``CacheLayerMixin``: an object per stretch of layers with its own
behaviour), the position ``numbering``, the prompt's ``tokens``, and two short-lived parts: the
``Scratch`` only the prefill's layers read (dropped at the exit) and the ``Decoding`` state the steps
after it carry. Items and segments are compared by identity, so they key dictionaries directly.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

import torch

from ..adapters import VisualItem
from ..compaction import Compaction
from ..compat import cache_of
from ..plan import Plan
from .inputs import LayerInputs
from .positions import Original, Renumbered


@dataclass(eq=False)
class EntryChoice:
    """What an item's vision stage chose, as the statistics read it: for each output token the
    vision token it stands for (``VisionReduction.kept``), its ``roles`` and per-unit ``counts``.

    The reduced features are not kept: they are in the embeddings already, and holding them would
    keep the stage's whole output (every item's tokens at the encoder's width) alive until the
    prefill ends, when memory peaks.
    """

    kept: torch.Tensor
    roles: dict[str, torch.Tensor] = field(default_factory=dict)
    counts: torch.Tensor | None = None


@dataclass(eq=False)
class Item:
    """One visual item of a prefill and everything the prefill decided for it.

    Attributes:
        source: where the adapter found it (row, first slot, geometry, tower).
        plan: its method's plan for its geometry (and its row's or its own budget).
        slots: the full-input slots it fills at the entry, ascending (all its slots without a
            vision stage).
        choice: what its vision stage kept (``None``: no vision stage).
        additions: DeepStack features ``(entry tokens, layers, D)`` added after the first decoder
            layers (Qwen3-VL), reduced with its tokens.
        recycled: per boundary layer, the states a language stage recycled into its kept slots
            (``Selection.hidden_states``), for a prefill that reuses this one's selection.
    """

    source: VisualItem
    plan: Plan
    budget: int | None = None  # the row's or its own budget ``plan`` was solved for (``None``: the reducer's)
    slots: torch.Tensor | None = None
    choice: EntryChoice | None = None
    additions: torch.Tensor | None = None
    recycled: dict[int, torch.Tensor] = field(default_factory=dict)

    @property
    def row(self) -> int:
        return self.source.row

    def prunes_at(self, layer: int) -> int | None:
        """How many of its tokens survive boundary ``layer`` (``None``: it is not pruned there)."""
        return dict(self.plan.schedule.boundaries).get(layer)


@dataclass(eq=False)
class Placement:
    """Where one item's surviving tokens sit in a segment's sequence."""

    item: Item
    positions: torch.Tensor  # (n,) positions in the segment's sequence of the item's row
    ids: torch.Tensor  # (n,) indices into the item's block at the LLM entry (stable)


@dataclass(eq=False)
class Segment:
    """The sequence the decoder layers between two boundaries see: how it is cut from the entry
    sequence (``steps``; the entry segment's is the entry's own alignment), where each item's tokens
    sit in it, and, during the prefill, its layers' mask, positions and RoPE (``inputs``)."""

    steps: Compaction
    placements: list[Placement]
    inputs: LayerInputs = field(default_factory=LayerInputs)

    def layer_kwargs(self, kind: str = "attention") -> dict:
        """A prefill layer's mask, positions and RoPE in this segment, for a layer of ``kind``."""
        return self.inputs.kwargs(kind)

    def rows(self, rows: list[int] | None) -> LayerInputs:
        """Its layer inputs for ``rows`` of the batch (all: ``None``); batch-1 broadcasts stay."""
        inputs = self.inputs
        if rows is None:
            return inputs
        select = torch.tensor(rows, device=self.steps.index.device)

        def take(x):
            return x if x is None or x.shape[0] == 1 else x[select]

        return LayerInputs(
            take(inputs.position_ids), None,
            {kind: (take(cos), take(sin)) for kind, (cos, sin) in inputs.rope.items()},
            {kind: take(mask) for kind, mask in inputs.masks.items()},
        )

    def decode_kwargs(self, state: "PrefillState", scheme, hidden: torch.Tensor, kwargs: dict,
                      kind: str = "attention", layer_index: int | None = None) -> dict:
        """What this (later) segment's layers of ``kind`` receive in a decoding step instead of the
        entry's (``layer_index``: the first of them): the step's full-length mask mapped onto this
        segment's cache, and renumbered positions moved back by what the segment dropped. Tensor
        arithmetic and Python state only (``torch.compile`` traces it)."""
        entry = state.segments[0].steps
        steps = self.steps

        def kv_index(mask: torch.Tensor) -> torch.Tensor:  # the segment's cache slots in the step's mask
            tail = torch.arange(state.entry_length, mask.shape[-1], device=steps.index.device)
            return torch.cat([steps.index, tail.expand(steps.batch, -1)], dim=1)

        def keys() -> torch.Tensor | None:  # the valid keys of the segment's cache, this step's included
            if state.decoding.mask is None:  # no mask given and no pads: every key is valid
                return None
            return torch.cat([steps.valid(state.tokens.valid), state.decoding.mask[:, state.entry_length :].bool()], dim=1)

        unpadded = steps.pad is None and entry.pad is None
        mask = scheme.segment_step_mask(
            kind, layer_index, hidden, kwargs.get("attention_mask"), cache_of(kwargs), kv_index if unpadded else None, keys
        )
        # Original positions: the decoder's own positions and RoPE are already right; only the mask
        # changes. Renumbered ones (1-D RoPE only) move back by what this segment dropped.
        position_ids = state.numbering.decode_group(kwargs.get("position_ids"), entry, steps)
        if position_ids is None:
            return dict(attention_mask=mask)
        rope = scheme.rope(hidden, position_ids)
        return dict(attention_mask=mask, position_ids=position_ids, position_embeddings=rope.get(kind, rope["attention"]))


@dataclass
class Tokens:
    """The prompt's tokens: the full input's ids, and at each entry position its id, whether it is a
    token (not padding), and per row the text after its last item (the instruction)."""

    source_ids: torch.Tensor  # (B, L) the full input's ids
    ids: torch.Tensor  # (B, L_entry)
    valid: torch.Tensor  # (B, L_entry) False on padding (the user's and alignment pads)
    text_after_image: list[torch.Tensor]  # per row, positions in the entry sequence
    # (B, L_entry) what the family's masks read besides validity (Gemma's token types: image blocks
    # attend bidirectionally), gathered like the ids; None: nothing.
    types: torch.Tensor | None = None


@dataclass
class Scratch:
    """What only the prefill's layers and stages read; dropped when the prefill ends without a
    backward pass to follow (``PrefillState.end_prefill``)."""

    lm_position_ids: torch.Tensor | None = None  # what the language model received
    input_embeddings: torch.Tensor | None = None  # (B, L_entry, D), for stages that read them
    last_layer_input: torch.Tensor | None = None  # the input of the layer before a boundary
    # While a boundary's stages run: the keys that layer wrote to the cache from that input, where
    # they are what scoring with it would compute again (``LayerScheme.cached_layer_keys``).
    last_layer_keys: torch.Tensor | None = None
    # Per boundary layer, the input of the layer before it (what FastV scores with), kept when a
    # backward pass may recompute the boundary (gradient checkpointing) after later layers ran.
    boundary_inputs: dict[int, torch.Tensor] = field(default_factory=dict)
    stages: dict = field(default_factory=dict)  # per call of a stage (its rows and items), its memory
    # Per layer at a boundary (or before one), its per-token argument at the entry sequence's length
    # (``LayerScheme.layer_token_argument``), for a stage that runs the layer outside the forward.
    layer_arguments: dict[int, torch.Tensor] = field(default_factory=dict)


@dataclass
class Decoding:
    """What the decoding steps after a prefill carry from one step to the next."""

    is_prefill: bool = True
    kwargs: dict[tuple, dict] = field(default_factory=dict)  # per (segment, layer kind), the step's layer kwargs
    mask: torch.Tensor | None = None  # the 2-D mask at the LLM entry in the current step
    # A static cache (``runtime.static``): the slots it leaves after the unreduced prompt, and every
    # step's 2-D mask over the unreduced prompt and those slots (None: a cache that grows).
    static_room: int | None = None
    static_mask: torch.Tensor | None = None


@dataclass(eq=False)
class PrefillState:
    """One prefill, kept for the decoding steps that follow it."""

    entry: Compaction  # full input -> the language model's entry sequence
    items: list[Item]
    segments: list[Segment]
    numbering: Original | Renumbered
    tokens: Tokens
    scratch: Scratch
    decoding: Decoding = field(default_factory=Decoding)
    # ``(earlier state, its row for each row of this one)``: this prefill extends an earlier one of
    # the same encoding (generate without a cache) and keeps its selection instead of choosing again.
    reference: tuple["PrefillState", list[int]] | None = None

    @cached_property
    def boundaries(self) -> list[int]:
        """The union of the items' boundary layers (counts of layers completed)."""
        return sorted({layer for item in self.items for layer, _ in item.plan.schedule.boundaries})

    @cached_property
    def addition_layers(self) -> int:
        """Decoder layers after which DeepStack features are added (0: none)."""
        return max((item.additions.shape[1] for item in self.items if item.additions is not None), default=0)

    @property
    def full_length(self) -> int:
        return self.entry.source_length

    @property
    def entry_length(self) -> int:
        return self.entry.length

    @property
    def is_prefill(self) -> bool:
        return self.decoding.is_prefill

    def segment_of_layer(self, layer: int) -> int:
        return sum(1 for boundary in self.boundaries if boundary <= layer)

    def layer_roles(self, layers: int) -> tuple[tuple[int, bool, bool], ...]:
        """Per decoder layer (of ``layers``): ``(its segment, whether a boundary opens it, whether
        one opens the next)``, worked out once per prefill for the layers' hooks."""
        roles = self.__dict__.get("_roles")
        if roles is None or len(roles) != layers:
            marks = set(self.boundaries)
            roles = tuple((self.segment_of_layer(layer), layer in marks, layer + 1 in marks) for layer in range(layers))
            self.__dict__["_roles"] = roles
        return roles

    def segment_heads(self, scheme) -> frozenset[int]:
        """The first layer of each mapped kind (``LayerScheme.maps``) in each segment after the entry:
        where a decoding step's mask for that kind is mapped onto the segment's cache."""
        heads = self.__dict__.get("_heads")
        if heads is None:
            ends = [*self.boundaries[1:], len(scheme.kinds)]
            heads = frozenset(layer for start, end in zip(self.boundaries, ends) for layer in scheme.heads(start, end).values())
            self.__dict__["_heads"] = heads
        return heads

    def end_prefill(self) -> None:
        """Drop what only the prefill's layers and stages read (states, masks, RoPE of every
        segment): decoding steps need the compactions and the valid flags alone."""
        self.scratch = Scratch()
        for segment in self.segments:
            segment.inputs = LayerInputs()

    def with_layer_features(self, hidden: torch.Tensor, layer_index: int, placements: list[Placement],
                            rows: list[int] | None = None) -> torch.Tensor:
        """``hidden`` (a layer's output) plus the DeepStack features the model adds after that layer,
        at the kept visual tokens of ``placements``; ``rows`` are the batch rows ``hidden`` holds
        (all by default). Returns ``hidden`` itself when the layer adds nothing."""
        if layer_index >= self.addition_layers:
            return hidden
        index_rows, positions, values = [], [], []
        for placement in placements:
            features = placement.item.additions
            if features is not None and (rows is None or placement.item.row in rows):
                row = placement.item.row if rows is None else rows.index(placement.item.row)
                index_rows.append(torch.full_like(placement.positions, row))
                positions.append(placement.positions)
                values.append(features[placement.ids.to(features.device), layer_index])
        if not index_rows:
            return hidden
        index = (torch.cat(index_rows), torch.cat(positions))
        return hidden.index_put(index, hidden[index] + torch.cat(values).to(hidden.dtype))
