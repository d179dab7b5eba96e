"""What a method's schedule costs on a model of given dimensions, with no model loaded (``duet-vlm plan``):
the plan it solves for one image (or video), visual tokens per layer, decoder FLOPs and KV-cache bytes.

>>> costs = plan_costs("duet", budget=192)
>>> costs.plan.schedule.llm_input, round(costs.plan.schedule.average, 2)
(307, 191.75)
>>> [name for name, *_ in costs.rows]
['FLOPs (FastV formula)', 'FLOPs (exact: GQA, gated MLP, causal)', 'KV cache']
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .flops import DecoderDims, exact_flops, fastv_flops, kv_cache_bytes
from .geometry import Geometry
from .methods import make
from .plan import Plan


@dataclass
class PlanCosts:
    """A solved plan and its prefill costs against the unreduced model.

    ``rows``: ``(name, unit, reduced, full)`` for the FastV-formula FLOPs, the exact FLOPs and the
    KV-cache bytes of one item and ``text_tokens`` text tokens."""

    plan: Plan
    tokens: int  # visual tokens of the item without reduction
    frames: int
    text_tokens: int
    rows: list[tuple[str, str, float, float]]

    @property
    def item(self) -> str:
        return f"video of {self.frames} frames" if self.frames > 1 else "image"


def plan_costs(method: str = "duet", budget: int | None = None, ratio: float | None = None, layers: int = 32,
               tokens: int = 576, frames: int = 1, text_tokens: int = 60, hidden: int = 4096,
               intermediate: int = 11008, heads: int = 32, kv_heads: int = 32, bytes_per_element: int = 2) -> PlanCosts:
    """The plan ``make(method, budget=..., ratio=...)`` solves for an item of ``tokens`` visual tokens
    per frame on a ``layers``-layer decoder (LLaVA-1.5-7B's by default), and its costs."""
    if (budget is None) == (ratio is None):
        raise ValueError("give --budget or --ratio")
    for name, value, least in (("layers", layers, 2), ("tokens", tokens, 1), ("frames", frames, 1),
                               ("text-tokens", text_tokens, 0), ("heads", heads, 1), ("kv-heads", kv_heads, 1)):
        if value < least:
            raise ValueError(f"--{name} must be at least {least}, got {value}")
    # The patch grid of a unit: N square patches, or N - 1 plus a CLS slot (Video-LLaVA frames).
    side = next((s for s in (math.isqrt(tokens), math.isqrt(tokens - 1)) if s * s in (tokens, tokens - 1)), None)
    grid = (side, side) if side else (1, tokens)
    modality = "video" if frames > 1 else "image"
    geometry = Geometry(layers, tokens * frames, grid, True, units=frames, modality=modality)
    plan = make(method, budget=budget, ratio=ratio).resolve(geometry)
    tokens *= frames
    dims = DecoderDims(hidden, intermediate, heads, kv_heads, hidden // heads)
    reduced = [text_tokens + n for n in plan.schedule.tokens_per_layer]
    full = [text_tokens + tokens] * layers
    rows = [
        (name, unit, fn(dims, reduced), fn(dims, full))
        for name, fn, unit in (
            ("FLOPs (FastV formula)", fastv_flops, "FLOP"),
            ("FLOPs (exact: GQA, gated MLP, causal)", exact_flops, "FLOP"),
            ("KV cache", lambda d, n: kv_cache_bytes(d, n, bytes_per_element), "B"),
        )
    ]
    return PlanCosts(plan, tokens, frames, text_tokens, rows)
