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

from . import compat
from .flops import DecoderDims, encoder_flops, exact_flops, fastv_flops, kv_cache_bytes
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
    # Gemma 4 (transformers' default Gemma4Config decoder): at the processor's default max_soft_tokens
    # (280) a square image is 16x16 soft tokens; --soft-tokens picks another rung of the ladder.
    "gemma4": Preset(_config("Gemma4Config", "text_config"), 16 * 16),
}

#: Gemma 4's soft-token ladder: the ``max_soft_tokens`` settings its processor accepts.
GEMMA4_LADDER = (70, 140, 280, 560, 1120)
GEMMA4_KERNEL = 3  # pooling_kernel_size: one soft token pools 3x3 patches


def ladder_grid(max_soft_tokens: int, aspect: float = 1.0) -> tuple[int, int]:
    """``(rows, cols)`` of soft tokens Gemma 4's processor gives an image of ``aspect`` (width /
    height) at ``max_soft_tokens``: it resizes the image, keeping its aspect, to the largest sides
    that are whole pooling cells and hold at most that many cells (at least one cell a side).

    >>> [ladder_grid(n) for n in GEMMA4_LADDER]
    [(8, 8), (11, 11), (16, 16), (23, 23), (33, 33)]
    >>> ladder_grid(280, aspect=2.0)
    (11, 23)
    """
    if max_soft_tokens not in GEMMA4_LADDER:
        raise ValueError(f"--soft-tokens must be one of Gemma 4's {', '.join(map(str, GEMMA4_LADDER))}, got {max_soft_tokens}")
    if not aspect > 0:
        raise ValueError(f"--aspect is width / height, a positive number; got {aspect}")
    rows = max(1, math.floor(math.sqrt(max_soft_tokens / aspect) + 1e-9))
    cols = max(1, math.floor(math.sqrt(max_soft_tokens * aspect) + 1e-9))
    return rows, min(cols, max_soft_tokens // rows)


@dataclass
class LadderRung:
    """One rung of Gemma 4's ladder under a budget: the image's soft tokens there, the plan solved
    for them (``None``: the budget reaches all of them, nothing is reduced), and the prefill's
    costs: the vision tower on the patches the processor pads every image to, and the decoder."""

    max_soft_tokens: int
    tokens: int
    plan: Plan | None
    encoder_flops: int
    decoder_flops: int
    kv_bytes: int
    unreachable: str | None = None  # why the method cannot meet the budget on this rung's tokens

    @property
    def total_flops(self) -> int:
        return self.encoder_flops + self.decoder_flops


def ladder_costs(method: str, budget: int, text_tokens: int = 60, aspect: float = 1.0,
                 bytes_per_element: int = 2) -> tuple[list[LadderRung], LadderRung]:
    """Every rung of Gemma 4's ladder (transformers' default Gemma 4 decoder and tower) for an image
    of ``aspect`` reduced by ``method`` to ``budget`` visual tokens per layer, and the rung chosen:
    of the rungs whose image has at least ``budget`` soft tokens, the one whose prefill (tower and
    decoder) costs the fewest FLOPs. Both grow with the rung at a fixed budget (the tower runs on
    ``max_soft_tokens x 9`` patch slots, padded, whatever the image), so it is the smallest rung
    that reaches the budget (and where ``method`` can meet it): reduce a larger image only when the
    budget asks for more tokens than a smaller rung gives. A budget above every rung's tokens gets
    the largest rung, unreduced."""
    import transformers

    text, vision = transformers.Gemma4Config().text_config, transformers.Gemma4VisionConfig()
    dims = DecoderDims.from_config(text)
    layers = text.num_hidden_layers
    rungs = []
    for rung in GEMMA4_LADDER:
        rows, cols = ladder_grid(rung, aspect)
        tokens = rows * cols
        plan, unreachable = None, None
        reduced = [text_tokens + tokens] * layers
        if budget < tokens:
            geometry = Geometry(layers, tokens, (rows, cols), False, last_boundary=_last_boundary(text))
            try:
                plan = make(method, budget=budget).resolve(geometry)
                reduced = [text_tokens + n for n in plan.schedule.tokens_per_layer]
            except ValueError as error:
                unreachable = str(error)
        blocks = [[n - text_tokens] for n in reduced]
        encoder = encoder_flops(vision.hidden_size, vision.intermediate_size, vision.num_attention_heads,
                                vision.head_dim, vision.num_hidden_layers, rung * GEMMA4_KERNEL ** 2,
                                vision.num_key_value_heads)
        rungs.append(LadderRung(rung, tokens, plan, encoder, exact_flops(dims, reduced, blocks),
                                kv_cache_bytes(dims, reduced, bytes_per_element), unreachable))
    reaching = [r for r in rungs if r.tokens >= budget and r.unreachable is None]
    chosen = min(reaching, key=lambda r: r.total_flops) if reaching else rungs[-1]
    return rungs, chosen


def _last_boundary(text_config) -> int | None:
    """The deepest boundary a Gemma 4 decoder allows: the first layer that stores keys and values
    for KV sharing (``None``: no sharing)."""
    modes = compat.kv_sharing_modes(text_config)
    stores = [i for i, mode in enumerate(modes) if mode == "store"]
    return min(stores) if stores and "reuse" in modes else None


def plan_costs(method: str = "duet", budget: int | None = None, ratio: float | None = None, layers: int | None = None,
               tokens: int | None = None, frames: int = 1, text_tokens: int = 60, hidden: int | None = None,
               intermediate: int | None = None, heads: int | None = None, kv_heads: int | None = None,
               bytes_per_element: int = 2, preset: str | None = None, tiles: int | None = None,
               soft_tokens: int | None = None, options: dict | None = None) -> PlanCosts:
    """The plan ``make(method, budget=..., ratio=...)`` solves for an item of ``tokens`` visual tokens
    per frame on a ``layers``-layer decoder (LLaVA-1.5-7B's by default), and its costs. ``preset``
    (one of ``PRESETS``) takes the decoder, its layer kinds and an image's tokens from a family's
    default transformers config instead (``tiles``: InternVL's tiles; ``soft_tokens``: the rung of
    Gemma 4's ladder, a square image; ``tokens`` still overrides). ``options``: the method's own
    (``make``'s keywords); where they fix the schedule (V2Drop's ``ratios``), no budget is needed."""
    if budget is not None and ratio is not None or budget is None and ratio is None and not options:
        raise ValueError("give --budget or --ratio (or only the method's options, where they fix its schedule)")
    attention_layers, rope, has_cls, last_boundary = None, "1d", True, None
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
        if soft_tokens is not None:
            if preset != "gemma4":
                raise ValueError("--soft-tokens is a rung of Gemma 4's ladder (--preset gemma4)")
            rows, cols = ladder_grid(soft_tokens)
            tokens = rows * cols if tokens is None else tokens
        tokens = chosen.tokens(tiles) if tokens is None else tokens
        last_boundary = _last_boundary(config)
        if "linear_attention" in dims.layer_kinds:
            attention_layers = tuple(i for i, kind in enumerate(dims.layer_kinds) if kind != "linear_attention")
        rope, has_cls = chosen.rope, False
    elif tiles is not None:
        raise ValueError("--tiles is a positive count of InternVL tiles (--preset internvl)")
    elif soft_tokens is not None:
        raise ValueError("--soft-tokens is a rung of Gemma 4's ladder (--preset gemma4)")
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
                        attention_layers=attention_layers, last_boundary=last_boundary)
    plan = make(method, budget=budget, ratio=ratio, **(options or {})).resolve(geometry)
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
