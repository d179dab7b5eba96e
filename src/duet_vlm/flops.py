"""Decoder prefill cost: FLOPs (the papers' formula and an exact count) and KV-cache bytes.

Both are functions of the model's text config and the number of tokens entering each layer, so they
are exact (no timing involved) and comparable across machines.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence


@dataclass(frozen=True)
class DecoderDims:
    """The sizes of a decoder-only language model that its cost depends on."""

    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    gated_mlp: bool = True

    @classmethod
    def from_config(cls, text_config) -> "DecoderDims":
        heads = text_config.num_attention_heads
        head_dim = getattr(text_config, "head_dim", None) or text_config.hidden_size // heads
        return cls(
            hidden=text_config.hidden_size,
            intermediate=text_config.intermediate_size,
            heads=heads,
            kv_heads=getattr(text_config, "num_key_value_heads", None) or heads,
            head_dim=head_dim,
        )


LLAVA_15_7B = DecoderDims(hidden=4096, intermediate=11008, heads=32, kv_heads=32, head_dim=128)


def fastv_flops(dims: DecoderDims, tokens_per_layer: Sequence[int]) -> int:
    """The FastV formula used by FastV, PyramidDrop, VisionZip and DUET: ``4nd² + 2n²d + 2ndm`` per layer.

    It counts multiply-accumulates of a vanilla transformer: no GQA, a two-matrix MLP, full
    (non-causal) attention. Use it to compare with published numbers, not to estimate run time.
    """
    d, m = dims.hidden, dims.intermediate
    return sum(4 * n * d * d + 2 * n * n * d + 2 * n * d * m for n in tokens_per_layer)


def exact_flops(dims: DecoderDims, tokens_per_layer: Sequence[int]) -> int:
    """FLOPs (2 per multiply-add) of the decoder layers' matrix products in a causal prefill.

    Counts Q/K/V/O projections with the real head counts (GQA), the gated MLP's three matrices, and
    the causal score and value products (``n(n+1)/2`` query-key pairs per head). Norms, RoPE,
    softmax and the LM head are left out (they are O(n·d) or independent of the visual tokens).
    """
    d, m = dims.hidden, dims.intermediate
    q_out, kv_out = dims.heads * dims.head_dim, dims.kv_heads * dims.head_dim
    mlp_matrices = 3 if dims.gated_mlp else 2
    total = 0
    for n in tokens_per_layer:
        projections = n * d * (2 * q_out + 2 * kv_out)  # q and o use q_out; k and v use kv_out
        attention = 2 * dims.heads * dims.head_dim * (n * (n + 1) // 2)
        mlp = mlp_matrices * n * d * m
        total += 2 * (projections + attention + mlp)
    return total


def kv_cache_bytes(dims: DecoderDims, tokens_per_layer: Sequence[int], bytes_per_element: int = 2) -> int:
    """Bytes the KV cache holds after a prefill whose layer ``l`` processed ``tokens_per_layer[l]`` tokens."""
    return sum(2 * n * dims.kv_heads * dims.head_dim * bytes_per_element for n in tokens_per_layer)
