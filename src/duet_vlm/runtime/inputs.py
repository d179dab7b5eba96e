"""What a segment's decoder layers receive in the prefill besides the hidden states: positions,
a mask and a RoPE per kind of layer (``LayerScheme.kinds``), and the family's per-token
arguments (``LayerScheme.layer_token_argument``) cut to the segment's tokens."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..adapters.scheme import rope_of
from ..compaction import Compaction


@dataclass
class LayerInputs:
    """What a segment's decoder layers receive in the prefill besides the hidden states.

    Masks and RoPE are kept per layer kind (``LayerScheme.kinds``): attention layers get a
    causal mask, linear-attention layers (a hybrid language model) the segment's 2-D padding mask
    (padded states are zeroed before they enter the recurrence; ``None``: no padding), and a family
    whose layer kinds rotate differently (Gemma's local and global RoPE) gets each kind's own
    ``(cos, sin)``. A kind without its own RoPE uses the ``"attention"`` layers' (or any kept one).
    """

    position_ids: torch.Tensor | None = None  # (B, L) what decoder layers receive (None: Qwen-VL)
    rope_positions: torch.Tensor | None = None  # (B, L), or (3, B, L) M-RoPE: the rotary's input
    rope: dict = field(default_factory=dict)  # {kind: (cos, sin)}
    masks: dict = field(default_factory=dict)  # {kind: the mask its layers receive}

    def position_embeddings(self, kind: str = "attention") -> tuple[torch.Tensor, torch.Tensor] | None:
        """The ``(cos, sin)`` layers of ``kind`` receive."""
        return rope_of(self.rope, kind)

    def kwargs(self, kind: str = "attention") -> dict:
        """The keyword arguments of a layer of ``kind`` (``LayerScheme.kinds``)."""
        return dict(
            attention_mask=self.masks.get(kind), position_ids=self.position_ids,
            position_embeddings=self.position_embeddings(kind),
        )

    def keep(self, kind: str, kwargs: dict) -> None:
        """Keep the mask and RoPE the model built for its layers of ``kind`` (the entry segment's)."""
        self.masks[kind] = kwargs.get("attention_mask")
        if kwargs.get("position_embeddings") is not None:
            self.rope[kind] = kwargs["position_embeddings"]


def last_queries(kwargs: dict, queries: int) -> dict:
    """A layer's mask, positions and RoPE cut to its last ``queries`` query rows, for a layer the
    model passes only the last ``logits_to_keep`` tokens (``LayerScheme.queries_cut_from``): every
    key stays, as the model keeps them (its mask is ``(B, 1, q, kv)``)."""
    cut = dict(kwargs)
    mask = kwargs.get("attention_mask")
    if isinstance(mask, torch.Tensor) and mask.dim() == 4:
        cut["attention_mask"] = mask[..., -queries:, :]
    if isinstance(kwargs.get("position_ids"), torch.Tensor):
        cut["position_ids"] = kwargs["position_ids"][..., -queries:]
    rope = kwargs.get("position_embeddings")
    if rope is not None:
        cut["position_embeddings"] = tuple(t[:, -queries:] for t in rope)
    return cut


def token_argument(spec: tuple[str, int], args: tuple, kwargs: dict):
    """The decoder layer's per-token argument ``spec`` (``(name, position)``), or ``None``."""
    name, position = spec
    return args[position] if len(args) > position else kwargs.get(name)


def with_token_argument(spec: tuple[str, int], args: tuple, kwargs: dict, value) -> tuple[tuple, dict]:
    """``args, kwargs`` with the per-token argument ``spec`` replaced by ``value``."""
    name, position = spec
    if len(args) > position:
        return (*args[:position], value, *args[position + 1 :]), kwargs
    kwargs[name] = value
    return args, kwargs


def segment_layer_inputs(scheme, state, number: int, layer_index: int, kind: str,
                         hidden: torch.Tensor, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """What a prefill layer of segment ``number`` (> 0) receives: its segment's mask, positions and
    RoPE, and its per-token argument (``LayerScheme.layer_token_argument``, passed at the entry
    sequence's length) cut to the segment's tokens. A layer the model passes only the last
    ``logits_to_keep`` tokens (``LayerScheme.queries_cut_from``) gets the last query rows of each,
    once it is checked that those tokens are the prompt's last, kept by every boundary."""
    segment = state.segments[number]
    kwargs.update(segment.layer_kwargs(kind))
    queries = hidden.shape[1]
    cut = queries != segment.steps.length
    if cut:
        if scheme.queries_cut_from is None or layer_index < scheme.queries_cut_from:
            raise RuntimeError(
                f"decoder layer {layer_index} received {queries} tokens where its segment holds {segment.steps.length}"
            )
        if layer_index == scheme.queries_cut_from:  # once: the layers after it see the same rows
            check_last_kept(segment.steps, queries, state.entry_length)
        kwargs = last_queries(kwargs, queries)
    spec = scheme.layer_token_argument
    value = None if spec is None else token_argument(spec, args, kwargs)
    if isinstance(value, torch.Tensor) and value.shape[1] == state.entry_length and not cut:
        args, kwargs = with_token_argument(spec, args, kwargs, segment.steps.gather(value))
    return (hidden, *args[1:]), kwargs


def check_last_kept(steps: Compaction, queries: int, source_length: int) -> None:
    """Refuse a cut to the last ``queries`` tokens (``logits_to_keep``) when they are not the last
    ``queries`` tokens of the sequence ``steps`` cuts from: a reduction dropped one of them."""
    tail = torch.arange(source_length - queries, source_length, device=steps.index.device)
    if not bool((steps.index[:, -queries:] == tail).all()):
        raise NotImplementedError(
            f"the model computes only the last {queries} tokens here (logits_to_keep={queries}), and the reducer "
            "dropped some of them; pass a logits_to_keep that covers only tokens the reducer keeps (the prompt's text)"
        )
