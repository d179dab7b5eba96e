"""What a segment's decoder layers receive in the prefill besides the hidden states: positions,
and a mask and a RoPE per kind of layer (``ModelAdapter.layer_kinds``)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class LayerInputs:
    """What a segment's decoder layers receive in the prefill besides the hidden states.

    Masks and RoPE are kept per layer kind (``ModelAdapter.layer_kinds``): attention layers get a
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
        rope = self.rope.get(kind)
        if rope is None:
            rope = self.rope.get("attention", next(iter(self.rope.values()), None))
        return rope

    def kwargs(self, kind: str = "attention") -> dict:
        """The keyword arguments of a layer of ``kind`` (``ModelAdapter.layer_kinds``)."""
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
    model passes only the last ``logits_to_keep`` tokens (``ModelAdapter.queries_cut_from``): every
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
