"""Where the command line prints: its one ``console`` (tests swap it for a recording one) and what
each command prints of a library function's result, through ``tables``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.padding import Padding

from .tables import (
    NOISE_LEGEND, accuracy_table, answer_ratios, answers_table, batch_rows_table, check_table, end_to_end_tables,
    family_table, ladder_table, layer_kind_table, mark_noise, plan_costs_table, plan_steps, prefill_table,
    reproduce_table, schedule_table, vision_table,
)

console = Console()


def print_plan(costs, method: str, target: str, layers: int, frames: int, text_tokens: int) -> None:
    """``costs.plan_costs``'s result: the steps the method solved, the visual tokens per run of layers,
    their average, and the decoder's prefill costs."""
    solved, schedule, item = costs.plan, costs.plan.schedule, costs.item
    console.print(f"[bold]{method}[/bold] at {target}: {costs.tokens} visual tokens per {item}, {layers} layers")
    steps = plan_steps(solved, schedule, frames)
    if steps is not None:
        console.print(Padding(steps, (0, 0, 0, 2), expand=False))
    console.print(schedule_table(schedule, item))
    console.print(
        f"average: {schedule.average:.2f} visual tokens per layer "
        f"({1 - schedule.average / costs.tokens:.1%} fewer than {costs.tokens})"
    )
    console.print(plan_costs_table(costs.rows, text_tokens))


def print_ladder(rungs, chosen, method: str, budget: int, text_tokens: int) -> None:
    """``costs.ladder_costs``'s result: every rung of Gemma 4's ladder at the budget, the one chosen."""
    console.print(ladder_table(rungs, chosen, method, budget, text_tokens))
    if chosen.plan is None:
        console.print(f"chosen: max_soft_tokens={chosen.max_soft_tokens} ({chosen.tokens} soft tokens), no reduction")
    else:
        console.print(f"chosen: max_soft_tokens={chosen.max_soft_tokens} ({chosen.tokens} soft tokens), "
                      f"then {method} to {budget}")


def print_answers(answers, title: str = "Answers") -> None:
    """``compare``'s answers as a table, then each reduced one's costs against all tokens."""
    console.print(answers_table(answers, title))
    for line in answer_ratios(answers):
        console.print(line)


def print_shown(shown) -> None:
    """``demo.showcase``'s result: the question and its truth, the answers, the overlay written."""
    sample = shown.sample
    console.print(f"[bold]question[/bold] ({sample.qtype}): {sample.question}   [bold]truth[/bold]: {sample.answer}")
    print_answers(shown.answers)
    console.print(f"wrote {shown.overlay}")


def print_asked(asked, images: list[Path]) -> None:
    """``compare.ask``'s result: a batch's rows, or the answers; the overlay written, if any."""
    if asked.rows:
        console.print(batch_rows_table(asked, images))
    else:
        print_answers(asked.answers)
    if asked.overlay:
        console.print(f"wrote {asked.overlay}")


def print_check(report, json_path: Optional[Path]) -> None:
    """``check.check_model``'s report as a table (or, with ``--json -``, as JSON on stdout), and the
    JSON file written."""
    if json_path is not None and str(json_path) == "-":
        print(report.to_json())
        return
    console.print(check_table(report))
    for said in report.setup.get("warnings", []):
        console.print(f"warning: {said}")
    if json_path is not None:
        json_path.write_text(report.to_json())
        console.print(f"wrote {json_path}")


def print_reproduce_plan(plan) -> None:
    """``reproduce.plan``: the checkpoint, each task's data set, the cells done and the commands left."""
    console.print(f"checkpoint: {plan.model}")
    console.print("data sets (lmms-eval downloads them on first use):")
    for task, where in plan.datasets.items():
        console.print(f"  {task}: {where}")
    for note in plan.notes:
        console.print(f"note: {note}")
    done = sum(len(tasks) for tasks in plan.done.values())
    console.print(f"cells: {len(plan.cells)} settings x {len(plan.tasks)} tasks, {done} done")
    for command in plan.commands:
        console.print(command, soft_wrap=True)
    if not plan.commands:
        console.print("nothing left to run")


def print_reproduced(table: dict, written: Path) -> None:
    """``reproduce.run``'s table: each setting's scores beside the reported numbers; the file it wrote."""
    console.print(reproduce_table(table))
    console.print(f"wrote {written}")


def print_prefill(results: dict) -> None:
    """``prefill_benchmark``'s result: the vision side, the prefill, the selection costs."""
    console.print(vision_table(results))
    console.print(prefill_table(results))
    print_costs(results["prefill"], results)


def print_family(results: dict, variants: int) -> None:
    """``family_benchmark``'s result: the prefill per variant, then the selection costs."""
    console.print(family_table(results, variants))
    by_kind = layer_kind_table(results)
    if by_kind is not None:
        console.print(by_kind)
    print_costs(results["variants"], results)


def print_costs(variants: dict, results: dict) -> None:
    """Each variant's selection cost against its ideal and whether it pays (``bench.prefill.costs_markdown``:
    the table ``docs/render.py`` renders from the JSON), a cost within the run's noise said so (``mark_noise``)."""
    from ..bench.prefill import costs_markdown

    load = " -> ".join(f"{average[0]:.1f}" for average in results["load_average_before_after"])
    typer.echo(f"\nSelection cost against the ideal, {results['rounds']} interleaved rounds, 1-minute load average {load}")
    markdown, marked = mark_noise(costs_markdown(variants, results["ideals"], results["rounds"]), variants, results["ideals"])
    if console.is_terminal and max(map(len, markdown.splitlines())) > console.width:
        for table in end_to_end_tables(markdown, NOISE_LEGEND if marked else ""):
            console.print(table)
    else:  # plain echo: markdown that a file or a wide terminal keeps as it is
        typer.echo(markdown)
        if marked:
            typer.echo(NOISE_LEGEND)


def print_end_to_end(result: dict) -> None:
    """One ``bench --generate`` or ``--train`` result: its markdown, or tables where a terminal is too narrow."""
    from ..bench import generate, train

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


def print_processes(result: dict) -> None:
    """``bench --train --processes N``: its markdown, or tables where a terminal is too narrow."""
    from ..bench.processes import markdown_table

    load = " -> ".join(f"{before[0]:.1f}" for before in result["load_average_before_after"])
    typer.echo(f"\nbatch {result['batch']}, {result['threads']} threads, {result['rounds']} interleaved rounds, "
               f"1-minute load average {load}")
    markdown = markdown_table(result)
    if console.is_terminal and max(map(len, markdown.splitlines())) > console.width:
        for table in end_to_end_tables(markdown, "speed-up: 1 process's step time over the group's (its slowest rank's)"):
            console.print(table)
    else:
        typer.echo(markdown)


def print_accuracy(run, split: str, n: int) -> None:
    """``evaluate_methods``'s result: the accuracy table and the files written."""
    console.print(accuracy_table(run.rows, run.types, f"Synthetic visual QA, {split} split, {n} questions per row"))
    console.print("wrote " + ", ".join(str(p) for p in run.paths))


def write_json(output: Optional[Path], results) -> None:
    """``results`` as JSON at ``output``, if given, and say so."""
    if output:
        output.write_text(json.dumps(results, indent=2))
        console.print(f"wrote {output}")
