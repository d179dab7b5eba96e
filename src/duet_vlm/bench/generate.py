"""End-to-end generation speed: ``generate`` under each method, side by side with the unreduced model
and with the ideal, in interleaved rounds.

For every variant one greedy ``generate`` call of a fixed length (``min_new_tokens = max_new_tokens``)
is timed per round, with a timestamp at every new token (a stopping criterion that never stops):

- **time to first token**: the call up to the first token (vision tower, prefill, one LM-head row);
- **decode time per token**: the rest of the call divided by the tokens after the first;
- **latency for n tokens**: the call up to the n-th token, for each n of ``new_tokens`` (the 32-token
  latency is read inside the 128-token call: greedy decoding makes them the same computation);
- **throughput**: ``batch x n / latency`` for the smallest ``n`` (the same length at every batch size);
- **peak memory**: ``timing.PeakRSS`` around the call (resident set above what it was before);
- **KV bytes per sequence**: exactly, from the per-layer token counts (``kv_schedule``), and what the
  returned cache holds (``kv_cache``; left-padding slots included, so equal only without padding).

Batches of several rows hold prompts of different lengths, left-padded (``models.padded_inputs``).

**The ideal** (``ideal.IdealModel``) is the unpatched model generating from the same prompt with the
variant's per-layer visual counts: the tower and projector as usual, then each decoder layer called
directly on a sequence that holds every text token and as many visual tokens as the reducer left at
that layer, each layer caching only its own tokens. So at decode time each layer attends over the KV
length the reduction gives it, and nothing chooses tokens. It decodes with a bare greedy loop, not
``generate``; the row ``ideal: no reduction`` (that loop on all tokens) shows what ``generate``'s own
machinery costs against it.

>>> results = generate_benchmark(ModelSize(), [("duet", 128)], batch=1, new_tokens=(32, 128), rounds=3)  # doctest: +SKIP
>>> print(markdown_table(results))                                                                    # doctest: +SKIP
"""

from __future__ import annotations

import os
import statistics
import time
from contextlib import nullcontext
from typing import Callable

import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from ..flops import DecoderDims, kv_cache_bytes
from ..methods import make
from .ideal import IdealModel
from .models import ModelSize, build_model, padded_inputs
from .timing import PeakRSS, interleaved, processor

FULL = "no reduction"


def cache_bytes(cache) -> int:
    """Bytes of the keys and values a ``DynamicCache`` holds (each layer has its own length under a reducer)."""
    return sum(
        t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values) if t is not None
    )


class _Stamps(StoppingCriteria):
    """Records the time at which every new token exists; never stops generation."""

    def __init__(self, times: list[float]):
        self.times = times

    def __call__(self, input_ids, scores, **kwargs):
        self.times.append(time.perf_counter())
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


def _record(start: float, stamps: list[float], memory: PeakRSS, cache, batch: int) -> dict:
    return {
        "start": start,
        "stamps": stamps,
        "peak_bytes": memory.peak,
        "kv_cache": cache_bytes(cache) // batch,
    }


def generate_call(model, inputs, new_tokens: int, context_factory, records: list[dict]) -> Callable[[], None]:
    """One greedy ``generate`` of exactly ``new_tokens`` tokens inside ``context_factory()``; appends
    its timestamps, peak memory and cache bytes to ``records``."""

    def run():
        stamps: list[float] = []
        with PeakRSS() as memory:
            start = time.perf_counter()
            with context_factory():
                out = model.generate(
                    **inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0,
                    stopping_criteria=StoppingCriteriaList([_Stamps(stamps)]), return_dict_in_generate=True,
                )
        records.append(_record(start, stamps, memory, out.past_key_values, inputs["input_ids"].shape[0]))

    return run


def ideal_call(ideal: IdealModel, new_tokens: int, records: list[dict]) -> Callable[[], None]:
    def run():
        stamps: list[float] = []
        with PeakRSS() as memory:
            start = time.perf_counter()
            _, cache = ideal.generate(new_tokens, on_token=lambda: stamps.append(time.perf_counter()))
        records.append(_record(start, stamps, memory, cache, ideal.input_ids.shape[0]))

    return run


def kv_schedule(model, inputs, visual_per_layer: list[int], cached_new_tokens: int) -> int:
    """Exact KV-cache bytes per sequence: every row's text tokens and generated tokens plus the visual
    tokens of each layer, averaged over the rows (padding excluded)."""
    image = model.config.image_token_id
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    dims = DecoderDims.from_config(model.config.text_config)
    element = torch.finfo(model.dtype).bits // 8
    total = 0
    for row, valid in zip(ids, mask.bool()):
        text = int((valid & (row != image)).sum()) + cached_new_tokens
        total += kv_cache_bytes(dims, [text + visual for visual in visual_per_layer], element)
    return total // ids.shape[0]


def _summary(records: list[dict], batch: int, new_tokens: tuple[int, ...]) -> dict:
    """Per-round quantities of one variant (lists, one value per round)."""
    rounds: dict[str, list] = {"first_token_s": [], "decode_s_per_token": [], "peak_bytes": []}
    for n in new_tokens:
        rounds[f"latency_{n}_s"] = []
    for record in records:
        start, stamps = record["start"], record["stamps"]
        rounds["first_token_s"].append(stamps[0] - start)
        rounds["decode_s_per_token"].append((stamps[-1] - stamps[0]) / max(1, len(stamps) - 1))
        rounds["peak_bytes"].append(record["peak_bytes"])
        for n in new_tokens:
            rounds[f"latency_{n}_s"].append(stamps[n - 1] - start)
    shortest = min(new_tokens)
    rounds["tokens_per_s"] = [batch * shortest / t for t in rounds[f"latency_{shortest}_s"]]
    return rounds


RATIO_KEYS = ("first_token_s", "decode_s_per_token", "tokens_per_s", "peak_bytes")


def _ratios(rounds: dict, reference: dict) -> dict:
    """Median over rounds of this variant's value / the reference's value in the same round."""
    out = {}
    for key in [k for k in rounds if k.startswith("latency_")] + list(RATIO_KEYS):
        pairs = [(a, b) for a, b in zip(rounds[key], reference[key]) if a is not None and b]
        out[key] = statistics.median(a / b for a, b in pairs) if pairs else None
    return out


def _spread(values: list[float]) -> float:
    """(max - min) / median: how far the rounds of one ratio scatter."""
    return (max(values) - min(values)) / statistics.median(values) if len(values) > 1 else 0.0


def generate_benchmark(
    size: ModelSize,
    variants: list[tuple[str, int]],
    batch: int = 1,
    new_tokens: tuple[int, ...] = (32, 128),
    rounds: int = 3,
    text_tokens: int = 60,
    warmup_tokens: int = 2,
    calibrate: bool = True,
    progress=None,
) -> dict:
    """``generate`` latency, decode time per token, throughput, peak memory and KV bytes of the
    unreduced model, of each ``(method, budget)`` and of each one's ideal, timed in interleaved rounds.

    Every variant is first run once with ``warmup_tokens`` new tokens on the batch's first row alone
    (which also tells each ideal its per-layer counts; a whole large batch would cost nearly a round);
    then ``rounds`` rounds of one ``max(new_tokens)``-token call each. Returns
    ``{"variants": {name: {...medians, "vs_full": {...}, "vs_ideal": {...}, "rounds": {...}}}, ...}``.
    """
    model = build_model(size)
    inputs = padded_inputs(model, batch, text_tokens)
    valid = inputs["attention_mask"][0].bool()
    warm = {"input_ids": inputs["input_ids"][:1, valid], "attention_mask": inputs["attention_mask"][:1, valid],
            "pixel_values": inputs["pixel_values"][:1]}
    length = max(new_tokens)
    calls: dict[str, Callable[[], None]] = {}
    records: dict[str, list[dict]] = {}
    counts: dict[str, list[int]] = {}
    ideal_of: dict[str, str] = {}
    layers = model.config.text_config.num_hidden_layers
    visual = model.config.image_seq_length

    def add(name, factory):
        records[name] = []
        calls[name] = factory(records[name])

    add(FULL, lambda r: generate_call(model, inputs, length, nullcontext, r))
    counts[FULL] = [visual] * layers
    for method, budget in variants:
        name = f"{method} {budget}"
        reducer = make(method, budget=budget)
        add(name, lambda r, reducer=reducer: generate_call(model, inputs, length, lambda: reducer(model), r))
        generate_call(model, warm, warmup_tokens, lambda reducer=reducer: reducer(model), [])()  # warm-up; sets stats
        items = {tuple(item.tokens_per_layer) for item in reducer.stats.items}
        if len(items) != 1:
            raise RuntimeError(f"{name}: the rows' images were reduced to different counts {sorted(items)}")
        counts[name] = list(items.pop())
    ideals: dict[tuple[int, ...], str] = {}
    if calibrate:
        ideals[tuple(counts[FULL])] = f"ideal: {FULL}"
    for name in counts:
        key = tuple(counts[name])
        if name != FULL and key not in ideals:
            ideals[key] = f"ideal: {name}"
        ideal_of[name] = ideals.get(key)
    for key, name in ideals.items():
        ideal = IdealModel(model, inputs, list(key))
        add(name, lambda r, ideal=ideal: ideal_call(ideal, length, r))
        counts[name] = list(key)
        ideal_call(IdealModel(model, warm, list(key)), warmup_tokens, [])()
    generate_call(model, warm, warmup_tokens, nullcontext, [])()

    load_before = os.getloadavg()
    interleaved(calls, rounds, warmup=0, progress=progress)
    load_after = os.getloadavg()

    summaries = {name: _summary(records[name], batch, new_tokens) for name in calls}
    results = {}
    for name in calls:
        rounds_ = summaries[name]
        row = {
            "visual_tokens_per_layer": counts[name],
            "avg_visual_tokens": sum(counts[name]) / layers,
            "kv_schedule": kv_schedule(model, inputs, counts[name], length - 1),
            "kv_cache": records[name][-1]["kv_cache"],
        }
        for key, values in rounds_.items():
            present = [v for v in values if v is not None]
            row[key] = statistics.median(present) if present else None
        row["vs_full"] = _ratios(rounds_, summaries[FULL])
        row["vs_full"]["kv"] = row["kv_schedule"] / kv_schedule(model, inputs, counts[FULL], length - 1)
        row["spread_vs_full"] = _spread(
            [a / b for a, b in zip(rounds_[f"latency_{length}_s"], summaries[FULL][f"latency_{length}_s"])]
        )
        reference = ideal_of.get(name)
        if reference is not None and reference != name:
            row["ideal"] = reference
            row["vs_ideal"] = _ratios(rounds_, summaries[reference])
        row["rounds"] = rounds_
        results[name] = row
    return {
        "benchmark": "generate",
        "model": vars(size),
        "batch": batch,
        "row_text_tokens": inputs["attention_mask"].sum(dim=1).sub(visual).tolist(),
        "new_tokens": list(new_tokens),
        "rounds": rounds,
        "threads": torch.get_num_threads(),
        "cpus": os.cpu_count(), "processor": processor(),
        "load_average_before_after": [load_before, load_after],
        "variants": results,
    }


def _cell(value: float | None, scale: float, digits: int, full: float | None, ideal: float | None) -> str:
    if value is None:
        return ""
    text = f"{value * scale:.{digits}f}"
    ratios = [f"{r:.2f}" if r is not None else "–" for r in (full, ideal)]
    return f"{text} ({' / '.join(ratios)})" if full is not None else text


def markdown_table(results: dict) -> str:
    """One markdown table of a ``generate_benchmark`` result: each cell is the median value and, in
    brackets, its ratio to no reduction / to the variant's ideal (medians of per-round ratios)."""
    lengths = results["new_tokens"]
    batch = results["batch"]
    header = ["variant", "visual tok/layer", "first token s", "decode ms/token"]
    header += [f"{n} tokens s" for n in lengths]
    header += [f"tokens/s (batch {batch})", "peak MB", "KV MB/seq", "spread"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, row in results["variants"].items():
        full, ideal = row["vs_full"], row.get("vs_ideal", {})
        cells = [name, f"{row['avg_visual_tokens']:.1f}"]
        cells.append(_cell(row["first_token_s"], 1, 2, full["first_token_s"], ideal.get("first_token_s")))
        cells.append(_cell(row["decode_s_per_token"], 1e3, 0, full["decode_s_per_token"], ideal.get("decode_s_per_token")))
        for n in lengths:
            key = f"latency_{n}_s"
            cells.append(_cell(row[key], 1, 2, full[key], ideal.get(key)))
        cells.append(_cell(row["tokens_per_s"], 1, 2, full["tokens_per_s"], ideal.get("tokens_per_s")))
        cells.append(_cell(row["peak_bytes"], 1e-6, 0, full["peak_bytes"], ideal.get("peak_bytes")))
        cells.append(f"{row['kv_schedule'] / 1e6:.1f} ({full['kv']:.3f})")
        cells.append(f"{row['spread_vs_full']:.2f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
