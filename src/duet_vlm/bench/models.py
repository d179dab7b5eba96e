"""The one model builder of every benchmark: random-weight models of LLaVA-1.5's geometry (a
CLIP-L/14 tower, a 32-layer Llama decoder of configurable width) and their prompts; and, for
``build_family``, the other families' towers and decoders (Qwen3.5: a Qwen3-VL tower and a hybrid
linear-attention decoder; InternVL3: an InternViT tower and a Qwen2 decoder; Gemma 3: a SigLIP
tower and a decoder of sliding and global layers) at the same sizes.

Random weights are enough for timing: cost does not depend on the values.

>>> model = build_model(ModelSize(hidden=256, intermediate=704))              # doctest: +SKIP
>>> model(**example_inputs(model), logits_to_keep=1)                          # doctest: +SKIP
>>> model, inputs = build_family("video_llava", ModelSize())                  # doctest: +SKIP
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

#: The families ``build_family`` builds, each with its typical prompt.
FAMILIES = ("llava", "llava_next", "video_llava", "qwen2_5_vl", "qwen3_5", "internvl", "gemma3", "gemma4")


@dataclass(frozen=True)
class ModelSize:
    """A LLaVA-1.5-shaped model (CLIP-L/14-336 tower, 32-layer decoder) with a configurable decoder width.

    The other families of ``build_family`` read the same fields: their tower's width, depth and heads
    (``vision_*``), their decoder's (``hidden`` ... ``intermediate``; heads of ``hidden / heads``)."""

    vision_hidden: int = 1024
    vision_layers: int = 24
    vision_heads: int = 16
    hidden: int = 1024
    layers: int = 32
    heads: int = 16
    kv_heads: int = 16
    intermediate: int = 2816
    vocab: int = 32064  # the decoder's vocabulary (its LM head's rows)


def _tower(size: ModelSize, image_size: int) -> CLIPVisionConfig:
    return CLIPVisionConfig(
        hidden_size=size.vision_hidden, intermediate_size=4 * size.vision_hidden, num_hidden_layers=size.vision_layers,
        num_attention_heads=size.vision_heads, image_size=image_size, patch_size=14, projection_dim=768,
    )


def _decoder(size: ModelSize, max_positions: int) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=size.vocab, hidden_size=size.hidden, intermediate_size=size.intermediate, num_hidden_layers=size.layers,
        num_attention_heads=size.heads, num_key_value_heads=size.kv_heads, max_position_embeddings=max_positions,
    )


def build_model(size: ModelSize, attn: str = "sdpa", seed: int = 0, device: str | None = None,
                dtype: torch.dtype | None = None) -> LlavaForConditionalGeneration:
    """LLaVA-1.5 (336 px, 576 visual tokens) of ``size``, seeded (built on ``device`` in ``dtype``: ``seeded``)."""
    config = LlavaConfig(
        vision_config=_tower(size, 336),
        text_config=_decoder(size, 4096),
        image_token_id=32000,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        image_seq_length=576,
    )
    return seeded(LlavaForConditionalGeneration, config, seed, attn, device, dtype)


def seeded(model_class, config, seed: int, attn: str = "sdpa", device: str | None = None, dtype: torch.dtype | None = None):
    """``model_class(config)`` with random weights drawn after ``torch.manual_seed(seed)``, in eval
    mode, on the ``attn`` attention backend. With ``device`` and ``dtype`` the weights are made
    there, in that dtype (a 7B model is initialised on the GPU, not on the CPU and then copied)."""
    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    if dtype is not None:
        torch.set_default_dtype(dtype)
    try:
        with torch.device(device or "cpu"):
            model = model_class(config).eval()
    finally:
        torch.set_default_dtype(previous)
    model.set_attn_implementation(attn)
    return model


def example_inputs(model, batch: int = 1, text_tokens: int = 60, seed: int = 0) -> dict[str, torch.Tensor]:
    """``batch`` rows of one 336 px image between 5 and ``text_tokens - 5`` random text tokens."""
    generator = torch.Generator().manual_seed(seed)
    prefix, suffix = 5, text_tokens - 5
    ids = torch.cat(
        [
            torch.randint(3, 32000, (batch, prefix), generator=generator),
            torch.full((batch, 576), model.config.image_token_id),
            torch.randint(3, 32000, (batch, suffix), generator=generator),
        ],
        dim=1,
    )
    pixels = torch.randn(batch, 3, 336, 336, generator=generator)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values": pixels}


def padded_inputs(model, batch: int, text_tokens: int = 60, seed: int = 0) -> dict[str, torch.Tensor]:
    """``batch`` rows of one image each whose prompts differ in length, left-padded as for ``generate``:
    text lengths spread evenly over ``text_tokens`` ± 50% (their mean is ``text_tokens``)."""
    if batch == 1:
        return example_inputs(model, 1, text_tokens, seed)
    lengths = torch.linspace(text_tokens * 0.5, text_tokens * 1.5, batch).round().long().tolist()
    rows = [example_inputs(model, 1, length, seed + b)["input_ids"][0] for b, length in enumerate(lengths)]
    width = max(len(r) for r in rows)
    ids = torch.zeros(batch, width, dtype=torch.long)
    mask = torch.zeros(batch, width, dtype=torch.long)
    for b, row in enumerate(rows):
        ids[b, width - len(row) :] = row
        mask[b, width - len(row) :] = 1
    pixels = torch.randn(batch, 3, 336, 336, generator=torch.Generator().manual_seed(seed))
    return {"input_ids": ids, "attention_mask": mask, "pixel_values": pixels}


def build_family(family: str, size: ModelSize, seed: int = 0, device: str | None = None, dtype: torch.dtype | None = None,
                 grids: tuple[tuple[int, int, int], ...] | None = None):
    """A random-weight model of ``family`` with ``size``'s tower and decoder, and one prompt of its
    typical geometry (5 text tokens, the visual slots, 55 text tokens): LLaVA-1.5 (336 px, 576
    tokens), LLaVA-NeXT (a 672x672 image: 5 tiles, 2,928 tokens with newlines), Video-LLaVA (8
    frames at 224 px, 2,056 tokens), each with a CLIP-L/14 tower; Qwen3.5 (``_qwen3_5``: a 672x672
    image, 441 tokens), InternVL3 (``_internvl``: 2x2 tiles and a thumbnail, 1,280 tokens), Gemma 3
    (``_gemma3``: one image of 256 soft tokens) or Gemma 4 (``_gemma4``: a 768x768 image at 280 soft
    tokens, 16x16 = 256), or Qwen2.5-VL (``_qwen2_5_vl``: ``grids``, one image per grid of patches).
    The weights are made on ``device`` in ``dtype`` (``seeded``); the inputs on the CPU."""
    from transformers import (
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
        VideoLlavaConfig,
        VideoLlavaForConditionalGeneration,
    )

    place = dict(device=device, dtype=dtype)
    if family == "llava":
        model = build_model(size, seed=seed, **place)
        return model, example_inputs(model)
    if family == "qwen2_5_vl":
        return _qwen2_5_vl(size, seed, grids or QWEN2_5_VL_GRIDS, place)
    if family == "qwen3_5":
        return _qwen3_5(size, seed, place)
    if family == "internvl":
        return _internvl(size, seed, place)
    if family == "gemma3":
        return _gemma3(size, seed, place)
    if family == "gemma4":
        return _gemma4(size, seed, place)
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; one of {', '.join(FAMILIES)}")
    vision = _tower(size, 336 if family == "llava_next" else 224)
    text = _decoder(size, 8192)
    generator = torch.Generator().manual_seed(seed)
    if family == "llava_next":
        pinpoints = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
        config = LlavaNextConfig(vision_config=vision, text_config=text, image_token_id=32000, image_grid_pinpoints=pinpoints,
                                 vision_feature_layer=-2, vision_feature_select_strategy="default")
        model = seeded(LlavaNextForConditionalGeneration, config, seed, **place)
        slots, token = 576 + 48 * 49, config.image_token_id
        visual = {"pixel_values": torch.randn(1, 5, 3, 336, 336, generator=generator), "image_sizes": torch.tensor([[672, 672]])}
    else:
        config = VideoLlavaConfig(vision_config=vision, text_config=text, image_token_id=32000, video_token_id=32001,
                                  vision_feature_layer=-2, vision_feature_select_strategy="default")
        model = seeded(VideoLlavaForConditionalGeneration, config, seed, **place)
        slots, token = 8 * 257, config.video_token_id
        visual = {"pixel_values_videos": torch.randn(1, 8, 3, 224, 224, generator=generator)}
    ids = torch.cat([torch.randint(3, 32000, (1, 5), generator=generator), torch.full((1, slots), token),
                     torch.randint(3, 32000, (1, 55), generator=generator)], dim=1)
    return model, {"input_ids": ids, "attention_mask": torch.ones_like(ids), **visual}


def _prompt(generator: torch.Generator, visual: list[int], prefix: int = 5, suffix: int = 55) -> torch.Tensor:
    """``(1, L)``: ``prefix`` random text tokens, the ``visual`` ids, ``suffix`` random text tokens."""
    return torch.cat([torch.randint(3, 32000, (1, prefix), generator=generator), torch.tensor([visual]),
                      torch.randint(3, 32000, (1, suffix), generator=generator)], dim=1)


#: Qwen2.5-VL-7B's vision tower (``size.vision_layers`` blocks of it; full attention in every eighth).
QWEN2_5_VL_TOWER = dict(hidden_size=1280, intermediate_size=3420, num_heads=16, window_size=112, patch_size=14,
                        spatial_merge_size=2, temporal_patch_size=2)
#: Qwen2.5-VL's default prompt: one image of 56x72 patches of 14 px (784x1008 px), 1,008 tokens after the 2x2 merger.
QWEN2_5_VL_GRIDS = ((1, 56, 72),)


def _qwen2_5_vl(size: ModelSize, seed: int, grids: tuple[tuple[int, int, int], ...], place: dict | None = None):
    """Qwen2.5-VL (``Qwen2_5_VLForConditionalGeneration``): its windowed tower (``QWEN2_5_VL_TOWER``
    at ``size.vision_layers`` blocks, the last of every eight attending over the whole image; the
    7B's width unless ``size.vision_hidden`` is smaller, as in tests), the merger into the decoder's
    width, and a Qwen2 decoder of ``size`` with M-RoPE. The prompt: one image per grid ``(t, h, w)``
    of 14 px patches (``h * w / 4`` tokens each), each between ``<vision_start>`` and
    ``<vision_end>``, after 5 text tokens and before 55."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    half = size.hidden // size.heads // 2  # rotary frequencies: (time, height, width) as released, [16, 24, 24] of 64
    sections = [half // 4, 3 * half // 8, half - half // 4 - 3 * half // 8]
    text = dict(vocab_size=size.vocab, hidden_size=size.hidden, intermediate_size=size.intermediate,
                num_hidden_layers=size.layers, num_attention_heads=size.heads, num_key_value_heads=size.kv_heads,
                max_position_embeddings=32768, bos_token_id=1, eos_token_id=2, pad_token_id=0,
                rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": sections})
    tower = dict(QWEN2_5_VL_TOWER)
    if size.vision_hidden < tower["hidden_size"]:  # a small tower (tests): the 7B's layout at the given width
        tower.update(hidden_size=size.vision_hidden, intermediate_size=2 * size.vision_hidden, num_heads=size.vision_heads)
    depth = size.vision_layers
    vision = dict(tower, depth=depth, out_hidden_size=size.hidden,
                  fullatt_block_indexes=[i for i in range(depth) if i % 8 == 7] or [depth - 1])
    config = Qwen2_5_VLConfig(text_config=text, vision_config=vision, image_token_id=32000, video_token_id=32001,
                              vision_start_token_id=32002, vision_end_token_id=32003)
    model = seeded(Qwen2_5_VLForConditionalGeneration, config, seed, **(place or {}))
    generator = torch.Generator().manual_seed(seed)
    visual: list[int] = []
    for t, h, w in grids:
        visual += [32002] + [32000] * (t * h * w // 4) + [32003]
    ids = _prompt(generator, visual)
    patches = sum(t * h * w for t, h, w in grids)
    inputs = {
        "input_ids": ids, "attention_mask": torch.ones_like(ids),
        "pixel_values": torch.randn(patches, 3 * 2 * 14 * 14, generator=generator),
        "image_grid_thw": torch.tensor([list(grid) for grid in grids]),
    }
    return model, inputs


#: Qwen3.5's prompt: one 672x672 image, 42x42 patches of 16 px, 21x21 = 441 tokens after the 2x2 merger.
QWEN3_5_IMAGE = (672, 16)


def _mrope_sections(half: int) -> list[int]:
    """M-RoPE's (time, height, width) frequencies over ``half`` rotary frequencies, in the released
    proportions (11, 11, 10 of 32)."""
    width = half * 10 // 32
    height = (half - width) // 2
    return [half - height - width, height, width]


def _qwen3_5(size: ModelSize, seed: int, place: dict | None = None):
    """Qwen3.5 (``Qwen3_5ForConditionalGeneration``): the Qwen3-VL tower (patches of 16 px, 2
    frames per temporal patch, a 2x2 merger, no CLS; ``size.vision_*``) and the hybrid decoder as
    released: ``size.layers`` layers, every 4th full attention (layers 3, 7, 11, ...; gated query,
    a quarter of each head rotated by interleaved M-RoPE), the others Gated-DeltaNet linear attention
    (``size.heads / 2`` key heads and ``size.heads`` value heads of the attention's head width, a
    convolution of 4). The prompt: one 672x672 image (1,764 patches, 441 tokens) between
    ``<vision_start>`` and ``<vision_end>``, with ``mm_token_type_ids`` and its grid."""
    from transformers import Qwen3_5Config, Qwen3_5ForConditionalGeneration

    head = size.hidden // size.heads
    text = dict(
        vocab_size=32064, hidden_size=size.hidden, intermediate_size=size.intermediate, num_hidden_layers=size.layers,
        num_attention_heads=size.heads, num_key_value_heads=size.kv_heads, head_dim=head, max_position_embeddings=8192,
        linear_conv_kernel_dim=4, linear_key_head_dim=head, linear_value_head_dim=head,
        linear_num_key_heads=max(1, size.heads // 2), linear_num_value_heads=size.heads,
        layer_types=["full_attention" if (i + 1) % 4 == 0 else "linear_attention" for i in range(size.layers)],
        rope_parameters={"rope_type": "default", "rope_theta": 10000000.0, "partial_rotary_factor": 0.25,
                         "mrope_interleaved": True, "mrope_section": _mrope_sections(head // 8)},
        pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )
    vision = dict(depth=size.vision_layers, hidden_size=size.vision_hidden, intermediate_size=4 * size.vision_hidden,
                  num_heads=size.vision_heads, patch_size=16, spatial_merge_size=2, temporal_patch_size=2,
                  out_hidden_size=size.hidden, num_position_embeddings=2304)
    config = Qwen3_5Config(text_config=text, vision_config=vision, image_token_id=32000, video_token_id=32001,
                           vision_start_token_id=32002, vision_end_token_id=32003)
    model = seeded(Qwen3_5ForConditionalGeneration, config, seed, **(place or {}))
    generator = torch.Generator().manual_seed(seed)
    pixels, patch = QWEN3_5_IMAGE
    side = pixels // patch
    tokens = side * side // 4
    ids = _prompt(generator, [32002] + [32000] * tokens + [32003])
    types = (ids == 32000).long()
    inputs = {
        "input_ids": ids, "attention_mask": torch.ones_like(ids), "mm_token_type_ids": types,
        "pixel_values": torch.randn(side * side, 3 * 2 * patch * patch, generator=generator),
        "image_grid_thw": torch.tensor([[1, side, side]]),
    }
    return model, inputs


#: InternVL3's prompt: 2x2 tiles of 448 px and a thumbnail, 256 tokens per tile after the pixel shuffle.
INTERNVL_TILES = 5


def _internvl(size: ModelSize, seed: int, place: dict | None = None):
    """InternVL3 (``InternVLForConditionalGeneration``): an InternViT tower (448 px tiles, patches
    of 14 px and a CLS token; ``size.vision_*``), its last layer's patches through a 0.5 pixel
    shuffle (256 tokens per tile) and the MLP projector, and a Qwen2 decoder (1-D RoPE). The prompt:
    a 2x2-tile image and its thumbnail (5 tiles, 1,280 tokens) between ``<img>`` and ``</img>``."""
    from transformers import (
        InternVLConfig,
        InternVLForConditionalGeneration,
        InternVLVisionConfig,
        Qwen2Config,
    )

    vision = InternVLVisionConfig(
        hidden_size=size.vision_hidden, intermediate_size=4 * size.vision_hidden, num_hidden_layers=size.vision_layers,
        num_attention_heads=size.vision_heads, image_size=448, patch_size=14,
    )
    text = Qwen2Config(
        vocab_size=32064, hidden_size=size.hidden, intermediate_size=size.intermediate, num_hidden_layers=size.layers,
        num_attention_heads=size.heads, num_key_value_heads=size.kv_heads, max_position_embeddings=8192,
        pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )
    config = InternVLConfig(vision_config=vision, text_config=text, image_token_id=32000, image_seq_length=256,
                            downsample_ratio=0.5, vision_feature_layer=-1, vision_feature_select_strategy="default")
    model = seeded(InternVLForConditionalGeneration, config, seed, **(place or {}))
    generator = torch.Generator().manual_seed(seed)
    ids = _prompt(generator, [32002] + [32000] * (256 * INTERNVL_TILES) + [32003])  # <img> ... </img>
    pixels = torch.randn(INTERNVL_TILES, 3, 448, 448, generator=generator)
    return model, {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values": pixels}


#: Gemma 3's prompt: one image of 16x16 = 256 soft tokens between <start_of_image> and <end_of_image>.
GEMMA3_IMAGE = (448, 14)


def _gemma3(size: ModelSize, seed: int, place: dict | None = None):
    """Gemma 3 (``Gemma3ForConditionalGeneration``): a SigLIP tower (``size.vision_*``, no CLS) on a
    448 px image (32x32 patches of 14 px) average-pooled 2x2 to 16x16 = 256 soft tokens, the released
    count (the released tower sees 896 px pooled 4x4), and a decoder of ``size.layers`` layers, five
    sliding of every six with the released window of 1,024 tokens (longer than this prompt, so every
    layer sees the whole of it), local and global RoPE. The prompt: the image's block between
    ``<start_of_image>`` and ``<end_of_image>``, with its ``token_type_ids``."""
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration

    head = size.hidden // size.heads
    text = dict(
        vocab_size=32064, hidden_size=size.hidden, intermediate_size=size.intermediate, num_hidden_layers=size.layers,
        num_attention_heads=size.heads, num_key_value_heads=size.kv_heads, head_dim=head, query_pre_attn_scalar=head,
        sliding_window=1024, max_position_embeddings=8192, pad_token_id=0, bos_token_id=1, eos_token_id=2,
        layer_types=["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(size.layers)],
    )
    pixels, patch = GEMMA3_IMAGE
    vision = dict(hidden_size=size.vision_hidden, intermediate_size=4 * size.vision_hidden,
                  num_hidden_layers=size.vision_layers, num_attention_heads=size.vision_heads, image_size=pixels,
                  patch_size=patch)
    config = Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=256, image_token_index=32000,
                          boi_token_index=32002, eoi_token_index=32003)
    model = seeded(Gemma3ForConditionalGeneration, config, seed, **(place or {}))
    generator = torch.Generator().manual_seed(seed)
    ids = _prompt(generator, [32002] + [32000] * 256 + [32003])
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "token_type_ids": (ids == 32000).long(),
              "pixel_values": torch.randn(1, 3, pixels, pixels, generator=generator)}
    return model, inputs


#: Gemma 4's prompt: a 768x768 image at the processor's default max_soft_tokens (280): 48x48 patches of
#: 16 px (padded to 280 x 9 = 2,520), pooled 3x3 into 16x16 = 256 soft tokens.
GEMMA4_IMAGE = (48, 16, 280)


def _gemma4(size: ModelSize, seed: int, place: dict | None = None):
    """Gemma 4 (``Gemma4ForConditionalGeneration``): its tower (``size.vision_*``, 2-D RoPE, no CLS) on
    one image's patches as the processor gives them (``GEMMA4_IMAGE``), and a decoder of
    ``size.layers`` layers in the released shapes: five sliding layers (window 512, longer than this
    prompt) then a global one whose heads are twice as wide, per-layer inputs of 256, bidirectional
    image blocks in the sliding layers, and the last ``size.layers * 7 // 16`` layers reusing the keys
    and values of earlier ones (KV sharing, as the small released models: boundaries stop at the
    first layer that stores them). The prompt: the image's soft tokens between ``<start_of_image>``
    and ``<end_of_image>``, with its ``mm_token_type_ids``."""
    from transformers import Gemma4Config, Gemma4ForConditionalGeneration

    head = size.hidden // size.heads
    text = dict(
        vocab_size=32064, hidden_size=size.hidden, intermediate_size=size.intermediate, num_hidden_layers=size.layers,
        num_attention_heads=size.heads, num_key_value_heads=size.kv_heads, head_dim=head, global_head_dim=2 * head,
        sliding_window=512, max_position_embeddings=8192, pad_token_id=0, bos_token_id=1, eos_token_id=2,
        layer_types=["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(size.layers - 1)]
        + ["full_attention"], hidden_size_per_layer_input=256, vocab_size_per_layer_input=32064,
        num_kv_shared_layers=size.layers * 7 // 16, use_bidirectional_attention="vision",
    )
    side, patch, rung = GEMMA4_IMAGE
    vision = dict(hidden_size=size.vision_hidden, intermediate_size=4 * size.vision_hidden,
                  num_hidden_layers=size.vision_layers, num_attention_heads=size.vision_heads,
                  num_key_value_heads=size.vision_heads, head_dim=size.vision_hidden // size.vision_heads,
                  patch_size=patch, pooling_kernel_size=3, position_embedding_size=1024)
    config = Gemma4Config(text_config=text, vision_config=vision, audio_config=None, image_token_id=32000,
                          boi_token_id=32002, eoi_token_id=32003, video_token_id=32004, audio_token_id=32005)
    model = seeded(Gemma4ForConditionalGeneration, config, seed, **(place or {}))
    generator = torch.Generator().manual_seed(seed)
    tokens = (side // 3) ** 2
    ids = _prompt(generator, [32002] + [32000] * tokens + [32003])
    slots = rung * 9
    patches = torch.zeros(1, slots, 3 * patch * patch)
    patches[0, : side * side] = torch.rand(side * side, 3 * patch * patch, generator=generator)
    grid = torch.stack(torch.meshgrid(torch.arange(side), torch.arange(side), indexing="xy"), dim=-1).reshape(-1, 2)
    positions = torch.full((1, slots, 2), -1, dtype=torch.long)
    positions[0, : side * side] = grid
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "mm_token_type_ids": (ids == 32000).long(),
              "pixel_values": patches, "image_position_ids": positions}
    return model, inputs
