"""``duet-vlm bench --generate`` and ``--train``: the variants a command line names, one benchmark run
per batch size, each result written as soon as it is measured.

>>> for result in end_to_end("generate", ModelSize(), ["duet"], [128], [], [], batches=[1, 4]):   # doctest: +SKIP
...     print(generate.markdown_table(result))
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Iterator

from .generate import generate_benchmark
from .models import ModelSize
from .train import train_benchmark

#: --checkpointing: which gradient-checkpointing modes a training benchmark times.
CHECKPOINTING = {"off": (False,), "on": (True,), "both": (False, True)}


def variants(methods: list[str], budgets: list[int], baselines: list[str], baseline_budgets: list[int]) -> list[tuple[str, int]]:
    """``(method, budget)`` for every method at every budget and every baseline at every baseline
    budget; ``["none"]`` names no methods (or no baselines)."""
    methods, baselines = ([] if names == ["none"] else names for names in (methods, baselines))
    return [(m, b) for m in methods for b in budgets] + [(m, b) for m in baselines for b in baseline_budgets]


def end_to_end(kind: str, size: ModelSize, methods: list[str], budgets: list[int], baselines: list[str],
               baseline_budgets: list[int], rounds: int = 3, text_tokens: int = 60, batches: list[int] = (1,),
               new_tokens: tuple[int, ...] = (32, 128), checkpointing: str = "both", output: Path | None = None,
               progress: Callable[[str], None] | None = None) -> Iterator[dict]:
    """Yield ``generate_benchmark``'s result for each batch size (``kind="generate"``) or
    ``train_benchmark``'s for the first (``kind="train"``); ``progress(label)`` after every round.
    ``output`` gets every result so far after each one (a long run keeps what it measured): the list
    of runs for ``generate``, the run for ``train``."""
    if checkpointing not in CHECKPOINTING:
        raise ValueError(f"--checkpointing must be off, on or both, got {checkpointing!r}")
    chosen = variants(methods, budgets, baselines, baseline_budgets)
    generate = kind == "generate"
    runs = []
    for batch in batches if generate else batches[:1]:
        label = f"{kind}, batch {batch}"
        advance = (lambda: progress(label)) if progress else None
        if generate:
            result = generate_benchmark(size, chosen, batch, tuple(new_tokens), rounds, text_tokens, progress=advance)
        else:
            result = train_benchmark(size, chosen, CHECKPOINTING[checkpointing], rounds, batch, text_tokens, progress=advance)
        runs.append(result)
        if output:
            Path(output).write_text(json.dumps(runs if generate else runs[0], indent=2))
        yield result
