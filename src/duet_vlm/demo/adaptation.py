"""The adaptation experiment: does fine-tuning with a reducer active teach the model to work with
fewer tokens, beyond what the same fine-tuning with all tokens gives?

Three kinds of model, each evaluated with all tokens and under the reducer at every budget, on the
same test questions:

- the demo model as it ships (no fine-tuning);
- the shipped model fine-tuned with all tokens for ``steps`` optimizer steps;
- the shipped model fine-tuned with the reducer active at one budget, for the same steps on the
  same data (one such model per budget).

Fine-tuning is ``duet-vlm train`` (``duet_vlm.training.train``): the language model's answer loss
on synthetic conversations whose images come from a range of the training split the demo recipe
never drew (``synthetic_offset``), projector and language model trained, vision tower frozen. The
wall-clock of each fine-tune is recorded too; on this machine it is noisy, so it is reported, not
used as the speed claim (``duet-vlm bench --train`` measures that side by side).

Re-running the same command skips the fine-tunes already finished from the same weights (their
``train_results.json``; a fine-tune of other weights, e.g. a demo model since replaced, is redone).

    python -m duet_vlm.demo.adaptation --output-dir runs/adaptation
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Optional

from ..methods import make
from ..evaluation import weights_digest
from ..training import TrainConfig, train
from ..training.config import RecipeConfig
from .evaluate import DEMO_MODEL_DIR, evaluate_accuracy, load_demo


@dataclass
class AdaptationConfig(RecipeConfig):
    """Fine-tune the demo model with and without a reducer, and evaluate every model both ways."""

    program: ClassVar[str] = "python -m duet_vlm.demo.adaptation"
    output_dir: str = field(metadata={"help": "Fine-tuned models and adaptation.json go here."})
    model: Optional[str] = field(default=None, metadata={"help": "The demo model to start from (default: the shipped one)."})
    method: str = field(default="duet", metadata={"help": "The reducer fine-tuned with and evaluated."})
    budgets: str = field(default="128,64", metadata={"help": "Comma-separated budgets: one reduced fine-tune each."})
    steps: int = field(default=400, metadata={"help": "Optimizer steps of every fine-tune."})
    batch_size: int = field(default=4, metadata={"help": "Synthetic images per step (4 question turns each)."})
    learning_rate: float = field(default=1e-4, metadata={"help": "Peak learning rate (cosine schedule, 20 warm-up steps)."})
    synthetic_offset: int = field(
        default=100_000, metadata={"help": "First training-split image of the fine-tuning data (the demo recipe draws far fewer)."}
    )
    n: int = field(default=504, metadata={"help": "Test questions per evaluation (a multiple of 7 balances the types)."})
    seed: int = field(default=0, metadata={"help": "Seed of the fine-tunes."})

    def budget_list(self) -> list[int]:
        return [int(b) for b in self.budgets.split(",") if b.strip()]


def _fine_tune(config: AdaptationConfig, base: Path, base_sha256: str, method: str, budget: int | None,
               output: Path) -> dict:
    """One fine-tune (skipped when the same command already finished from the same weights); returns
    its summary and wall-clock."""
    timing = output / "adaptation_timing.json"
    train_config = TrainConfig(
        model=str(base), data="synthetic", output_dir=str(output), method=method, budget=budget,
        synthetic_items=config.steps * config.batch_size, synthetic_offset=config.synthetic_offset,
        train="projector+llm", learning_rate=config.learning_rate, warmup_steps=20, max_steps=config.steps,
        batch_size=config.batch_size, save_steps=config.steps, logging_steps=max(1, config.steps // 20), seed=config.seed,
    )
    if (output / "train_results.json").exists() and timing.exists():
        record = json.loads(timing.read_text())
        if record.get("command") == train_config.command() and record.get("base_sha256") == base_sha256:
            return record
    started = time.perf_counter()
    outcome = train(train_config)
    record = {"command": train_config.command(), "base_sha256": base_sha256, "seconds": time.perf_counter() - started,
              "final_loss": outcome.final_loss, "average_loss": outcome.average_loss, "steps": outcome.global_step}
    timing.write_text(json.dumps(record, indent=2) + "\n")
    return record


def run(config: AdaptationConfig) -> dict:
    """Fine-tune, evaluate, and write ``adaptation.json`` (also returned)."""
    base = Path(config.model) if config.model else DEMO_MODEL_DIR
    out = Path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    budgets = config.budget_list()
    for budget in budgets:  # an unknown method or an invalid budget fails here, before any training
        make(config.method, budget=budget)

    # (name, weights, what it was fine-tuned with: None, or (method, budget) with "full" for all tokens)
    arms = [("shipped", base, None), ("fine-tuned, all tokens", out / "full", ("full", None))]
    arms += [(f"fine-tuned, {config.method} {b}", out / f"{config.method}{b}", (config.method, b)) for b in budgets]
    base_sha256 = weights_digest(base)
    fine_tunes = {name: _fine_tune(config, base, base_sha256, *tuned, path) for name, path, tuned in arms if tuned is not None}

    rows = []
    for name, path, tuned in arms:
        model, processor = load_demo(path)
        for budget in [None] + budgets:
            reducer = make(config.method, budget=budget) if budget is not None else None
            result = evaluate_accuracy(model, processor, split="test", n=config.n,
                                       wrap=(lambda r=reducer, m=model: r(m)) if reducer is not None else None)
            trained_with = None if tuned is None else (tuned[0] if tuned[0] == "full" else tuned[1])
            rows.append({"model": name, "trained_with": trained_with, "evaluated_with": budget,
                         "accuracy": result["accuracy"], "per_type": result["per_type"], "n": result["n"]})
            label = "all tokens" if budget is None else f"{config.method} {budget}"
            print(f"{name:<28} evaluated with {label:<12} {100 * result['accuracy']:.1f}%", flush=True)
    results = {
        "meta": {
            "command": config.command(), "method": config.method, "budgets": budgets, "steps": config.steps,
            "n": config.n, "split": "test", "weights_sha256": base_sha256,
            "fine_tunes": fine_tunes,
        },
        "rows": rows,
    }
    (out / "adaptation.json").write_text(json.dumps(results, indent=2) + "\n")
    return results


def main(argv: list[str] | None = None) -> None:
    run(AdaptationConfig.parse_args(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    main()
