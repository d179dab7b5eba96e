"""Every method at every budget on the synthetic visual-QA benchmark, on a demo model (``duet-vlm eval``):
a miniature of the papers' Table 1.

Each finished row is saved in ``OUTPUT_DIR/rows/`` with everything that determines it (method,
budget, position option, split, n, batch size, the weights' SHA-256), so an interrupted run picks
up where it stopped; a row saved under other settings or other weights is computed again. Each row
records the reducer that ran (``reducer``: its ``to_dict()``, which ``duet_vlm.from_dict`` rebuilds),
the visual tokens per layer each question's image kept (``item_tokens``: drawn in ``counts.png``)
and the accuracy by the number of objects in the scene (``per_objects``).

A method's options follow its name, ``NAME:KEY=VALUE,...`` (values read as JSON where they parse,
else as text): ``pixelprune:metric=mae,threshold=0.05``; the row is labelled with the whole spec. A
method without a budget (PixelPrune: its count follows each image) gets one row, whatever the
budgets.

``adaptive=SIGNAL`` runs every method with a content-adaptive budget (``duet_vlm.Adaptive``): each
method and budget calibrated on ``calibration_n`` scenes of the validation split (or at the given
``threshold``); a row then reports the asked budget (``budget``) and the realised average over the
evaluation (``avg_visual_tokens``), side by side in ``results.md``.

>>> run = evaluate_methods(["duet", "fastv"], [192, 64], n=70, output_dir=Path("out"))   # doctest: +SKIP
>>> [(row["method"], row["budget"], row["accuracy"]) for row in run.rows]               # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from .. import synthetic
from ..adapters import adapter_for
from ..evaluation import count_histogram_plot, retention_plot, sample_batches, takes_positions, weights_digest, write_results
from ..methods import METHODS, Adaptive, Compose, make
from ..plan import resolve_positions
from .evaluate import evaluate_accuracy, load_demo, shipped_or_given

def method_spec(spec: str) -> tuple[str, dict]:
    """``(method, options)`` of ``NAME`` or ``NAME:KEY=VALUE,...`` (values as JSON where they parse; a
    comma inside brackets belongs to its list).

    >>> method_spec("pixelprune:metric=mae,threshold=0.05")
    ('pixelprune', {'metric': 'mae', 'threshold': 0.05})
    >>> method_spec("duet:ratios=[0.5,0.25],vision_scores=norm")
    ('duet', {'ratios': [0.5, 0.25], 'vision_scores': 'norm'})
    """
    name, _, rest = spec.partition(":")
    parts, depth, start = [], 0, 0
    for index, character in enumerate(rest):
        depth += {"[": 1, "]": -1}.get(character, 0)
        if character == "," and depth == 0:
            parts.append(rest[start:index])
            start = index + 1
    parts.append(rest[start:])
    return name, method_options(filter(None, parts), f"comma-separated: {spec!r} has")


def method_options(parts, where: str = "given") -> dict:
    """A method's options from ``KEY=VALUE`` strings (values as JSON where they parse).

    >>> method_options(["ratios=[0.28,0.25,0]", "seed=3", "query=last"])
    {'ratios': [0.28, 0.25, 0], 'seed': 3, 'query': 'last'}
    """
    options = {}
    for part in parts:
        key, equals, value = part.partition("=")
        if not equals or not key:
            raise ValueError(f"method options are KEY=VALUE, {where} {part!r}")
        try:
            options[key] = json.loads(value)
        except json.JSONDecodeError:
            options[key] = value
    return options


#: ``progress(advance, description=None, total=None)``: questions answered since the last call; the
#: first call gives the run's total.
Progress = Callable[..., None]


@dataclass
class EvalRun:
    """What ``evaluate_methods`` measured and wrote."""

    rows: list[dict]
    types: list[str]  # the question types measured, in table order
    paths: list[Path]  # results.json, results.csv, results.md, retention.png, counts.png


def evaluate_methods(
    methods: Optional[list[str]] = None,
    budgets: tuple[int, ...] = (192, 128, 64),
    n: int = 500,
    split: str = "test",
    model_path: Optional[Path] = None,
    output_dir: Path = Path("duet_eval"),
    batch_size: int = 8,
    control: bool = True,
    positions: Optional[str] = None,
    resume: bool = True,
    command: Optional[str] = None,
    progress: Optional[Progress] = None,
    adaptive: Optional[str] = None,
    threshold: Optional[float] = None,
    calibration_n: int = 140,
    method_files: Optional[Path] = None,
    demo: str = "llava",
) -> EvalRun:
    """Accuracy of all tokens, of each method (default: every registered one) at each budget, and
    with the image blanked (``control``); ``positions`` sets the position mode of every method
    that has one; ``adaptive``: a content-adaptive budget from that signal (module docstring).
    Writes ``output_dir``'s results files (``command``: the command line, for them). ``method_files``:
    a directory holding what a method saved beside a fine-tuned model (VisionSelector's trained
    scorer), read instead of ``model_path``'s. ``demo``: which shipped demo model runs when there is no
    ``model_path`` (``DEMO_MODELS``: ``"llava"`` or ``"qwen2_5_vl"``)."""
    chosen = methods or [name for name in METHODS if name != "full"]
    specs = {spec: method_spec(spec) for spec in chosen}
    unknown = [part for name, _ in specs.values() for part in name.split("+") if part not in METHODS]
    if unknown:
        raise ValueError(f"unknown methods {unknown}; registered: {', '.join(sorted(METHODS))}")
    if any(name.count("+") > 1 for name in chosen):
        raise ValueError("a composition is VISION+LANGUAGE: two methods (e.g. divprune+random_horizon)")
    if any("+" in name and given for name, given in specs.values()):
        raise ValueError("options (NAME:KEY=VALUE) are for a single method, not a composition")
    if len(set(chosen)) != len(chosen):
        raise ValueError(f"a method spec is given twice: {chosen}")
    if positions not in (None, "original", "contiguous"):
        raise ValueError(f"--positions must be original or contiguous, got {positions!r}")
    if n < 1:
        raise ValueError(f"--n must be at least 1 (questions per row), got {n}")
    directory = shipped_or_given(demo, model_path)
    if batch_size < 1:
        raise ValueError(f"--batch-size must be at least 1, got {batch_size}")
    if threshold is not None and adaptive is None:
        raise ValueError("--threshold needs --adaptive SIGNAL (the signal the threshold belongs to)")
    if calibration_n < 1:
        raise ValueError(f"--calibration-n must be at least 1 (validation scenes), got {calibration_n}")
    report = progress or (lambda advance, description=None, total=None: None)
    output_dir = Path(output_dir)

    def options(spec: str) -> dict:
        """The options of a method spec: its own, and ``positions`` where the method has that option."""
        name, given = specs.get(spec) or method_spec(spec)
        return {**given, **({"positions": positions} if positions and takes_positions(METHODS[name]) else {})}

    def base(spec: str) -> str:
        return (specs.get(spec) or method_spec(spec))[0]

    def saved(name: str) -> dict:
        """What the method saved beside the model (VisionSelector's trained scorer), if anything."""
        directory = method_files or model_path
        return METHODS[name].load_objects(directory) if directory is not None else {}

    files_digest = None
    if method_files is not None:
        if not Path(method_files).is_dir():
            raise ValueError(f"--method-files {method_files}: not a directory")
        files_digest = hashlib.sha256(b"".join(
            path.name.encode() + path.read_bytes() for path in sorted(Path(method_files).iterdir()) if path.is_file()
        )).hexdigest()

    def build(spec: str, budget: int | None):
        """``make(name, budget=..., **options)`` with what the method saved beside the model, or for
        ``VISION+LANGUAGE`` the two composed under the budget (``Compose``: the paper's "DivPrune +
        random" is ``divprune+random_horizon``)."""
        name = base(spec)
        if "+" not in name:
            return make(name, **({} if budget is None else {"budget": budget}), **options(spec), **saved(name))
        vision, language = name.split("+")
        return Compose(make(vision, **options(vision)), make(language, **options(language)), budget=budget)

    def takes_budget(spec: str) -> bool:
        return all(METHODS[part].takes_budget for part in base(spec).split("+"))

    # every reducer is built (and its method, budget and options checked) before the model loads
    configs = [("full", None, make("full"))]
    configs += [(spec, budget, build(spec, budget)) for spec in chosen
                for budget in (budgets if takes_budget(spec) else (None,))]
    if adaptive is not None:
        configs[1:] = [(name, budget, Adaptive(reducer, signal=adaptive, threshold=threshold))
                       for name, budget, reducer in configs[1:]]
    model, processor = load_demo(directory)
    geometry = adapter_for(model).geometry
    digest = weights_digest(directory)
    if adaptive is not None and threshold is None and len(configs) > 1:
        # one recording of the validation scenes (the signal reads the vision encoder only), fitted
        # for each method and budget
        report(0, f"calibrating on {calibration_n} validation scenes")
        recorded = configs[1][2].record(model, sample_batches(processor, "synthetic:validation", calibration_n, batch_size))
        configs[1:] = [(name, budget, reducer.fit(recorded)) for name, budget, reducer in configs[1:]]
    report(0, "evaluating", n * (len(configs) + control))

    def measure(name: str, budget: int | None, reducer) -> dict:
        costs = {"flops": 0, "rows": 0}

        def collect(message):
            stats = reducer.stats
            rows_now = len(stats.text_tokens)
            costs["flops"] += stats.flops_exact
            costs["rows"] += rows_now
            report(rows_now, f"{name} {budget or ''}")

        result = evaluate_accuracy(
            model, processor, split=split, n=n, batch_size=batch_size, wrap=lambda: reducer(model), progress=collect,
            return_predictions=True, reducer=reducer,
        )
        # the mode a method with a position option ran in (its default resolved on this model)
        mode = None
        if name != "full" and takes_positions(METHODS[base(name).split("+")[-1]]):
            # resolved for the images evaluated (a Qwen-VL adapter's default image has 1,024 tokens: a
            # budget that fits the demo's 144 may not fit there)
            item = reducer.stats.items[0]
            (_, rows, cols), = item.views
            seen = dataclasses.replace(geometry, visual_tokens=item.tokens, grid=(rows, cols))
            mode = resolve_positions(reducer.resolve(seen).positions, seen)
        item_tokens = [prediction["visual_tokens"] for prediction in result["predictions"]]
        row = {
            "method": name,
            "budget": budget,
            "accuracy": result["accuracy"],
            "per_type": result["per_type"],
            "per_objects": result["per_objects"],
            "n": result["n"],
            "positions": mode,
            # the realised average over the evaluation: every question's image, each its own count
            "avg_visual_tokens": sum(item_tokens) / len(item_tokens),
            "decoder_tflops_per_sample": costs["flops"] / max(costs["rows"], 1) / 1e12,
            "reducer": reducer.to_dict(),
            "item_tokens": item_tokens,
        }
        if isinstance(reducer, Adaptive):
            row.update(adaptive=reducer.signal, threshold=reducer.threshold)
        return row

    def blank_image_row() -> dict:
        blank = evaluate_accuracy(model, processor, split=split, n=n, batch_size=batch_size, blank_image=True,
                                  progress=lambda message: report(batch_size))
        return {"method": "blank image", "budget": None, "accuracy": blank["accuracy"], "per_type": blank["per_type"],
                "n": blank["n"], "avg_visual_tokens": float("nan"), "decoder_tflops_per_sample": float("nan")}

    def saved_row(name: str, budget: int | None, compute, reducer=None) -> dict:
        """``compute()``'s row, or the one a previous run with the same settings saved."""
        key = {"method": name, "budget": budget, "options": options(name) if base(name) in METHODS else {}, "split": split,
               "n": n, "batch_size": batch_size, "weights_sha256": digest,
               "reducer": reducer.to_dict() if reducer is not None else None, "method_files_sha256": files_digest}
        kind = f"-adaptive-{reducer.signal}" if isinstance(reducer, Adaptive) else ""
        stem = re.sub(r"[^\w.+-]", "_", name)  # a spec's options too
        path = output_dir / "rows" / f"{stem}-{budget or 'all'}{kind}.json"
        if resume and path.exists() and (saved := json.loads(path.read_text()))["key"] == key:
            report(n, f"{name} {budget or ''} (saved)")
            return saved["row"]
        row = compute()
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"key": key, "row": row}, indent=2) + "\n")
        return row

    rows = [saved_row(name, budget, lambda name=name, budget=budget, reducer=reducer: measure(name, budget, reducer), reducer)
            for name, budget, reducer in configs]
    if control:
        rows.append(saved_row("blank image", None, blank_image_row))
    full_accuracy = rows[0]["accuracy"]
    for row in rows:
        row["retained_percent"] = 100 * row["accuracy"] / full_accuracy if full_accuracy else float("nan")

    types = [t for t in synthetic.QUESTION_TYPES if t in rows[0]["per_type"]]
    output_dir.mkdir(parents=True, exist_ok=True)
    meta = {
        "command": command,
        "split": split,
        "n": n,
        "model": str(model_path or ("shipped demo model" if demo == "llava" else f"shipped demo model {demo}")),
        "method_files": str(method_files) if method_files is not None else None,
        "weights_sha256": digest,
        "positions": positions,
        "adaptive": adaptive,
        "threshold": threshold,
        "calibration_n": calibration_n if adaptive is not None and threshold is None else None,
        "chance": {t: synthetic.CHANCE[t] for t in types},
    }
    paths = write_results(rows, output_dir, meta=meta)
    paths.append(retention_plot(rows, output_dir / "retention.png"))
    counted = [(f"{row['method']} {row['budget'] or ''}".strip(), row["item_tokens"]) for row in rows if row.get("item_tokens")]
    paths.append(count_histogram_plot(counted, output_dir / "counts.png",
                                      title="visual tokens per layer of each question's image"))
    return EvalRun(rows, types, paths)
