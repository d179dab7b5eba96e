"""Evaluation results as files: ``duet-vlm eval``'s ``results.json``, ``results.csv``, ``results.md``,
the retention-versus-budget figure and the distribution of per-item visual tokens, the weights
digest that ties a result to the weights it measured, and the calibration of a content-adaptive
budget on sample inputs (``calibrate``, ``duet-vlm calibrate``).

A row is one method at one budget: ``method``, ``budget``, ``accuracy``, ``per_type`` (question
type -> accuracy), ``n``, ``retained_percent``, ``avg_visual_tokens``, ``decoder_tflops_per_sample``
(and ``reducer``, the reducer's ``to_dict()``, which ``duet_vlm.from_dict`` rebuilds).

>>> standard_error(0.5, 100)
0.05
>>> write_results(rows, Path("out"), meta={"split": "test", "n": 500})      # doctest: +SKIP
>>> calibrate(model, processor, Adaptive(make("duet", budget=64)), "synthetic:validation", n=128).threshold   # doctest: +SKIP
"""

from __future__ import annotations

import csv
import glob
import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

from . import synthetic
from .methods import Adaptive, Reducer, make
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
    budget (and a last line with each type's chance level, when given). With content-adaptive rows
    (``adaptive``: the signal) the realised visual tokens per layer stand next to the asked budget."""
    adaptive = any(row.get("adaptive") for row in rows)
    head = ["method", "budget", *(["realised tok/layer"] if adaptive else []), *types, "avg", "± s.e.", "% of full",
            "visual tok/layer", "decoder TFLOPs"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        cells = [row["method"] + (f" (adaptive: {row['adaptive']})" if row.get("adaptive") else ""), str(row["budget"] or "")]
        if adaptive:
            cells.append(number(row["avg_visual_tokens"], 1))
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
        writer.writerow(["method", "budget", *types, "accuracy", "retained_percent", "avg_visual_tokens",
                         "decoder_tflops_per_sample", "adaptive"])
        for row in rows:
            writer.writerow(
                [row["method"], row["budget"] if row["budget"] is not None else ""]
                + [row["per_type"].get(t, "") for t in types]
                + [row["accuracy"], row["retained_percent"], row["avg_visual_tokens"], row["decoder_tflops_per_sample"],
                   row.get("adaptive") or ""]
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


def count_histogram_plot(series: list[tuple[str, list[float]]], path: Path, title: str = "") -> Path:
    """The distribution of per-item visual tokens per layer: one panel per ``(label, counts)``, each
    with its mean marked (a fixed budget is one bar; an adaptive one spreads between its floor and
    its ceiling)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = min(3, max(1, len(series)))
    lines = math.ceil(len(series) / columns) or 1
    figure, axes = plt.subplots(lines, columns, figsize=(3.6 * columns, 2.6 * lines), squeeze=False)
    for axis in axes.flat[len(series):]:
        axis.axis("off")
    for axis, (label, counts) in zip(axes.flat, series):
        axis.hist(counts, bins=30, color="tab:blue", alpha=0.8)
        mean = sum(counts) / len(counts) if counts else float("nan")
        axis.axvline(mean, color="black", linestyle="--", linewidth=1)
        axis.set_title(f"{label}: mean {mean:.1f}", fontsize=8)
        axis.set_xlabel("visual tokens per layer", fontsize=7)
        axis.set_ylabel("items", fontsize=7)
        axis.tick_params(labelsize=7)
    if title:
        figure.suptitle(title, fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return Path(path)


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


# ----------------------------------------------------------------------------- calibration
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
#: The question asked about images of a folder (the signal reads the vision encoder only).
FOLDER_PROMPT = "Describe the image."


def chat_prompt(processor, question: str, kind: str = "image") -> str:
    """The model's own chat template around an image (or a video) and ``question`` (LLaVA-1.5 style
    if it has none)."""
    if f"<{kind}>" in question:
        return question
    if getattr(processor, "chat_template", None):
        conversation = [{"role": "user", "content": [{"type": kind}, {"type": "text", "text": question}]}]
        return processor.apply_chat_template(conversation, add_generation_prompt=True)
    return f"USER: <{kind}>\n{question} ASSISTANT:"


def sample_prompts(data: str, n: int) -> list[tuple]:
    """``n`` (image, question) pairs of a data spec: ``synthetic`` or ``synthetic:SPLIT`` (the demo's
    generated scenes and their questions; validation by default), or a folder of images or a glob
    of image files (sorted by name; each asked ``FOLDER_PROMPT``)."""
    from PIL import Image

    if n < 1:
        raise ValueError(f"--n must be at least 1 (sample inputs), got {n}")
    if data == "synthetic" or data.startswith("synthetic:"):
        split = data.partition(":")[2] or "validation"
        if split not in synthetic.SPLIT_SEEDS:
            raise ValueError(f"--data synthetic:SPLIT: SPLIT must be one of {', '.join(synthetic.SPLIT_SEEDS)}, got {split!r}")
        return [(sample.image, sample.question) for sample in (synthetic.sample(split, i) for i in range(n))]
    path = Path(data)
    files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES) if path.is_dir() else sorted(
        Path(f) for f in glob.glob(data) if Path(f).suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ValueError(f"--data {data!r}: no images (give synthetic[:SPLIT], a folder of images or a glob)")
    return [(Image.open(f).convert("RGB"), FOLDER_PROMPT) for f in files[:n]]


def sample_batches(processor, data: str, n: int, batch_size: int = 8) -> Iterator[dict]:
    """Model inputs of ``sample_prompts(data, n)``, ``batch_size`` rows at a time (left-padded)."""
    pairs = sample_prompts(data, n)
    for lo in range(0, len(pairs), batch_size):
        chunk = pairs[lo : lo + batch_size]
        # one list of images per row: every family's processor reads it, Gemma 3's nothing else
        yield processor(images=[[image] for image, _ in chunk], text=[chat_prompt(processor, q) for _, q in chunk],
                        padding=True, return_tensors="pt")


@dataclass
class Calibration:
    """What ``calibrate`` found: the calibrated reducer, and over the sample's items the average
    budget asked for, the average realised at the threshold and each item's budget."""

    reducer: Adaptive
    asked: float
    realised: float
    counts: list[int]
    data: str

    @property
    def threshold(self) -> float:
        return self.reducer.threshold

    def to_dict(self) -> dict:
        """Plain data: ``duet_vlm.from_dict(record["reducer"])`` rebuilds the calibrated reducer."""
        return {"reducer": self.reducer.to_dict(), "threshold": self.threshold, "signal": self.reducer.signal,
                "asked_average": self.asked, "realised_average": self.realised, "items": len(self.counts),
                "min": min(self.counts), "max": max(self.counts), "data": self.data, "counts": self.counts}


def calibrate(model, processor, reducer: Reducer, data: str = "synthetic:validation", n: int = 128,
              batch_size: int = 8) -> Calibration:
    """Run ``reducer``'s signal (an ``Adaptive``; any other method is wrapped in one with its
    defaults) over ``n`` sample inputs of ``data`` (``sample_prompts``) and find the threshold at
    which their items average the method's budget."""
    adaptive = reducer if isinstance(reducer, Adaptive) else Adaptive(reducer)
    recorded = adaptive.record(model, sample_batches(processor, data, n, batch_size))
    calibrated = adaptive.fit(recorded)
    counts = calibrated.counts(recorded)
    asked = sum(min(calibrated.average_budget(item.geometry), item.geometry.visual_tokens) for item in recorded) / len(recorded)
    return Calibration(calibrated, asked, sum(counts) / len(counts), counts, data)


def calibrate_checkpoint(model: str, data: str = "synthetic:validation", method: str = "duet", budget: Optional[int] = 64,
                         ratio: Optional[float] = None, signal: str = "rank", n: int = 128,
                         floor: float = 0.25, ceiling: float = 2.0, output: Optional[Path] = None,
                         batch_size: int = 8, dtype: str = "auto") -> Calibration:
    """``duet-vlm calibrate``: load the checkpoint ``model`` (a path or a Hub id), calibrate
    ``Adaptive(make(method, budget=... or ratio=...), signal, floor=, ceiling=)`` on ``data`` and
    write the result as JSON to ``output`` (when given)."""
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    # the cheap checks first: a bad method, budget, signal or data spec fails before the weights load
    adaptive = Adaptive(make(method, budget=None if ratio is not None else budget, ratio=ratio), signal=signal,
                        floor=floor, ceiling=ceiling)
    if batch_size < 1:
        raise ValueError(f"--batch-size must be at least 1, got {batch_size}")
    sample_prompts(data, 1)
    if output is not None and not Path(output).parent.is_dir():
        raise ValueError(f"--output {output}: the folder {Path(output).parent} does not exist")
    torch_dtype = "auto" if dtype == "auto" else getattr(torch, dtype)
    try:
        loaded = AutoModelForImageTextToText.from_pretrained(model, dtype=torch_dtype).eval()
        processor = AutoProcessor.from_pretrained(model)
    except OSError as error:
        raise OSError(f"cannot load a checkpoint from --model {model!r}: {error}") from error
    result = calibrate(loaded, processor, adaptive, data, n, batch_size)
    if output is not None:
        Path(output).write_text(json.dumps(result.to_dict(), indent=2) + "\n")
    return result
