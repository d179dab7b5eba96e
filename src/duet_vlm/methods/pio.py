"""PIO-FVLM / TRIO (arXiv 2602.04657): gradient saliency of a layer-local proxy loss, then NMS.

The official pruning function is an empty stub (baselines.md §3.5), so this is a reconstruction
from the paper's abstract, its architecture figure, a README caption and the PDrop-derived
scaffolding. Every choice the sources leave open is named in ``PIO``'s docstring.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..geometry import Geometry
from ..schedule import Schedule, scaled_boundaries, solve_llm_input
from ..selection import gather_tokens
from .base import LanguageStage, LayerView, Plan, Reducer, check_budget, compose_plan, per_unit
from .registry import register_method
from .duet import CONTEXTUAL_SHARE, DominantContextualMerge, contextual_count

SALIENCIES = ("grad_norm", "grad_x_input")


def saliency_nms(saliency: torch.Tensor, features: torch.Tensor, keep: int, threshold: float) -> torch.Tensor:
    """Saliency-ordered non-maximum suppression in feature space; ``(..., keep)`` ascending indices.

    Repeatedly keeps the most salient token still available and suppresses the available tokens whose
    cosine similarity to it exceeds ``threshold``. If suppression leaves fewer than ``keep`` tokens,
    the most salient suppressed tokens fill the remaining places, so exactly ``keep`` are returned.
    Ties in saliency go to the lower index; ``threshold >= 1`` is plain top-k.

    Args:
        saliency: ``(..., n)`` importance of each token.
        features: ``(..., n, d)`` token features; only their directions matter (cosine similarity).
        keep: tokens to return per row, ``0 <= keep <= n``.
        threshold: cosine similarity above which a token counts as a duplicate of a kept one.

    >>> saliency_nms(torch.tensor([3.0, 2.0, 1.0]), torch.tensor([[1.0, 0.0], [1.0, 0.1], [0.0, 1.0]]), 2, 0.9)
    tensor([0, 2])
    """
    n = saliency.shape[-1]
    if features.shape[:-1] != saliency.shape:
        raise ValueError(f"features {tuple(features.shape)} do not match saliency {tuple(saliency.shape)}")
    if not 0 <= keep <= n:
        raise ValueError(f"cannot keep {keep} of {n} tokens")
    lead = saliency.shape[:-1]
    scores = saliency.detach().float().reshape(-1, n)
    units = F.normalize(features.detach().float().reshape(-1, n, features.shape[-1]), dim=-1)
    # Clamped so that rounding never lifts a token's similarity with itself or a duplicate above 1.
    similarity = (units @ units.transpose(1, 2)).clamp(-1.0, 1.0)
    rows = torch.arange(scores.shape[0], device=scores.device)
    available = torch.ones_like(scores, dtype=torch.bool)
    kept = torch.zeros_like(available)
    for _ in range(keep):
        masked = scores.masked_fill(~available, float("-inf"))
        best = masked.argmax(dim=-1)  # first maximum: ties go to the lower index
        picked = available[rows, best]
        if not picked.any():
            break
        kept[rows[picked], best[picked]] = True
        duplicates = similarity[rows, best] > threshold
        available &= ~(duplicates & picked[:, None])
        available[rows[picked], best[picked]] = False
    # NMS survivors first, then the rest by saliency: a stable sort on saliency, then on the tier.
    by_saliency = scores.argsort(dim=-1, descending=True, stable=True)
    tier = (~kept).gather(1, by_saliency).long()
    order = by_saliency.gather(1, tier.argsort(dim=-1, stable=True))
    return order[:, :keep].sort(dim=-1).values.reshape(*lead, keep)


@dataclass
class SaliencyNMSPrune(LanguageStage):
    """Language stage of PIO: proxy-loss gradient saliency through one block, then ``saliency_nms``.

    At a boundary the next decoder block runs on a detached, grad-requiring copy of its input; the
    model's own head reads the block's output at the last ``prediction_tokens`` prompt tokens, the
    loss is the cross-entropy against its own argmax, and the gradient with respect to the block input
    (never the parameters) scores each visual token.

    >>> stage = SaliencyNMSPrune(saliency="grad_norm", threshold=0.9)
    >>> stage.select(view, keep=32).shape                 # doctest: +SKIP
    torch.Size([1, 1, 32])
    """

    saliency: str = "grad_norm"
    threshold: float = 0.9
    prediction_tokens: int = 2

    def __post_init__(self) -> None:
        if self.saliency not in SALIENCIES:
            raise ValueError(f"saliency must be one of {SALIENCIES}, got {self.saliency!r}")
        if isinstance(self.threshold, bool) or not isinstance(self.threshold, (int, float)):
            raise ValueError(f"threshold must be a number in [-1, 1], got {self.threshold!r}")
        if not -1.0 <= self.threshold <= 1.0:
            raise ValueError(f"threshold must be a cosine similarity in [-1, 1], got {self.threshold}")
        if isinstance(self.prediction_tokens, bool) or not isinstance(self.prediction_tokens, int):
            raise ValueError(f"prediction_tokens must be a positive int, got {self.prediction_tokens!r}")
        if self.prediction_tokens < 1:
            raise ValueError(f"prediction_tokens must be a positive int, got {self.prediction_tokens}")

    def score(self, view: LayerView) -> torch.Tensor:
        if torch.is_inference_mode_enabled():
            raise RuntimeError("PIO needs a backward pass through one block: use torch.no_grad(), not inference_mode()")
        with torch.enable_grad():
            x = view.hidden_states.detach().requires_grad_()
            y = view.run_layer(x)
            # Summed over rows (mean within a row) so that each row's gradient is exactly the one it
            # would get alone: batching must not change a row's selection.
            loss = y.new_zeros((), dtype=torch.float32)
            for b, positions in enumerate(view.text_after_image):
                logits = view.output_head(y[b, positions[-self.prediction_tokens :]]).float()
                loss = loss + F.cross_entropy(logits, logits.argmax(dim=-1))
            try:
                (grad,) = torch.autograd.grad(loss, x)
            except RuntimeError as error:
                if "use_reentrant" not in str(error):
                    raise
                raise RuntimeError(
                    "PIO differentiates one block with torch.autograd.grad, which reentrant checkpointing does not "
                    "support: enable checkpointing with gradient_checkpointing_kwargs={'use_reentrant': False}"
                ) from error
        grad = gather_tokens(grad, view.visual_index).float()
        if self.saliency == "grad_norm":
            return grad.norm(dim=-1)
        inputs = gather_tokens(view.hidden_states.detach(), view.visual_index).float()
        return (grad * inputs).sum(dim=-1).abs()

    def select(self, view: LayerView, keep: int) -> torch.Tensor:
        saliency = self.score(view)
        features = gather_tokens(view.hidden_states.detach(), view.visual_index)
        return saliency_nms(saliency, features, keep, self.threshold)



@register_method("pio")
@dataclass
class PIO(Reducer):
    """PIO-FVLM / TRIO (Ouyang et al., 2026): keep the visual tokens the model's own prediction needs.

    At a boundary inside the LLM (default: after half the layers, the README's ``--layer_list [16]``)
    each visual token is scored by the gradient of a layer-local proxy loss, and the kept set is
    chosen by saliency-ordered NMS in feature space, so near-duplicate tokens do not crowd out the
    budget. Optionally a vision-side pre-filter first shrinks the LLM input (the README's "w/ VE" mode).

    Reconstruction choices (the official core is an empty stub):

    - Proxy loss: the next block (autograd on, on a detached copy of its input) feeds the model's own
      final norm + LM head at the last ``prediction_tokens=2`` prompt tokens of each row (our reading
      of the figure's "case bound" and "prediction" tokens: the last two tokens before generation;
      in training, the last two instruction tokens). Pseudo-label = argmax of that prediction; loss =
      mean cross-entropy per row, summed over rows. ``torch.autograd.grad`` differentiates only the
      block input, so parameter ``.grad`` is never touched (also in training).
    - Saliency: ``"grad_norm"`` (default) = L2 norm of a visual token's gradient (the "magnitude" the
      paper names); ``"grad_x_input"`` = ``|<gradient, hidden state>|``, the first-order loss change
      when the token is zeroed.
    - NMS (``saliency_nms``): cosine similarity of the L2-normalised boundary hidden states (plain
      cosine; the paper's "norm" could also be the next block's RMSNorm, whose learned gain would
      reweight dimensions). ``threshold=0.9`` (unpublished; about 26 degrees) suppresses only near
      duplicates, so NMS removes redundancy without overriding saliency; baselines.md recommends
      sweeping it. When suppression leaves fewer than K candidates, the most salient suppressed tokens
      fill up, so exactly K tokens per image are always kept.
    - Positions: ``"contiguous"`` (renumbered after the drop, as in the PDrop-derived LLaVA code).

    Budget (average visual tokens per decoder layer per image):

    - ``vision=True`` (default, "w/ VE"): a pre-filter brings the LLM input to N, the boundary keeps
      ``round(N * ratio)`` (default ratio 1/3, the README's 96 -> 32 at 64); N is solved for the
      budget: 192 -> 288/96, 128 -> 192/64, 64 -> 96/32 on LLaVA-1.5 (at most 576/192, average 384:
      higher budgets need ``vision=False`` or larger ``ratios``). The pre-filter is the project's
      ``DominantContextualMerge`` with VisionZip's rule (CLS-attention dominant tokens plus
      ``contextual`` merged tokens, all residual tokens merged; ``contextual=0`` = plain CLS-attention
      top-k). The official pre-filter is a VScan-style scan (half local window top-k by CLS
      attention at CLIP layer 5, half global top-k at layer -2, every other token averaged into its
      most similar kept one), which needs an early vision layer the runtime does not expose.
    - ``vision=False`` ("w/o VE"): 576 tokens enter the LLM and the boundary keep is solved; a budget
      below the pre-boundary share (288 with one boundary at 16 of 32) is unreachable: ValueError.

    Args:
        budget: average visual tokens per decoder layer per image.
        vision: use the vision-side pre-filter ("w/ VE").
        layers: boundaries as counts of layers completed (default: half the depth, 16 of 32).
        ratios: kept fraction of the LLM-input count after each boundary (default ``(1/3)**(s+1)``).
            In ``vision=False`` mode only their proportions matter (the first keep is solved).
        llm_input: explicit LLM-input count (``vision=True`` only); overrides the solver.
        keep: explicit kept counts after each boundary; override ``ratios`` (and the solver in
            ``vision=False`` mode; with ``vision=True`` the LLM input is then solved).
        contextual: merged tokens of the pre-filter (default VisionZip's share, 10 of every 64).
        saliency, threshold, prediction_tokens: see ``SaliencyNMSPrune``.
        positions: ``"contiguous"`` (reference) or ``"original"``;
            ``None`` (default): contiguous on 1-D RoPE models, original under M-RoPE (Qwen-VL),
            where renumbering is refused.

    >>> reducer = PIO(budget=64)                                  # 96 tokens, 32 after layer 16
    >>> with reducer(model): model.generate(**inputs)             # doctest: +SKIP
    >>> reducer.stats.tokens_per_layer                            # doctest: +SKIP
    """

    budget: int | None = None
    vision: bool = True
    layers: tuple[int, ...] | None = None
    ratios: tuple[float, ...] | None = None
    llm_input: int | None = None
    keep: tuple[int, ...] | None = None
    contextual: int | None = None
    saliency: str = "grad_norm"
    threshold: float = 0.9
    prediction_tokens: int = 2

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.vision, bool):
            raise ValueError(f"vision must be True or False, got {self.vision!r}")
        if isinstance(self.keep, int):
            self.keep = (self.keep,)
        if self.layers is not None:
            self.layers = _int_tuple("layers", self.layers, minimum=1)
            if list(self.layers) != sorted(set(self.layers)):
                raise ValueError(f"layers must be strictly increasing, got {self.layers}")
        if self.keep is not None:
            self.keep = _int_tuple("keep", self.keep, minimum=0)
        if self.ratios is not None:
            self.ratios = tuple(self.ratios)
            if any(isinstance(r, bool) or not isinstance(r, (int, float)) or not 0 < r <= 1 for r in self.ratios):
                raise ValueError(f"ratios must lie in (0, 1], got {self.ratios}")
        for name in ("llm_input", "contextual"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
                raise ValueError(f"{name} must be a non-negative int, got {value!r}")
        if self.llm_input is not None and not self.vision:
            raise ValueError("llm_input needs the vision-side pre-filter (vision=True); without it 576 tokens enter")
        shape = self.keep if self.keep is not None else self.ratios
        if self.layers is not None and shape is not None and len(shape) != len(self.layers):
            raise ValueError(f"{len(self.layers)} boundary layers but {len(shape)} keep counts/ratios")
        if self.layers is None and shape is not None and len(shape) != 1:
            raise ValueError("give layers with more than one keep count or ratio (the default is one boundary)")
        check_budget(self.budget, required=not self._explicit)
        self.language_stage()  # validate the stage options now rather than at attach time

    @property
    def _explicit(self) -> bool:
        """Whether the schedule is fixed without a budget."""
        return self.llm_input is not None if self.vision else self.keep is not None

    def _layers(self, geometry: Geometry) -> tuple[int, ...]:
        layers = self.layers if self.layers is not None else scaled_boundaries(geometry.num_layers, (0.5,))
        if layers and layers[-1] >= geometry.num_layers:
            raise ValueError(f"boundary layers must lie inside (0, {geometry.num_layers}), got {layers}")
        return layers

    def _ratios(self, layers: tuple[int, ...]) -> tuple[float, ...]:
        return self.ratios if self.ratios is not None else tuple((1 / 3) ** (s + 1) for s in range(len(layers)))

    def schedule_for(self, geometry: Geometry, llm_input: int) -> Schedule:
        layers = self._layers(geometry)
        if self.keep is not None:
            # Never more than enter, so the solver may probe small inputs; plan() rejects a clamped result.
            keeps = tuple(min(k, llm_input) for k in self.keep)
        else:
            keeps = tuple(round(llm_input * r) for r in self._ratios(layers))
        return Schedule(geometry.num_layers, geometry.visual_tokens, llm_input, tuple(zip(layers, keeps)))

    def language_stage(self) -> SaliencyNMSPrune:
        return SaliencyNMSPrune(self.saliency, self.threshold, self.prediction_tokens)

    def vision_stage_for(self, geometry: Geometry, keep: int) -> DominantContextualMerge:
        keep = per_unit(geometry, keep)
        contextual = contextual_count(keep, None, self.contextual, round(keep * CONTEXTUAL_SHARE))
        return DominantContextualMerge(contextual=contextual, cluster_width=None)

    def plan(self, geometry: Geometry) -> Plan:
        if self.vision:
            if self.llm_input is not None:
                if self.llm_input > geometry.visual_tokens:
                    raise ValueError(f"llm_input={self.llm_input} exceeds the {geometry.visual_tokens} visual tokens")
                schedule = self.schedule_for(geometry, self.llm_input)
                language = self.language_stage() if schedule.boundaries else None
                plan = Plan(schedule, self.vision_stage_for(geometry, self.llm_input), language)
            else:
                maximum = self.schedule_for(geometry, geometry.visual_tokens).average
                if self.budget > maximum + 1:
                    raise ValueError(
                        f"PIO with the vision pre-filter averages at most {maximum:g} visual tokens per layer with "
                        f"this schedule (budget {self.budget}); use vision=False or larger ratios"
                    )
                plan = compose_plan(self, self, self.budget, geometry)
        else:
            schedule = self._solve_llm_only(geometry)
            plan = Plan(schedule, None, self.language_stage() if schedule.boundaries else None)
        kept = tuple(k for _, k in plan.schedule.boundaries)
        if self.keep is not None and kept != self.keep:
            raise ValueError(f"keep={self.keep} exceeds the {plan.schedule.llm_input} tokens entering the LLM")
        return plan

    def _solve_llm_only(self, geometry: Geometry) -> Schedule:
        visual, layers = geometry.visual_tokens, self._layers(geometry)
        if self.keep is not None:
            return self.schedule_for(geometry, visual)
        if not layers:
            raise ValueError("vision=False with no boundary layers reduces nothing; give a budget >= the token count")
        ratios = self._ratios(layers)

        def build(first: int) -> Schedule:
            keeps = tuple(min(visual, round(first * r / ratios[0])) for r in ratios)
            return Schedule(geometry.num_layers, visual, visual, tuple(zip(layers, keeps)))

        minimum = build(0).average
        if self.budget < minimum - 1:
            raise ValueError(
                f"PIO without the vision pre-filter (vision=False) cannot average fewer than {minimum:g} visual "
                f"tokens per layer with boundaries {layers} on {geometry.num_layers} layers (budget {self.budget}); "
                "use vision=True or earlier layers"
            )
        return solve_llm_input(self.budget, build)


def _int_tuple(name: str, values, minimum: int) -> tuple[int, ...]:
    values = tuple(values)
    if any(isinstance(v, bool) or not isinstance(v, int) or v < minimum for v in values):
        raise ValueError(f"{name} must be ints >= {minimum}, got {values}")
    return values
