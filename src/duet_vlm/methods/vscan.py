"""VScan (Zhang et al., 2025; TMLR 2026): "Rethinking Visual Token Reduction for Efficient Large
Vision-Language Models": global and local scans with merging in the vision encoder, then text-guided
pruning in the middle layers of the language model."""

from __future__ import annotations

from dataclasses import dataclass

from ..geometry import Geometry  # noqa: F401 - the doctest's
from .stages import LastInstructionAttention
from .registry import register_method
from .shapes import ScanThenPrune, third_keeps  # noqa: F401 - third_keeps: VScan's keep counts, documented here


@register_method("vscan")
@dataclass
class VScan(ScanThenPrune):
    """VScan (Zhang et al., 2025, arXiv 2505.22654; TMLR 2026): a global and a local scan of the vision
    encoder with every other token merged into a kept one, then text-guided pruning in the middle of
    the language model.

    Sources: the paper (arXiv v2/v3) and the official code, ``Tencent/SelfEvolvingAgent`` ``VScan/``
    (the repository ``zhangce01/VScan`` points there), HEAD ``a82450e`` (code unchanged since
    ``af252ab``): ``llava/model/llava_arch.py`` ``encode_images``, ``window_cls_selection``,
    ``token_merging``; ``llava/model/modeling_llama_x.py`` ``forward_x``, ``layer_prune``;
    ``qwen/model/qwen2_5_vl_custom.py``; ``scripts/*`` and the README for the settings.

    **Stage 1, vision encoder** (the official ``encode_images``): of the ``N`` tokens an image passes to
    the language model, ``int(N / 2)`` are the **local scan**: the best patches by the CLS attention
    (mean over heads) of CLIP layer index 5 within each 6x6 window of the 24x24 grid, the same number
    per window; the other ``N - int(N / 2)`` are the **global scan**: the best by the CLS attention of
    layer index -2 (the feature layer) after the local picks are zeroed. CLS itself is not kept.
    Every other patch is then averaged into the kept patch it is most cosine-similar to **after the
    projector**: ``(kept + sum of its assigned) / (1 + count)`` (``token_merging``, scaling 1), in
    ascending patch order. This is exactly the rule of TRIO's scan, so this module imports it rather
    than restating it: ``GlobalLocalScan`` and ``scan_for`` (``trio_scan.window_scan``,
    ``trio_scan.merge_into_nearest``). The recorded official VScan outputs (``tests/test_vscan.py``)
    are bit-identical to the recorded official TRIO ones for the same ``N``.

    **Stage 2, language model** (the official ``layer_prune``, PyramidDrop's code): after decoder
    layer 16 of 32 the visual tokens the **last instruction token** attends to most survive, scored
    with the next layer's norm, q/k projections and RoPE on the current states (softmax over the
    full causal row, mean over heads); kept tokens in ascending order, positions renumbered. In
    training the official query is the token before each answer span; ``LastInstructionAttention``
    (PyramidDrop's stage, the same rule) takes the last one. This module imports that stage.

    **Schedule and budget** (``budget`` = average visual tokens per decoder layer per item): ``N`` for
    the first half of the layers and a third of it after the boundary (``third_keeps``); ``N`` is
    solved from the budget (``solve_llm_input``, as DUET's ``compose_plan`` does). On LLaVA-1.5
    (576 tokens, 32 layers): 64 -> 96 -> 32 after layer 16 (the official README and scripts'
    default, ``--visual_token_num 96 --layer_list [16] --image_token_list [32]``); 128 -> 192 -> 64
    and 192 -> 288 -> 96 (not published: the same shape). The default shape averages at most two
    thirds of an item's tokens (384 of 576); larger budgets need explicit ``ratios``/``keep``.
    Explicit ``llm_input`` (``--visual_token_num``) or ``vision_ratio`` (Qwen's
    ``--image-token-ratio``), ``layers`` (``--layer_list``, 1-based "after layer l") and ``keep``
    (``--image_token_list``, absolute, capped by the tokens present as the official ``min``) or
    ``ratios`` (``--image-token-ratio-list``) override the solver; ``VScan.qwen_reference()`` is the
    official Qwen2.5-VL setting.

    **Choices where paper and code are silent or disagree**, and substitutes per family:

    - Exactly ``N`` tokens: when ``int(N / 2)`` is not a multiple of the 16 windows, the official
      ``window_cls_selection`` keeps ``int(N / 2) // 16`` per window and the code passes fewer than
      ``N`` tokens on; here the global scan takes the rest (as ``TrioScan``), so budgets hold.
    - Other grids and depths (``scan_for``): windows of 6 patches on any 1-D RoPE model's grid, the
      shallow map at the same relative depth as CLIP-L's layer 5 of 24 (``round(5 * depth / 24)``);
      towers without CLS (SigLIP) score by the attention a patch receives, as the official Qwen path
      does (the paper: "average self-attention" for encoders without [CLS]).
    - Qwen2.5/2-VL/3-VL (M-RoPE): the official Qwen path's scan (windows of 4 merged tokens, the first
      full-attention block and the last block, merged after the merger) and keep ratio (``0.333``);
      positions stay original (the official code gathers the kept tokens' 3-D positions). The
      official Qwen score omits RoPE and the mask at the boundary (that code is commented out); here
      the one scoring rule of every family applies (RoPE and the causal mask included). It is batch 1
      only; here padded batches equal their rows.
    - LLaVA-NeXT anyres: the official code scans every tile (the base tile and each high-resolution
      tile) separately with ``N`` tokens each, merges within the tile, keeps every ``image_newline``,
      and then prunes to the absolute ``--image_token_list`` (32, the LLaVA-1.5 value, in its NeXT
      scripts too). Here an anyres image is one unit with the budget's meaning for every family: its
      patch slots (base tile, then the unpadded high-resolution grid in slot order, newlines
      excluded) form a grid ``(1, n)`` whose local scan runs over windows of ``6 x 6 = 36``
      consecutive slots (``window_scan``), the global scan and the merge run over all tiles together
      (a dropped patch may merge into a kept patch of another tile), newline slots are dropped with
      the rest, and the boundary keeps a third of what entered.
    - Videos (Video-LLaVA, LLaVA-OneVision): each frame is scanned on its own with ``N / frames``
      tokens (``N`` solved in whole frames); the boundary ranks the whole video's tokens together.
    - Batches: every row ranks its own items (the official code: right padding; decodes at batch 1).

    Cost: the window scan sorts ``P`` patches and counts ranks within windows (``O(P^2)`` boolean
    work, vectorised); the merge is one ``(P - N) x N`` cosine matrix per unit; the boundary forms only
    the last query row against the keys (``O(L)`` per head), never the full attention map.

    Args:
        budget: average visual tokens per decoder layer per item (image, or whole video).
        llm_input: explicit ``N`` per item (rounded down to whole frames); ``vision_ratio``: ``N`` as
            ``int(r * tokens)`` of each item's tokens (the official Qwen option).
        layers: boundaries as counts of decoder layers completed (default: half the depth, 16 of 32);
            ``()`` disables the language stage (the scan alone).
        keep, ratios: kept count, or fraction of the current count, after each boundary.
        window, local_share, local_layer, global_layer: the scan (official: 6, 0.5, 5, -2 on LLaVA;
            4, 0.5, first full-attention block, last block on Qwen); ``None``: the model path's.
        positions: ``None`` (default): contiguous on 1-D RoPE models (the official LLaVA code
            renumbers), original under M-RoPE (the official Qwen code).

    >>> VScan(budget=64).resolve(Geometry(32, 576, (24, 24), True, encoder_depth=24)).schedule.boundaries
    ((16, 32),)
    >>> with VScan(budget=64)(model): model.generate(**inputs)      # doctest: +SKIP
    """

    ceiling_hint = "give larger ratios/keep, later layers, or layers=() for the scan alone"

    def language_stage(self) -> LastInstructionAttention:
        return LastInstructionAttention()
