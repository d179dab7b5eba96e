"""``TrainConfig``: the one description of a ``duet-vlm train`` run.

The command-line options (``parse_args``), the saved hyper-parameters (``to_dict``, written as
``train_config.json`` next to the reducer's own record; ``from_dict`` reads it back) and the model card's command (``command``) are all derived from the
dataclass fields below; a new option is one new field. ``RecipeConfig`` gives any recipe's
dataclass the same four things (the demo recipe's ``DemoConfig`` uses it too).

>>> config = TrainConfig.parse_args(["--model", "m", "--data", "synthetic", "--output-dir", "out", "--budget", "64"])
>>> config.command()
'duet-vlm train --model m --data synthetic --output-dir out --budget 64'
>>> TrainConfig.parse_args(shlex.split(config.command())[2:]) == config
True
"""

from __future__ import annotations

import argparse
import dataclasses
import shlex
from dataclasses import dataclass, field
from typing import ClassVar, Literal, Optional

TRAINABLE = ("projector", "projector+llm", "lora", "selector")


class _OneNameHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """``--help`` that fits 80 columns: each option under its dashed name alone (HfArgumentParser also
    registers the underscore spelling, which argparse would print beside it) with a short metavar
    (``INT``, ``FLOAT``, ``VALUE``) instead of the upper-cased field name, once."""

    def _format_action_invocation(self, action: argparse.Action) -> str:
        if not action.option_strings:
            return super()._format_action_invocation(action)
        long_names = [name for name in action.option_strings if name.startswith("--")] or action.option_strings
        name = next((n for n in long_names if "_" not in n), long_names[0])
        if action.nargs == 0:
            return name
        metavar = action.metavar or {int: "INT", float: "FLOAT"}.get(action.type, "VALUE")
        return f"{name} {self._format_args(action, metavar)}"


class RecipeConfig:
    """Mixin for a training recipe's dataclass whose fields carry their help text (``metadata={"help": ...}``):
    the argparse parser, the saved dict and the command line are all derived from the fields.

    >>> @dataclass
    ... class Recipe(RecipeConfig):
    ...     program: ClassVar[str] = "train-x"
    ...     steps: int = field(default=10, metadata={"help": "Optimizer steps."})
    >>> Recipe.parse_args(["--steps", "3"]).command()
    'train-x --steps 3'
    """

    program: ClassVar[str] = ""

    @classmethod
    def parser(cls):
        """An argparse parser with one option per field (``--max-steps`` and ``--max_steps`` both work)."""
        from transformers import HfArgumentParser

        return HfArgumentParser(cls, prog=cls.program, description=cls.__doc__, usage=f"{cls.program} [OPTIONS]",
                                formatter_class=_OneNameHelpFormatter)

    @classmethod
    def parse_args(cls, args: list[str]):
        (config,) = cls.parser().parse_args_into_dataclasses(args=args)
        return config

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, record: dict):
        """The config a ``to_dict()`` recorded. Keys that are no field are left out: a saved
        ``train_config.json`` also holds the ``reducer`` that trained (``duet_vlm.from_dict`` rebuilds it)."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{key: value for key, value in record.items() if key in names})

    def command(self, program: Optional[str] = None) -> str:
        """The command line that gives this config: required options, then every option not at its default."""
        words = (program or self.program).split()
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
            if not required and value == f.default:
                continue
            flag = "--" + f.name.replace("_", "-")
            if isinstance(value, bool):
                words.append(flag if value else "--no-" + f.name.replace("_", "-"))
            else:
                words += [flag, str(value)]
        return shlex.join(words)


@dataclass
class TrainConfig(RecipeConfig):
    """Fine-tune a vision-language checkpoint with a token-reduction method attached (see ``duet_vlm.training.train``)."""

    model: str = field(metadata={"help": "A local checkpoint directory (LLaVA, Gemma 3/4, ...) or a Hub id (where there is network)."})
    data: str = field(
        metadata={"help": "LLaVA conversation JSON ([{'image': ..., 'conversations': [...]}, ...]) or 'synthetic' "
                          "(the built-in synthetic visual-QA benchmark, see --synthetic-items)."}
    )
    output_dir: str = field(metadata={"help": "Checkpoints, the final model, its processor and model card go here."})
    method: str = field(default="duet", metadata={"help": "Reduction method attached during training (duet-vlm plan lists them)."})
    budget: Optional[int] = field(
        default=None, metadata={"help": "Average visual tokens per decoder layer per image (required unless --method full)."}
    )
    adaptive: Optional[str] = field(
        default=None,
        metadata={"help": "coverage, distinct or rank: train with a content-adaptive budget (duet_vlm.Adaptive), each "
                          "image its own budget from this signal, averaging --budget; calibrated on --calibration-items "
                          "training images before training (the vision tower is frozen) unless --threshold is given."},
    )
    threshold: Optional[float] = field(default=None, metadata={"help": "With --adaptive: the threshold (skips calibration)."})
    adaptive_floor: float = field(default=0.25, metadata={"help": "With --adaptive: an image's lowest budget, a fraction of --budget."})
    adaptive_ceiling: float = field(default=2.0, metadata={"help": "With --adaptive: an image's highest budget, a multiple of --budget."})
    calibration_items: int = field(default=64, metadata={"help": "With --adaptive: training conversations the threshold is calibrated on."})
    image_folder: Optional[str] = field(default=None, metadata={"help": "Images of --data/--eval-data are relative to this folder."})
    eval_data: Optional[str] = field(default=None, metadata={"help": "Evaluation conversations (same format as --data, or 'synthetic')."})
    synthetic_items: int = field(default=64, metadata={"help": "Training images generated when --data synthetic (eval: a quarter, from the validation split)."})
    synthetic_questions: int = field(default=4, metadata={"help": "Question/answer turns per synthetic image."})
    synthetic_offset: int = field(default=0, metadata={"help": "First synthetic image index (a later range gives images a model has not seen)."})
    train: Literal["projector", "projector+llm", "lora", "selector"] = field(
        default="projector",
        metadata={"help": "What trains (the vision tower is always frozen): the projector; the projector and the "
                          "language model; LoRA on the language model's attention projections plus the projector; or "
                          "(with --method visionselector) only the method's token scorer, the model frozen."},
    )
    penalty_start: float = field(
        default=0.1, metadata={"help": "With --train selector: the weight of the soft-to-hard top-k penalty at the "
                                       "first step (VisionSelector's recipe: 0.1), rising linearly to --penalty-end."},
    )
    penalty_end: float = field(
        default=3.0, metadata={"help": "With --train selector: the penalty's weight at the last step (the 7B recipe's 3.0)."},
    )
    lora_r: int = field(default=8, metadata={"help": "LoRA rank (--train lora)."})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA alpha (--train lora)."})
    lora_dropout: float = field(default=0.0, metadata={"help": "LoRA dropout (--train lora)."})
    learning_rate: float = field(default=2e-5, metadata={"help": "Peak learning rate (AdamW)."})
    lr_scheduler_type: str = field(default="cosine", metadata={"help": "transformers scheduler name (cosine, linear, constant, ...)."})
    warmup_steps: int = field(default=0, metadata={"help": "Linear warm-up steps."})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay."})
    epochs: float = field(default=1.0, metadata={"help": "Training epochs (ignored when --max-steps > 0)."})
    max_steps: int = field(default=-1, metadata={"help": "Optimizer steps; overrides --epochs when > 0."})
    batch_size: int = field(default=4, metadata={"help": "Conversations per device per step."})
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "Micro-batches accumulated per optimizer step."})
    bf16: bool = field(default=False, metadata={"help": "bfloat16 autocast (weights stay float32)."})
    gradient_checkpointing: bool = field(default=False, metadata={"help": "Recompute decoder activations in the backward pass."})
    logging_steps: int = field(default=10, metadata={"help": "Log the training loss every N steps."})
    save_steps: int = field(default=500, metadata={"help": "Write a checkpoint every N steps (and at the end)."})
    save_total_limit: Optional[int] = field(default=None, metadata={"help": "Keep at most N checkpoints."})
    eval_steps: Optional[int] = field(default=None, metadata={"help": "Evaluate on --eval-data every N steps (default: --save-steps)."})
    resume_from_checkpoint: Optional[str] = field(
        default=None, metadata={"help": "A checkpoint directory to resume from, or 'last' for the newest one in --output-dir."}
    )
    seed: int = field(default=0, metadata={"help": "Seed of initialisation, data order and random methods."})
    padding_side: Literal["right", "left"] = field(default="right", metadata={"help": "Where the collator pads a batch."})
    eos_after_answer: bool = field(
        default=True,
        metadata={"help": "Append the tokenizer's EOS after every answer and train on it (as LLaVA does), unless the "
                          "chat template already puts it there."},
    )
    attn_implementation: str = field(default="sdpa", metadata={"help": "Attention backend the model is loaded with (sdpa, eager, flash_attention_2)."})
    dataloader_num_workers: int = field(default=0, metadata={"help": "DataLoader worker processes."})
    deepspeed: Optional[str] = field(default=None, metadata={"help": "A DeepSpeed JSON config (GPU; passed to TrainingArguments)."})
    report_to: str = field(default="none", metadata={"help": "Trackers for transformers' Trainer (none, tensorboard, wandb, ...)."})

    program: ClassVar[str] = "duet-vlm train"

    def __post_init__(self) -> None:
        if self.train not in TRAINABLE:
            raise ValueError(f"--train must be one of {', '.join(TRAINABLE)}, got {self.train!r}")
        if self.train == "selector" and self.method != "visionselector":
            raise ValueError(f"--train selector trains the token scorer of --method visionselector, not of {self.method}")
        if self.train == "selector" and self.adaptive is not None:
            raise ValueError("--train selector trains at a fixed --budget (no --adaptive)")
        if self.threshold is not None and self.adaptive is None:
            raise ValueError("--threshold needs --adaptive SIGNAL (the signal the threshold belongs to)")
        if self.calibration_items < 1:
            raise ValueError(f"--calibration-items must be at least 1, got {self.calibration_items}")
