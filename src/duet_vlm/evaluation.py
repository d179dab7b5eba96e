"""Evaluation results as files: ``duet-vlm eval``'s ``results.json``, ``results.csv``, ``results.md``
and the retention-versus-budget figure, and the weights digest that ties a result to the weights
it measured.

A row is one method at one budget: ``method``, ``budget``, ``accuracy``, ``per_type`` (question
type -> accuracy), ``n``, ``retained_percent``, ``avg_visual_tokens``, ``decoder_tflops_per_sample``
(and ``reducer``, the reducer's ``to_dict()``, which ``duet_vlm.from_dict`` rebuilds).

>>> standard_error(0.5, 100)
0.05
>>> write_results(rows, Path("out"), meta={"split": "test", "n": 500})      # doctest: +SKIP
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
from pathlib import Path

from .synthetic import QUESTION_TYPES

#: Question types in the order tables show them.
QUESTION_ORDER = tuple(QUESTION_TYPES)


def standard_error(accuracy: float, n: int) -> float:
    """Binomial standard error of an accuracy measured on ``n`` questions."""
    return math.sqrt(accuracy * (1 - accuracy) / n) if n else float("nan")


def number(value, digits: int) -> str:
    """``value`` with ``digits`` decimals; empty for ``None`` and NaN."""
    return "" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def question_types(rows: list[dict]) -> list[str]:
    """The question types the rows measured, in table order."""
    present = {t for row in rows for t in row["per_type"]}
    return [t for t in QUESTION_ORDER if t in present]


def markdown_table(rows: list[dict], types: list[str], chance: dict[str, float] | None = None) -> str:
    """Accuracy (%) per question type, average with its standard error, % of full-token accuracy
    retained, visual tokens per layer and decoder TFLOPs per sample: one line per method and
    budget (and a last line with each type's chance level, when given)."""
    head = ["method", "budget", *types, "avg", "± s.e.", "% of full", "visual tok/layer", "decoder TFLOPs"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        cells = [row["method"], str(row["budget"] or "")]
        cells += [number(100 * row["per_type"][t], 1) if t in row["per_type"] else "" for t in types]
        cells += [number(100 * row["accuracy"], 1), number(100 * standard_error(row["accuracy"], row["n"]), 1),
                  number(row["retained_percent"], 1), number(row["avg_visual_tokens"], 1),
                  number(row["decoder_tflops_per_sample"], 4)]
        lines.append("| " + " | ".join(cells) + " |")
    if chance:
        cells = ["chance", "", *(number(100 * chance[t], 1) if t in chance else "" for t in types)]
        lines.append("| " + " | ".join(cells + [""] * (len(head) - len(cells))) + " |")
    return "\n".join(lines) + "\n"


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
    md_path.write_text(markdown_table(rows, question_types(rows), meta.get("chance")))
    return [json_path, csv_path, md_path]


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
    return method.prunes_in_language_model()
