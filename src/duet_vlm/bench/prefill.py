"""Speed measured side by side: the vision-side overhead of Stage A and the decoder prefill per method
(``duet-vlm bench``), and a family's typical prompt against the ideal (``duet-vlm bench --family``).

Every variant is timed in the same process, interleaved round by round (``timing``), and reported as
a ratio to the unreduced model measured in the same rounds. FLOPs and KV-cache bytes, which are
exact, are reported next to them.

>>> results = prefill_benchmark(ModelSize(), ["duet"], [192, 64], rounds=3)           # doctest: +SKIP
>>> results["prefill"]["duet 64"]["language_model_ratio"]                              # doctest: +SKIP
"""

from __future__ import annotations

import statistics
from contextlib import nullcontext
from typing import Callable

import torch

from ..methods import make
from .ideal import IdealModel
from .models import ModelSize, build_family, build_model, example_inputs
from .timing import LanguageModelTimer, interleaved, median_ratio

FULL = "no reduction"


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

    return {FULL: plain, f"duet {budget} (hooks)": duet, "eager + attention maps": eager_with_attention_maps}


def timed_prefill(model, inputs, context_factory, decoder_seconds: list[float]) -> Callable[[], None]:
    """One prefill forward (logits of the last token only, as generate does) inside
    ``context_factory()``; appends the seconds it spent in the language model to ``decoder_seconds``."""

    def run():
        with torch.inference_mode(), context_factory(), LanguageModelTimer(model) as timer:
            model(**inputs, logits_to_keep=1)
        decoder_seconds.extend(timer.seconds)

    return run


def _prefills(model, inputs, reducers: dict) -> tuple[dict[str, Callable[[], None]], dict[str, list[float]]]:
    """A timed prefill of the unreduced model and one under each reducer, and their language-model seconds."""
    variants, decoder_seconds = {}, {}
    for name, reducer in {FULL: None, **reducers}.items():
        decoder_seconds[name] = []
        context = nullcontext if reducer is None else (lambda r=reducer: r(model))
        variants[name] = timed_prefill(model, inputs, context, decoder_seconds[name])
    return variants, decoder_seconds


def prefill_variants(
    model, inputs, methods: list[str], budgets: list[int]
) -> tuple[dict[str, Callable[[], None]], dict, dict[str, list[float]]]:
    """One prefill forward (logits of the last token only, as generate does) per method and budget.

    Also returns, per variant, the seconds each forward spent in the language model.
    """
    reducers = {f"{method} {budget}": make(method, budget=budget) for method in methods for budget in budgets}
    variants, decoder_seconds = _prefills(model, inputs, reducers)
    return variants, reducers, decoder_seconds


def prefill_benchmark(size: ModelSize, methods: list[str], budgets: list[int], rounds: int, text_tokens: int = 60,
                      progress: Callable[[str], None] | None = None) -> dict:
    """Stage A's vision-side cost (``vision_variants`` at the first budget) and the prefill of each
    method and budget, each in its own interleaved rounds; ``progress(phase)`` after every round.

    Returns ``{"vision": {variant: {median_s, ratio}}, "prefill": {variant: {forward_median_s,
    forward_ratio, language_model_median_s, language_model_ratio, flops_ratio, kv_ratio,
    avg_visual_tokens}}, ...}`` (ratios to no reduction: medians of per-round ratios).
    """
    model = build_model(size)
    inputs = example_inputs(model, text_tokens=text_tokens)
    vision = vision_variants(model, inputs, budgets[0])
    prefill, reducers, decoder_seconds = prefill_variants(model, inputs, methods, budgets)
    advance = (lambda phase: (lambda: progress(phase))) if progress else (lambda phase: None)
    vision_times = interleaved(vision, rounds, progress=advance("vision side"))
    prefill_times = interleaved(prefill, rounds, progress=advance("prefill"))

    results = {"model": vars(size), "rounds": rounds, "threads": torch.get_num_threads(), "vision": {}, "prefill": {}}
    ratios = median_ratio(vision_times, FULL)
    for name, values in vision_times.items():
        results["vision"][name] = {"median_s": statistics.median(values), "ratio": ratios[name]}
    ratios = median_ratio(prefill_times, FULL)
    decoder_times = {name: seconds[-rounds:] for name, seconds in decoder_seconds.items()}
    decoder_ratios = median_ratio(decoder_times, FULL)
    for name, values in prefill_times.items():
        stats = reducers[name].stats if name in reducers else None
        results["prefill"][name] = {
            "forward_median_s": statistics.median(values), "forward_ratio": ratios[name],
            "language_model_median_s": statistics.median(decoder_times[name]),
            "language_model_ratio": decoder_ratios[name],
            "flops_ratio": stats.flops_ratio if stats else 1.0,
            "kv_ratio": stats.kv_bytes / stats.kv_bytes_full if stats else 1.0,
            "avg_visual_tokens": stats.average_tokens if stats else 576.0,
        }
    return results


def ideal_decoder(model, inputs, visual_per_layer: list[int]) -> Callable[[], None]:
    """The unpatched decoder fed the same token counts (``IdealModel.decode`` on random entry
    states). What a reducer costs beyond it is its scoring and bookkeeping."""
    ideal = IdealModel(model, inputs, visual_per_layer)
    language_model = ideal.language_model
    shape = (inputs["input_ids"].shape[0], ideal.entry.length, language_model.config.hidden_size)
    states = torch.randn(*shape, generator=torch.Generator().manual_seed(0)).to(language_model.dtype)

    def run():
        with torch.inference_mode():
            ideal.decode(states)

    return run


def family_benchmark(family: str, size: ModelSize, methods: list[str], ratios: list[float], rounds: int, progress=None) -> dict:
    """Prefill of ``family``'s typical prompt under each method and ratio, side by side with the
    unreduced model and, for each reduced variant, the ideal decoder on the same token counts.

    Returns ``{variant: {forward_s, language_model_s, ideal_s, lm_vs_ideal, lm_vs_full, flops_ratio,
    kv_ratio, avg_visual_tokens}}`` (medians over interleaved rounds; ratios per round).
    """
    model, inputs = build_family(family, size)
    reducers = {f"{method} ratio {ratio:g}": make(method, ratio=ratio) for method in methods for ratio in ratios}
    variants, decoder_seconds = _prefills(model, inputs, reducers)
    for name, reducer in reducers.items():
        variants[name]()  # one prefill tells the per-layer counts the ideal must match
        stats = reducer.stats
        visual = [sum(item.tokens_per_layer[layer] for item in stats.items) for layer in range(len(stats.tokens_per_layer))]
        variants[f"ideal: {name}"] = ideal_decoder(model, inputs, visual)
    times = interleaved(variants, rounds, progress=progress)
    lm = {name: seconds[-rounds:] for name, seconds in decoder_seconds.items()}
    results = {}
    for name in [FULL, *reducers]:
        stats = reducers[name].stats if name in reducers else None
        row = {
            "forward_s": statistics.median(times[name]),
            "language_model_s": statistics.median(lm[name]),
            "lm_vs_full": statistics.median(t / b for t, b in zip(lm[name], lm[FULL])),
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
