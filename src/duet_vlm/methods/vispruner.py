"""VisPruner (Zhang et al., ICCV 2025): "Beyond Text-Visual Attention: Exploiting Visual Cues for
Effective Token Pruning in VLMs" (arXiv 2412.01818), as the official code runs it
(``Theia-4869/VisPruner`` ``aefa01a``)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..geometry import Geometry
from ..options import check_number
from ..schedule import Schedule
from ..selection import gather_tokens
from .base import Plan, Reducer, VisionReduction, VisionStage, VisionView, check_budget, per_unit
from .registry import register_method

STEP = 8  # the official ``r = min(8, R - T_div)``: duplicates removed per round at most


@dataclass
class VisPrunerChoice:
    """What ``vispruner_select`` chose, as indices into the scored tokens.

    Attributes:
        important: ``(I, n_imp)`` the highest-scoring tokens, best first.
        diverse: ``(I, n_div)`` the survivors of duplicate removal, in the official order (the kept
            half of the last round, by decreasing similarity, then the other half).
    """

    important: torch.Tensor
    diverse: torch.Tensor

    @property
    def kept(self) -> torch.Tensor:
        """``(I, n_imp + n_div)`` every chosen token, ascending (the official index mask's order)."""
        return torch.cat([self.important, self.diverse], dim=1).sort(dim=1).values


def important_count(keep: int, important_ratio: float) -> int:
    """Important tokens of ``keep``: the official ``int(visual_token_num * important_ratio)``.

    >>> [important_count(k, 0.5) for k in (192, 128, 64)], important_count(64, 0.75)
    ([96, 64, 32], 48)
    """
    return int(keep * important_ratio)


def cosine_similarity_matrix(features: torch.Tensor) -> torch.Tensor:
    """``(I, P, P)`` cosine similarity of every pair of ``(I, P, C)`` tokens (float32), with the
    official normalisation ``x / ||x||`` (a zero vector counts as similar to nothing)."""
    x = features.detach().float()
    unit = x / x.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
    return unit @ unit.transpose(1, 2)


def remove_duplicates(similarity: torch.Tensor, residual: torch.Tensor, keep: int, step: int = STEP) -> torch.Tensor:
    """VisPruner's iterative duplicate removal: ``(I, keep)`` survivors of ``residual``.

    Each round splits the current sequence ``residual`` (``(I, R)`` token indices) by position into
    ``A`` (even positions) and ``B`` (odd positions), scores each ``A`` token by its highest cosine
    similarity to any ``B`` token, removes the ``r = min(step, R - keep)`` highest-scoring ``A``
    tokens and continues with the rest of ``A`` in decreasing score order followed by ``B``, until
    ``keep`` remain.

    Exact ties in score are common (hundreds of similarities in a narrow range: float32 collides by
    chance, float16 often) and decide the next round's halves, so they are broken as the official
    code breaks them: with torch's default, unstable ``argsort(descending=True)`` on float32 values
    formed the same way (a matrix product of the normalised features), which on the same device
    reproduces the official choices (tests/data/vectors/vispruner-official-*). That sort's kernel,
    and so its order of ties, can differ between CPUs: ties follow torch's default sort where this
    runs, not fixed indices.

    Args:
        similarity: ``(I, P, P)`` pairwise similarity of the tokens ``residual`` indexes.
        residual: ``(I, R)`` token indices; the official code passes them in decreasing importance.
        keep: survivors per row, ``0 <= keep <= R``.
        step: most tokens removed per round (official 8).

    Where the official code cannot run, the rule is carried on as written: an odd ``R`` gives ``A``
    one token more than ``B`` (the official indexing raises then), and a round never removes more
    than ``A`` holds (``r`` is capped at ``ceil(R / 2)``; the official code fails there too).

    Cost: one round is a gather of ``|A| x |B|`` similarities and a sort, ``O(R^2)``, and there are
    about ``(R - keep) / step`` rounds, batched over the rows; the similarity matrix is formed once.

    >>> sim = torch.tensor([[[1.0, 0.9, 0.0, 0.1], [0.9, 1.0, 0.0, 0.2], [0.0, 0.0, 1.0, 0.3], [0.1, 0.2, 0.3, 1.0]]])
    >>> remove_duplicates(sim, torch.tensor([[0, 1, 2, 3]]), 3).tolist()   # 0 duplicates 1 (0.9)
    [[2, 1, 3]]
    """
    rows, length = residual.shape
    if not 0 <= keep <= length:
        raise ValueError(f"cannot keep {keep} of {length} tokens")
    check_number("step", step, integer=True, low=0, low_open=True)
    if keep == 0:  # the official loop runs only while diverse tokens are wanted
        return residual[:, :0]
    tokens = similarity.shape[-1]
    flat = similarity.reshape(rows * tokens, tokens)
    offsets = torch.arange(rows, device=residual.device)[:, None] * tokens
    while True:
        length = residual.shape[1]
        r = min(step, length - keep, (length + 1) // 2)
        if r <= 0:
            return residual
        a, b = residual[:, ::2], residual[:, 1::2]
        to_a = flat.index_select(0, (a + offsets).view(-1)).view(rows, a.shape[1], -1)  # (I, |A|, P) whole rows
        best = to_a.gather(2, b[:, None, :].expand(-1, a.shape[1], -1)).amax(dim=-1)  # (I, |A|)
        order = best.argsort(dim=-1, descending=True)[:, r:]  # the official sort (see the docstring)
        residual = torch.cat([a.gather(1, order), b], dim=1)


def vispruner_select(
    scores: torch.Tensor, features: torch.Tensor, important: int, diverse: int, step: int = STEP
) -> VisPrunerChoice:
    """VisPruner's choice among ``P`` tokens: ``important`` by score, then ``diverse`` of the rest.

    The official ``encode_images``: order the tokens by decreasing ``scores`` (torch's default
    ``argsort``, as there); the first ``important`` are kept; the rest, in that order, go through
    ``remove_duplicates`` (cosine similarity of ``features``) until ``diverse`` remain. Tied scores
    are ordered as torch's default sort orders them on the machine this runs on (its kernel can
    differ between CPUs), so tie order is that call's, not fixed indices.

    Args:
        scores: ``(I, P)`` importance (the vision encoder's CLS attention).
        features: ``(I, P, C)`` the same tokens' features (the similarity space).
        important, diverse: counts, ``important + diverse <= P``.
        step: most duplicates removed per round (official 8).

    Cost: a sort of ``P`` scores, the ``P x P`` similarity matrix (``O(P^2 C)``, formed only when
    duplicates must go) and ``remove_duplicates``: ``O(P^2 C + (P - important - diverse) / step * P^2)``
    per unit, all units at once.

    >>> features = torch.tensor([[[1.0, 0, 0], [0, 1, 0], [0, 1, 0.1], [0, 0, 1]]])  # 1 and 2 alike
    >>> choice = vispruner_select(torch.tensor([[0.5, 0.1, 0.2, 0.3]]), features, 1, 2)
    >>> choice.important.tolist(), choice.diverse.tolist(), choice.kept.tolist()
    ([[0]], [[3, 2]], [[0, 2, 3]])
    """
    units, patches = scores.shape
    if features.shape[:2] != (units, patches):
        raise ValueError(f"features {tuple(features.shape)} do not match scores {tuple(scores.shape)}")
    if important < 0 or diverse < 0 or important + diverse > patches:
        raise ValueError(f"cannot keep {important} important + {diverse} diverse of {patches} tokens")
    order = scores.detach().float().argsort(dim=-1, descending=True)
    residual = order[:, important:]
    if diverse == 0:
        residual = residual[:, :0]
    elif residual.shape[1] > diverse:
        residual = remove_duplicates(cosine_similarity_matrix(features), residual, diverse, step)
    return VisPrunerChoice(order[:, :important], residual)


@dataclass
class ImportantDiverse(VisionStage):
    """VisPruner's stage: of ``keep`` tokens per unit, ``int(keep * important_ratio)`` important
    ones by the encoder's score (``VisionView.cls_attention``), the rest diverse ones left by
    iterative duplicate removal (cosine similarity of the pre-projector features) among the others.
    The CLS token is never kept; the kept patches go to the projector in raster order, unchanged.

    >>> ImportantDiverse(important_ratio=0.5).reduce(view, keep=64).features.shape   # doctest: +SKIP
    torch.Size([1, 64, 1024])
    """

    important_ratio: float = 0.5
    step: int = STEP

    def __post_init__(self) -> None:
        check_options(self.important_ratio, self.step)

    def reduce(self, view: VisionView, keep: int) -> VisionReduction:
        offset = int(view.has_cls)
        patches = view.features[:, offset:]
        important = important_count(keep, self.important_ratio)
        choice = vispruner_select(view.cls_attention, patches, important, keep - important, self.step)
        kept = choice.kept
        roles = {
            "important": choice.important.sort(dim=1).values + offset,
            "diverse": choice.diverse.sort(dim=1).values + offset,
        }
        return VisionReduction(gather_tokens(patches, kept), kept + offset, roles)


def check_options(important_ratio: float, step: int) -> None:
    """Refuse options the official code has no meaning for, with the reason."""
    check_number("important_ratio", important_ratio, low=0, high=1, kind="a number",
                 note="the share of important tokens")
    check_number("step", step, integer=True, low=0, low_open=True, note="duplicates removed per round, official 8")


@register_method("vispruner")
@dataclass
class VisPruner(Reducer):
    """VisPruner (Zhang et al., ICCV 2025, arXiv 2412.01818): important plus diverse tokens, chosen
    from visual cues alone before the language model.

    Sources: the official code, GitHub ``Theia-4869/VisPruner`` at ``aefa01a``
    (``llava/model/llava_arch.py`` ``encode_images``, ``llava/model/multimodal_encoder/clip_encoder.py``
    and ``siglip_encoder.py``, ``llava/eval/model_vqa*.py`` defaults, ``scripts/v1_5``, ``scripts/v1_6``
    and the README), which decides every detail below; the paper's abstract and the README's summary
    of the method (its full text could not be read here). Per unit (an image, or a frame), of
    ``keep`` tokens:

    - **important**: ``int(keep * important_ratio)`` patches with the highest CLS attention of the
      vision feature layer (the official ``attentions[select_layer][:, :, 0, 1:]``, averaged over
      heads; the runtime sums them, the same order);
    - **diverse**: the rest of the budget, taken from the other patches in decreasing attention
      order by iterative duplicate removal (``remove_duplicates``): split by position into two
      halves, drop the ``min(8, R - n_div)`` tokens of the first half most cosine-similar to the
      second (similarity of the pre-projector features), reorder, repeat until ``n_div`` remain.

    The CLS token is not kept (the official ``mm_vision_select_feature="patch"``); the kept patches
    enter the projector unchanged, in raster order. The language model sees ``keep`` visual tokens
    in every layer; text-agnostic.

    Args:
        budget: visual tokens per image entering the language model (= the layer average); for a
            video, per video: ``budget // frames`` per frame, so the average lands within a frame
            count of the budget. 192 -> 96 + 96, 128 -> 64 + 64, 64 -> 32 + 32 on LLaVA-1.5.
        important_ratio: share of important tokens (official default 0.5, the ``--important_ratio``
            default and the README's 128-token example; the README's 64-token MME example uses 0.75:
            48 + 16).
        step: most duplicates removed per round (official 8, fixed in the code).

    Choices where the paper and the official code are silent or cannot run:

    - **Towers without CLS** (SigLIP in LLaVA, LLaVA-NeXT and LLaVA-OneVision; Qwen-VL's merged
      tokens): the score is the runtime's substitute, ``VisionView.cls_attention``: the attention
      each token receives in the feature layer (mean over heads, sum over queries). The official
      SigLIP tower ranks by attention received too (mean over queries and heads), but in the
      tower's last layer: the same layer where the feature layer is the last one (HF
      LLaVA-OneVision, ``vision_feature_layer=-1``). Qwen-VL: attention received in the adapter's
      scoring block by each merged token's 2x2 patches, and similarity of the merged tokens (the
      language model's space: nothing is projected after the stage); on Qwen3-VL the DeepStack
      channels the runtime appends to a token's features count in the similarity too.
      LLaVA-OneVision videos: the pooled projected tokens and their pooled scores.
    - **Anyres images** (LLaVA-NeXT, OneVision): one selection over all patch slots of the image,
      each scored by its own tile's CLS attention (received attention for SigLIP), newlines dropped;
      the official LLaVA-NeXT path keeps ``keep`` per tile (base and each high-resolution tile)
      before unpadding, so its total is not the budget.
    - **Videos**: each frame is a unit with ``budget // frames`` tokens (the official code has no
      video path).
    - **Batches**: units are independent (the official ``flat`` path works for one image per
      batch only: it concatenates every image's tokens into the first row).
    - **Odd remainders**: when the tokens left after the important ones are odd in number the
      official indexing raises; here the first half takes the extra token and the rule goes on
      (``remove_duplicates``). Exact ties are broken by the official sort (``remove_duplicates``).
    - Scores and similarities in float32 whatever the model's dtype.

    Across CPUs the choice is not stable, and no tie rule makes it so: it depends on the complete
    order of hundreds of close values (the residual's order decides every round's halves), so the
    last-bit differences another CPU's kernels leave in the tower's outputs move some tokens. On
    identical inputs the choice is identical under AVX-512 and AVX2 kernels; rounding the scores
    to a stated precision would move the boundaries where a last bit decides, not remove them. The
    evaluation's rows move by a few questions between machines (docs/choosing.md, "Five rows also
    depend on the CPU").

    Cost: see ``vispruner_select``: ``O(P^2 C)`` for the similarity matrix once, then about
    ``(P - keep) / 8`` rounds of ``O(P^2)`` gathers and sorts (vectorised, all units at once);
    P = 576 tokens per image on LLaVA-1.5.

    >>> reducer = duet_vlm.make("vispruner", budget=64)                                # doctest: +SKIP
    >>> duet_vlm.Compose(duet_vlm.make("vispruner"), duet_vlm.make("fastv"), budget=64)   # doctest: +SKIP
    """

    budget: int | None = None
    important_ratio: float = 0.5
    step: int = STEP

    def __post_init__(self) -> None:
        super().__post_init__()
        check_budget(self.budget, required=False)
        check_options(self.important_ratio, self.step)

    def vision_stage_for(self, geometry: Geometry, keep: int) -> ImportantDiverse:
        per = per_unit(geometry, keep)
        if per > geometry.patches:
            unit = "frame" if geometry.units > 1 else "image"
            raise ValueError(f"cannot keep {per} of {geometry.patches} patches per {unit}")
        return ImportantDiverse(important_ratio=self.important_ratio, step=self.step)

    def plan(self, geometry: Geometry) -> Plan:
        if self.budget is None:
            raise ValueError("VisPruner needs a budget (visual tokens per image entering the language model)")
        keep = per_unit(geometry, self.budget) * geometry.units  # the same count in every frame
        if keep == 0:
            raise ValueError(
                f"budget {self.budget} is less than one token per frame of a {geometry.units}-frame video"
            )
        schedule = Schedule(geometry.num_layers, geometry.visual_tokens, keep)
        return Plan(schedule, vision=self.vision_stage_for(geometry, keep))
