"""The generated tables and figures of the README and of the documentation site's pages (docs/*.md),
rendered from the files the commands wrote, so that a number cannot drift from what a command printed.

A block between ``<!-- generated: KIND ARG... -->`` and ``<!-- end generated -->`` is rendered from
its arguments (file paths relative to the page): ``duet-vlm eval``'s ``results.json``, a demo
model's ``metrics.json``, the adaptation experiment's ``adaptation.json``, a benchmark's output,
the fixed-against-adaptive study's ``results.json``, the vLLM serving benchmark, ``duet-vlm bench --gpu``, a live-memory
trace (``python -m duet_vlm.bench.live``), ``duet-vlm check``'s report; ``schedules`` and ``plan`` blocks are solved by the
library itself (what ``duet-vlm plan`` prints), a ``modes`` block is the generation-modes table
that tests/test_generation_modes_table.py checks; a ``figure`` block draws ``docs/figures.py``'s
"which method and budget" figure and records the digest of its inputs, in the block and in the PNG.

Prose that quotes numbers of a results file carries ``<!-- reading: FILE@DIGEST -->`` before it:
when the file changes, the check fails until someone has read the prose against the new numbers
and accepted it (``--accept-readings``). Tables re-render themselves; prose cannot.

    python docs/render.py                       # README.md and every page: rewrite stale blocks, redraw stale figures
    python docs/render.py README.md docs/x.md   # only these
    python docs/render.py --check               # exit 1 when a block, a figure or a reading is stale (CI, tests)
    python docs/render.py --accept-readings docs/benchmarks.md   # after re-reading that page's prose
"""

from __future__ import annotations

import hashlib
import json
import re
import statistics
import sys
from pathlib import Path

import figures  # docs/figures.py, beside this file

from duet_vlm.bench import generate, gpu, live, prefill, train
from duet_vlm.evaluation import QUESTION_ORDER, markdown_table, number, question_types, standard_error

GENERATED_BLOCK = re.compile(r"(<!-- generated: (?P<spec>[^>]*?) -->\n)(?P<body>.*?)(<!-- end generated -->)", re.S)
READING = re.compile(r"<!-- reading: (?P<files>[^>]*?) -->")
ROOT = Path(__file__).resolve().parent.parent


def _load(root: Path, name: str) -> dict:
    return json.loads((root / name).read_text())


def render_results(root: Path, path: str) -> str:
    """``duet-vlm eval``'s table, with its question count and the chance row."""
    results = _load(root, path)
    meta, rows = results["meta"], results["rows"]
    header = f"`{meta.get('command') or 'duet-vlm eval'}`: {meta['split']} split, {meta['n']} questions per row.\n\n"
    return header + markdown_table(rows, question_types(rows), meta.get("chance"))


def render_beside(root: Path, *paths: str) -> str:
    """Two demo models' evaluations side by side: each method's accuracy retained (% of its model's
    all-token accuracy, with the standard error in points) at each budget of the first model's files
    (before ``--``; the first file that has a method's row gives it) and of the second's (after it).
    A method with one row (no budget) or absent from a side leaves that side empty."""
    split = paths.index("--")
    sides = [paths[:split], paths[split + 1:]]
    tables, budgets, fulls, labels = [], [], [], []
    for side in sides:
        rows: dict[tuple, dict] = {}
        meta = None
        for path in side:
            results = _load(root, path)
            meta = meta or results["meta"]
            for row in results["rows"]:
                rows.setdefault((row["method"], row["budget"]), row)
        tables.append(rows)
        budgets.append(sorted({b for _, b in rows if b is not None}, reverse=True))
        fulls.append(rows[("full", None)])
        labels.append(meta.get("model", "demo model"))
    methods = list(dict.fromkeys(m for rows in tables for (m, b) in rows if b is not None))
    head = ["method", *(f"{b}" for b in budgets[0]), *(f"{b}" for b in budgets[1])]
    lines = [f"% of each model's all-token accuracy retained (± s.e., points): first model ({labels[0]}, all tokens "
             f"{number(100 * fulls[0]['accuracy'], 1)}%) at budgets {' / '.join(map(str, budgets[0]))}; second "
             f"({labels[1]}, all tokens {number(100 * fulls[1]['accuracy'], 1)}%) at "
             f"{' / '.join(map(str, budgets[1]))}.", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for method in methods:
        cells = [method]
        for rows, chosen, full in zip(tables, budgets, fulls):
            for budget in chosen:
                row = rows.get((method, budget))
                if row is None or not full["accuracy"]:
                    cells.append("")
                    continue
                error = 100 * standard_error(row["accuracy"], row["n"]) / full["accuracy"]
                cells.append(f"{number(row['retained_percent'], 1)} ± {number(error, 1)}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


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
    every = "all 576 visual tokens" if metrics["hparams"].get("architecture", "llava") == "llava" else "all 144 visual tokens"
    for label, result in ((every, seen), ("image blanked (control)", blank)):
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


def _distinct_rows(rows: list[dict]):
    """Each study row once (a fixed row serves every signal that matched its budget), with its
    budget cell and label: ``(row, budget_cell, label)``."""
    seen = set()
    for row in rows:
        label = row["variant"] if row["variant"] != "adaptive" else f"adaptive ({row['signal']})"
        key = (row["method"], row.get("run_budget", row["budget"]), label)
        if key not in seen:
            seen.add(key)
            yield row, "" if row["budget"] is None else str(row.get("run_budget", row["budget"])), label


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
    for row, budget_cell, label in _distinct_rows(rows):
        lines.append("| " + " | ".join([row["method"], budget_cell, label, f"{row['realised']:.1f}",
                                        *(_pct(row["per_type"][t]) for t in types), _pct(row["accuracy"])]) + " |")
    lines.append("")

    # per number of objects in the scene
    counts = sorted({k for row in rows for k in row["per_objects_n"]}, key=int)
    full = rows[0]
    head = ["per objects in the scene", "budget", "variant", *(f"{k} (n={full['per_objects_n'][k]})" for k in counts)]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row, budget_cell, label in _distinct_rows(rows):
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


def render_processes(root: Path, path: str) -> str:
    """``duet-vlm bench --train --processes N``: one process against N DDP processes, per variant."""
    from duet_vlm.bench import processes

    run = _load(root, path)
    load = " → ".join(f"{before[0]:.1f}" for before in run["load_average_before_after"])
    return (f"Batch {run['batch']}, {run['rounds']} interleaved rounds, {run['threads']} thread(s) in all "
            f"({run['threads_per_process']} per process in the group), 1-minute load average {load} (before → after).\n\n"
            + processes.markdown_table(run).strip() + "\n")


def render_live(root: Path, path: str) -> str:
    """``python -m duet_vlm.bench.live``: what is alive at a ``generate`` call's peak and its ideal's."""
    report = _load(root, path)
    return f"`{report['command']}`: batch {report['batch']}, {report['new_tokens']} new tokens.\n\n" + live.markdown(report)


def render_vllm(root: Path, path: str) -> str:
    """``python -m duet_vlm.integrations.vllm.bench``: serving with and without a reducer, per budget and
    concurrency, with each row's ratio to vLLM's own class unreduced at the same concurrency (and
    output length); an unreduced row of another route (the Transformers backend) gets one too."""
    results = _load(root, path)
    model, machine, settings = results["model"], results["machine"], results["settings"]
    rows = results["rows"]
    base: dict = {}  # vLLM's own class, unreduced (the first unreduced server; a second is another route)
    for row in rows:
        if row["method"] is None:
            base.setdefault((row["concurrency"], row["max_tokens"]), row)
    requests = ("as many image requests as clients" if settings["requests"] == "clients"
                else f"{settings['requests']} image requests")
    # before the benchmark gave every row images of its own, rows repeated images, and the encoder
    # cache answered a repeated image without the vision tower
    images = ("; every row and its warm-up on images new to that server" if "images" in settings
              else "; rows repeat images, which vLLM's encoder cache then encodes once")
    kv_heads = f" ({model['heads']} query heads, {model['kv_heads']} key/value heads)" if "kv_heads" in model else ""
    admitted = any(row.get("pool_blocks") for row in rows)  # records before the server's metrics were sampled have none
    pool = (f"; a KV pool of {rows[0]['pool_mib']:.0f} MiB, at most {settings['max_num_seqs']} requests running "
            "at once (both columns from the server's own metrics, sampled about four times a second)" if admitted else "")
    header = (
        f"`{results['command']}`: {machine['cpus']} CPU cores, server threads {machine['server_threads']}, "
        f"vLLM {machine['vllm']}; a random-weight model of {model.get('family', 'LLaVA-1.5')}'s geometry "
        f"({model['visual_tokens']} visual tokens per image, {model['layers']} decoder layers of width "
        f"{model['hidden']}{kv_heads}, a {model['vision_layers']}-layer {model.get('tower', 'CLIP')} tower of width "
        f"{model['vision_hidden']}), {settings['dtype']}; {requests} per row (a warm-up request "
        f"before each row{images}), end-of-sequence ignored, prefix caching off{pool}.\n\n"
    )
    head = ["server", "visual tokens", "output tokens", "concurrent", "requests/s", "output tokens/s", "TTFT median (s)",
            "TTFT p90 (s)", "peak RSS (GiB)", "requests/s vs unreduced", "TTFT vs unreduced", "load (before → after)"]
    if admitted:
        head[9:9] = ["requests admitted", "KV cache per request (MiB)"]
    steps = any(row.get("step_ms_median") for row in rows)  # records before decoding steps were timed have none
    if steps:
        head[8:8] = ["decode step median (ms)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        ref = base.get((row["concurrency"], row["max_tokens"]))
        speed = f"{row['requests_per_s'] / ref['requests_per_s']:.2f}x" if ref and row is not ref else ""
        ttft = f"{row['ttft_median_s'] / ref['ttft_median_s']:.2f}x" if ref and row is not ref else ""
        name = row["setting"] if row["method"] is None else f"{row['setting']} {row['budget']}"
        cells = [
            name, str(row["visual_tokens"]), str(row["max_tokens"]), str(row["concurrency"]), f"{row['requests_per_s']:.3f}",
            f"{row['output_tokens_per_s']:.2f}", f"{row['ttft_median_s']:.2f}", f"{row['ttft_p90_s']:.2f}",
            f"{row['peak_rss_gib']:.2f}", speed, ttft, f"{row['load_before']:.1f} → {row['load_after']:.1f}",
        ]
        if admitted:
            cells[9:9] = [str(row["admitted"]), f"{row['kv_mib_per_request']:.1f}"]
        if steps:
            cells[8:8] = [f"{row['step_ms_median']:.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    starts = {}  # each server's start, as its first row records it
    for row in rows:
        if row.get("startup_s"):
            starts.setdefault(row["setting"], row)
    footer = ""
    if starts:
        footer = "\nEach server's start (to its first healthy answer; of it, vLLM's engine start, which holds the " \
                 "compiling of its language model, and that compiling where vLLM's log says how long it took: its CPU " \
                 "backend does not): " + "; ".join(
                     f"{name} {row['startup_s']:.0f} s ({row['warmup_s']:.1f} s"
                     + (f", compiling {row['compile_s']:.1f} s)" if row.get("compile_s") else ")")
                     for name, row in starts.items()) + ".\n"
    return header + "\n".join(lines) + "\n" + footer


def render_vllm_memory(root: Path, path: str) -> str:
    """``python -m duet_vlm.integrations.vllm.bench --memory``: each KV-cache group's blocks per request
    and the requests the pool admits, per server, against vLLM unreduced."""
    results = _load(root, path)
    model, machine, settings = results["model"], results["machine"], results["settings"]
    rows = results["rows"]
    base = next(row for row in rows if row["budget"] is None)
    header = (
        f"`{results['command']}`: vLLM {machine['vllm']}; a random-weight model of LLaVA-1.5's geometry "
        f"({model['visual_tokens']} visual tokens per image, {model['layers']} decoder layers of width {model['hidden']}), "
        f"{settings['dtype']}; {settings['kv_cache_bytes'] / 2**20:.0f} MiB of KV cache in blocks of "
        f"{settings['block_size']} tokens; {base['requests']} image requests at once, "
        f"{settings['max_tokens'][0]} output tokens each.\n\n"
    )

    def blocks(row) -> str:  # "19, 2 x 15": runs of equal counts
        runs: list[list[int]] = []
        for count in row["blocks_per_request"]:
            if runs and runs[-1][0] == count:
                runs[-1][1] += 1
            else:
                runs.append([count, 1])
        return ", ".join(f"{count}" + (f" × {times}" if times > 1 else "") for count, times in runs)

    head = ["server", "budget", "KV-cache groups × layers", "blocks per request, per group", "KV cache per request (MiB)",
            "vs unreduced", "requests admitted", "vs unreduced"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        is_base = row is base
        lines.append("| " + " | ".join([
            "vLLM, unreduced" if is_base else f"plugin, {row['setting']}", "" if is_base else str(row["budget"]),
            f"{row['groups']} × {row['layers_per_group']}", blocks(row), f"{row['kv_bytes_per_request'] / 2**20:.1f}",
            "" if is_base else f"{row['kv_bytes_per_request'] / base['kv_bytes_per_request']:.2f}x",
            f"{row['admitted']} of {row['requests']}", "" if is_base else f"{row['admitted'] / base['admitted']:.2f}x",
        ]) + " |")
    return header + "\n".join(lines) + "\n"


def render_check(root: Path, path: str) -> str:
    """``duet-vlm check --json``: what it ran on (the versions included) and each check's result."""
    report = _load(root, path)
    setup, versions = report["setup"], report["versions"]
    device = versions["gpu"] or f"CPU ({versions['platform']})"
    header = (
        f"`{setup.get('command', 'duet-vlm check')}`: {setup['class']} ({setup['adapter']}), {setup['dtype']}, attention "
        f"`{setup['attention']}`, on {device}; torch {versions['torch']}, transformers {versions['transformers']}, "
        f"CUDA {versions['cuda'] or 'none'}, flash-attn {versions['flash-attn'] or 'not installed'}. "
        + ("Every check passed" if report["ok"] else "Some checks FAILED") + f" in {setup['seconds']} s.\n\n"
    )
    lines = ["| check | result | numbers |", "|---|---|---|"]
    for result in report["results"]:
        seconds = result["numbers"].get("seconds")
        took = f" ({seconds:.1f} s)" if seconds is not None and not result["key"].startswith("mode:") else ""
        name = result["key"].replace("mode:", "mode: ").replace("_", " ")
        lines.append(f"| {name} | {result['status']} | {result['detail']}{took} |")
    return header + "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- what the library solves
def _schedule_cell(plan) -> str:
    """A schedule in a few characters: ``307 → 153 → 0 (after 16, 24)``, or the LLM-input count alone."""
    schedule = plan.schedule
    counts = [schedule.llm_input, *(keep for _, keep in schedule.boundaries)]
    after = f" (after {', '.join(str(layer) for layer, _ in schedule.boundaries)})" if schedule.boundaries else ""
    return " → ".join(map(str, counts)) + after


def _where(plan) -> str:
    sides = [name for name, present in (("vision", plan.vision is not None), ("LLM", plan.language is not None)) if present]
    return " + ".join(sides) or "—"


def _geometry(tokens: int = 576, layers: int = 32):
    from duet_vlm.costs import plan_costs

    return lambda method, budget: plan_costs(method, budget, None, layers, tokens).plan


def render_schedules(root: Path, *budgets: str) -> str:
    """Every registered method's schedule at each budget on LLaVA-1.5's geometry (576 visual tokens, 32
    decoder layers), as ``duet-vlm plan --method M --budget B`` solves it: the tokens entering the
    language model, then the tokens kept after each boundary layer."""
    from duet_vlm import METHODS

    solve = _geometry()
    head = ["method", "where", *(f"budget {b}" for b in budgets)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    content = []
    for method, cls in METHODS.items():
        if not cls.takes_budget:  # its count follows each image's content, on the families it runs on
            content.append(f"`{method}`")
            continue
        plans = [solve(method, int(b)) for b in budgets]
        lines.append("| " + " | ".join([f"`{method}`", _where(plans[0]), *map(_schedule_cell, plans)]) + " |")
    note = (f"\n{', '.join(content)} takes no budget: each image keeps what its content needs (its threshold "
            "sets how close a repeat must be).\n") if content else ""
    return ("Visual tokens entering the language model → kept after each boundary layer, on LLaVA-1.5 (576 tokens, "
            "32 layers); `duet-vlm plan --method NAME --budget N` prints any geometry.\n\n" + "\n".join(lines) + "\n"
            + note)


def render_plan(root: Path, method: str, *budgets: str) -> str:
    """One method's solved plan per budget on LLaVA-1.5's geometry: its vision stage's parameters, the
    visual tokens per layer group and the average (``duet-vlm plan --method METHOD --budget B``)."""
    from itertools import groupby

    solve = _geometry()
    head = ["budget", "enter the LLM", "vision stage", "language stage", "tokens per layer group", "average"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for budget in budgets:
        plan = solve(method, int(budget))
        vision = "" if plan.vision is None else f"{type(plan.vision).__name__}(" + ", ".join(
            f"{k}={v}" for k, v in vars(plan.vision).items() if isinstance(v, (int, float)) and not isinstance(v, bool)) + ")"
        language = "" if plan.language is None else type(plan.language).__name__
        groups, start = [], 1
        for count, run in groupby(plan.schedule.tokens_per_layer):
            size = len(list(run))
            groups.append(f"{start}–{start + size - 1}: {count}" if size > 1 else f"{start}: {count}")
            start += size
        lines.append("| " + " | ".join([budget, str(plan.schedule.llm_input), vision, language, " / ".join(groups),
                                        f"{plan.schedule.average:.2f}"]) + " |")
    return "\n".join(lines) + "\n"


def render_ladder(root: Path, method: str, *budgets: str) -> str:
    """Gemma 4's soft-token ladder under ``method`` at each budget, as ``duet-vlm plan --preset gemma4
    --ladder --budget B`` solves it (``costs.ladder_costs``): per rung the square image's soft tokens
    and the prefill's FLOPs (tower, decoder) with the method at the budget, the rung chosen in bold."""
    from duet_vlm.costs import GEMMA4_LADDER, ladder_costs

    head = ["budget", *(f"{rung} ({tokens} tokens)" for rung, tokens in
                        zip(GEMMA4_LADDER, (r.tokens for r in ladder_costs(method, int(budgets[0]))[0]))), "chosen"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for budget in budgets:
        rungs, chosen = ladder_costs(method, int(budget))
        cells = []
        for rung in rungs:
            if rung.unreachable is not None:
                cells.append("cannot")
                continue
            what = "as is" if rung.plan is None else f"to {budget}"
            cell = f"{what}: {rung.encoder_flops / 1e12:.2f} + {rung.decoder_flops / 1e12:.2f} = {rung.total_flops / 1e12:.2f}"
            cells.append(f"**{cell}**" if rung is chosen else cell)
        chosen_cell = f"{chosen.max_soft_tokens}" + ("" if chosen.plan is None else f", then {method} to {budget}")
        lines.append("| " + " | ".join([budget, *cells, chosen_cell]) + " |")
    return (f"Prefill TFLOPs (tower + decoder = total) of one square image and 60 text tokens on transformers' default "
            f"Gemma 4 config, {method} at each budget; `duet-vlm plan --preset gemma4 --ladder --budget B` prints one "
            "row.\n\n" + "\n".join(lines) + "\n")


def render_modes(root: Path) -> str:
    """What each mode of ``generate`` does under each kind of method (``duet_vlm.generation_modes``,
    checked cell by cell by tests/test_generation_modes_table.py), and which method is of which kind."""
    from duet_vlm.generation_modes import markdown

    return markdown()


# ----------------------------------------------------------------------------- benchmarks
def render_prefill(root: Path, path: str) -> str:
    """``duet-vlm bench --methods ... --output FILE``: the vision side per variant, then each method's
    prefill against no reduction and against its ideal: the selection's cost, its share of the saving,
    its FLOPs next to the decoder's, and whether it pays (files written before the costs: the forward
    and its language-model part against no reduction, with FLOPs and KV ratios)."""
    results = _load(root, path)
    model = results["model"]
    load = results.get("load_average_before_after")
    lines = [(f"`{results['command']}`: " if "command" in results else "")
             + f"{results['rounds']} interleaved rounds, {results['threads']} torch thread(s); a LLaVA-1.5-shaped model with "
             f"random weights: CLIP-L/14-336 tower ({model['vision_layers']} layers), {model['layers']}-layer Llama decoder "
             f"of width {model['hidden']}. Ratios are medians of per-round ratios to no reduction."
             + (f" 1-minute load average {load[0][0]:.1f} → {load[1][0]:.1f} (before → after the prefill rounds) on "
                f"{results['cpus']} CPUs." if load else ""), "",
             "| vision side | median s | time vs no reduction |", "|---|---|---|"]
    for name, row in results["vision"].items():
        lines.append(f"| {name} | {row['median_s']:.2f} | {row['ratio']:.3f} |")
    if "ideals" in results:  # each method against its ideal (duet_vlm.bench.prefill.costs_markdown, what the command prints)
        lines += ["", prefill.costs_markdown(results["prefill"], results["ideals"], results["rounds"]), "", COSTS_LEGEND]
        return "\n".join(lines) + "\n"
    head = ["prefill", "visual tok/layer", "forward s", "forward vs full", "LM s", "LM vs full", "exact FLOPs ratio",
            "KV ratio"]
    lines += ["", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, row in results["prefill"].items():
        lines.append("| " + " | ".join([
            name, f"{row['avg_visual_tokens']:.1f}", f"{row['forward_median_s']:.2f}", f"{row['forward_ratio']:.3f}",
            f"{row['language_model_median_s']:.2f}", f"{row['language_model_ratio']:.3f}", f"{row['flops_ratio']:.3f}",
            f"{row['kv_ratio']:.3f}"]) + " |")
    return "\n".join(lines) + "\n"


COSTS_LEGEND = (
    "*vs ideal*: the forward against its ideal, the unpatched model on the same per-layer visual token counts with "
    "nothing choosing them (the tower on every tile or frame, the projector on the kept tokens, the decoder's own "
    "layers). *selection cost*: the median per-round forward − ideal; *cost / saving*: that over the median per-round "
    "unreduced − ideal (what the token counts save). *selection GFLOPs*: the matrix products of the selection where "
    "a method's count is declared (`duet_vlm.bench.selection`; — where none is); *extra projector GFLOPs*: the rows "
    "its forward projects beyond the ideal's, counted by a hook; *decoder GFLOPs*: exact. *pays?* is **no** where "
    "the forward takes at least the unreduced forward's time, i.e. the selection costs more than its tokens save on "
    "this geometry (in brackets: the rounds in which it was faster). *cannot run*: why the method has no plan here.")

FAMILY_NAMES = {"llava": "LLaVA-1.5", "llava_next": "LLaVA-NeXT", "video_llava": "Video-LLaVA", "qwen3_5": "Qwen3.5",
                "internvl": "InternVL", "gemma3": "Gemma 3", "gemma4": "Gemma 4"}


def render_family(root: Path, *paths: str) -> str:
    """``duet-vlm bench --family F --output FILE`` for each file: the language-model part of the prefill
    per variant, against the unreduced model and against the ideal (the unpatched decoder fed the same
    per-layer token counts), with the exact FLOPs and KV ratios; then, where the file has them, the
    whole forward against both, the selection's cost and share of the saving, its declared FLOPs and
    whether it pays (``COSTS_LEGEND``), and why a method cannot run on the geometry."""
    files = [_load(root, path) for path in paths]
    costs = any("ideals" in results for results in files)  # files written before the costs lack their columns
    head = ["geometry", "variant", "visual tok/layer", "LM time vs unreduced", "LM time vs ideal", "exact FLOPs ratio",
            "KV ratio"] + (["forward vs unreduced", "forward vs ideal", "selection cost s", "cost / saving",
                            "selection GFLOPs", "extra projector GFLOPs", "decoder GFLOPs", "pays?"] if costs else [])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def number(row, key, digits, scale=1.0):
        return "" if key not in row else "—" if row[key] is None else f"{row[key] * scale:.{digits}f}"

    for results in files:
        family = FAMILY_NAMES.get(results["family"], results["family"])
        for i, (name, row) in enumerate(results["variants"].items()):
            if "error" in row:
                lines.append("| " + " | ".join([family if i == 0 else "", name, f"cannot run: {row['error']}"]
                                               + [""] * (len(head) - 3)) + " |")
                continue
            tokens = "all" if row["avg_visual_tokens"] is None else f"{row['avg_visual_tokens']:.1f}"
            if row["avg_visual_tokens"] is None:
                forward = f", {row['forward_s']:.2f} s forward" if costs else ""
                name = f"{name} ({row['language_model_s']:.2f} s LM{forward}, {results['rounds']} rounds)"
            cells = [family if i == 0 else "", name, tokens, f"{row['lm_vs_full']:.3f}",
                     f"{row['lm_vs_ideal']:.3f}" if "lm_vs_ideal" in row else "", f"{row['flops_ratio']:.3f}",
                     f"{row['kv_ratio']:.3f}"]
            if costs:
                paid = "" if "pays" not in row else f"{'yes' if row['pays'] else '**no**'} ({row['rounds_paid']}/{results['rounds']})"
                cells += [number(row, "forward_vs_unreduced", 3), number(row, "forward_vs_ideal", 3),
                          number(row, "selection_cost_s", 2), number(row, "cost_share_of_saving", 2),
                          number(row, "selection_flops", 2, 1e-9), number(row, "projector_extra_flops", 2, 1e-9),
                          number(row, "decoder_flops", 1, 1e-9), paid]
            lines.append("| " + " | ".join(cells) + " |")
            if costs and row["avg_visual_tokens"] is None:  # how far the ideal's own path is from the model's
                calibration = prefill.ideal_of_no_reduction(results.get("ideals", {}), row)
                if calibration is not None:
                    lines.append("| " + " | ".join(["", "ideal of no reduction", "all", "", "", "", "",
                                                    f"{calibration['forward_vs_unreduced']:.3f}"]
                                                   + [""] * (len(head) - 8)) + " |")
    for results in files:  # a family that builds its own masks: what one build costs
        rebuild = results.get("mask_rebuild_s")
        if rebuild is not None:
            unreduced = next(row for row in results["variants"].values() if row.get("avg_visual_tokens", 0) is None)
            family = FAMILY_NAMES.get(results["family"], results["family"])
            lines += ["", f"{family}: one build of the model's own masks over the whole prompt (what the runtime does at "
                      f"the entry and at each boundary, over at most as many tokens) takes {rebuild * 1e3:.2f} ms "
                      f"(median of {results['rounds']}), {rebuild / unreduced['language_model_s']:.2%} of the unreduced "
                      "language model's time."]
    return "\n".join(lines) + "\n"


def render_lm_vs_ideal(root: Path, *paths: str) -> str:
    """Several runs of ``duet-vlm bench --family F`` per family (the files in order; a family's runs
    beside each other): each reduced variant's language-model time against its ideal in each run,
    their median, and whether that median is within 2% of the ideal; beside them, where the runs
    timed the decoder layers, the medians over the runs of where the time went (``layer_time_terms``:
    the layers against the ideal's same layers, and the runtime's own work outside them as a share
    of the ideal); then each run's load average before and after, its allocator and, where the run
    recorded it, its processor."""
    runs: dict[str, list[dict]] = {}
    for path in paths:
        results = _load(root, path)
        runs.setdefault(results["family"], []).append(results)
    most = max(len(found) for found in runs.values())
    head = ["geometry", "variant", *[f"run {i + 1}" for i in range(most)], "median", "within 2%?",
            "layers vs ideal", "runtime's own work"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for family, found in runs.items():
        first = True
        for name, row in found[0]["variants"].items():
            if row.get("avg_visual_tokens", 0) is None:
                continue  # the unreduced row has no ideal of its own
            ratios = [results["variants"].get(name, {}).get("lm_vs_ideal") for results in found]
            if any(ratio is None for ratio in ratios):
                error = next((r["variants"][name]["error"] for r in found if "error" in r["variants"].get(name, {})), "")
                cells = [f"cannot run: {error}" if error else "not in every run"] + [""] * (most + 3)
            else:
                middle = statistics.median(ratios)
                cells = [f"{ratio:.3f}" for ratio in ratios] + [""] * (most - len(ratios))
                cells += [f"{middle:.3f}", "yes" if middle <= 1.02 else "**no**"]
                terms = [[r["variants"][name].get(key) for r in found] for key in ("layers_vs_ideal", "runtime_work_vs_ideal")]
                cells += ["" if None in values else form.format(statistics.median(values))
                          for values, form in zip(terms, ("{:.3f}", "{:+.2%}"))]
            lines.append("| " + " | ".join([FAMILY_NAMES.get(family, family) if first else "", name, *cells]) + " |")
            first = False
    lines.append("")
    for family, found in runs.items():
        loads = "; ".join(f"{r['load_average_before_after'][0][0]:.2f} -> {r['load_average_before_after'][1][0]:.2f}"
                          for r in found)
        allocators = sorted({r.get("allocator", "system") for r in found})
        processors = sorted({f"{r['processor']['model']} ({r['processor']['capability']})"
                             for r in found if "processor" in r})
        lines.append(f"{FAMILY_NAMES.get(family, family)}: {found[0]['rounds']} rounds per run; 1-minute load average "
                     f"before -> after each run: {loads}; allocator: {', '.join(allocators)}"
                     + (f"; processor: {', '.join(processors)}" if processors else "") + ".  ")
    return "\n".join(lines) + "\n"


def render_layer_kinds(root: Path, path: str) -> str:
    """A hybrid decoder's ``duet-vlm bench --family`` by kind of decoder layer: the seconds spent in
    each kind's layers (median over rounds), their per-round ratio to no reduction and to the
    variant's ideal, and that kind's exact FLOPs and cache ratios (a linear-attention layer's state
    does not shrink)."""
    results = _load(root, path)
    head = ["variant", "layers", "s in these layers", "vs unreduced", "vs ideal", "exact FLOPs ratio", "cache ratio"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, row in results["variants"].items():
        if "layer_kind_s" not in row:
            continue
        for i, (kind, seconds) in enumerate(row["layer_kind_s"].items()):
            ideal = row.get("layer_kind_vs_ideal", {}).get(kind)
            lines.append("| " + " | ".join([
                name if i == 0 else "", kind.replace("_", " "), f"{seconds:.3f}", f"{row['layer_kind_vs_full'][kind]:.3f}",
                "" if ideal is None else f"{ideal:.3f}", f"{row['layer_kind_flops_ratio'][kind]:.3f}",
                f"{row['layer_kind_cache_ratio'][kind]:.3f}"]) + " |")
    return "\n".join(lines) + "\n"


def render_compile(root: Path, path: str) -> str:
    """The compiled-against-eager generation benchmark (``duet_vlm.bench.compiled``)."""
    results = _load(root, path)
    head = ["variant", "eager s", "compiled s", "compiled / eager", "compiled vs compiled all tokens",
            "warm-up (compile) s", "same tokens"]
    lines = [f"`{results['command']}`: {results['new_tokens']} new tokens, greedy, {results['rounds']} interleaved "
             f"rounds, {results['threads']} threads, torch {results['torch']}.", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, row in results["variants"].items():
        lines.append("| " + " | ".join([
            name, f"{row['eager_s']:.2f}", f"{row['compiled_s']:.2f}", f"{row['compiled_vs_eager']:.3f}",
            f"{row['compiled_vs_all_tokens_compiled']:.3f}", f"{row['warmup_s']:.0f}",
            "yes" if row["same_tokens"] else "no"]) + " |")
    return "\n".join(lines) + "\n"


def render_gpu(root: Path, path: str) -> str:
    """``duet-vlm bench --gpu``'s record (``duet_vlm.bench.gpu``), or that none has been committed yet."""
    if not (root / path).exists():
        return (f"**Not yet run**: no `{path}` is committed. No GPU was lent to the work that wrote the command; "
                "its recipe for a GPU machine is on [Check it on your machine](check.md#the-speed-table-on-a-gpu).\n")
    record = _load(root, path)
    return f"`{record['command']}`, {record['elapsed_s']:.0f} s in all.\n\n" + gpu.markdown(record)


def render_stage_a(root: Path, path: str) -> str:
    """DUET Stage A's vision-side cost on a Qwen2.5-VL-7B-width tower (``duet_vlm.bench.vision.stage_a_cost``)."""
    results = _load(root, path)
    head = ["image patches", "merged tokens", "rounds", "tower s", "Stage A s", "Stage A in tower blocks",
            "share of the 32-block tower"]
    lines = [f"`{results['command']}`", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for run in results["runs"]:
        lines.append("| " + " | ".join([
            f"{run['image_patches']:,}", f"{run['merged_tokens']:,}", str(run["rounds"]), f"{run['tower_s']:.1f}",
            f"{run['stage_a_s']:.2f}", f"{run['stage_a_in_tower_blocks']:.2f}",
            f"{100 * run['share_of_32_block_tower']:.1f}%"]) + " |")
    return "\n".join(lines) + "\n"


def render_pixelprune_encoder(root: Path, path: str) -> str:
    """PixelPrune's encoder cost on a Qwen2.5-VL-7B-width tower, against the tower on every patch and
    the ideal (``python -m duet_vlm.bench.vision``: ``duet_vlm.bench.vision.pixelprune_encoder_cost``)."""
    results = _load(root, path)
    clip = results["runs"][0]["tower"].get("family") == "llava"
    head = ["image, options" if clip else "page (patches)", "tokens kept", "tower s", "PixelPrune s", "ideal s",
            "selection s", "PixelPrune / tower", "PixelPrune / ideal", "layer FLOPs kept" if clip else "block FLOPs kept",
            "kept features = ideal"]
    lines = [f"`{results['command']}`", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for run in results["runs"]:
        seconds = run["seconds"]
        options = ", ".join(f"{key} {value}" for key, value in run.get("options", {}).items()) or "threshold 0"
        lines.append("| " + " | ".join([
            f"{run['image']}, {options}" if clip else f"{run['image_patches']:,}",
            f"{run['kept_tokens']} of {run['merged_tokens']}", f"{seconds['tower']:.2f}",
            f"{seconds['pixelprune']:.2f}", f"{seconds['ideal']:.2f}", f"{seconds['selection']:.3f}",
            f"{run['pixelprune_vs_tower']:.3f}", f"{run['pixelprune_vs_ideal']:.3f}",
            f"{100 * run['block_flops']['ratio']:.1f}%", "yes" if run["kept_features_equal_ideal"] else "no"]) + " |")
    first = results["runs"][0]
    tower = (f"CLIP-L/14-336 (LLaVA-1.5-7B's) with {first['tower']['depth']} layers and the 7B projector" if clip else
             f"Qwen2.5-VL-7B's vision width with {first['tower']['depth']} blocks (the last one full attention)")
    lines += ["", f"The tower: {tower}, {first['rounds']} interleaved rounds, {first['threads']} threads, "
              f"torch {results['torch']}."]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- figures
def _figure_inputs(root: Path, paths: tuple[str, ...]) -> tuple[list[str], list[str]]:
    """A figure block's files: the evaluations (``duet-vlm eval`` results) and the benchmarks."""
    evaluations = [p for p in paths if figures.is_evaluation(_load(root, p))]
    return evaluations, [p for p in paths if p not in evaluations]


def render_figure(root: Path, out: str, *paths: str) -> str:
    """``docs/figures.py``'s figure for one evaluation (one results file, or several of the same
    evaluation) and the benchmarks that timed some of its rows, embedded with the commands that made
    its inputs and the digest it was drawn from."""
    evaluations, benches = _figure_inputs(root, paths)
    made = [f"accuracy and decoder FLOPs: `{_load(root, path).get('meta', {}).get('command') or 'duet-vlm eval'}` "
            f"(`{path}`)" for path in evaluations]
    for path in benches:
        runs = _load(root, path)
        for run in runs if isinstance(runs, list) else [runs]:
            made.append(f"latency: `duet-vlm bench --generate`, batch {run['batch']}, {run['rounds']} rounds, "
                        f"{run['threads']} thread(s) (`{path}`)")
    inputs = [root / p for p in (*evaluations, *benches)]
    return (f"![Which method and budget: accuracy retained against decoder FLOPs"
            f"{' and measured latency' if benches else ''}, one line per method over its budgets, the Pareto front "
            f"circled]({out})\n\n"
            f"Made from {'; '.join(made)}. Drawn by `python docs/render.py` (`docs/figures.py`); each line is a method "
            f"over its budgets (one without a budget over its options, each point at its average visual tokens), "
            f"circles mark the Pareto front (no other point keeps more for less).\n"
            f"<!-- figure inputs sha256: {figures.digest(inputs)} -->\n")


def figure_is_current(root: Path, out: str, *paths: str) -> bool:
    evaluations, benches = _figure_inputs(root, paths)
    return figures.recorded_digest(root / out) == figures.digest([root / p for p in (*evaluations, *benches)])


def draw_figure(root: Path, out: str, *paths: str) -> None:
    evaluations, benches = _figure_inputs(root, paths)
    figures.draw(root / out, [root / p for p in evaluations], [root / p for p in benches])


RENDERERS = {
    "model": render_model, "results": render_results, "beside": render_beside, "positions": render_positions,
    "adaptation": render_adaptation, "bench": render_bench, "vllm": render_vllm, "vllm_memory": render_vllm_memory,
    "adaptive": render_adaptive,
    "schedules": render_schedules, "plan": render_plan, "prefill": render_prefill, "family": render_family,
    "compile": render_compile, "stage_a": render_stage_a, "figure": render_figure, "modes": render_modes,
    "live": render_live, "layer_kinds": render_layer_kinds, "lm_vs_ideal": render_lm_vs_ideal, "check": render_check, "ladder": render_ladder, "processes": render_processes,
    "pixelprune_encoder": render_pixelprune_encoder, "gpu": render_gpu,
}
# Kinds whose block stands for a file that is drawn beside the page (the figure's PNG).
FILES = {"figure": (figure_is_current, draw_figure)}


def render_page(text: str, root: Path, stale_files: list[str] | None = None, draw: bool = False) -> str:
    """``text`` with every generated block re-rendered from its files (paths relative to ``root``).

    A block that stands for a file (a figure) also checks that file: a stale one is redrawn when
    ``draw``, and its path appended to ``stale_files`` otherwise."""
    def replace(match: re.Match) -> str:
        kind, *args = match["spec"].split()
        if kind not in RENDERERS:
            raise ValueError(f"unknown generated block {kind!r}; known: {', '.join(RENDERERS)}")
        if kind in FILES:
            current, write = FILES[kind]
            if not current(root, *args):
                if draw:
                    write(root, *args)
                elif stale_files is not None:
                    stale_files.append(str(root / args[0]))
        return match.group(1) + RENDERERS[kind](root, *args) + match.group(4)

    return GENERATED_BLOCK.sub(replace, text)


render_readme = render_page  # the README is one page among others


def file_digest(path: Path) -> str:
    """The short digest a reading records: the first 12 hex digits of the file's SHA-256."""
    return hashlib.sha256(path.read_bytes()).hexdigest()[:12]


def stale_readings(text: str, root: Path) -> list[str]:
    """The files whose prose reading in ``text`` was written for other contents (or that are gone)."""
    stale = []
    for match in READING.finditer(text):
        for entry in match["files"].split():
            name, _, recorded = entry.rpartition("@")
            path = root / name
            if not path.exists() or file_digest(path) != recorded:
                stale.append(name)
    return stale


def accept_readings(text: str, root: Path) -> str:
    """``text`` with every reading's digests set to its files' current contents."""
    def replace(match: re.Match) -> str:
        entries = [entry.rpartition("@")[0] for entry in match["files"].split()]
        return "<!-- reading: " + " ".join(f"{name}@{file_digest(root / name)}" for name in entries) + " -->"

    return READING.sub(replace, text)


def pages(root: Path = ROOT) -> list[Path]:
    """The README and every page of the site that has a generated block or a reading."""
    found = [root / "README.md", *sorted((root / "docs").rglob("*.md"))]
    return [p for p in found if p.exists() and ("<!-- generated:" in p.read_text() or "<!-- reading:" in p.read_text())]


def main(argv: list[str] | None = None) -> int:
    """``python docs/render.py [PAGE...] [--check | --accept-readings]``: regenerate (or check) the
    generated blocks and figures of the pages (default: README.md and every page under docs/)."""
    args = list(sys.argv[1:] if argv is None else argv)
    check, accept = "--check" in args, "--accept-readings" in args
    paths = [Path(a) for a in args if not a.startswith("--")] or pages()
    stale, stale_files, readings = [], [], []
    for path in paths:
        text = path.read_text()
        root = path.resolve().parent
        fresh = render_page(text, root, stale_files, draw=not check)
        if accept:
            fresh = accept_readings(fresh, root)
        readings += [f"{path}: {name}" for name in stale_readings(fresh, root)]
        if fresh != text:
            stale.append(path)
            if not check:
                path.write_text(fresh)
    failed = False
    if check and stale:
        print(f"stale generated blocks in {', '.join(map(str, stale))}: run python docs/render.py", file=sys.stderr)
        failed = True
    if stale_files:
        print(f"stale figures {', '.join(stale_files)}: run python docs/render.py", file=sys.stderr)
        failed = True
    if readings:
        print("prose written for other numbers (re-read it against the new file, then run python docs/render.py "
              "--accept-readings PAGE):\n  " + "\n  ".join(readings), file=sys.stderr)
        failed = failed or check
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
