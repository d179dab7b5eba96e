"""Compiled against eager generation, side by side: ``model.compile()`` (inductor) on the
LLaVA-1.5-shaped benchmark model, with all tokens and under reducers (one compiled model per
reducer, as a deployment attaches one reducer and keeps it).

Each variant generates the same fixed number of tokens (greedy, ``min_new_tokens`` =
``max_new_tokens``); the compiled variants are warmed up first (their first call compiles, and the
growing cache recompiles until dynamo marks its length dynamic), and the warm-up time is reported
as the compile cost. Timed rounds are interleaved, so drifts in load hit every variant alike.
"""

from __future__ import annotations

import statistics
import time
from typing import Callable

import torch

from ..methods import make
from .models import ModelSize, build_model, example_inputs
from .timing import interleaved


def compile_benchmark(
    size: ModelSize,
    methods: list[tuple[str, int]],
    new_tokens: int = 32,
    rounds: int = 3,
    warmup: int = 2,
    progress: Callable[[str], None] | None = None,
) -> dict:
    """Median seconds of ``generate`` per variant (``eager``/``compiled`` x all tokens and each
    ``(method, budget)``), the compile (warm-up) seconds of the compiled variants, and whether
    compiled and eager generation chose the same tokens."""
    eager_model = build_model(size)
    inputs = example_inputs(eager_model)
    settings = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    reducers = {"all tokens": make("full"), **{f"{m} {b}": make(m, budget=b) for m, b in methods}}
    outputs: dict[str, torch.Tensor] = {}

    def variant(model, label: str, reducer) -> Callable[[], None]:
        def run():
            with torch.inference_mode(), reducer(model):
                outputs[label] = model.generate(**inputs, **settings)

        return run

    variants, compile_s = {}, {}
    for name, reducer in reducers.items():
        variants[f"eager, {name}"] = variant(eager_model, f"eager, {name}", reducer)
        # One compiled model per reducer: alternating reducers on one compiled model fills dynamo's
        # cache (each plan is other Python state to guard on) until it falls back to eager.
        compiled_model = build_model(size)  # same seed: same weights
        compiled_model.compile()
        compiled = variants[f"compiled, {name}"] = variant(compiled_model, f"compiled, {name}", reducer)
        if progress:
            progress(f"compiling: {name}")
        start = time.perf_counter()
        for _ in range(warmup):
            compiled()
        compile_s[name] = time.perf_counter() - start
    times = interleaved(variants, rounds, warmup=1, progress=(lambda: progress("round")) if progress else None)
    medians = {label: statistics.median(values) for label, values in times.items()}
    rows = {}
    for name in reducers:
        eager_s, compiled_s = medians[f"eager, {name}"], medians[f"compiled, {name}"]
        rows[name] = {
            "eager_s": eager_s,
            "compiled_s": compiled_s,
            "compiled_vs_eager": compiled_s / eager_s,
            "eager_vs_all_tokens": eager_s / medians["eager, all tokens"],
            "compiled_vs_all_tokens_compiled": compiled_s / medians["compiled, all tokens"],
            "warmup_s": compile_s[name],
            "same_tokens": bool(torch.equal(outputs[f"eager, {name}"], outputs[f"compiled, {name}"])),
            "spread_s": {kind: [min(times[f"{kind}, {name}"]), max(times[f"{kind}, {name}"])] for kind in ("eager", "compiled")},
        }
    return {
        "model": vars(size),
        "new_tokens": new_tokens,
        "rounds": rounds,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "variants": rows,
    }


def markdown(results: dict) -> str:
    lines = [
        "| variant | eager s | compiled s | compiled / eager | vs all tokens (eager) | vs all tokens (compiled) | warm-up s | same tokens |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, row in results["variants"].items():
        lines.append(
            f"| {name} | {row['eager_s']:.2f} | {row['compiled_s']:.2f} | {row['compiled_vs_eager']:.3f} | "
            f"{row['eager_vs_all_tokens']:.3f} | {row['compiled_vs_all_tokens_compiled']:.3f} | {row['warmup_s']:.0f} | "
            f"{'yes' if row['same_tokens'] else 'no'} |"
        )
    return "\n".join(lines)
