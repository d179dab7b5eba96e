"""Tiny models of every family: the real transformers classes, built from configs with random
weights (no network), the query and key projections sharpened so that attention has clear margins.

One builder a family (``make_llava`` ... ``make_gemma4``): its defaults are the models of the test
suite (``tests/models.py`` builds its prompts and its registry of families on them); the writers of
``duet_vlm.tiny.checkpoints`` build the same way with their own sizes and token ids. The towers and
decoders they put together are ``clip_tower``, ``siglip_tower`` and ``decoder``.

>>> model = make_internvl(layers=6)          # InternVL3: 32 px tiles, 16 tokens a tile   # doctest: +SKIP
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    SiglipVisionConfig,
    VideoLlavaConfig,
    VideoLlavaForConditionalGeneration,
)


def sharpen(model: nn.Module, scale: float = 8.0, names=("q_proj.weight", "k_proj.weight")) -> nn.Module:
    """Scale the parameters whose names end with ``names`` (every query/key projection): sharper
    attention than the default init, so that rankings have clear margins (random weights otherwise
    give near-uniform attention and near-ties)."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(names):
                param.mul_(scale)
    return model


def decoder(layers: int, hidden: int = 64, vocab: int = 1000, heads: int = 4, kv_heads: int = 2, head_dim: int | None = None,
            intermediate: int | None = None, max_positions: int = 4096, **fields) -> dict:
    """The fields of a tiny decoder's config: ``layers`` layers of ``hidden`` (``heads`` query heads
    of ``head_dim``, ``hidden // heads`` unless given; ``kv_heads`` key/value heads), an MLP of
    ``intermediate`` (``2 * hidden`` unless given), pad/bos/eos ids 0/1/2, and ``fields``."""
    return dict(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate or 2 * hidden, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim or hidden // heads,
        max_position_embeddings=max_positions, pad_token_id=0, bos_token_id=1, eos_token_id=2, **fields,
    )


def clip_tower(image_size, patch_size=14, layers=3, hidden=32, heads=4, intermediate=None) -> CLIPVisionConfig:
    """A CLIP tower (with CLS) of ``layers`` layers of ``hidden`` on ``image_size`` px in patches of ``patch_size``."""
    return CLIPVisionConfig(
        hidden_size=hidden, intermediate_size=intermediate or 2 * hidden, num_hidden_layers=layers,
        num_attention_heads=heads, image_size=image_size, patch_size=patch_size, projection_dim=hidden,
        hidden_act="quick_gelu",
    )


def siglip_tower(image_size=112, patch_size=14, layers=3, hidden=32, heads=4) -> SiglipVisionConfig:
    """A SigLIP tower (no CLS) of ``layers`` layers of ``hidden`` on ``image_size`` px in patches of ``patch_size``."""
    return SiglipVisionConfig(**siglip_fields(image_size, patch_size, layers, hidden, heads))


def siglip_fields(image_size, patch_size, layers=3, hidden=32, heads=4) -> dict:
    """``siglip_tower``'s fields (Gemma 3's tower is a SigLIP tower given as a dict)."""
    return dict(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers, num_attention_heads=heads,
                image_size=image_size, patch_size=patch_size)


# ----------------------------------------------------------------------------- LLaVA-1.5 (CLIP)
IMAGE_TOKEN = 999
VOCAB = 1000


def make_llava(
    *,
    layers: int = 32,
    heads: int = 4,
    kv_heads: int = 4,
    hidden: int = 64,
    vision_layers: int = 4,
    image_size: int = 336,
    attn: str = "sdpa",
    strategy: str = "default",
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    intermediate: int | None = None,
    vocab: int = VOCAB,
    max_positions: int = 2048,
    vision: CLIPVisionConfig | None = None,
    image_token_id: int = IMAGE_TOKEN,
    sharpness: float = 8.0,
    **fields,
) -> LlavaForConditionalGeneration:
    """A randomly initialised LlavaForConditionalGeneration; LLaVA-1.5 geometry by default (576
    patches, 32 layers): a CLIP tower of ``vision_layers`` x 32 on ``image_size`` px (or ``vision``),
    feature layer -2; ``fields``: more ``LlavaConfig`` fields."""
    vision = vision or clip_tower(image_size, 14, vision_layers)
    side = vision.image_size // vision.patch_size
    config = LlavaConfig(
        vision_config=vision,
        text_config=LlamaConfig(**decoder(layers, hidden, vocab, heads, kv_heads, intermediate=intermediate,
                                          max_positions=max_positions)),
        image_token_id=image_token_id,
        vision_feature_layer=-2,
        vision_feature_select_strategy=strategy,
        image_seq_length=side * side + (strategy == "full"),
        **fields,
    )
    torch.manual_seed(seed)
    model = sharpen(LlavaForConditionalGeneration(config), sharpness)
    model.set_attn_implementation(attn)
    return model.to(dtype).eval()


# ----------------------------------------------------------------------------- LLaVA with other towers, Video-LLaVA
IMAGE, VIDEO = 998, 999
FRAMES, SIDE = 4, 8  # Video-LLaVA: 4 frames of 8x8 patches (+ CLS): 260 video tokens; an image has 64


def text_config(layers=16):
    """The Llama decoder of the tiny LLaVA-NeXT, Video-LLaVA and LLaVA-with-another-tower models (GQA)."""
    return LlamaConfig(**decoder(layers))


def llava_with(vision_config, strategy="full", layers=8):
    """LlavaForConditionalGeneration with any vision tower (64 image tokens, image token ``IMAGE``)."""
    config = LlavaConfig(
        vision_config=vision_config, text_config=text_config(layers), image_token_id=IMAGE, vision_feature_layer=-2,
        vision_feature_select_strategy=strategy, image_seq_length=64,
    )
    torch.manual_seed(0)
    return sharpen(LlavaForConditionalGeneration(config)).eval()


def make_video_llava(attn="sdpa", side=SIDE, layers=16, seed=0):
    config = VideoLlavaConfig(
        vision_config=clip_tower(14 * side), text_config=text_config(layers), image_token_id=IMAGE,
        video_token_id=VIDEO, vision_feature_layer=-2, vision_feature_select_strategy="default",
        image_seq_length=side * side, video_seq_length=FRAMES * (side * side + 1),
    )
    torch.manual_seed(seed)
    model = sharpen(VideoLlavaForConditionalGeneration(config))
    model.set_attn_implementation(attn)
    return model.eval()


# ----------------------------------------------------------------------------- LLaVA-NeXT (anyres)
def make_llava_next(attn="sdpa", seed=0, tower="clip", layers=16, *, vision=None, text=None, image_token_id=IMAGE,
                    sharpness=8.0, newline=False, **fields):
    """Tiles of 56 px (4x4 patches of 14 px; a CLIP tower's CLS dropped, a SigLIP tower has none) on
    a 1x2, 2x1 and 2x2 grid of pinpoints. ``vision`` (a CLIP tower, strategy "default") and ``text``
    (a ``LlamaConfig``): other sizes, the pinpoints on the tower's tiles; ``newline``: the newline
    embedding drawn at random (transformers' init); ``fields``: more ``LlavaNextConfig`` fields."""
    from transformers import LlavaNextConfig, LlavaNextForConditionalGeneration

    if vision is None:
        vision, strategy = (clip_tower(56), "default") if tower == "clip" else (siglip_tower(56), "full")
    else:
        strategy = "default"
    tile = vision.image_size
    config = LlavaNextConfig(
        vision_config=vision, text_config=text or text_config(layers), image_token_id=image_token_id,
        vision_feature_layer=-2, vision_feature_select_strategy=strategy,
        image_grid_pinpoints=[[tile, 2 * tile], [2 * tile, tile], [2 * tile, 2 * tile]], **fields,
    )
    torch.manual_seed(seed)
    model = LlavaNextForConditionalGeneration(config)
    if newline:
        with torch.no_grad():
            model.model.image_newline.normal_()
    model = sharpen(model, sharpness)
    model.set_attn_implementation(attn)
    return model.eval()


# ----------------------------------------------------------------------------- LLaVA-OneVision
VIDEO_FRAMES_OV = 4


def make_llava_onevision(attn="sdpa", seed=0, tower="siglip", layers=16, *, vision=None, text=None, pinpoints=None,
                         image_token_id=IMAGE, video_token_id=VIDEO, sharpness=8.0, **fields):
    """Tiles of 32 px (8x8 patches of 4 px; a CLIP tower's CLS dropped, a SigLIP tower has none).
    ``vision`` (a SigLIP tower, every feature of the last layer kept), ``text`` (a ``Qwen2Config``
    unless given) and ``pinpoints``: other sizes; ``fields``: more ``LlavaOnevisionConfig`` fields."""
    from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration, Qwen2Config

    if text is None:  # Qwen2's config computes its head_dim
        text = Qwen2Config(**{key: value for key, value in decoder(layers).items() if key != "head_dim"})
    if vision is not None:
        strategy, layer = "full", -1
    elif tower == "siglip":
        vision, strategy, layer = siglip_tower(32, 4), "full", -1
    else:
        vision, strategy, layer = clip_tower(32, 4), "default", -2
    config = LlavaOnevisionConfig(
        vision_config=vision, text_config=text, image_token_id=image_token_id, video_token_id=video_token_id,
        vision_feature_layer=layer, vision_feature_select_strategy=strategy,
        image_grid_pinpoints=pinpoints or [[32, 32], [32, 64], [64, 32], [64, 64]], **fields,
    )
    torch.manual_seed(seed)
    model = sharpen(LlavaOnevisionForConditionalGeneration(config), sharpness)
    model.set_attn_implementation(attn)
    return model.eval()


# ----------------------------------------------------------------------------- Qwen2-VL, Qwen2.5-VL, Qwen3-VL
QWEN_IMAGE, QWEN_VIDEO, VSTART, VEND = 3, 4, 5, 6
QWEN_IDS = dict(image_token_id=QWEN_IMAGE, video_token_id=QWEN_VIDEO, vision_start_token_id=VSTART,
                vision_end_token_id=VEND)
#: Every Qwen tower's patches: 14 px, 2 frames deep, merged 2x2 into a token.
QWEN_PATCHES = dict(patch_size=14, spatial_merge_size=2, temporal_patch_size=2)

#: The Hugging Face classes of each Qwen kind: config, model, processor.
QWEN_KINDS = {
    "qwen2_vl": ("Qwen2VLConfig", "Qwen2VLForConditionalGeneration", "Qwen2VLProcessor"),
    "qwen2_5_vl": ("Qwen2_5_VLConfig", "Qwen2_5_VLForConditionalGeneration", "Qwen2_5_VLProcessor"),
    "qwen3_vl": ("Qwen3VLConfig", "Qwen3VLForConditionalGeneration", "Qwen3VLProcessor"),
    "qwen3_5": ("Qwen3_5Config", "Qwen3_5ForConditionalGeneration", "Qwen3VLProcessor"),
    "qwen3_5_moe": ("Qwen3_5MoeConfig", "Qwen3_5MoeForConditionalGeneration", "Qwen3VLProcessor"),
}


def qwen_classes(kind: str):
    """The config and model classes of a Qwen ``kind`` (a key of ``QWEN_KINDS``)."""
    import transformers

    config_name, model_name, _ = QWEN_KINDS[kind]
    return getattr(transformers, config_name), getattr(transformers, model_name)


def qwen_text(layers, **fields):
    """The decoder of the tiny Qwen models: width 32, heads of 8 (``fields``: more, or other, fields)."""
    return decoder(
        layers, 32, 99, intermediate=37, max_positions=1024,
        # head_dim 8: the three M-RoPE sections must add up to head_dim / 2.
        **{"rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 1, 1]}, **fields},
    )


def make_qwen(family, attn="sdpa", layers=6, seed=0):
    ids, vision = QWEN_IDS, QWEN_PATCHES
    config_class, cls = qwen_classes(family)
    if family == "qwen2_vl":
        config = config_class(
            text_config=qwen_text(layers), vision_config=dict(vision, depth=2, embed_dim=32, hidden_size=32,
                                                              num_heads=4, mlp_ratio=2), **ids,
        )
    elif family == "qwen2_5_vl":
        # Windows of 2x2 merged tokens (56 px), full attention in block 1 of 3: the scores come from
        # block 1, whose input is in the window order.
        config = config_class(
            text_config=qwen_text(layers),
            vision_config=dict(vision, depth=3, hidden_size=32, intermediate_size=37, num_heads=4, out_hidden_size=32,
                               window_size=56, fullatt_block_indexes=[1]),
            **ids,
        )
    else:
        text = qwen_text(layers)
        text["rope_parameters"]["mrope_interleaved"] = True
        config = config_class(
            text_config=text,
            vision_config=dict(vision, depth=3, hidden_size=32, intermediate_size=37, num_heads=4, out_hidden_size=32,
                               deepstack_visual_indexes=[0, 1], num_position_embeddings=64),
            **ids,
        )
    torch.manual_seed(seed)
    # sharper attention, so that scores (and what is kept) differ between tokens
    model = sharpen(cls(config), 4.0, ("q_proj.weight", "k_proj.weight", "qkv.weight"))
    model.set_attn_implementation(attn)
    return model.eval()


def make_qwen3_5(moe=False, attn="sdpa", layers=6, interval=4, attention_first=False, seed=0):
    """Qwen3.5 (or Qwen3.5-MoE): the Qwen3-VL tower without DeepStack, and a hybrid language model
    whose every ``interval``-th layer is full attention, the others Gated-DeltaNet linear attention
    (as released: layers 3, 7, ...); ``attention_first``: layers 0, interval, 2 interval, ... attend
    instead. The gated query (``q_proj`` gives a query and a gate per head) and partial RoPE (a
    quarter of the head) as released."""
    text = qwen_text(
        layers, head_dim=16, linear_conv_kernel_dim=4, linear_key_head_dim=8, linear_value_head_dim=8,
        linear_num_key_heads=2, linear_num_value_heads=4,
        layer_types=[
            "full_attention" if (i if attention_first else i + 1) % interval == 0 else "linear_attention"
            for i in range(layers)
        ],
        # a quarter of head_dim 16 rotates: the M-RoPE sections add up to 2.
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [1, 1, 0],
                         "mrope_interleaved": True, "partial_rotary_factor": 0.25},
    )
    if moe:
        text.update(moe_intermediate_size=16, shared_expert_intermediate_size=16, num_experts=4, num_experts_per_tok=2)
    vision = dict(QWEN_PATCHES, depth=3, hidden_size=32, intermediate_size=37, num_heads=4, out_hidden_size=32,
                  num_position_embeddings=64)
    config_class, model_class = qwen_classes("qwen3_5_moe" if moe else "qwen3_5")
    torch.manual_seed(seed)
    model = config_class(text_config=text, vision_config=vision, **QWEN_IDS)
    model = sharpen(model_class(model), 4.0, ("q_proj.weight", "k_proj.weight", "qkv.weight"))
    model.set_attn_implementation(attn)
    return model.eval()


# ----------------------------------------------------------------------------- InternVL3 / 3.5
INTERNVL_IMAGE, IMG_START, IMG_END = 998, 996, 997  # <IMG_CONTEXT>, <img>, </img>
INTERNVL_TILE = 32  # px: 8x8 patches of 4 px (+ CLS); the 0.5 pixel shuffle makes 4x4 = 16 tokens
INTERNVL_TOKENS = 16  # placeholders per tile (image_seq_length)


def make_internvl(attn="sdpa", layers=16, seed=0, text="qwen2", *, tile=INTERNVL_TILE, patch=4, vision_hidden=32,
                  vision_heads=4, hidden=64, vocab=1000, image_token_id=INTERNVL_IMAGE, sharpness=8.0,
                  text_fields=None, fields=None, **vision_options):
    """InternVL3 with tiles of ``tile`` px in patches of ``patch`` px (a 0.5 pixel shuffle:
    ``(tile // patch // 2) ** 2`` tokens a tile), a 3-layer ViT of ``vision_hidden``, and a Qwen2
    decoder of ``hidden`` (GQA); ``text="qwen3"``: InternVL3.5's Qwen3 decoder (per-head q/k norms);
    ``vision_options``: more ``InternVLVisionConfig`` fields (the 6B ViT's ``use_qk_norm=True,
    norm_type="rms_norm"``); ``text_fields``, ``fields``: more fields of the decoder's and the model's
    configs. The CLS token and the position embeddings (zeros at init) are drawn at random and the
    layer scales (0.1) set to 1, so that the CLS attention differs between patches."""
    from transformers import (
        InternVLConfig,
        InternVLForConditionalGeneration,
        InternVLVisionConfig,
        Qwen2Config,
        Qwen3Config,
    )

    vision = InternVLVisionConfig(
        hidden_size=vision_hidden, intermediate_size=2 * vision_hidden, num_hidden_layers=3,
        num_attention_heads=vision_heads, image_size=tile, patch_size=patch, layer_scale_init_value=1.0, **vision_options,
    )
    text = (Qwen3Config if text == "qwen3" else Qwen2Config)(**{**decoder(layers, hidden, vocab), **(text_fields or {})})
    config = InternVLConfig(
        vision_config=vision, text_config=text, image_token_id=image_token_id,
        image_seq_length=(tile // patch // 2) ** 2, downsample_ratio=0.5, vision_feature_layer=-1,
        vision_feature_select_strategy="default", **(fields or {}),
    )
    torch.manual_seed(seed)
    model = InternVLForConditionalGeneration(config)
    with torch.no_grad():
        embeddings = model.model.vision_tower.embeddings
        embeddings.cls_token.normal_()
        embeddings.position_embeddings.normal_(std=0.5)
    # q/k norms (Qwen3, a qk-normed ViT) undo a sharper projection: their weights are sharpened too.
    model = sharpen(sharpen(model, sharpness), 2.0, ("q_norm.weight", "k_norm.weight"))
    model.set_attn_implementation(attn)
    return model.eval()


# ----------------------------------------------------------------------------- Gemma 3
GEMMA_IMAGE, BOI, EOI = 998, 996, 997  # <image_soft_token>, <start_of_image>, <end_of_image>
GEMMA_TOKENS = 16  # soft tokens per image: 8x8 SigLIP patches of 4 px, pooled 2x2
GEMMA_WINDOW = 16  # shorter than every prompt below, so that the sliding window bites


def make_gemma3(attn="sdpa", layers=6, seed=0, window=GEMMA_WINDOW, layer_types=None, *, vocab=1000, head_dim=16,
                vision_layers=3, image_token_id=GEMMA_IMAGE, boi=BOI, eoi=EOI, sharpened=True):
    """Gemma 3 with 32 px images (16 soft tokens) and ``layers`` decoder layers of heads of
    ``head_dim``, Gemma's pattern (five sliding layers, then a global one) unless ``layer_types``
    says otherwise. transformers initialises the image projection to zeros (a tiny model would see no
    image): it is drawn at random. ``sharpened``: Gemma's RMSNorm weights start at zeros (a scale of
    1): the per-head q/k norms are set to a scale of 2 and the q/k projections sharpened, so that
    attention has clear margins."""
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration

    text = decoder(
        layers, vocab=vocab, head_dim=head_dim, query_pre_attn_scalar=head_dim, sliding_window=window,
        layer_types=layer_types or ["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(layers)],
    )
    config = Gemma3Config(text_config=text, vision_config=siglip_fields(32, 4, vision_layers),
                          mm_tokens_per_image=GEMMA_TOKENS, image_token_index=image_token_id, boi_token_index=boi,
                          eoi_token_index=eoi)
    torch.manual_seed(seed)
    model = Gemma3ForConditionalGeneration(config)
    with torch.no_grad():
        model.model.multi_modal_projector.mm_input_projection_weight.normal_(std=0.3)
        if sharpened:
            for name, param in model.named_parameters():
                if name.endswith(("q_norm.weight", "k_norm.weight")):
                    param.fill_(1.0)
    if sharpened:
        model = sharpen(model, 4.0, ("q_proj.weight", "k_proj.weight"))
    model.set_attn_implementation(attn)
    return model.eval()


# ----------------------------------------------------------------------------- Gemma 4
GEMMA4_IMAGE, GEMMA4_VIDEO = 998, 995  # boi/eoi as Gemma 3's
GEMMA4_PATCH, GEMMA4_KERNEL = 4, 3  # 4 px patches, pooled 3x3 into one soft token
GEMMA4_LAYER_TYPES = ["sliding_attention", "sliding_attention", "full_attention"] * 2


def make_gemma4(attn="sdpa", layers=6, seed=0, window=GEMMA_WINDOW, layer_types=None, kv_shared=2,
                bidirectional="vision", *, vocab=1000, head_dim=16, vision_layers=3, image_token_id=GEMMA4_IMAGE,
                boi=BOI, eoi=EOI, video_token_id=GEMMA4_VIDEO, audio_token_id=994, sharpness=2.0, **vision_fields):
    """Gemma 4 with per-layer inputs, ``layers`` decoder layers (two sliding, then a global one) of
    which the last ``kv_shared`` reuse the keys and values of earlier ones, a window of ``window``
    tokens, sliding heads of ``head_dim`` (global ones twice as wide), and a tower of
    ``vision_layers`` on 4 px patches pooled 3x3 (``vision_fields``: more of its fields).
    transformers initialises the patch-position table to ones (every position alike) and Gemma's
    norms to a scale of 1: the table is drawn at random, and q/k projections sharpened by
    ``sharpness`` (``None``: not), so that attention has clear margins."""
    from transformers import Gemma4Config, Gemma4ForConditionalGeneration

    text = decoder(
        layers, vocab=vocab, head_dim=head_dim, global_head_dim=2 * head_dim, sliding_window=window,
        hidden_size_per_layer_input=8, vocab_size_per_layer_input=vocab, num_kv_shared_layers=kv_shared,
        use_bidirectional_attention=bidirectional, layer_types=layer_types or (GEMMA4_LAYER_TYPES * layers)[:layers],
    )
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=vision_layers, num_attention_heads=4,
                  num_key_value_heads=4, head_dim=8, patch_size=GEMMA4_PATCH, pooling_kernel_size=GEMMA4_KERNEL,
                  position_embedding_size=64, **vision_fields)
    config = Gemma4Config(text_config=text, vision_config=vision, audio_config=None, image_token_id=image_token_id,
                          boi_token_id=boi, eoi_token_id=eoi, video_token_id=video_token_id, audio_token_id=audio_token_id)
    torch.manual_seed(seed)
    model = Gemma4ForConditionalGeneration(config)
    with torch.no_grad():
        model.model.vision_tower.patch_embedder.position_embedding_table.normal_(std=0.5)
    if sharpness is not None:
        model = sharpen(model, sharpness, ("q_proj.weight", "k_proj.weight", "q_proj.linear.weight", "k_proj.linear.weight"))
    model.set_attn_implementation(attn)
    return model.eval()
