"""A static cache under a reduction: each decoder layer's buffer as long as the tokens it keeps.

transformers' ``StaticCache`` (``generate(..., cache_implementation="static")``, what compiled
decoding runs on) gives every layer one buffer of ``max_cache_len`` slots (the prompt plus the new
tokens), allocated at the layer's first write (``StaticLayer.lazy_initialization``), and a layer
writes at its own count of tokens (``cumulative_length``), not at the prompt's positions. So a layer
that holds ``kept`` tokens gets a buffer of ``kept + room`` slots (``room``: what the cache leaves for
new tokens beyond the unreduced prompt), set before its first write (``size_layer``); a sliding
layer keeps no more than its window. Its attention then sees that buffer: a mask the runtime builds
over a segment's own tokens is padded to it, the slots not yet written masked (``pad_keys``).

The masks ``generate`` builds for a static cache are 4-D (or one per layer type), sized to the
unreduced prompt; the runtime maps the 2-D mask instead. A prefill's is read back from them
(``LayerScheme.flat_mask``: the last query row of a full-attention mask); a decoding step's is the
prefill's followed by ones, as long as the cache's slots (``Decoding.static_mask``): a fixed shape,
so that a compiled step does not recompile, its slots past the step masked by the causal offset of
each layer's own count.
"""

from __future__ import annotations

import warnings

import torch
from transformers.cache_utils import StaticLayer

from ..adapters.scheme import causal_mask
from ..compat import check_static_cache


def static_layers(cache) -> list | None:
    """The cache's layers where any is a ``StaticLayer`` (``None``: no cache, or none static)."""
    layers = getattr(cache, "layers", None)
    if not layers or not any(isinstance(layer, StaticLayer) for layer in layers):
        return None
    return layers


def started(layers: list) -> bool:
    """Whether a static layer was written (a decoding step, not a prefill): a Python flag, no sync."""
    return any(isinstance(layer, StaticLayer) and layer.is_initialized for layer in layers)


def room(layers: list, full_length: int) -> int:
    """The slots a static cache leaves after the unreduced prompt of ``full_length`` tokens: its
    length (a layer of full attention holds it; a sliding one the smaller of it and its window)
    less the prompt."""
    lengths = [layer.max_cache_len for layer in layers if isinstance(layer, StaticLayer) and not layer.is_sliding]
    if not lengths:  # a sliding layer's buffer may be its window, shorter than the cache: no length to read
        raise NotImplementedError(
            "a static cache whose every layer slides, under a duet-vlm reduction: the cache's length cannot be read "
            "from it to size each layer. Use the default dynamic cache"
        )
    slots = max(lengths)
    if slots < full_length:
        raise ValueError(f"a static cache of {slots} slots cannot hold a prompt of {full_length} tokens")
    return slots - full_length


def size_layer(layers: list, index: int, length: int, extra: int) -> None:
    """Give static layer ``index`` (not yet written) ``length + extra`` slots, at most what it has."""
    layer = layers[index] if 0 <= index < len(layers) else None
    if isinstance(layer, StaticLayer) and not layer.is_initialized:
        layer.max_cache_len = min(layer.max_cache_len, length + extra)


def key_slots(layers: list, index: int, length: int) -> int:
    """The keys layer ``index`` attends in a prefill of ``length`` tokens: a static layer returns its
    buffer, or the whole input where it is longer (a sliding layer's window); else the input."""
    layer = layers[index] if 0 <= index < len(layers) else None
    if isinstance(layer, StaticLayer):
        return max(length, layer.max_cache_len)
    return length


def pad_keys(mask: torch.Tensor, slots: int) -> torch.Tensor:
    """A 4-D attention mask (boolean, or additive for eager attention) with its keys padded to
    ``slots``, the new ones masked."""
    if mask.shape[-1] >= slots:
        return mask
    masked = False if mask.dtype == torch.bool else torch.finfo(mask.dtype).min
    return torch.nn.functional.pad(mask, (0, slots - mask.shape[-1]), value=masked)


def built_mask(mask) -> bool:
    """Whether ``mask`` is one ``generate`` built for a static cache (4-D, or one per layer type)."""
    return isinstance(mask, dict) or (isinstance(mask, torch.Tensor) and mask.dim() == 4)


def entry_mask(scheme, prompt, kwargs: dict, layers: list, whole: bool, prefill: bool) -> bool:
    """At the base model's entry, where the cache is static (``layers``: ``static_layers``'s) and
    ``generate`` built its masks: put the 2-D mask the runtime maps in their place (a ``prefill``'s
    read back from them, ``LayerScheme.flat_mask``; a decoding step's ``Decoding.static_mask``).
    ``whole``: nothing is reduced, and the model's own masks stay. Returns whether ``kwargs`` changed."""
    mask = kwargs.get("attention_mask")
    if whole:
        return False
    if prefill:
        if started(layers):
            raise NotImplementedError(
                "a static cache written before (reset and passed again) under a duet-vlm reducer: its layers keep "
                "the lengths the last prompt's reduction gave them. Pass a new StaticCache for each prompt "
                "(generate makes one per call)"
            )
        if not built_mask(mask):
            return False
        kwargs["attention_mask"] = scheme.flat_mask(mask)
        return True
    if not built_mask(mask) or prompt is None or prompt.decoding.static_mask is None:
        return False  # decoding after a prefill the unpatched model ran
    kwargs["attention_mask"] = prompt.decoding.static_mask
    return True


def open_static(prompt, cache, user_mask, attention: str) -> None:
    """A reduced prefill on a static cache: the slots left after the unreduced prompt, every
    decoding step's 2-D mask, and the language model's entry buffers (``entry_length`` tokens plus
    that room; a later segment's layers get their own at the boundary). ``attention``: the
    language model's attention backend (a flash one is warned about: not verified here)."""
    layers = static_layers(cache)
    if layers is None or (prompt.entry.is_identity and not prompt.boundaries):
        return  # nothing reduced: the model's own static path, untouched
    check_static_cache()
    if "flash" in attention:
        warnings.warn(
            f"a static cache under a duet-vlm reduction with {attention}: tested exact under sdpa and eager only "
            "(on a CPU stand-in for the FlashAttention-2 path, transformers' own static cache already differs from "
            "its dynamic one, unpatched). Compare with the dynamic cache on your checkpoint, or use sdpa",
            stacklevel=2,
        )
    extra = room(layers, prompt.full_length)
    batch = prompt.entry.batch
    device = prompt.entry.index.device
    prefix = user_mask if user_mask is not None else torch.ones(batch, prompt.full_length, dtype=torch.long,
                                                                device=device)
    prompt.decoding.static_room = extra
    prompt.decoding.static_mask = torch.cat(
        [prefix.long(), torch.ones(batch, extra, dtype=torch.long, device=prefix.device)], dim=1
    )
    for index in range(len(layers)):
        size_layer(layers, index, prompt.entry_length, extra)


def prefill_layer(prompt, scheme, cache, layer_index: int, tokens: int, hidden: torch.Tensor, kwargs: dict) -> dict:
    """A reduced prefill's decoder layer ``layer_index`` on its segment's ``tokens`` (``hidden``: the
    queries it computes, the last of them where the model cuts them): its static buffer sized
    (``tokens`` plus the room), its mask padded to the keys its attention will see, those of its own
    buffer or of the layer whose keys and values it reuses (``LayerScheme.kv_sources``). Where the
    model passes no mask (SDPA's causal path), one is built: that path aligns the queries with the
    first keys, which holds for a whole sequence on a longer buffer but not for cut queries. A flash
    backend's 2-D padding mask is not padded: transformers' flash code cuts a static layer's keys to
    the mask's length (and aligns the queries with the last of them)."""
    extra = prompt.decoding.static_room
    layers = static_layers(cache) if extra is not None else None
    if layers is None:
        return kwargs
    size_layer(layers, layer_index, tokens, extra)
    slots = key_slots(layers, scheme.kv_sources.get(layer_index, layer_index), tokens)
    mask = kwargs.get("attention_mask")
    if isinstance(mask, torch.Tensor) and mask.dim() == 2:
        return kwargs  # a flash kernel's padding mask: shorter than the buffer, it cuts the keys to its length
    if isinstance(mask, torch.Tensor):
        padded = pad_keys(mask, slots)
    elif mask is None and slots > tokens:
        valid = torch.zeros(hidden.shape[0], slots, dtype=torch.bool, device=hidden.device)
        valid[:, :tokens] = True
        queries = hidden.shape[1]
        padded = causal_mask(scheme.text_config, hidden, valid, queries, q_offset=tokens - queries)
        if padded is None or padded.dim() == 2:  # a flash backend: a mask over the tokens written cuts the keys
            padded = torch.ones(hidden.shape[0], tokens, dtype=torch.long, device=hidden.device)
    else:
        return kwargs
    if padded is not mask:
        kwargs = {**kwargs, "attention_mask": padded}
    return kwargs


def cache_state(cache) -> tuple:
    """``(length, whether anything is cached)`` at the language model's entry: a static cache's
    length stays a tensor, and whether it was written is a Python flag of its layers, so that a
    decoding step reads nothing on the host (no sync, no graph break)."""
    if cache is None:
        return 0, False
    layers = static_layers(cache)
    if layers is not None:
        return cache.get_seq_length(), started(layers)
    cached = cache.get_seq_length()
    return cached, cached > 0
