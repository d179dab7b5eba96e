"""``DemoConfig``: the one description of the demo model's training recipe (``duet-vlm train-demo``).

Its fields are the command's options (with their help text), the hyper-parameters saved next to the
checkpoints and in ``metrics.json``, and the model card's reproduce command (``config.command()``).

>>> config = DemoConfig.parse_args(["--output-dir", "runs/x", "--steps", "10"])
>>> config.command()
'duet-vlm train-demo --output-dir runs/x --steps 10'
>>> DemoConfig.parse_args(shlex.split(config.command())[2:]) == config
True
"""

from __future__ import annotations

import dataclasses
import json
import shlex  # noqa: F401  (the doctest above)
from dataclasses import dataclass, field
from typing import ClassVar, Optional

from ..training.config import RecipeConfig
from .geometry import ARCHITECTURES
from .objectives import SubsetMix


def _help(text: str, default=dataclasses.MISSING):
    return field(default=default, metadata={"help": text})


@dataclass
class DemoConfig(RecipeConfig):
    """Train the demo LLaVA model from scratch on the synthetic visual-QA benchmark (seeded; re-running resumes)."""

    output_dir: str = _help("Checkpoints go here; the exported model goes to OUTPUT_DIR/final.", "runs/demo")
    export_dir: Optional[str] = _help("Where the final model, processor, metrics.json and model card go "
                                      "(default: OUTPUT_DIR/final).", None)
    resume: bool = _help("Continue from the newest checkpoint in --output-dir when there is one.", True)
    seed: int = _help("Seed of initialisation, data order and visual subsets.", 0)
    # ---- schedule
    vision_steps: int = _help("First steps: the vision tower and projector alone, on the auxiliary losses.", 400)
    steps: int = _help("Visual-QA steps after the vision-only steps.", 6000)
    batch_size: int = _help("Images per step.", 4)
    n_questions: int = _help("Independent questions packed behind each image.", 16)
    balanced_questions: bool = _help("Share each image's questions equally among the question types its scene admits.", True)
    scene_curriculum: str = _help("Scene-size caps by visual-QA step, 'until:max_objects,...' (empty: none).",
                                  "300:1,700:2,1100:3")
    lr: float = _help("Peak learning rate of the visual-QA steps (AdamW, cosine).", 1.5e-3)
    vision_lr: float = _help("Peak learning rate of the vision-only steps.", 2e-3)
    warmup_steps: int = _help("Linear warm-up of the visual-QA steps.", 150)
    min_lr_ratio: float = _help("The cosine ends at this fraction of the peak.", 0.05)
    weight_decay: float = _help("AdamW weight decay (matrices only).", 0.05)
    projector_lr_mult: float = _help("Learning-rate multiplier of the projector and the auxiliary heads.", 2.0)
    grad_clip: float = _help("Gradient-norm clipping.", 1.0)
    # ---- objectives
    aux_weight: float = _help("Weight of the auxiliary per-patch / per-image losses in visual-QA steps.", 0.5)
    align_words: bool = _help("Word alignment: object patches name their colour, shape, character and quadrant "
                              "through the decoder's lm_head.", True)
    position_regression: bool = _help("Also regress each patch's column and row (linear) from its projected feature.", True)
    ground_from: int = _help("First decoder layer whose first heads get the grounding loss (-1: none).", 4)
    ground_weight: float = _help("Weight of the grounding loss.", 0.5)
    ground_heads: int = _help("Grounding heads per layer (1-4: named objects, relation's first object, counted "
                              "objects, relation's second object).", 4)
    # ---- visual subsets (method-neutral; see duet_vlm.demo.objectives.SubsetMix)
    full_share: float = _help("Relative frequency of visual-QA steps with all visual tokens.", 0.2)
    random_share: float = _help("... with a uniformly random subset of --random-min..--random-max patches.", 0.35)
    pool2_share: float = _help("... with the token grid average-pooled 2x2 (144 tokens of 576, 36 of 144).", 0.2)
    pool3_share: float = _help("... with the token grid average-pooled 3x3 (64 tokens of 576, 16 of 144).", 0.25)
    random_min: int = _help("Fewest patches of a random subset, of 576 (a model with fewer visual tokens keeps the same share).", 64)
    random_max: int = _help("Most patches of a random subset, of 576 (scaled as --random-min).", 256)
    renumber_share: float = _help("Share of reduced rows whose visual tokens get contiguous positions.", 0.5)
    shuffle_share: float = _help("Share of the renumbered rows whose visual tokens also come in a random order.", 0.5)
    # ---- model
    architecture: str = _help("The demo model's architecture: 'llava' (LLaVA-1.5's: CLIP with a CLS token, 576 visual "
                              "tokens) or 'qwen2_5_vl' (Qwen2.5-VL's: no CLS token, a 2x2 merger, 144 visual tokens, "
                              "M-RoPE; needs --renumber-share 0).", "llava")
    model_overrides: str = _help("JSON dict of demo_config overrides, e.g. '{\"text_layers\": 2}' (tests).", "")
    # ---- running (none of these changes the trained weights)
    threads: str = _help("torch threads: an integer, or 'auto' (2, dropping to 1 while the machine is busy).", "auto")
    logging_steps: int = _help("Log the losses every N steps.", 10)
    save_steps: int = _help("Write a checkpoint every N steps (and at the end).", 200)
    save_total_limit: int = _help("Keep at most N checkpoints.", 2)
    eval_steps: int = _help("Validation accuracy every N steps (0: never).", 1000)
    eval_n: int = _help("Validation questions per evaluation.", 140)
    final_eval_n: int = _help("Test questions of the final evaluation, with the image and blanked (0: none).", 700)
    progress: bool = _help("Show a progress bar.", True)

    program: ClassVar[str] = "duet-vlm train-demo"
    # fields that do not change what is trained: a checkpoint resumes under any values of these
    RUNNING: ClassVar[tuple[str, ...]] = ("output_dir", "export_dir", "resume", "threads", "logging_steps", "save_steps",
                                          "save_total_limit", "eval_steps", "eval_n", "final_eval_n", "progress")

    def __post_init__(self) -> None:
        self.curriculum()  # parse errors now, not after the vision-only steps
        self.overrides()
        if not 1 <= self.ground_heads <= 4:
            raise ValueError(f"--ground-heads must be 1-4, got {self.ground_heads}")
        if self.architecture not in ARCHITECTURES:
            raise ValueError(f"--architecture must be one of {', '.join(ARCHITECTURES)}, got {self.architecture!r}")
        if self.architecture != "llava" and self.renumber_share:
            raise ValueError(f"--architecture {self.architecture}: visual tokens keep their M-RoPE positions under every "
                             "method (the runtime refuses renumbering there), so the recipe does not renumber either: "
                             "pass --renumber-share 0")
        if not 1 <= self.random_min <= self.random_max <= 576:
            raise ValueError(f"need 1 <= --random-min <= --random-max <= 576, got {self.random_min}, {self.random_max}")

    def curriculum(self) -> list[tuple[int, int]]:
        """``scene_curriculum`` as ``[(until_step, max_objects), ...]``."""
        try:
            return [tuple(int(x) for x in part.split(":")) for part in self.scene_curriculum.split(",") if part.strip()]
        except ValueError as error:
            raise ValueError(f"--scene-curriculum must look like '300:1,700:2', got {self.scene_curriculum!r}") from error

    def overrides(self) -> dict:
        return json.loads(self.model_overrides) if self.model_overrides else {}

    def subset_mix(self) -> SubsetMix:
        return SubsetMix(full=self.full_share, random=self.random_share, pool2=self.pool2_share, pool3=self.pool3_share,
                         random_min=self.random_min, random_max=self.random_max,
                         renumber=self.renumber_share, shuffle=self.shuffle_share)

    def recipe(self) -> dict:
        """The settings that determine the trained weights (everything but ``RUNNING``)."""
        return {k: v for k, v in self.to_dict().items() if k not in self.RUNNING}
