"""The ``duet-vlm`` command line."""

from __future__ import annotations

import json
import math
import statistics
import sys
from itertools import groupby
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from .adapters import Geometry
from .flops import DecoderDims, exact_flops, fastv_flops, kv_cache_bytes
from .methods import METHODS, make

app = typer.Typer(help="DUET visual-token reduction for Hugging Face vision-language models.", no_args_is_help=True)
console = Console()


@app.callback()
def _commands() -> None:
    """DUET visual-token reduction for Hugging Face vision-language models."""


def layer_groups(counts: list[int]) -> list[tuple[int, int, int]]:
    """``[(first_layer, last_layer, count), ...]`` (1-based layers) for runs of equal counts."""
    groups, start = [], 1
    for count, run in groupby(counts):
        size = len(list(run))
        groups.append((start, start + size - 1, count))
        start += size
    return groups


def _human(value: float, unit: str) -> str:
    for prefix in ("", "K", "M", "G", "T", "P"):
        if abs(value) < 1000:
            return f"{value:.2f} {prefix}{unit}"
        value /= 1000
    return f"{value:.2f} E{unit}"


@app.command()
def plan(
    budget: int = typer.Option(..., help="Average visual tokens per decoder layer per image."),
    layers: int = typer.Option(32, help="Decoder layers of the language model."),
    tokens: int = typer.Option(576, help="Visual tokens per image without reduction."),
    method: str = typer.Option("duet", help=f"One of: {', '.join(sorted(METHODS))}."),
    text_tokens: int = typer.Option(60, help="Prompt tokens besides the image, for FLOPs and KV bytes."),
    hidden: int = typer.Option(4096, help="Decoder hidden size (LLaVA-1.5-7B by default)."),
    intermediate: int = typer.Option(11008, help="Decoder MLP size."),
    heads: int = typer.Option(32, help="Attention heads."),
    kv_heads: int = typer.Option(32, help="Key/value heads (fewer with grouped-query attention)."),
    bytes_per_element: int = typer.Option(2, help="KV-cache element size (2 for fp16/bf16)."),
) -> None:
    """Print the schedule a method solves for a budget, with per-layer counts, FLOPs and KV-cache savings."""
    side = int(math.isqrt(tokens))
    grid = (side, side) if side * side == tokens else (1, tokens)
    geometry = Geometry(num_layers=layers, visual_tokens=tokens, grid=grid, has_cls=True)
    try:
        solved = make(method, budget=budget).resolve(geometry)
    except (ValueError, TypeError) as error:
        raise typer.BadParameter(str(error)) from error
    schedule = solved.schedule
    counts = schedule.tokens_per_layer
    dims = DecoderDims(hidden, intermediate, heads, kv_heads, hidden // heads)

    console.print(f"[bold]{method}[/bold] at budget {budget}: {tokens} visual tokens per image, {layers} layers")
    vision = solved.vision
    if vision is not None:
        detail = ", ".join(f"{k}={v}" for k, v in vars(vision).items())
        console.print(f"  vision side: {type(vision).__name__}({detail}) -> {schedule.llm_input} tokens enter the LLM")
    for layer, keep in schedule.boundaries:
        console.print(f"  after layer {layer}: keep {keep} ({type(solved.language).__name__})")

    table = Table(title="Visual tokens per image entering each decoder layer")
    table.add_column("layers")
    table.add_column("visual tokens", justify="right")
    for first, last, count in layer_groups(counts):
        table.add_row(f"{first}-{last}" if first != last else str(first), str(count))
    console.print(table)
    console.print(
        f"average: {schedule.average:.2f} visual tokens per layer "
        f"({1 - schedule.average / tokens:.1%} fewer than {tokens})"
    )

    reduced = [text_tokens + n for n in counts]
    full = [text_tokens + tokens] * layers
    costs = Table(title=f"Decoder prefill cost, one image + {text_tokens} text tokens")
    for column in ("", "reduced", "full", "ratio"):
        costs.add_column(column, justify="right")
    for name, fn, unit in (
        ("FLOPs (FastV formula)", fastv_flops, "FLOP"),
        ("FLOPs (exact: GQA, gated MLP, causal)", exact_flops, "FLOP"),
        ("KV cache", lambda d, n: kv_cache_bytes(d, n, bytes_per_element), "B"),
    ):
        r, f = fn(dims, reduced), fn(dims, full)
        costs.add_row(name, _human(r, unit), _human(f, unit), f"{r / f:.3f}")
    console.print(costs)


LIST_OPTIONS = ("--methods", "--budgets")


def expand_list_options(argv: list[str]) -> list[str]:
    """Let list options take several values after one flag (``--budgets 192 128 64``), as in the docs."""
    expanded, current = [], None
    for arg in argv:
        if arg in LIST_OPTIONS:
            current = arg
            continue
        if arg.startswith("-"):
            current = None
        elif current is not None:
            expanded += [current, arg]
            continue
        expanded.append(arg)
    return expanded


def main() -> None:
    """Console-script entry point."""
    app(args=expand_list_options(sys.argv[1:]), prog_name="duet-vlm")


@app.command()
def bench(
    methods: list[str] = typer.Option(["duet"], help="Methods to time (space-separated list)."),
    budgets: list[int] = typer.Option([192, 128, 64], help="Budgets (space-separated list)."),
    rounds: int = typer.Option(5, help="Timed rounds; variants are interleaved within each round."),
    hidden: int = typer.Option(1024, help="Decoder width (CLIP-L tower and 32 layers are fixed)."),
    intermediate: int = typer.Option(2816, help="Decoder MLP size."),
    text_tokens: int = typer.Option(60, help="Prompt tokens besides the image."),
    threads: int = typer.Option(0, help="torch threads (0 = leave as is)."),
    output: Optional[Path] = typer.Option(None, help="Write the results as JSON here."),
) -> None:
    """Time Stage A on the vision side and the prefill of each method, side by side in one run."""
    import torch

    from .bench import ModelSize, build_model, example_inputs, interleaved, median_ratio, prefill_variants, vision_variants

    if threads:
        torch.set_num_threads(threads)
    size = ModelSize(hidden=hidden, heads=max(1, hidden // 64), kv_heads=max(1, hidden // 64), intermediate=intermediate)
    model = build_model(size)
    inputs = example_inputs(model, text_tokens=text_tokens)
    vision = vision_variants(model, inputs, budgets[0])
    prefill, reducers = prefill_variants(model, inputs, methods, budgets)
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("vision side", total=rounds)
        vision_times = interleaved(vision, rounds, progress=lambda: progress.advance(task))
        task = progress.add_task("prefill", total=rounds)
        prefill_times = interleaved(prefill, rounds, progress=lambda: progress.advance(task))

    results = {"model": vars(size), "rounds": rounds, "threads": torch.get_num_threads(), "vision": {}, "prefill": {}}
    table = Table(title=f"Vision tower + projector, {rounds} interleaved rounds")
    for column in ("variant", "median s", "time vs no reduction"):
        table.add_column(column, justify="right")
    ratios = median_ratio(vision_times, "no reduction")
    for name, values in vision_times.items():
        median = statistics.median(values)
        table.add_row(name, f"{median:.3f}", f"{ratios[name]:.3f}")
        results["vision"][name] = {"median_s": median, "ratio": ratios[name]}
    console.print(table)

    table = Table(title=f"Decoder prefill (whole forward), {rounds} interleaved rounds")
    for column in ("variant", "median s", "time vs no reduction", "exact FLOPs ratio", "KV bytes ratio", "avg visual tokens"):
        table.add_column(column, justify="right")
    ratios = median_ratio(prefill_times, "no reduction")
    for name, values in prefill_times.items():
        median = statistics.median(values)
        stats = reducers[name].stats if name in reducers else None
        flops = f"{stats.flops_ratio:.3f}" if stats else "1.000"
        kv = f"{stats.kv_bytes / stats.kv_bytes_full:.3f}" if stats else "1.000"
        tokens = f"{stats.average_tokens:.2f}" if stats else "576"
        table.add_row(name, f"{median:.3f}", f"{ratios[name]:.3f}", flops, kv, tokens)
        results["prefill"][name] = {"median_s": median, "ratio": ratios[name], "flops_ratio": float(flops), "kv_ratio": float(kv)}
    console.print(table)
    if output:
        output.write_text(json.dumps(results, indent=2))
        console.print(f"wrote {output}")
