"""Fixed against content-adaptive budgets on the demo benchmark, at the same realised average
(issue #25): ``python -m duet_vlm.demo.adaptive_study``.

1. **Calibration.** Each signal of ``duet_vlm.content`` (coverage, distinct, rank) is recorded once
   over ``calibration_n`` validation scenes (``Adaptive.record``; a signal's curve reads the vision
   encoder only) and fitted for every method and budget (``Adaptive.fit``: the threshold at which
   those scenes average the budget, each item's budget within the floor and the ceiling and
   reachable by the method).
2. **The signal, picked on validation.** Each method at ``comparison_budget`` with a fixed budget
   and with each signal, on ``validation_n`` validation questions. The rule: the signal with the
   highest validation accuracy averaged over the methods (ties: the order of ``SIGNALS``).
3. **The test.** On the test split (``n`` questions, as ``duet-vlm eval``), for each method and
   budget: adaptive with the chosen signal (and with each of ``also``, by default coverage, the
   signal that spreads the budgets most), then fixed at the adaptive run's realised average
   (rounded; the asked budget when they are within a token), so both rows spend the same visual
   tokens per layer; and all tokens once. Each row keeps every question's type, the number of
   objects in its scene, its correctness and its visual tokens per layer.

Every finished row is saved in ``OUTPUT/rows/`` with everything that determines it (and the
calibration in ``OUTPUT/rows/calibration-SIGNAL.json``), so an interrupted run resumes where it
stopped: run the same command again. ``OUTPUT/results.json`` (rendered into the README by
``docs/render.py``'s ``adaptive`` block) and ``OUTPUT/counts.png`` are written at the end.

>>> study = run_study(n=504, output_dir=Path("docs/eval/adaptive"))      # doctest: +SKIP
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import torch

from .. import synthetic
from ..content import SIGNALS, Curve
from ..evaluation import count_histogram_plot, weights_digest
from ..geometry import Geometry
from ..methods import Adaptive, make
from ..methods.adaptive import Recorded
from .evaluate import DEMO_MODEL_DIR, evaluate_accuracy, load_demo
from .processor import prompt

METHODS = ("duet", "visionzip", "pyramiddrop")
BUDGETS = (64, 128, 192)


def paired_difference(first: list[bool], second: list[bool]) -> tuple[float, float]:
    """Mean of ``first - second`` over the same questions and its standard error (paired).

    >>> paired_difference([True, True, False, False], [True, False, False, False])
    (0.25, 0.25)
    """
    diffs = [int(a) - int(b) for a, b in zip(first, second)]
    mean = sum(diffs) / len(diffs)
    spread = statistics.stdev(diffs) if len(diffs) > 1 else float("nan")
    return mean, spread / math.sqrt(len(diffs))


def _batches(processor, split: str, n: int, batch_size: int):
    for lo in range(0, n, batch_size):
        samples = [synthetic.sample(split, i) for i in range(lo, min(lo + batch_size, n))]
        yield processor(images=[s.image for s in samples], text=[prompt(s.question) for s in samples],
                        padding=True, return_tensors="pt")


def measure(model, processor, reducer, split: str, n: int, batch_size: int, log: Callable[[str], None]) -> dict:
    """One row: accuracy (overall, per question type, per number of objects in the scene), the
    realised visual tokens per layer, and every question's record."""
    started = time.time()
    result = evaluate_accuracy(model, processor, split=split, n=n, batch_size=batch_size, wrap=lambda: reducer(model),
                               return_predictions=True, reducer=reducer, progress=lambda message: None)
    predictions = result["predictions"]
    tokens = [p["visual_tokens"] for p in predictions]
    log(f"  {split} n={result['n']}: accuracy {result['accuracy']:.3f}, realised {sum(tokens) / len(tokens):.1f} "
        f"tokens/layer, {time.time() - started:.0f} s")
    return {
        "accuracy": result["accuracy"], "n": result["n"], "per_type": result["per_type"],
        "per_objects": result["per_objects"], "per_objects_n": result["per_objects_n"],
        "realised": sum(tokens) / len(tokens), "reducer": reducer.to_dict(),
        "questions": {"qtype": [p["qtype"] for p in predictions], "objects": [p["objects"] for p in predictions],
                      "correct": [p["correct"] for p in predictions], "tokens": tokens},
    }


def _load_recording(path: Path) -> dict:
    """A saved calibration recording, unpickled without running code: only tensors, plain values
    and the three classes a recording is made of are allowed."""
    with torch.serialization.safe_globals([Recorded, Curve, Geometry]):
        return torch.load(path, weights_only=True)


def run_study(
    methods: tuple[str, ...] = METHODS,
    budgets: tuple[int, ...] = BUDGETS,
    n: int = 504,
    validation_n: int = 210,
    calibration_n: int = 504,
    comparison_budget: int = 64,
    signal: Optional[str] = None,
    also: tuple[str, ...] = ("coverage",),
    batch_size: int = 8,
    model_path: Optional[Path] = None,
    output_dir: Path = Path("docs/eval/adaptive"),
    command: Optional[str] = None,
    log: Callable[[str], None] = print,
) -> dict:
    """The study (module docstring); ``signal`` skips the validation comparison. Returns what it
    writes to ``output_dir/results.json``."""
    output_dir = Path(output_dir)
    rows_dir = output_dir / "rows"
    rows_dir.mkdir(parents=True, exist_ok=True)
    model, processor = load_demo(model_path)
    digest = weights_digest(model_path or DEMO_MODEL_DIR)
    all_budgets = sorted(set(budgets) | {comparison_budget})

    def saved(name: str, key: dict, compute: Callable[[], dict]) -> dict:
        path = rows_dir / f"{name}.json"
        key = {**key, "weights_sha256": digest, "batch_size": batch_size}
        if path.exists() and (stored := json.loads(path.read_text()))["key"] == key:
            log(f"{name}: saved")
            return stored["row"]
        log(f"{name}: running")
        row = compute()
        path.write_text(json.dumps({"key": key, "row": row}) + "\n")
        return row

    # 1. calibration: one recording per signal (saved), fitted for every method and budget
    objects = [len(synthetic.sample("validation", i).scene) for i in range(calibration_n)]

    def recording(sig: str) -> list[Recorded]:
        path = rows_dir / f"calibration-{sig}.pt"
        key = {"signal": sig, "split": "validation", "n": calibration_n, "weights_sha256": digest, "batch_size": batch_size}
        if path.exists() and (stored := _load_recording(path))["key"] == key:
            log(f"calibration-{sig}: saved")
            return stored["recorded"]
        log(f"calibration-{sig}: recording {calibration_n} validation scenes")
        recorded = Adaptive(make("duet", budget=comparison_budget), signal=sig).record(
            model, _batches(processor, "validation", calibration_n, batch_size))
        torch.save({"key": key, "recorded": recorded}, path)
        return recorded

    recordings = {sig: recording(sig) for sig in SIGNALS}
    calibrations: dict[str, dict] = {}

    def adaptive(name: str, budget: int, sig: str) -> Adaptive:
        fitted = Adaptive(make(name, budget=budget), signal=sig).fit(recordings[sig])
        counts = fitted.counts(recordings[sig])
        by_objects: dict[str, list[int]] = {}
        for count, k in zip(counts, objects):
            by_objects.setdefault(str(k), []).append(count)
        calibrations.setdefault(sig, {}).setdefault(name, {})[str(budget)] = {
            "threshold": fitted.threshold, "realised": sum(counts) / len(counts), "stdev": statistics.pstdev(counts),
            "min": min(counts), "max": max(counts),
            "mean_by_objects": {k: sum(v) / len(v) for k, v in sorted(by_objects.items())},
            "correlation_with_objects": _correlation(counts, objects),
        }
        return fitted

    def row(split: str, count: int, label: str, reducer, **fields) -> dict:
        name = f"{split}-{label}".replace(" ", "_")
        key = {"split": split, "n": count, "reducer": reducer.to_dict()}
        measured = saved(name, key, lambda: measure(model, processor, reducer, split, count, batch_size, log))
        return {**fields, **measured}

    # 2. the signal, picked on validation
    comparison = []
    for name in methods:
        comparison.append(row("validation", validation_n, f"{name}-fixed-{comparison_budget}",
                              make(name, budget=comparison_budget), method=name, budget=comparison_budget, variant="fixed"))
        for sig in SIGNALS:
            comparison.append(row("validation", validation_n, f"{name}-{sig}-{comparison_budget}",
                                  adaptive(name, comparison_budget, sig), method=name, budget=comparison_budget,
                                  variant=sig))
    mean_accuracy = {variant: statistics.mean(r["accuracy"] for r in comparison if r["variant"] == variant)
                     for variant in ("fixed", *SIGNALS)}
    chosen = signal or max(SIGNALS, key=lambda s: (mean_accuracy[s], -SIGNALS.index(s)))
    log(f"validation accuracy averaged over {', '.join(methods)} at {comparison_budget}: "
        + ", ".join(f"{k} {v:.3f}" for k, v in mean_accuracy.items()) + f"; signal: {chosen}")

    # 3. the test: adaptive, then fixed at its realised average (the chosen signal first)
    signals = [chosen, *(s for s in also if s != chosen)]
    rows, comparisons = [], []
    for sig in signals:
        for budget in budgets:
            for name in methods:
                reducer = adaptive(name, budget, sig)
                adapted = row("test", n, f"{name}-{sig}-{budget}", reducer, method=name, budget=budget,
                              variant="adaptive", signal=sig)
                matched = budget if abs(adapted["realised"] - budget) <= 1 else round(adapted["realised"])
                fixed = row("test", n, f"{name}-fixed-{matched}", make(name, budget=matched), method=name, budget=budget,
                            variant="fixed", run_budget=matched, signal=sig)
                rows += [fixed, adapted]
                diff, error = paired_difference(adapted["questions"]["correct"], fixed["questions"]["correct"])
                comparisons.append({"method": name, "budget": budget, "signal": sig, "run_budget": matched,
                                    "fixed": fixed["accuracy"], "adaptive": adapted["accuracy"], "difference": diff,
                                    "paired_se": error, "fixed_realised": fixed["realised"],
                                    "adaptive_realised": adapted["realised"]})
    full = row("test", n, "full", make("full"), method="full", budget=None, variant="all tokens")
    rows.insert(0, full)
    results = {
        "meta": {
            "command": command, "n": n, "split": "test", "validation_n": validation_n, "calibration_n": calibration_n,
            "calibration_split": "validation", "comparison_budget": comparison_budget, "methods": list(methods),
            "budgets": list(budgets), "signal": chosen, "signal_given": signal is not None, "signals": signals,
            "rule": "the signal with the highest validation accuracy averaged over the methods at the comparison budget",
            "validation_accuracy": mean_accuracy, "floor": Adaptive.floor, "ceiling": Adaptive.ceiling,
            "weights_sha256": digest, "chance": {t: synthetic.CHANCE[t] for t in synthetic.QUESTION_TYPES},
        },
        "calibration": calibrations,
        "signal_comparison": [{k: v for k, v in r.items() if k != "questions"} for r in comparison],
        "comparisons": comparisons,
        "rows": rows,
    }
    (output_dir / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    count_histogram_plot([(f"{r['method']} {r['budget']}, {r['signal']}", r["questions"]["tokens"]) for r in rows
                          if r["variant"] == "adaptive" and r["method"] == methods[0]], output_dir / "counts.png",
                         title=f"{methods[0]}, adaptive: visual tokens per layer of each test image")
    log(f"wrote {output_dir / 'results.json'} and {output_dir / 'counts.png'}")
    return results


def _correlation(xs: list[float], ys: list[float]) -> float:
    """Pearson correlation (NaN when one side is constant).

    >>> round(_correlation([1, 2, 3], [2, 4, 7]), 3)
    0.993
    """
    mx, my = statistics.mean(xs), statistics.mean(ys)
    sxy = sum((x - mx) * (y - my) for x, y in zip(xs, ys))
    sxx, syy = sum((x - mx) ** 2 for x in xs), sum((y - my) ** 2 for y in ys)
    return sxy / math.sqrt(sxx * syy) if sxx and syy else float("nan")


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m duet_vlm.demo.adaptive_study", description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", nargs="+", default=list(METHODS))
    parser.add_argument("--budgets", nargs="+", type=int, default=list(BUDGETS))
    parser.add_argument("--n", type=int, default=504, help="test questions per row")
    parser.add_argument("--validation-n", type=int, default=210, help="validation questions per row of the signal comparison")
    parser.add_argument("--calibration-n", type=int, default=504, help="validation scenes the thresholds are calibrated on")
    parser.add_argument("--comparison-budget", type=int, default=64)
    parser.add_argument("--signal", choices=SIGNALS, default=None, help="skip the validation choice")
    parser.add_argument("--also", nargs="*", choices=SIGNALS, default=["coverage"],
                        help="signals measured on the test split besides the chosen one")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--model-path", type=Path, default=None)
    parser.add_argument("--output-dir", type=Path, default=Path("docs/eval/adaptive"))
    args = parser.parse_args(argv)
    command = " ".join(["python -m duet_vlm.demo.adaptive_study", *(sys.argv[1:] if argv is None else argv)])

    def log(line: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {line}", flush=True)

    run_study(tuple(args.methods), tuple(args.budgets), args.n, args.validation_n, args.calibration_n, args.comparison_budget,
              args.signal, tuple(args.also), args.batch_size, args.model_path, args.output_dir, command.strip(), log)
    return 0


if __name__ == "__main__":
    sys.exit(main())
