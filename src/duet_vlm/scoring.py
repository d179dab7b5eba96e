"""Attention scores of a vision-encoder layer: one arithmetic for every tower and every engine.

A vision stage ranks tokens by the attention of a tower layer, recomputed from that layer's own
norm and projections on its captured input (the tower keeps its attention backend). The arithmetic
is the same whoever holds the layer (transformers' CLIP, SigLIP and Qwen vision blocks, vLLM's
fused-projection layers); only how queries and keys are read out of the layer differs:

- ``attention_scores`` takes queries and keys ``(units, heads, tokens, dim)`` and gives the CLS
  token's attention to each patch (with a CLS token) or the attention each token receives (without
  one), a chunk of query rows at a time.
- The extractors turn a layer into those queries and keys: ``separate_qk`` for a transformers
  attention module with ``q_proj`` and ``k_proj``, ``fused_qk`` for a fused ``(…, 3 * H * d)``
  projection output (vLLM's ``qkv_proj``, Qwen's ``qkv``).

With tensor parallelism, an engine's layer holds only its partition's heads: scores summed or
averaged over one partition's heads differ from the model's, so an engine must gather the heads
(or refuse) before calling ``attention_scores``.
"""

from __future__ import annotations

import torch
from torch import nn


def attention_scores(
    queries: torch.Tensor, keys: torch.Tensor, scale: float, has_cls: bool, chunk: int = 256,
    valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """Importance of each token of each unit, from one layer's queries and keys.

    With a CLS token (first token): the softmax of the CLS query over every key, summed over heads,
    on the patches ``(units, tokens - 1)``; only the CLS query row is read (``queries`` may hold just
    that row). Without: the attention each token *receives*, ``(units, tokens)`` (softmax over keys,
    mean over heads, summed over every query), ``chunk`` query rows at a time, so no more than a
    ``chunk x tokens`` slice of the map exists at once. Float32 throughout.

    Args:
        queries: ``(units, heads, tokens_q, dim)``.
        keys: ``(units, heads, tokens, dim)``.
        scale: the layer's attention scale (``dim ** -0.5``).
        valid: ``(units, tokens)`` False on padding tokens (a unit padded to the others' length,
            Gemma 4's patches): they are no keys and no queries, and receive 0. Without CLS only.

    >>> q = k = torch.zeros(2, 3, 4, 8)  # uniform attention
    >>> attention_scores(q, k, 0.5, has_cls=True).tolist()[0]  # each patch gets 1/4 from 3 heads
    [0.75, 0.75, 0.75]
    >>> attention_scores(q, k, 0.5, has_cls=False, chunk=3).tolist()[1]  # 4 queries x 1/4 each
    [1.0, 1.0, 1.0, 1.0]
    """
    if has_cls:
        logits = (queries[:, :, :1].float() @ keys.float().transpose(-1, -2)) * scale  # (U, H, 1, T)
        return logits.softmax(dim=-1)[:, :, 0, 1:].sum(dim=1)
    units, _, tokens, _ = keys.shape
    received = torch.zeros(units, tokens, dtype=torch.float32, device=keys.device)
    for begin in range(0, queries.shape[2], chunk):
        logits = (queries[:, :, begin : begin + chunk].float() @ keys.float().transpose(-1, -2)) * scale
        if valid is None:
            received += logits.softmax(dim=-1).mean(dim=1).sum(dim=1)
            continue
        logits = logits.masked_fill(~valid[:, None, None, :], float("-inf"))
        probs = logits.softmax(dim=-1).mean(dim=1)  # (U, chunk, T)
        probs = probs * valid[:, begin : begin + chunk, None]  # padded queries ask nothing
        received += probs.sum(dim=1)
    return received


def patch_scores(
    queries: torch.Tensor, keys: torch.Tensor, scale: float, has_cls: bool, received: bool = False, chunk: int = 256
) -> torch.Tensor:
    """``attention_scores``, or with ``received`` on a tower with a CLS token the attention each
    patch *receives* from every token (the CLS token among the queries), ``(units, tokens - 1)``:
    the signal of a stage that ranks by attention received on every tower
    (``VisionStage.received``). Without a CLS token the two are the same.

    >>> q = k = torch.zeros(1, 2, 4, 8)  # uniform: each of 4 queries gives each token 1/4
    >>> patch_scores(q, k, 0.5, has_cls=True, received=True).tolist()
    [[1.0, 1.0, 1.0]]
    """
    if has_cls and received:
        return attention_scores(queries, keys, scale, has_cls=False, chunk=chunk)[:, 1:]
    return attention_scores(queries, keys, scale, has_cls, chunk)


def separate_qk(attention: nn.Module, x: torch.Tensor, cls_only: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Queries and keys ``(U, H, T, d)`` of a transformers attention module with separate
    ``q_proj`` and ``k_proj`` (CLIP, SigLIP) on its normed input ``x`` ``(U, T, C)``; with
    ``cls_only`` the query of the first token only (``(U, H, 1, d)``: nothing more is computed)."""
    units, tokens, _ = x.shape
    keys = attention.k_proj(x).view(units, tokens, -1, attention.head_dim).transpose(1, 2)
    rows = x[:, :1] if cls_only else x
    queries = attention.q_proj(rows).view(units, rows.shape[1], -1, attention.head_dim).transpose(1, 2)
    return queries, keys


def fused_qk(projected: torch.Tensor, heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Queries and keys ``(U, H, T, d)`` of a fused projection's output ``(U, T, 3 * H * d)``
    (q, k, v concatenated, each head-major: vLLM's ``qkv_proj``).

    >>> q, k = fused_qk(torch.arange(12.0).view(1, 1, 12), heads=2)
    >>> q.flatten().tolist(), k.flatten().tolist()
    ([0.0, 1.0, 2.0, 3.0], [4.0, 5.0, 6.0, 7.0])
    """
    query, key, _ = projected.chunk(3, dim=-1)
    units, tokens, width = query.shape
    shape = (units, tokens, heads, width // heads)
    return query.reshape(shape).transpose(1, 2), key.reshape(shape).transpose(1, 2)


def clip_layer_scores(
    layer: nn.Module, layer_input: torch.Tensor, has_cls: bool, chunk: int = 256, received: bool = False
):
    """``(scores, keys (U, T, d))`` of a transformers CLIP or SigLIP encoder layer on its input
    ``(U, T, C)``, from its own ``layer_norm1``, ``q_proj`` and ``k_proj``: ``patch_scores``, and
    the keys averaged over heads."""
    attn = layer.self_attn
    with torch.no_grad():
        queries, keys = separate_qk(attn, layer.layer_norm1(layer_input), cls_only=has_cls and not received)
        scores = patch_scores(queries, keys, attn.scale, has_cls, received, chunk)
    return scores, keys.mean(dim=1)


def segment_scores(
    queries: torch.Tensor, keys: torch.Tensor, bounds: list[int], scale: float, chunk: int = 512
) -> torch.Tensor:
    """Attention each token receives ``(N,)`` within its own segment (an image or frame of a packed
    sequence, ``bounds``: cumulative token counts, ``cu_seqlens``), from float32 queries and keys
    ``(H, N, d)``: ``attention_scores`` without CLS on each segment. Empty segments are skipped."""
    received = torch.zeros(keys.shape[1], dtype=torch.float32, device=keys.device)
    for begin, end in zip(bounds[:-1], bounds[1:]):
        if end <= begin:
            continue
        received[begin:end] = attention_scores(
            queries[None, :, begin:end], keys[None, :, begin:end], scale, has_cls=False, chunk=chunk
        )[0]
    return received
