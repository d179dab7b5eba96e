"""Where a ``generate`` call's memory is at its peak: every live tensor, the code that made it and
the frame that holds it, for a method and for its ideal.

``PeakRSS`` says how much a call adds to the resident set; this says what that memory is. Every
operator's outputs are watched (a ``TorchDispatchMode``) and the bytes of the storages still alive
are summed after each one. The run is made twice with the same inputs (the operator sequence is the
same): the first finds the operator after which the sum peaks, the second stops there and names, for
each live storage, the outermost function frame that reaches it through its locals (the frame whose
return frees it; transformers' and torch's pass-through wrappers are skipped) or ``(not in a frame)``.
Tensors that existed before the call (the weights) are not counted.

>>> report = live_memory("duet", 192, batch=16)                          # doctest: +SKIP
>>> print(markdown(report))                                              # doctest: +SKIP

Run it as ``python -m duet_vlm.bench.live --method duet --budget 192 --batch 16 --output FILE``.
"""

from __future__ import annotations

import argparse
import json
import sys
import traceback
import types
from pathlib import Path
from typing import Optional

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from ..methods import make
from .ideal import IdealModel
from .models import ModelSize, build_model, padded_inputs

#: Frames that only pass their arguments on (a tensor they reach is held by their caller too).
_WRAPPERS = (
    "/transformers/utils/", "/torch/nn/modules/module.py", "/torch/utils/_contextlib.py", "/torch/_compile.py",
    "/torch/_dynamo/", "/contextlib.py",
)
#: What ``_storages`` does not look into: modules hold the weights; code and classes hold none of a call's tensors.
_OPAQUE = (torch.nn.Module, type, types.ModuleType, types.FunctionType, types.MethodType)


def _site(skip: int = 3) -> str:
    """The innermost frames of the library and of transformers that led to the current operator."""
    frames = [f for f in traceback.extract_stack()[:-skip] if "duet_vlm" in f.filename or "/transformers/" in f.filename]
    frames = [f for f in frames if "/transformers/utils/" not in f.filename and "bench/live.py" not in f.filename]
    return " < ".join(f"{Path(f.filename).name}:{f.lineno} {f.name}" for f in frames[::-1][:3])


def _storages(value, depth: int, seen: set[int], found: dict[int, int] | None = None) -> dict[int, int]:
    """``{storage key: bytes}`` of the tensors ``value`` reaches through containers and plain objects
    (not through modules: their parameters are the weights)."""
    found = {} if found is None else found
    if id(value) in seen or depth < 0:
        return found
    seen.add(id(value))
    if isinstance(value, torch.Tensor):
        storage = value.untyped_storage()
        found[storage._cdata] = storage.nbytes()
    elif isinstance(value, dict):
        for item in list(value.values()):
            _storages(item, depth - 1, seen, found)
    elif isinstance(value, (list, tuple, set)):
        for item in list(value):
            _storages(item, depth - 1, seen, found)
    elif isinstance(getattr(value, "__dict__", None), dict) and not isinstance(value, _OPAQUE):
        for item in list(vars(value).values()):
            _storages(item, depth - 1, seen, found)
    return found


def _holders(depth: int = 7) -> dict[int, str]:
    """For each storage the current Python stack reaches, the outermost frame that reaches it."""
    held: dict[int, str] = {}
    frame = sys._getframe(2)
    stack = []
    while frame is not None:
        stack.append(frame)
        frame = frame.f_back
    for frame in stack:  # innermost first; an outer frame overwrites
        path = frame.f_code.co_filename
        if any(part in path for part in _WRAPPERS) or path.endswith("bench/live.py"):
            continue
        owner = f"{Path(path).name} {frame.f_code.co_qualname}"
        for key in _storages(list(frame.f_locals.values()), depth, set()):
            held[key] = owner
    return held


class LiveTensors(TorchDispatchMode):
    """Live tensor bytes after every operator (``peak``, reached after operator ``peak_op``); at
    operator ``stop_at``, what is live (``at_peak``) and who holds it."""

    def __init__(self, stop_at: Optional[int] = None):
        super().__init__()
        self.stop_at, self.peak, self.peak_op, self.at_peak, self.at_peak_op = stop_at, 0, -1, [], ""
        self._live: dict[int, dict] = {}
        self._ops = 0

    def __torch_dispatch__(self, func, _types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage()._cdata for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
        for key in [key for key, entry in self._live.items() if entry["ref"].expired()]:
            del self._live[key]
        for tensor in tree_flatten(out)[0]:
            if isinstance(tensor, torch.Tensor):
                storage = tensor.untyped_storage()
                key = storage._cdata
                if key not in inputs and key not in self._live:  # new, not an in-place result
                    self._live[key] = {"ref": StorageWeakRef(storage), "bytes": storage.nbytes(),
                                       "made_by": f"{_site()} [{func.__name__}]", "shape": list(tensor.shape)}
        total = sum(entry["bytes"] for entry in self._live.values())
        if total > self.peak:
            self.peak, self.peak_op = total, self._ops
        if self._ops == self.stop_at:
            held = _holders()
            self.at_peak = sorted(
                ({"bytes": e["bytes"], "made_by": e["made_by"], "shape": e["shape"], "held_by": held.get(k, "(not in a frame)")}
                 for k, e in self._live.items()),
                key=lambda e: -e["bytes"],
            )
            self.at_peak_op = _site() + f" [{func.__name__}]"
        self._ops += 1
        return out


def _traced(run) -> dict:
    """``run()`` twice: the peak's bytes and operator, then what is live there and who holds it."""
    first = LiveTensors()
    with first:
        run()
    second = LiveTensors(stop_at=first.peak_op)
    with second:
        run()
    if second.peak != first.peak:
        raise RuntimeError(f"the two runs differ ({first.peak} and {second.peak} bytes at the peak)")
    groups: dict[tuple, dict] = {}
    for entry in second.at_peak:
        key = (entry["held_by"], entry["made_by"])
        group = groups.setdefault(key, {"held_by": key[0], "made_by": key[1], "bytes": 0, "tensors": 0, "shape": entry["shape"]})
        group["bytes"] += entry["bytes"]
        group["tensors"] += 1
    return {"peak_bytes": first.peak, "peak_at": second.at_peak_op,
            "live": sorted(groups.values(), key=lambda g: -g["bytes"])}


def live_memory(method: str, budget: int, batch: int = 16, new_tokens: int = 2, size: ModelSize = ModelSize(),
                text_tokens: int = 60) -> dict:
    """The live-tensor peak of ``generate`` under ``make(method, budget=budget)`` and of its ideal
    (``IdealModel`` on the same per-layer counts), on the benchmark's padded batch; what is live at
    each peak, grouped by the frame that holds it and the code that made it."""
    model = build_model(size)
    inputs = padded_inputs(model, batch, text_tokens)
    reducer = make(method, budget=budget)
    valid = inputs["attention_mask"][0].bool()
    warm = {"input_ids": inputs["input_ids"][:1, valid], "attention_mask": inputs["attention_mask"][:1, valid],
            "pixel_values": inputs["pixel_values"][:1]}
    settings = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        with reducer(model):
            model.generate(**warm, **settings)
        counts = list(reducer.stats.items[0].tokens_per_layer)

        def reduced():
            with reducer(model):
                model.generate(**inputs, **settings)

        def ideal():
            IdealModel(model, inputs, counts).generate(new_tokens)

        variants = {f"{method} {budget}": _traced(reduced), f"ideal: {method} {budget}": _traced(ideal)}
    return {"benchmark": "live_memory", "model": vars(size), "batch": batch, "new_tokens": new_tokens,
            "visual_tokens_per_layer": counts, "variants": variants}


def by_holder(variant: dict) -> dict[str, int]:
    """Bytes live at the peak per holding frame, largest first."""
    totals: dict[str, int] = {}
    for group in variant["live"]:
        totals[group["held_by"]] = totals.get(group["held_by"], 0) + group["bytes"]
    return dict(sorted(totals.items(), key=lambda item: -item[1]))


def markdown(report: dict, top: int = 12) -> str:
    """Per variant: its peak, the bytes each frame holds there, then the largest live groups (held
    by, made by, MB)."""
    lines = []
    for name, variant in report["variants"].items():
        holders = ", ".join(f"{holder} {size / 1e6:.1f}" for holder, size in by_holder(variant).items() if size >= 1e6)
        lines += [f"**{name}**: {variant['peak_bytes'] / 1e6:.1f} MB live at the peak ({variant['peak_at']}). "
                  f"MB per holding frame: {holders}.", "",
                  "| MB | tensors | held by | made by |", "|---|---|---|---|"]
        for group in variant["live"][:top]:
            lines.append(f"| {group['bytes'] / 1e6:.1f} | {group['tensors']} | {group['held_by']} | {group['made_by']} |")
        rest = sum(g["bytes"] for g in variant["live"][top:])
        lines += [f"| {rest / 1e6:.1f} | | (the rest) | |", ""]
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m duet_vlm.bench.live", description=__doc__.split("\n\n")[0])
    parser.add_argument("--method", default="duet")
    parser.add_argument("--budget", type=int, default=192)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=2)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = leave as is)")
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    report = live_memory(args.method, args.budget, args.batch, args.new_tokens)
    report["command"] = " ".join(["python -m duet_vlm.bench.live", *(sys.argv[1:] if argv is None else argv)])
    print(markdown(report))
    if args.output is not None:
        args.output.write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
