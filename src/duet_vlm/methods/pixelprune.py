"""PixelPrune (arXiv 2604.00886): "Pixel-Level Adaptive Visual Token Reduction via Predictive Coding"
(official code ``OPPO-Mente-Lab/PixelPrune`` ``a870e31``, ``pixelprune/methods/pred_2d.py``)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

import torch

from ..geometry import Geometry
from ..options import check_number
from ..plan import InputStage
from ..schedule import Schedule
from ..selection import gather_tokens
from .base import Plan, Reducer, VisionReduction, VisionStage, VisionView
from .registry import register_method

#: Distances between two tokens' pixels (values in ``[0, 1]``), as the official ``_sim2d`` names them:
#: the largest absolute difference, the mean absolute difference, their root mean square; ``exact``
#: is ``max`` at threshold 0 whatever the threshold given.
METRICS = ("max", "mae", "rmse", "exact")


def similar(x: torch.Tensor, y: torch.Tensor, metric: str, threshold: float) -> torch.Tensor:
    """``(...)`` True where the pixel rows ``x`` and ``y`` (``(..., D)``) are within ``threshold`` of
    each other under ``metric``.

    >>> similar(torch.tensor([[0.5, 0.5]]), torch.tensor([[0.5, 0.52]]), "max", 0.05).tolist()
    [True]
    """
    diff = (x - y).float()
    if metric in ("max", "exact"):
        distance, threshold = diff.abs().amax(dim=-1), 0.0 if metric == "exact" else threshold
    elif metric == "mae":
        distance = diff.abs().mean(dim=-1)
    else:
        distance = diff.pow(2).mean(dim=-1).sqrt()
    return distance <= threshold


def predictive_keep(pixels: torch.Tensor, metric: str = "max", threshold: float = 0.0, anchored: bool = True) -> torch.Tensor:
    """``(rows, cols)`` True on the tokens of a grid ``(rows, cols, D)`` that their causal neighbours
    do not predict: the LOCO-I edge detector of JPEG-LS on the token grid (the official ``Pred2DSelector``).

    Token ``(0, 0)`` is always kept. On the first row the left neighbour predicts, on the first column
    the one above. Elsewhere, with ``A`` left, ``B`` above and ``C`` above-left: ``B`` predicts where
    ``C`` matches ``A`` but not ``B`` (a vertical edge), else ``A``. A token is kept where it does not
    match its prediction. At threshold 0 (or ``exact``), or not ``anchored``, neighbours are the
    tokens themselves (one vectorised pass); otherwise they are what the kept tokens reconstruct
    (``anchored``, the official default: a dropped token stands for its prediction, so differences
    below the threshold cannot accumulate along a run), one token at a time as the official code does.

    >>> grid = torch.zeros(3, 4, 1); grid[1:, 2:] = 1.0          # a bright block in the corner
    >>> predictive_keep(grid).int().tolist()                   # the grid's first token and the block's
    [[1, 0, 0, 0], [0, 0, 1, 0], [0, 0, 0, 0]]
    """
    rows, cols, _ = pixels.shape
    if metric == "exact" or threshold == 0 or not anchored:
        return _keep_vectorised(pixels, metric, threshold)
    keep = torch.zeros(rows, cols, dtype=torch.bool, device=pixels.device)
    keep[0, 0] = True
    shown = pixels.clone()  # what the kept tokens reconstruct

    def near(a: torch.Tensor, b: torch.Tensor) -> bool:
        return bool(similar(a, b, metric, threshold))

    for r in range(rows):
        for c in range(cols):
            if r == 0 and c == 0:
                continue
            left = shown[r, c - 1] if c > 0 else shown[r - 1, 0]
            if r > 0 and c > 0:
                above, corner = shown[r - 1, c], shown[r - 1, c - 1]
                prediction = above if near(corner, left) and not near(corner, above) else left
            else:
                prediction = left
            if near(pixels[r, c], prediction):
                shown[r, c] = prediction
            else:
                keep[r, c] = True
    return keep


def _keep_vectorised(grid: torch.Tensor, metric: str, threshold: float) -> torch.Tensor:
    rows, cols, _ = grid.shape
    keep = torch.zeros(rows, cols, dtype=torch.bool, device=grid.device)
    keep[0, 0] = True
    if cols > 1:
        keep[0, 1:] = ~similar(grid[0, 1:], grid[0, :-1], metric, threshold)
    if rows > 1:
        keep[1:, 0] = ~similar(grid[1:, 0], grid[:-1, 0], metric, threshold)
    if rows > 1 and cols > 1:
        token, left, above, corner = grid[1:, 1:], grid[1:, :-1], grid[:-1, 1:], grid[:-1, :-1]
        vertical_edge = similar(corner, left, metric, threshold) & ~similar(corner, above, metric, threshold)
        prediction = torch.where(vertical_edge[..., None], above, left)
        keep[1:, 1:] = ~similar(token, prediction, metric, threshold)
    return keep


@dataclass
class PixelPredict(InputStage):
    """PixelPrune's choice before the encoder: the tokens whose pixels their neighbours do not
    predict (``predictive_keep``)."""

    metric: str = "max"
    threshold: float = 0.0
    anchored: bool = True

    def select(self, pixels: torch.Tensor) -> torch.Tensor:
        return predictive_keep(pixels, self.metric, self.threshold, self.anchored)


class EnteredTokens(VisionStage):
    """Every token whose patches entered the encoder (``VisionView.entered``), in order: the rest
    were never encoded (the role ``never_encoded``, -1 past a unit's count, which the overlay
    draws). Units of one item may keep different counts (``VisionReduction.counts``)."""

    def reduce(self, view: VisionView, keep: int) -> VisionReduction:
        if view.entered is None:
            raise RuntimeError(
                "no input stage chose this item's patches (its tower ran without the reducer's entry hook): "
                "PixelPrune's selection is made before the encoder"
            )
        offset = int(view.has_cls)  # a CLS token enters, and has no slot of its own
        entered = view.entered[:, offset:].to(view.features.device)
        counts = entered.sum(dim=1)
        # Entered tokens first, each group in ascending order (a stable sort of "not entered").
        kept = torch.sort((~entered).int(), dim=1, stable=True).indices[:, : int(counts.max())] + offset
        left = entered.shape[1] - counts
        never = torch.sort(entered.int(), dim=1, stable=True).indices[:, : max(int(left.max()), 1)] + offset
        never = never.masked_fill(torch.arange(never.shape[1], device=never.device)[None] >= left[:, None], -1)
        uneven = bool((counts != keep).any())
        return VisionReduction(gather_tokens(view.features, kept), kept, {"never_encoded": never},
                               counts=counts.cpu() if uneven else None)


@register_method("pixelprune")
@dataclass
class PixelPrune(Reducer):
    """PixelPrune (arXiv 2604.00886; official code ``OPPO-Mente-Lab/PixelPrune`` ``a870e31``,
    ``pixelprune/methods/pred_2d.py`` and ``pixelprune/patches/qwen3_vl_hf.py``).

    Before the vision encoder, each image's language-model tokens (2x2 patch groups) are read as
    pixels and coded predictively over the token grid (LOCO-I, ``predictive_keep``); a token its
    neighbours predict within ``threshold`` never enters the encoder. The encoder runs on the kept
    patches only, with their own rotary positions and learned position embeddings, each image
    attending within its kept patches (a window within its kept patches of that window: the
    tower's own arguments, ``ModelAdapter.enter_patch_subset``); the kept tokens enter the language
    model at their own M-RoPE positions. Encoder and language model both save compute, and the
    count follows the content: a screenshot or a document keeps few tokens, a photograph nearly all
    (there is no budget: ``reducer.stats.items`` has each item's count).

    Families: those whose tower takes a subset of its patches with their positions, Qwen2-VL,
    Qwen2.5-VL, Qwen3-VL and Qwen3.5 (the official code patches Qwen3-VL and Qwen3.5), and LLaVA-1.5,
    whose CLIP or SigLIP tower adds each patch's absolute position embedding inside its embeddings:
    there the rows of the patches left out are dropped just after them (each image keeps its CLS
    row), and the encoder layers run on the rest, as the tower would encode those patches alone.
    Elsewhere (tiled, pooled or pixel-shuffled layouts) it is refused at attach, with the reason.

    Choices where the official code has none or differs: the pixels compared are all of a token's
    (both temporal frames of Qwen's patches; the official code reads the first frame, the same
    pixels for an image); pixels are read back in ``[0, 1]`` with the processor's normalisation of
    each family (``ModelAdapter.pixel_mean``, ``pixel_std``; the official code's ``x * 0.5 + 0.5`` is
    Qwen3-VL's); video slices are reduced where each slice is an item (Qwen3-VL, Qwen3.5), and
    Qwen2/2.5-VL videos of several slices enter whole (the official code reduces images only); the
    token selection at a later encoder layer (``PIXELPRUNE_VIT_LAYER``) is not offered: layer 0, the
    official default, is the one that saves the encoder's compute.

    Args:
        metric: ``"max"`` (official default), ``"mae"``, ``"rmse"`` or ``"exact"`` (``similar``).
        threshold: the largest distance, in ``[0, 1]`` pixel units, at which a prediction holds
            (official default 0: only exact repeats are left out, and the model's output is
            unchanged wherever the dropped tokens carried nothing new).
        anchored: compare with what the kept tokens reconstruct (official default), not with the
            neighbours' own pixels; only matters above threshold 0.

    >>> reducer = duet_vlm.make("pixelprune")                  # doctest: +SKIP
    >>> with reducer(model): model.generate(**inputs)          # doctest: +SKIP
    >>> [item.tokens_per_layer[0] for item in reducer.stats.items]   # doctest: +SKIP
    """

    metric: str = "max"
    threshold: float = 0.0
    anchored: bool = True

    #: each item's count is what entered its encoder (``item_budget``).
    adapts_to_content: ClassVar[bool] = True
    takes_budget: ClassVar[bool] = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.metric not in METRICS:
            raise ValueError(f"metric must be one of {', '.join(METRICS)}, got {self.metric!r}")
        check_number("threshold", self.threshold, low=0, high=1)
        if not isinstance(self.anchored, bool):
            raise ValueError(f"anchored must be True or False, got {self.anchored!r}")

    def input_stage(self) -> PixelPredict:
        return PixelPredict(self.metric, self.threshold, self.anchored)

    def item_budget(self, view: VisionView, geometry: Geometry) -> int:
        if view.entered is None:
            raise RuntimeError("pixelprune: this item's tower call did not go through the reducer's input stage")
        return int(view.entered[:, int(view.has_cls):].sum())

    def with_budget(self, budget: int) -> "PixelPrune":
        copy = dataclasses.replace(self)
        copy.__dict__["_count"] = budget
        return copy

    def per_row(self, budget=None, ratio=None):
        raise ValueError("pixelprune takes no budget, per row or otherwise: each image's count follows its pixels")

    def vision_stage_for(self, geometry: Geometry, keep: int) -> EnteredTokens:
        return EnteredTokens()

    def plan(self, geometry: Geometry) -> Plan:
        """The plan of an item of which ``count`` tokens entered the encoder (``with_budget``, per item
        at the prefill). Before the pixels are seen, the plan of an item that keeps one token per
        unit: what may happen, for the checks that refuse a reduction (a static cache)."""
        count = self.__dict__.get("_count", geometry.units)
        if count >= geometry.visual_tokens:  # every token entered the encoder
            return Plan(Schedule(geometry.num_layers, geometry.visual_tokens, geometry.visual_tokens))
        return Plan(Schedule(geometry.num_layers, geometry.visual_tokens, count), vision=EnteredTokens())
