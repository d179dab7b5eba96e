"""Training-step time per process count: one process on the global batch against ``P`` processes
(``DistributedDataParallel`` over gloo) each on its share of the rows, with and without a reducer, in
interleaved rounds (#35).

The setting is ``train``'s (LLaVA's fine-tuning stage: the tower frozen, the projector and the
language model trained with fused AdamW, no KV cache). In each round, for every variant (no reduction,
each method at its budget): one step in this process on the whole batch with all ``threads``, then
one spawned group of ``P`` processes that each build the same model (same seed) and run, per variant,
a warm-up step and a timed step on ``batch / P`` rows (their common left padding removed, as a
per-rank collator pads) with ``threads / P`` threads each. A group's step time is its slowest rank's,
between two barriers, so DDP's all-reduce of the gradients is in it. The reducer is attached to the
module DDP wraps, as ``duet-vlm train`` attaches it under the Trainer.

What this measures is the machine: ``P`` processes share its cores with the one process they are
compared to, so on a CPU a speed-up can only come from what one process leaves idle.

>>> results = process_benchmark(ModelSize(), [("duet", 64)], processes=2, rounds=3)   # doctest: +SKIP
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import torch

from ..methods import make
from .models import ModelSize, padded_inputs
from .timing import processor
from .train import FULL, answer_labels, trainable_model


def free_port() -> int:
    """A TCP port free on this machine now, for a group's rendezvous."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _variants(variants: list[tuple[str, int]]) -> dict:
    return {FULL: None} | {f"{m} {b}": make(m, budget=b) for m, b in variants}


def _rows(inputs: dict, labels: torch.Tensor, rank: int, processes: int) -> tuple[dict, torch.Tensor]:
    """Rank ``rank``'s share of the batch, without the left padding all its rows share."""
    share = inputs["input_ids"].shape[0] // processes
    rows = slice(rank * share, (rank + 1) * share)
    mask = inputs["attention_mask"][rows]
    start = int(mask.any(dim=0).long().argmax())  # the first column any of these rows uses
    local = {key: value[rows] for key, value in inputs.items()}
    local["input_ids"], local["attention_mask"] = local["input_ids"][:, start:], local["attention_mask"][:, start:]
    return local, labels[rows, start:]


def _step(model, trainable_model_, optimizer, inputs: dict, labels: torch.Tensor, reducer) -> float:
    """One training step (forward, backward, optimizer step) under ``reducer``; its seconds."""
    optimizer.zero_grad(set_to_none=True)
    context = nullcontext() if reducer is None else reducer(trainable_model_)
    with context:
        start = time.perf_counter()
        loss = model(**inputs, labels=labels, use_cache=False).loss
        loss.backward()
        optimizer.step()
        return time.perf_counter() - start


def _worker(rank: int, processes: int, port: int, size: dict, variants: list, batch: int, text_tokens: int,
            answer_tokens: int, threads: int, out: str) -> None:
    """One rank of a group: build, wrap in DDP, warm up and time one step per variant; rank 0 writes
    the slowest rank's seconds per variant."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    torch.set_num_threads(threads)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=processes)
    try:
        torch.manual_seed(0)
        model = trainable_model(ModelSize(**size))
        inputs = padded_inputs(model, batch, text_tokens)
        labels = answer_labels(inputs, answer_tokens)
        local, local_labels = _rows(inputs, labels, rank, processes)
        wrapped = DistributedDataParallel(model)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-6, fused=True)
        seconds = {}
        for name, reducer in _variants(variants).items():
            _step(wrapped, model, optimizer, local, local_labels, reducer)  # warm-up (AdamW's state, the plan)
            dist.barrier()
            elapsed = torch.tensor([_step(wrapped, model, optimizer, local, local_labels, reducer)])
            dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
            seconds[name] = float(elapsed)
        if rank == 0:
            torch.save(seconds, Path(out))
    finally:
        dist.destroy_process_group()
    # Leave without tearing down: freeing the DDP wrapper frees the gloo group, whose destructor joins its
    # threads while holding the GIL, and a thread still dropping the last all-reduce's tensor waits for
    # the GIL; the rank hung there (seen under load, torch 2.13). Everything this rank owes is written.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def process_benchmark(size: ModelSize, variants: list[tuple[str, int]], processes: int = 2, rounds: int = 3,
                      batch: int = 2, text_tokens: int = 60, answer_tokens: int = 20, threads: int | None = None,
                      progress=None) -> dict:
    """Median training-step seconds of one process on ``batch`` rows and of ``processes`` DDP
    processes on ``batch / processes`` rows each, for no reduction and each ``(method, budget)``, and
    their ratios per round (``speedup``: one process over the group; ``vs_full``: a variant over no
    reduction at the same process count). See the module's docstring for what runs."""
    import torch.multiprocessing as mp

    if processes < 2 or batch % processes:
        raise ValueError(f"--processes {processes} needs at least 2 and a batch it divides (batch {batch})")
    threads = threads or torch.get_num_threads()
    if threads % processes:
        raise ValueError(f"{threads} threads do not split over {processes} processes")
    torch.manual_seed(0)
    model = trainable_model(size)
    inputs = padded_inputs(model, batch, text_tokens)
    labels = answer_labels(inputs, answer_tokens)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-6, fused=True)
    reducers = _variants(variants)
    for reducer in reducers.values():
        _step(model, model, optimizer, inputs, labels, reducer)  # warm-up
    single: dict[str, list[float]] = {name: [] for name in reducers}
    group: dict[str, list[float]] = {name: [] for name in reducers}
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as folder:
        for round_ in range(rounds):
            torch.set_num_threads(threads)
            for name, reducer in reducers.items():
                single[name].append(_step(model, model, optimizer, inputs, labels, reducer))
            out = Path(folder) / f"round{round_}.pt"
            mp.spawn(_worker, args=(processes, free_port(), vars(size), variants, batch, text_tokens, answer_tokens,
                                    threads // processes, str(out)), nprocs=processes, join=True)
            for name, seconds in torch.load(out).items():
                group[name].append(seconds)
            if progress is not None:
                progress(f"train steps, 1 and {processes} processes")
    torch.set_num_threads(threads)
    load_after = os.getloadavg()
    table = {}
    for name in reducers:
        table[name] = {
            "one_process_s": statistics.median(single[name]),
            f"{processes}_processes_s": statistics.median(group[name]),
            "speedup": statistics.median(s / g for s, g in zip(single[name], group[name])),
            "one_process_vs_full": statistics.median(s / f for s, f in zip(single[name], single[FULL])),
            f"{processes}_processes_vs_full": statistics.median(g / f for g, f in zip(group[name], group[FULL])),
            "rounds": {"one_process_s": single[name], f"{processes}_processes_s": group[name]},
        }
    return {
        "benchmark": "train_processes", "model": vars(size), "batch": batch, "processes": processes,
        "threads": threads, "threads_per_process": threads // processes, "rounds": rounds, "cpus": os.cpu_count(),
        "processor": processor(),
        "trained": "projector + language model (embeddings, layers, norm, LM head); vision tower frozen",
        "optimizer": "AdamW(fused=True)", "backend": "DistributedDataParallel, gloo",
        "load_average_before_after": [load_before, load_after], "variants": table,
    }


def markdown_table(results: dict) -> str:
    """``process_benchmark``'s variants: the medians and the ratios."""
    p = results["processes"]
    head = ["variant", "1 process s", f"{p} processes s", "speed-up", "vs no reduction (1 process)",
            f"vs no reduction ({p} processes)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, row in results["variants"].items():
        lines.append("| " + " | ".join([
            name, f"{row['one_process_s']:.2f}", f"{row[f'{p}_processes_s']:.2f}", f"{row['speedup']:.3f}",
            f"{row['one_process_vs_full']:.3f}", f"{row[f'{p}_processes_vs_full']:.3f}",
        ]) + " |")
    return "\n".join(lines)
