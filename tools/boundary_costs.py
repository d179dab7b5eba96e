"""What the boundaries of each language-side stage compute, on the shipped demo model (LLaVA-1.5's
geometry: 576 visual tokens): the tensor operations and the matrix-product FLOPs (torch's
``FlopCounterMode``, which counts matrix-matrix products, attention and convolutions, not a
matrix-vector product or elementwise work) of the stages' ``select`` over one prefill, the
choosing alone (the gather and the layers after it are the schedule's, which any stage at the same
schedule shares), beside the prefill's decoder FLOPs. One test question, batch 1, each budget.

    python tools/boundary_costs.py [--budgets 192 128 64] [--output docs/eval/attention_free/boundary_costs.json]

The counts are the same on every machine (no timing). A measurement tool, not part of the library.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

#: (label, method, options): DUET as published, its Stage B without attention weights, V2Drop, ApET and the
#: attention-scored language-side methods users pick instead
SETTINGS = [
    ("duet", "duet", {}),
    ("duet (scores=states)", "duet", {"scores": "states"}),
    ("v2drop", "v2drop", {}),
    ("apet", "apet", {}),
    ("fastv", "fastv", {}),
    ("pyramiddrop", "pyramiddrop", {}),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--budgets", type=int, nargs="+", default=[192, 128, 64])
    parser.add_argument("--output", type=Path)
    args = parser.parse_args()

    import duet_vlm
    from duet_vlm.bench.timing import OperationClock
    from duet_vlm.demo.evaluate import load_demo
    from duet_vlm.evaluation import sample_batches

    model, processor = load_demo()
    inputs = next(sample_batches(processor, "synthetic:test", 1, batch_size=1))
    rows = []
    for budget in args.budgets:
        for label, method, options in SETTINGS:
            reducer = duet_vlm.make(method, budget=budget, **options)
            stage_class = type(reducer.language_stage())
            select = stage_class.select
            counted = {"operations": 0, "flops": 0, "boundaries": 0}

            def counting(self, view, keep, _select=select, _counted=counted):
                with OperationClock() as clock, FlopCounterMode(display=False) as flops:
                    chosen = _select(self, view, keep)
                _counted["operations"] += clock.read()
                _counted["flops"] += flops.get_total_flops()
                _counted["boundaries"] += 1
                return chosen

            stage_class.select = counting
            try:
                with torch.no_grad(), reducer(model):
                    model(**inputs, logits_to_keep=1)
            finally:
                stage_class.select = select
            stats = reducer.stats
            rows.append({"setting": label, "budget": budget, "stage": stage_class.__name__,
                         "reads": stage_class.reads, **counted, "decoder_flops": stats.flops_exact,
                         "average_tokens": stats.items[0].average_tokens})
            print(f"{label:22} {budget:4}: {counted['boundaries']} boundaries, {counted['operations']:5} operations, "
                  f"{counted['flops']:>12,} matrix-product FLOPs choosing; decoder {stats.flops_exact:,} FLOPs "
                  f"({counted['flops'] / stats.flops_exact:.2%})", flush=True)
    if args.output is not None:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        command = "python tools/boundary_costs.py --budgets " + " ".join(map(str, args.budgets)) + f" --output {args.output}"
        args.output.write_text(json.dumps({"meta": {"command": command, "model": "shipped demo model",
                                                    "torch": torch.__version__}, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
