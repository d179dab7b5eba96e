"""Writing evaluation results: JSON, CSV, Markdown, the retention-versus-budget figure, and the
README's generated tables.

A README table between ``<!-- generated: KIND FILE... -->`` and ``<!-- end generated -->`` is
rendered from the named JSON files (``duet-vlm eval``'s ``results.json``, a demo model's
``metrics.json``, a benchmark's output), so it cannot drift from what a command printed:
``python -m duet_vlm.report README.md`` rewrites the blocks, ``--check`` fails when one is stale.
"""

from __future__ import annotations

import csv
import hashlib
import inspect
import json
import math
import re
import sys
from pathlib import Path


def write_results(rows: list[dict], output_dir: Path, meta: dict) -> list[Path]:
    """``results.json`` (everything), ``results.csv`` (one row per method and budget) and
    ``results.md`` (the same table in Markdown, ready for a report)."""
    json_path = output_dir / "results.json"
    json_path.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    types = sorted({t for row in rows for t in row["per_type"]})
    csv_path = output_dir / "results.csv"
    with csv_path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["method", "budget", *types, "accuracy", "retained_percent", "avg_visual_tokens", "decoder_tflops_per_sample"])
        for row in rows:
            writer.writerow(
                [row["method"], row["budget"] if row["budget"] is not None else ""]
                + [row["per_type"].get(t, "") for t in types]
                + [row["accuracy"], row["retained_percent"], row["avg_visual_tokens"], row["decoder_tflops_per_sample"]]
            )
    md_path = output_dir / "results.md"
    md_path.write_text(markdown_table(rows, _types(rows), meta.get("chance")))
    return [json_path, csv_path, md_path]


QUESTION_ORDER = ("color", "shape", "count", "exists", "relation", "quadrant", "read")


def standard_error(accuracy: float, n: int) -> float:
    """Binomial standard error of an accuracy measured on ``n`` questions."""
    return math.sqrt(accuracy * (1 - accuracy) / n) if n else float("nan")


def _number(value, digits: int) -> str:
    return "" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def markdown_table(rows: list[dict], types: list[str], chance: dict[str, float] | None = None) -> str:
    """Accuracy (%) per question type, average with its standard error, % of full-token accuracy
    retained, visual tokens per layer and decoder TFLOPs per sample: one line per method and
    budget (and a last line with each type's chance level, when given)."""
    head = ["method", "budget", *types, "avg", "± s.e.", "% of full", "visual tok/layer", "decoder TFLOPs"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        cells = [row["method"], str(row["budget"] or "")]
        cells += [_number(100 * row["per_type"][t], 1) if t in row["per_type"] else "" for t in types]
        cells += [_number(100 * row["accuracy"], 1), _number(100 * standard_error(row["accuracy"], row["n"]), 1),
                  _number(row["retained_percent"], 1), _number(row["avg_visual_tokens"], 1),
                  _number(row["decoder_tflops_per_sample"], 4)]
        lines.append("| " + " | ".join(cells) + " |")
    if chance:
        cells = ["chance", "", *(_number(100 * chance[t], 1) if t in chance else "" for t in types)]
        lines.append("| " + " | ".join(cells + [""] * (len(head) - len(cells))) + " |")
    return "\n".join(lines) + "\n"


def weights_digest(model_dir: Path) -> str:
    """SHA-256 of a model directory's ``model.safetensors``: ties results to the weights they measured."""
    digest = hashlib.sha256()
    with (Path(model_dir) / "model.safetensors").open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def takes_positions(method) -> bool:
    """Whether a registered method has a ``positions`` option (the methods that shorten the
    sequence inside the language model; vision-side methods hand it a shorter input instead)."""
    return "positions" in inspect.signature(method).parameters


# ---- the README's generated blocks -------------------------------------------------------------

GENERATED_BLOCK = re.compile(r"(<!-- generated: (?P<spec>[^>]*?) -->\n)(?P<body>.*?)(<!-- end generated -->)", re.S)


def _load(root: Path, name: str) -> dict:
    return json.loads((root / name).read_text())


def _types(rows: list[dict]) -> list[str]:
    present = {t for row in rows for t in row["per_type"]}
    return [t for t in QUESTION_ORDER if t in present]


def render_results(root: Path, path: str) -> str:
    """``duet-vlm eval``'s table, with its question count and the chance row."""
    results = _load(root, path)
    meta, rows = results["meta"], results["rows"]
    header = f"`{meta.get('command') or 'duet-vlm eval'}`: {meta['split']} split, {meta['n']} questions per row.\n\n"
    return header + markdown_table(rows, _types(rows), meta.get("chance"))


def render_positions(root: Path, *paths: str) -> str:
    """Each method with a position option at each budget, with its kept tokens' original position
    ids and renumbered contiguously, from every ``results.json`` given (their rows record the mode
    each ran in): average accuracy, and the two question types that depend on where objects are."""
    by_mode: dict[tuple, dict[str, dict]] = {}
    for path in paths:
        for row in _load(root, path)["rows"]:
            if row["budget"] is not None and row.get("positions"):
                by_mode.setdefault((row["method"], row["budget"]), {})[row["positions"]] = row
    modes = (("original", "original"), ("contiguous", "renumbered"))
    head = ["method", "budget"] + [f"{label}: {column}" for _, label in modes for column in ("avg", "relation", "quadrant")]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for (method, budget), rows in by_mode.items():
        cells = [method, str(budget)]
        for mode, _ in modes:
            row = rows.get(mode)
            cells += ["", "", ""] if row is None else [
                _number(100 * row["accuracy"], 1), _number(100 * row["per_type"]["relation"], 1),
                _number(100 * row["per_type"]["quadrant"], 1)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def render_model(root: Path, path: str) -> str:
    """A demo model's ``metrics.json``: test accuracy with all tokens and with the image blanked, per type."""
    metrics = _load(root, path)
    seen, blank = metrics["test"], metrics["test_blank_image"]
    types = [t for t in QUESTION_ORDER if t in seen["per_type"]]
    lines = [
        f"**Test accuracy {100 * seen['accuracy']:.1f}% with all tokens, {100 * blank['accuracy']:.1f}% with the "
        f"image blanked.** Test split, n={seen['n']} (per question type, %):",
        "",
        "| | overall | " + " | ".join(types) + " |",
        "|---|---|" + "---|" * len(types),
    ]
    for label, result in (("all 576 visual tokens", seen), ("image blanked (control)", blank)):
        lines.append(f"| {label} | {100 * result['accuracy']:.1f} | "
                     + " | ".join(f"{100 * result['per_type'][t]:.0f}" for t in types) + " |")
    lines.append("| chance | | " + " | ".join(f"{100 * seen['chance'][t]:.0f}" for t in types) + " |")
    return "\n".join(lines) + "\n"


def render_adaptation(root: Path, path: str) -> str:
    """The adaptation experiment (``duet_vlm.demo.adaptation``): one line per model, one column per
    evaluation setting, accuracy ± standard error (%), and each fine-tune's wall-clock."""
    results = _load(root, path)
    meta, rows = results["meta"], results["rows"]
    settings = [None] + meta["budgets"]
    labels = ["all tokens" if b is None else f"{meta['method']} {b}" for b in settings]
    head = ["model", *(f"evaluated with {label}" for label in labels), "fine-tune wall-clock"]
    lines = [f"`{meta['command']}`: {meta['split']} split, {meta['n']} questions per cell, "
             f"{meta['steps']} fine-tuning steps per model.", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    models = list(dict.fromkeys(row["model"] for row in rows))
    for model in models:
        cells = [model]
        for budget in settings:
            row = next(r for r in rows if r["model"] == model and r["evaluated_with"] == budget)
            cells.append(f"{100 * row['accuracy']:.1f} ± {100 * standard_error(row['accuracy'], row['n']):.1f}")
        tune = meta["fine_tunes"].get(model)
        cells.append(f"{tune['seconds'] / 60:.1f} min" if tune else "")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def render_bench(root: Path, path: str) -> str:
    """A ``duet-vlm bench --generate`` or ``--train`` result, as the command printed it."""
    from . import bench_generate, bench_train

    results = _load(root, path)
    runs = results if isinstance(results, list) else [results]
    tables = []
    for run in runs:
        load = " → ".join(f"{before[0]:.1f}" for before in run["load_average_before_after"])
        tables.append(f"Batch {run['batch']}, {run['rounds']} interleaved rounds, {run['threads']} thread(s), "
                      f"1-minute load average {load} (before → after).\n")
        render = bench_generate.markdown_table if run["benchmark"] == "generate" else bench_train.markdown_table
        tables.append(render(run).strip() + "\n")
    return "\n".join(tables)


RENDERERS = {
    "model": render_model, "results": render_results, "positions": render_positions,
    "adaptation": render_adaptation, "bench": render_bench,
}


def render_readme(text: str, root: Path) -> str:
    """``text`` with every generated block re-rendered from its files (paths relative to ``root``)."""
    def replace(match: re.Match) -> str:
        kind, *paths = match["spec"].split()
        if kind not in RENDERERS:
            raise ValueError(f"unknown generated block {kind!r}; known: {', '.join(RENDERERS)}")
        return match.group(1) + RENDERERS[kind](root, *paths) + match.group(4)

    return GENERATED_BLOCK.sub(replace, text)


def main(argv: list[str] | None = None) -> int:
    """``python -m duet_vlm.report README.md [--check]``: regenerate (or check) the README's tables."""
    args = list(sys.argv[1:] if argv is None else argv)
    check = "--check" in args
    paths = [Path(a) for a in args if a != "--check"] or [Path("README.md")]
    stale = []
    for path in paths:
        text = path.read_text()
        fresh = render_readme(text, path.resolve().parent)
        if fresh != text:
            stale.append(path)
            if not check:
                path.write_text(fresh)
    if check and stale:
        print(f"stale generated tables in {', '.join(map(str, stale))}: run python -m duet_vlm.report", file=sys.stderr)
        return 1
    return 0


def retention_plot(rows: list[dict], path: Path) -> Path:
    """Accuracy retained (% of all tokens) against the budget, one line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(5.5, 4))
    methods = sorted({row["method"] for row in rows if row["budget"] is not None})
    for method in methods:
        points = sorted((row["budget"], row["retained_percent"]) for row in rows if row["method"] == method and row["budget"] is not None)
        axis.plot(*zip(*points), marker="o", label=method)
    axis.axhline(100, color="gray", linestyle="--", linewidth=1, label="all tokens")
    blank = [row for row in rows if row["method"] == "blank image" and not math.isnan(row["retained_percent"])]
    if blank:
        axis.axhline(blank[0]["retained_percent"], color="red", linestyle=":", linewidth=1, label="image blanked")
    axis.set_xlabel("budget (average visual tokens per layer)")
    axis.set_ylabel("accuracy retained (% of all tokens)")
    axis.invert_xaxis()
    axis.legend(fontsize=7)
    axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


if __name__ == "__main__":
    sys.exit(main())
