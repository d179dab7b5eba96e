"""The generated tables of the README (and of any page of these docs), rendered from the files the
commands wrote, so that a table cannot drift from what a command printed.

A table between ``<!-- generated: KIND FILE... -->`` and ``<!-- end generated -->`` is rendered from
the named JSON files (paths relative to the page): ``duet-vlm eval``'s ``results.json``, a demo
model's ``metrics.json``, the adaptation experiment's ``adaptation.json``, a benchmark's output.

    python docs/render.py README.md            # rewrite the stale blocks
    python docs/render.py README.md --check    # exit 1 when one is stale (tests/test_readme.py)
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

from duet_vlm.bench import generate, train
from duet_vlm.evaluation import QUESTION_ORDER, markdown_table, number, question_types, standard_error

GENERATED_BLOCK = re.compile(r"(<!-- generated: (?P<spec>[^>]*?) -->\n)(?P<body>.*?)(<!-- end generated -->)", re.S)


def _load(root: Path, name: str) -> dict:
    return json.loads((root / name).read_text())


def render_results(root: Path, path: str) -> str:
    """``duet-vlm eval``'s table, with its question count and the chance row."""
    results = _load(root, path)
    meta, rows = results["meta"], results["rows"]
    header = f"`{meta.get('command') or 'duet-vlm eval'}`: {meta['split']} split, {meta['n']} questions per row.\n\n"
    return header + markdown_table(rows, question_types(rows), meta.get("chance"))


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
                number(100 * row["accuracy"], 1), number(100 * row["per_type"]["relation"], 1),
                number(100 * row["per_type"]["quadrant"], 1)]
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
    results = _load(root, path)
    runs = results if isinstance(results, list) else [results]
    tables = []
    for run in runs:
        load = " → ".join(f"{before[0]:.1f}" for before in run["load_average_before_after"])
        tables.append(f"Batch {run['batch']}, {run['rounds']} interleaved rounds, {run['threads']} thread(s), "
                      f"1-minute load average {load} (before → after).\n")
        render = generate.markdown_table if run["benchmark"] == "generate" else train.markdown_table
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
    """``python docs/render.py README.md [--check]``: regenerate (or check) the generated tables."""
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
        print(f"stale generated tables in {', '.join(map(str, stale))}: run python docs/render.py", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
