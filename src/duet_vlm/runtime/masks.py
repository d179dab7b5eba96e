"""Attention masks of a compacted sequence, for whichever backend the model uses."""

from __future__ import annotations

import torch
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, causal_mask_function


def gather_mask(mask, q_index: torch.Tensor | None, kv_index: torch.Tensor):
    """Select query rows and key columns of a 2-D (flash) or 4-D (sdpa/eager) mask; ``None`` stays."""
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"duet-vlm cannot reduce tokens under a {type(mask).__name__} mask (use sdpa, eager or FA2)")
    if mask.dim() == 2:
        return mask.gather(1, kv_index)
    if mask.dim() != 4:
        raise ValueError(f"unexpected attention mask of shape {tuple(mask.shape)}")
    batch = kv_index.shape[0]
    mask = mask.expand(batch, -1, -1, -1)
    if q_index is not None:
        mask = mask.gather(2, q_index[:, None, :, None].expand(-1, mask.shape[1], -1, mask.shape[3]))
    return mask.gather(3, kv_index[:, None, None, :].expand(-1, mask.shape[1], mask.shape[2], -1))


def causal_mask(text_config, hidden: torch.Tensor, key_valid: torch.Tensor, query_length: int):
    """The causal mask transformers would build for the model's attention backend, over
    ``key_valid`` keys of which the last ``query_length`` are the queries (a segment's own sequence in
    a prefill, the new tokens in a decoding step)."""
    builder = ALL_MASK_ATTENTION_FUNCTIONS[text_config._attn_implementation]
    kv_length = key_valid.shape[1]
    return builder(
        batch_size=key_valid.shape[0],
        q_length=query_length,
        kv_length=kv_length,
        q_offset=kv_length - query_length,
        kv_offset=0,
        mask_function=causal_mask_function,
        attention_mask=key_valid,
        allow_is_causal_skip=False,
        dtype=hidden.dtype,
        device=hidden.device,
    )
