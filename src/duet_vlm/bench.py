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
