"""Terminal output that fits: every command's tables and ``--help`` at 80 columns (and 120), from small
fixed inputs, with no line over the width and no name, number or word broken across lines."""

import doctest
import io
import math
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import typer
from rich.console import Console
from typer.testing import CliRunner

from duet_vlm import cli
from duet_vlm.cli import printing, tables

WIDTHS = (80, 120)
ANSI = re.compile(r"\x1b\[[0-9;]*m")
BORDERS = re.compile(r"[│╭╮╰╯─]")


def _console(width: int) -> Console:
    return Console(width=width, file=io.StringIO(), record=True, color_system=None)


def _printed(width: int, print_it) -> str:
    """What ``print_it()`` prints through the command line's console, at ``width`` columns."""
    console, printing.console = printing.console, _console(width)
    try:
        print_it()
        return printing.console.export_text()
    finally:
        printing.console = console


def _rendered(table: cli.Fitted, width: int) -> str:
    console = _console(width)
    console.print(table)
    return console.export_text()


def _fits(text: str, width: int, values) -> None:
    """No line over ``width``, nothing cut off, and each value on one line (a value of several lines:
    each of its lines)."""
    lines = text.splitlines()
    assert max(map(len, lines)) <= width, text
    assert "…" not in text, text
    for value in values:
        for part in value.split("\n"):
            assert any(part in line for line in lines), f"{part!r} is broken or missing in\n{text}"


def _laid_out(table: cli.Fitted, width: int) -> str:
    """``table`` at ``width``, checked: its names and numbers each on one line, its prose word by word."""
    text = _rendered(table, width)
    layout = table.choose(_console(width), width) or table.layouts[0]
    words = set(text.split())
    for row in layout.rows:
        for column, cell in zip(layout.columns, row):
            if column.prose:
                assert set(cell.split()) <= words, f"{cell!r} lost a word in\n{text}"
            else:
                _fits(text, width, [cell])
    _fits(text, width, [])
    return text


def _stats(per_layer, flops, kv):
    return SimpleNamespace(tokens_per_layer=per_layer, average_tokens=sum(per_layer) / len(per_layer), flops_exact=flops,
                           kv_bytes=kv)


ANSWERS = [  # `duet-vlm demo` on the shipped model
    SimpleNamespace(label="all tokens", text="yes", stats=_stats([576] * 32, 6.28e9, 14.43e6), prefill_seconds=2.213),
    SimpleNamespace(label="DUET 64", text="yes", stats=_stats([102] * 16 + [51] * 8 + [0] * 8, 574.85e6, 1.84e6),
                    prefill_seconds=1.404),
]


@pytest.mark.parametrize("width", WIDTHS)
def test_the_demo_table_keeps_every_value_on_one_line(width):
    """Today's demo table at 80 columns wrapped every cell: ``574.85`` over ``MFLOP``, ``1-16:`` over
    ``102,``, its headers cut to ``tokens/l…``."""
    text = _printed(width, lambda: printing.print_answers(ANSWERS))
    _fits(text, width, ["all tokens", "DUET 64", "'yes'", "576.00", "63.75", "1-32: 576", "1-16: 102", "17-24: 51", "25-32: 0",
                        "6.28 GFLOP", "575 MFLOP", "14.4 MB", "1.84 MB", "2.213", "1.404"])
    assert len(text.splitlines()) <= 14, text
    assert "DUET 64: decoder FLOPs x0.092, KV cache x0.128, prefill time x0.634" in " ".join(text.split())


def test_wide_terminals_get_the_table_on_one_line_per_row():
    text = _printed(120, lambda: printing.print_answers(ANSWERS))
    assert any("DUET 64" in line and "1-16: 102, 17-24: 51, 25-32: 0" in line and "1.404" in line for line in text.splitlines())


@pytest.mark.parametrize("width", WIDTHS)
def test_a_long_answer_wraps_between_words_and_a_table_too_wide_becomes_blocks(width):
    answers = [
        SimpleNamespace(label="all tokens", text="The image shows a red circle next to a blue square on a white [background]",
                        stats=ANSWERS[0].stats, prefill_seconds=12.5),
        SimpleNamespace(label="pyramiddrop ratio 0.11", text="A red circle and a blue square.",
                        stats=_stats([576] * 8 + [288] * 8 + [144] * 8 + [72] * 8, 3.3e12, 1.2e8), prefill_seconds=3.25),
    ]
    text = _laid_out(cli.answers_table(answers), width)
    assert "[background]'" in text  # brackets are text, not rich markup
    table = cli.answers_table(answers)
    assert (table.choose(_console(width), width) is None) == (width == 80)  # 80: one block per row
    _fits(_rendered(cli.Fitted("narrow", *table.layouts), 40), 40, ["pyramiddrop ratio 0.11", "3.30 TFLOP", "12.500"])


@pytest.mark.parametrize("width", WIDTHS)
def test_a_batch_with_a_budget_per_row(width):
    asked = SimpleNamespace(label="visionzip", rows=[
        SimpleNamespace(label="row 0", asked="32", tokens=32.0, text="red", text_all_tokens="red"),
        SimpleNamespace(label="row 1", asked="96", tokens=96.0, text="a blue circle", text_all_tokens="a blue circle"),
    ])
    images = [Path("/data/some/rather/long/folder/of/scenes/scene_000.png"), Path("scenes/scene_001.png")]
    text = _laid_out(cli.batch_rows_table(asked, images), width)
    _fits(text, width, ["scene_000.png", "96.0"])


def _row(method, budget, accuracy, tokens, tflops, **extra):
    per_type = {t: accuracy for t in ("color", "shape", "count", "exists", "relation", "quadrant", "read")}
    return {"method": method, "budget": budget, "accuracy": accuracy, "per_type": per_type, "n": 504,
            "avg_visual_tokens": tokens, "decoder_tflops_per_sample": tflops, "retained_percent": 100 * accuracy / 0.808,
            **extra}


EVAL_ROWS = [
    _row("full", None, 0.808, 576.0, 0.0063),
    _row("duet", 192, 0.756, 191.75, 0.0018),
    _row("pyramiddrop", 64, 0.599, 63.88, 0.000587),
    _row("blank image", None, 0.242, math.nan, math.nan),
]


@pytest.mark.parametrize("width", WIDTHS)
@pytest.mark.parametrize("adaptive", [False, True])
def test_the_eval_table(width, adaptive):
    rows = [dict(row, adaptive="coverage") if adaptive and row["budget"] else row for row in EVAL_ROWS]
    table = cli.accuracy_table(rows, ["color", "shape", "count", "exists", "relation", "quadrant", "read"],
                               "Synthetic visual QA, test split, 504 questions per row")
    assert table.choose(_console(width), width) is not None  # a table, not blocks
    text = _laid_out(table, width)
    _fits(text, width, ["pyramiddrop 64", "75.6", "100.0"])
    assert "nan" not in text  # the blank image has no visual tokens: an empty cell


BENCH = {
    "rounds": 5,
    "vision": {"no reduction": {"median_s": 1.234, "ratio": 1.0}, "duet 64 (hooks)": {"median_s": 1.25, "ratio": 1.013},
               "eager + attention maps": {"median_s": 1.9, "ratio": 1.54}},
    "prefill": {name: {"forward_median_s": 12.345, "forward_ratio": 0.512, "language_model_median_s": 11.111,
                       "language_model_ratio": 0.333, "flops_ratio": 0.312, "kv_ratio": 0.334, "avg_visual_tokens": 191.75}
                for name in ("no reduction", "duet 192", "pyramiddrop 192", "sparsevlm 64")},
}
FAMILY = {"family": "llava_next", "rounds": 3, "variants": {
    "no reduction": {"forward_s": 21.6295, "language_model_s": 20.4825, "lm_vs_full": 1.0, "flops_ratio": 1.0, "kv_ratio": 1.0,
                     "avg_visual_tokens": None},
    "duet ratio 0.33": {"forward_s": 7.5101, "language_model_s": 6.2064, "lm_vs_full": 0.3047, "flops_ratio": 0.3089,
                        "kv_ratio": 0.3435, "avg_visual_tokens": 966.25, "ideal_s": 6.0264, "lm_vs_ideal": 1.0285},
}}


@pytest.mark.parametrize("width", WIDTHS)
def test_the_bench_tables(width):
    for table in (cli.vision_table(BENCH), cli.prefill_table(BENCH), cli.family_table(FAMILY, 5)):
        assert table.choose(_console(width), width) is not None
        _laid_out(table, width)
    _fits(_rendered(cli.family_table(FAMILY, 5), width), width, ["21.630", "0.305", "966.2", "1.028"])


MARKDOWN = """**checkpointing**

| variant | visual tok/layer | step s | forward s | backward s | optimizer s | peak MB | step vs full | spread |
|---|---|---|---|---|---|---|---|---|
| no reduction | 576.0 | 36.81 | 13.41 | 23.03 | 0.38 | 2648 (1.00) | 1.000 | 0.00 |
| duet 64 | 63.8 | 12.68 | 6.88 | 5.34 | 0.39 | 2083 (0.78) | 0.344 | 0.01 |

**off**

| variant | visual tok/layer | step s | forward s | backward s | optimizer s | peak MB | step vs full | spread |
|---|---|---|---|---|---|---|---|---|
| no reduction | 576.0 | 30.00 | 13.41 | 23.03 | 0.38 | 2648 (1.00) | 1.000 | 0.00 |"""


@pytest.mark.parametrize("width", WIDTHS)
def test_bench_generate_and_train_markdown_in_a_narrow_terminal(width):
    tables = cli.end_to_end_tables(MARKDOWN, "in brackets: the ratio to no reduction")
    assert [table.title for table in tables] == ["checkpointing", "off"] and len(tables[0].layouts[0].rows) == 2
    for table in tables:
        _laid_out(table, width)


@pytest.mark.parametrize("width", WIDTHS)
@pytest.mark.parametrize("args", [["--budget", "192"], ["--method", "visionzip", "--ratio", "0.11", "--tokens", "257", "--frames", "8"]])
def test_plan(width, args):
    result = []
    text = _printed(width, lambda: result.append(CliRunner().invoke(cli.app, ["plan", *args])))
    assert result[0].exit_code == 0, result[0].output
    _fits(text, width, ["1.29 TFLOP", "3.31 TFLOP", "0.389", "132 MB"] if args[0] == "--budget" else ["224", "1.11 GB"])


def _help(command: list[str], width: int) -> str:
    result = CliRunner().invoke(cli.app, [*command, "--help"], env={"COLUMNS": str(width)})
    assert result.exit_code == 0, result.output
    return ANSI.sub("", result.output)


def _ragged(lines: list[str], width: int) -> list[str]:
    """Lines a greedy wrap would not have broken: the next line's first word fits after them. ``lines``
    are one column of text, continuation lines starting where the first one does."""
    broken = []
    for line, after in zip(lines, lines[1:]):
        if line.strip() and after.strip() and len(line.rstrip()) + 1 + len(after.split()[0]) <= width:
            broken.append(f"{line.rstrip()!r} / {after.strip()!r}")
    return broken


COMMANDS = [name for name in typer.main.get_command(cli.app).commands if name not in ("train", "train-demo")]


@pytest.mark.parametrize("width", WIDTHS)
@pytest.mark.parametrize("command", [[], *([name] for name in COMMANDS)], ids=lambda c: " ".join(c) or "duet-vlm")
def test_help_wraps_cleanly(command, width):
    """(``train`` and ``train-demo`` print argparse's help of their config dataclass instead.)"""
    text = _help(command, width)
    lines = text.splitlines()
    assert max(map(len, lines)) <= width, text
    assert "…" not in text, text
    group = typer.main.get_command(cli.app)
    target = group.commands[command[0]] if command else group
    words = set(BORDERS.sub(" ", text).split())
    for help_text in [target.help or "", *(getattr(param, "help", None) or "" for param in target.params)]:
        assert set(help_text.split()) <= words, sorted(set(help_text.split()) - words)
    # the description above the panels: paragraphs reflowed to the width (rich pads one column each side)
    description = lines[:next(i for i, line in enumerate(lines) if line.startswith("╭"))]
    assert not _ragged([line[1:] for line in description], width - 2), text
    if not command:  # the commands panel: each command's summary reflowed in its column
        panel = [line[1:-1] for line in lines if line.startswith("│")]
        panel = panel[next(i for i, line in enumerate(panel) if line.strip().startswith("plan")):]
        start = panel[0].index("Print")
        summaries = [line[start:] for line in panel]
        rows = [[]]
        for line, summary in zip(panel, summaries):
            if line[:start].strip() and rows[-1]:
                rows.append([])
            rows[-1].append(summary)
        for row in rows:
            assert not _ragged(row, len(summaries[0]) - 1), text


def test_the_layout_docstring():
    finder, runner = doctest.DocTestFinder(), doctest.DocTestRunner()
    for test in finder.find(tables.Fitted, "Fitted", globs=vars(tables)):
        runner.run(test)
    assert runner.failures == 0


@pytest.mark.parametrize("width", WIDTHS)
def test_the_check_and_reproduce_tables(width):
    """``duet-vlm check``'s report and ``duet-vlm reproduce``'s table, from fixed inputs."""
    from duet_vlm.check.report import Report, Result

    report = Report({"method": "duet", "family": "llava", "attention": "flash_attention_2", "dtype": "bfloat16",
                     "device": "cuda"},
                    [Result("full", "", "pass", "bit-identical"),
                     Result("mode:prompt_lookup", "", "n/a", "the unpatched model fails it on this prompt too: Image "
                            "features and image tokens do not match, tokens: 578, features: 55296"),
                     Result("ideal", "", "fail", "max logit difference 0.0412 over 30 positions (allowed 0.03)")], {})
    text = _laid_out(cli.check_table(report), width)
    assert "1 failed" in " ".join(text.split()) and "FAIL" in text
    entry = {"task": "gqa", "column": "GQA", "ours": 59.12, "reported": 59.3, "tolerance": 1.0, "within": True}
    table = {"model": "llava-hf/llava-1.5-7b-hf", "limit": None, "rows": [
        {"cell": "visionzip-192", "entries": [entry, {**entry, "task": "mme", "column": "MME", "ours": 1790.4,
                                                       "reported": 1782, "tolerance": 40.0}],
         "average_retained": 97.1, "reported_average": 97.7, "average_tolerance": 1.5, "average_within": True}]}
    text = _laid_out(cli.reproduce_table(table), width)
    assert "59.1" in text and "1790.4" in text
