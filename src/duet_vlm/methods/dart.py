"""DART (Wen et al., EMNLP 2025): "Stop Looking for Important Tokens in Multimodal Language Models:
Duplication Matters More" (arXiv 2502.11494).

Inside the language model, after layer ``K``, a few pivot tokens are picked by the L1 norm of their
keys, and the visual tokens least similar (cosine) to the pivots are kept: near-duplicates of what
stays are dropped, instead of ranking tokens by an importance score.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from ..options import check_number
from ..plan import LanguageStage, LayerView
from ..selection import gather_tokens
from .shapes import PruneOnceAfterLayer
from .registry import register_method

# The official scripts' reduction_ratio 0.778 (scripts/v1_5/eval/*.sh, 128 of 576 tokens kept): the
# kept fraction used when DART prunes after a vision-side method in a Compose and neither ``keep``
# nor ``ratio`` is given.
DEFAULT_RATIO = 1 - 0.778


def pivot_quotas(keep: int, image_pivots: int, text_pivots: torch.Tensor) -> torch.Tensor:
    """``(B, image_pivots + max(text_pivots))`` tokens each pivot adds, in processing order.

    ``keep`` tokens survive per item: its ``image_pivots`` image pivots themselves and
    ``keep - image_pivots`` more, shared as evenly as possible by the row's pivots (image pivots
    first, then its ``text_pivots[b]`` text pivots); the first ``(keep - image_pivots) % pivots``
    pivots take one more. The official code gives every pivot ``budget // 8`` (all pivots equal).

    >>> pivot_quotas(30, 4, torch.tensor([4, 2])).tolist()
    [[4, 4, 3, 3, 3, 3, 3, 3], [5, 5, 4, 4, 4, 4, 0, 0]]
    """
    rest = keep - image_pivots
    width = image_pivots + int(text_pivots.max()) if text_pivots.numel() else image_pivots
    count = (image_pivots + text_pivots)[:, None]  # (B, 1) pivots per row
    slot = torch.arange(width, device=text_pivots.device)[None]
    quotas = rest // count + (slot < rest % count).long()
    return quotas.masked_fill(slot >= count, 0)


def duplication_select(
    states: torch.Tensor, pivots: torch.Tensor, candidates: torch.Tensor, quotas: torch.Tensor
) -> torch.Tensor:
    """``(..., n)`` bool: the tokens the pivots take, each in turn the ``quotas[..., j]`` candidates
    least cosine-similar to pivot ``j`` among those not taken yet.

    Args:
        states: ``(..., n, D)`` the tokens' states.
        pivots: ``(..., P, D)`` the pivots' states, in processing order.
        candidates: ``(..., n)`` bool, the tokens that may be taken (not the image pivots).
        quotas: ``(..., P)`` tokens each pivot takes (0 for a pivot a row lacks); their sum must
            not exceed the candidates.

    Cosines in float32 (``x·y / max(|x||y|, 1e-8)`` as ``F.cosine_similarity``); exact ties go to
    the lower index. Cost: ``O(P n D)`` for the similarities plus ``P`` top-k's over ``n``.

    >>> states = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.9, 0.1]])
    >>> duplication_select(states, states[:1], torch.tensor([False, True, True, True]), torch.tensor([2])).tolist()
    [False, True, True, False]
    """
    width = pivots.shape[-2]
    units = F.normalize(states.detach().float(), dim=-1, eps=1e-8)
    centres = F.normalize(pivots.detach().float(), dim=-1, eps=1e-8)
    similarity = centres @ units.transpose(-1, -2)  # (..., P, n)
    available = candidates.clone()
    taken = torch.zeros_like(candidates)
    for j in range(width):
        quota = quotas[..., j]
        most = int(quota.max()) if quota.numel() else 0
        if most == 0:
            continue
        scores = similarity[..., j, :].masked_fill(~available, float("inf"))
        # a stable sort rather than topk: exact ties go to the lower index
        order = scores.argsort(dim=-1, stable=True)[..., :most]
        chosen = torch.arange(most, device=states.device) < quota[..., None]
        picked = torch.zeros_like(taken).scatter(-1, order, chosen)
        taken |= picked
        available &= ~picked
    return taken


def dart_select(
    image_keys: torch.Tensor,
    image_states: torch.Tensor,
    text_keys: torch.Tensor,
    text_states: torch.Tensor,
    text_valid: torch.Tensor,
    keep: int,
    image_pivots: int = 4,
    text_pivots: int = 4,
) -> torch.Tensor:
    """DART's selection: ``(B, I, keep)`` ascending indices into each item's visual tokens.

    The ``image_pivots`` visual tokens and the ``text_pivots`` valid text tokens with the largest L1
    norm of their keys are the pivots; the image pivots are kept, and each pivot in turn (image
    pivots by descending norm, then text pivots by descending norm) takes its quota
    (``pivot_quotas``) of the remaining visual tokens least cosine-similar to it
    (``duplication_select``). A row with fewer valid text tokens has fewer text pivots.

    Args:
        image_keys: ``(B, I, n, K)`` keys of the visual tokens of ``I`` items per row.
        image_states: ``(B, I, n, D)`` the states compared by cosine similarity.
        text_keys, text_states: ``(B, T, K)``, ``(B, T, D)`` the row's text tokens (padded).
        text_valid: ``(B, T)`` bool, False on the padding of ``text_keys``.
        keep: tokens per item, ``0 <= keep <= n``.

    Cost: ``O((n + T) K)`` norms, ``O(P n D)`` similarities, ``P = image_pivots + text_pivots``.

    >>> keys = torch.tensor([[[[3.0], [1.0], [1.0], [1.0]]]])
    >>> states = torch.tensor([[[[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [-1.0, 0.0]]]])
    >>> no_text = torch.zeros(1, 0, 1), torch.zeros(1, 0, 2), torch.zeros(1, 0, dtype=torch.bool)
    >>> dart_select(keys, states, *no_text, keep=2, image_pivots=1).tolist()
    [[[0, 3]]]
    """
    batch, items, n = image_keys.shape[:3]
    if not 0 <= keep <= n:
        raise ValueError(f"cannot keep {keep} of {n} tokens")
    device = image_keys.device
    if keep in (0, n):
        return torch.arange(keep, device=device).expand(batch, items, keep)
    n_image = min(image_pivots, keep)
    image_norm = image_keys.detach().float().abs().sum(-1)
    image_pivot = image_norm.topk(n_image, dim=-1).indices  # (B, I, p) by descending norm
    width = min(text_pivots, text_keys.shape[1]) if keep > n_image else 0
    text_norm = text_keys.detach().float().abs().sum(-1).masked_fill(~text_valid, float("-inf"))
    text_pivot = text_norm.topk(width, dim=-1).indices  # (B, t), the valid ones first
    text_count = text_valid.sum(-1).clamp(max=width)
    pivots = torch.cat(
        [
            gather_tokens(image_states.reshape(batch * items, n, -1), image_pivot.reshape(batch * items, -1)),
            gather_tokens(text_states, text_pivot).repeat_interleave(items, dim=0),
        ],
        dim=1,
    ).view(batch, items, n_image + width, image_states.shape[-1])
    quotas = pivot_quotas(keep, n_image, text_count)[:, None].expand(batch, items, -1)
    is_pivot = torch.zeros(batch, items, n, dtype=torch.bool, device=device).scatter(-1, image_pivot, True)
    kept = is_pivot | duplication_select(image_states, pivots, ~is_pivot, quotas)
    return (~kept).to(torch.int8).argsort(dim=-1, stable=True)[..., :keep]


@dataclass
class DuplicationPrune(LanguageStage):
    """DART's stage: pivots by key norm in layer ``K - 1``, then the least-duplicated visual tokens.

    At the boundary after layer ``K - 1``: the keys that layer computed on its own input (input
    norm, ``k_proj``, RoPE; heads concatenated) give each token's L1 norm; the states compared are
    that layer's output (the next layer's input) through the model's final norm, as the official
    code does. Text pivots come from each row's prompt tokens after its last visual item
    (``LayerView.text_after_image``: the instruction; in training only unlabelled tokens). Each item
    of a row is reduced on its own, with the row's text pivots shared. See ``dart_select``.

    ``score`` is the pivot criterion (key L1 norm of each visual token), not what decides the rest.

    >>> DuplicationPrune().select(view, keep=98).shape      # doctest: +SKIP
    torch.Size([1, 1, 98])
    """

    reads: ClassVar[str | None] = "previous"  # scores with the layer before the boundary

    image_pivots: int = 4
    text_pivots: int = 4

    def score(self, view: LayerView) -> torch.Tensor:
        keys = view.keys(previous_layer=True)
        return gather_tokens(keys, view.visual_index).float().abs().sum(-1)

    def select(self, view: LayerView, keep: int) -> torch.Tensor:
        keys = view.keys(previous_layer=True)
        states = view.final_norm(view.hidden_states.detach())
        text, text_valid = _padded(view.text_after_image, keys.device)
        return dart_select(
            gather_tokens(keys, view.visual_index),
            gather_tokens(states, view.visual_index),
            gather_tokens(keys, text),
            gather_tokens(states, text),
            text_valid,
            keep,
            self.image_pivots,
            self.text_pivots,
        )


def _padded(positions: list[torch.Tensor], device) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row position lists as a ``(B, T)`` tensor (padded with 0) and its validity mask."""
    width = max((len(p) for p in positions), default=0)
    index = torch.zeros(len(positions), width, dtype=torch.long, device=device)
    valid = torch.zeros(len(positions), width, dtype=torch.bool, device=device)
    for b, p in enumerate(positions):
        index[b, : len(p)] = p.to(device)
        valid[b, : len(p)] = True
    return index, valid


@register_method("dart")
@dataclass
class DART(PruneOnceAfterLayer):
    """DART (Wen et al., EMNLP 2025): after decoder layer ``layer``, keep the visual tokens least
    duplicated by a few pivot tokens.

    Layers ``0 .. layer-1`` see every visual token; from ``layer`` on, ``keep`` remain per item: the
    ``image_pivots`` visual tokens whose keys in layer ``layer - 1`` have the largest L1 norm, and,
    for each pivot in turn (those image pivots, then the ``text_pivots`` instruction tokens with the
    largest key norm), its share of the remaining visual tokens least cosine-similar to it (states
    out of layer ``layer - 1`` through the final norm). Kept tokens keep their original positions.

    Sources: the official code, ``ZichenWen1/DART`` at ``5a19452`` (2025-08-31, its last commit;
    read through the fork ``xqy1111111/DART`` at ``d6a5af6``, which adds only classification
    scripts): ``llava/model/language_model/modeling_llama_self.py`` (``DART.forward``,
    ``get_retained_image_token``), the Qwen2-VL and Qwen2.5-VL ports, ``llava/eval/
    model_vqa_loader.py`` and ``scripts/v1_5/eval/*.sh``; the paper's abstract (arXiv 2502.11494:
    pivots, then the tokens least duplicated by them). The code is the specification here.

    Hyperparameters (official defaults): ``layer`` K = 2 (``--pruned_layer 2``), 4 image pivots and
    4 text pivots (``--pivot_image_token 4 --pivot_text_token 4``); the scripts keep
    ``4 + 8 * (128 // 8) = 132`` tokens (``--max_num_trunction 128``) or, by ratio,
    ``4 + 8 * int(n * (1 - 0.778) / 8)``.

    Choices where code and paper are silent or differ:

    * **Budget.** ``keep`` is solved from the layer-averaged budget as FastV's (``fastv_keep``): on
      LLaVA-1.5 (576 tokens, 32 layers, K = 2) budgets 192 / 128 / 64 keep 166 / 98 / 30 from layer 2
      on. ``keep`` counts everything kept (image pivots included), and the ``keep - image_pivots``
      others are shared by the pivots as evenly as possible, the first pivots taking one more
      (``pivot_quotas``): 166 = 4 + 8 x 20 + 2, 98 = 4 + 8 x 11 + 6, 30 = 4 + 8 x 3 + 2. The
      official code gives every pivot ``budget // 8``, so ``keep = 4 + 8 t`` reproduces it exactly
      (its "128" is ``keep=132``, layer average 159.75).
    * **Pivot order.** The official loop visits the pivots in the iteration order of a Python set
      of their positions (CPython's hash order), which matters when two pivots' least similar tokens
      overlap. Here: image pivots by descending key norm, then text pivots by descending key norm,
      the order the official code lists them before the set (recorded outputs of both orders
      replay in tests/test_dart.py).
    * **Batches.** The official code asserts batch size 1. Here every row has its own pivots (its
      items' visual tokens, its own instruction tokens), so a left-padded batch equals each row
      alone. A key's norm, unlike attention, changes when all positions shift, and transformers
      numbers a left-padded row from its padding: keys are rotated as the row alone rotates them
      (``LayerView.keys``: positions from the row's first valid token). Keys are the layer's key
      heads concatenated before grouped-query repetition (the official L1 norm is over repeated
      heads: the same ranking).
    * **Text pivots** come from the prompt tokens after the row's last visual item (official:
      everything after the image); in training only the unlabelled ones (the instruction). A row
      with fewer such tokens has fewer text pivots; their share goes to the others.
    * **Several items** (multi-image prompts, LLaVA-NeXT tiles of one image, video frames): each
      item is one pool with its own image pivots; a video is one item (all its frames). The
      official LLaVA-NeXT path (``text_length``) and Qwen ports treat the visual block as one span.
    * **Precision.** Norms and cosines in float32 (the official code: the model's dtype).
    * **Families.** Every family: the signals (keys, final norm, hidden states) exist on all of
      them; under M-RoPE (Qwen-VL) kept tokens keep their 3-D positions, as the official Qwen ports.

    Selection cost per item: ``O((n + T) K)`` for the norms and ``O(P n D)`` for the cosines
    (``P`` = 8 pivots), linear in the number of visual tokens; no attention map.

    Args:
        budget: average visual tokens per decoder layer per item.
        layer: ``K``, the decoder layers that run on all tokens (official 2); pivots read layer K-1.
        keep: explicit number of visual tokens kept from ``layer`` on; overrides the solver.
        ratio: explicit kept fraction of the LLM-input tokens (official ``1 - reduction_ratio``);
            overrides the solver. Inside a ``Compose`` without ``keep`` or ``ratio``: 0.222, the
            official scripts' ``reduction_ratio`` 0.778.
        image_pivots: pivots among the visual tokens (official 4), kept themselves; at least 1.
        text_pivots: pivots among the instruction tokens (official 4).
        positions: ``"original"`` (DART) or ``"contiguous"`` (refused under M-RoPE).

    >>> reducer = DART(budget=128)                               # doctest: +SKIP
    >>> with reducer(model): model.generate(**inputs)            # doctest: +SKIP
    >>> reducer.stats.tokens_per_layer[:3]                       # doctest: +SKIP
    [576, 576, 98]
    """

    image_pivots: int = 4
    text_pivots: int = 4

    compose_ratio: ClassVar[float] = DEFAULT_RATIO

    def __post_init__(self) -> None:
        super().__post_init__()
        check_number("image_pivots", self.image_pivots, integer=True, low=1)
        check_number("text_pivots", self.text_pivots, integer=True, low=0)

    def language_stage(self) -> DuplicationPrune:
        return DuplicationPrune(self.image_pivots, self.text_pivots)
