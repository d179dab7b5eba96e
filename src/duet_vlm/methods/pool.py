"""2-D average pooling of the patch grid: the spatial-downsampling baseline."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..geometry import Geometry
from ..options import check_numbers
from ..schedule import Schedule
from .base import Plan, Reducer, VisionReduction, VisionStage, VisionView, check_budget, per_unit
from .registry import register_method


def pool_grid(count: int, grid: tuple[int, int], tolerance: int = 0) -> tuple[int, int]:
    """The pooled grid ``(rows, cols)`` with ``rows * cols`` within ``tolerance`` of ``count``.

    Preference: the closest cell count, then the aspect ratio closest to ``grid``'s, then fewer rows.
    Raises ``ValueError`` when no grid that fits in ``grid`` qualifies.

    >>> [pool_grid(n, (24, 24), tolerance=1) for n in (192, 128, 64)]
    [(12, 16), (8, 16), (8, 8)]
    """
    rows, cols = grid
    target = math.log(rows / cols)
    best = None
    for h in range(1, rows + 1):
        for w in range(max(1, (count - tolerance + h - 1) // h), min(cols, (count + tolerance) // h) + 1):
            key = (abs(h * w - count), round(abs(math.log(h / w) - target), 9), h)
            if best is None or key < best[0]:
                best = (key, (h, w))
    if best is None:
        raise ValueError(f"no pooled grid within {rows}x{cols} has {count} cells (tolerance {tolerance})")
    return best[1]


def pooled_centres(grid: tuple[int, int], shape: tuple[int, int]) -> torch.Tensor:
    """Raster index of the patch at the centre of each ``adaptive_avg_pool2d`` cell (for statistics)."""

    def centres(size: int, out: int) -> torch.Tensor:
        starts = torch.tensor([i * size // out for i in range(out)])
        ends = torch.tensor([-(-(i + 1) * size // out) for i in range(out)])
        return (starts + ends - 1) // 2

    rows, cols = centres(grid[0], shape[0]), centres(grid[1], shape[1])
    return (rows[:, None] * grid[1] + cols[None, :]).reshape(-1)


@dataclass
class GridPool(VisionStage):
    """Averages the patch grid (CLS excluded) down to ``shape`` cells with ``adaptive_avg_pool2d``.

    >>> GridPool((8, 8)).reduce(view, keep=64).features.shape    # doctest: +SKIP
    torch.Size([1, 64, 1024])
    """

    shape: tuple[int, int] | None = None

    def reduce(self, view: VisionView, keep: int) -> VisionReduction:
        shape = self.shape or pool_grid(keep, view.grid)
        if shape[0] * shape[1] != keep:
            raise ValueError(f"a {shape[0]}x{shape[1]} pooled grid gives {shape[0] * shape[1]} tokens, not {keep}")
        images, _, channels = view.features.shape
        rows, cols = view.grid
        patches = view.features[:, int(view.has_cls) :]
        image = patches.transpose(1, 2).reshape(images, channels, rows, cols)
        pooled = F.adaptive_avg_pool2d(image, shape).flatten(2).transpose(1, 2)
        kept = pooled_centres(view.grid, shape).to(patches.device) + int(view.has_cls)
        return VisionReduction(pooled, kept.expand(images, -1))


@register_method("pool")
@dataclass
class Pool(Reducer):
    """Spatial pooling baseline: the patch grid averaged down to about ``budget`` cells.

    The CLS token is dropped and the ``rows x cols`` patch grid is average-pooled
    (``F.adaptive_avg_pool2d``) to the grid whose cell count is closest to ``budget`` (within 1;
    then the grid's aspect ratio): 192 -> 12x16, 128 -> 8x16, 64 -> 8x8 on LLaVA-1.5's 24x24.
    Cells are emitted in raster order.

    Args:
        budget: visual tokens per image (the layer average is the cell count, within 1 of it).
        shape: explicit pooled grid ``(rows, cols)``; overrides the budget.

    >>> reducer = Pool(budget=64)                                # doctest: +SKIP
    >>> with reducer(model): model.generate(**inputs)            # doctest: +SKIP
    >>> reducer.stats.llm_input_tokens                           # doctest: +SKIP
    64
    """

    budget: int | None = None
    shape: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        check_budget(self.budget, required=False)
        self.shape = check_numbers("shape", self.shape, integer=True, low=0, low_open=True, length=2, optional=True,
                                   note="rows, cols")

    def vision_stage_for(self, geometry: Geometry, keep: int) -> GridPool:
        # Composition needs exactly `keep` tokens, so no tolerance here.
        return GridPool(pool_grid(per_unit(geometry, keep), geometry.grid))

    def plan(self, geometry: Geometry) -> Plan:
        if self.shape is not None:
            shape = self.shape
            if shape[0] > geometry.grid[0] or shape[1] > geometry.grid[1]:
                raise ValueError(f"shape {shape} is larger than the {geometry.grid} patch grid")
        elif self.budget is None:
            raise ValueError("Pool needs a budget (or a shape)")
        else:
            shape = pool_grid(self.budget // geometry.units, geometry.grid, tolerance=1)  # per frame
        schedule = Schedule(geometry.num_layers, geometry.visual_tokens, shape[0] * shape[1] * geometry.units)
        return Plan(schedule, vision=GridPool(shape))
