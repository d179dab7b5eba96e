"""Random at the information horizon (Wang et al., CVPR 2026): "When Token Pruning is Worse than Random:
Understanding Visual Token Information in VLLMs" (arXiv 2512.07580; code announced at
``YahongWang1/Information-Horizon``, unreleased at ``d575a20``)."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import ClassVar

import torch

from ..geometry import Geometry
from ..options import check_number
from ..plan import LanguageStage, LayerView, Plan
from .registry import register_method
from .shapes import PruneOnceAfterLayer

#: The paper's horizon on LLaVA-1.5-7B: past about the 20th of its 32 decoder layers, no training-free
#: method beats random dropping. Other depths place it at the same share.
HORIZON_SHARE = 20 / 32


class HorizonWarning(UserWarning):
    """A budget below what random dropping at the horizon can average: it drops earlier instead."""


@dataclass
class UniformRandomPrune(LanguageStage):
    """Keeps ``keep`` of the current visual tokens uniformly at random; reads no attention.

    Each visual token's draw depends on ``seed``, the boundary's layer and the token's index in the
    visual block that entered the language model (``LayerView.visual_ids``), never on the batch:
    a row gives the same tokens alone and in any batch, and another ``seed`` another subset.

    >>> UniformRandomPrune(seed=0).select(view, keep=98).shape      # doctest: +SKIP
    torch.Size([1, 1, 98])
    """

    reads: ClassVar[str | None] = None

    seed: int = 0

    def score(self, view: LayerView) -> torch.Tensor:
        ids = view.visual_ids
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + view.layer_index)
        # torch.rand fills serially from the generator, so the first m draws do not depend on the length.
        draws = torch.rand(int(ids.max()) + 1 if ids.numel() else 0, generator=generator)
        return draws.to(ids.device)[ids]


@register_method("random_horizon")
@dataclass
class RandomHorizon(PruneOnceAfterLayer):
    """Random dropping at the information horizon: every visual token runs through the layers before
    ``layer``; from ``layer`` on, ``keep`` of them, drawn uniformly at random (``UniformRandomPrune``).

    The paper finds that past a depth (the "information horizon": about layer 20 of LLaVA-1.5-7B's
    32, deeper for Qwen2.5-VL and for OCR-like tasks) visual tokens carry uniform information, and
    dropping them at random there matches or beats DART and DivPrune. It is the baseline the field's
    benchmarks now expect beside every language-side method, and the deep half of the paper's
    "DivPrune + random": ``Compose(make("divprune"), make("random_horizon"), budget=128)`` (the
    language side drops ``compose_ratio`` = half of what enters at the horizon).

    Choices where the paper's code is not released: the horizon at ``layer`` (default: 20/32 of the
    depth, ``HORIZON_SHARE``); one drop there, FastV's schedule (``keep`` solved from the budget, or
    given, or a ``ratio``); kept tokens keep their original positions. Alone, a drop at the horizon
    cannot average less than ``layer / depth`` of the visual tokens (360 of 576 on 32 layers). Below
    that floor the default ``layer`` moves to the deepest layer that meets the budget and says so
    (``HorizonWarning``): the random language-side baseline at any budget (192 on LLaVA-1.5 drops
    after layer 10). An explicit ``layer`` is never moved: a budget below its floor is refused.
    To keep the drop at the horizon with a small budget, compose it after a vision-side method.

    Args:
        budget: average visual tokens per decoder layer per image.
        layer: the horizon, the first decoder layer that sees only the kept tokens (``None``: 20/32 of
            the depth: 20 on 32 layers, 18 on 28).
        keep, ratio: explicit kept count or fraction of the tokens entering the language model.
        seed: the draw's seed.
        positions: ``"original"`` (default) or ``"contiguous"`` (refused under M-RoPE).

    >>> reducer = duet_vlm.make("random_horizon", budget=400)          # doctest: +SKIP
    >>> reducer.plan(geometry).schedule.boundaries                      # doctest: +SKIP
    ((20, 107),)
    """

    layer: int | None = None
    seed: int = 0

    depth_share: ClassVar[float | None] = HORIZON_SHARE

    def __post_init__(self) -> None:
        super().__post_init__()
        check_number("seed", self.seed, integer=True)

    def language_stage(self) -> UniformRandomPrune:
        return UniformRandomPrune(seed=self.seed)

    def layer_on(self, geometry: Geometry) -> int:
        """The horizon, or with a budget below its floor (and no ``layer``, ``keep`` or ``ratio``
        given) the deepest layer whose floor is within the budget."""
        horizon = super().layer_on(geometry)
        if self.layer is not None or self.budget is None or self.keep is not None or self.ratio is not None:
            return horizon
        return max(1, min(horizon, self.budget * geometry.num_layers // geometry.visual_tokens))

    def plan(self, geometry: Geometry) -> Plan:
        plan = super().plan(geometry)
        horizon = super().layer_on(geometry)
        layer = self.layer_on(geometry)
        said = self.__dict__.setdefault("_said_horizon", set())
        if layer < horizon and (self.budget, geometry) not in said:  # said once per reducer and geometry
            said.add((self.budget, geometry))
            warnings.warn(HorizonWarning(
                f"random_horizon: a budget of {self.budget} is below the "
                f"{horizon * geometry.visual_tokens / geometry.num_layers:.1f} visual tokens per layer that dropping "
                f"at the horizon (layer {horizon}) leaves at least; it drops after layer {layer} instead (compose it "
                "after a vision-side method to drop at the horizon)"
            ), stacklevel=2)
        return plan
