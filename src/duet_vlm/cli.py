"""The ``duet-vlm`` command line: each command parses its options, calls one library function and
prints what it returns."""

from __future__ import annotations

import json
import math
import sys
import warnings
from dataclasses import dataclass
from itertools import groupby
from pathlib import Path
from typing import Optional, Sequence

import typer
from rich import box
from rich.cells import cell_len
from rich.console import Console, ConsoleOptions
from rich.measure import Measurement
from rich.padding import Padding
from rich.progress import Progress
from rich.table import Table
from rich.text import Text
from typer.core import TyperGroup

from .methods import METHODS

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
    help="DUET visual-token reduction for Hugging Face vision-language models.", no_args_is_help=True, cls=_Commands,
    rich_markup_mode="markdown",
)
console = Console()


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


def _one_line_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Warnings as one line on stderr (the default shows a line of Python source under each)."""
    print(f"warning: {message}", file=file or sys.stderr)


def main() -> None:
    """Console-script entry point."""
    warnings.showwarning = _one_line_warning  # this process is the command line's own
    app(args=expand_list_options(sys.argv[1:]), prog_name="duet-vlm")


# ----------------------------------------------------------------------------- printing
# A table is built from plain strings and laid out when printed, for the width it is printed at: the
# first of its layouts (most detailed first) in which every name and number fits on one line, else one
# block per row ("header  value" lines). Only prose (an answer, a path) wraps, between words.


@dataclass(frozen=True)
class Column:
    """A table column: its ``header`` (a newline splits it over two lines), its alignment, and whether its
    cells are ``prose`` that may wrap between words; names and numbers never wrap."""

    header: str
    justify: str = "right"
    prose: bool = False


@dataclass
class Layout:
    """One way to lay out a table: its columns, one string per column in each row (a newline puts a
    cell's parts on lines of their own), and a legend for its abbreviations, printed under it."""

    columns: Sequence[Column]
    rows: Sequence[Sequence[str]]
    legend: str = ""

    def table(self) -> Table:
        table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, padding=(0, 1, 0, 0), header_style="bold")
        for index, column in enumerate(self.columns):
            lines = [line for cell in (column.header, *(row[index] for row in self.rows)) for line in cell.split("\n")]
            widest = max(map(cell_len, lines))
            if column.prose:  # wraps, but not into a sliver: its longest word, or 24 cells when it is longer
                word = max((cell_len(word) for line in lines for word in line.split()), default=1)
                table.add_column(Text(column.header), justify=column.justify, min_width=max(word, min(widest, 24)))
            else:  # the minimum width is what a measurement of the table sums: every cell on one line
                table.add_column(Text(column.header), justify=column.justify, no_wrap=True, min_width=widest)
        for row in self.rows:
            table.add_row(*map(Text, row))  # Text: a cell's brackets are not rich markup
        return table


class Fitted:
    """A titled table printed in the first of its ``layouts`` that fits the width it is given, else as one
    block per row (``header  value`` lines) in the first layout's words.

    >>> rows = [["duet 64", "0.412", "63.75"], ["pyramiddrop 64", "0.380", "63.88"]]
    >>> wide = Layout([Column("variant", "left"), Column("LM ratio"), Column("visual tokens/layer")], rows)
    >>> narrow = Layout([Column("", "left"), Column("LM ×"), Column("tok")], rows, "×: ratio")
    >>> Console(width=40).print(Fitted("Prefill", wide, narrow))
    Prefill
                     LM ×    tok
    ────────────────────────────
    duet 64         0.412  63.75
    pyramiddrop 64  0.380  63.88
    ×: ratio
    """

    def __init__(self, title: str, *layouts: Layout):
        self.title, self.layouts = title, layouts

    def choose(self, console: Console, width: int) -> Optional[Layout]:
        """The first layout whose names and numbers all fit on one line each in ``width`` cells; ``None``
        when none does."""
        unbounded = console.options.update_width(10_000)  # a measurement within a width is capped to it
        return next((layout for layout in self.layouts
                     if Measurement.get(console, unbounded, layout.table()).minimum <= width), None)

    def __rich_console__(self, console: Console, options: ConsoleOptions):
        if self.title:
            yield Text(self.title, style="italic")
        layout = self.choose(console, options.max_width)
        if layout is not None:
            yield layout.table()
        else:
            layout = self.layouts[0]
            for row in layout.rows:
                yield Text(row[0], style="bold")
                block = Table.grid(padding=(0, 2))
                block.add_column(no_wrap=True, style="dim")
                block.add_column()
                for column, cell in zip(layout.columns[1:], row[1:]):
                    block.add_row(Text("  " + column.header.replace("\n", " ")), Text(cell))
                yield block
        if layout.legend:
            yield Text(layout.legend, style="dim")


def layer_groups(counts: list[int]) -> list[tuple[int, int, int]]:
    """``[(first_layer, last_layer, count), ...]`` (1-based layers) for runs of equal counts."""
    groups, start = [], 1
    for count, run in groupby(counts):
        size = len(list(run))
        groups.append((start, start + size - 1, count))
        start += size
    return groups


def _layers(first: int, last: int) -> str:
    return f"{first}-{last}" if first != last else str(first)


def _human(value: float, unit: str) -> str:
    """Three significant digits and a prefix: ``575 MFLOP``, ``6.28 GFLOP``, ``14.4 MB``, ``1.00 KB``; empty for NaN."""
    if math.isnan(value):
        return ""
    for prefix in ("", "K", "M", "G", "T", "P", "E"):
        if abs(value) < 999.5 or prefix == "E":
            return f"{value:.{2 if abs(value) < 9.995 else 1 if abs(value) < 99.95 else 0}f} {prefix}{unit}"
        value /= 1000


class _Bar:
    """A rich progress display drawn from its first report on (a command that fails first draws none),
    one task per label."""

    def __init__(self, transient: bool = True):
        self.progress = Progress(console=console, transient=transient)
        self.tasks: dict[str, int] = {}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.tasks:
            self.progress.stop()

    def task(self, label: str, total: Optional[int]) -> int:
        if not self.tasks:
            self.progress.start()
        if label not in self.tasks:
            self.tasks[label] = self.progress.add_task(label, total=total)
        return self.tasks[label]

    def rounds(self, total: int):
        """``report(label)``: one more of ``total`` rounds of the task ``label``."""
        return lambda label: self.progress.advance(self.task(label, total))

    def counter(self, label: str):
        """``report(advance, description=None, total=None)`` of the one task ``label``."""
        return lambda advance, description=None, total=None: self.progress.update(
            self.task(label, total), advance=advance, description=description, total=total)


def answers_table(answers, title: str = "Answers") -> Fitted:
    """``compare``'s answers: text, visual tokens per layer (and per run of layers), decoder FLOPs, KV cache
    and prefill time of each configuration."""
    rows, groups = [], []
    for answer in answers:
        stats = answer.stats
        groups.append([f"{_layers(first, last)}: {count}" for first, last, count in layer_groups(stats.tokens_per_layer)])
        rows.append([answer.label, repr(answer.text), f"{stats.average_tokens:.2f}", "",
                     _human(stats.flops_exact, "FLOP"), _human(stats.kv_bytes, "B"), f"{answer.prefill_seconds:.3f}"])
    wide = Layout(
        [Column("", "left"), Column("answer", "left", prose=True), Column("visual tokens/layer"),
         Column("layers: visual tokens", "left"), Column("decoder FLOPs (exact)"), Column("KV cache"), Column("prefill s")],
        [row[:3] + [", ".join(parts)] + row[4:] for row, parts in zip(rows, groups)],
    )
    narrow = Layout(
        [Column("", "left"), Column("answer", "left", prose=True), Column("tokens/\nlayer"), Column("layer\ngroups", "left"),
         Column("decoder\nFLOPs"), Column("KV\ncache"), Column("prefill\ns")],
        [row[:3] + ["\n".join(parts)] + row[4:] for row, parts in zip(rows, groups)],
        "tokens/layer: average visual tokens per decoder layer; layer groups: the visual tokens entering each run of "
        "decoder layers; FLOPs exact; prefill: median of interleaved runs",
    )
    return Fitted(title, wide, narrow)


def _print_answers(answers, title: str = "Answers") -> None:
    console.print(answers_table(answers, title))
    base = answers[0]
    for answer in answers[1:]:
        console.print(
            f"{answer.label}: decoder FLOPs x{answer.stats.flops_exact / base.stats.flops_exact:.3f}, "
            f"KV cache x{answer.stats.kv_bytes / base.stats.kv_bytes:.3f}, "
            f"prefill time x{answer.prefill_seconds / base.prefill_seconds:.3f} (median of interleaved runs)"
        )


def batch_rows_table(asked, images: list[Path]) -> Fitted:
    """``ask``'s rows of one batch with a budget per row: the budget asked, the visual tokens per layer
    kept, and the answer with and without the reduction."""
    rows = [[row.label, str(path), row.asked, f"{row.tokens:.1f}", repr(row.text), repr(row.text_all_tokens)]
            for row, path in zip(asked.rows, images)]
    wide = Layout([Column("", "left"), Column("image", "left", prose=True), Column("asked"), Column("visual tokens/layer"),
                   Column(f"answer ({asked.label})", "left", prose=True), Column("answer (all tokens)", "left", prose=True)],
                  rows)
    narrow = Layout([Column("", "left"), Column("image", "left"), Column("asked"), Column("tokens/\nlayer"),
                     Column("answer", "left", prose=True), Column("all tokens", "left", prose=True)],
                    [[row[0], Path(row[1]).name, *row[2:]] for row in rows],
                    f"answer: with {asked.label}; all tokens: the answer without reduction; tokens/layer: average "
                    "visual tokens per decoder layer")
    return Fitted(f"One batch, {asked.label}, a budget per row", wide, narrow)


def _write(output: Optional[Path], results) -> None:
    if output:
        output.write_text(json.dumps(results, indent=2))
        console.print(f"wrote {output}")


# ----------------------------------------------------------------------------- commands
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
    from .costs import plan_costs

    costs = plan_costs(method, budget, ratio, layers, tokens, frames, text_tokens, hidden, intermediate, heads, kv_heads,
                       bytes_per_element)
    solved, schedule, item = costs.plan, costs.plan.schedule, costs.item
    target = f"budget {budget}" if budget is not None else f"ratio {ratio}"
    console.print(f"[bold]{method}[/bold] at {target}: {costs.tokens} visual tokens per {item}, {layers} layers")
    steps = []
    if solved.vision is not None:
        detail = ", ".join(f"{k}={v}" for k, v in vars(solved.vision).items())
        per_frame = f" ({schedule.llm_input // frames} per frame)" if frames > 1 else ""
        entering = f"{schedule.llm_input} tokens enter the LLM{per_frame}"
        steps.append(("vision side:", f"{type(solved.vision).__name__}({detail}) -> {entering}"))
    steps += [(f"after layer {layer}:", f"keep {keep} ({type(solved.language).__name__})")
              for layer, keep in schedule.boundaries]
    if steps:
        grid = Table.grid(padding=(0, 1))
        grid.add_column(no_wrap=True)
        grid.add_column()
        for step in steps:
            grid.add_row(*map(Text, step))
        console.print(Padding(grid, (0, 0, 0, 2), expand=False))
    groups = [[_layers(first, last), str(count)] for first, last, count in layer_groups(schedule.tokens_per_layer)]
    console.print(Fitted(f"Visual tokens per {item} entering each decoder layer",
                         Layout([Column("layers", "left"), Column("visual tokens")], groups)))
    console.print(
        f"average: {schedule.average:.2f} visual tokens per layer "
        f"({1 - schedule.average / costs.tokens:.1%} fewer than {costs.tokens})"
    )
    rows = [[name, _human(r, unit), _human(f, unit), f"{r / f:.3f}"] for name, unit, r, f in costs.rows]
    console.print(Fitted(f"Decoder prefill cost, one image + {text_tokens} text tokens",
                         Layout([Column("", "left"), Column("reduced"), Column("full"), Column("ratio")], rows)))


@app.command()
def bench(
    methods: list[str] = typer.Option(
        ["duet"], metavar="<str>...", help="Methods to time (space-separated list; 'none' for only the baselines)."
    ),
    budgets: list[int] = typer.Option([192, 128, 64], metavar="<int>...", help="Budgets (space-separated list)."),
    rounds: int = typer.Option(5, help="Timed rounds; variants are interleaved within each round."),
    hidden: int = typer.Option(1024, help="Decoder width (CLIP-L tower and 32 layers are fixed)."),
    intermediate: int = typer.Option(2816, help="Decoder MLP size."),
    text_tokens: int = typer.Option(60, help="Prompt tokens besides the image."),
    threads: int = typer.Option(0, help="torch threads (0 = leave as is)."),
    family: Optional[str] = typer.Option(
        None, help="Time a family's geometry instead: llava, llava_next (672x672, 5 tiles) or video_llava (8 frames)."
    ),
    ratios: list[float] = typer.Option(
        [0.33, 0.11], metavar="<float>...", help="With --family: kept fractions of the item's tokens."
    ),
    vision_layers: int = typer.Option(24, help="Layers of the CLIP-L tower (fewer makes --family runs faster)."),
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
) -> None:
    """Time Stage A on the vision side and the prefill of each method, side by side in one run
    (or, with --generate or --train, generation end to end or a training step)."""
    import torch

    from .bench import FAMILIES, ModelSize, family_benchmark, prefill_benchmark
    from .bench.end_to_end import end_to_end

    if threads:
        torch.set_num_threads(threads)
    size = ModelSize(
        vision_layers=vision_layers, hidden=hidden, heads=max(1, hidden // 64), kv_heads=max(1, hidden // 64),
        intermediate=intermediate,
    )
    if family is not None:
        if family not in FAMILIES:
            raise ValueError(f"--family must be one of {', '.join(FAMILIES)}, got {family!r}")
        with _Bar() as bar:
            report = bar.rounds(rounds)
            results = family_benchmark(family, size, methods, ratios, rounds, progress=lambda: report(f"{family} prefill"))
        results["command"] = "duet-vlm " + " ".join(sys.argv[1:])
        _print_family(results, sum("error" not in row for row in results["variants"].values()) + len(results["ideals"]))
        _write(output, results)
    elif generate or train:
        kind = "generate" if generate else "train"
        with _Bar() as bar:
            for result in end_to_end(kind, size, methods, budgets, baselines, baseline_budgets, rounds, text_tokens, batches,
                                     tuple(new_tokens), checkpointing, output, progress=bar.rounds(rounds)):
                _print_end_to_end(result)
        if output:
            console.print(f"wrote {output}")
    else:
        with _Bar() as bar:
            results = prefill_benchmark(size, [] if methods == ["none"] else methods, budgets, rounds, text_tokens,
                                        progress=bar.rounds(rounds))
        results["command"] = "duet-vlm " + " ".join(sys.argv[1:])
        _print_prefill(results)
        _write(output, results)


def vision_table(results: dict) -> Fitted:
    """``prefill_benchmark``'s vision side: the tower and projector alone, plain and under each variant."""
    rows = [[name, f"{row['median_s']:.3f}", f"{row['ratio']:.3f}"] for name, row in results["vision"].items()]
    return Fitted(f"Vision tower + projector, {results['rounds']} interleaved rounds",
                  Layout([Column("variant", "left"), Column("median s"), Column("time vs no reduction")], rows),
                  Layout([Column("variant", "left"), Column("median s"), Column("time ×")], rows,
                         "×: the ratio to no reduction"))


def prefill_table(results: dict) -> Fitted:
    """``prefill_benchmark``'s prefill per variant: the whole forward and its language-model part (median
    seconds, ratio to no reduction), the exact FLOPs and KV-cache ratios and the visual tokens per layer."""
    rows = [
        [name, f"{row['forward_median_s']:.3f}", f"{row['forward_ratio']:.3f}", f"{row['language_model_median_s']:.3f}",
         f"{row['language_model_ratio']:.3f}", f"{row['flops_ratio']:.3f}", f"{row['kv_ratio']:.3f}", f"{row['avg_visual_tokens']:.2f}"]
        for name, row in results["prefill"].items() if "error" not in row
    ]
    wide = Layout([Column("variant", "left"), *map(Column, ("forward s", "forward ratio", "LM s", "LM ratio",
                                                            "exact FLOPs ratio", "KV ratio", "visual tok/layer"))], rows)
    narrow = Layout([Column("variant", "left"), *map(Column, ("fwd s", "fwd ×", "LM s", "LM ×", "FLOPs ×", "KV ×",
                                                              "tokens/\nlayer"))],
                    rows, "fwd: the whole forward, LM: its language-model part (median s); ×: ratio to no reduction "
                          "(FLOPs exact); tokens/layer: average visual tokens per decoder layer")
    return Fitted(f"Prefill, {results['rounds']} interleaved rounds (whole forward, and its language-model part)", wide, narrow)


def _print_prefill(results: dict) -> None:
    console.print(vision_table(results))
    console.print(prefill_table(results))
    _print_costs(results["prefill"], results)


def _print_costs(variants: dict, results: dict) -> None:
    """Each variant's selection cost against its ideal and whether it pays (``bench.prefill.costs_markdown``:
    the table ``docs/render.py`` renders from the JSON)."""
    from .bench.prefill import costs_markdown

    load = " -> ".join(f"{average[0]:.1f}" for average in results["load_average_before_after"])
    typer.echo(f"\nSelection cost against the ideal, {results['rounds']} interleaved rounds, 1-minute load average {load}")
    markdown = costs_markdown(variants, results["ideals"], results["rounds"])
    if console.is_terminal and max(map(len, markdown.splitlines())) > console.width:
        for table in end_to_end_tables(markdown):
            console.print(table)
    else:  # plain echo: markdown that a file or a wide terminal keeps as it is
        typer.echo(markdown)


def family_table(results: dict, variants: int) -> Fitted:
    """``family_benchmark``'s variants: visual tokens per layer, the forward and its language-model part
    against the unreduced model and against the ideal, and the exact FLOPs and KV-cache ratios."""
    rows = []
    for name, row in results["variants"].items():
        if "error" in row:  # _print_costs says why
            continue
        tokens = row["avg_visual_tokens"]
        rows.append([
            name, f"{tokens:.1f}" if tokens is not None else "all", f"{row['forward_s']:.3f}", f"{row['language_model_s']:.3f}",
            f"{row['lm_vs_full']:.3f}", f"{row['ideal_s']:.3f}" if "ideal_s" in row else "",
            f"{row['lm_vs_ideal']:.3f}" if "lm_vs_ideal" in row else "", f"{row['flops_ratio']:.3f}", f"{row['kv_ratio']:.3f}",
        ])
    wide = Layout([Column("variant", "left"), *map(Column, ("visual tok/layer", "forward s", "LM s", "LM vs full", "ideal LM s",
                                                            "LM vs ideal", "FLOPs ratio", "KV ratio"))], rows)
    narrow = Layout([Column("variant", "left"), *map(Column, ("tokens/\nlayer", "fwd s", "LM s", "LM ×\nfull", "ideal\nLM s",
                                                              "LM ×\nideal", "FLOPs\n×", "KV ×"))],
                    rows, "tokens/layer: average visual tokens per decoder layer; fwd: the whole forward, LM: its "
                          "language-model part (median s); ×: a ratio, to no reduction unless named (FLOPs exact)")
    return Fitted(f"{results['family']}: prefill, {results['rounds']} interleaved rounds of {variants} variants", wide, narrow)


def _print_family(results: dict, variants: int) -> None:
    console.print(family_table(results, variants))
    _print_costs(results["variants"], results)


def end_to_end_tables(markdown: str, legend: str = "") -> list[Fitted]:
    """``bench --generate`` or ``--train``'s markdown tables (a ``**mode**`` line titles the table after
    it) as tables that fit a narrow terminal."""
    tables, title, header = [], "", None
    for line in markdown.splitlines():
        if line.startswith("**"):
            title = line.strip("*")
        elif line.startswith("|") and not line.startswith("|---"):
            cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
            if header is None:
                header, rows = cells, []
                tables.append(Fitted(title, Layout([Column(header[0], "left"), *map(Column, header[1:])], rows, legend)))
            else:
                rows.append(cells)
        elif not line.strip():
            header = None
    return tables


def _print_end_to_end(result: dict) -> None:
    from .bench import generate, train

    load = " -> ".join(f"{before[0]:.1f}" for before in result["load_average_before_after"])
    typer.echo(f"\nbatch {result['batch']}, {result['rounds']} interleaved rounds, 1-minute load average {load}")
    if result["benchmark"] == "generate":
        markdown, legend = generate.markdown_table(result), "in brackets: the ratio to no reduction / to the variant's ideal"
    else:
        markdown, legend = train.markdown_table(result), "in brackets: the ratio to no reduction"
    if console.is_terminal and max(map(len, markdown.splitlines())) > console.width:
        for table in end_to_end_tables(markdown, legend):
            console.print(table)
    else:  # plain echo: markdown that a file or a wide terminal keeps as it is, ready to paste
        typer.echo(markdown)


#: Question types as the narrow accuracy table heads them.
SHORT_TYPES = {"color": "col", "shape": "shp", "count": "cnt", "exists": "ex", "relation": "rel", "quadrant": "quad"}


def accuracy_table(rows: list[dict], types: list[str], title: str) -> Fitted:
    """``duet-vlm eval``'s rows: accuracy per question type, average ± standard error, % of the full
    model's accuracy, visual tokens per layer (the realised average next to the asked budget for
    content-adaptive rows) and decoder FLOPs per sample."""
    from .evaluation import number, standard_error

    adaptive = sorted({row["adaptive"] for row in rows if row.get("adaptive")})
    wide, narrow = [], []
    for row in rows:
        scores = [f"{100 * row['accuracy']:.1f}", f"{100 * standard_error(row['accuracy'], row['n']):.1f}",
                  f"{row['retained_percent']:.1f}"]
        tokens = number(row["avg_visual_tokens"], 1)
        wide.append([row["method"] + (f" ({row['adaptive']})" if row.get("adaptive") else ""), str(row["budget"] or ""),
                     *([tokens] if adaptive else []), *(number(100 * row["per_type"].get(t, math.nan), 1) for t in types),
                     *scores, tokens, number(row["decoder_tflops_per_sample"], 4)])
        narrow.append([row["method"] + (f" {row['budget']}" if row["budget"] else ""), tokens,
                       *(number(100 * row["per_type"].get(t, math.nan), 0) for t in types), *scores,
                       _human(1e12 * row["decoder_tflops_per_sample"], "FLOP")])
    detailed = Layout([Column("method", "left"), Column("budget"), *([Column("realised tok/layer")] if adaptive else []),
                       *map(Column, types), *map(Column, ("avg", "± s.e.", "% of full", "visual tok/layer", "decoder TFLOPs"))],
                      wide)
    # narrower: method and budget in one label, question types abbreviated, whole percents per type
    head = [Column("", "left"), Column("tokens/\nlayer"), *(Column(SHORT_TYPES.get(t, t)) for t in types), Column("avg"),
            Column("±"), Column("% of\nfull")]
    per_tokens = "tokens/layer: average visual tokens per decoder layer" + (
        f" (realised by {', '.join(adaptive)}-adaptive budgets)" if adaptive else "")
    per_type = ("accuracy (%) per question type: " + ", ".join(f"{SHORT_TYPES[t]} {t}" for t in types if t in SHORT_TYPES)
                + "; ±: standard error")
    compact = Layout([*head, Column("decoder\nFLOPs")], narrow, f"{per_tokens}; {per_type}; FLOPs per sample")
    # narrowest: without FLOPs, and without tokens/layer unless budgets are adaptive (else it is the budget)
    keep = [index for index in range(len(head)) if index != 1 or adaptive]
    narrowest = Layout([head[i] for i in keep], [[row[i] for i in keep] for row in narrow],
                       f"{per_tokens}; {per_type}; each row's FLOPs are in results.md" if adaptive
                       else f"{per_type}; each row's visual tokens and FLOPs are in results.md")
    return Fitted(title, detailed, compact, narrowest)


@app.command()
def demo(
    index: int = typer.Option(3, help="Which test-split sample of the synthetic benchmark to ask about."),
    budget: int = typer.Option(64, help="DUET budget (average visual tokens per layer)."),
    output: Path = typer.Option(Path("duet_demo.png"), help="Where to write the kept-patch overlay."),
    model_path: Optional[Path] = typer.Option(None, help="A demo model directory (default: the shipped one)."),
    rounds: int = typer.Option(5, help="Interleaved prefill timing rounds."),
) -> None:
    """Ask the shipped demo model about a synthetic scene with all tokens and with DUET; draw what was kept."""
    from .demo.showcase import showcase

    shown = showcase(index, budget, output, model_path, rounds)
    sample = shown.sample
    console.print(f"[bold]question[/bold] ({sample.qtype}): {sample.question}   [bold]truth[/bold]: {sample.answer}")
    _print_answers(shown.answers)
    console.print(f"wrote {shown.overlay}")


@app.command()
def run(
    model: str = typer.Option(
        ..., help="A local path or a Hub id of a LLaVA(-NeXT, -OneVision), Video-LLaVA or Qwen2/2.5/3-VL checkpoint."
    ),
    image: Optional[list[Path]] = typer.Option(
        None, metavar="<path>", help="An image file; repeat it for a batch of images (one row each, see --budgets)."
    ),
    video: Optional[Path] = typer.Option(None, help="Instead of --image: an animated GIF/WebP or a folder of frame images."),
    prompt: str = typer.Option(..., help="The question (the model's chat template is applied)."),
    method: Optional[str] = typer.Option(
        None, help=f"One of: {', '.join(sorted(METHODS))} (default: the reducer a fine-tuned checkpoint carries, else duet)."
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
    from .compare import ask

    images = list(image or [])
    asked = ask(model, prompt, images[0] if images else None, video, method, budget, ratio, max_new_tokens, overlay, dtype,
                rounds, images=images[1:], budgets=budgets or None, ratios=ratios or None, saved_reducer=saved_reducer)
    if asked.rows:
        console.print(batch_rows_table(asked, images))
    else:
        _print_answers(asked.answers)
    if asked.overlay:
        console.print(f"wrote {asked.overlay}")


@app.command()
def calibrate(
    model: str = typer.Option(..., help="A local path or a Hub id of a supported checkpoint."),
    data: str = typer.Option(
        "synthetic:validation",
        help="Sample inputs: synthetic[:SPLIT] (the demo's generated scenes and questions), a folder of images, or a glob.",
    ),
    method: str = typer.Option("duet", help=f"One of: {', '.join(sorted(METHODS))}."),
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
    from .evaluation import calibrate_checkpoint

    result = calibrate_checkpoint(model, data, method, budget, ratio, signal, n, floor, ceiling, output, batch_size, dtype)
    asked = f"budget {budget}" if ratio is None else f"ratio {ratio}"
    console.print(f"{method} at {asked}, signal {signal}: threshold {result.threshold:.6g}", markup=False)
    console.print(
        f"over {len(result.counts)} items of {data}: asked average {result.asked:.1f}, realised {result.realised:.1f} "
        f"visual tokens per layer (items from {min(result.counts)} to {max(result.counts)})", markup=False,
    )
    if output:
        console.print(f"wrote {output}")


@app.command("eval")
def evaluate(
    methods: Optional[list[str]] = typer.Option(
        None, metavar="<str>...", help="Methods (space-separated); default: every registered one."
    ),
    budgets: list[int] = typer.Option([192, 128, 64], metavar="<int>...", help="Budgets (space-separated list)."),
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
    adaptive: Optional[str] = typer.Option(
        None, help="coverage, distinct or rank: give each image its own budget from this signal (duet_vlm.Adaptive), "
                   "calibrated on the validation split so that the average is the budget."
    ),
    threshold: Optional[float] = typer.Option(None, help="With --adaptive: this threshold instead of calibrating one."),
    calibration_n: int = typer.Option(140, help="With --adaptive: validation scenes the threshold is calibrated on."),
) -> None:
    """Accuracy of every method and budget on the synthetic visual-QA benchmark (a miniature Table 1).

    Each finished row is saved in OUTPUT_DIR/rows/ with everything that determines it (method, budget,
    position option, split, n, batch size, the weights' SHA-256), so an interrupted run picks up where it
    stopped; a row saved under other settings or other weights is computed again. With --adaptive the
    realised visual tokens per layer stand next to the asked budget; counts.png shows the distribution of
    each image's tokens."""
    from .demo.sweep import evaluate_methods

    # the command line, when this ran as one (not from Python or a test runner)
    command = " ".join(["duet-vlm", *sys.argv[1:]]) if Path(sys.argv[0]).name == "duet-vlm" else None
    with _Bar(transient=False) as bar:
        run = evaluate_methods(methods, budgets, n, split, model_path, output_dir, batch_size, control, positions, resume,
                               command, progress=bar.counter("evaluating"), adaptive=adaptive, threshold=threshold,
                               calibration_n=calibration_n)
    console.print(accuracy_table(run.rows, run.types, f"Synthetic visual QA, {split} split, {n} questions per row"))
    console.print("wrote " + ", ".join(str(p) for p in run.paths))


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
