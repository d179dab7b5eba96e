"""Random patch dropping: the floor every token-reduction method should beat."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..geometry import Geometry
from ..options import check_number
from ..schedule import Schedule
from ..selection import gather_tokens
from .base import Plan, Reducer, VisionReduction, VisionStage, VisionView, check_budget, per_unit
from .registry import register_method


def random_patches(num_patches: int, keep: int, seed: int) -> torch.Tensor:
    """``keep`` distinct patch indices in ``[0, num_patches)``, ascending, drawn from ``seed`` alone.

    >>> random_patches(10, 3, seed=0).tolist() == random_patches(10, 3, seed=0).tolist()
    True
    """
    if not 0 <= keep <= num_patches:
        raise ValueError(f"cannot keep {keep} of {num_patches} patches")
    generator = torch.Generator().manual_seed(seed)
    return torch.randperm(num_patches, generator=generator)[:keep].sort().values


@dataclass
class RandomPatches(VisionStage):
    """Keeps ``keep`` uniformly random patches (CLS not kept), in raster order.

    The draw depends on ``seed`` only, so every image of a call gets the same subset and a result
    never depends on which other images share the batch.

    >>> RandomPatches(seed=0).reduce(view, keep=64).kept.shape   # doctest: +SKIP
    torch.Size([1, 64])
    """

    seed: int = 0

    def reduce(self, view: VisionView, keep: int) -> VisionReduction:
        images = view.features.shape[0]
        patches = view.grid[0] * view.grid[1]
        kept = random_patches(patches, keep, self.seed).to(view.features.device) + int(view.has_cls)
        kept = kept.expand(images, -1)
        features = gather_tokens(view.features, kept)
        return VisionReduction(features, kept)


@register_method("random")
@dataclass
class RandomDrop(Reducer):
    """Random baseline: ``budget`` uniformly random patches enter the language model.

    Patches (not the CLS token) are drawn without replacement from a generator seeded with ``seed``
    at every call: reproducible, independent of the batch, and the same subset for every image (use
    another ``seed`` for another subset).

    Args:
        budget: visual tokens per image (= the layer average).
        seed: the draw's seed.

    >>> reducer = RandomDrop(budget=128, seed=0)                 # doctest: +SKIP
    >>> with reducer(model): model.generate(**inputs)            # doctest: +SKIP
    >>> reducer.stats.vision_kept.shape                          # doctest: +SKIP
    torch.Size([1, 128])
    """

    budget: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        check_budget(self.budget, required=False)
        check_number("seed", self.seed, integer=True)

    def vision_stage_for(self, geometry: Geometry, keep: int) -> RandomPatches:
        patches, keep = geometry.patches, per_unit(geometry, keep)
        if keep > patches:
            raise ValueError(f"cannot keep {keep} of {patches} patches")
        return RandomPatches(seed=self.seed)

    def plan(self, geometry: Geometry) -> Plan:
        if self.budget is None:
            raise ValueError("RandomDrop needs a budget")
        keep = self.budget // geometry.units * geometry.units  # the same count in every frame
        schedule = Schedule(geometry.num_layers, geometry.visual_tokens, keep)
        return Plan(schedule, vision=self.vision_stage_for(geometry, keep))
