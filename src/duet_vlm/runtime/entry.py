"""What arrives at the language model's entry, and whether it can run exactly under the reducer.

A forward on top of a non-empty cache is one of: a decoding step (one new token, or a drafted
chunk that assisted or prompt-lookup decoding verifies), a prompt that ``generate`` resent because
a vision-side reduction left the cache shorter than the prompt (a second turn passed with
``past_key_values``), or a turn that brings new images or videos. Each either runs exactly or is
refused here, with what to do instead.
"""

from __future__ import annotations

import torch

from ..compat import cache_of, images_of
from .binding import Binding
from .protocol import RuntimeReducer
from .state import PrefillState
from .static import static_layers

RESENT = (
    "duet-vlm reduces visual items in a prefill, not on top of a cache (a reduced cache is shorter than its "
    "prompt, so generate() resends part of it). To continue a conversation, pass the whole conversation again "
    "without past_key_values"
)


def base_input_ids(adapter, module, args, kwargs: dict) -> torch.Tensor:
    """The base model's ``input_ids`` (recovered from ``inputs_embeds`` by the placeholder rows of
    the embedding table when only embeddings are given); refuses a video without frames."""
    videos = kwargs.get("pixel_values_videos")
    if isinstance(videos, torch.Tensor) and videos.dim() == 5 and videos.shape[0] and not videos.shape[1]:
        raise ValueError(f"pixel_values_videos of shape {tuple(videos.shape)}: a video with no frames")
    input_ids = kwargs.get("input_ids", args[0] if args else None)
    if input_ids is None:
        embeds = kwargs["inputs_embeds"]
        table = module.get_input_embeddings()
        input_ids = torch.full(embeds.shape[:2], -1, dtype=torch.long, device=embeds.device)
        for token_id in adapter.placeholder_ids:
            token = table(torch.tensor(token_id, device=embeds.device))
            input_ids = torch.where((embeds == token).all(-1), token_id, input_ids)
    return input_ids


def brings_visual_items(kwargs: dict) -> bool:
    """Whether a base-model forward carries images or videos to encode (or generate's encodings)."""
    return (
        images_of(kwargs) is not None
        or kwargs.get("pixel_values_videos") is not None
        or bool(kwargs.get("mm_encoder_outputs"))
    )


def check_turn_on_cache(binding: Binding, prompt: PrefillState | None, found, kwargs: dict, cached: int) -> None:
    """Refuse what cannot run exactly on top of a cache; return when the chunk is a decoding step
    (or a new turn that nothing reduces, e.g. under ``full``)."""
    new = kwargs["inputs_embeds"].shape[1]
    if new == 1:  # a decoding step: no data-dependent check on the path torch.compile runs
        return
    if prompt is not None and static_layers(cache_of(kwargs)) is not None and not reduces_nothing(binding, prompt):
        raise NotImplementedError(
            "several tokens at once on a static cache under a duet-vlm reducer (drafts of assisted or prompt-lookup "
            "decoding, a second turn): the cache's length is not read on the host there (a sync every step), so "
            "whether they follow the reduced prompt cannot be checked. Decode one token a step (greedy, sampling, "
            "beam search), or use the default dynamic cache"
        )
    input_ids, base_kwargs = found if found is not None else (None, {})
    check_new_items_on_cache(binding, prompt, base_kwargs)
    if prompt is not None and _resent(binding, prompt, kwargs, base_kwargs, cached, new, input_ids):
        raise NotImplementedError(RESENT)


def check_new_items_on_cache(binding: Binding, prompt: PrefillState | None, base_kwargs: dict) -> None:
    """A forward on a non-empty cache that brings images or videos: refused unless nothing is
    reduced. Checked at the base model's entry too, before transformers' own placeholder check
    trips over the part of a prompt that ``generate`` resends after a vision-side reduction."""
    cache = cache_of(base_kwargs)
    if cache is None or not brings_visual_items(base_kwargs) or reduces_nothing(binding, prompt):
        return
    if cache.get_seq_length() > 0:
        raise NotImplementedError(
            "a turn that brings new images or videos on top of a cache: duet-vlm reduces visual items in a "
            f"prefill only ({method_name(binding.reducer)} would reduce them). Pass the whole conversation "
            "again without past_key_values (each turn is then one prefill), or use full"
        )


def method_name(reducer: RuntimeReducer) -> str:
    """The name a user gave the method (``make(name, ratio=...)`` included)."""
    method = getattr(reducer, "method", None)
    return getattr(method, "method_name", "") or reducer.method_name or type(reducer).__name__


def reduces_nothing(binding: Binding, prompt: PrefillState | None) -> bool:
    """The last prefill and the default item's plan left everything whole (``full``, or a budget at
    or above the token count): a new item on the cache gets what the unpatched model gives it."""
    plan = binding.plan
    plan_whole = plan is not None and plan.vision is None and not plan.schedule.boundaries
    return plan_whole and (prompt is None or (prompt.entry.is_identity and not prompt.boundaries))


def _resent(binding: Binding, prompt: PrefillState, kwargs: dict, base_kwargs: dict, cached: int, new: int,
            input_ids) -> bool:
    """Whether a multi-token chunk restarts inside what the cache already holds. A decoding or
    verification chunk starts at the unreduced cache's length: the full-length mask ``generate``
    keeps is exactly that plus the chunk, and without padding positions are indices.

    The base model's 2-D mask is read first, then the language model's; Qwen3.5's ``generate``
    passes neither when no row is padded, and on a continued cache its positions are the text row
    plus the prompt's M-RoPE deltas, which the adapter reads back as indices (``text_positions``)."""
    unreduced = cached + prompt.full_length - prompt.entry_length
    for mask in (base_kwargs.get("attention_mask"), kwargs.get("attention_mask")):
        if isinstance(mask, torch.Tensor) and mask.dim() == 2:
            return mask.shape[1] != unreduced + new
    positions = kwargs.get("position_ids")
    text = binding.adapter.text_positions(positions) if isinstance(positions, torch.Tensor) else None
    if text is not None:
        return int(text[..., -1].max()) != unreduced + new - 1
    # A bare forward: placeholders in a chunk on a reduced cache can only be a resent prompt.
    return input_ids is not None and any(bool((input_ids == t).any()) for t in binding.adapter.placeholder_ids)
