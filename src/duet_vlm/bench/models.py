"""The one model builder of every benchmark: random-weight models of LLaVA-1.5's geometry (a
CLIP-L/14 tower, a 32-layer Llama decoder of configurable width) and their prompts.

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
FAMILIES = ("llava", "llava_next", "video_llava")


@dataclass(frozen=True)
class ModelSize:
    """A LLaVA-1.5-shaped model (CLIP-L/14-336 tower, 32-layer decoder) with a configurable decoder width."""

    vision_hidden: int = 1024
    vision_layers: int = 24
    vision_heads: int = 16
    hidden: int = 1024
    layers: int = 32
    heads: int = 16
    kv_heads: int = 16
    intermediate: int = 2816


def _tower(size: ModelSize, image_size: int) -> CLIPVisionConfig:
    return CLIPVisionConfig(
        hidden_size=size.vision_hidden, intermediate_size=4 * size.vision_hidden, num_hidden_layers=size.vision_layers,
        num_attention_heads=size.vision_heads, image_size=image_size, patch_size=14, projection_dim=768,
    )


def _decoder(size: ModelSize, max_positions: int) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=32064, hidden_size=size.hidden, intermediate_size=size.intermediate, num_hidden_layers=size.layers,
        num_attention_heads=size.heads, num_key_value_heads=size.kv_heads, max_position_embeddings=max_positions,
    )


def build_model(size: ModelSize, attn: str = "sdpa", seed: int = 0) -> LlavaForConditionalGeneration:
    """LLaVA-1.5 (336 px, 576 visual tokens) of ``size``, seeded."""
    config = LlavaConfig(
        vision_config=_tower(size, 336),
        text_config=_decoder(size, 4096),
        image_token_id=32000,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        image_seq_length=576,
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config).eval()
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


def build_family(family: str, size: ModelSize, seed: int = 0):
    """A random-weight model of ``family`` with a CLIP-L/14 tower and ``size``'s decoder, and one
    prompt of its typical geometry: LLaVA-1.5 (336 px, 576 tokens), LLaVA-NeXT (a 672x672 image:
    5 tiles, 2,928 tokens with newlines) or Video-LLaVA (8 frames at 224 px, 2,056 tokens)."""
    from transformers import (
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
        VideoLlavaConfig,
        VideoLlavaForConditionalGeneration,
    )

    if family == "llava":
        model = build_model(size, seed=seed)
        return model, example_inputs(model)
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; one of {', '.join(FAMILIES)}")
    vision = _tower(size, 336 if family == "llava_next" else 224)
    text = _decoder(size, 8192)
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    if family == "llava_next":
        pinpoints = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
        config = LlavaNextConfig(vision_config=vision, text_config=text, image_token_id=32000, image_grid_pinpoints=pinpoints,
                                 vision_feature_layer=-2, vision_feature_select_strategy="default")
        model = LlavaNextForConditionalGeneration(config).eval()
        slots, token = 576 + 48 * 49, config.image_token_id
        visual = {"pixel_values": torch.randn(1, 5, 3, 336, 336, generator=generator), "image_sizes": torch.tensor([[672, 672]])}
    else:
        config = VideoLlavaConfig(vision_config=vision, text_config=text, image_token_id=32000, video_token_id=32001,
                                  vision_feature_layer=-2, vision_feature_select_strategy="default")
        model = VideoLlavaForConditionalGeneration(config).eval()
        slots, token = 8 * 257, config.video_token_id
        visual = {"pixel_values_videos": torch.randn(1, 8, 3, 224, 224, generator=generator)}
    model.set_attn_implementation("sdpa")
    ids = torch.cat([torch.randint(3, 32000, (1, 5), generator=generator), torch.full((1, slots), token),
                     torch.randint(3, 32000, (1, 55), generator=generator)], dim=1)
    return model, {"input_ids": ids, "attention_mask": torch.ones_like(ids), **visual}
