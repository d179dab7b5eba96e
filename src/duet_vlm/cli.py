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
from typer.core import TyperGroup

from .adapters import Geometry, adapter_for
from .flops import DecoderDims, exact_flops, fastv_flops, kv_cache_bytes
from .methods import METHODS, make

# What a user's mistake raises in the library (a bad budget or method name, an unreadable image, a
# wrong model path): reported as one line unless --debug. typer's own usage errors pass through.
USER_ERRORS = (ValueError, TypeError, OSError)


class _Commands(TyperGroup):
    """The command group; the one place where user mistakes become a one-line message and exit 1."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except USER_ERRORS as error:
            if ctx.params.get("debug"):
                raise
            message = " ".join(str(error).split()) or type(error).__name__
            typer.echo(f"Error: {message} (--debug shows the traceback)", err=True)
            raise typer.Exit(1) from error


app = typer.Typer(
    help="DUET visual-token reduction for Hugging Face vision-language models.", no_args_is_help=True, cls=_Commands
)
console = Console()


@app.callback()
def _commands(debug: bool = typer.Option(False, "--debug", help="Show the traceback of an error.")) -> None:
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
    budget: Optional[int] = typer.Option(None, help="Average visual tokens per decoder layer per item."),
    ratio: Optional[float] = typer.Option(None, help="Instead of --budget: keep this fraction of the item's tokens."),
    layers: int = typer.Option(32, help="Decoder layers of the language model."),
    tokens: int = typer.Option(576, help="Visual tokens per image (per frame with --frames) without reduction."),
    frames: int = typer.Option(1, help="Frames of a video item (e.g. 8 with --tokens 257 for Video-LLaVA)."),
    method: str = typer.Option("duet", help=f"One of: {', '.join(sorted(METHODS))}."),
    text_tokens: int = typer.Option(60, help="Prompt tokens besides the image, for FLOPs and KV bytes."),
    hidden: int = typer.Option(4096, help="Decoder hidden size (LLaVA-1.5-7B by default)."),
    intermediate: int = typer.Option(11008, help="Decoder MLP size."),
    heads: int = typer.Option(32, help="Attention heads."),
    kv_heads: int = typer.Option(32, help="Key/value heads (fewer with grouped-query attention)."),
    bytes_per_element: int = typer.Option(2, help="KV-cache element size (2 for fp16/bf16)."),
) -> None:
    """Print the schedule a method solves for a budget, with per-layer counts, FLOPs and KV-cache savings."""
    if (budget is None) == (ratio is None):
        raise ValueError("give --budget or --ratio")
    # The patch grid of a unit: N square patches, or N - 1 plus a CLS slot (Video-LLaVA frames).
    side = next((s for s in (math.isqrt(tokens), math.isqrt(tokens - 1)) if s * s in (tokens, tokens - 1)), None)
    grid = (side, side) if side else (1, tokens)
    modality = "video" if frames > 1 else "image"
    geometry = Geometry(layers, tokens * frames, grid, True, units=frames, modality=modality)
    solved = make(method, budget=budget, ratio=ratio).resolve(geometry)
    schedule = solved.schedule
    tokens *= frames
    item = f"video of {frames} frames" if frames > 1 else "image"
    counts = schedule.tokens_per_layer
    dims = DecoderDims(hidden, intermediate, heads, kv_heads, hidden // heads)

    target = f"budget {budget}" if budget is not None else f"ratio {ratio}"
    console.print(f"[bold]{method}[/bold] at {target}: {tokens} visual tokens per {item}, {layers} layers")
    vision = solved.vision
    if vision is not None:
        detail = ", ".join(f"{k}={v}" for k, v in vars(vision).items())
        per_frame = f" ({schedule.llm_input // frames} per frame)" if frames > 1 else ""
        console.print(
            f"  vision side: {type(vision).__name__}({detail}) -> {schedule.llm_input} tokens enter the LLM{per_frame}"
        )
    for layer, keep in schedule.boundaries:
        console.print(f"  after layer {layer}: keep {keep} ({type(solved.language).__name__})")

    table = Table(title=f"Visual tokens per {item} entering each decoder layer")
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


LIST_OPTIONS = ("--methods", "--budgets", "--ratios", "--baselines", "--baseline-budgets", "--batches", "--new-tokens")


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
    methods: list[str] = typer.Option(["duet"], help="Methods to time (space-separated list; 'none' for only the baselines)."),
    budgets: list[int] = typer.Option([192, 128, 64], help="Budgets (space-separated list)."),
    rounds: int = typer.Option(5, help="Timed rounds; variants are interleaved within each round."),
    hidden: int = typer.Option(1024, help="Decoder width (CLIP-L tower and 32 layers are fixed)."),
    intermediate: int = typer.Option(2816, help="Decoder MLP size."),
    text_tokens: int = typer.Option(60, help="Prompt tokens besides the image."),
    threads: int = typer.Option(0, help="torch threads (0 = leave as is)."),
    family: Optional[str] = typer.Option(
        None, help="Time a family's geometry instead: llava, llava_next (672x672, 5 tiles) or video_llava (8 frames)."
    ),
    ratios: list[float] = typer.Option([0.33, 0.11], help="With --family: kept fractions of the item's tokens."),
    vision_layers: int = typer.Option(24, help="Layers of the CLIP-L tower (fewer makes --family runs faster)."),
    output: Optional[Path] = typer.Option(None, help="Write the results as JSON here."),
    generate: bool = typer.Option(False, "--generate", help="Time generate() end to end instead (latency, decode, throughput, memory)."),
    train: bool = typer.Option(False, "--train", help="Time a training step instead (forward, backward, AdamW step, memory)."),
    baselines: list[str] = typer.Option(
        ["visionzip", "fastv", "pyramiddrop", "sparsevlm"],
        help="With --generate/--train: baseline methods, timed at --baseline-budgets ('none' for none).",
    ),
    baseline_budgets: list[int] = typer.Option([128], help="With --generate/--train: budgets of the baselines."),
    batches: list[int] = typer.Option([1], help="With --generate: batch sizes, one run each (rows of different prompt lengths, left-padded); with --train: the first is the batch."),
    new_tokens: list[int] = typer.Option([32, 128], help="With --generate: latencies reported at these lengths (one call of the longest)."),
    checkpointing: str = typer.Option("both", help="With --train: off, on or both (gradient checkpointing)."),
) -> None:
    """Time Stage A on the vision side and the prefill of each method, side by side in one run
    (or, with --generate or --train, generation end to end or a training step)."""
    import torch

    from .bench import ModelSize, build_model, example_inputs, interleaved, median_ratio, prefill_variants, vision_variants

    if threads:
        torch.set_num_threads(threads)
    size = ModelSize(
        vision_layers=vision_layers, hidden=hidden, heads=max(1, hidden // 64), kv_heads=max(1, hidden // 64),
        intermediate=intermediate,
    )
    if family is not None:
        _bench_family(family, size, methods, ratios, rounds, output)
        return
    methods, baselines = ([] if names == ["none"] else names for names in (methods, baselines))
    variants = [(m, b) for m in methods for b in budgets] + [(m, b) for m in baselines for b in baseline_budgets]
    if generate or train:
        _bench_end_to_end(generate, size, variants, rounds, text_tokens, batches, new_tokens, checkpointing, output)
        return
    model = build_model(size)
    inputs = example_inputs(model, text_tokens=text_tokens)
    vision = vision_variants(model, inputs, budgets[0])
    prefill, reducers, decoder_seconds = prefill_variants(model, inputs, methods, budgets)
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

    table = Table(title=f"Prefill, {rounds} interleaved rounds (whole forward, and its language-model part)")
    columns = ("variant", "forward s", "forward ratio", "LM s", "LM ratio", "exact FLOPs ratio", "KV ratio", "visual tok/layer")
    for column in columns:
        table.add_column(column, justify="right")
    ratios = median_ratio(prefill_times, "no reduction")
    decoder_times = {name: seconds[-rounds:] for name, seconds in decoder_seconds.items()}
    decoder_ratios = median_ratio(decoder_times, "no reduction")
    for name, values in prefill_times.items():
        median, decoder_median = statistics.median(values), statistics.median(decoder_times[name])
        stats = reducers[name].stats if name in reducers else None
        flops = stats.flops_ratio if stats else 1.0
        kv = stats.kv_bytes / stats.kv_bytes_full if stats else 1.0
        tokens = stats.average_tokens if stats else 576.0
        table.add_row(
            name, f"{median:.3f}", f"{ratios[name]:.3f}", f"{decoder_median:.3f}", f"{decoder_ratios[name]:.3f}",
            f"{flops:.3f}", f"{kv:.3f}", f"{tokens:.2f}",
        )
        results["prefill"][name] = {
            "forward_median_s": median, "forward_ratio": ratios[name], "language_model_median_s": decoder_median,
            "language_model_ratio": decoder_ratios[name], "flops_ratio": flops, "kv_ratio": kv, "avg_visual_tokens": tokens,
        }
    console.print(table)
    if output:
        output.write_text(json.dumps(results, indent=2))
        console.print(f"wrote {output}")


def _bench_end_to_end(generate, size, variants, rounds, text_tokens, batches, new_tokens, checkpointing, output) -> None:
    from .bench_generate import generate_benchmark
    from .bench_generate import markdown_table as generate_table
    from .bench_train import markdown_table as train_table
    from .bench_train import train_benchmark

    modes = {"off": (False,), "on": (True,), "both": (False, True)}
    if checkpointing not in modes:
        raise ValueError(f"--checkpointing must be off, on or both, got {checkpointing!r}")
    runs = []
    with Progress(console=console, transient=True) as progress:
        for batch in batches if generate else batches[:1]:
            task = progress.add_task(f"{'generate' if generate else 'train'}, batch {batch}", total=rounds)
            advance = lambda task=task: progress.advance(task)  # noqa: E731
            if generate:
                result = generate_benchmark(size, variants, batch, tuple(new_tokens), rounds, text_tokens, progress=advance)
            else:
                result = train_benchmark(size, variants, modes[checkpointing], rounds, batch, text_tokens, progress=advance)
            load = " -> ".join(f"{before[0]:.1f}" for before in result["load_average_before_after"])
            # plain echo: the markdown tables must not be wrapped to the terminal's width
            typer.echo(f"\nbatch {batch}, {rounds} interleaved rounds, 1-minute load average {load}")
            typer.echo(generate_table(result) if generate else train_table(result))
            runs.append(result)
            if output:  # written after every batch: a long run keeps what it measured
                output.write_text(json.dumps(runs if generate else runs[0], indent=2))
    if output:
        console.print(f"wrote {output}")


def _bench_family(family, size, methods, ratios, rounds, output) -> None:
    from .bench import FAMILIES, family_benchmark

    if family not in FAMILIES:
        raise ValueError(f"--family must be one of {', '.join(FAMILIES)}, got {family!r}")
    variants = len(methods) * len(ratios) * 2 + 1
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task(f"{family} prefill", total=rounds)
        results = family_benchmark(family, size, methods, ratios, rounds, progress=lambda: progress.advance(task))
    table = Table(title=f"{family}: prefill, {rounds} interleaved rounds of {variants} variants")
    columns = ("variant", "visual tok/layer", "forward s", "LM s", "LM vs full", "ideal LM s", "LM vs ideal", "FLOPs ratio", "KV ratio")
    for column in columns:
        table.add_column(column, justify="right")
    for name, row in results["variants"].items():
        tokens = row["avg_visual_tokens"]
        table.add_row(
            name, f"{tokens:.1f}" if tokens is not None else "all", f"{row['forward_s']:.3f}", f"{row['language_model_s']:.3f}",
            f"{row['lm_vs_full']:.3f}", f"{row['ideal_s']:.3f}" if "ideal_s" in row else "",
            f"{row['lm_vs_ideal']:.3f}" if "lm_vs_ideal" in row else "", f"{row['flops_ratio']:.3f}", f"{row['kv_ratio']:.3f}",
        )
    console.print(table)
    if output:
        output.write_text(json.dumps(results, indent=2))
        console.print(f"wrote {output}")


def _print_answers(answers, title: str = "Answers") -> None:
    table = Table(title=title)
    for column in ("", "answer", "avg visual tokens/layer", "visual tokens per layer group", "decoder FLOPs (exact)", "KV cache", "prefill s"):
        table.add_column(column, justify="right")
    for answer in answers:
        stats = answer.stats
        groups = ", ".join(
            f"{first}-{last}: {count}" if first != last else f"{first}: {count}"
            for first, last, count in layer_groups(stats.tokens_per_layer)
        )
        table.add_row(
            answer.label,
            repr(answer.text),
            f"{stats.average_tokens:.2f}",
            groups,
            _human(stats.flops_exact, "FLOP"),
            _human(stats.kv_bytes, "B"),
            f"{answer.prefill_seconds:.3f}",
        )
    console.print(table)
    base = answers[0]
    for answer in answers[1:]:
        console.print(
            f"{answer.label}: decoder FLOPs x{answer.stats.flops_exact / base.stats.flops_exact:.3f}, "
            f"KV cache x{answer.stats.kv_bytes / base.stats.kv_bytes:.3f}, "
            f"prefill time x{answer.prefill_seconds / base.prefill_seconds:.3f} (median of interleaved runs)"
        )


def read_frames(path: Path) -> list:
    """Frames of an animated image (GIF, WebP) or of the images in a folder (sorted by name)."""
    from PIL import Image, ImageSequence

    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp", ".bmp"))
        frames = [Image.open(p).convert("RGB") for p in files]
    else:
        frames = [frame.convert("RGB") for frame in ImageSequence.Iterator(Image.open(path))]
    if not frames:
        raise ValueError(f"no video frames in {path}")
    return frames


def patch_grid(model) -> tuple[int, int]:
    from .adapters import adapter_for

    return adapter_for(model).geometry.grid


@app.command()
def demo(
    index: int = typer.Option(3, help="Which test-split sample of the synthetic benchmark to ask about."),
    budget: int = typer.Option(64, help="DUET budget (average visual tokens per layer)."),
    output: Path = typer.Option(Path("duet_demo.png"), help="Where to write the kept-patch overlay."),
    model_path: Optional[Path] = typer.Option(None, help="A demo model directory (default: the shipped one)."),
    rounds: int = typer.Option(5, help="Interleaved prefill timing rounds."),
) -> None:
    """Ask the shipped demo model about a synthetic scene with all tokens and with DUET; draw what was kept."""
    from .compare import compare, draw_overlay
    from .demo import data
    from .demo.evaluate import load_demo
    from .methods import Duet

    model, processor = load_demo(model_path)
    sample = data.sample("test", index)
    console.print(f"[bold]question[/bold] ({sample.qtype}): {sample.question}   [bold]truth[/bold]: {sample.answer}")
    answers = compare(model, processor, sample.image, sample.question, {"all tokens": None, f"DUET {budget}": Duet(budget=budget)}, rounds=rounds)
    _print_answers(answers)
    grid = patch_grid(model)
    path = draw_overlay(sample.image, answers[1].stats, grid, output, title=f"{sample.question}  ->  {answers[1].text!r}")
    console.print(f"wrote {path}")


@app.command()
def run(
    model: str = typer.Option(
        ..., help="A local path or a Hub id of a LLaVA(-NeXT, -OneVision), Video-LLaVA or Qwen2/2.5/3-VL checkpoint."
    ),
    image: Optional[Path] = typer.Option(None, help="An image file."),
    video: Optional[Path] = typer.Option(None, help="Instead of --image: an animated GIF/WebP or a folder of frame images."),
    prompt: str = typer.Option(..., help="The question (the model's chat template is applied)."),
    method: str = typer.Option("duet", help=f"One of: {', '.join(sorted(METHODS))}."),
    budget: Optional[int] = typer.Option(64, help="Average visual tokens per decoder layer per image."),
    ratio: Optional[float] = typer.Option(None, help="Instead of --budget: keep this fraction of the image's tokens."),
    max_new_tokens: int = typer.Option(32),
    overlay: Optional[Path] = typer.Option(None, help="Write the kept-patch overlay here."),
    dtype: str = typer.Option("auto", help="auto, float32, bfloat16 or float16."),
    rounds: int = typer.Option(3, help="Interleaved prefill timing rounds."),
) -> None:
    """Answer a prompt about an image (or a video) with all tokens and with a reduction method, on any
    supported checkpoint."""
    import torch
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from .compare import compare, draw_item_overlay, draw_overlay

    # The cheap checks first: a bad method, budget or image fails before the weights load.
    reducer = make(method, budget=None if ratio is not None else budget, ratio=ratio)
    if (image is None) == (video is None):
        raise ValueError("give --image or --video")
    picture = Image.open(image).convert("RGB") if image is not None else read_frames(video)
    if dtype not in ("auto", "float32", "bfloat16", "float16"):
        raise ValueError(f"--dtype must be auto, float32, bfloat16 or float16, got {dtype!r}")
    torch_dtype = "auto" if dtype == "auto" else getattr(torch, dtype)
    try:
        llava = AutoModelForImageTextToText.from_pretrained(model, dtype=torch_dtype).eval()
        processor = AutoProcessor.from_pretrained(model)
    except OSError as error:  # transformers' message does not say which argument was wrong
        raise OSError(f"cannot load a checkpoint from --model {model!r}: {error}") from error
    label = f"{method} {budget}" if ratio is None else f"{method} ratio {ratio}"
    answers = compare(llava, processor, picture, prompt, {"all tokens": None, label: reducer}, max_new_tokens, rounds)
    _print_answers(answers)
    if overlay:
        stats = answers[1].stats
        (item,) = stats.items
        if len(item.views) == 1 and stats.vision_roles:  # one grid: Stage A's roles can be drawn too
            # The item's own token grid (Qwen-VL images come in any size), CLS or not.
            (_, rows, cols), = item.views
            has_cls = adapter_for(llava).geometry.has_cls
            path = draw_overlay(picture, stats, (rows, cols), overlay, title=prompt, has_cls=has_cls)
        else:  # tiles of an anyres image, or frames of a video
            path = draw_item_overlay(picture, item, overlay, title=prompt)
        console.print(f"wrote {path}")


@app.command("eval")
def evaluate(
    methods: Optional[list[str]] = typer.Option(None, help="Methods (space-separated); default: every registered one."),
    budgets: list[int] = typer.Option([192, 128, 64], help="Budgets (space-separated list)."),
    n: int = typer.Option(500, help="Questions per configuration (balanced over types when a multiple of 7)."),
    split: str = typer.Option("test", help="train, validation or test."),
    model_path: Optional[Path] = typer.Option(None, help="A demo model directory (default: the shipped one)."),
    output_dir: Path = typer.Option(Path("duet_eval"), help="Where results.json, results.csv and the plot go."),
    batch_size: int = typer.Option(8),
    control: bool = typer.Option(True, help="Also evaluate with the image blanked (language-prior control)."),
    positions: Optional[str] = typer.Option(
        None, help="original or contiguous: the position mode of every method that has one (default: each method's own)."
    ),
    resume: bool = typer.Option(
        True, help="Reuse rows an interrupted run of the same settings on the same weights finished (OUTPUT_DIR/rows/)."
    ),
) -> None:
    """Accuracy of every method and budget on the synthetic visual-QA benchmark (a miniature Table 1).

    Each finished row is saved in OUTPUT_DIR/rows/ with everything that determines it (method, budget,
    position option, split, n, batch size, the weights' SHA-256), so an interrupted run picks up where it
    stopped; a row saved under other settings or other weights is computed again."""
    from .adapters import adapter_for
    from .demo import data
    from .demo.evaluate import DEMO_MODEL_DIR, evaluate_accuracy, load_demo
    from .methods.base import resolve_positions
    from .report import retention_plot, standard_error, takes_positions, weights_digest, write_results

    chosen = methods or [name for name in METHODS if name != "full"]
    unknown = [name for name in chosen if name not in METHODS]
    if unknown:
        raise ValueError(f"unknown methods {unknown}; registered: {', '.join(sorted(METHODS))}")
    if positions not in (None, "original", "contiguous"):
        raise ValueError(f"--positions must be original or contiguous, got {positions!r}")

    def options(name: str) -> dict:
        return {"positions": positions} if positions and takes_positions(METHODS[name]) else {}

    # every reducer is built (and its method and budget checked) before the model loads
    configs = [("full", None, make("full"))]
    configs += [(name, budget, make(name, budget=budget, **options(name))) for name in chosen for budget in budgets]
    model, processor = load_demo(model_path)
    geometry = adapter_for(model).geometry

    def position_mode(name: str, reducer) -> str | None:
        """The mode a method with a position option ran in (its default resolved on this model)."""
        return resolve_positions(reducer.resolve(geometry).positions, geometry) if takes_positions(METHODS[name]) else None

    digest = weights_digest(model_path or DEMO_MODEL_DIR)

    def measure(name: str, budget: int | None, reducer) -> dict:
        costs = {"flops": 0, "rows": 0, "tokens": []}

        def collect(message):
            stats = reducer.stats
            rows_now = len(stats.text_tokens)
            costs["flops"] += stats.flops_exact
            costs["rows"] += rows_now
            costs["tokens"] = stats.tokens_per_layer
            progress.update(task, advance=rows_now, description=f"{name} {budget or ''}")

        result = evaluate_accuracy(
            model, processor, split=split, n=n, batch_size=batch_size, wrap=lambda: reducer(model), progress=collect
        )
        return {
            "method": name,
            "budget": budget,
            "accuracy": result["accuracy"],
            "per_type": result["per_type"],
            "n": result["n"],
            "positions": position_mode(name, reducer) if name != "full" else None,
            "avg_visual_tokens": sum(costs["tokens"]) / len(costs["tokens"]),
            "decoder_tflops_per_sample": costs["flops"] / max(costs["rows"], 1) / 1e12,
        }

    def blank_image_row() -> dict:
        blank = evaluate_accuracy(model, processor, split=split, n=n, batch_size=batch_size, blank_image=True,
                                  progress=lambda message: progress.update(task, advance=batch_size))
        return {"method": "blank image", "budget": None, "accuracy": blank["accuracy"], "per_type": blank["per_type"],
                "n": blank["n"], "avg_visual_tokens": float("nan"), "decoder_tflops_per_sample": float("nan")}

    def saved_row(name: str, budget: int | None, compute) -> dict:
        """``compute()``'s row, or the one a previous run with the same settings saved."""
        key = {"method": name, "budget": budget, "options": options(name) if name in METHODS else {}, "split": split,
               "n": n, "batch_size": batch_size, "weights_sha256": digest}
        path = output_dir / "rows" / f"{name.replace(' ', '_')}-{budget or 'all'}.json"
        if resume and path.exists() and (saved := json.loads(path.read_text()))["key"] == key:
            progress.update(task, advance=n, description=f"{name} {budget or ''} (saved)")
            return saved["row"]
        row = compute()
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"key": key, "row": row}, indent=2) + "\n")
        return row

    rows = []
    with Progress(console=console) as progress:
        task = progress.add_task("evaluating", total=n * (len(configs) + control))
        for name, budget, reducer in configs:
            rows.append(saved_row(name, budget, lambda name=name, budget=budget, reducer=reducer: measure(name, budget, reducer)))
        if control:
            rows.append(saved_row("blank image", None, blank_image_row))
    full_accuracy = rows[0]["accuracy"]
    for row in rows:
        row["retained_percent"] = 100 * row["accuracy"] / full_accuracy if full_accuracy else float("nan")

    types = [t for t in data.QUESTION_TYPES if t in rows[0]["per_type"]]
    table = Table(title=f"Synthetic visual QA, {split} split, {n} questions per row")
    for column in ["method", "budget", *types, "avg", "± s.e.", "% of full", "visual tok/layer", "decoder TFLOPs"]:
        table.add_column(column, justify="right")
    for row in rows:
        table.add_row(
            row["method"],
            str(row["budget"] or ""),
            *(f"{100 * row['per_type'].get(t, float('nan')):.1f}" for t in types),
            f"{100 * row['accuracy']:.1f}",
            f"{100 * standard_error(row['accuracy'], row['n']):.1f}",
            f"{row['retained_percent']:.1f}",
            f"{row['avg_visual_tokens']:.1f}",
            f"{row['decoder_tflops_per_sample']:.4f}",
        )
    console.print(table)
    output_dir.mkdir(parents=True, exist_ok=True)
    meta = {
        # the command line, when this ran as one (not from Python or a test runner)
        "command": " ".join(["duet-vlm", *sys.argv[1:]]) if Path(sys.argv[0]).name == "duet-vlm" else None,
        "split": split,
        "n": n,
        "model": str(model_path or "shipped demo model"),
        "weights_sha256": digest,
        "positions": positions,
        "chance": {t: data.CHANCE[t] for t in types},
    }
    paths = write_results(rows, output_dir, meta=meta)
    paths.append(retention_plot(rows, output_dir / "retention.png"))
    console.print("wrote " + ", ".join(str(p) for p in paths))


@app.command(
    "train-demo",
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True, "help_option_names": []},
    add_help_option=False,
)
def train_demo_command(ctx: typer.Context) -> None:
    """Train the demo LLaVA model from scratch, seeded, resumable by re-running (options: duet-vlm train-demo --help)."""
    from .demo.config import DemoConfig
    from .demo.train import train_demo

    # The options are DemoConfig's fields, parsed (and --help printed) by transformers' HfArgumentParser.
    config = DemoConfig.parse_args(ctx.args)
    # markup=False: log lines carry tags like "[val]" that rich would swallow as markup; soft_wrap: a log
    # file keeps the command line in one piece.
    path = train_demo(config, log=lambda line: console.print(line, markup=False, soft_wrap=True))
    console.print(f"saved {path}")


@app.command(
    "train",
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True, "help_option_names": []},
    add_help_option=False,
)
def train_command(ctx: typer.Context) -> None:
    """Fine-tune a LLaVA checkpoint with a reduction method attached (options: duet-vlm train --help)."""
    from .training import DataError, TrainConfig, train

    # The options are TrainConfig's fields, parsed (and --help printed) by transformers' HfArgumentParser.
    config = TrainConfig.parse_args(ctx.args)
    try:
        outcome = train(config)
    except (DataError, ValueError, FileNotFoundError) as error:
        raise typer.BadParameter(str(error)) from error
    console.print(
        f"saved {outcome.output_dir} after {outcome.global_step} steps, final training loss {outcome.final_loss:.4f}",
        markup=False,
    )


if __name__ == "__main__":  # `accelerate launch -m duet_vlm.cli train ...`
    main()
