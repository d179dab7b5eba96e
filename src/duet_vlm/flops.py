"""Decoder prefill cost: FLOPs (the papers' formula and an exact count) and KV-cache bytes.

Both are functions of the model's text config and the number of tokens entering each layer, so they
are exact (no timing involved) and comparable across machines.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from . import compat


@dataclass(frozen=True)
class LinearAttentionDims:
    """The sizes of a Gated-DeltaNet linear-attention layer (Qwen3.5) that its cost depends on."""

    key_heads: int
    value_heads: int
    key_head_dim: int
    value_head_dim: int
    conv_kernel: int

    @property
    def key_dim(self) -> int:
        return self.key_heads * self.key_head_dim

    @property
    def value_dim(self) -> int:
        return self.value_heads * self.value_head_dim

    @property
    def conv_dim(self) -> int:
        """Channels of the causal convolution: queries, keys and values."""
        return 2 * self.key_dim + self.value_dim


@dataclass(frozen=True)
class LayerDims:
    """What one layer of a decoder whose layers differ (Gemma 4) has of its own: its attention's
    head size and key/value heads, whether it reuses an earlier layer's keys and values (no key or
    value projection and no cache of its own: KV sharing), whether its values are its keys (no value
    projection: ``attention_k_eq_v``), and its MLP's width."""

    head_dim: int
    kv_heads: int
    intermediate: int
    reuses_kv: bool = False
    values_are_keys: bool = False


@dataclass(frozen=True)
class DecoderDims:
    """The sizes of a decoder-only language model that its cost depends on.

    ``layer_kinds``: per layer ``"attention"``, ``"sliding_attention"`` (a query sees the last
    ``window`` tokens, its cache keeps the last ``window - 1``: Gemma) or ``"linear_attention"`` in a
    decoder that mixes kinds (empty: every layer attends globally), with the linear-attention layers'
    sizes in ``linear``; ``gated_query``: the attention layers' query projection also gives an
    output gate per head (Qwen3.5); ``image_blocks``: the tokens of an image attend to each other in
    both directions (Gemma 3; Gemma 4 in its sliding layers only, ``global_blocks=False``), which
    adds ``b(b - 1)/2`` query-key pairs per image of ``b`` tokens; ``per_layer``: each layer's own
    sizes where they differ (``LayerDims``; empty: every layer has the sizes above);
    ``per_layer_input``: the width of Gemma 4's per-layer inputs (each layer gates its output with
    one, ``2nd·p`` multiply-adds, and the model projects its embeddings into every layer's, ``nd·p``
    per layer)."""

    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    gated_mlp: bool = True
    layer_kinds: tuple[str, ...] = ()
    linear: LinearAttentionDims | None = None
    gated_query: bool = False
    window: int | None = None
    image_blocks: bool = False
    global_blocks: bool = True
    per_layer: tuple[LayerDims, ...] = ()
    per_layer_input: int = 0

    @classmethod
    def from_config(cls, text_config) -> "DecoderDims":
        if getattr(text_config, "model_type", None) == "gemma4_text":
            return cls.gemma4(text_config)
        heads = text_config.num_attention_heads
        head_dim = getattr(text_config, "head_dim", None) or text_config.hidden_size // heads
        intermediate = getattr(text_config, "intermediate_size", None)
        if getattr(text_config, "num_experts", None):  # a mixture of experts: the active experts' MLPs
            intermediate = (text_config.moe_intermediate_size * text_config.num_experts_per_tok
                            + getattr(text_config, "shared_expert_intermediate_size", 0))
        types = tuple(getattr(text_config, "layer_types", None) or ())
        hybrid = "linear_attention" in types
        sliding = "sliding_attention" in types and getattr(text_config, "sliding_window", None) is not None
        kinds = {"linear_attention": "linear_attention", "sliding_attention": "sliding_attention"}
        linear = LinearAttentionDims(
            text_config.linear_num_key_heads, text_config.linear_num_value_heads, text_config.linear_key_head_dim,
            text_config.linear_value_head_dim, text_config.linear_conv_kernel_dim,
        ) if hybrid else None
        return cls(
            hidden=text_config.hidden_size,
            intermediate=intermediate,
            heads=heads,
            kv_heads=getattr(text_config, "num_key_value_heads", None) or heads,
            head_dim=head_dim,
            layer_kinds=tuple(kinds.get(t, "attention") for t in types) if hybrid or sliding else (),
            linear=linear,
            gated_query=hybrid and "qwen3_5" in getattr(text_config, "model_type", ""),
            window=text_config.sliding_window if sliding else None,
            image_blocks=getattr(text_config, "model_type", None) == "gemma3_text",
        )

    @classmethod
    def gemma4(cls, text_config) -> "DecoderDims":
        """A Gemma 4 decoder: layers of two kinds with their own head sizes (read from the config's
        ``per_layer_config``), KV sharing, per-layer inputs, and image blocks in sliding layers."""
        modes = compat.kv_sharing_modes(text_config)
        types = list(text_config.layer_types)
        experts = text_config.top_k_experts * text_config.moe_intermediate_size if text_config.enable_moe_block else 0
        per_layer = tuple(
            LayerDims(
                head_dim=text_config.per_layer_config[i].head_dim,
                kv_heads=text_config.per_layer_config[i].num_key_value_heads,
                intermediate=text_config.intermediate_size * (2 if text_config.use_double_wide_mlp and modes[i] == "reuse" else 1)
                + experts,
                reuses_kv=modes[i] == "reuse",
                values_are_keys=bool(text_config.attention_k_eq_v) and types[i] != "sliding_attention",
            )
            for i in range(text_config.num_hidden_layers)
        )
        first = per_layer[0]
        return cls(
            hidden=text_config.hidden_size,
            intermediate=first.intermediate,
            heads=text_config.num_attention_heads,
            kv_heads=first.kv_heads,
            head_dim=first.head_dim,
            layer_kinds=tuple("sliding_attention" if t == "sliding_attention" else "attention" for t in types),
            window=text_config.sliding_window,
            image_blocks=text_config.use_bidirectional_attention == "vision",
            global_blocks=False,
            per_layer=per_layer,
            per_layer_input=text_config.hidden_size_per_layer_input or 0,
        )

    def kind(self, layer: int) -> str:
        return self.layer_kinds[layer] if self.layer_kinds else "attention"

    def layer(self, layer: int) -> LayerDims:
        """Layer ``layer``'s own sizes."""
        if self.per_layer:
            return self.per_layer[layer]
        return LayerDims(self.head_dim, self.kv_heads, self.intermediate)


LLAVA_15_7B = DecoderDims(hidden=4096, intermediate=11008, heads=32, kv_heads=32, head_dim=128)


def fastv_flops(dims: DecoderDims, tokens_per_layer: Sequence[int]) -> int:
    """The FastV formula used by FastV, PyramidDrop, VisionZip and DUET: ``4nd² + 2n²d + 2ndm`` per layer.

    It counts multiply-accumulates of a vanilla transformer: no GQA, a two-matrix MLP, full
    (non-causal) attention. Use it to compare with published numbers, not to estimate run time.
    """
    d, m = dims.hidden, dims.intermediate
    return sum(4 * n * d * d + 2 * n * n * d + 2 * n * d * m for n in tokens_per_layer)


def exact_flops(dims: DecoderDims, tokens_per_layer: Sequence[int], blocks: Sequence[Sequence[int]] | None = None) -> int:
    """FLOPs (2 per multiply-add) of the decoder layers' matrix products in a causal prefill.

    Counts Q/K/V/O projections with the real head counts (GQA; twice the query width where the
    query projection also gives a gate), the gated MLP's three matrices, and the causal score and
    value products (``n(n+1)/2`` query-key pairs per head; within the window in a sliding layer,
    ``causal_pairs``; plus each image block's pairs with ``image_blocks``, ``blocks[layer]`` holding
    the sizes of the layer's image blocks). A linear-attention layer (``linear_attention_flops``)
    has no term in ``n²``. Norms, RoPE, softmax and the LM head are left out (they are O(n·d) or
    independent of the visual tokens).
    """
    return sum(layer_flops(dims, layer, n, blocks[layer] if blocks else ()) for layer, n in enumerate(tokens_per_layer))


def causal_pairs(n: int, window: int | None = None) -> int:
    """Query-key pairs of a causal mask over ``n`` tokens, each query seeing at most ``window`` keys
    (itself included) in a sliding layer.

    >>> causal_pairs(4), causal_pairs(4, window=2)
    (10, 7)
    """
    if window is None or n <= window:
        return n * (n + 1) // 2
    return window * (window + 1) // 2 + (n - window) * window


def attention_pairs(dims: DecoderDims, layer: int, n: int, blocks: Sequence[int] = ()) -> int:
    """Query-key pairs attention ``layer`` computes over ``n`` tokens: causal, within its window in a
    sliding layer, and with ``image_blocks`` each block of ``b`` image tokens' ``b(b - 1)/2`` pairs
    with the later tokens of their block (Gemma's overlay bounds only the past, so a window never
    cuts them)."""
    pairs = causal_pairs(n, dims.window if dims.kind(layer) == "sliding_attention" else None)
    if dims.image_blocks and (dims.global_blocks or dims.kind(layer) == "sliding_attention"):
        pairs += sum(b * (b - 1) // 2 for b in blocks)
    return pairs


def layer_flops(dims: DecoderDims, layer: int, n: int, blocks: Sequence[int] = ()) -> int:
    """``exact_flops`` of decoder ``layer`` on ``n`` tokens (``blocks``: its image blocks' sizes)."""
    own = dims.layer(layer)
    d, m = dims.hidden, own.intermediate
    mlp = (3 if dims.gated_mlp else 2) * n * d * m
    if dims.kind(layer) == "linear_attention":
        return 2 * mlp + linear_attention_flops(dims.linear, d, n)
    q_out, kv_out = dims.heads * own.head_dim, own.kv_heads * own.head_dim
    q_proj = (2 if dims.gated_query else 1) * q_out
    kv_proj = 0 if own.reuses_kv else (1 if own.values_are_keys else 2) * kv_out
    projections = n * d * (q_proj + q_out + kv_proj)  # q (and its gate), o; k and v unless reused
    attention = 2 * dims.heads * own.head_dim * attention_pairs(dims, layer, n, blocks)
    per_layer_input = 3 * n * d * dims.per_layer_input  # its gate and projection, its share of the model's
    return 2 * (projections + attention + mlp + per_layer_input)


def linear_attention_flops(linear: LinearAttentionDims, hidden: int, n: int) -> int:
    """FLOPs of a Gated-DeltaNet token mixer on ``n`` tokens, all linear in ``n``: the input
    projections (queries, keys and values; the output gate; the two per-head scalars) and the output
    projection, the depthwise causal convolution (``conv_kernel`` taps per channel), and the
    delta-rule recurrence, counted as its token-by-token form: per value head and token, the state's
    decay, its product with the key, the rank-one update and the readout by the query (four
    ``key_head_dim x value_head_dim`` products; the chunked kernel reorders, not removes, them)."""
    projections = n * hidden * (linear.conv_dim + linear.value_dim + 2 * linear.value_heads) + n * linear.value_dim * hidden
    convolution = n * linear.conv_dim * linear.conv_kernel
    recurrence = 4 * n * linear.value_heads * linear.key_head_dim * linear.value_head_dim
    return 2 * (projections + convolution + recurrence)


def kv_cache_bytes(dims: DecoderDims, tokens_per_layer: Sequence[int], bytes_per_element: int = 2) -> int:
    """Bytes the cache holds after a prefill whose layer ``l`` processed ``tokens_per_layer[l]`` tokens:
    keys and values per token in attention layers; in linear-attention layers a state whose size
    does not depend on the tokens (``linear_state_bytes``), so it does not shrink when tokens drop."""
    return sum(layer_cache_bytes(dims, layer, n, bytes_per_element) for layer, n in enumerate(tokens_per_layer))


def layer_cache_bytes(dims: DecoderDims, layer: int, n: int, bytes_per_element: int = 2) -> int:
    """``kv_cache_bytes`` of decoder ``layer`` after ``n`` tokens."""
    if dims.kind(layer) == "linear_attention":
        return linear_state_bytes(dims.linear, bytes_per_element)
    own = dims.layer(layer)
    if own.reuses_kv:  # it reads an earlier layer's keys and values and caches nothing
        return 0
    if dims.kind(layer) == "sliding_attention":  # the sliding cache keeps the last window - 1 tokens
        n = min(n, dims.window - 1)
    return 2 * n * own.kv_heads * own.head_dim * bytes_per_element


def linear_state_bytes(linear: LinearAttentionDims, bytes_per_element: int = 2) -> int:
    """A Gated-DeltaNet layer's cache, per sequence: the convolution's last ``conv_kernel`` inputs
    (model dtype) and the recurrent state, ``key_head_dim x value_head_dim`` per value head, in
    float32 (as transformers' kernels and flash-linear-attention keep it)."""
    return linear.conv_dim * linear.conv_kernel * bytes_per_element + 4 * linear.value_heads * linear.key_head_dim * linear.value_head_dim


def encoder_flops(hidden: int, intermediate: int, heads: int, head_dim: int, layers: int, tokens: int,
                  kv_heads: int | None = None) -> int:
    """FLOPs (2 per multiply-add) of a bidirectional vision encoder's matrix products on ``tokens``
    tokens: per layer the Q/K/V/O projections, the ``tokens²`` score and value products per head, and a
    gated MLP's three matrices (a Gemma 4 tower; patch embedding, norms and pooling left out).

    >>> encoder_flops(4, 8, 2, 2, 1, 3)  # 2 * (3*4*(2*4 + 2*4) + 2*2*2*9 + 3*3*4*8)
    1104
    """
    kv_heads = heads if kv_heads is None else kv_heads
    q_out, kv_out = heads * head_dim, kv_heads * head_dim
    projections = tokens * hidden * (2 * q_out + 2 * kv_out)
    attention = 2 * heads * head_dim * tokens * tokens
    mlp = 3 * tokens * hidden * intermediate
    return 2 * layers * (projections + attention + mlp)
