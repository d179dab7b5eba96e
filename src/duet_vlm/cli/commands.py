"""The ``duet-vlm`` commands: each parses its options, calls one library function and prints what it
returns (``printing``). Nothing heavy is imported before a command runs: ``duet-vlm --help`` and
``duet-vlm COMMAND --help`` build no model and import no torch of their own."""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path
from typing import Optional

import typer
from typer.core import TyperGroup

from . import printing
from .progress import Bar

# What a user's mistake raises in the library (a bad budget or method name, an unreadable image, a
# wrong model path): reported as one line unless --debug (before or after the command). typer's own
# usage errors pass through.
USER_ERRORS = (ValueError, TypeError, OSError)

#: The registered methods (``duet_vlm.METHODS``), for the help texts; written out because the
#: registry imports torch. tests/test_cli_inputs.py checks that it lists every registered method.
METHOD_NAMES = ("apet", "cdpruner", "dart", "divprune", "duet", "fastv", "full", "hiprune", "holitom", "pio", "pixelprune", "pool",
                "pyramiddrop", "random", "random_horizon", "sparsevlm", "trio_scan", "v2drop", "visionselector", "visionzip",
                "vispruner", "vscan")


#: Commands that hand their arguments on to a parser of their own (HfArgumentParser), ``--debug`` too.
FORWARDING = ("train", "train-demo")


def debug_first(args: list[str]) -> list[str]:
    """``--debug`` is the group's option; given after the command (where a user adds it on reading an
    error), it is moved before it, for every command that does not hand its arguments on.

    >>> debug_first(["check", "--model", "demo", "--debug"])
    ['--debug', 'check', '--model', 'demo']
    """
    command = next((i for i, arg in enumerate(args) if not arg.startswith("-")), None)
    if command is None or args[command] in FORWARDING:
        return list(args)
    end = args.index("--") if "--" in args[command:] else len(args)
    if "--debug" not in args[command + 1 : end]:
        return list(args)
    options = [arg for arg in args[command + 1 : end] if arg != "--debug"]
    return ["--debug", *[arg for arg in args[:command] if arg != "--debug"], args[command], *options, *args[end:]]


class _Commands(TyperGroup):
    """The command group; the one place where user mistakes become a one-line message and exit 1."""

    def parse_args(self, ctx, args):
        return super().parse_args(ctx, debug_first(args))

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
    help="DUET visual-token reduction for Hugging Face vision-language models.", no_args_is_help=True, cls=_Commands,
    rich_markup_mode="markdown",
)


@app.callback()
def _commands(debug: bool = typer.Option(False, "--debug", help="Show the traceback of an error.")) -> None:
    """DUET visual-token reduction for Hugging Face vision-language models."""


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


def command_line(argv: list[str] | None = None) -> str:
    """``duet-vlm`` and its arguments (``sys.argv[1:]``) as a result file records them: an absolute
    path under the current directory is written relative to it (``--json=PATH`` too), so that the
    line runs again from a checkout elsewhere; a path outside it (a machine's scratch folder) stays
    absolute.

    >>> here = os.getcwd()
    >>> command_line(["check", "--json", os.path.join(here, "out", "r.json"), "--model", "demo"])
    'duet-vlm check --json out/r.json --model demo'
    """
    here = os.getcwd()

    def relative(arg: str) -> str:
        option, equals, value = arg.partition("=") if arg.startswith("--") else ("", "", arg)
        if not os.path.isabs(value):
            return arg
        path = os.path.normpath(value)
        try:
            under = os.path.commonpath([path, here]) == here
        except ValueError:  # another drive (Windows)
            under = False
        return option + equals + os.path.relpath(path, here) if under else arg

    return " ".join(["duet-vlm", *map(relative, sys.argv[1:] if argv is None else argv)])


def _one_line_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Warnings as one line on stderr (the default shows a line of Python source under each)."""
    print(f"warning: {message}", file=file or sys.stderr)


def main() -> None:
    """Console-script entry point."""
    warnings.showwarning = _one_line_warning  # this process is the command line's own
    app(args=expand_list_options(sys.argv[1:]), prog_name="duet-vlm")


@app.command()
def plan(
    budget: Optional[int] = typer.Option(None, help="Average visual tokens per decoder layer per item."),
    ratio: Optional[float] = typer.Option(None, help="Instead of --budget: keep this fraction of the item's tokens."),
    layers: Optional[int] = typer.Option(None, help="Decoder layers of the language model [default: 32]."),
    tokens: Optional[int] = typer.Option(
        None, help="Visual tokens per image (per frame with --frames) without reduction [default: 576, or the preset's]."
    ),
    frames: int = typer.Option(1, help="Frames of a video item (e.g. 8 with --tokens 257 for Video-LLaVA)."),
    method: str = typer.Option("duet", help=f"One of: {', '.join(METHOD_NAMES)}."),
    text_tokens: int = typer.Option(60, help="Prompt tokens besides the image, for FLOPs and KV bytes."),
    hidden: Optional[int] = typer.Option(None, help="Decoder hidden size [default: 4096, LLaVA-1.5-7B's]."),
    intermediate: Optional[int] = typer.Option(None, help="Decoder MLP size [default: 11008]."),
    heads: Optional[int] = typer.Option(None, help="Attention heads [default: 32]."),
    kv_heads: Optional[int] = typer.Option(None, help="Key/value heads (fewer with grouped-query attention) [default: 32]."),
    bytes_per_element: int = typer.Option(2, help="KV-cache element size (2 for fp16/bf16)."),
    preset: Optional[str] = typer.Option(
        None, help="A family's geometry from its default transformers config instead of the sizes above: "
        "qwen3.5 (hybrid: attention in every 4th layer), qwen3.5-moe, internvl (448 px tiles), gemma3 "
        "(256 soft tokens; sliding windows in five of every six layers) or gemma4 (a square image at --soft-tokens)."
    ),
    tiles: Optional[int] = typer.Option(None, help="With --preset internvl: tiles of the image (plus a thumbnail) [default: 4]."),
    soft_tokens: Optional[int] = typer.Option(
        None, help="With --preset gemma4: the processor's max_soft_tokens, one of 70, 140, 280, 560, 1120 [default: 280]."
    ),
    ladder: bool = typer.Option(
        False, "--ladder", help="With --preset gemma4 and --budget: every rung of the soft-token ladder at the budget, "
                                "and the cheapest that reaches it."
    ),
    aspect: float = typer.Option(1.0, help="With --ladder: the image's width / height."),
    option: list[str] = typer.Option(
        [], metavar="KEY=VALUE", help="The method's own options, repeated (values as JSON where they parse), e.g. "
                                      "--option 'ratios=[0.28,0.25,0]' for v2drop; options that fix the schedule "
                                      "need no --budget."
    ),
) -> None:
    """Print the schedule a method solves for a budget, with per-layer counts, FLOPs and KV-cache savings."""
    from ..costs import ladder_costs, plan_costs
    from ..demo.sweep import method_options

    if ladder:
        if preset != "gemma4" or budget is None or ratio is not None:
            raise ValueError("--ladder needs --preset gemma4 and --budget (the ladder is Gemma 4's)")
        rungs, chosen = ladder_costs(method, budget, text_tokens, aspect, bytes_per_element)
        printing.print_ladder(rungs, chosen, method, budget, text_tokens)
        return
    options = method_options(option)
    costs = plan_costs(method, budget, ratio, layers, tokens, frames, text_tokens, hidden, intermediate, heads, kv_heads,
                       bytes_per_element, preset, tiles, soft_tokens, options)
    given = [f"budget {budget}"] if budget is not None else [f"ratio {ratio}"] if ratio is not None else []
    target = ", ".join(given + [f"{key}={value}" for key, value in options.items()])
    printing.print_plan(costs, method, target, costs.plan.schedule.num_layers, frames, text_tokens)


@app.command()
def bench(
    methods: list[str] = typer.Option(
        ["duet"], metavar="<str>...", help="Methods to time (space-separated list; 'none' for only the baselines)."
    ),
    budgets: list[int] = typer.Option([192, 128, 64], metavar="<int>...", help="Budgets (space-separated list)."),
    rounds: int = typer.Option(
        5, help="Timed rounds; variants are interleaved within each round (in the prefill and --family, a variant and "
                "its ideal swap places every other round and are read per pair of rounds: an odd number runs one more)."
    ),
    hidden: int = typer.Option(1024, help="Decoder width (the tower's width and the 32 layers are fixed)."),
    intermediate: int = typer.Option(2816, help="Decoder MLP size."),
    text_tokens: int = typer.Option(60, help="Prompt tokens besides the image."),
    threads: int = typer.Option(0, help="torch threads (0 = leave as is)."),
    allocator: str = typer.Option(
        "system", help="system: the C library's allocator as configured; keep: glibc keeps the memory a forward "
                       "frees for the next one (mallopt), so that page faults do not depend on what a variant keeps "
                       "alive (its KV cache) and the variants compare like with like."
    ),
    family: Optional[str] = typer.Option(
        None, help="Time a family's geometry instead: llava, llava_next (672x672, 5 tiles), video_llava (8 frames), "
                   "qwen3_5 (672x672, 441 tokens; hybrid linear-attention decoder, M-RoPE), internvl (2x2 tiles + "
                   "thumbnail, 1,280 tokens), gemma3 (256 soft tokens) or gemma4 (768x768 at 280 soft tokens: 256; "
                   "per-layer inputs, KV sharing)."
    ),
    ratios: list[float] = typer.Option(
        [0.33, 0.11], metavar="<float>...", help="With --family: kept fractions of the item's tokens."
    ),
    vision_layers: int = typer.Option(
        24, help="Layers of the vision tower (CLIP-L; with --family qwen3_5 or internvl, its tower at CLIP-L's width) "
                 "(fewer makes --family runs faster)."
    ),
    output: Optional[Path] = typer.Option(None, help="Write the results as JSON here."),
    generate: bool = typer.Option(False, "--generate", help="Time generate() end to end instead (latency, decode, throughput, memory)."),
    train: bool = typer.Option(False, "--train", help="Time a training step instead (forward, backward, AdamW step, memory)."),
    baselines: list[str] = typer.Option(
        ["visionzip", "fastv", "pyramiddrop", "sparsevlm"], metavar="<str>...",
        help="With --generate/--train: baseline methods, timed at --baseline-budgets ('none' for none).",
    ),
    baseline_budgets: list[int] = typer.Option(
        [128], metavar="<int>...", help="With --generate/--train: budgets of the baselines."
    ),
    batches: list[int] = typer.Option(
        [1], metavar="<int>...", help="With --generate: batch sizes, one run each (rows of different prompt lengths, "
                                      "left-padded); with --train: the first is the batch."
    ),
    new_tokens: list[int] = typer.Option(
        [32, 128], metavar="<int>...", help="With --generate: latencies reported at these lengths (one call of the longest)."
    ),
    checkpointing: str = typer.Option("both", help="With --train: off, on or both (gradient checkpointing)."),
    processes: int = typer.Option(
        1, help="With --train: time one process on the batch against this many DDP (gloo) processes on its rows, "
                "with and without each method (--threads split between them)."
    ),
    gpu: bool = typer.Option(
        False, "--gpu", help="The speed table at 7B shapes on a GPU (duet_vlm.bench.gpu; docs/check.md says how to run it "
                             "on a machine without this project's packages): writes --output after every row."
    ),
    shapes: list[str] = typer.Option(
        [], metavar="<str>...", help="With --gpu: the shapes (default all): llava15_7b, llava_next_7b, qwen2_5_vl_7b_1k, "
                                     "qwen2_5_vl_7b_4k, qwen2_5_vl_7b_4images."
    ),
    time_budget: float = typer.Option(540.0, help="With --gpu: seconds after which no cell starts (the record names them)."),
    smoke: bool = typer.Option(False, "--smoke", help="With --gpu: every column at toy shapes on the CPU."),
) -> None:
    """Time Stage A on the vision side and the prefill of each method, side by side in one run
    (or, with --generate or --train, generation end to end or a training step)."""
    import torch

    from ..bench import FAMILIES, ModelSize, family_benchmark, prefill_benchmark
    from ..bench.end_to_end import end_to_end
    from ..bench.timing import keep_freed_memory, paired_rounds

    if threads:
        torch.set_num_threads(threads)
    if gpu:
        import dataclasses

        from ..bench.gpu import SMOKE_SETTINGS, Settings, gpu_benchmark, markdown

        settings = dataclasses.replace(SMOKE_SETTINGS if smoke else Settings(), time_budget_s=time_budget)
        record = gpu_benchmark(shapes or None, output=output, smoke=smoke, settings=settings, command=command_line(),
                               progress=lambda label: printing.console.print(f"[{label}]", markup=False))
        printing.console.print(markdown(record), markup=False, soft_wrap=True)
        return
    if allocator not in ("system", "keep"):
        raise typer.BadParameter(f"--allocator must be system or keep, got {allocator!r}")
    if allocator == "keep" and (generate or train):
        # their runs start other processes (DDP workers) that the setting would not reach
        raise typer.BadParameter("--allocator keep times the prefill and --family benchmarks; not --generate or --train")
    kept = keep_freed_memory() if allocator == "keep" else None
    if allocator == "keep" and kept is None:
        raise typer.BadParameter("--allocator keep needs glibc (its mallopt); this C library is not glibc")
    allocation = {"allocator": "system"} if kept is None else {"allocator": "glibc, freed memory kept", "mallopt": kept}
    size = ModelSize(
        vision_layers=vision_layers, hidden=hidden, heads=max(1, hidden // 64), kv_heads=max(1, hidden // 64),
        intermediate=intermediate,
    )
    if family is not None:
        if family not in FAMILIES:
            raise ValueError(f"--family must be one of {', '.join(FAMILIES)}, got {family!r}")
        with Bar() as bar:
            report = bar.rounds(paired_rounds(rounds))
            results = family_benchmark(family, size, methods, ratios, rounds, progress=lambda: report(f"{family} prefill"))
        results["command"] = command_line()
        results.update(allocation)
        printing.print_family(results, sum("error" not in row for row in results["variants"].values()) + len(results["ideals"]))
        printing.write_json(output, results)
    elif train and processes > 1:
        from ..bench.processes import process_benchmark

        variants = [] if methods == ["none"] else [(m, b) for m in methods for b in budgets]
        with Bar() as bar:
            results = process_benchmark(size, variants, processes, rounds, batches[0], text_tokens,
                                        threads=threads or None, progress=bar.rounds(rounds))
        results["command"] = command_line()
        printing.print_processes(results)
        printing.write_json(output, results)
    elif generate or train:
        kind = "generate" if generate else "train"
        with Bar() as bar:
            for result in end_to_end(kind, size, methods, budgets, baselines, baseline_budgets, rounds, text_tokens, batches,
                                     tuple(new_tokens), checkpointing, output, progress=bar.rounds(rounds)):
                printing.print_end_to_end(result)
        if output:
            printing.console.print(f"wrote {output}")
    else:
        with Bar() as bar:
            results = prefill_benchmark(size, [] if methods == ["none"] else methods, budgets, rounds, text_tokens,
                                        progress=bar.rounds(paired_rounds(rounds)))
        results["command"] = command_line()
        results.update(allocation)
        printing.print_prefill(results)
        printing.write_json(output, results)


@app.command()
def demo(
    index: int = typer.Option(3, help="Which test-split sample of the synthetic benchmark to ask about."),
    budget: Optional[int] = typer.Option(None, help="DUET budget (average visual tokens per layer); default 64, "
                                                    "16 with --model qwen2_5_vl (the same share of its tokens)."),
    output: Path = typer.Option(Path("duet_demo.png"), help="Where to write the kept-patch overlay."),
    model_path: Optional[Path] = typer.Option(None, help="A demo model directory (default: the shipped one)."),
    rounds: int = typer.Option(5, help="Interleaved prefill timing rounds."),
    model: str = typer.Option("llava", help="Which shipped demo model: llava (LLaVA-1.5's geometry: a CLS token, "
                                            "576 visual tokens) or qwen2_5_vl (Qwen2.5-VL's: no CLS token, 144)."),
) -> None:
    """Ask the shipped demo model about a synthetic scene with all tokens and with DUET; draw what was kept."""
    from ..demo.showcase import showcase

    printing.print_shown(showcase(index, budget, output, model_path, rounds, demo=model))


@app.command()
def run(
    model: str = typer.Option(
        ..., help="A local path or a Hub id of a checkpoint of any supported family (docs/families.md)."
    ),
    image: Optional[list[Path]] = typer.Option(
        None, metavar="<path>", help="An image file; repeat it for a batch of images (one row each, see --budgets)."
    ),
    video: Optional[Path] = typer.Option(
        None, help="Instead of --image: an animated GIF/WebP or a folder of frame images (LLaVA-OneVision, Video-LLaVA "
                   "and Qwen2/2.5/3-VL take a video)."
    ),
    prompt: str = typer.Option(..., help="The question (the model's chat template is applied)."),
    method: Optional[str] = typer.Option(
        None, help=f"One of: {', '.join(METHOD_NAMES)} (default: the reducer a fine-tuned checkpoint carries, else duet)."
    ),
    budget: Optional[int] = typer.Option(None, help="Average visual tokens per decoder layer per image (default 64)."),
    ratio: Optional[float] = typer.Option(None, help="Instead of --budget: keep this fraction of the image's tokens."),
    budgets: Optional[list[int]] = typer.Option(
        None, metavar="<int>...",
        help="One budget per --image: the images run as one padded batch, each row with its own budget.",
    ),
    ratios: Optional[list[float]] = typer.Option(
        None, metavar="<float>...", help="Instead of --budgets: one kept fraction per --image."
    ),
    saved_reducer: bool = typer.Option(
        True, help="Attach the reducer a checkpoint fine-tuned under one carries, unless --method, --budget or --ratio "
                   "is given."
    ),
    max_new_tokens: int = typer.Option(32),
    overlay: Optional[Path] = typer.Option(None, help="Write the kept-patch overlay here (with each item's token count)."),
    dtype: str = typer.Option("auto", help="auto, float32, bfloat16 or float16."),
    rounds: int = typer.Option(3, help="Interleaved prefill timing rounds."),
) -> None:
    """Answer a prompt about an image (or a video) with all tokens and with a reduction method, on any
    supported checkpoint; several images run as one batch, each row with its own budget (--budgets).

    A checkpoint fine-tuned under a reducer carries it (duet_vlm_reducer.json next to the weights), and
    run attaches it unless --method, --budget or --ratio is given or --no-saved-reducer."""
    from ..compare import ask

    images = list(image or [])
    asked = ask(model, prompt, images[0] if images else None, video, method, budget, ratio, max_new_tokens, overlay, dtype,
                rounds, images=images[1:], budgets=budgets or None, ratios=ratios or None, saved_reducer=saved_reducer)
    printing.print_asked(asked, images)


@app.command()
def check(
    model: str = typer.Option(
        ..., help="A local path or a Hub id of a checkpoint of any supported family; 'demo' for the shipped demo model."
    ),
    method: str = typer.Option("duet", help=f"One of: {', '.join(METHOD_NAMES)}."),
    budget: Optional[int] = typer.Option(None, help="Average visual tokens per decoder layer per image (default 64)."),
    ratio: Optional[float] = typer.Option(None, help="Instead of --budget: keep this fraction of each image's tokens."),
    device: str = typer.Option("auto", help="cpu, cuda or cuda:N (auto: cuda when torch sees one)."),
    dtype: str = typer.Option("auto", help="auto (the checkpoint's), float32, bfloat16 or float16."),
    attn: Optional[str] = typer.Option(
        None, help="Attention backend: flash_attention_2, sdpa or eager (default: the checkpoint's or transformers')."
    ),
    image: Optional[list[Path]] = typer.Option(
        None, metavar="<path>", help="Up to two images for the batch's rows (default: a drawn scene, and it at 3:4)."
    ),
    rounds: int = typer.Option(3, help="Interleaved timing rounds."),
    new_tokens: int = typer.Option(4, help="Tokens generated by each generate call."),
    skip: Optional[list[str]] = typer.Option(
        None, metavar="<check>", help="Leave out a check (repeat): full, restored, padded, counts, ideal, modes, timing."
    ),
    json_path: Optional[Path] = typer.Option(
        None, "--json", help="Write the report with the versions (torch, transformers, CUDA, flash-attn, GPU) here "
                             "('-': print it instead of the table)."
    ),
) -> None:
    """Check duet-vlm on your checkpoint, device, dtype and attention backend: full equals the model,
    a padded batch its rows, per-layer counts the plan, the reduced prefill its ideal, the generation
    modes the table, the model restored; then time it. Exits 1 if a check fails."""
    from ..check import CHECKS, check_checkpoint

    with Bar() as bar:
        def progress(label: str) -> None:
            if label in CHECKS:
                bar.progress.advance(bar.task("checks", len(CHECKS)))
            else:
                bar.progress.advance(bar.task(f"timing: {label}", rounds))

        report = check_checkpoint(model, method, budget, ratio, device, dtype, attn, list(image or []), rounds, new_tokens,
                                  tuple(skip or ()), progress)
    report.setup["command"] = command_line()
    printing.print_check(report, json_path)
    if not report.ok:
        raise typer.Exit(1)


@app.command()
def reproduce(
    output_dir: Path = typer.Option(Path("reproduce"), help="Where each cell's scores and the table go (a rerun resumes)."),
    methods: list[str] = typer.Option(
        ["duet", "visionzip", "pyramiddrop", "fastv", "sparsevlm", "dart", "pio"], metavar="<str>...",
        help="Methods besides the unreduced model (space-separated list).",
    ),
    budgets: list[int] = typer.Option([192, 128, 64], metavar="<int>...", help="Budgets (space-separated list)."),
    tasks: Optional[list[str]] = typer.Option(
        None, metavar="<task>", help="lmms-eval tasks (repeat; default the paper's seven: gqa, mmbench_en_dev, mme, pope, "
                                     "scienceqa_img, vqav2_val, textvqa_val)."
    ),
    model: str = typer.Option("llava-hf/llava-1.5-7b-hf", help="The checkpoint (a Hub id or a path)."),
    device: str = typer.Option("cuda:0", help="lmms-eval's device."),
    dtype: str = typer.Option("float16", help="The model's dtype."),
    limit: Optional[int] = typer.Option(None, help="At most this many items per task (a smoke run; not the paper's)."),
    include_path: Optional[Path] = typer.Option(None, help="A folder of local lmms-eval tasks (only these are indexed)."),
    model_args: str = typer.Option("", help="More lmms-eval model_args for duet_llava_hf (comma-separated key=value)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="List what would be downloaded and run, and what is done."),
) -> None:
    """Reproduce the DUET paper's LLaVA-1.5-7B table through the lmms-eval plugin: every method at each
    budget on the paper's benchmarks, the reported numbers and tolerances beside each cell; resumable
    (finished cells are kept in --output-dir). Needs the lmms-eval extra and, for the paper's table, a GPU
    and the Hub."""
    import importlib.util

    from ..integrations import reproduce as recipe

    if importlib.util.find_spec("lmms_eval") is None:
        raise ValueError("duet-vlm reproduce runs lmms-eval: install the extra first (docs/lmms-eval.md has the "
                         "torch-safe line; on a GPU machine pip install 'duet-vlm[lmms-eval]')")
    if dry_run:
        printing.print_reproduce_plan(recipe.plan(output_dir, tuple(methods), tuple(budgets), tasks, model, device, dtype,
                                                  include_path, limit, model_args))
        return
    output_dir.mkdir(parents=True, exist_ok=True)
    with Bar() as bar:
        def progress(label: str, done: int, total: int) -> None:
            bar.progress.update(bar.task(label, total), completed=done)

        table = recipe.run(output_dir, tuple(methods), tuple(budgets), tasks, model, device, dtype, include_path, limit,
                           progress, model_args, command=command_line())
    printing.print_reproduced(table, output_dir / "results.json")


@app.command()
def calibrate(
    model: str = typer.Option(..., help="A local path or a Hub id of a supported checkpoint."),
    data: str = typer.Option(
        "synthetic:validation",
        help="Sample inputs: synthetic[:SPLIT] (the demo's generated scenes and questions), a folder of images, or a glob.",
    ),
    method: str = typer.Option("duet", help=f"One of: {', '.join(METHOD_NAMES)}."),
    budget: Optional[int] = typer.Option(64, help="The average visual tokens per decoder layer per item to meet."),
    ratio: Optional[float] = typer.Option(None, help="Instead of --budget: the average kept fraction of each item's tokens."),
    signal: str = typer.Option("rank", help="rank, coverage or distinct (duet_vlm.content; Adaptive says why rank)."),
    n: int = typer.Option(128, help="Sample inputs to run."),
    floor: float = typer.Option(0.25, help="An item's lowest budget, as a fraction of the average."),
    ceiling: float = typer.Option(2.0, help="An item's highest budget, as a multiple of the average."),
    batch_size: int = typer.Option(8),
    output: Optional[Path] = typer.Option(None, help="Write the calibrated reducer and the averages here (JSON)."),
    dtype: str = typer.Option("auto", help="auto, float32, bfloat16 or float16."),
) -> None:
    """Find the threshold of a content-adaptive budget (duet_vlm.Adaptive) at which sample inputs average
    the budget; print it with the average it realises on them. duet_vlm.from_dict(json["reducer"]) rebuilds
    the calibrated reducer from --output."""
    from ..evaluation import calibrate_checkpoint

    result = calibrate_checkpoint(model, data, method, budget, ratio, signal, n, floor, ceiling, output, batch_size, dtype)
    asked = f"budget {budget}" if ratio is None else f"ratio {ratio}"
    printing.console.print(f"{method} at {asked}, signal {signal}: threshold {result.threshold:.6g}", markup=False)
    printing.console.print(
        f"over {len(result.counts)} items of {data}: asked average {result.asked:.1f}, realised {result.realised:.1f} "
        f"visual tokens per layer (items from {min(result.counts)} to {max(result.counts)})", markup=False,
    )
    if output:
        printing.console.print(f"wrote {output}")


@app.command("eval")
def evaluate(
    methods: Optional[list[str]] = typer.Option(
        None, metavar="<str>...", help="Methods (space-separated); default: every registered one. VISION+LANGUAGE "
                                       "composes two under one budget (divprune+random_horizon); NAME:KEY=VALUE,... "
                                       "sets a method's options, e.g. pixelprune:threshold=0.05. A method without "
                                       "a budget gets one row."
    ),
    budgets: list[int] = typer.Option([192, 128, 64], metavar="<int>...", help="Budgets (space-separated list)."),
    n: int = typer.Option(500, help="Questions per configuration (balanced over types when a multiple of 7)."),
    split: str = typer.Option("test", help="train, validation or test."),
    model_path: Optional[Path] = typer.Option(None, help="A demo model directory (default: the shipped one)."),
    model: str = typer.Option("llava", help="Which shipped demo model: llava (LLaVA-1.5's geometry: a CLS token, "
                                            "576 visual tokens) or qwen2_5_vl (Qwen2.5-VL's: no CLS token, 144; "
                                            "its table's budgets are a quarter of the first's: 48 32 16)."),
    output_dir: Path = typer.Option(Path("duet_eval"), help="Where results.json, results.csv and the plot go."),
    batch_size: int = typer.Option(8),
    control: bool = typer.Option(True, help="Also evaluate with the image blanked (language-prior control)."),
    positions: Optional[str] = typer.Option(
        None, help="original or contiguous: the position mode of every method that has one (default: each method's own)."
    ),
    resume: bool = typer.Option(
        True, help="Reuse rows an interrupted run of the same settings on the same weights finished (OUTPUT_DIR/rows/)."
    ),
    adaptive: Optional[str] = typer.Option(
        None, help="coverage, distinct or rank: give each image its own budget from this signal (duet_vlm.Adaptive), "
                   "calibrated on the validation split so that the average is the budget."
    ),
    threshold: Optional[float] = typer.Option(None, help="With --adaptive: this threshold instead of calibrating one."),
    calibration_n: int = typer.Option(140, help="With --adaptive: validation scenes the threshold is calibrated on."),
    method_files: Optional[Path] = typer.Option(
        None, help="A directory with what a method saved beside a fine-tuned model (VisionSelector's "
                   "duet_vlm_scorer.safetensors), read instead of --model-path's."
    ),
) -> None:
    """Accuracy of every method and budget on the synthetic visual-QA benchmark (a miniature Table 1).

    Each finished row is saved in OUTPUT_DIR/rows/ with everything that determines it (method, budget,
    position option, split, n, batch size, the weights' SHA-256), so an interrupted run picks up where it
    stopped; a row saved under other settings or other weights is computed again. With --adaptive the
    realised visual tokens per layer stand next to the asked budget; counts.png shows the distribution of
    each image's tokens."""
    from ..demo.sweep import evaluate_methods

    # the command line, when this ran as one (not from Python or a test runner)
    command = command_line() if Path(sys.argv[0]).name == "duet-vlm" else None
    with Bar(transient=False) as bar:
        run = evaluate_methods(methods, budgets, n, split, model_path, output_dir, batch_size, control, positions, resume,
                               command, progress=bar.counter("evaluating"), adaptive=adaptive, threshold=threshold,
                               calibration_n=calibration_n, method_files=method_files, demo=model)
    printing.print_accuracy(run, split, n)


@app.command(
    "train-demo",
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True, "help_option_names": []},
    add_help_option=False,
)
def train_demo_command(ctx: typer.Context) -> None:
    """Train the demo LLaVA model from scratch, seeded, resumable by re-running (options: duet-vlm train-demo --help)."""
    from ..demo.config import DemoConfig
    from ..demo.train import train_demo

    # The options are DemoConfig's fields, parsed (and --help printed) by transformers' HfArgumentParser.
    config = DemoConfig.parse_args(ctx.args)
    # markup=False: log lines carry tags like "[val]" that rich would swallow as markup; soft_wrap: a log
    # file keeps the command line in one piece.
    path = train_demo(config, log=lambda line: printing.console.print(line, markup=False, soft_wrap=True))
    printing.console.print(f"saved {path}")


@app.command(
    "train",
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True, "help_option_names": []},
    add_help_option=False,
)
def train_command(ctx: typer.Context) -> None:
    """Fine-tune a LLaVA checkpoint with a reduction method attached (options: duet-vlm train --help)."""
    from ..training import DataError, TrainConfig, train

    # The options are TrainConfig's fields, parsed (and --help printed) by transformers' HfArgumentParser.
    config = TrainConfig.parse_args(ctx.args)
    try:
        outcome = train(config)
    except (DataError, ValueError, FileNotFoundError) as error:
        raise typer.BadParameter(str(error)) from error
    finally:
        # Launched on several processes (accelerate launch, torchrun), the command owns its process group:
        # it ends it here rather than leaving it to the interpreter's exit, where a gloo group's threads
        # were once torn down still running (a rank aborted, "terminate called without an active exception").
        import torch.distributed

        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    printing.console.print(
        f"saved {outcome.output_dir} after {outcome.global_step} steps, final training loss {outcome.final_loss:.4f}",
        markup=False,
    )

