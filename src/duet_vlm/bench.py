"""Speed measured side by side: vision-side overhead of Stage A and decoder prefill time per method.

Timings on a shared machine are noisy, so every variant is timed in the same process, interleaved
round by round, and reported as a ratio to the unreduced model measured in the same rounds (median
over rounds). FLOPs and KV-cache bytes, which are exact, are reported next to them.
"""

from __future__ import annotations

import statistics
import time
from contextlib import nullcontext
from dataclasses import dataclass
from itertools import groupby
from typing import Callable

import torch
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

from .methods import make


@dataclass(frozen=True)
class ModelSize:
    """A LLaVA-1.5-shaped model (CLIP-L/14-336 tower, 32-layer decoder) with a configurable decoder width."""

    vision_hidden: int = 1024
    vision_layers: int = 24
    vision_heads: int = 16
    hidden: int = 1024
    layers: int = 32
    heads: int = 16
    kv_heads: int = 16
    intermediate: int = 2816


def build_model(size: ModelSize, attn: str = "sdpa", seed: int = 0) -> LlavaForConditionalGeneration:
    """Random weights are enough for timing: cost does not depend on the values."""
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(
            hidden_size=size.vision_hidden,
            intermediate_size=4 * size.vision_hidden,
            num_hidden_layers=size.vision_layers,
            num_attention_heads=size.vision_heads,
            image_size=336,
            patch_size=14,
            projection_dim=768,
        ),
        text_config=LlamaConfig(
            vocab_size=32064,
            hidden_size=size.hidden,
            intermediate_size=size.intermediate,
            num_hidden_layers=size.layers,
            num_attention_heads=size.heads,
            num_key_value_heads=size.kv_heads,
            max_position_embeddings=4096,
        ),
        image_token_id=32000,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        image_seq_length=576,
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config).eval()
    model.set_attn_implementation(attn)
    return model


def example_inputs(model, batch: int = 1, text_tokens: int = 60, seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    prefix, suffix = 5, text_tokens - 5
    ids = torch.cat(
        [
            torch.randint(3, 32000, (batch, prefix), generator=generator),
            torch.full((batch, 576), model.config.image_token_id),
            torch.randint(3, 32000, (batch, suffix), generator=generator),
        ],
        dim=1,
    )
    pixels = torch.randn(batch, 3, 336, 336, generator=generator)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values": pixels}


def interleaved(variants: dict[str, Callable[[], None]], rounds: int, warmup: int = 1, progress=None) -> dict[str, list[float]]:
    """Seconds per call of every variant, timed round-robin so that drifts in load hit all alike."""
    for fn in variants.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(rounds):
        for name, fn in variants.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
        if progress is not None:
            progress()
    return times


def median_ratio(times: dict[str, list[float]], baseline: str) -> dict[str, float]:
    """Median over rounds of (variant / baseline) measured in the same round."""
    return {
        name: statistics.median(t / b for t, b in zip(values, times[baseline])) for name, values in times.items()
    }


def vision_variants(model, inputs, budget: int) -> dict[str, Callable[[], None]]:
    """The tower + projector alone: plain, under DUET's hooks, and the official code's way of scoring."""
    pixels = inputs["pixel_values"]
    reducer = make("duet", budget=budget)

    def plain():
        with torch.inference_mode():
            model.get_image_features(pixel_values=pixels)

    def duet():
        with torch.inference_mode(), reducer(model):
            model.get_image_features(pixel_values=pixels)

    tower = model.model.vision_tower

    def eager_with_attention_maps():
        # The official Stage A runs every CLIP layer eagerly and returns all attention maps.
        previous = tower.config._attn_implementation
        tower.set_attn_implementation("eager")
        try:
            with torch.inference_mode():
                tower(pixels, output_attentions=True, output_hidden_states=True)
        finally:
            tower.set_attn_implementation(previous)

    return {"no reduction": plain, f"duet {budget} (hooks)": duet, "eager + attention maps": eager_with_attention_maps}


class LanguageModelTimer:
    """Seconds spent inside the language model (decoder layers and the reducer's hooks) per forward."""

    def __init__(self, model):
        self.language_model = model.model.language_model
        self.seconds: list[float] = []

    def __enter__(self):
        start = {}
        self._handles = [
            self.language_model.register_forward_pre_hook(lambda *_: start.__setitem__("t", time.perf_counter())),
            self.language_model.register_forward_hook(
                lambda *_: self.seconds.append(time.perf_counter() - start["t"])
            ),
        ]
        return self

    def __exit__(self, *exc):
        for handle in self._handles:
            handle.remove()


def timed_prefill(model, inputs, context_factory, decoder_seconds: list[float]) -> Callable[[], None]:
    """One prefill forward (logits of the last token only, as generate does) inside
    ``context_factory()``; appends the seconds it spent in the language model to ``decoder_seconds``."""

    def run():
        with torch.inference_mode(), context_factory(), LanguageModelTimer(model) as timer:
            model(**inputs, logits_to_keep=1)
        decoder_seconds.extend(timer.seconds)

    return run


def prefill_variants(
    model, inputs, methods: list[str], budgets: list[int]
) -> tuple[dict[str, Callable[[], None]], dict, dict[str, list[float]]]:
    """One prefill forward (logits of the last token only, as generate does) per method and budget.

    Also returns, per variant, the seconds each forward spent in the language model.
    """
    variants: dict[str, Callable[[], None]] = {}
    reducers = {}
    decoder_seconds: dict[str, list[float]] = {}

    def runner(name, context_factory):
        decoder_seconds[name] = []
        return timed_prefill(model, inputs, context_factory, decoder_seconds[name])

    variants["no reduction"] = runner("no reduction", nullcontext)
    for method in methods:
        for budget in budgets:
            name = f"{method} {budget}"
            reducers[name] = make(method, budget=budget)
            variants[name] = runner(name, lambda r=reducers[name]: r(model))
    return variants, reducers, decoder_seconds


# ----------------------------------------------------------------------------- families and the ideal
FAMILIES = ("llava", "llava_next", "video_llava")


def build_family(family: str, size: ModelSize, seed: int = 0):
    """A random-weight model of ``family`` with a CLIP-L/14 tower and ``size``'s decoder, and one
    prompt of its typical geometry: LLaVA-1.5 (336 px, 576 tokens), LLaVA-NeXT (a 672x672 image:
    5 tiles, 2,928 tokens with newlines) or Video-LLaVA (8 frames at 224 px, 2,056 tokens)."""
    from transformers import (
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
        VideoLlavaConfig,
        VideoLlavaForConditionalGeneration,
    )

    if family == "llava":
        model = build_model(size, seed=seed)
        return model, example_inputs(model)
    image_size = 336 if family == "llava_next" else 224
    vision = CLIPVisionConfig(
        hidden_size=size.vision_hidden, intermediate_size=4 * size.vision_hidden, num_hidden_layers=size.vision_layers,
        num_attention_heads=size.vision_heads, image_size=image_size, patch_size=14, projection_dim=768,
    )
    text = LlamaConfig(
        vocab_size=32064, hidden_size=size.hidden, intermediate_size=size.intermediate, num_hidden_layers=size.layers,
        num_attention_heads=size.heads, num_key_value_heads=size.kv_heads, max_position_embeddings=8192,
    )
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    if family == "llava_next":
        pinpoints = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
        config = LlavaNextConfig(vision_config=vision, text_config=text, image_token_id=32000, image_grid_pinpoints=pinpoints,
                                 vision_feature_layer=-2, vision_feature_select_strategy="default")
        model = LlavaNextForConditionalGeneration(config).eval()
        slots = 576 + 48 * 49
        visual = {"pixel_values": torch.randn(1, 5, 3, 336, 336, generator=generator), "image_sizes": torch.tensor([[672, 672]])}
    elif family == "video_llava":
        config = VideoLlavaConfig(vision_config=vision, text_config=text, image_token_id=32000, video_token_id=32001,
                                  vision_feature_layer=-2, vision_feature_select_strategy="default")
        model = VideoLlavaForConditionalGeneration(config).eval()
        slots = 8 * 257
        visual = {"pixel_values_videos": torch.randn(1, 8, 3, 224, 224, generator=generator)}
    else:
        raise ValueError(f"unknown family {family!r}; one of {', '.join(FAMILIES)}")
    model.set_attn_implementation("sdpa")
    token = config.image_token_id if family == "llava_next" else config.video_token_id
    ids = torch.cat([torch.randint(3, 32000, (1, 5), generator=generator), torch.full((1, slots), token),
                     torch.randint(3, 32000, (1, 55), generator=generator)], dim=1)
    return model, {"input_ids": ids, "attention_mask": torch.ones_like(ids), **visual}


def ideal_language_model(model, text_tokens: int, visual_per_layer: list[int]) -> Callable[[], None]:
    """The unpatched decoder fed the same token counts: each layer called directly on a sequence of
    ``text_tokens + visual_per_layer[l]`` random states (sliced where the count drops), causal SDPA
    without a mask, RoPE recomputed per group, then the final norm. What a reducer costs beyond it
    is its scoring and bookkeeping."""
    language_model = model.model.language_model
    width = language_model.config.hidden_size
    first = text_tokens + visual_per_layer[0]
    hidden0 = torch.randn(1, first, width, generator=torch.Generator().manual_seed(0)).to(language_model.dtype)

    def run():
        with torch.inference_mode():
            hidden, rope = hidden0, None
            for layer, visual in zip(language_model.layers, visual_per_layer):
                length = text_tokens + visual
                if rope is None or hidden.shape[1] != length:
                    hidden = hidden[:, :length]
                    positions = torch.arange(length)[None]
                    rope = language_model.rotary_emb(hidden, positions)
                out = layer(hidden, attention_mask=None, position_ids=positions, position_embeddings=rope)
                hidden = out[0] if isinstance(out, tuple) else out
            language_model.norm(hidden)

    return run


def family_benchmark(family: str, size: ModelSize, methods: list[str], ratios: list[float], rounds: int, progress=None) -> dict:
    """Prefill of ``family``'s typical prompt under each method and ratio, side by side with the
    unreduced model and, for each reduced variant, the ideal decoder on the same token counts.

    Returns ``{variant: {forward_s, language_model_s, ideal_s, lm_vs_ideal, lm_vs_full, flops_ratio,
    kv_ratio, avg_visual_tokens}}`` (medians over interleaved rounds; ratios per round).
    """
    model, inputs = build_family(family, size)
    names = [f"{method} ratio {ratio:g}" for method in methods for ratio in ratios]
    reducers = {name: make(method, ratio=ratio) for name, (method, ratio) in
                zip(names, [(m, r) for m in methods for r in ratios])}
    variants, decoder_seconds = {}, {}

    def runner(name, context_factory):
        decoder_seconds[name] = []
        return timed_prefill(model, inputs, context_factory, decoder_seconds[name])

    variants["no reduction"] = runner("no reduction", nullcontext)
    for name, reducer in reducers.items():
        variants[name] = runner(name, lambda r=reducer: r(model))
        variants[name]()  # one prefill tells the per-layer counts the ideal must match
        stats = reducer.stats
        visual = [sum(item.tokens_per_layer[layer] for item in stats.items) for layer in range(len(stats.tokens_per_layer))]
        variants[f"ideal: {name}"] = ideal_language_model(model, stats.text_tokens[0], visual)
    times = interleaved(variants, rounds, progress=progress)
    lm = {name: seconds[-rounds:] for name, seconds in decoder_seconds.items()}
    results = {}
    for name in ["no reduction", *names]:
        stats = reducers[name].stats if name in reducers else None
        row = {
            "forward_s": statistics.median(times[name]),
            "language_model_s": statistics.median(lm[name]),
            "lm_vs_full": statistics.median(t / b for t, b in zip(lm[name], lm["no reduction"])),
            "flops_ratio": stats.flops_ratio if stats else 1.0,
            "kv_ratio": stats.kv_bytes / stats.kv_bytes_full if stats else 1.0,
            "avg_visual_tokens": stats.average_tokens if stats else None,
        }
        if stats is not None:
            ideal = times[f"ideal: {name}"]
            row["ideal_s"] = statistics.median(ideal)
            row["lm_vs_ideal"] = statistics.median(t / i for t, i in zip(lm[name], ideal))
        results[name] = row
    return {"family": family, "model": vars(size), "rounds": rounds, "variants": results}


# ----------------------------------------------------------------------------- end to end: memory and the ideal model
class PeakRSS:
    """Peak resident memory (bytes) that a block adds to this process, on Linux.

    torch allocates CPU tensors with the system allocator and caches nothing, so the resident set follows
    the live tensors (tracemalloc sees none of them). Before the block, glibc hands its free heap pages
    back to the OS (``malloc_trim``) and the kernel's high-water mark is reset to the current resident
    set (``/proc/self/clear_refs`` = 5); after it, ``VmHWM`` minus the resident set before is the peak.
    This measures every timed call in place, in the same rounds, where ``getrusage``'s max RSS cannot be
    reset and would need a fresh process (and a rebuilt model) per variant. ``peak`` is ``None`` where
    the reset is not allowed.

    >>> with PeakRSS() as memory:                                   # doctest: +SKIP
    ...     x = torch.ones(2**27)
    >>> memory.peak >= 2**29                                       # doctest: +SKIP
    True
    """

    peak: int | None = None

    @staticmethod
    def _status(key: str) -> int:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
        raise OSError(f"no {key} in /proc/self/status")

    def __enter__(self):
        try:
            import ctypes

            ctypes.CDLL("libc.so.6").malloc_trim(0)
            with open("/proc/self/clear_refs", "w") as refs:
                refs.write("5")
            self._before = self._status("VmRSS")
        except OSError:
            self._before = None
        return self

    def __exit__(self, *exc):
        if self._before is not None:
            self.peak = self._status("VmHWM") - self._before


def cache_bytes(cache) -> int:
    """Bytes of the keys and values a ``DynamicCache`` holds (each layer has its own length under a reducer)."""
    return sum(
        t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values) if t is not None
    )


def padded_inputs(model, batch: int, text_tokens: int = 60, seed: int = 0) -> dict[str, torch.Tensor]:
    """``batch`` rows of one image each whose prompts differ in length, left-padded as for ``generate``:
    text lengths spread evenly over ``text_tokens`` ± 50% (their mean is ``text_tokens``)."""
    if batch == 1:
        return example_inputs(model, 1, text_tokens, seed)
    lengths = torch.linspace(text_tokens * 0.5, text_tokens * 1.5, batch).round().long().tolist()
    rows = [example_inputs(model, 1, length, seed + b)["input_ids"][0] for b, length in enumerate(lengths)]
    width = max(len(r) for r in rows)
    ids = torch.zeros(batch, width, dtype=torch.long)
    mask = torch.zeros(batch, width, dtype=torch.long)
    for b, row in enumerate(rows):
        ids[b, width - len(row) :] = row
        mask[b, width - len(row) :] = 1
    pixels = torch.randn(batch, 3, 336, 336, generator=torch.Generator().manual_seed(seed))
    return {"input_ids": ids, "attention_mask": mask, "pixel_values": pixels}


class IdealModel:
    """The unpatched LLaVA model run on reduced token counts, with no scoring and no bookkeeping.

    Layer ``l`` of the decoder sees every text token and the first ``visual_per_layer[l]`` slots of each
    row's image (any slots cost the same): the tower and the projector run as usual (the projector on
    the kept count only), the visual block entering the decoder is as long as ``visual_per_layer[0]``,
    and where the count drops the sequence is gathered once for the next run of layers, whose positions
    are renumbered and RoPE recomputed. Each layer is the model's own module called directly, so with a
    ``DynamicCache`` each layer's cache holds exactly its own tokens and a decoding step attends over
    those per-layer lengths. Padded rows get a boolean mask; unpadded ones run SDPA's causal path.

    This is what a reduction would cost if choosing the tokens were free. ``generate`` is a bare greedy
    loop (embed, layers, norm, LM head on the last position, argmax); ``loss`` is a training forward.

    >>> ideal = IdealModel(model, inputs, [205] * 16 + [102] * 8 + [0] * 8)      # doctest: +SKIP
    >>> tokens, cache = ideal.generate(32)                                        # doctest: +SKIP
    """

    def __init__(self, model, inputs: dict[str, torch.Tensor], visual_per_layer: list[int]):
        base = model.model
        self.model, self.base, self.language_model = model, base, base.language_model
        ids = inputs["input_ids"]
        mask = inputs.get("attention_mask")
        self.pixel_values = inputs["pixel_values"]
        self.input_ids = ids
        visual = ids == model.config.image_token_id
        rank = visual.long().cumsum(dim=1) - 1
        runs = [(count, len(list(run))) for count, run in groupby(visual_per_layer)]
        self.entry_visual = visual & (rank < runs[0][0])  # image slots that enter the decoder
        self.groups = []  # (gather index into the previous sequence or None, valid keys, layers)
        previous, start = None, 0
        for count, size in runs:
            keep = ~visual | (rank < count)
            index = _row_indices(keep)
            local = None if previous is None else _row_indices(keep.gather(1, previous))
            valid = torch.ones_like(index, dtype=torch.bool) if mask is None else mask.gather(1, index).bool()
            self.groups.append((local, valid, self.language_model.layers[start : start + size]))
            previous, start = index, start + size
        self.entry_index = _row_indices(self.entry_visual | ~visual)

    def _embeddings(self) -> torch.Tensor:
        config = self.model.config
        # Only the feature layer's states are kept, as get_image_features asks the tower to.
        layer = config.vision_feature_layer
        features = self.base.vision_tower(self.pixel_values, output_hidden_states=layer).hidden_states[layer]
        if config.vision_feature_select_strategy == "default":
            features = features[:, 1:]
        count = int(self.entry_visual[0].sum())
        visual = self.base.multi_modal_projector(features[:, :count])
        embeds = self.language_model.embed_tokens(self.input_ids)
        embeds = embeds.masked_scatter(self.entry_visual[..., None], visual.to(embeds.dtype))
        return embeds.gather(1, self.entry_index[..., None].expand(-1, -1, embeds.shape[-1]))

    @staticmethod
    def _mask(valid: torch.Tensor, queries: int):
        """``None`` (causal SDPA) without padding, else a (B, 1, queries, keys) boolean causal mask."""
        if bool(valid.all()):
            return None
        keys = valid.shape[1]
        causal = torch.ones(queries, keys, dtype=torch.bool).tril(keys - queries)
        allowed = causal[None] & valid[:, None, :]
        own = torch.zeros(queries, keys, dtype=torch.bool)
        own[torch.arange(queries), torch.arange(keys - queries, keys)] = True  # a pad attends to itself, not to nothing
        allowed |= own[None]
        return allowed[:, None]

    def forward(self, cache=None) -> torch.Tensor:
        """The prompt through the decoder: the final-normed states of the last layer group's sequence."""
        hidden = self._embeddings()
        self.positions = []
        for local, valid, layers in self.groups:
            if local is not None:
                hidden = hidden.gather(1, local[..., None].expand(-1, -1, hidden.shape[-1]))
            positions = (valid.long().cumsum(dim=1) - 1).clamp(min=0)
            self.positions.append(valid.sum(dim=1, keepdim=True))
            rope = self.language_model.rotary_emb(hidden, positions)
            mask = self._mask(valid, hidden.shape[1])
            for layer in layers:
                out = layer(hidden, attention_mask=mask, position_ids=positions, past_key_values=cache,
                            use_cache=cache is not None, position_embeddings=rope)
                hidden = out[0] if isinstance(out, tuple) else out
        return self.language_model.norm(hidden)

    def generate(self, new_tokens: int, on_token: Callable[[], None] | None = None):
        """Greedy decoding of exactly ``new_tokens`` tokens; ``on_token()`` after each one. Returns the
        tokens ``(B, new_tokens)`` and the cache."""
        from transformers import DynamicCache

        head = self.model.lm_head
        with torch.no_grad():
            cache = DynamicCache(config=self.language_model.config)
            token = head(self.forward(cache)[:, -1]).argmax(-1)
            tokens = [token]
            if on_token:
                on_token()
            for step in range(new_tokens - 1):
                hidden = self.language_model.embed_tokens(token[:, None])
                for (_, valid, layers), length in zip(self.groups, self.positions):
                    positions = length + step
                    rope = self.language_model.rotary_emb(hidden, positions)
                    keys = torch.cat([valid, valid.new_ones(valid.shape[0], step + 1)], dim=1)
                    mask = self._mask(keys, 1)
                    for layer in layers:
                        out = layer(hidden, attention_mask=mask, position_ids=positions, past_key_values=cache,
                                    use_cache=True, position_embeddings=rope)
                        hidden = out[0] if isinstance(out, tuple) else out
                token = head(self.language_model.norm(hidden)[:, -1]).argmax(-1)
                tokens.append(token)
                if on_token:
                    on_token()
        return torch.stack(tokens, dim=1), cache

    def loss(self, labels: torch.Tensor) -> torch.Tensor:
        """A training forward: the LM head over the last group's sequence and the shifted cross-entropy
        with ``labels`` (full-prompt coordinates; -100 is ignored) read at the tokens that reach it."""
        hidden = self.forward()
        index = self.entry_index
        for local, _, _ in self.groups[1:]:
            index = index.gather(1, local)
        logits = self.model.lm_head(hidden).float()
        kept = labels.gather(1, index)
        return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), kept[:, 1:].flatten(), ignore_index=-100)


def _row_indices(keep: torch.Tensor) -> torch.Tensor:
    """``(B, n)`` positions of the True entries of each row (every row keeps the same count)."""
    return keep.nonzero()[:, 1].view(keep.shape[0], -1)
