"""Where a reduced prefill's language-model time goes outside its decoder layers, part by part,
against the ideal's (the benchmark's geometry and model: ``duet-vlm bench --family``).

    python tools/runtime_profile.py --family llava --method duet --ratio 0.11 --rounds 10 \
        --output docs/bench/lm_vs_ideal/profile_llava_duet_0.11.json

Times, per forward (the median over ``--rounds`` after two warm-up forwards), the language model
(``LanguageModelTimer``), its decoder layers (``LayerKindTimer``) and, inside the runtime, the
boundaries (``prune``) with the stages' scoring and selection in them, the per-layer hook's other
work, the exit (the stats' record and the scatter back to the input's length), the compactions
(``Compaction.from_keep`` and ``then``, at the entry, the boundaries and the exit) and wherever the
stats are computed; then the ideal's decoder on the same per-layer counts, its layers and what it
spends outside them. Then it counts one forward of each, part by part, in tensor operations instead
of seconds (``OperationClock``): numbers that are the same on every machine and every run. Parts an
earlier commit's runtime lacks are left out: with ``PYTHONPATH`` on that commit's ``src`` it
profiles that runtime (before ``OperationClock``, with this commit's ``bench/timing.py`` copied in
to count). A profiling tool, not part of the library: it wraps those functions with timers in its
own process only, and unwraps them when done. Run it on a quiet machine (one benchmark at a time).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections import defaultdict
from contextlib import ExitStack, contextmanager
from pathlib import Path

import torch

from duet_vlm.adapters import scheme
from duet_vlm.bench.ideal import IdealModel
from duet_vlm.bench.models import ModelSize, build_family
from duet_vlm.bench.prefill import _reducers, _visual_per_layer, layer_kinds
from duet_vlm.bench.timing import LanguageModelTimer, LayerKindTimer, OperationClock, keep_freed_memory
from duet_vlm.compaction import Compaction
from duet_vlm.runtime import attachment, boundary, record

# (part, owner, attribute): what each part of the runtime's work is, where it is called from.
PARTS = (
    ("boundaries", attachment, "prune"),
    ("boundaries: the stages' choosing", boundary, "select"),
    ("boundaries: scoring (text-to-visual attention)", scheme.LayerScheme, "text_to_visual_attention"),
    ("per-layer hook (boundaries included)", attachment.Attachment, "_prefill_layer"),
    ("exit (the stats' record and the scatter)", attachment.Attachment, "_finish_prefill"),
    ("exit: the stats' record (computed when read)", getattr(record, "UnreadStats", None), "record"),
    ("the stats computed (in the forward before 65ddcb9; since, when read or at the reducer's removal)",
     attachment, "prefill_stats"),
    ("compactions: Compaction.from_keep (entry included)", Compaction, "from_keep"),
    ("compactions: Compaction.then", Compaction, "then"),
)


@contextmanager
def timed(seconds: dict, part: str, owner, name: str, clock=time.perf_counter):
    """``owner.name`` timed into ``seconds[part]`` while the context lasts (by ``clock``: seconds, or
    ``OperationClock.read``'s tensor operations)."""
    original = owner.__dict__[name]
    function = original.__func__ if isinstance(original, classmethod) else original  # from_keep

    def wrapper(*args, **kwargs):
        start = clock()
        try:
            return function(*args, **kwargs)
        finally:
            seconds[part] += clock() - start

    setattr(owner, name, classmethod(wrapper) if isinstance(original, classmethod) else wrapper)
    try:
        yield
    finally:
        setattr(owner, name, original)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", default="llava")
    parser.add_argument("--method", default="duet")
    parser.add_argument("--ratio", type=float, default=0.11)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--output", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    keep_freed_memory()
    model, inputs = build_family(args.family, ModelSize(vision_layers=2))
    reducer = next(iter(_reducers([args.method], [args.ratio], "ratio", lambda m, r: "").values()))
    if isinstance(reducer, Exception):
        raise reducer
    kinds = layer_kinds(model)

    def reduced(parts: dict, clock=time.perf_counter) -> dict:
        with ExitStack() as stack:
            for part, owner, name in PARTS:
                if owner is not None and name in owner.__dict__:  # an earlier commit's runtime may lack a part
                    stack.enter_context(timed(parts, part, owner, name, clock))
            with torch.no_grad(), reducer(model), LanguageModelTimer(model, clock) as lm, \
                    LayerKindTimer(model, kinds, clock) as layers:
                model(**inputs, logits_to_keep=1)
        return {"language model": lm.seconds[0], "decoder layers": sum(layers.seconds.values()), **parts}

    first = reduced(defaultdict(float))
    ideal = IdealModel(model, inputs, _visual_per_layer(reducer.stats))

    def ideal_decoder(clock=time.perf_counter) -> dict:
        with torch.no_grad(), LayerKindTimer(model, kinds, clock) as layers:
            embeddings, cache = ideal.embeddings(), ideal.new_cache()
            start = clock()
            ideal.decode(embeddings, cache=cache, last=1)
            total = clock() - start
        return {"language model": total, "decoder layers": sum(layers.seconds.values())}

    def counted(forward) -> dict:
        """One forward's tensor operations (not views), part by part: the same on every machine."""
        with OperationClock() as clock:
            found = {part: int(count) for part, count in forward(clock.read).items()}
        found["outside the layers"] = found["language model"] - found["decoder layers"]
        return found

    ideal_decoder()
    reduced(defaultdict(float))
    load_before = os.getloadavg()
    rounds = []
    for number in range(args.rounds):  # the two swap places every other round, as the benchmark's do
        if number % 2:
            theirs = ideal_decoder()
            rounds.append((reduced(defaultdict(float)), theirs))
        else:
            rounds.append((reduced(defaultdict(float)), ideal_decoder()))
    load_after = os.getloadavg()
    keys = list(first) + [part for part, *_ in PARTS if part not in first]

    def median_ms(values) -> float:
        return round(statistics.median(values) * 1e3, 3)

    result = {
        "command": "python tools/runtime_profile.py " + " ".join(
            f"--{k} {v}" for k, v in vars(args).items() if v is not None),
        "rounds": args.rounds,
        "load_average_before_after": [load_before, load_after],
        "reduced_ms": {key: median_ms([r.get(key, 0.0) for r, _ in rounds]) for key in keys},
        "ideal_ms": {key: median_ms([i[key] for _, i in rounds]) for key in ("language model", "decoder layers")},
    }
    result["reduced_ms"]["outside the layers"] = median_ms(
        [r["language model"] - r["decoder layers"] for r, _ in rounds])
    result["ideal_ms"]["outside the layers"] = median_ms([i["language model"] - i["decoder layers"] for _, i in rounds])
    result["reduced_operations"] = counted(lambda clock: reduced(defaultdict(int), clock))
    result["ideal_operations"] = counted(ideal_decoder)
    print(json.dumps(result, indent=1))
    if args.output:
        args.output.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
