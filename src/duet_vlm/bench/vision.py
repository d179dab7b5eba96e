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


def document_page(rows: int, cols: int, seed: int = 0) -> torch.Tensor:
    """A synthetic document page of ``rows x cols`` patches (14 px), ``(3, H, W)`` in ``[0, 1]``: a
    white page with a title bar, lines of dark strokes and a grey figure, what PixelPrune is for (the
    paper's documents and screenshots)."""
    generator = torch.Generator().manual_seed(seed)
    height, width = rows * 14, cols * 14
    page = torch.ones(3, height, width)
    page[:, : height // 12, :] = torch.tensor([0.15, 0.25, 0.5])[:, None, None]  # title bar
    top = height // 8
    while top + 10 < height * 3 // 5:  # lines of text: dark strokes of random length
        length = int(width * (0.5 + 0.4 * torch.rand(1, generator=generator)))
        strokes = (torch.rand(8, length - 28, generator=generator) < 0.45).float()
        page[:, top : top + 8, 14 : length - 14] = 1 - 0.85 * strokes
        top += 22
    page[:, height * 2 // 3 : height * 9 // 10, width // 6 : width * 2 // 3] = 0.6  # a figure
    return (page * 255).round() / 255


def document_pixels(rows: int, cols: int, seed: int = 0) -> torch.Tensor:
    """``document_page`` as Qwen2.5-VL's processor hands it to the tower: ``(rows * cols, 3 * 2 * 14 *
    14)``, both temporal frames of each patch, 2x2 groups consecutive, normalised with OpenAI CLIP's
    mean and std."""
    from ..adapters.qwen_vl import Qwen2_5_VLAdapter

    page = document_page(rows, cols, seed)
    mean = torch.tensor(Qwen2_5_VLAdapter.pixel_mean)[:, None, None]
    std = torch.tensor(Qwen2_5_VLAdapter.pixel_std)[:, None, None]
    page = (page - mean) / std
    patches = page.view(3, rows // 2, 2, 14, cols // 2, 2, 14).permute(1, 4, 2, 5, 0, 3, 6)  # R, C, 2, 2, c, p, p
    patches = patches.reshape(rows * cols, 3, 1, 14, 14).expand(-1, -1, 2, -1, -1)
    return patches.reshape(rows * cols, -1).contiguous()


def qwen25_encoder_model(depth: int = 8, seed: int = 0):
    """Qwen2.5-VL with Qwen2.5-VL-7B's vision tower (``depth`` blocks, the last full-attention, its
    merger into 3,584 wide) and a one-layer language model: enough for a reducer to attach, and the
    tower is what is timed."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    text = dict(hidden_size=QWEN25_7B_VISION["out_hidden_size"], intermediate_size=64, num_hidden_layers=1,
                num_attention_heads=28, num_key_value_heads=4, vocab_size=1000, bos_token_id=1, eos_token_id=2,
                rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]})
    config = Qwen2_5_VLConfig(
        text_config=text, vision_config=dict(QWEN25_7B_VISION, depth=depth, fullatt_block_indexes=[depth - 1]),
        image_token_id=900, video_token_id=901, vision_start_token_id=902, vision_end_token_id=903,
    )
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration._from_config(config, attn_implementation="sdpa")
    return model.eval()


def encoder_block_flops(tower, window_lengths: list[int], full_lengths: list[int]) -> int:
    """Multiply-adds x 2 of the tower's blocks on sequences of these segment lengths (in patches):
    the projections and MLP per patch, and the attention scores and weighted sums over each window
    (window blocks) or image (full-attention blocks)."""
    config = tower.config
    d, mlp = config.hidden_size, config.intermediate_size
    tokens = sum(full_lengths)
    per_token = 2 * (4 * d * d + 3 * d * mlp)  # qkv and output projections; gate, up and down
    total = 0
    for index in range(config.depth):
        lengths = full_lengths if index in tower.fullatt_block_indexes else window_lengths
        total += tokens * per_token + 4 * d * sum(n * n for n in lengths)
    return total


def pixelprune_encoder_cost(depth: int = 8, grid: tuple[int, int] = (32, 32), rounds: int = 3, progress=None) -> dict:
    """PixelPrune's saving in the vision encoder, timed side by side in interleaved rounds on a
    Qwen2.5-VL-7B-width tower: the tower on every patch, the tower under ``make("pixelprune")`` (the
    selection, the tower on the kept patches, the outputs put back), the ideal (the unpatched tower
    handed only the kept patches and their arguments, nothing chosen or put back) and the selection
    alone, on one synthetic document page of ``grid`` patches; with the blocks' exact FLOPs, and
    whether the reduced tower's kept features equal the ideal's."""
    from .. import make
    from ..adapters import adapter_for
    from .timing import interleaved

    model = qwen25_encoder_model(depth)
    rows, cols = grid
    pixels = document_pixels(rows, cols)
    grid_thw = torch.tensor([[1, rows, cols]])
    adapter = adapter_for(model)
    reducer = make("pixelprune")
    stage = reducer.input_stage()
    _, subset, entered = adapter.enter_patch_subset(stage, (pixels,), {"grid_thw": grid_thw})
    kept_patches = entered.repeat_interleave(4)
    features = model.model.get_image_features

    def whole():
        with torch.inference_mode():
            return features(pixels, grid_thw).pooler_output[0]

    def pixelprune():
        with torch.inference_mode(), reducer(model):
            return features(pixels, grid_thw).pooler_output[0]

    def ideal():
        with torch.inference_mode():
            return model.model.visual(pixels[kept_patches], **dict(subset)).pooler_output

    def selection():  # reading the pixels back and predicting them
        with torch.inference_mode():
            stage.select(adapter.unit_pixels(pixels, grid_thw)[0][0])

    reduced, wanted = pixelprune(), ideal()
    same = bool(torch.equal(reduced[entered], wanted)) and not bool(reduced[~entered].any())
    times = interleaved({"tower": whole, "pixelprune": pixelprune, "ideal": ideal, "selection": selection}, rounds,
                        progress=progress)
    cu_window = adapter.windows(grid_thw)[1]
    full_windows = (cu_window[1:] - cu_window[:-1]).tolist()
    kept_windows = (subset["cu_window_seqlens"][1:] - subset["cu_window_seqlens"][:-1]).tolist()
    flops_full = encoder_block_flops(model.model.visual, full_windows, [rows * cols])
    flops_kept = encoder_block_flops(model.model.visual, kept_windows, [int(kept_patches.sum())])
    head = {"tower": {**QWEN25_7B_VISION, "depth": depth}, "image": "synthetic document page (document_pixels)",
            "image_patches": rows * cols, "merged_tokens": rows * cols // 4, "kept_tokens": int(entered.sum())}
    return _cost_record(head, rounds, times, (flops_full, flops_kept), same)


def _cost_record(head: dict, rounds: int, times: dict, flops: tuple[int, int], same: bool) -> dict:
    """An encoder-cost run as the bench writes it: ``head`` (the tower, the image, the counts), the
    rounds' median seconds and their ratios, the blocks' FLOPs (every patch, kept) and whether the
    kept features equal the ideal's."""
    median = {name: statistics.median(values) for name, values in times.items()}
    full, kept = flops
    return {
        **head,
        "rounds": rounds,
        "threads": torch.get_num_threads(),
        "seconds": median,
        "pixelprune_vs_tower": median["pixelprune"] / median["tower"],
        "pixelprune_vs_ideal": median["pixelprune"] / median["ideal"],
        "selection_share": median["selection"] / median["pixelprune"],
        "block_flops": {"tower": full, "kept": kept, "ratio": kept / full},
        "kept_features_equal_ideal": same,
        "spread": {name: [min(v), max(v)] for name, v in times.items()},
    }


CLIP_L_336 = dict(hidden_size=1024, intermediate_size=4096, num_attention_heads=16, image_size=336, patch_size=14,
                  projection_dim=768, hidden_act="quick_gelu")


def llava_encoder_model(depth: int = 8, seed: int = 0):
    """LLaVA-1.5 with CLIP-L/14-336 (LLaVA-1.5-7B's tower at its real width, ``depth`` layers), its
    projector into 4,096 wide and a one-layer language model: enough for a reducer to attach."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    text = LlamaConfig(hidden_size=4096, intermediate_size=64, num_hidden_layers=1, num_attention_heads=32,
                       num_key_value_heads=32, vocab_size=1000, bos_token_id=1, eos_token_id=2)
    config = LlavaConfig(vision_config=CLIPVisionConfig(**CLIP_L_336, num_hidden_layers=depth), text_config=text,
                         image_token_id=900, vision_feature_layer=-2, vision_feature_select_strategy="default",
                         image_seq_length=576)
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration._from_config(config, attn_implementation="sdpa")
    return model.eval()


def clip_layer_flops(config, tokens: int) -> int:
    """Multiply-adds x 2 of the CLIP tower's layers on one image of ``tokens`` rows (CLS included):
    projections and MLP per row, attention scores and weighted sums over all rows."""
    d, mlp = config.hidden_size, config.intermediate_size
    return config.num_hidden_layers * (tokens * 2 * (4 * d * d + 2 * d * mlp) + 4 * d * tokens * tokens)


def clip_pixelprune_encoder_cost(depth: int = 8, image: str = "document", rounds: int = 3, progress=None,
                                 **options) -> dict:
    """``pixelprune_encoder_cost`` on LLaVA-1.5's CLIP-L/14-336 tower (``depth`` layers): the tower
    and projector on every patch (``get_image_features``), the same call under ``make("pixelprune",
    **options)``, the ideal (the tower's own layers fed the embeddings' CLS and kept rows, the
    projector on the kept rows, nothing chosen or put back) and the selection alone; on a synthetic
    document page (``image="document"``) or a scene of the demo benchmark's test split
    (``"scene"``: noisy backgrounds, where only a threshold above 0 leaves patches out)."""
    from .. import make, synthetic
    from ..adapters import adapter_for
    from ..adapters.llava import CLIP_MEAN, CLIP_STD
    from .timing import interleaved

    model = llava_encoder_model(depth)
    if image == "document":
        page = document_page(24, 24)
    elif image == "scene":
        scene = synthetic.sample("test", 0).image.convert("RGB")
        page = torch.frombuffer(bytearray(scene.tobytes()), dtype=torch.uint8).view(336, 336, 3).permute(2, 0, 1) / 255
    else:
        raise ValueError(f"image must be document or scene, got {image!r}")
    pixels = ((page - torch.tensor(CLIP_MEAN)[:, None, None]) / torch.tensor(CLIP_STD)[:, None, None])[None]
    adapter = adapter_for(model)
    reducer = make("pixelprune", **options)
    stage = reducer.input_stage()
    entered = adapter.enter_patch_subset(stage, (pixels,), {})[2]
    rows = torch.cat([torch.zeros(1, dtype=torch.long), entered.nonzero()[:, 0] + 1])  # CLS, then the kept patches
    tower, features = model.model.vision_tower, model.model.get_image_features
    select = dict(vision_feature_layer=-2, vision_feature_select_strategy="default")

    def whole():
        with torch.inference_mode():
            return features(pixels, **select).pooler_output[0]

    def pixelprune():
        with torch.inference_mode(), reducer(model):
            return features(pixels, **select).pooler_output[0]

    def ideal():
        with torch.inference_mode():
            x = tower.pre_layrnorm(tower.embeddings(pixels)[:, rows])
            for layer in tower.encoder.layers[:-1]:  # hidden_states[-2]: the last layer's output is not read
                x = layer(x, None)
            tower.encoder.layers[-1](x, None)  # it still runs, as in the tower
            return model.model.multi_modal_projector(x[0, 1:])

    def selection():  # reading the pixels back and predicting them
        with torch.inference_mode():
            stage.select(adapter.unit_pixels(pixels)[0])

    reduced, wanted = pixelprune(), ideal()
    same = bool(torch.equal(reduced[entered], wanted)) and not bool(reduced[~entered].any())
    times = interleaved({"tower": whole, "pixelprune": pixelprune, "ideal": ideal, "selection": selection}, rounds,
                        progress=progress)
    flops = (clip_layer_flops(tower.config, 577), clip_layer_flops(tower.config, len(rows)))
    head = {"tower": {**CLIP_L_336, "depth": depth, "family": "llava"},
            "image": "synthetic document page (document_page)" if image == "document" else "demo test scene 0",
            "options": options, "image_patches": 576, "merged_tokens": 576, "kept_tokens": int(entered.sum())}
    return _cost_record(head, rounds, times, flops, same)


def main(argv: list[str] | None = None) -> int:
    """``python -m duet_vlm.bench.vision --output FILE [--depth 8] [--grids 32x32 48x48] [--rounds 3]``:
    PixelPrune's encoder cost on document pages of each grid (``pixelprune_encoder_cost``), written
    with the command that made it. ``--family llava``: on LLaVA-1.5's CLIP tower instead
    (``clip_pixelprune_encoder_cost``), a document page at threshold 0 and a demo scene at
    ``mae`` 0.05 (the demo evaluation's lowest row)."""
    import argparse
    import json
    import sys
    from pathlib import Path

    parser = argparse.ArgumentParser(prog="python -m duet_vlm.bench.vision", description=main.__doc__)
    parser.add_argument("--output", type=Path, required=True)
    parser.add_argument("--depth", type=int, default=8)
    parser.add_argument("--grids", nargs="+", default=["32x32", "48x48"], help="patch grids, ROWSxCOLS (even)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--family", choices=["qwen2_5_vl", "llava"], default="qwen2_5_vl")
    args = parser.parse_args(argv)
    grids = [tuple(int(n) for n in grid.split("x")) for grid in args.grids]
    runs = []
    cases = ([lambda grid=grid: pixelprune_encoder_cost(args.depth, grid, args.rounds) for grid in grids]
             if args.family == "qwen2_5_vl" else
             [lambda: clip_pixelprune_encoder_cost(args.depth, "document", args.rounds),
              lambda: clip_pixelprune_encoder_cost(args.depth, "scene", args.rounds, metric="mae", threshold=0.05)])
    for case in cases:
        runs.append(case())
        print(f"{runs[-1]['image']}: {runs[-1]['kept_tokens']}/{runs[-1]['merged_tokens']} tokens, "
              f"{runs[-1]['pixelprune_vs_tower']:.3f} of the tower's time", file=sys.stderr)
    command = "python -m duet_vlm.bench.vision " + " ".join(argv if argv is not None else sys.argv[1:])
    args.output.write_text(json.dumps({"command": command, "torch": torch.__version__, "runs": runs}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
