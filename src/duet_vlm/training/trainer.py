"""Fine-tune a vision-language checkpoint with a reducer attached, on ``transformers.Trainer``.

``train(config)`` loads the checkpoint (``AutoModelForImageTextToText``, a family the library knows)
and its processor, checks the data and the budget, freezes
the vision tower (and whatever else ``config.train`` leaves out), wraps the language model in LoRA
when asked, attaches the reducer persistently and runs ``Trainer`` (progress bar, logging,
checkpoints, resume, evaluation, DDP under ``accelerate launch``). The saved model is plain: LoRA
merged, no reducer inside its weights; beside them (and in every checkpoint) ``duet_vlm_reducer.json``
records the reducer it trained under, which ``duet_vlm.load_reducer(path)``, ``duet-vlm run`` and
the lmms-eval models attach again. ``--adaptive SIGNAL`` trains with a content-adaptive budget
(``duet_vlm.Adaptive``), calibrated before training on training images, so that the model is
fine-tuned with the allocation it will be served with.

>>> from duet_vlm.training import TrainConfig, train
>>> train(TrainConfig(model="llava-hf/llava-1.5-7b-hf", data="train.json", image_folder="images",
...                   output_dir="runs/duet64", budget=64, train="lora", max_steps=1000))   # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import json
import os
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..adapters import adapter_for
from ..compat import CHECKPOINTING, checkpointing_arguments
from ..methods import METHODS, Adaptive, make
from ..methods.registry import save_reducer
from ..unwrap import unwrap_model
from .config import TrainConfig
from .data import ConversationDataset, DataError, Record, VisionLanguageCollator, encode, load_conversations, synthetic_records

# LoRA targets: the language model's attention projections (not the vision tower's, which is frozen).
LORA_TARGETS = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj)"


@dataclass
class TrainOutcome:
    """What ``train`` produced: where the model is, the last logged and the run-average loss, the steps."""

    output_dir: Path
    final_loss: float
    average_loss: float
    global_step: int
    replica_digests: list[str]


def load_records(spec: str, config: TrainConfig, split: str) -> list[Record]:
    if spec == "synthetic":
        n = config.synthetic_items if split == "train" else max(1, config.synthetic_items // 4)
        return synthetic_records(n, split=split, questions=config.synthetic_questions, offset=config.synthetic_offset)
    return load_conversations(spec, config.image_folder)


def make_reducer(config: TrainConfig):
    if config.method not in METHODS:
        raise ValueError(f"unknown method {config.method!r}; registered: {', '.join(sorted(METHODS))}")
    if config.method == "full" or (not METHODS[config.method].takes_budget and config.budget is None):
        return make(config.method)  # full, or a method whose count follows the content (PixelPrune)
    if config.budget is None:
        raise ValueError(f"--budget is required for --method {config.method} (average visual tokens per layer per image)")
    reducer = make(config.method, budget=config.budget)
    if config.adaptive is not None:
        reducer = Adaptive(reducer, signal=config.adaptive, threshold=config.threshold, floor=config.adaptive_floor,
                           ceiling=config.adaptive_ceiling)
    return reducer


def calibrate_reducer(reducer, model: nn.Module, dataset: "ConversationDataset", collator, config: TrainConfig):
    """An uncalibrated ``Adaptive`` calibrated on the first ``config.calibration_items`` training
    conversations (their prompts and answers; the signal reads the frozen vision tower only)."""
    if not isinstance(reducer, Adaptive) or reducer.threshold is not None:
        return reducer
    items = [dataset[i] for i in range(min(config.calibration_items, len(dataset)))]
    batches = []
    for lo in range(0, len(items), config.batch_size):
        batch = collator(items[lo : lo + config.batch_size])
        batch.pop("labels", None)
        batches.append(batch)
    return reducer.calibrate(model, batches)


def check_budget(reducer, model: nn.Module, config: TrainConfig) -> None:
    """Resolve the method's plan on this model's geometry now, so an unreachable budget fails before training."""
    geometry = adapter_for(unwrap_model(model)).geometry
    if config.budget is not None and config.method != "full" and config.budget >= geometry.visual_tokens:
        raise ValueError(
            f"--budget {config.budget} is not below this model's {geometry.visual_tokens} visual tokens per image: "
            "nothing would be reduced (use --method full to fine-tune without reduction)"
        )
    try:
        reducer.resolve(geometry)
    except ValueError as error:
        raise ValueError(
            f"--method {config.method} --budget {config.budget} cannot be met on this model "
            f"({geometry.num_layers} decoder layers, {geometry.visual_tokens} visual tokens): {error}"
        ) from error


def check_encoding(dataset: ConversationDataset, model: nn.Module) -> None:
    """Encode the first item: answers are labelled and the processor expands the image as the model
    expects (where the model fixes an image's token count: LLaVA-1.5's ``image_seq_length``, Gemma 3's
    ``mm_tokens_per_image``; images of any size are checked by the adapter when the model runs)."""
    item = dataset[0]
    image_token = model.config.image_token_id
    count = int((item["input_ids"] == image_token).sum())
    expected = getattr(model.config, "image_seq_length", None) or getattr(model.config, "mm_tokens_per_image", None)
    if expected is not None and (count == 0 or count % expected):  # a multiple: Gemma 3's pan-and-scan crops
        raise DataError(
            f"the processor expands an image into {count} tokens but the model expects {expected} "
            "(processor and checkpoint do not match)"
        )
    if bool((item["labels"][item["input_ids"] == image_token] != -100).any()):
        raise DataError("image tokens carry labels; the chat template's generation spans include the image")


def set_trainable(model: nn.Module, config: TrainConfig) -> nn.Module:
    """Freeze per ``config.train``; returns the model to train (a ``PeftModel`` for LoRA). Under
    ``selector`` the whole model stays frozen: only the method's scorer trains (``selector_training``)."""
    adapter = adapter_for(model)
    model.requires_grad_(False)
    if config.train == "selector":
        return model
    if config.train == "lora":
        try:
            from peft import LoraConfig, get_peft_model
        except ImportError as error:  # pragma: no cover - depends on the environment
            raise ImportError("--train lora needs peft: pip install 'duet-vlm[train]'") from error
        projector = [name for name, module in model.named_modules() if module is adapter.projector]
        lora = LoraConfig(
            r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
            target_modules=LORA_TARGETS, modules_to_save=projector,
        )
        model = get_peft_model(model, lora)
    else:
        adapter.projector.requires_grad_(True)
        if config.train == "projector+llm":
            adapter.language_model.requires_grad_(True)
            if adapter.lm_head is not None:
                adapter.lm_head.requires_grad_(True)
    vision = [p for name, p in unwrap_model(model).named_parameters() if ".vision_tower." in f".{name}"]
    if any(p.requires_grad for p in vision):  # pragma: no cover - guards the rule above
        raise RuntimeError("the vision tower must stay frozen")
    return model


def selector_training(config: TrainConfig, model: nn.Module, device, resume: str | None = None) -> tuple:
    """``--train selector``: a fresh ``VisionSelector`` scorer for this model's tokens (the language
    model's width), on ``device``, trained at ``--budget``; returns the reducer, the optimizer over
    the scorer alone (AdamW at ``--learning-rate``), and the Trainer class that adds the scorer's
    soft-to-hard top-k penalty to the loss, its weight rising linearly from ``--penalty-start`` to
    ``--penalty-end`` over the optimizer steps (VisionSelector's ``ScheduledWeightTrainer``). One
    process: the scorer is not the model's, so data-parallel replicas would not average its
    gradients. ``resume``: a checkpoint directory, whose saved scorer (every checkpoint carries one,
    ``reducer_callback``) the run continues from; the Trainer restores the optimizer's state."""
    from transformers import Trainer

    from ..methods import VisionSelector

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ValueError("--train selector runs in one process (the scorer's gradients are not averaged across ranks)")
    width = adapter_for(model).text_config.hidden_size
    reducer = VisionSelector.for_training(config.budget, width, config.seed)
    if resume is not None:
        saved = VisionSelector.load_objects(resume).get("scorer")
        if saved is None:
            raise FileNotFoundError(f"{resume} holds no trained scorer to resume from")
        reducer.scorer.load_state_dict(saved.state_dict())
    reducer.scorer.to(device).train()
    optimizer = torch.optim.AdamW(reducer.scorer.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)
    start, end = config.penalty_start, config.penalty_end

    class SelectorTrainer(Trainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            result = super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
            loss = result[0] if return_outputs else result
            penalty = reducer.take_penalty()
            if penalty is not None and model.training:
                progress = min(self.state.global_step / max(self.state.max_steps, 1), 1.0)
                loss = loss + (start + (end - start) * progress) * penalty.to(loss.device)
            return (loss, result[1]) if return_outputs else loss

    return reducer, optimizer, SelectorTrainer


def drop_input_grad_hooks(model: nn.Module) -> None:
    """Remove the hooks with which ``activation_checkpointing_enable`` makes embedding outputs require grad.

    transformers installs them (``enable_input_require_grads``) on the input embeddings of every
    sub-model, so that *reentrant* checkpointing sees an input that requires grad. On a VLM that
    includes the vision tower's patch embedding: a frozen tower's output then requires grad, and
    autograd keeps, recomputes and back-propagates through every tower layer for a gradient nobody
    reads, a cost that does not shrink with the visual tokens. duet-vlm only asks for
    non-reentrant checkpointing, under which parameters inside a checkpointed layer get their
    gradients whether or not its inputs require grad, so the hooks only cost."""
    unwrap_model(model).disable_input_require_grads()


def checkpointing_callback():
    """A ``TrainerCallback`` that runs ``drop_input_grad_hooks`` once ``Trainer`` has enabled checkpointing
    (it does so in ``train()``, before ``on_train_begin``)."""
    from transformers import TrainerCallback

    class DropInputGradHooks(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kwargs):
            if getattr(args, CHECKPOINTING) and model is not None:
                drop_input_grad_hooks(model)

    return DropInputGradHooks()


def reducer_callback(reducer):
    """Writes the reducer's record (``duet_vlm_reducer.json``) into every checkpoint the Trainer saves."""
    from transformers import TrainerCallback

    class SaveReducer(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if state.is_world_process_zero and folder.is_dir():
                save_reducer(reducer, folder)

    return SaveReducer()


def parameter_digest(model: nn.Module) -> str:
    """SHA-256 of every trainable parameter, to compare data-parallel replicas."""
    digest = hashlib.sha256()
    for name, param in sorted(model.named_parameters()):
        if param.requires_grad:
            digest.update(name.encode())
            digest.update(param.detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()


def _has_accelerator() -> bool:
    return torch.cuda.is_available() or (hasattr(torch, "xpu") and torch.xpu.is_available()) or torch.backends.mps.is_available()


def trainer_arguments(output_dir: str, seed: int, **options):
    """``TrainingArguments`` with what every duet-vlm training run shares (``duet-vlm train`` and the
    demo recipe): steps-based checkpoints, the seed for initialisation and data order, the collator's
    batch passed whole to the model, CPU runs told apart from accelerator runs, and no DDP search for
    unused parameters. ``options`` are further ``TrainingArguments`` fields.

    >>> trainer_arguments("runs/x", seed=0, max_steps=10).save_strategy      # doctest: +SKIP
    """
    from transformers import TrainingArguments

    shared = dict(
        save_strategy="steps",
        seed=seed,
        data_seed=seed,
        report_to="none",
        # Without an accelerator, say so: accelerate then runs a multi-process launch as DDP over gloo
        # (MULTI_CPU) instead of N independent single-process runs.
        use_cpu=not _has_accelerator(),
        # The collator builds the model's inputs; Trainer must not drop columns it cannot match to forward().
        remove_unused_columns=False,
        label_names=["labels"],
        # Frozen parameters (vision tower, LoRA's base weights) do not require grad, so DDP does not wait for
        # them; every trained parameter is used in every step (reducers drop tokens, not modules). Searching
        # for unused parameters would only cost a graph traversal and breaks gradient checkpointing.
        ddp_find_unused_parameters=False,
    )
    return TrainingArguments(output_dir=output_dir, **{**shared, **options})


def resume_point(spec, output_dir) -> str | bool | None:
    """What ``Trainer.train(resume_from_checkpoint=...)`` gets: ``None`` / ``False`` -> start afresh;
    ``"last"`` / ``"true"`` / ``True`` -> the newest ``checkpoint-N`` in ``output_dir`` (an error if none);
    ``"auto"`` -> the newest one if there is one, else start afresh; else a checkpoint directory."""
    from transformers.trainer_utils import get_last_checkpoint

    if spec is None or spec is False:
        return None
    text = str(spec).lower()
    if text in ("last", "true", "auto"):
        last = get_last_checkpoint(str(output_dir)) if Path(output_dir).is_dir() else None
        if last is None and text != "auto":
            raise FileNotFoundError(f"no checkpoint-N directory in {output_dir} to resume from")
        return last
    if not Path(spec).is_dir():
        raise FileNotFoundError(f"--resume-from-checkpoint {spec}: no such checkpoint directory")
    return str(spec)


def training_arguments(config: TrainConfig, has_eval: bool):
    return trainer_arguments(
        config.output_dir,
        config.seed,
        learning_rate=config.learning_rate,
        lr_scheduler_type=config.lr_scheduler_type,
        warmup_steps=config.warmup_steps,
        weight_decay=config.weight_decay,
        num_train_epochs=config.epochs,
        max_steps=config.max_steps,
        per_device_train_batch_size=config.batch_size,
        per_device_eval_batch_size=config.batch_size,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        bf16=config.bf16,
        # Non-reentrant checkpointing needs no input that requires grad (the embeddings may be frozen).
        **checkpointing_arguments(config.gradient_checkpointing,
                                  {"use_reentrant": False} if config.gradient_checkpointing else None),
        logging_steps=config.logging_steps,
        save_steps=config.save_steps,
        save_total_limit=config.save_total_limit,
        eval_strategy="steps" if has_eval else "no",
        eval_steps=(config.eval_steps or config.save_steps) if has_eval else None,
        dataloader_num_workers=config.dataloader_num_workers,
        deepspeed=config.deepspeed,
        report_to=config.report_to,
    )


def train(config: TrainConfig) -> TrainOutcome:
    """Run the training ``config`` describes; see the module docstring."""
    from transformers import AutoModelForImageTextToText, AutoProcessor, Trainer, set_seed

    reducer = make_reducer(config)
    train_records = load_records(config.data, config, "train")
    eval_records = load_records(config.eval_data, config, "validation") if config.eval_data else None

    processor = AutoProcessor.from_pretrained(config.model)
    model = AutoModelForImageTextToText.from_pretrained(
        config.model, dtype=torch.float32, attn_implementation=config.attn_implementation
    )
    model.config.use_cache = False
    check_budget(reducer, model, config)  # its adapter_for refuses a family the library does not know
    train_dataset = ConversationDataset(train_records, processor, config.eos_after_answer)
    eval_dataset = ConversationDataset(eval_records, processor, config.eos_after_answer) if eval_records else None
    check_encoding(train_dataset, model)
    tokenizer = processor.tokenizer
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    collator = VisionLanguageCollator(pad_token_id=pad, padding_side=config.padding_side)

    reducer = calibrate_reducer(reducer, model, train_dataset, collator, config)
    # LoRA's A matrices are drawn here, before the Trainer seeds anything: seeded with the run's seed,
    # two runs with one seed start from the same adapters (and every rank from the same ones).
    set_seed(config.seed)
    model = set_trainable(model, config)
    arguments = training_arguments(config, eval_dataset is not None)
    resume = resume_point(config.resume_from_checkpoint, config.output_dir)
    trainer_class, optimizers = Trainer, (None, None)
    if config.train == "selector":  # only the method's scorer trains
        reducer, optimizer, trainer_class = selector_training(config, model, arguments.device, resume or None)
        optimizers = (optimizer, None)
    handle = reducer.attach(model)
    try:
        trainer = trainer_class(
            model=model, args=arguments, train_dataset=train_dataset,
            eval_dataset=eval_dataset, data_collator=collator, processing_class=processor,
            callbacks=[checkpointing_callback(), reducer_callback(reducer)], optimizers=optimizers,
        )
        result = trainer.train(resume_from_checkpoint=resume)
    finally:
        handle.remove()

    from accelerate.utils import gather_object

    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    with whole_parameters(model):  # every rank enters: under ZeRO-3 it gathers the partitioned weights
        digest = parameter_digest(reducer.scorer if config.train == "selector" else model)  # what trained
        outcome = TrainOutcome(
            output_dir=Path(config.output_dir),
            final_loss=losses[-1] if losses else result.training_loss,
            average_loss=result.training_loss,
            global_step=trainer.state.global_step,
            replica_digests=gather_object([digest]) if trainer.accelerator.num_processes > 1 else [digest],
        )
        if trainer.is_world_process_zero():
            save_final(trainer, config, processor, outcome, handle, reducer)
    trainer.accelerator.wait_for_everyone()
    return outcome


def whole_parameters(model: nn.Module):
    """A context in which every parameter of ``model`` holds its whole value: under DeepSpeed ZeRO-3
    its partitioned parameters are gathered on every rank (a collective: every rank enters it; read
    only, nothing is scattered back), so that the digest and the saved weights are the model's, not
    a rank's empty partition; elsewhere nothing happens. The whole model is then in each rank's
    memory for the save."""
    partitioned = [p for p in model.parameters() if hasattr(p, "ds_id")]
    if not partitioned:
        return nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(partitioned, modifier_rank=None)


def save_final(trainer, config: TrainConfig, processor, outcome: TrainOutcome, handle, reducer) -> None:
    """The plain model (LoRA merged, no reducer) + processor + ``duet_vlm_reducer.json`` (the reducer
    that trained, as its ``to_dict()``: ``duet_vlm.load_reducer`` rebuilds it) + ``train_config.json``
    (the config and the same record) + model card."""
    output = Path(config.output_dir)
    model = trainer.accelerator.unwrap_model(trainer.model)
    if config.train == "lora":
        model = model.merge_and_unload()
    model = unwrap_model(model)
    model.config.use_cache = True
    model.save_pretrained(output)
    processor.save_pretrained(output)
    trainer.save_state()
    record = {**config.to_dict(), "reducer": reducer.to_dict()}
    (output / "train_config.json").write_text(json.dumps(record, indent=2) + "\n")
    save_reducer(reducer, output)  # beside the weights: loading the model attaches it again
    summary = {
        "final_loss": outcome.final_loss, "average_loss": outcome.average_loss, "global_step": outcome.global_step,
        "model_class": type(model).__name__, "model_type": model.config.model_type,
        "world_size": trainer.accelerator.num_processes, "replica_digests": outcome.replica_digests,
        "replicas_identical": len(set(outcome.replica_digests)) == 1,
        "schedule": {"tokens_per_layer": handle.schedule.tokens_per_layer, "average": handle.schedule.average,
                     "llm_input": handle.schedule.llm_input},
    }
    (output / "train_results.json").write_text(json.dumps(summary, indent=2) + "\n")
    write_model_card(output, config, summary)


def write_model_card(output: Path, config: TrainConfig, summary: dict) -> Path:
    """``README.md``: method, budget, what trained, the final loss and the command (``config.command()``)."""
    schedule = summary["schedule"]
    budget = "" if config.method == "full" else f" at budget {config.budget}"
    trained = {
        "projector": "the projector (vision tower and language model frozen)",
        "projector+llm": "the projector and the language model (vision tower frozen)",
        "selector": "only VisionSelector's token scorer (duet_vlm_scorer.safetensors; the model frozen)",
        "lora": f"LoRA (r={config.lora_r}, alpha={config.lora_alpha}) on the language model's attention projections, "
                "merged into the weights, and the projector (vision tower frozen)",
    }[config.train]
    lines = [
        "---",
        "library_name: transformers",
        "pipeline_tag: image-text-to-text",
        f"tags: [{summary['model_type']}, duet-vlm, visual-token-reduction]",
        "---",
        "",
        f"# {Path(config.model).name or config.model}, fine-tuned with {config.method}{budget}",
        "",
        f"Fine-tuned from `{config.model}` with duet-vlm's `{config.method}` reducer attached{budget}: on average "
        f"{schedule['average']:.2f} visual tokens per decoder layer per image, {schedule['llm_input']} of them entering "
        "the language model.",
        "",
        f"The weights are a plain `{summary['model_class']}`; the reducer is not inside them but beside them, in "
        "`duet_vlm_reducer.json` (`duet-vlm run` and the lmms-eval models attach it unless told otherwise). "
        "Use it the way it was trained:",
        "",
        "```python",
        "import duet_vlm",
        "from transformers import AutoModelForImageTextToText, AutoProcessor",
        "model = AutoModelForImageTextToText.from_pretrained(path)",
        "processor = AutoProcessor.from_pretrained(path)",
        "with duet_vlm.load_reducer(path)(model):"
        + f"{'' if config.adaptive is None else f'  # {config.method} at an adaptive budget ({config.adaptive})'}",
        "    model.generate(**inputs, max_new_tokens=64)",
        "```",
        "",
        "## Training",
        f"- method: `{config.method}`, budget: {config.budget}"
        + ("" if config.adaptive is None else f", adaptive ({config.adaptive}, floor {config.adaptive_floor}, "
           f"ceiling {config.adaptive_ceiling})"),
        f"- trained: {trained}",
        f"- data: `{config.data}`" + (f" (images under `{config.image_folder}`)" if config.image_folder else ""),
        f"- {summary['global_step']} optimizer steps on {summary['world_size']} process(es), "
        f"{config.batch_size} conversations per device x {config.gradient_accumulation_steps} accumulation steps, "
        f"learning rate {config.learning_rate} ({config.lr_scheduler_type})",
        f"- final training loss (last logged): {summary['final_loss']:.4f}; average over the run: {summary['average_loss']:.4f}",
        "- hyper-parameters: `train_config.json`; losses per step: `trainer_state.json`",
        "",
        "Command:",
        "",
        "```bash",
        config.command(),
        "```",
    ]
    path = output / "README.md"
    path.write_text("\n".join(lines) + "\n")
    return path
