"""VisionZip (Yang et al., CVPR 2025): "Longer is Better but Not Necessary in Vision Language Models"."""

from __future__ import annotations

from dataclasses import dataclass

from ..geometry import Geometry
from ..schedule import Schedule
from .base import Plan, Reducer, check_budget, per_unit
from .registry import register_method
from .stages import CONTEXTUAL_SHARE, DominantContextualMerge, check_stage_a_counts, contextual_count


def visionzip_split(keep: int) -> tuple[int, int]:
    """``(dominant, contextual)`` for ``keep`` tokens: VisionZip's 54:10 share, dominant counting CLS.

    >>> [visionzip_split(k) for k in (192, 128, 64)]
    [(162, 30), (108, 20), (54, 10)]
    """
    contextual = min(round(keep * CONTEXTUAL_SHARE), keep - 1)
    return keep - contextual, contextual


@register_method("visionzip")
@dataclass
class VisionZip(Reducer):
    """VisionZip (Yang et al., CVPR 2025): dominant plus contextual tokens, before the projector.

    Keeps the CLS token and the ``dominant - 1`` patches the CLS token attends to most in the vision
    feature layer, then ``contextual`` merged tokens: anchors spread uniformly (every
    ``R // contextual``-th of the ``R`` remaining tokens in raster order), each plus the mean of the
    remaining tokens whose keys are most similar to it. The language model sees exactly
    ``dominant + contextual`` visual tokens in every layer. Text-agnostic.

    Args:
        budget: visual tokens per image (= the layer average). Split 54:10 as in the paper:
            192 = 162 + 30, 128 = 108 + 20, 64 = 54 + 10 (dominant counts CLS).
        dominant, contextual: explicit counts; override the split (with both given, no budget is needed).

    >>> reducer = VisionZip(budget=64)                           # doctest: +SKIP
    >>> with reducer(model): model.generate(**inputs)            # doctest: +SKIP
    >>> reducer.stats.vision_roles["anchors"].shape              # doctest: +SKIP
    torch.Size([1, 10])
    """

    budget: int | None = None
    dominant: int | None = None
    contextual: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        check_budget(self.budget, required=False)
        check_stage_a_counts(self.dominant, self.contextual)

    def vision_stage_for(self, geometry: Geometry, keep: int) -> DominantContextualMerge:
        keep = per_unit(geometry, keep)
        contextual = contextual_count(keep, self.dominant, self.contextual, visionzip_split(keep)[1])
        return DominantContextualMerge(contextual=contextual, cluster_width=None)

    def plan(self, geometry: Geometry) -> Plan:
        if self.dominant is not None and self.contextual is not None:
            keep = (self.dominant + self.contextual) * geometry.units  # explicit counts are per frame
        elif self.budget is None:
            raise ValueError("VisionZip needs a budget (or both dominant and contextual)")
        else:
            keep = self.budget // geometry.units * geometry.units
        if keep > geometry.visual_tokens:
            raise ValueError(f"{keep} tokens exceed the {geometry.visual_tokens} visual tokens per image")
        schedule = Schedule(geometry.num_layers, geometry.visual_tokens, keep)
        return Plan(schedule, vision=self.vision_stage_for(geometry, keep))
