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
from typing import Callable

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


@dataclass(frozen=True)
class Preset:
    """A family's geometry for ``duet-vlm plan --preset``: its decoder is transformers' default
    config of the family (``text_config()``), so the layer pattern and sizes are the library's own,
    and an image's visual tokens per tile (``tile_tokens``; ``tiles`` tiles plus a thumbnail when
    more than one)."""

    text_config: Callable[[], object]
    tile_tokens: int
    tiles: int = 1
    rope: str = "1d"

    def tokens(self, tiles: int | None) -> int:
        tiles = self.tiles if tiles is None else tiles
        return self.tile_tokens * (tiles + 1 if tiles > 1 else tiles)


def _config(name: str, sub: str | None = None):
    def build():
        import transformers

        config = getattr(transformers, name)()
        return getattr(config, sub) if sub else config

    return build


PRESETS: dict[str, Preset] = {
    # Qwen3.5 (transformers' default Qwen3_5TextConfig: attention in every 4th layer) and its MoE:
    # a 896x896 image, 56x56 patches of 16 px, 28x28 tokens after the 2x2 merger.
    "qwen3.5": Preset(_config("Qwen3_5TextConfig"), 28 * 28, rope="mrope"),
    "qwen3.5-moe": Preset(_config("Qwen3_5MoeTextConfig"), 28 * 28, rope="mrope"),
    # InternVL (transformers' default InternVLConfig decoder): 448 px tiles, 32x32 patches of 14 px,
    # 16x16 tokens after the 0.5 pixel shuffle; 2x2 tiles and a thumbnail by default.
    "internvl": Preset(_config("InternVLConfig", "text_config"), 16 * 16, tiles=4),
    # Gemma 3 (transformers' default Gemma3Config decoder: five sliding layers of every six): an
    # 896x896 image is 256 soft tokens (64x64 SigLIP patches, pooled 4x4); each pan-and-scan crop is
    # another image of 256.
    "gemma3": Preset(_config("Gemma3Config", "text_config"), 16 * 16),
}


def plan_costs(method: str = "duet", budget: int | None = None, ratio: float | None = None, layers: int | None = None,
               tokens: int | None = None, frames: int = 1, text_tokens: int = 60, hidden: int | None = None,
               intermediate: int | None = None, heads: int | None = None, kv_heads: int | None = None,
               bytes_per_element: int = 2, preset: str | None = None, tiles: int | None = None) -> PlanCosts:
    """The plan ``make(method, budget=..., ratio=...)`` solves for an item of ``tokens`` visual tokens
    per frame on a ``layers``-layer decoder (LLaVA-1.5-7B's by default), and its costs. ``preset``
    (one of ``PRESETS``) takes the decoder, its layer kinds and an image's tokens from a family's
    default transformers config instead (``tiles``: InternVL's tiles; ``tokens`` still overrides)."""
    if (budget is None) == (ratio is None):
        raise ValueError("give --budget or --ratio")
    attention_layers, rope, has_cls = None, "1d", True
    if preset is not None:
        if preset not in PRESETS:
            raise ValueError(f"unknown preset {preset!r}; one of {', '.join(PRESETS)}")
        given = [name for name, value in (("layers", layers), ("hidden", hidden), ("intermediate", intermediate),
                                          ("heads", heads), ("kv-heads", kv_heads)) if value is not None]
        if given:
            raise ValueError(f"--preset {preset} sets the decoder; drop --{', --'.join(given)}")
        chosen = PRESETS[preset]
        if tiles is not None and (chosen.tiles == 1 or tiles < 1):
            raise ValueError("--tiles is a positive count of InternVL tiles (--preset internvl)")
        config = chosen.text_config()
        dims = DecoderDims.from_config(config)
        layers = config.num_hidden_layers
        tokens = chosen.tokens(tiles) if tokens is None else tokens
        if "linear_attention" in dims.layer_kinds:
            attention_layers = tuple(i for i, kind in enumerate(dims.layer_kinds) if kind != "linear_attention")
        rope, has_cls = chosen.rope, False
    elif tiles is not None:
        raise ValueError("--tiles is a positive count of InternVL tiles (--preset internvl)")
    layers = 32 if layers is None else layers
    tokens = 576 if tokens is None else tokens
    hidden, intermediate = (4096 if hidden is None else hidden), (11008 if intermediate is None else intermediate)
    heads, kv_heads = (32 if heads is None else heads), (32 if kv_heads is None else kv_heads)
    for name, value, least in (("layers", layers, 2), ("tokens", tokens, 1), ("frames", frames, 1),
                               ("text-tokens", text_tokens, 0), ("heads", heads, 1), ("kv-heads", kv_heads, 1)):
        if value < least:
            raise ValueError(f"--{name} must be at least {least}, got {value}")
    # The patch grid of a unit: N square patches, or N - 1 plus a CLS slot (Video-LLaVA frames).
    side = next((s for s in (math.isqrt(tokens), math.isqrt(tokens - 1)) if s * s in (tokens, tokens - 1)), None)
    grid = (side, side) if side else (1, tokens)
    modality = "video" if frames > 1 else "image"
    geometry = Geometry(layers, tokens * frames, grid, has_cls, units=frames, modality=modality, rope=rope,
                        attention_layers=attention_layers)
    plan = make(method, budget=budget, ratio=ratio).resolve(geometry)
    tokens *= frames
    if preset is None:
        dims = DecoderDims(hidden, intermediate, heads, kv_heads, hidden // heads)
    reduced = [text_tokens + n for n in plan.schedule.tokens_per_layer]
    full = [text_tokens + tokens] * layers
    # Each frame's (or image's) block of visual tokens, per layer: what Gemma's bidirectional blocks read.
    blocks = [[n // frames] * frames for n in plan.schedule.tokens_per_layer]
    full_blocks = [[tokens // frames] * frames] * layers
    exact = lambda n, b: exact_flops(dims, n, b)  # noqa: E731
    cache = lambda n, b: kv_cache_bytes(dims, n, bytes_per_element)  # noqa: E731
    measures = [
        ("FLOPs (FastV formula)", lambda n, b: fastv_flops(dims, n), "FLOP"),
        ("FLOPs (exact: GQA, gated MLP, causal)", exact, "FLOP"),
        ("KV cache", cache, "B"),
    ]
    if "linear_attention" in dims.layer_kinds:  # the formula assumes attention everywhere; states do not shrink
        measures = [
            ("FLOPs (exact: attention and linear-attention layers)", exact, "FLOP"),
            ("KV cache + linear-attention states", cache, "B"),
        ]
    elif dims.window is not None:  # sliding layers: windowed attention, a cache of the last W - 1
        what = "sliding windows, image blocks" if dims.image_blocks else "sliding windows"
        measures = [(f"FLOPs (exact: {what})", exact, "FLOP"), ("KV cache (sliding layers: last W - 1)", cache, "B")]
    rows = [(name, unit, fn(reduced, blocks), fn(full, full_blocks)) for name, fn, unit in measures]
    return PlanCosts(plan, tokens, frames, text_tokens, rows)
