"""The demo model's training recipe on the shared ``transformers.Trainer`` loop (``duet-vlm train-demo``).

One command trains from scratch, seeded, with a progress bar, resumable by re-running it:
``vision_steps`` steps of the vision tower and projector alone on the auxiliary losses, then
``steps`` visual-QA steps on the whole model, whose decoder sees method-neutral visual subsets
(``objectives.SubsetMix``). The settings are one dataclass, ``DemoConfig``; the losses are
``DemoTrainer.compute_loss``; batches come from ``batching.DemoQADataset`` through the shared
collator; evaluation lives in ``evaluate``, the model card in ``card``.

>>> from duet_vlm.demo.config import DemoConfig
>>> train_demo(DemoConfig(output_dir="runs/demo"))                        # doctest: +SKIP
PosixPath('runs/demo/final')

Command line: ``duet-vlm train-demo --help`` (or ``python -m duet_vlm.demo.train --help``).
"""

from __future__ import annotations

import json
import math
import os
import time
from collections import defaultdict
from pathlib import Path
from typing import Callable

import torch
from torch import nn
from transformers import Trainer, TrainerCallback
from transformers.trainer_callback import ExportableState

from ..training.trainer import resume_point, trainer_arguments
from .batching import DemoQADataset, demo_collator, split_batch
from .card import write_model_card
from .config import DemoConfig
from .evaluate import evaluate_accuracy, model_card_metrics
from .geometry import geometry
from .objectives import AuxHeads, answer_words, language_forward


class DemoModel(nn.Module):
    """What trains: the demo model (``llava``, whichever architecture) and the training-only auxiliary
    heads (checkpointed together; only ``llava`` is exported)."""

    def __init__(self, llava: nn.Module, heads: AuxHeads):
        super().__init__()
        self.llava, self.heads = llava, heads

    def forward(self, input_ids, pixel_values, labels=None):
        return self.llava(input_ids=input_ids, pixel_values=pixel_values, labels=labels)


def lr_factor(step: int, config: DemoConfig) -> float:
    """Learning-rate multiplier of step ``step`` (relative to ``config.lr``): warm-up and cosine over the
    vision-only steps at ``vision_lr``, then again over the visual-QA steps at ``lr``."""
    def cosine(step, total, warmup):
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return config.min_lr_ratio + (1 - config.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    if step < config.vision_steps:
        return config.vision_lr / config.lr * cosine(step, config.vision_steps, min(50, config.vision_steps))
    return cosine(step - config.vision_steps, config.steps, config.warmup_steps)


class DemoTrainer(Trainer):
    """``Trainer`` with the recipe's loss: auxiliary losses in every step; in visual-QA steps also
    the answer loss on the step's visual subset and the grounding loss. Sequential data (item ``i``
    belongs to step ``i // batch_size``), the recipe's parameter groups and two-phase schedule."""

    def __init__(self, *args, recipe: DemoConfig, **kwargs):
        super().__init__(*args, **kwargs)
        self.recipe = recipe
        self.geometry = geometry(recipe.architecture)
        self.mix = recipe.subset_mix()
        n_layers = self.model.llava.config.text_config.num_hidden_layers
        use = recipe.ground_weight > 0 and recipe.ground_from >= 0
        self.ground_layers = tuple(range(recipe.ground_from, n_layers)) if use else ()
        self.window: dict[str, float] = defaultdict(float)
        self.last_tokens = 0  # sequence length of the last step, for the thread tuner

    def _get_train_sampler(self, train_dataset=None):
        return torch.utils.data.SequentialSampler(train_dataset if train_dataset is not None else self.train_dataset)

    def create_optimizer(self, model=None):
        if self.optimizer is None:
            model = self.model
            decay, no_decay, fast = [], [], []
            for name, p in model.named_parameters():
                if self.geometry.is_projector(name) or name.startswith("heads."):
                    fast.append(p)
                elif p.ndim >= 2 and "embed" not in name:
                    decay.append(p)
                else:
                    no_decay.append(p)
            lr, wd = self.recipe.lr, self.recipe.weight_decay
            groups = [{"params": decay, "weight_decay": wd, "lr": lr}, {"params": no_decay, "weight_decay": 0.0, "lr": lr},
                      {"params": fast, "weight_decay": 0.0, "lr": lr * self.recipe.projector_lr_mult}]
            self.optimizer = torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.98), eps=1e-8)
        return self.optimizer

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        if self.lr_scheduler is None:
            self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(
                optimizer or self.optimizer, lambda step: lr_factor(step, self.recipe))
        return self.lr_scheduler

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        demo = self.accelerator.unwrap_model(model)
        llava, heads, recipe = demo.llava, demo.heads, self.recipe
        step = self.state.global_step
        batch, targets = split_batch(inputs)
        geometry = self.geometry
        patches, cls = geometry.features(llava, batch)
        feats = geometry.projector(llava)(patches)
        vision_only = step < recipe.vision_steps
        aux = heads.loss(feats, cls, targets, llava, frozen_decoder=vision_only)
        w = self.window
        w["aux"] += float(aux.detach())
        w["n"] += 1
        if vision_only:
            self.last_tokens = 0
            return aux
        generator = torch.Generator().manual_seed(recipe.seed * 1_000_003 + step)  # a pure function of the step
        subset, orders = self.mix.draw(generator, rows=batch["input_ids"].shape[0])
        if geometry.architecture != "llava":
            orders = ["original"] * len(orders)  # M-RoPE: every token keeps its position (DemoConfig says so)
        targets["ground_target"] = targets["ground_target"][:, :, :recipe.ground_heads]
        result = language_forward(llava, batch, patches, subset, orders, generator, targets, self.ground_layers)
        answer = result.output.loss
        loss = answer + recipe.aux_weight * aux
        if result.grounding is not None:
            loss = loss + recipe.ground_weight * result.grounding
            w["ground"] += float(result.grounding.detach())
        w["answer"] += float(answer.detach())
        w["visual"] += subset.count(geometry.grid)
        w["questions_dropped"] += result.dropped_questions
        w["qa"] += 1
        self.last_tokens = batch["input_ids"].shape[1] - geometry.n_tokens + subset.count(geometry.grid)
        return (loss, result.output) if return_outputs else loss

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        # One step with non-finite gradients would turn every weight into NaN through AdamW and
        # lose the run; such a step is skipped instead (its gradients dropped) and counted in the log.
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        if grads and not bool(torch.isfinite(torch.stack([torch.linalg.vector_norm(g) for g in grads])).all()):
            for p in model.parameters():
                p.grad = None
            self.window["skipped_steps"] += 1
        return loss

    def log(self, logs: dict, start_time=None) -> None:
        w = self.window
        if w["n"] and "loss" in logs:
            logs["aux"] = round(w["aux"] / w["n"], 4)
            if w["skipped_steps"]:
                logs["skipped_steps"] = int(w["skipped_steps"])
            if w["qa"]:
                for key in ("answer", "ground", "visual", "questions_dropped"):
                    logs[key] = round(w[key] / w["qa"], 4)
            w.clear()
        super().log(logs, start_time)


class ThreadTuner:
    """Chooses 1 or ``max_threads`` torch threads from measured step times.

    On a shared 2-core machine two OpenMP threads are ~2x faster than one when the cores are
    idle but several times slower when other processes compete for them (threads wait for each
    other at every barrier). The tuner runs ``max_threads``, drops to 1 when steps get much
    slower than the best seen, and every ``probe_every`` steps tries the other setting for a few
    steps (aborting after one step if that one is clearly worse), keeping whichever is faster.
    """

    def __init__(self, max_threads: int, probe_every: int = 100, probe_steps: int = 3, first_probe: int = 5):
        self.max = max_threads
        self.current = max_threads
        self.probe_every = probe_every
        self.probe_steps = probe_steps
        self.recent: list[float] = []
        self.best: dict[int, float] = {}
        self.probe: dict | None = None
        # the first probe comes early: a run that starts under contention should not wait probe_every steps
        self.since_probe = probe_every - first_probe

    def _median(self) -> float:
        r = sorted(self.recent[-5:])
        return r[len(r) // 2]

    def threads(self, step: int) -> int:
        if self.max <= 1:
            return 1
        if self.probe is None and self.since_probe >= self.probe_every and len(self.recent) >= 3:
            other = 1 if self.current != 1 else self.max
            self.probe = {"threads": other, "ref": self._median(), "times": []}
            self.since_probe = 0
        return self.probe["threads"] if self.probe else self.current

    def record(self, dt: float) -> None:
        self.since_probe += 1
        if self.probe is not None:
            p = self.probe
            p["times"].append(dt)
            if dt > 2.0 * p["ref"] or len(p["times"]) >= self.probe_steps:
                mean = sum(p["times"]) / len(p["times"])
                if len(p["times"]) >= self.probe_steps and mean < 0.9 * p["ref"]:
                    self.current = p["threads"]
                    self.recent = list(p["times"])
                self.probe = None
            return
        self.recent = (self.recent + [dt])[-5:]
        if len(self.recent) >= 3:
            med = self._median()
            self.best[self.current] = min(self.best.get(self.current, med), med)
            if self.current > 1 and med > 2.0 * self.best[self.current]:
                self.current = 1  # contention: fall back at once, re-probed later
                self.recent = []


class ThreadTunerCallback(TrainerCallback):
    """Runs ``ThreadTuner`` around every optimizer step. Visual-QA steps differ in length (the subset
    mix), so their times are scaled to a 600-token step before the tuner compares them; the tuner
    starts afresh when the visual-QA steps begin."""

    def __init__(self, trainer: DemoTrainer, max_threads: int):
        self.trainer, self.max_threads = trainer, max_threads
        self.tuner = ThreadTuner(max_threads, probe_every=50)
        self.started = 0.0

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step == self.trainer.recipe.vision_steps:
            self.tuner = ThreadTuner(self.max_threads, probe_every=50)
        torch.set_num_threads(self.tuner.threads(state.global_step))
        self.started = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        dt = time.perf_counter() - self.started
        tokens = self.trainer.last_tokens
        self.tuner.record(dt * 600 / tokens if tokens else dt)


class ValidationCallback(TrainerCallback):
    """Validation accuracy (all tokens) every ``eval_steps`` visual-QA steps, into the log history."""

    def __init__(self, trainer: DemoTrainer, processor):
        self.trainer, self.processor = trainer, processor

    def on_step_end(self, args, state, control, **kwargs):
        recipe = self.trainer.recipe
        qa_step = state.global_step - recipe.vision_steps
        if recipe.eval_steps and qa_step > 0 and qa_step % recipe.eval_steps == 0 and state.global_step < state.max_steps:
            llava = self.trainer.accelerator.unwrap_model(self.trainer.model).llava
            result = evaluate_accuracy(llava, self.processor, split="validation", n=recipe.eval_n)
            self.trainer.log({"val_accuracy": round(result["accuracy"], 4),
                              **{f"val_{t}": round(a, 3) for t, a in result["per_type"].items()}})


class TrainingClock(TrainerCallback, ExportableState):
    """Training wall-clock in seconds, summed over the runs of a resumed training: ``Trainer`` saves this
    callback's state with every checkpoint and, with ``restore_callback_states_from_checkpoint``, builds it
    again from there on resume. Steps redone after an interruption count once, as the clock resumes at the
    checkpoint's value."""

    def __init__(self, seconds: float = 0.0):
        self.seconds = seconds
        self._since: float | None = None

    def on_train_begin(self, args, state, control, **kwargs):
        self._since = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        now = time.perf_counter()
        self.seconds += now - self._since
        self._since = now

    def state(self) -> dict:
        return {"args": {"seconds": self.seconds}, "attributes": {}}


def check_saved_recipe(config: DemoConfig, output_dir: Path) -> None:
    """Write ``demo_config.json``, or check that the one already there describes the same recipe."""
    path = output_dir / "demo_config.json"
    if config.resume and path.exists():
        saved = json.loads(path.read_text())
        recipe = config.recipe()
        if {k: v for k, v in saved.items() if k in recipe} != recipe:
            changed = sorted(k for k in recipe if saved.get(k) != recipe[k])
            raise ValueError(f"{output_dir} holds checkpoints of different hyper-parameters ({', '.join(changed)}): "
                             "use the same options, another --output-dir, or --no-resume")
    path.write_text(json.dumps(config.to_dict(), indent=2) + "\n")


def _code_version() -> str | None:
    """The git commit of the source tree this recipe ran from (plus "+changes" if it was edited), if any."""
    import subprocess

    where = Path(__file__).resolve().parent.parent  # the duet_vlm package
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=where, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "."], cwd=where, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    if commit.returncode:
        return None
    return commit.stdout.strip() + ("+changes" if dirty.stdout.strip() else "")


def train_demo(config: DemoConfig, log: Callable[[str], None] = print, callbacks: tuple = ()) -> Path:
    """Run the recipe ``config`` describes; returns the export directory (model, processor,
    ``metrics.json``, ``README.md``). Re-running the same config resumes from the newest checkpoint.
    ``callbacks``: further ``TrainerCallback``s."""
    output_dir = Path(config.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    export_dir = Path(config.export_dir) if config.export_dir else output_dir / "final"
    check_saved_recipe(config, output_dir)
    code = _code_version()  # now: the tree may change while the run trains
    auto = config.threads in ("auto", "0", "")
    max_threads = min(2, os.cpu_count() or 1) if auto else int(config.threads)
    torch.set_num_threads(max_threads)

    shape = geometry(config.architecture)
    processor = shape.processor(output_dir / "processor")
    tok = processor.tokenizer
    llava = shape.build(tok, config.overrides(), seed=config.seed)
    torch.manual_seed(config.seed + 1)
    cfg = llava.config
    if config.ground_heads > cfg.text_config.num_attention_heads:
        raise ValueError(f"--ground-heads {config.ground_heads} exceeds the decoder's {cfg.text_config.num_attention_heads} heads")
    heads = AuxHeads(cfg.text_config.hidden_size, shape.scene_width(cfg),
                     words=answer_words(tok) if config.align_words else None,
                     position_regression=config.position_regression, grid=shape.grid)
    model = DemoModel(llava, heads)
    total_steps = config.vision_steps + config.steps
    dataset = DemoQADataset(tok, cfg.image_token_id, n_items=total_steps * config.batch_size,
                            n_questions=config.n_questions, balanced=config.balanced_questions,
                            curriculum=config.curriculum(), batch_size=config.batch_size,
                            curriculum_start=config.vision_steps, geometry=shape)
    args = trainer_arguments(
        str(output_dir), config.seed, max_steps=total_steps, per_device_train_batch_size=config.batch_size,
        learning_rate=config.lr, max_grad_norm=config.grad_clip, logging_steps=config.logging_steps,
        save_steps=config.save_steps, save_total_limit=config.save_total_limit, dataloader_num_workers=0,
        disable_tqdm=not config.progress, restore_callback_states_from_checkpoint=True,
    )
    trainer = DemoTrainer(model=model, args=args, train_dataset=dataset, data_collator=demo_collator(tok),
                          # a processor built without torchvision has no video processor to save with a checkpoint
                          processing_class=processor if getattr(processor, "video_processor", True) else processor.tokenizer,
                          recipe=config)
    trainer.add_callback(TrainingClock())
    if auto and max_threads > 1:
        trainer.add_callback(ThreadTunerCallback(trainer, max_threads))
    if config.eval_steps:
        trainer.add_callback(ValidationCallback(trainer, processor))
    for callback in callbacks:
        trainer.add_callback(callback)
    resume = resume_point("auto" if config.resume else None, output_dir)
    params = shape.count_parameters(llava)
    log(f"resuming from {resume}" if resume else
        f"training from scratch: {params['total'] / 1e6:.2f}M parameters; {config.command()}")
    trainer.train(resume_from_checkpoint=resume)
    # resuming replaced the clock by one rebuilt from the checkpoint
    clock = next(callback for callback in trainer.callback_handler.callbacks if isinstance(callback, TrainingClock))

    llava.eval()
    export_dir.mkdir(parents=True, exist_ok=True)
    llava.save_pretrained(export_dir, safe_serialization=True)
    shape.save_processor(processor, export_dir)
    steps = trainer.state.global_step
    qa_steps = max(0, steps - config.vision_steps)
    metrics = {"hparams": config.to_dict(), "command": config.command(), "code": code, "parameters": params,
               "steps": qa_steps, "vision_steps": min(steps, config.vision_steps),
               "images_seen": steps * config.batch_size,
               "qa_pairs_seen_approx": qa_steps * config.batch_size * config.n_questions,
               "training_seconds": round(clock.seconds, 1)}
    if config.final_eval_n:
        metrics.update(model_card_metrics(llava, processor, n=config.final_eval_n))
        for key in ("test", "test_blank_image"):
            r = metrics[key]
            log(f"{key}: acc {r['accuracy']:.3f} " + " ".join(f"{t}={a:.2f}" for t, a in r["per_type"].items()))
    (export_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    (export_dir / "training_log.json").write_text(json.dumps(trainer.state.log_history, indent=1))
    write_model_card(export_dir)
    log(f"saved {export_dir}")
    return export_dir


def main(argv: list[str] | None = None) -> None:
    import sys

    config = DemoConfig.parse_args(sys.argv[1:] if argv is None else argv)
    train_demo(config, log=lambda message: print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True))


if __name__ == "__main__":
    main()
