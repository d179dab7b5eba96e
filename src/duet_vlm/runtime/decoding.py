"""Decoding steps after a reduced prefill: each layer segment attends over its own cache.

``generate`` keeps a full-length 2-D mask and unreduced positions. At the language model's entry
they are mapped onto the entry sequence (``continue_prompt``); at the first layer of each later
segment the mask is mapped onto that segment's cache, and renumbered positions move back by what the
segment dropped (``Segment.decode_kwargs``; each layer's inputs: ``decoding_layer``). This is the
path ``torch.compile`` runs over and over: tensor arithmetic and Python state only, no
data-dependent branch and no device sync.
"""

from __future__ import annotations

import torch

from ..compaction import Compaction
from ..compat import cache_of
from .binding import Binding
from .inputs import last_queries
from .state import PrefillState


def continue_prompt(prompt: PrefillState, kwargs: dict, cache) -> tuple | None:
    """A decoding step at the language model's entry: the mask and positions of the new tokens."""
    cached = cache.get_seq_length()
    # A static cache's length is a tensor (read on the host, it would sync every step): drafts,
    # whose cropping this checks, are refused on one under a reduction (``check_turn_on_cache``).
    if not isinstance(cached, torch.Tensor) and cached < prompt.entry_length and not crop_prompt(prompt, cached):
        # Assisted decoding prefills the prompt with the first drafts and crops them afterwards:
        # the drafts chose what Stage B kept, so the result would differ from greedy decoding.
        raise NotImplementedError(
            "the cache was cropped into the prefill (assisted or speculative decoding?): under a method that "
            "prunes inside the language model the drafted tokens changed what was kept. Use greedy, sampling or "
            "beam search, or a method that reduces only before the language model (duet_vlm.generation_modes "
            "lists them)"
        )
    prompt.decoding.is_prefill = False
    prompt.decoding.kwargs.clear()
    entry = prompt.entry
    if entry.is_identity and not prompt.boundaries:  # the prefill reduced nothing: nothing to map
        return (), kwargs
    # Tokens each row dropped at the entry (alignment pads are not tokens of the row).
    shift = prompt.full_length - entry.present()  # (B,)
    attention_mask = kwargs.get("attention_mask")
    new = kwargs["inputs_embeds"].shape[1]
    device = kwargs["inputs_embeds"].device
    # alignment pads (at the entry, or in a later segment whose rows kept different counts: per-row
    # or per-item budgets) need masking
    if attention_mask is None and (entry.pad is not None or any(s.steps.pad is not None for s in prompt.segments[1:])):
        length = prompt.full_length + cached - prompt.entry_length + new
        attention_mask = torch.ones(shift.shape[0], length, dtype=torch.long, device=device)
    if attention_mask is not None:
        if attention_mask.dim() != 2 or attention_mask.shape[1] < prompt.full_length:
            raise ValueError("decoding under duet-vlm needs the full-length 2-D attention_mask generate() keeps")
        head = entry.gather_mask(attention_mask[:, : prompt.full_length])
        attention_mask = kwargs["attention_mask"] = torch.cat([head, attention_mask[:, prompt.full_length :]], dim=1)
    prompt.decoding.mask = attention_mask
    if entry.is_identity:  # nothing dropped at the entry
        return (), kwargs
    dropped = prompt.full_length - prompt.entry_length  # a Python int: no device sync (torch.compile)
    position_ids = prompt.numbering.decode_entry(
        kwargs.get("position_ids"), shift, cached + dropped, new, entry, dropped
    )
    if position_ids is not None:
        kwargs["position_ids"] = position_ids
    return (), kwargs


def crop_prompt(prompt: PrefillState, entry_length: int) -> bool:
    """Cut ``prompt`` back to its first ``entry_length`` entry tokens, where ``generate`` cropped the
    cache into the prefill: assisted and prompt-lookup decoding put drafts after the prompt in the
    prefill, and drop the rejected ones from the cache. Only the text at the end of every row can be
    cut, of a prompt without boundaries (the drafts chose nothing there); returns whether it could."""
    cut = prompt.entry_length - entry_length
    entry = prompt.entry
    if prompt.boundaries or entry.pad is not None or not 0 < cut < entry.length:
        return False
    tail = torch.arange(entry.source_length - cut, entry.source_length, device=entry.index.device)
    if not bool((entry.index[:, -cut:] == tail).all()):
        return False  # the cut slots are not the last tokens of the input
    source_pad = None if entry.source_pad is None else entry.source_pad[:, :-cut]
    prompt.entry = Compaction(entry.keep[:, :-cut], entry.index[:, :-cut], None, source_pad)
    prompt.segments[0].steps = prompt.entry.output_identity()
    tokens = prompt.tokens
    tokens.source_ids, tokens.ids, tokens.valid = tokens.source_ids[:, :-cut], tokens.ids[:, :-cut], tokens.valid[:, :-cut]
    if tokens.types is not None:
        tokens.types = tokens.types[:, :-cut]
    return True


def continue_step(binding: Binding, prompt: PrefillState, kwargs: dict, cache, found, cached: int):
    """A decoding step at the language model's entry after a reduced prefill: the step's 2-D mask
    (``LayerScheme.step_mask``: the one the language model received, or the base model's where it
    built the masks itself) is mapped onto the entry sequence (``continue_prompt``), and the entry
    segment's masks come from it (``LayerScheme.step_masks``); later segments map theirs at their
    heads (``Segment.decode_kwargs``)."""
    if prompt.entry.is_identity and not prompt.boundaries:  # the prefill reduced nothing
        return continue_prompt(prompt, kwargs, cache)
    scheme = binding.scheme
    built = kwargs.get("attention_mask")
    user_mask = (found[1] if found is not None else {}).get("attention_mask")
    length = cached + prompt.full_length - prompt.entry_length + kwargs["inputs_embeds"].shape[1]
    mask = kwargs["attention_mask"] = scheme.step_mask(kwargs, user_mask, length)
    result = continue_prompt(prompt, kwargs, cache)
    mapped = kwargs.get("attention_mask", mask)
    first = prompt.boundaries[0] if prompt.boundaries else len(scheme.kinds)
    masks = scheme.step_masks(built, mapped, kwargs["inputs_embeds"], cache, prompt.entry.is_identity, first)
    if masks is not mapped:
        kwargs["attention_mask"] = masks
    return result


def unreduced_decode_positions(binding: Binding, prompt: PrefillState | None, input_ids: torch.Tensor, kwargs: dict) -> bool:
    """A decoding step given neither positions nor a mask after a reduced prefill: a model that
    numbers it from the cache's length (Qwen-VL) would count the reduced cache. Puts the positions
    the unreduced model would use into ``kwargs`` (the adapter's ``decode_position_ids``); returns
    whether it did."""
    cache = cache_of(kwargs)
    if (
        prompt is None or cache is None
        or kwargs.get("position_ids") is not None or kwargs.get("attention_mask") is not None
    ):
        return False
    cached = cache.get_seq_length()
    if cached == 0 or prompt.full_length == prompt.entry_length:
        return False
    start = prompt.full_length + cached - prompt.entry_length  # the unreduced cache's length
    positions = binding.adapter.decode_position_ids(start, input_ids.shape[1], input_ids.shape[0], input_ids.device)
    if positions is None:
        return False
    kwargs["position_ids"] = positions
    return True


def decoding_layer(scheme, prompt: PrefillState, layer_index: int, args: tuple, kwargs: dict) -> tuple | None:
    """What decoder layer ``layer_index`` receives in a decoding step: the model's own inputs in the
    entry segment and in layers of a kind whose mask is not mapped, else its segment's mask (mapped
    at the segment's first layer of the kind, ``Segment.decode_kwargs``) and positions, cut to the
    last query rows where the model passes only those. ``None``: the layer's inputs stay."""
    number = prompt.segment_of_layer(layer_index)
    kind = scheme.kinds[layer_index]
    if number == 0 or not scheme.maps(kind):
        # A kind whose mask is not mapped (a recurrence: its state already holds the kept
        # tokens, and new tokens are never dropped) keeps the model's own.
        return None
    if layer_index in prompt.segment_heads(scheme):
        # The segment's first layer of each mapped kind maps this step's mask for that kind
        # onto the segment's cache.
        hidden = args[0] if args else kwargs["hidden_states"]
        prompt.decoding.kwargs[number, kind] = prompt.segments[number].decode_kwargs(
            prompt, scheme, hidden, kwargs, kind, layer_index
        )
    kwargs.update(prompt.decoding.kwargs[number, kind])
    cut = scheme.queries_cut_from
    if cut is not None and layer_index >= cut:
        # A chunk of several tokens (a second turn, verified drafts): the model passes the
        # layers from ``queries_cut_from`` on only its last ``logits_to_keep`` rows.
        rows = (args[0] if args else kwargs["hidden_states"]).shape[1]
        mask = kwargs.get("attention_mask")
        if isinstance(mask, torch.Tensor) and mask.shape[-2] > rows:
            kwargs = last_queries(kwargs, rows)
    return args, kwargs
