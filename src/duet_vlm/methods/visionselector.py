"""VisionSelector (ACM MM 2026): a learned token scorer, trained with a differentiable top-k while the
vision-language model stays frozen (official code ``JulietChoo/VisionSelector`` ``800a70f``)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..geometry import Geometry
from ..options import check_number
from ..schedule import Schedule
from ..selection import gather_tokens
from .base import Plan, Reducer, VisionReduction, VisionStage, VisionView, check_budget, per_unit
from .registry import register_method

#: The file a trained scorer is saved in, beside the model and its ``duet_vlm_reducer.json``.
SCORER_FILE = "duet_vlm_scorer.safetensors"


class TokenScorer(nn.Module):
    """A token's importance from the tokens of its image: ``q_i . mean_j k_j / sqrt(h)`` with
    ``q = W_q x + b_q`` and ``k = W_k x + b_k`` of width ``h`` (the official ``TransformerScorer``:
    the mean over keys of the scaled query-key products, computed here as one product with the mean
    key, linear in the tokens rather than quadratic). ``width``: the language model's hidden size
    (the scorer reads projected tokens); ``hidden`` defaults to half of it, as the official Qwen
    scorer (1,792 of 3,584: 12.85M parameters at 7B). Weights start near zero (``std``), biases at
    zero, as the official ``_init_near_zero``. ``normalize``: divide each token by its root mean
    square first (not in the official scorer; ``VisionSelector.for_training`` sets it, see there).

    >>> TokenScorer(8)(torch.randn(2, 5, 8)).shape
    torch.Size([2, 5])
    """

    def __init__(self, width: int, hidden: int | None = None, std: float = 1e-4, normalize: bool = False):
        super().__init__()
        self.width, self.hidden, self.normalize = width, hidden or width // 2, normalize
        self.q_proj = nn.Linear(width, self.hidden)
        self.k_proj = nn.Linear(width, self.hidden)
        for projection in (self.q_proj, self.k_proj):
            nn.init.normal_(projection.weight, std=std)
            nn.init.zeros_(projection.bias)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """``(..., N, width)`` -> ``(..., N)`` scores."""
        tokens = tokens.to(self.q_proj.weight.dtype)
        if self.normalize:
            tokens = tokens * torch.rsqrt(tokens.pow(2).mean(dim=-1, keepdim=True) + 1e-6)
        mean_key = self.k_proj(tokens).mean(dim=-2, keepdim=True)
        return (self.q_proj(tokens) * mean_key).sum(dim=-1) / math.sqrt(self.hidden)


class SoftTopK(torch.autograd.Function):
    """``sigmoid(x + t)`` with ``t`` per row such that the row sums to ``k`` (64 bisection steps), and
    its exact gradient: with ``v = sigmoid'(x + t)``, the Jacobian is ``diag(v) - v v^T / sum(v)``
    (``t`` moves to keep the sum at ``k``). The official ``TopK`` function, written from its
    definition (``math.stackexchange.com/q/4506773``)."""

    @staticmethod
    def forward(ctx, scores: torch.Tensor, k: int) -> torch.Tensor:
        if not 0 < k < scores.shape[-1]:
            raise ValueError(f"a soft top-{k} of {scores.shape[-1]} scores needs 0 < k < {scores.shape[-1]}")
        with torch.no_grad():
            low = -scores.amax(dim=-1, keepdim=True) - 10
            high = -scores.amin(dim=-1, keepdim=True) + 10
            for _ in range(64):
                middle = (low + high) / 2
                below = torch.sigmoid(scores + middle).sum(dim=-1, keepdim=True) < k
                low = torch.where(below, middle, low)
                high = torch.where(below, high, middle)
            shift = (low + high) / 2
        ctx.save_for_backward(scores, shift)
        return torch.sigmoid(scores + shift)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        scores, shift = ctx.saved_tensors
        mask = torch.sigmoid(scores + shift)
        v = mask * (1 - mask)
        weighted = grad * v
        return weighted - weighted.sum(dim=-1, keepdim=True) * v / v.sum(dim=-1, keepdim=True), None


def soft_top_k(scores: torch.Tensor, k: int) -> torch.Tensor:
    """``(..., N)`` weights in ``(0, 1)`` summing to ``k`` per row, highest where ``scores`` are
    (``SoftTopK``); differentiable.

    >>> soft_top_k(torch.tensor([[0.0, 5.0, 10.0, -5.0]]), 2).sum().round().item()
    2.0
    """
    return SoftTopK.apply(scores, k)


@dataclass
class LearnedSelect(VisionStage):
    """The scorer's top ``keep`` tokens of each unit, on the tokens as the language model receives them
    (after the projector; Qwen's merged tokens), in order. The CLS token is never scored nor kept.
    ``scorer_for(width)`` gives the scorer for tokens that wide.

    ``soft`` (training): every token goes on, each multiplied by its ``soft_top_k`` weight for
    ``soft`` tokens (the official training forward), and ``penalties`` collects the binary
    cross-entropy between those weights and the hard top-``soft`` mask (its official regulariser)
    for the trainer.
    """

    scorer_for: Callable[[int], TokenScorer]
    soft: int | None = None
    penalties: list = field(default_factory=list, repr=False)

    def reduce(self, view: VisionView, keep: int) -> VisionReduction:
        offset = int(view.has_cls)
        features = view.features[:, offset:]
        projected = view.project(features)
        scorer = self.scorer_for(projected.shape[-1]).to(projected.device)
        if self.soft is not None:
            scores = scorer(projected)
            weights = soft_top_k(scores.float(), self.soft)
            hard = torch.zeros_like(weights).scatter_(-1, scores.topk(self.soft, dim=-1).indices, 1.0)
            self.penalties.append(F.binary_cross_entropy(weights, hard))
            kept = torch.arange(features.shape[1], device=features.device).expand(features.shape[0], -1) + offset
            return VisionReduction(features, kept, projected=projected * weights[..., None].to(projected.dtype))
        with torch.no_grad():
            scores = scorer(projected)
        kept = scores.topk(keep, dim=-1).indices.sort(dim=-1).values
        return VisionReduction(gather_tokens(features, kept), kept + offset, projected=gather_tokens(projected, kept))


@register_method("visionselector")
@dataclass
class VisionSelector(Reducer):
    """VisionSelector (Zhu et al., ACM MM 2026; arXiv 2510.16598; official code ``JulietChoo/VisionSelector`` ``800a70f``,
    ``qwen-vl-finetune/compression_method/selector_model.py`` and ``selector_scorer.py``).

    A small scorer (``TokenScorer``) ranks the tokens of each image as the language model would
    receive them, and the ``budget`` it scores highest enter the language model. It is trained while
    the model stays frozen, with the language-model loss through a differentiable top-k
    (``soft_top_k``: every token goes on, weighted) and a binary cross-entropy that pulls the soft
    weights towards the hard top-k, weighted from 0.1 to 3.0 over the run. ``duet-vlm train --train
    selector`` trains it (``VisionSelector.for_training``) and saves it beside the model
    (``duet_vlm_scorer.safetensors``); ``load_reducer`` attaches it again. Trained at one budget, it
    serves others (the official claim; the demo's evaluation measures it).

    Without a trained scorer the method is defined but untrained: ``scorer`` is then a seeded scorer
    at the official initialisation (near-zero scores, so it keeps nearly arbitrary tokens). Use it to
    test the plumbing, not for accuracy.

    Choices where the official code has none or differs: every family (the official code patches
    Qwen2.5-VL and LLaVA-OneVision-1.5), scoring after the projector as the official Qwen scorer does
    after the merger; the budget is a count per image (official: a ratio, ``budgets``, 0.2 in its
    training scripts); the trainer's regulariser schedule is the 7B script's (0.1 to 3.0), linear
    in the optimizer steps, as the official ``ScheduledWeightTrainer``; a scorer trained here reads
    each token divided by its root mean square (``for_training``: on the demo model, training without
    it lowered retention below the untrained scorer's; with it, training raised it; the choosing page
    has both runs). A loaded scorer keeps the setting it was trained with.

    Args:
        budget: visual tokens per image (per frame count for a video) entering the language model.
        scorer: the trained ``TokenScorer`` (``load_reducer`` passes the saved one), or ``None``.
        seed: the seed of the untrained scorer made when none is given.

    >>> reducer = duet_vlm.load_reducer("runs/selector")     # doctest: +SKIP
    >>> with reducer(model): model.generate(**inputs)        # doctest: +SKIP
    """

    budget: int | None = None
    scorer: TokenScorer | None = field(default=None, compare=False, repr=False)
    seed: int = 0

    runtime_fields: ClassVar[tuple[str, ...]] = ("scorer",)

    def __post_init__(self) -> None:
        super().__post_init__()
        check_budget(self.budget, required=False)
        check_number("seed", self.seed, integer=True)
        if self.scorer is not None and not isinstance(self.scorer, TokenScorer):
            raise ValueError(f"scorer must be a TokenScorer, got {type(self.scorer).__name__}")

    # ----------------------------------------------------------------- the scorer
    def scorer_for(self, width: int) -> TokenScorer:
        """The trained scorer, or a seeded untrained one for tokens ``width`` wide (made once)."""
        if self.scorer is not None:
            if self.scorer.width != width:
                raise ValueError(f"the scorer reads {self.scorer.width}-wide tokens; this model's are {width} wide")
            return self.scorer
        made = self.__dict__.setdefault("_untrained", {})
        if width not in made:
            with torch.random.fork_rng(devices=[]):  # seeded, and the caller's generator left as it was
                torch.manual_seed(self.seed)
                made[width] = TokenScorer(width).eval()
        return made[width]

    def with_budget(self, budget: int) -> "VisionSelector":
        copy = dataclasses.replace(self, budget=budget)
        copy.__dict__["_untrained"] = self.__dict__.setdefault("_untrained", {})  # one untrained scorer
        copy.__dict__["_soft"] = self.__dict__.get("_soft")
        return copy

    @classmethod
    def for_training(cls, budget: int, width: int, seed: int = 0, normalize: bool = True) -> "VisionSelector":
        """A fresh scorer for tokens ``width`` wide, trained at ``budget``: its stage keeps every token,
        each weighted by ``soft_top_k``, and collects the regulariser (``take_penalty``).

        ``normalize`` (this library's choice, not the official recipe's): the scorer reads each token
        divided by its root mean square. The soft top-k is soft only while scores differ by a few
        units, and unnormalised the score grows with the square of the tokens' scale. On the demo
        model the scorer trained without it kept fewer answers than an untrained one (the choosing
        page has both runs)."""
        torch.manual_seed(seed)
        reducer = cls(budget=budget, scorer=TokenScorer(width, normalize=normalize), seed=seed)
        reducer.__dict__["_soft"] = []
        return reducer

    def take_penalty(self) -> torch.Tensor | None:
        """The mean regulariser of the stages run since the last call (training), or ``None``."""
        penalties = self.__dict__.get("_soft")
        if not penalties:
            return None
        total = torch.stack(penalties).mean()
        penalties.clear()
        return total

    def save_objects(self, directory) -> None:
        """Write the scorer beside the model (``SCORER_FILE``)."""
        if self.scorer is None:
            return
        from safetensors.torch import save_file

        state = {name: value.detach().cpu().contiguous() for name, value in self.scorer.state_dict().items()}
        save_file(state, str(Path(directory) / SCORER_FILE), metadata={
            "width": str(self.scorer.width), "hidden": str(self.scorer.hidden), "normalize": str(self.scorer.normalize)})

    @classmethod
    def load_objects(cls, directory) -> dict[str, Any]:
        """The scorer saved beside a model (``save_objects``), as ``from_dict`` takes it."""
        path = Path(directory) / SCORER_FILE
        if not path.is_file():
            return {}
        from safetensors import safe_open
        from safetensors.torch import load_file

        with safe_open(str(path), "pt") as handle:
            meta = handle.metadata()
        scorer = TokenScorer(int(meta["width"]), int(meta["hidden"]), normalize=meta.get("normalize") == "True")
        scorer.load_state_dict(load_file(str(path)))
        return {"scorer": scorer.eval()}

    # ----------------------------------------------------------------- plans
    def vision_stage_for(self, geometry: Geometry, keep: int) -> LearnedSelect:
        per_unit(geometry, keep)
        return LearnedSelect(self.scorer_for)

    def plan(self, geometry: Geometry) -> Plan:
        if self.budget is None:
            raise ValueError("VisionSelector needs a budget")
        keep = per_unit(geometry, self.budget)
        penalties = self.__dict__.get("_soft")
        if penalties is not None:  # training: every token goes on, weighted
            stage = LearnedSelect(self.scorer_for, soft=keep, penalties=penalties)
            return Plan(Schedule(geometry.num_layers, geometry.visual_tokens, geometry.visual_tokens), vision=stage)
        return Plan(Schedule(geometry.num_layers, geometry.visual_tokens, keep * geometry.units),
                    vision=LearnedSelect(self.scorer_for))
