"""``duet-vlm reproduce``: the DUET paper's LLaVA-1.5-7B table, every method at 192/128/64, through the
lmms-eval plugin (``duet_llava_hf``), with the reported numbers and a tolerance beside each cell.

A cell is one method at one budget on one lmms-eval task; its scores are written to
``OUT/cells/METHOD-BUDGET/TASK.json`` when its run ends, so a run that stops resumes with the cells
it has not finished (each method and budget loads the model once for the tasks it still lacks).
``plan`` lists what a run would load, download and run without loading anything but lmms-eval's
task index (``--dry-run``).

What was reported, and where from (``REPORTED``, ``REPORTED_AVERAGE``): the DUET paper's per-
benchmark rows were not retrievable when this was written; its README and project page give the
average accuracy retained for DUET, VisionZip and PyramidDrop at 192/128/64 ("avg of 5
benchmarks", which five is not said). Per-benchmark rows of the unreduced model and of the
baselines are the ocy1/PIO-FVLM README's table (the original LLaVA evaluation scripts on the
original checkpoint; FastV's rows there are disputed as too low, see the docs). lmms-eval on the
llava-hf conversion differs from those scripts by about a point, hence the tolerances.
"""

from __future__ import annotations

import json
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

MODEL = "llava-hf/llava-1.5-7b-hf"
BUDGETS = (192, 128, 64)
METHODS = ("duet", "visionzip", "pyramiddrop", "fastv", "sparsevlm", "dart", "pio")


@dataclass(frozen=True)
class Benchmark:
    """One column: the lmms-eval ``task``, the result keys summed into it (MME: perception plus
    cognition) times ``scale`` (to the paper's units), and how far a cell may land from the
    reported number and still count as reproduced."""

    task: str
    column: str
    metrics: tuple[str, ...]
    scale: float
    tolerance: float
    note: str = ""


BENCHMARKS = (
    Benchmark("gqa", "GQA", ("exact_match,none",), 100.0, 1.0),
    Benchmark("mmbench_en_dev", "MMB", ("gpt_eval_score,none",), 1.0, 1.5,
              "lmms-eval scores MMBench-dev's answers with an OpenAI model: set OPENAI_API_KEY"),
    Benchmark("mme", "MME", ("mme_perception_score,none", "mme_cognition_score,none"), 1.0, 40.0),
    Benchmark("pope", "POPE", ("pope_f1_score,none",), 100.0, 1.0),
    Benchmark("scienceqa_img", "SQA", ("exact_match,none",), 100.0, 1.0),
    Benchmark("vqav2_val", "VQAv2", ("exact_match,none",), 100.0, 1.0,
              "the paper's VQAv2 is test-dev (an evaluation server); lmms-eval scores the validation split here"),
    Benchmark("textvqa_val", "TextVQA", ("exact_match,none",), 100.0, 1.0),
)
#: How far a row's average accuracy retained (in points of %) may land from the reported one.
AVERAGE_TOLERANCE = 1.5

_COLUMNS = ("GQA", "MMB", "MME", "POPE", "SQA", "VQAv2", "TextVQA")


def _row(*values) -> dict[str, float]:
    return dict(zip(_COLUMNS, values))


#: ``(method, budget)`` (``budget`` ``None`` for the unreduced model) -> the reported numbers, from the
#: ocy1/PIO-FVLM README's LLaVA-1.5-7B table (verified there; SparseVLM is its ICML version, PIO/TRIO
#: its encoder-involved rows, as this library's ``pio`` runs both sides).
REPORTED: dict[tuple[str, Optional[int]], dict[str, float]] = {
    ("full", None): _row(61.9, 64.7, 1862, 85.9, 69.5, 78.5, 58.2),
    ("fastv", 192): _row(52.7, 61.2, 1612, 64.8, 67.3, 67.1, 52.5),
    ("fastv", 128): _row(49.6, 56.1, 1490, 59.6, 60.2, 61.8, 50.6),
    ("fastv", 64): _row(46.1, 48.0, 1256, 48.0, 51.1, 55.0, 47.8),
    ("pyramiddrop", 192): _row(57.1, 63.2, 1766, 82.3, 68.8, 75.1, 56.1),
    ("pyramiddrop", 128): _row(56.0, 61.1, 1644, 82.3, 68.3, 72.9, 55.1),
    ("pyramiddrop", 64): _row(41.9, 33.3, 1092, 55.9, 68.6, 69.2, 45.9),
    ("sparsevlm", 192): _row(59.5, 64.1, 1787, 85.3, 68.7, 75.6, 57.8),
    ("sparsevlm", 128): _row(58.4, 64.5, 1746, 85.0, 68.6, 73.8, 56.7),
    ("sparsevlm", 64): _row(53.8, 60.1, 1589, 77.5, 69.8, 68.2, 53.4),
    ("dart", 192): _row(60.0, 63.6, 1856, 82.8, 69.8, 76.7, 57.4),
    ("dart", 128): _row(58.7, 63.2, 1840, 80.1, 69.1, 75.9, 56.4),
    ("dart", 64): _row(55.9, 60.6, 1765, 73.9, 69.8, 72.4, 54.4),
    ("visionzip", 192): _row(59.3, 63.0, 1782, 85.3, 68.9, 76.8, 57.3),
    ("visionzip", 128): _row(57.6, 62.0, 1761.7, 83.2, 68.9, 75.6, 56.8),
    ("visionzip", 64): _row(55.1, 60.1, 1690, 77.0, 69.0, 72.4, 55.5),
    ("pio", 192): _row(61.1, 64.2, 1808, 86.4, 68.2, 77.9, 57.4),
    ("pio", 128): _row(60.0, 62.9, 1799, 86.4, 69.2, 77.1, 57.0),
    ("pio", 64): _row(58.3, 61.6, 1744, 86.4, 68.6, 75.9, 56.2),
}
#: Average accuracy retained (% of the unreduced model), from the DUET README and project page.
REPORTED_AVERAGE: dict[tuple[str, int], float] = {
    ("duet", 192): 99.0, ("duet", 128): 98.1, ("duet", 64): 95.4,
    ("visionzip", 192): 97.7, ("visionzip", 128): 96.3, ("visionzip", 64): 92.8,
    ("pyramiddrop", 192): 96.4, ("pyramiddrop", 128): 95.6, ("pyramiddrop", 64): 86.7,
}


@dataclass(frozen=True)
class Cell:
    method: str
    budget: Optional[int]  # None: the unreduced model

    @property
    def name(self) -> str:
        return self.method if self.budget is None else f"{self.method}-{self.budget}"

    def model_args(self, model: str, device: str, dtype: str, extra: str = "") -> str:
        """``duet_llava_hf``'s ``--model_args`` for this setting (``extra``: more, comma-separated)."""
        budget = "" if self.budget is None else f",budget={self.budget}"
        return f"pretrained={model},method={self.method}{budget},device={device},dtype={dtype}" + (f",{extra}" if extra else "")


@dataclass
class Plan:
    """What a run would do: the checkpoint, each task's data set, and the cells still to run."""

    model: str
    tasks: list[str]
    datasets: dict[str, str]
    cells: list[Cell]
    done: dict[str, list[str]]  # cell name -> its tasks already finished
    commands: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def cells(methods: tuple[str, ...], budgets: tuple[int, ...]) -> list[Cell]:
    """The unreduced model first, then every method at every budget."""
    from ..methods import METHODS as REGISTERED

    unknown = [m for m in methods if m not in REGISTERED or m == "full"]
    if unknown:
        raise ValueError(f"--methods: {', '.join(unknown)} (registered: {', '.join(sorted(REGISTERED))}; full always runs)")
    for budget in budgets:
        if budget < 1:
            raise ValueError(f"--budgets: a budget is at least 1, got {budget}")
    return [Cell("full", None)] + [Cell(m, b) for m in methods for b in budgets]


def _task_manager(include_path: Optional[Path]):
    try:
        from lmms_eval.tasks import TaskManager
    except ImportError as error:
        raise ImportError("duet-vlm reproduce runs lmms-eval: install the extra (docs/lmms-eval.md), "
                          "pip install 'duet-vlm[lmms-eval]'") from error

    if include_path is not None:
        return TaskManager(include_path=str(include_path), include_defaults=False)
    return TaskManager()


def _datasets(manager, tasks: list[str]) -> dict[str, str]:
    """Each task's data set as lmms-eval's task index names it (what the run downloads), read with
    ``TaskManager._get_config`` (lmms-eval 0.7.3 has no public accessor for a task's YAML)."""
    found = {}
    for task in tasks:
        config = manager._get_config(task) if hasattr(manager, "_get_config") else {}
        if not config:
            raise ValueError(f"lmms-eval knows no task {task!r}")
        path, name, split = config.get("dataset_path", "?"), config.get("dataset_name"), config.get("test_split")
        files = (config.get("dataset_kwargs") or {}).get("data_files")
        where = (f"{path} ({name})" if name else str(path)) + (f", split {split}" if split else "")
        found[task] = f"{where}: {files}" if files else where
    return found


def finished(out: Path, cell: Cell) -> dict[str, dict]:
    """The tasks of ``cell`` whose scores a run wrote."""
    folder = out / "cells" / cell.name
    return {p.stem: json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))} if folder.is_dir() else {}


def plan(out: Path, methods: tuple[str, ...] = METHODS, budgets: tuple[int, ...] = BUDGETS,
         tasks: Optional[list[str]] = None, model: str = MODEL, device: str = "cuda:0", dtype: str = "float16",
         include_path: Optional[Path] = None, limit: Optional[int] = None, extra_model_args: str = "") -> Plan:
    """What ``run`` would load, download and run (nothing is loaded but lmms-eval's task index)."""
    tasks = list(tasks or [b.task for b in BENCHMARKS])
    todo = cells(methods, budgets)
    manager = _task_manager(include_path)
    datasets = _datasets(manager, tasks)
    done = {cell.name: sorted(finished(out, cell)) for cell in todo}
    commands = []
    for cell in todo:
        left = [t for t in tasks if t not in done[cell.name]]
        if left:
            extra = (f" --include_path {shlex.quote(str(include_path))}" if include_path else "") + (
                f" --limit {limit}" if limit else "")
            args = cell.model_args(model, device, dtype, extra_model_args)
            commands.append(f"python -m lmms_eval --model duet_llava_hf --model_args {shlex.quote(args)} "
                            f"--tasks {','.join(left)} --batch_size 1{extra}")
    notes = [f"{b.task}: {b.note}" for b in BENCHMARKS if b.note and b.task in tasks]
    return Plan(model, tasks, datasets, todo, done, commands, notes)


def _score(results: dict, task: str) -> dict:
    """A task's metrics from ``simple_evaluate``'s results, and the paper's column where it is one."""
    metrics = {key: value for key, value in results["results"][task].items() if isinstance(value, (int, float))}
    bench = next((b for b in BENCHMARKS if b.task == task), None)
    score = None
    if bench is not None and all(key in metrics for key in bench.metrics):
        score = sum(metrics[key] for key in bench.metrics) * bench.scale
    return {"task": task, "metrics": metrics, "score": score}


def run(out: Path, methods: tuple[str, ...] = METHODS, budgets: tuple[int, ...] = BUDGETS,
        tasks: Optional[list[str]] = None, model: str = MODEL, device: str = "cuda:0", dtype: str = "float16",
        include_path: Optional[Path] = None, limit: Optional[int] = None,
        progress: Optional[Callable[[str, int, int], None]] = None, extra_model_args: str = "",
        command: Optional[str] = None) -> dict:
    """Run every cell not yet finished (``OUT/cells``), then write and return the table
    (``OUT/results.json``, with the ``command`` that ran it): each cell's scores beside the reported
    numbers."""
    from lmms_eval.evaluator import simple_evaluate

    tasks = list(tasks or [b.task for b in BENCHMARKS])
    todo = cells(methods, budgets)
    manager = _task_manager(include_path)
    _datasets(manager, tasks)  # an unknown task fails before any model loads
    total = len(todo) * len(tasks)
    count = sum(len(set(finished(out, cell)) & set(tasks)) for cell in todo)
    if progress:
        progress("cells", count, total)
    for cell in todo:
        left = [task for task in tasks if task not in finished(out, cell)]
        if not left:
            continue
        args = cell.model_args(model, device, dtype, extra_model_args)
        results = simple_evaluate(model="duet_llava_hf", model_args=args, tasks=left, task_manager=manager,
                                  batch_size=1, limit=limit, bootstrap_iters=0, process_docs_parallel=1)
        folder = out / "cells" / cell.name
        folder.mkdir(parents=True, exist_ok=True)
        for task in left:
            scored = _score(results, task)
            scored.update(cell=cell.name, model_args=args, limit=limit)
            (folder / f"{task}.json").write_text(json.dumps(scored, indent=2))
            count += 1
            if progress:
                progress("cells", count, total)
    table = results_table(out, todo, tasks)
    table.update(model=model, device=device, dtype=dtype, limit=limit)
    if command is not None:
        table["command"] = command
    (out / "results.json").write_text(json.dumps(table, indent=2))
    return table


def _cell_score(scores: dict[str, dict], task: str) -> Optional[float]:
    """A finished cell's score on ``task`` (``None`` if unfinished): the paper's column, or, for a task
    outside the paper's, its first metric. A paper task whose metrics lmms-eval did not report has no
    score: another metric would be compared with the paper's number."""
    if task not in scores:
        return None
    if any(b.task == task for b in BENCHMARKS):
        return scores[task]["score"]
    return next(iter(scores[task]["metrics"].values()), None)


def results_table(out: Path, todo: list[Cell], tasks: list[str]) -> dict:
    """Each cell's score per task beside the reported number and its tolerance, and each row's
    average accuracy retained (over the tasks with a score, against the unreduced row)."""
    rows = []
    full = finished(out, todo[0])
    for cell in todo:
        scores = finished(out, cell)
        reported = REPORTED.get((cell.method, cell.budget), {})
        entries, retained = [], []
        for task in tasks:
            bench = next((b for b in BENCHMARKS if b.task == task), None)
            column = bench.column if bench else task
            ours = _cell_score(scores, task)
            paper = reported.get(column)
            tolerance = bench.tolerance if bench else None
            within = None if paper is None or ours is None else abs(ours - paper) <= tolerance
            entries.append({"task": task, "column": column, "ours": ours, "reported": paper, "tolerance": tolerance,
                            "within": within})
            base = _cell_score(full, task)
            if ours is not None and base:
                retained.append(100.0 * ours / base)
        average = sum(retained) / len(retained) if retained else None
        reported_average = 100.0 if cell.method == "full" else REPORTED_AVERAGE.get((cell.method, cell.budget))
        within = None if average is None or reported_average is None else abs(average - reported_average) <= AVERAGE_TOLERANCE
        rows.append({"cell": cell.name, "method": cell.method, "budget": cell.budget, "entries": entries,
                     "average_retained": average, "reported_average": reported_average,
                     "average_tolerance": AVERAGE_TOLERANCE, "average_within": within})
    return {"tasks": tasks, "rows": rows}
