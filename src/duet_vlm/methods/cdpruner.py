"""CDPruner (Zhang et al., NeurIPS 2025): "Beyond Attention or Similarity: Maximizing Conditional
Diversity for Token Pruning in MLLMs" (arXiv 2506.10967), after the official code
(``Theia-4869/CDPruner`` ``9541616``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from ..geometry import Geometry
from ..options import check_number
from ..plan import Plan, VisionReduction, VisionStage, VisionView
from ..schedule import Schedule
from ..selection import gather_tokens
from .base import Reducer, check_budget, per_unit
from .registry import register_method

#: The official min-max normalisation's offset: ``(r - min + 1e-6) / (max - min)``.
RELEVANCE_OFFSET = 1e-6
#: A unit's kernel is exhausted when its best remaining marginal gain falls to this fraction of its
#: largest diagonal entry (the chosen tokens then span every candidate to within 1%).
EXHAUSTED = 1e-4


def instruction_relevance(visual: torch.Tensor, text: list[torch.Tensor] | None, negate: bool = False) -> torch.Tensor:
    """``(I, n)`` relevance of each unit's ``n`` visual tokens to its instruction, in ``(0, 1]``.

    The official rule on other embeddings: the cosine similarity of every visual token to every
    text embedding, averaged over the text (``negate``: its negative, as the official CLIP path
    takes it), then min-max normalised per unit with the official offset,
    ``(r - min + 1e-6) / (max - min)``. A unit without text, or whose scores are all equal, gets 1
    everywhere (the kernel is then the plain similarity: pure diversity).

    Args:
        visual: ``(I, n, D)`` visual tokens, in the text's space.
        text: per unit, ``(m, D)`` text embeddings (``None``: no text for any unit).
        negate: take the negative mean (the official code's sign for CLIP's towers).

    >>> instruction_relevance(torch.tensor([[[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]]), [torch.tensor([[2.0, 0.0]])])
    tensor([[1.0000e+00, 1.0000e-06, 7.0711e-01]])
    """
    units, n = visual.shape[:2]
    if text is not None and len(text) != units:
        raise ValueError(f"{len(text)} text entries for {units} units")
    dtype = torch.promote_types(visual.dtype, torch.float32)
    direction = F.normalize(visual.detach().to(dtype), dim=-1)
    relevance = torch.ones(units, n, dtype=dtype, device=visual.device)
    for unit in range(units):
        if text is None or text[unit].shape[0] == 0:
            continue
        words = F.normalize(text[unit].detach().to(device=visual.device, dtype=dtype), dim=-1)
        score = (direction[unit] @ words.T).mean(dim=-1)
        score = -score if negate else score
        low, high = score.min(), score.max()
        if high > low:
            relevance[unit] = (score - low + RELEVANCE_OFFSET) / (high - low)
    return relevance


def conditional_kernel(features: torch.Tensor, relevance: torch.Tensor, theta: float | None = None) -> torch.Tensor:
    """``(..., n, n)`` the conditional DPP kernel ``diag(q) S diag(q)`` of ``(..., n, D)`` tokens.

    ``S`` is the tokens' cosine similarity; ``q`` is ``relevance`` itself (the official code as
    shipped), or ``exp(alpha * relevance)`` with ``alpha = theta / (2 (1 - theta))`` when ``theta``
    is given (Chen et al. 2018's relevance-diversity trade-off, commented out in the official code
    with ``theta = 0.5``). Computed in float32 at least.

    >>> conditional_kernel(torch.tensor([[1.0, 0.0], [1.0, 1.0]]), torch.tensor([1.0, 0.5]))
    tensor([[1.0000, 0.3536],
            [0.3536, 0.2500]])
    """
    dtype = torch.promote_types(features.dtype, torch.float32)
    unit = F.normalize(features.detach().to(dtype), dim=-1)
    similarity = unit @ unit.transpose(-1, -2)
    quality = relevance.detach().to(device=features.device, dtype=dtype)
    if theta is not None:
        quality = torch.exp(theta / (2 * (1 - theta)) * quality)
    return quality.unsqueeze(-1) * similarity * quality.unsqueeze(-2)


def greedy_dpp_map(kernel: torch.Tensor, keep: int) -> torch.Tensor:
    """Greedy MAP inference of a DPP: ``(..., keep)`` indices of ``(..., n, n)`` kernels, in the order
    chosen (Chen, Zhang, Zhou, NeurIPS 2018, Algorithm 1; the official ``encode_images`` loop).

    Each step adds the token that most increases ``log det`` of the chosen set's kernel: the largest
    marginal gain ``d_j`` (the squared residual of token ``j`` against the span of the chosen ones),
    kept up to date by incremental Cholesky rows instead of determinants. Ties go to the lower index.
    When a row's best gain is at most ``EXHAUSTED`` times its largest diagonal entry (the kernel's
    rank is used up: a model narrower than the token count, or near duplicates), its remaining
    places go to the largest diagonal entries (the most relevant tokens), ties to the lower index;
    the official code would divide by the square root of a vanishing (or negative) gain there.

    Cost per row of ``n`` tokens: ``keep`` sequential steps, each one tensor op of ``O(n * step)``
    for all rows at once: ``O(n keep^2)`` time, ``O(n keep)`` memory besides the kernel.

    >>> kernel = torch.tensor([[1.0, 0.9, 0.0], [0.9, 1.0, 0.0], [0.0, 0.0, 0.5]])
    >>> greedy_dpp_map(kernel, 2).tolist()
    [0, 2]
    """
    n = kernel.shape[-1]
    if isinstance(keep, bool) or not isinstance(keep, int) or not 0 <= keep <= n:
        raise ValueError(f"cannot keep {keep!r} of {n} tokens")
    lead = kernel.shape[:-2]
    kernel = kernel.reshape(lead.numel(), n, n)
    rows = torch.arange(kernel.shape[0], device=kernel.device)
    diagonal = kernel.diagonal(dim1=-2, dim2=-1).clone()
    gains = diagonal.clone()
    floor = EXHAUSTED * diagonal.amax(dim=-1) if n else diagonal.new_zeros(len(rows))
    factors = kernel.new_zeros(kernel.shape[0], keep, n)  # the incremental Cholesky rows c_1..c_keep
    chosen = torch.empty(kernel.shape[0], keep, dtype=torch.long, device=kernel.device)
    taken = torch.zeros(kernel.shape[0], n, dtype=torch.bool, device=kernel.device)
    for step in range(keep):
        best, pick = gains.masked_fill(taken, float("-inf")).max(dim=-1)
        exhausted = best <= floor
        if exhausted.any():
            pick = torch.where(exhausted, diagonal.masked_fill(taken, float("-inf")).argmax(dim=-1), pick)
        chosen[:, step] = pick
        taken[rows, pick] = True
        previous = factors[:, :step]  # (rows, step, n)
        residual = kernel[rows, pick] - torch.einsum("bt,btn->bn", previous[rows, :, pick], previous)
        row = residual / best.clamp_min(torch.finfo(kernel.dtype).tiny).sqrt().unsqueeze(-1)
        row = row.masked_fill(exhausted.unsqueeze(-1), 0.0)  # an exhausted kernel stays as it is
        factors[:, step] = row
        gains = gains - row.square()
    return chosen.reshape(*lead, keep)


def cdpruner_select(
    features: torch.Tensor, relevance: torch.Tensor, keep: int, theta: float | None = None
) -> torch.Tensor:
    """``(..., keep)`` ascending indices of the tokens CDPruner keeps: greedy MAP of the conditional DPP
    whose kernel is ``conditional_kernel(features, relevance, theta)``.

    >>> cdpruner_select(torch.tensor([[1.0, 0.0], [1.0, 0.1], [0.0, 1.0]]), torch.tensor([0.9, 1.0, 0.5]), 2).tolist()
    [1, 2]
    """
    return greedy_dpp_map(conditional_kernel(features, relevance, theta), keep).sort(dim=-1).values


@dataclass
class ConditionalDPPSelect(VisionStage):
    """CDPruner's stage: per unit, the ``keep`` patches the conditional DPP chooses, in their original
    order; the rest are dropped (nothing is merged).

    Similarity and relevance are both read in the language model's input space: the projector's
    output of the unit's patches (``VisionView.project``) against the prompt's text embeddings
    (``VisionView.text``). The CLS token is never a candidate; the kept tokens' projected features
    are passed on as they are.

    >>> ConditionalDPPSelect().reduce(view, keep=64).kept.shape      # doctest: +SKIP
    torch.Size([1, 64])
    """

    theta: float | None = None
    negate_relevance: bool = False

    needs_text: ClassVar[bool] = True

    def __post_init__(self) -> None:
        check_number("theta", self.theta, low=0, high=1, high_open=True, optional=True, kind="None or a number",
                     note="the relevance weight")
        if not isinstance(self.negate_relevance, bool):
            raise ValueError(f"negate_relevance must be a bool, got {self.negate_relevance!r}")

    def reduce(self, view: VisionView, keep: int) -> VisionReduction:
        start = int(view.has_cls)
        patches = view.features[:, start:]
        space = view.project(patches) if view.project is not None else patches
        with torch.no_grad():
            relevance = instruction_relevance(space, view.text, self.negate_relevance)
            kept = cdpruner_select(space, relevance, keep, self.theta)
        reduction = VisionReduction(gather_tokens(patches, kept), kept + start)
        if view.project is not None:
            reduction.projected = gather_tokens(space, kept)
        return reduction


@register_method("cdpruner")
@dataclass
class CDPruner(Reducer):
    """CDPruner (Zhang, Liu, Li, Lu, Zhang, Pan, She, Zhang; NeurIPS 2025): the visual tokens whose set
    is most diverse *conditioned on the instruction*, chosen before the language model.

    The kept set maximises ``det`` of a conditional DPP kernel ``L = diag(q) S diag(q)``: ``S`` the
    tokens' pairwise cosine similarity, ``q`` each token's relevance to the instruction, so a set
    scores high when its tokens are both relevant and unlike one another. The MAP is found greedily
    (fast greedy DPP, Chen et al. 2018: ``greedy_dpp_map``). Nothing is merged.

    As the official code runs it (``Theia-4869/CDPruner`` ``9541616``, ``llava/model/llava_arch.py``
    ``encode_images`` and ``llava/model/multimodal_encoder/clip_encoder.py``):

    - Similarity: cosine of the projector's outputs (the tokens as they enter the language model),
      CLS excluded (LLaVA's ``select_feature="patch"``), in float32.
    - Relevance: cosine of each patch to the instruction, averaged over the text, min-max normalised
      as ``(r - min + 1e-6) / (max - min)`` (``instruction_relevance``); kernel
      ``q_i S_ij q_j`` with ``q = r`` (``theta=None``, the code as shipped).
    - Greedy MAP with exactly ``budget`` steps (no early stop), the kept tokens in their original
      order (the official code sorts them), renumbered contiguously.

    The substitute for CLIP's text encoder (HF checkpoints ship no CLIP text tower, and Qwen-VL and
    SigLIP towers have none to pair with): relevance is the cosine between each projected patch and
    the language model's **input embeddings of the prompt's text tokens** (``VisionView.text``),
    averaged over those tokens, per row: each row is conditioned on its own instruction, where the
    official code encodes one ``texts`` string for the whole batch. The official code takes the
    *negative* CLIP similarity (an effect its authors observed only with CLIP, issues #9 and #14);
    in the language model's space the natural sign is used (``negate_relevance=False``; OpenVINO
    GenAI's port of CDPruner, which also reads the language model's text embeddings for Qwen-VL,
    negates only for CLIP). The text is every prompt token that is neither visual nor padding (in
    training, those not labelled), so the chat template's tokens are averaged in with the question;
    the official code passes the question alone, with LLaVA's "Answer the question using a single
    word or phrase." removed.

    Budget: every decoder layer sees the ``budget`` kept tokens, so the layer average is the budget
    exactly (192, 128, 64 on LLaVA-1.5: 192, 128, 64 of 576 tokens in all 32 layers, as the
    official ``--visual_token_num``). A video keeps ``budget // frames`` per frame.

    Choices where the paper and code are silent or differ:

    - ``theta``: ``None`` (default) is the shipped kernel; a value in ``[0, 1)`` applies
      ``q = exp(alpha r)``, ``alpha = theta / (2 (1 - theta))`` (the commented-out official lines,
      ``theta = 0.5`` there; ``theta = 0`` is relevance-blind diversity).
    - Exhaustion: where the kernel's rank runs out before ``budget`` tokens (a language model
      narrower than the token count, near-duplicate tokens), the greedy fills the remaining places
      with the most relevant tokens (``greedy_dpp_map``, ``EXHAUSTED``), where the official code
      takes square roots of vanishing or negative gains: recorded on the tiny LLaVA's 64-wide
      projector, its gains turn NaN after 64 steps and it returns 73 distinct tokens for 192.
    - Degenerate relevance (no text tokens, or all scores equal): ``q = 1``, pure diversity (the
      official normalisation divides by zero).
    - Batches: each unit independently (relevance normalised per unit; the official code normalises
      over its whole batch, of one image in its evaluation), so padded batches equal their rows.
    - Families: candidates are each unit's patch tokens in the language model's space (LLaVA-1.5,
      LLaVA-NeXT and Video-LLaVA project the encoder's patches; Qwen-VL's merged tokens and
      LLaVA-OneVision's pooled video tokens already are that space); relevance reads no attention,
      so towers without CLS (SigLIP) lose nothing. An anyres image (LLaVA-NeXT, OneVision) is one
      unit of all its tiles' patch slots, one DPP over them all (the official LLaVA-1.6 path runs
      one DPP per tile with ``budget`` tokens each, relevance normalised over the image's tiles);
      its newline slots are not candidates and are dropped (the official path keeps them all).
    - Videos: vision stages run per frame, so each frame keeps ``budget // frames`` by its own DPP
      and its own normalisation.

    Across CPUs the choice is not always the same, and no tie rule makes it so: the greedy's late
    steps compare gains a thousand times smaller than its first, left after cancellation, so the
    last-bit differences another CPU's kernels leave in the projected features can reorder them
    (and where the kernel's rank runs out, the step that turns to relevance is a threshold on such
    a gain). The evaluation's rows at 192 and 128, where the demo model's 96-wide kernel runs out,
    move by a question or two between machines; at 64 they agree (docs/choosing.md, "Five rows
    also depend on the CPU").

    Complexity per unit of ``n`` candidates, ``m`` text tokens, width ``D``, keeping ``k``:
    relevance ``O(n m D)``; kernel ``O(n^2 D)`` time and ``O(n^2)`` memory (one batched matmul);
    greedy MAP ``O(n k^2)`` time and ``O(n k)`` memory in ``k`` sequential tensor steps, all units at
    once. LLaVA-1.5 at 576 tokens: a 576x576 kernel and at most 576 steps.

    Args:
        budget: visual tokens per image entering the language model (= the layer average).
        theta: relevance weight in ``[0, 1)``; ``None``: the kernel as the official code ships it.
        negate_relevance: take the negative similarity to the text, as the official code does with
            CLIP's text tower.

    >>> reducer = duet_vlm.make("cdpruner", budget=64)                      # doctest: +SKIP
    >>> with reducer(model): model.generate(**inputs)                        # doctest: +SKIP
    >>> duet_vlm.Compose(duet_vlm.make("cdpruner"), duet_vlm.make("fastv"), budget=64)   # doctest: +SKIP
    """

    budget: int | None = None
    theta: float | None = None
    negate_relevance: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        check_budget(self.budget, required=False)
        ConditionalDPPSelect(self.theta, self.negate_relevance)  # validate the options now

    def vision_stage_for(self, geometry: Geometry, keep: int) -> ConditionalDPPSelect:
        keep = per_unit(geometry, keep)
        if not 1 <= keep <= geometry.patches:
            raise ValueError(
                f"CDPruner keeps between 1 and the {geometry.patches} patch tokens per unit, got {keep}"
                + (f" ({geometry.units} frames)" if geometry.units > 1 else "")
            )
        return ConditionalDPPSelect(self.theta, self.negate_relevance)

    def plan(self, geometry: Geometry) -> Plan:
        if self.budget is None:
            raise ValueError("CDPruner needs a budget (visual tokens per image entering the language model)")
        keep = self.budget // geometry.units * geometry.units  # the same count in every frame
        stage = self.vision_stage_for(geometry, keep)
        return Plan(Schedule(geometry.num_layers, geometry.visual_tokens, keep), vision=stage)
