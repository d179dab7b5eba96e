"""Training-step speed: forward + backward + optimizer step under each method, side by side with the
unreduced model and with the ideal, in interleaved rounds, with and without gradient checkpointing.

The setting is LLaVA's fine-tuning stage: the vision tower frozen, the projector and the whole
language model (embeddings and LM head included) trained with AdamW (``fused=True``, what
``transformers.Trainer`` picks by default), and no KV cache in the forward (``use_cache=False``, as
LLaVA's training sets it). Each step is timed in three parts (forward, backward,
optimizer step) and its peak memory is measured in place (``timing.PeakRSS``; gradients are freed
before each step, so the peak holds this step's gradients and activations). The batch is
``models.padded_inputs``; the last ``answer_tokens`` of each row are labelled, the rest is -100.

**The ideal** (``ideal.IdealModel.loss``) is the unpatched model trained on the variant's per-layer
visual counts: tower and projector as usual, each decoder layer called directly on every text token
plus that layer's number of visual tokens, the LM head and the loss on the tokens that reach the last
layer, then the same backward and optimizer step. What a reducer costs beyond it is its scoring,
its bookkeeping and whatever it leaves at full length.

>>> results = train_benchmark(ModelSize(), [("duet", 128)], rounds=3)      # doctest: +SKIP
>>> print(markdown_table(results))                                         # doctest: +SKIP
"""

from __future__ import annotations

import os
import statistics
import time
from contextlib import nullcontext
from typing import Callable

import torch

from ..compat import checkpointing_enabled, disable_checkpointing, enable_checkpointing
from ..methods import make
from ..training.trainer import drop_input_grad_hooks
from .ideal import IdealModel
from .models import ModelSize, build_model, padded_inputs
from .timing import PeakRSS, interleaved, processor

FULL = "no reduction"
PARTS = ("step_s", "forward_s", "backward_s", "optimizer_s", "peak_bytes")


def trainable_model(size: ModelSize):
    """``build_model(size)`` in training mode with the vision tower frozen (LLaVA's fine-tuning stage)."""
    model = build_model(size).train()
    model.model.vision_tower.requires_grad_(False)
    return model


def answer_labels(inputs: dict[str, torch.Tensor], answer_tokens: int) -> torch.Tensor:
    """Labels on the last ``answer_tokens`` tokens of each row, -100 everywhere else."""
    labels = torch.full_like(inputs["input_ids"], -100)
    labels[:, -answer_tokens:] = inputs["input_ids"][:, -answer_tokens:]
    return labels


def _set_checkpointing(model, on: bool) -> None:
    if on and not checkpointing_enabled(model):
        enable_checkpointing(model, use_reentrant=False)
        drop_input_grad_hooks(model)  # as `duet-vlm train` does: the frozen tower stays out of autograd
    elif not on and checkpointing_enabled(model):
        disable_checkpointing(model)


def training_step(model, optimizer, loss_fn: Callable[[], torch.Tensor], context_factory, checkpointing: bool,
                  records: list[dict]) -> Callable[[], None]:
    """One step (``loss_fn()``, backward, ``optimizer.step()``) inside ``context_factory()``, timed by
    part; appends to ``records``. The context is entered before the clock starts, as a reducer a
    Trainer attaches once stays attached."""

    def run():
        _set_checkpointing(model, checkpointing)
        optimizer.zero_grad(set_to_none=True)
        with context_factory(), PeakRSS() as memory:
            start = time.perf_counter()
            loss = loss_fn()
            forward = time.perf_counter()
            loss.backward()
            backward = time.perf_counter()
            optimizer.step()
            end = time.perf_counter()
        records.append({
            "step_s": end - start, "forward_s": forward - start, "backward_s": backward - forward,
            "optimizer_s": end - backward, "peak_bytes": memory.peak, "loss": float(loss.detach()),
        })

    return run


def train_benchmark(
    size: ModelSize,
    variants: list[tuple[str, int]],
    checkpointing: tuple[bool, ...] = (False, True),
    rounds: int = 3,
    batch: int = 1,
    text_tokens: int = 60,
    answer_tokens: int = 20,
    learning_rate: float = 1e-6,
    progress=None,
) -> dict:
    """Training-step time (and its parts), peak memory and per-layer counts of the unreduced model, of
    each ``(method, budget)`` and of each one's ideal, in each checkpointing mode, timed in the same
    interleaved rounds after one warm-up step each (which also creates AdamW's state and tells each
    ideal its counts). Returns ``{"modes": {"plain"|"checkpointing": {name: {...}}}, ...}``.
    """
    model = trainable_model(size)
    inputs = padded_inputs(model, batch, text_tokens)
    labels = answer_labels(inputs, answer_tokens)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=learning_rate, fused=True)
    layers = model.config.text_config.num_hidden_layers
    visual = model.config.image_seq_length

    reducers = {FULL: None} | {f"{m} {b}": make(m, budget=b) for m, b in variants}
    counts: dict[str, list[int]] = {FULL: [visual] * layers}
    calls: dict[str, Callable[[], None]] = {}
    records: dict[str, list[dict]] = {}
    ideal_of: dict[str, str] = {}
    modes = {False: "plain", True: "checkpointing"}
    for on in checkpointing:
        for name, reducer in reducers.items():
            key = f"{name} [{modes[on]}]"
            records[key] = []
            context = nullcontext if reducer is None else (lambda reducer=reducer: reducer(model))
            calls[key] = training_step(
                model, optimizer, lambda: model(**inputs, labels=labels, use_cache=False).loss, context, on, records[key]
            )
            calls[key]()  # warm-up
            if reducer is not None:
                items = {tuple(item.tokens_per_layer) for item in reducer.stats.items}
                if len(items) != 1:
                    raise RuntimeError(f"{name}: the rows' images were reduced to different counts {sorted(items)}")
                counts[name] = list(items.pop())
        ideals: dict[tuple[int, ...], str] = {}
        for name in reducers:
            if name == FULL:
                continue
            count = tuple(counts[name])
            ideal_name = ideals.setdefault(count, f"ideal: {name}")
            ideal_of[name] = ideal_name
            key = f"{ideal_name} [{modes[on]}]"
            if key not in calls:
                ideal = IdealModel(model, inputs, list(count))
                records[key] = []
                calls[key] = training_step(
                    model, optimizer, lambda ideal=ideal: ideal.loss(labels), nullcontext, on, records[key]
                )
                calls[key]()
                counts[ideal_name] = list(count)
        for record in records.values():
            record.clear()  # warm-up steps are not measured

    load_before = os.getloadavg()
    interleaved(calls, rounds, warmup=0, progress=progress)
    load_after = os.getloadavg()

    results: dict[str, dict] = {}
    for on in checkpointing:
        mode = modes[on]
        table = results[mode] = {}
        full = records[f"{FULL} [{mode}]"]
        names = [*reducers, *dict.fromkeys(ideal_of.values())]
        for name in names:
            rows = records[f"{name} [{mode}]"]
            row: dict = {"visual_tokens_per_layer": counts[name], "avg_visual_tokens": sum(counts[name]) / layers}
            for part in PARTS:
                values = [r[part] for r in rows if r[part] is not None]
                row[part] = statistics.median(values) if values else None
            per_round = [r["step_s"] / f["step_s"] for r, f in zip(rows, full)]
            row["vs_full"] = statistics.median(per_round)
            row["spread_vs_full"] = (max(per_round) - min(per_round)) / statistics.median(per_round)
            if full[0]["peak_bytes"] is not None:
                row["peak_vs_full"] = statistics.median(r["peak_bytes"] / f["peak_bytes"] for r, f in zip(rows, full))
            if name in ideal_of:
                row["ideal"] = ideal_of[name]
                ideal_rows = records[f"{ideal_of[name]} [{mode}]"]
                row["vs_ideal"] = statistics.median(r["step_s"] / i["step_s"] for r, i in zip(rows, ideal_rows))
                row["forward_vs_ideal"] = statistics.median(r["forward_s"] / i["forward_s"] for r, i in zip(rows, ideal_rows))
                row["backward_vs_ideal"] = statistics.median(r["backward_s"] / i["backward_s"] for r, i in zip(rows, ideal_rows))
            row["rounds"] = {part: [r[part] for r in rows] for part in PARTS}
            row["loss"] = rows[-1]["loss"]
            table[name] = row
    return {
        "benchmark": "train",
        "model": vars(size),
        "batch": batch,
        "row_text_tokens": inputs["attention_mask"].sum(dim=1).sub(visual).tolist(),
        "answer_tokens": answer_tokens,
        "trained": "projector + language model (embeddings, layers, norm, LM head); vision tower frozen",
        "optimizer": "AdamW(fused=True)",
        "trainable_parameters": sum(p.numel() for p in trainable),
        "rounds": rounds,
        "threads": torch.get_num_threads(),
        "cpus": os.cpu_count(), "processor": processor(),
        "load_average_before_after": [load_before, load_after],
        "modes": results,
    }


def markdown_table(results: dict) -> str:
    """One markdown table per checkpointing mode: the step and its parts (median seconds), peak memory,
    and the step's ratio to no reduction and to the variant's ideal (medians of per-round ratios)."""
    out = []
    for mode, table in results["modes"].items():
        out += [f"**{mode}**", ""]
        header = ["variant", "visual tok/layer", "step s", "forward s", "backward s", "optimizer s", "peak MB",
                  "step vs full", "step vs ideal", "forward vs ideal", "backward vs ideal", "spread"]
        out += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for name, row in table.items():
            peak = f"{row['peak_bytes'] / 1e6:.0f}" if row["peak_bytes"] is not None else ""
            if "peak_vs_full" in row:
                peak += f" ({row['peak_vs_full']:.2f})"
            cells = [name, f"{row['avg_visual_tokens']:.1f}"]
            cells += [f"{row[p]:.2f}" for p in ("step_s", "forward_s", "backward_s", "optimizer_s")]
            cells += [peak, f"{row['vs_full']:.3f}"]
            cells += [f"{row[k]:.3f}" if k in row else "" for k in ("vs_ideal", "forward_vs_ideal", "backward_vs_ideal")]
            cells.append(f"{row['spread_vs_full']:.2f}")
            out.append("| " + " | ".join(cells) + " |")
        out.append("")
    return "\n".join(out).rstrip()
