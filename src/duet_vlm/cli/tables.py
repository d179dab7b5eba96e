"""The command line's tables, built from plain strings and laid out when printed, for the width they
are printed at: the first of a table's layouts (most detailed first) in which every name and number
fits on one line, else one block per row ("header  value" lines). Only prose (an answer, a path)
wraps, between words.

Nothing here prints, and nothing imports the library at import time: each function turns what a
library function returned into a ``Fitted`` table (or a string), and ``printing`` prints it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from itertools import groupby
from pathlib import Path
from typing import Optional, Sequence

from rich import box
from rich.cells import cell_len
from rich.console import Console, ConsoleOptions
from rich.measure import Measurement
from rich.table import Table
from rich.text import Text


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
    """``[(first_layer, last_layer, count), ...]`` (1-based layers) for runs of equal counts.

    >>> layer_groups([5, 5, 3, 0, 0])
    [(1, 2, 5), (3, 3, 3), (4, 5, 0)]
    """
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


# ----------------------------------------------------------------------------- plan, demo, run
def plan_steps(solved, schedule, frames: int) -> Optional[Table]:
    """``plan``'s steps: what the vision side keeps, then what each boundary keeps; ``None`` when the
    method has neither."""
    steps = []
    if solved.vision is not None:
        detail = ", ".join(f"{k}={v}" for k, v in vars(solved.vision).items())
        per_frame = f" ({schedule.llm_input // frames} per frame)" if frames > 1 else ""
        entering = f"{schedule.llm_input} tokens enter the LLM{per_frame}"
        steps.append(("vision side:", f"{type(solved.vision).__name__}({detail}) -> {entering}"))
    steps += [(f"after layer {layer}:", f"keep {keep} ({type(solved.language).__name__})")
              for layer, keep in schedule.boundaries]
    if not steps:
        return None
    grid = Table.grid(padding=(0, 1))
    grid.add_column(no_wrap=True)
    grid.add_column()
    for step in steps:
        grid.add_row(*map(Text, step))
    return grid


def schedule_table(schedule, item: str) -> Fitted:
    """``plan``'s visual tokens entering each run of decoder layers."""
    groups = [[_layers(first, last), str(count)] for first, last, count in layer_groups(schedule.tokens_per_layer)]
    return Fitted(f"Visual tokens per {item} entering each decoder layer",
                  Layout([Column("layers", "left"), Column("visual tokens")], groups))


def plan_costs_table(rows, text_tokens: int) -> Fitted:
    """``plan``'s decoder prefill costs (``costs.PlanCosts.rows``), reduced against full."""
    cells = [[name, _human(r, unit), _human(f, unit), f"{r / f:.3f}"] for name, unit, r, f in rows]
    return Fitted(f"Decoder prefill cost, one image + {text_tokens} text tokens",
                  Layout([Column("", "left"), Column("reduced"), Column("full"), Column("ratio")], cells))


def ladder_table(rungs, chosen, method: str, budget: int, text_tokens: int) -> Fitted:
    """``plan --ladder``: each rung of Gemma 4's ladder at ``budget`` (``costs.ladder_costs``), its
    soft tokens, what the method does there, and the prefill's FLOPs (tower, decoder) and KV bytes;
    ``*`` marks the rung chosen."""
    rows = []
    for rung in rungs:
        if rung.unreachable is not None:
            what = "cannot"
        elif rung.plan is None:
            what = "as is"
        else:
            what = f"to {budget}"
        mark = "*" if rung is chosen else ""
        costs = ["", "", "", ""] if rung.unreachable is not None else [
            _human(rung.encoder_flops, "FLOP"), _human(rung.decoder_flops, "FLOP"), _human(rung.total_flops, "FLOP"),
            _human(rung.kv_bytes, "B"),
        ]
        rows.append([f"{mark}{rung.max_soft_tokens}", str(rung.tokens), what, *costs])
    wide = Layout([Column("max_soft_tokens", "left"), Column("soft tokens"), Column("then", "left"), Column("tower"),
                   Column("decoder"), Column("total"), Column("KV cache")], rows,
                  f"* the rung chosen: the cheapest whose image has at least {budget} soft tokens")
    narrow = Layout([Column("rung", "left"), Column("tokens"), Column("then", "left"), Column("tower"), Column("LM"),
                     Column("total"), Column("KV")], rows,
                    f"rung: max_soft_tokens; tokens: soft tokens; tower, LM, total: prefill FLOPs; * chosen: the "
                    f"cheapest with at least {budget} soft tokens")
    return Fitted(f"Gemma 4's soft-token ladder, {method} at budget {budget}, one square image + {text_tokens} text "
                  "tokens (then: what the method does; cannot: no schedule of its shape averages the budget there)",
                  wide, narrow)


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


def answer_ratios(answers) -> list[str]:
    """Each answer after the first against the first: decoder FLOPs, KV cache and prefill time."""
    base = answers[0]
    return [
        f"{answer.label}: decoder FLOPs x{answer.stats.flops_exact / base.stats.flops_exact:.3f}, "
        f"KV cache x{answer.stats.kv_bytes / base.stats.kv_bytes:.3f}, "
        f"prefill time x{answer.prefill_seconds / base.prefill_seconds:.3f} (median of interleaved runs)"
        for answer in answers[1:]
    ]


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


# ----------------------------------------------------------------------------- check
def check_table(report) -> Fitted:
    """``check.check_model``'s report: one row per check, its result and what it measured."""
    setup = report.setup
    rows = [[result.key.replace("mode:", "mode: ").replace("_", " "),
             result.status.upper() if result.status == "fail" else result.status, result.detail]
            for result in report.results]
    failed = len(report.failed)
    title = (f"duet-vlm check: {setup['method']} on {setup['family']} ({setup['attention']}, {setup['dtype']}, "
             f"{setup['device']}): " + (f"{failed} failed" if failed else "every check passed"))
    wide = Layout([Column("check", "left"), Column("result", "left"), Column("numbers", "left", prose=True)], rows)
    narrow = Layout([Column("check", "left", prose=True), Column("", "left"), Column("numbers", "left", prose=True)], rows)
    return Fitted(title, wide, narrow)


def _reproduced_cell(ours, reported, tolerance, within) -> str:
    if ours is None:
        return "-"
    text = f"{ours:.1f}"
    if reported is not None:
        text += f" ({reported:g}±{tolerance:g} {'ok' if within else 'off'})"
    return text


def reproduce_table(table: dict) -> Fitted:
    """``reproduce.run``'s table: per setting and task our score, and the reported one with its
    tolerance (``ok``: within it); the average accuracy retained likewise."""
    rows: list[list[str]] = []
    columns = [entry["column"] for entry in table["rows"][0]["entries"]] if table["rows"] else []
    for row in table["rows"]:
        cells = [_reproduced_cell(e["ours"], e["reported"], e["tolerance"], e["within"]) for e in row["entries"]]
        cells.append(_reproduced_cell(row["average_retained"], row["reported_average"], row["average_tolerance"],
                                      row["average_within"]))
        rows.append([row["cell"], *cells])
    header = [Column("setting", "left"), *(Column(c) for c in columns), Column("avg retained %")]
    limit = f", at most {table['limit']} items per task (not the paper's)" if table.get("limit") else ""
    return Fitted(f"{table.get('model', 'the model')} on lmms-eval{limit}; (reported±tolerance ok/off)",
                  Layout(header, rows))


# ----------------------------------------------------------------------------- bench
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


def family_table(results: dict, variants: int) -> Fitted:
    """``family_benchmark``'s variants: visual tokens per layer, the forward and its language-model part
    against the unreduced model and against the ideal, and the exact FLOPs and KV-cache ratios."""
    rows = []
    for name, row in results["variants"].items():
        if "error" in row:  # the selection-cost table says why
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


def layer_kind_table(results: dict) -> Fitted | None:
    """A hybrid decoder's ``family_benchmark`` by kind of layer: each kind's seconds (median) and
    their ratio to no reduction and to the variant's ideal, with the exact FLOPs and cache ratios
    of that kind (``None`` when every layer attends)."""
    rows = []
    for name, row in results["variants"].items():
        if "layer_kind_s" not in row:
            continue
        for kind, seconds in row["layer_kind_s"].items():
            ideal = row.get("layer_kind_vs_ideal", {}).get(kind)
            rows.append([name, kind.replace("_", " "), f"{seconds:.3f}", f"{row['layer_kind_vs_full'][kind]:.3f}",
                         f"{ideal:.3f}" if ideal is not None else "", f"{row['layer_kind_flops_ratio'][kind]:.3f}",
                         f"{row['layer_kind_cache_ratio'][kind]:.3f}"])
    if not rows:
        return None
    header = ("layers", "s", "× full", "× ideal", "FLOPs ×", "cache ×")
    wide = Layout([Column("variant", "left"), Column(header[0], "left"), *map(Column, header[1:])], rows)
    return Fitted("By kind of decoder layer (median s in each kind's layers; ×: ratio)", wide, wide)


def end_to_end_tables(markdown: str, legend: str = "") -> list[Fitted]:
    """``bench --generate`` or ``--train``'s markdown tables (a ``**mode**`` line titles the table after
    it) as tables that fit a narrow terminal."""
    tables, title, header = [], "", None
    for line in markdown.splitlines():
        if line.startswith("**"):
            title = line.strip("*")
        elif line.startswith("|") and not line.startswith("|---"):
            cells = _cells(line)
            if header is None:
                header, rows = cells, []
                tables.append(Fitted(title, Layout([Column(header[0], "left"), *map(Column, header[1:])], rows, legend)))
            else:
                rows.append(cells)
        elif not line.strip():
            header = None
    return tables


def _cells(line: str) -> list[str]:
    """The cells of one row of a markdown table."""
    return [cell.strip() for cell in line.strip().strip("|").split("|")]


#: Said under the selection-cost table when a cost in it is marked as noise.
NOISE_LEGEND = ("within noise: the selection cost (forward minus its ideal, median of the rounds) is no larger "
                "than the spread (max - min) of the round-to-round forward times of the variant or of its ideal, or "
                "negative in a single round; the JSON keeps the number")


def round_spread(row: dict, ideals: dict) -> Optional[float]:
    """The noise a variant's selection cost is read against: the larger spread (max - min) of its own
    per-round forward seconds and of its ideal's (``measure``'s ``forward_rounds_s``); ``None`` with
    fewer than two rounds, or in a file written without them.

    >>> round_spread({"ideal": "i", "forward_rounds_s": [1.0, 1.5, 1.25]}, {"i": {"forward_rounds_s": [1.0, 1.125]}})
    0.5
    >>> round_spread({"ideal": "i", "forward_rounds_s": [1.0]}, {"i": {"forward_rounds_s": [0.9]}}) is None
    True
    """
    ideal = ideals.get(row.get("ideal"), {})
    spreads = [max(times) - min(times) for times in (row.get("forward_rounds_s"), ideal.get("forward_rounds_s"))
               if times and len(times) > 1]
    return max(spreads) if spreads else None


def selection_cost_cell(row: dict, ideals: dict) -> Optional[str]:
    """What the selection-cost table says instead of a variant's ``selection_cost_s`` when the run
    cannot tell it from noise, ``None`` when the number stands: a cost whose magnitude is within the
    rounds' spread (``round_spread``) is within noise; a negative cost (faster than the same token
    counts chosen for free) is never a result: within noise when no spread was measured (one round),
    else the variant's path beat its ideal's by more than the noise.

    >>> ideals = {"i": {"forward_rounds_s": [1.00, 1.04]}}
    >>> selection_cost_cell({"ideal": "i", "selection_cost_s": -0.02, "forward_rounds_s": [1.0, 1.01]}, ideals)
    'within noise (spread 0.040)'
    >>> selection_cost_cell({"ideal": "i", "selection_cost_s": 0.30, "forward_rounds_s": [1.3, 1.35]}, ideals) is None
    True
    """
    cost, spread = row["selection_cost_s"], round_spread(row, ideals)
    if spread is not None and abs(cost) <= spread:
        return f"within noise (spread {spread:.3f})"
    if cost < 0:
        return "within noise (one round)" if spread is None else "< 0: faster than its ideal"
    return None


def mark_noise(markdown: str, variants: dict, ideals: dict) -> tuple[str, bool]:
    """``bench.prefill.costs_markdown``'s table with each selection cost the run cannot tell from noise
    said so (``selection_cost_cell``) instead of printed as a result, and its share of the saving left
    out; returns the table and whether a cost was marked. Only the printed table changes: the JSON
    keeps every number."""
    lines = markdown.splitlines()
    header = _cells(lines[0])
    cost, share = header.index("selection cost s"), header.index("cost / saving")
    marked = False
    for index, line in enumerate(lines[2:], 2):
        cells = _cells(line)
        row = variants.get(cells[0])
        if not row or "selection_cost_s" not in row:
            continue
        cell = selection_cost_cell(row, ideals)
        if cell is not None:
            cells[cost], cells[share], marked = cell, "—", True
            lines[index] = "| " + " | ".join(cells) + " |"
    return "\n".join(lines), marked


# ----------------------------------------------------------------------------- eval
#: Question types as the narrow accuracy table heads them.
SHORT_TYPES = {"color": "col", "shape": "shp", "count": "cnt", "exists": "ex", "relation": "rel", "quadrant": "quad"}


def accuracy_table(rows: list[dict], types: list[str], title: str) -> Fitted:
    """``duet-vlm eval``'s rows: accuracy per question type, average ± standard error, % of the full
    model's accuracy, visual tokens per layer (the realised average next to the asked budget for
    content-adaptive rows) and decoder FLOPs per sample."""
    from ..evaluation import number, standard_error

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
