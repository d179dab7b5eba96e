"""Tiny models of the real transformers classes, built from configs (no network)."""

from __future__ import annotations

import os
from pathlib import Path

# Busy-waiting OpenMP threads multiply CPU time when other jobs share the cores (seen here: ~9x).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest
import torch
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

IMAGE_TOKEN = 999
VOCAB = 1000
# Recorded outputs of the official DUET-VLM code (a copy of ../shared/reference/vectors, kept in the
# repository so that the fidelity tests run on a fresh clone).
REFERENCE = Path(__file__).resolve().parent / "data" / "vectors"

torch.set_num_threads(2)


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
) -> LlavaForConditionalGeneration:
    """A randomly initialised LlavaForConditionalGeneration; LLaVA-1.5 geometry by default (576 patches, 32 layers)."""
    text = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=hidden // heads,
        max_position_embeddings=2048,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    vision = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=vision_layers,
        num_attention_heads=4,
        image_size=image_size,
        patch_size=14,
        projection_dim=32,
        hidden_act="quick_gelu",
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=IMAGE_TOKEN,
        vision_feature_layer=-2,
        vision_feature_select_strategy=strategy,
        image_seq_length=(image_size // 14) ** 2 + (strategy == "full"),
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    # Sharper attention than the default init, so that selections have clear margins.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(("q_proj.weight", "k_proj.weight")):
                param.mul_(8.0)
    model.set_attn_implementation(attn)
    return model.to(dtype).eval()


def image_tokens(model) -> int:
    return model.config.image_seq_length


def make_inputs(
    model,
    *,
    batch: int = 1,
    prefix: int = 5,
    suffix: int | tuple[int, ...] = 12,
    images_per_row: int = 1,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """Prompts ``<s> (prefix ids + image tokens) * images + suffix ids`` with random pixels.

    ``suffix`` may differ per row; shorter rows are left-padded (the HF default for generation).
    """
    generator = torch.Generator().manual_seed(seed)
    suffixes = suffix if isinstance(suffix, tuple) else (suffix,) * batch
    n_image = image_tokens(model)
    rows = []
    for b in range(batch):
        ids = [1]
        for _ in range(images_per_row):
            ids += torch.randint(3, 900, (prefix,), generator=generator).tolist() + [IMAGE_TOKEN] * n_image
        rows.append(ids + torch.randint(3, 900, (suffixes[b],), generator=generator).tolist())
    width = max(len(r) for r in rows)
    input_ids = torch.tensor([[0] * (width - len(r)) + r for r in rows])
    attention_mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    size = model.config.vision_config.image_size
    pixels = torch.randn(batch * images_per_row, 3, size, size, generator=generator)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "pixel_values": pixels.to(model.dtype)}


def row(inputs: dict[str, torch.Tensor], b: int, images_per_row: int = 1) -> dict[str, torch.Tensor]:
    """Row ``b`` of a batch from ``make_inputs``, without its padding."""
    keep = inputs["attention_mask"][b].bool()
    return {
        "input_ids": inputs["input_ids"][b : b + 1, keep],
        "attention_mask": inputs["attention_mask"][b : b + 1, keep],
        "pixel_values": inputs["pixel_values"][b * images_per_row : (b + 1) * images_per_row],
    }


@pytest.fixture(scope="session")
def llava15():
    """LLaVA-1.5 geometry (576 patches, 32 decoder layers), multi-head attention, sdpa."""
    return make_llava()


@pytest.fixture(scope="session")
def llava15_gqa():
    """The same geometry with grouped-query attention (2 KV heads for 4 query heads)."""
    return make_llava(kv_heads=2, seed=1)


@pytest.fixture(scope="session")
def tiny_demo_model(tmp_path_factory) -> Path:
    """The demo model's geometry (336 px, 576 patches, its processor) with tiny untrained widths,
    saved like the shipped model: for the commands that load a demo model directory."""
    from duet_vlm.demo.model import build_model, demo_config
    from duet_vlm.demo.processor import build_processor

    path = tmp_path_factory.mktemp("demo_model")
    processor = build_processor()
    config = demo_config(
        processor.tokenizer, vision_hidden=32, vision_intermediate=64, vision_layers=3, vision_heads=2,
        text_hidden=32, text_intermediate=64, text_layers=8, text_heads=2, text_kv_heads=1,
    )
    build_model(config).save_pretrained(path)
    processor.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def reference_dir() -> Path:
    """The in-repo reference vectors; missing files are an error, never a skip."""
    required = ["README.md", "inputs.json", "inputs.safetensors", "tiny-llava15-hf/model.safetensors"]
    missing = [name for name in required if not (REFERENCE / name).is_file()]
    if missing:
        raise FileNotFoundError(f"reference vectors missing from {REFERENCE}: {missing}")
    return REFERENCE
