"""The generated tables of the README (and of any page of these docs), rendered from the files the
commands wrote, so that a table cannot drift from what a command printed.

A table between ``<!-- generated: KIND FILE... -->`` and ``<!-- end generated -->`` is rendered from
the named JSON files (paths relative to the page): ``duet-vlm eval``'s ``results.json``, a demo
model's ``metrics.json``, the adaptation experiment's ``adaptation.json``, a benchmark's output,
the fixed-against-adaptive study's ``results.json``.

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


def _pct(value) -> str:
    return number(100 * value, 1)


def render_adaptive(root: Path, path: str) -> str:
    """The fixed-against-adaptive study (``python -m duet_vlm.demo.adaptive_study``): the signal
    comparison on validation, then on test each method and budget fixed and adaptive at the same
    realised average, with the paired difference and its standard error, per question type and
    per number of objects in the scene."""
    results = _load(root, path)
    meta, rows = results["meta"], results["rows"]
    signals = ("coverage", "distinct", "rank")
    types = [t for t in QUESTION_ORDER if t in rows[0]["per_type"]]
    lines = [f"`{meta['command']}`: calibrated on {meta['calibration_n']} validation scenes; signals compared on "
             f"{meta['validation_n']} validation questions at budget {meta['comparison_budget']}; test split, "
             f"{meta['n']} questions per row. Floor {meta['floor']}, ceiling {meta['ceiling']} (of the average).", ""]

    # the signal comparison on validation, with how each signal spreads the budgets
    budget = str(meta["comparison_budget"])
    head = ["validation, budget " + budget, "fixed", *signals]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    comparison = results["signal_comparison"]
    for method in meta["methods"]:
        cells = [method]
        for variant in ("fixed", *signals):
            row = next(r for r in comparison if r["method"] == method and r["variant"] == variant)
            cells.append(f"{_pct(row['accuracy'])} ± {_pct(standard_error(row['accuracy'], row['n']))}")
        lines.append("| " + " | ".join(cells) + " |")
    accuracy = meta["validation_accuracy"]
    lines.append("| mean | " + " | ".join(_pct(accuracy[v]) for v in ("fixed", *signals)) + " |")
    first = meta["methods"][0]
    spread = [results["calibration"][s][first][budget] for s in signals]
    lines.append("| items' budgets: s.d. (min-max) | | " + " | ".join(
        f"{c['stdev']:.1f} ({c['min']}-{c['max']})" for c in spread) + " |")
    lines.append("| correlation with objects in the scene | | " + " | ".join(
        f"{c['correlation_with_objects']:+.2f}" for c in spread) + " |")
    lines += ["", f"Chosen: **{meta['signal']}** ({meta['rule']}).", ""]

    # the test: fixed against adaptive at the same realised average
    head = ["test", "budget", "signal", "tok/layer fixed / adaptive", "fixed", "adaptive", "adaptive - fixed (paired s.e.)",
            "count: fixed / adaptive", "read: fixed / adaptive"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for c in results["comparisons"]:
        pair = {v: next(r for r in rows if r["method"] == c["method"] and r["budget"] == c["budget"]
                        and r.get("signal") == c["signal"] and r["variant"] == v) for v in ("fixed", "adaptive")}
        lines.append("| " + " | ".join([
            c["method"], str(c["budget"]), c["signal"], f"{c['fixed_realised']:.1f} / {c['adaptive_realised']:.1f}",
            _pct(c["fixed"]), _pct(c["adaptive"]), f"{100 * c['difference']:+.1f} ({_pct(c['paired_se'])})",
            f"{_pct(pair['fixed']['per_type']['count'])} / {_pct(pair['adaptive']['per_type']['count'])}",
            f"{_pct(pair['fixed']['per_type']['read'])} / {_pct(pair['adaptive']['per_type']['read'])}",
        ]) + " |")
    lines.append("")

    # per question type, every row once
    head = ["per type", "budget", "variant", "tok/layer", *types, "avg"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    seen = set()
    for row in rows:
        label = row["variant"] if row["variant"] != "adaptive" else f"adaptive ({row['signal']})"
        key = (row["method"], row.get("run_budget", row["budget"]), label)
        if key in seen:
            continue
        seen.add(key)
        budget_cell = "" if row["budget"] is None else str(row.get("run_budget", row["budget"]))
        lines.append("| " + " | ".join([row["method"], budget_cell, label, f"{row['realised']:.1f}",
                                        *(_pct(row["per_type"][t]) for t in types), _pct(row["accuracy"])]) + " |")
    lines.append("")

    # per number of objects in the scene
    counts = sorted({k for row in rows for k in row["per_objects_n"]}, key=int)
    full = rows[0]
    head = ["per objects in the scene", "budget", "variant", *(f"{k} (n={full['per_objects_n'][k]})" for k in counts)]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    seen = set()
    for row in rows:
        label = row["variant"] if row["variant"] != "adaptive" else f"adaptive ({row['signal']})"
        key = (row["method"], row.get("run_budget", row["budget"]), label)
        if key in seen:
            continue
        seen.add(key)
        budget_cell = "" if row["budget"] is None else str(row.get("run_budget", row["budget"]))
        lines.append("| " + " | ".join([row["method"], budget_cell, label,
                                        *(_pct(row["per_objects"][k]) if k in row["per_objects"] else "" for k in counts)])
                     + " |")
    lines.append("")
    # how each adaptive row spread its tokens over the scenes
    head = ["mean tok/layer by objects", "budget", "signal", *counts]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        if row["variant"] != "adaptive":
            continue
        by_objects: dict[str, list[float]] = {}
        for k, tokens in zip(row["questions"]["objects"], row["questions"]["tokens"]):
            by_objects.setdefault(str(k), []).append(tokens)
        lines.append("| " + " | ".join([row["method"], str(row["budget"]), row["signal"], *(
            f"{sum(by_objects[k]) / len(by_objects[k]):.0f}" if k in by_objects else "" for k in counts)]) + " |")
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


def render_vllm(root: Path, path: str) -> str:
    """``python -m duet_vlm.integrations.vllm.bench``: serving with and without a reducer, per budget and
    concurrency, with each row's ratio to the unreduced server at the same concurrency."""
    results = _load(root, path)
    model, machine, settings = results["model"], results["machine"], results["settings"]
    rows = results["rows"]
    base = {(row["concurrency"], row["max_tokens"]): row for row in rows if row["method"] is None}
    header = (
        f"`{results['command']}`: {machine['cpus']} CPU cores, server threads {machine['server_threads']}, "
        f"vLLM {machine['vllm']}; a random-weight model of LLaVA-1.5's geometry ({model['visual_tokens']} visual "
        f"tokens per image, {model['layers']} decoder layers of width {model['hidden']}, a {model['vision_layers']}-layer "
        f"CLIP tower of width {model['vision_hidden']}), {settings['dtype']}; {settings['requests']} image requests per "
        f"row (a warm-up request before each row), end-of-sequence ignored, prefix caching off.\n\n"
    )
    head = ["server", "visual tokens", "output tokens", "concurrent", "requests/s", "output tokens/s", "TTFT median (s)",
            "TTFT p90 (s)", "peak RSS (GiB)", "requests/s vs unreduced", "TTFT vs unreduced", "load (before → after)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        ref = base.get((row["concurrency"], row["max_tokens"]))
        speed = f"{row['requests_per_s'] / ref['requests_per_s']:.2f}x" if ref and row["method"] else ""
        ttft = f"{row['ttft_median_s'] / ref['ttft_median_s']:.2f}x" if ref and row["method"] else ""
        name = row["setting"] if row["method"] is None else f"{row['setting']} {row['budget']}"
        lines.append("| " + " | ".join([
            name, str(row["visual_tokens"]), str(row["max_tokens"]), str(row["concurrency"]), f"{row['requests_per_s']:.3f}",
            f"{row['output_tokens_per_s']:.2f}", f"{row['ttft_median_s']:.2f}", f"{row['ttft_p90_s']:.2f}",
            f"{row['peak_rss_gib']:.2f}", speed, ttft, f"{row['load_before']:.1f} → {row['load_after']:.1f}",
        ]) + " |")
    return header + "\n".join(lines) + "\n"


RENDERERS = {
    "model": render_model, "results": render_results, "positions": render_positions,
    "adaptation": render_adaptation, "bench": render_bench, "vllm": render_vllm, "adaptive": render_adaptive,
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
