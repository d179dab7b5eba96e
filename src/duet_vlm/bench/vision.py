"""The vision-side cost of Stage A on Qwen2.5-VL: the tower alone, and the tower plus the scores and
keys Stage A needs (attention received in the last full-attention block, computed from that block's
own projections in query chunks), timed side by side in one run.

The tower is Qwen2.5-VL-7B's vision transformer at its real width (1280, 16 heads, MLP 3420, windows
of 112 px, a full-attention block every 8) with fewer blocks, so that it runs on a CPU; the report
gives the measured times and Stage A's cost per tower block, from which its share of the real
32-block tower follows (Stage A's cost does not depend on the depth).
"""

from __future__ import annotations

import statistics

import torch

from ..adapters.qwen_vl import received_attention_and_keys
from .timing import interleaved

QWEN25_7B_VISION = dict(
    hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=3584, window_size=112, patch_size=14,
    spatial_merge_size=2, temporal_patch_size=2,
)


def qwen25_tower(depth: int = 8, seed: int = 0):
    """Qwen2.5-VL-7B's vision tower with ``depth`` blocks (the last one full-attention)."""
    from transformers import Qwen2_5_VLConfig
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel

    config = Qwen2_5_VLConfig(vision_config=dict(QWEN25_7B_VISION, depth=depth, fullatt_block_indexes=[depth - 1]))
    torch.manual_seed(seed)
    tower = Qwen2_5_VisionTransformerPretrainedModel._from_config(config.vision_config, attn_implementation="sdpa")
    return tower.eval()


def stage_a_cost(depth: int = 8, grid: tuple[int, int] = (32, 32), rounds: int = 5, progress=None) -> dict:
    """Median seconds of the tower, and of Stage A's scores and keys on its captured block input, for
    one image of ``grid`` patches (``(32, 32)``: a 448x448 image, 256 merged tokens), interleaved."""
    tower = qwen25_tower(depth)
    rows, cols = grid
    pixels = torch.randn(rows * cols, 3 * 14 * 14 * 2)
    grid_thw = torch.tensor([[1, rows, cols]])
    block = tower.blocks[depth - 1]
    captured = {}
    block.register_forward_pre_hook(lambda m, a, k: captured.update(x=a[0], **k), with_kwargs=True)

    def tower_only():
        with torch.inference_mode():
            tower(pixels, grid_thw=grid_thw)

    def stage_a_scores():  # on the block input the last tower call captured
        with torch.inference_mode():
            received_attention_and_keys(block, captured["x"], captured["cu_seqlens"], captured["position_embeddings"])

    tower_only()
    # Timed separately but interleaved: the difference of two noisy totals would drown a small cost.
    times = interleaved({"tower": tower_only, "Stage A scores": stage_a_scores}, rounds, progress=progress)
    tower_s = statistics.median(times["tower"])
    extra = statistics.median(times["Stage A scores"])
    per_block = tower_s / depth
    return {
        "tower": {**QWEN25_7B_VISION, "depth": depth},
        "image_patches": rows * cols,
        "merged_tokens": rows * cols // 4,
        "rounds": rounds,
        "threads": torch.get_num_threads(),
        "tower_s": tower_s,
        "stage_a_s": extra,
        "ratio": (tower_s + extra) / tower_s,
        "stage_a_in_tower_blocks": extra / per_block,
        "share_of_32_block_tower": extra / (per_block * 32),
        "spread": {name: [min(v), max(v)] for name, v in times.items()},
    }
