"""Config, processor and construction of the second demo model: Qwen2.5-VL's architecture (real ``transformers`` classes).

The geometry users of Qwen-VL, InternVL and Gemma live in: no CLS token, a tower of windowed and
full-attention blocks over 14-pixel patches, a 2x2 patch merger that is the projector, and M-RoPE
positions (time, row, column) in the decoder. The same synthetic scenes as the first demo model
(336x336) give 24x24 patches and 12x12 = 144 visual tokens.

``qwen_demo_config(tokenizer=None, **overrides) -> Qwen2_5_VLConfig``
    The first demo model's widths and depths (``model.DEFAULTS``; the same overrides), the tower's
    blocks in windows of 112 px (4x4 tokens) but for the middle and last blocks, which attend over the
    whole image, as Qwen2.5-VL's every eighth block does.
``build_qwen_model(config=None, seed=0) -> Qwen2_5_VLForConditionalGeneration`` (fp32, sdpa attention)
``build_qwen_tokenizer()`` / ``write_qwen_processor(folder)`` / ``load_qwen_processor(folder)``
    The demo's word-level tokenizer with Qwen's vision tokens; a ``Qwen2_5_VLProcessor`` whose image
    processor keeps 336x336 images as they are (OpenAI CLIP mean/std, as Qwen's) and expands
    ``<|image_pad|>`` into 144 tokens; the chat template of the first model with Qwen's
    ``<|vision_start|><|image_pad|><|vision_end|>`` where it has ``<image>``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .. import synthetic
from .model import hyperparameters
from .processor import BOS, CHAT_TEMPLATE, EOS, IMAGE, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, PAD, UNK, build_tokenizer

VISION_START, VISION_END, IMAGE_PAD, VIDEO_PAD = "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"
QWEN_SPECIAL_TOKENS = [PAD, BOS, EOS, UNK, VISION_START, VISION_END, IMAGE_PAD, VIDEO_PAD]
MERGE = 2
TOKEN_GRID = synthetic.GRID // MERGE  # 12 visual tokens per side
N_TOKENS = TOKEN_GRID * TOKEN_GRID  # 144
QWEN_CHAT_TEMPLATE = CHAT_TEMPLATE.replace(IMAGE, VISION_START + IMAGE_PAD + VISION_END)


def qwen_prompt(question: str) -> str:
    """The single-turn prompt the Qwen demo model was trained on (its chat template's)."""
    return f"USER: {VISION_START}{IMAGE_PAD}{VISION_END}\n{question} ASSISTANT:"


def build_qwen_tokenizer():
    """The first demo model's word-level tokenizer, with Qwen's vision tokens in place of ``<image>``."""
    return build_tokenizer(special=QWEN_SPECIAL_TOKENS, extra={
        "image_token": IMAGE_PAD, "video_token": VIDEO_PAD, "vision_start_token": VISION_START,
        "vision_end_token": VISION_END})


def image_processor_dict() -> dict:
    """The image processor's settings: 336x336 stays 336x336 (a multiple of 28), normalised as CLIP's."""
    side = synthetic.IMAGE_SIZE
    return {
        "image_processor_type": "Qwen2VLImageProcessor", "do_resize": True, "do_rescale": True, "do_normalize": True,
        "do_convert_rgb": True, "image_mean": OPENAI_CLIP_MEAN, "image_std": OPENAI_CLIP_STD, "rescale_factor": 1 / 255,
        "patch_size": synthetic.PATCH_SIZE, "merge_size": MERGE, "temporal_patch_size": 2,
        "size": {"shortest_edge": side * side, "longest_edge": side * side}, "resample": 3,
    }


def write_qwen_processor(folder: str | Path) -> Path:
    """Write the Qwen demo processor's files (tokenizer, chat template, image and video processors) into ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = build_qwen_tokenizer()
    tokenizer.chat_template = QWEN_CHAT_TEMPLATE
    tokenizer.save_pretrained(folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["processor_class"] = "Qwen2_5_VLProcessor"
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (folder / "chat_template.jinja").write_text(QWEN_CHAT_TEMPLATE)
    image = image_processor_dict()
    video = {**{k: v for k, v in image.items() if k != "image_processor_type"},
             "video_processor_type": "Qwen2VLVideoProcessor", "fps": 2.0, "do_sample_frames": False}
    (folder / "processor_config.json").write_text(json.dumps(
        {"image_processor": image, "video_processor": video, "processor_class": "Qwen2_5_VLProcessor"}, indent=2) + "\n")
    return folder


def load_qwen_processor(folder: str | Path):
    """The processor in ``folder`` (``compare.load_processor``: without torchvision, images only)."""
    from ..compare import load_processor

    return load_processor(str(folder))


def qwen_demo_config(tokenizer=None, **overrides):
    from transformers import Qwen2_5_VLConfig

    h = hyperparameters(overrides)
    tok = tokenizer if tokenizer is not None else build_qwen_tokenizer()
    head_dim = h["text_hidden"] // h["text_heads"]
    if head_dim % 6:
        raise ValueError(f"the Qwen demo's M-RoPE splits head_dim / 2 in three equal sections: head_dim {head_dim} "
                         "must be a multiple of 6")
    ids = {name: tok.convert_tokens_to_ids(name) for name in QWEN_SPECIAL_TOKENS}
    depth = h["vision_layers"]
    text = dict(
        vocab_size=len(tok), hidden_size=h["text_hidden"], intermediate_size=h["text_intermediate"],
        num_hidden_layers=h["text_layers"], num_attention_heads=h["text_heads"], num_key_value_heads=h["text_kv_heads"],
        max_position_embeddings=h["max_position_embeddings"], initializer_range=h["text_initializer_range"],
        rms_norm_eps=1e-5, tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [head_dim // 6] * 3},
        pad_token_id=ids[PAD], bos_token_id=ids[BOS], eos_token_id=ids[EOS],
    )
    vision = dict(
        depth=depth, hidden_size=h["vision_hidden"], intermediate_size=h["vision_intermediate"],
        num_heads=h["vision_heads"], out_hidden_size=h["text_hidden"], patch_size=synthetic.PATCH_SIZE,
        spatial_merge_size=MERGE, temporal_patch_size=2, in_channels=3, tokens_per_second=2, hidden_act="silu",
        # windows of 112 px (8x8 patches, 4x4 tokens: nine per image); the middle and the last block attend
        # over the whole image, as every eighth block of the released towers does, their last one included
        window_size=8 * synthetic.PATCH_SIZE, fullatt_block_indexes=sorted({max(0, depth // 2 - 1), depth - 1}),
    )
    config = Qwen2_5_VLConfig(
        text_config=text, vision_config=vision, image_token_id=ids[IMAGE_PAD], video_token_id=ids[VIDEO_PAD],
        vision_start_token_id=ids[VISION_START], vision_end_token_id=ids[VISION_END],
        pad_token_id=ids[PAD], bos_token_id=ids[BOS], eos_token_id=ids[EOS], tie_word_embeddings=False,
    )
    return config


def build_qwen_model(config=None, seed: int = 0):
    from transformers import Qwen2_5_VLForConditionalGeneration

    config = config if config is not None else qwen_demo_config()
    config._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(config)
    text = config.text_config
    model.generation_config.pad_token_id = text.pad_token_id
    model.generation_config.bos_token_id = text.bos_token_id
    model.generation_config.eos_token_id = text.eos_token_id
    return model.float()


def patchify(pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(B, 3, 336, 336)`` normalised images -> ``(pixel_values (B * 576, 1176), image_grid_thw (B, 3))`` as
    Qwen's image processor lays them out: patches in 2x2 merge groups, each patch's channels, its two
    (equal) frames and its pixels."""
    B, C, H, W = pixels.shape
    p, g = synthetic.PATCH_SIZE, H // synthetic.PATCH_SIZE
    x = pixels.reshape(B, C, g // MERGE, MERGE, p, g // MERGE, MERGE, p).permute(0, 2, 5, 3, 6, 1, 4, 7)
    x = x.unsqueeze(6).expand(*x.shape[:6], 2, p, p)
    grid = torch.tensor([[1, g, g]] * B)
    return x.reshape(B * g * g, C * 2 * p * p).contiguous(), grid


def count_qwen_parameters(model) -> dict[str, int]:
    m = model.model
    merger = sum(p.numel() for p in m.visual.merger.parameters())
    return {
        "vision_tower": sum(p.numel() for p in m.visual.parameters()) - merger,
        "projector": merger,
        "language_model": sum(p.numel() for p in m.language_model.parameters())
        + sum(p.numel() for p in model.lm_head.parameters()),
        "total": sum(p.numel() for p in model.parameters()),
    }
