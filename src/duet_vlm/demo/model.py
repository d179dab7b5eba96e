"""Config and construction of the demo LLaVA model (real ``transformers`` classes).

``demo_config(tokenizer=None, **overrides) -> LlavaConfig``
    LLaVA-1.5 geometry (CLIP vision tower at 336/14 -> 576 patches + CLS, feature layer -2,
    "default" select strategy, 2-layer GELU projector, Llama decoder with 32 layers) at tiny
    widths so that it trains on a CPU.  ``overrides`` may set ``text_layers``, ``text_hidden``,
    ``text_intermediate``, ``text_heads``, ``text_kv_heads``, ``text_initializer_range``,
    ``vision_layers``, ``vision_hidden``, ``vision_intermediate``, ``vision_heads``.
``build_model(config=None, seed=0) -> LlavaForConditionalGeneration`` (fp32, sdpa attention)
"""

from __future__ import annotations

import torch
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

from .. import synthetic
from .processor import IMAGE, build_tokenizer

DEFAULTS = dict(
    text_layers=32,
    text_hidden=96,
    text_intermediate=256,
    text_heads=4,
    text_kv_heads=4,
    vision_layers=4,
    vision_hidden=96,
    vision_intermediate=256,
    vision_heads=4,
    max_position_embeddings=1024,
    # transformers' default 0.02 suits widths in the hundreds to thousands; at width 96 it starts
    # every attention logit near zero.  GPT-2's 0.02 at width 768, scaled by 1/sqrt(width) to
    # 96, is 0.056; in a side-by-side pilot run it left the language-prior plateau sooner.
    text_initializer_range=0.056,
)


def hyperparameters(overrides: dict) -> dict:
    """``DEFAULTS`` with ``overrides`` (either demo architecture's widths and depths); an unknown key is refused."""
    unknown = set(overrides) - set(DEFAULTS)
    if unknown:
        raise TypeError(f"unknown demo_config overrides: {sorted(unknown)}")
    return {**DEFAULTS, **overrides}


def demo_config(tokenizer=None, **overrides) -> LlavaConfig:
    h = hyperparameters(overrides)
    tok = tokenizer if tokenizer is not None else build_tokenizer()
    vision = CLIPVisionConfig(
        hidden_size=h["vision_hidden"],
        intermediate_size=h["vision_intermediate"],
        num_hidden_layers=h["vision_layers"],
        num_attention_heads=h["vision_heads"],
        image_size=synthetic.IMAGE_SIZE,
        patch_size=synthetic.PATCH_SIZE,
        projection_dim=h["vision_hidden"],
        hidden_act="quick_gelu",
    )
    text = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=h["text_hidden"],
        intermediate_size=h["text_intermediate"],
        num_hidden_layers=h["text_layers"],
        num_attention_heads=h["text_heads"],
        num_key_value_heads=h["text_kv_heads"],
        max_position_embeddings=h["max_position_embeddings"],
        initializer_range=h["text_initializer_range"],
        rms_norm_eps=1e-5,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        tie_word_embeddings=False,
    )
    cfg = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=tok.convert_tokens_to_ids(IMAGE),
        image_seq_length=synthetic.GRID * synthetic.GRID,
        projector_hidden_act="gelu",
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
        tie_word_embeddings=False,
    )
    cfg.pad_token_id = tok.pad_token_id
    cfg.bos_token_id = tok.bos_token_id
    cfg.eos_token_id = tok.eos_token_id
    return cfg


def build_model(config: LlavaConfig | None = None, seed: int = 0) -> LlavaForConditionalGeneration:
    config = config if config is not None else demo_config()
    config._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    model.generation_config.pad_token_id = config.text_config.pad_token_id
    model.generation_config.bos_token_id = config.text_config.bos_token_id
    model.generation_config.eos_token_id = config.text_config.eos_token_id
    return model.float()


def count_parameters(model) -> dict[str, int]:
    m = model.model
    return {
        "vision_tower": sum(p.numel() for p in m.vision_tower.parameters()),
        "projector": sum(p.numel() for p in m.multi_modal_projector.parameters()),
        "language_model": sum(p.numel() for p in m.language_model.parameters())
        + sum(p.numel() for p in model.lm_head.parameters()),
        "total": sum(p.numel() for p in model.parameters()),
    }
