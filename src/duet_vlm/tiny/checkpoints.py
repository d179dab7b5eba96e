"""Tiny random-weight checkpoints that vLLM 0.32 and transformers load: the vLLM plugin's tests and
its serving benchmark, and the tests of the commands that read a folder (``duet-vlm check``, ``run``,
``train``).

Two things differ from what transformers 5 writes with ``save_pretrained``: vLLM 0.32 loads a LLaVA
vision tower only under the older key layout of the llava-hf checkpoints (``vision_tower.vision_model.*``,
``language_model.model.*``, ``language_model.lm_head.*``, ``multi_modal_projector.*``), and its CPU
attention refuses some head sizes (24 is refused, 32 and 64 run): the decoders here have head_dim 32
unless told otherwise. The models are ``duet_vlm.tiny.models``' builders at these sizes. Each folder
holds the weights, the config, a word-level tokenizer (the shipped demo model's vocabulary), the
processor's config and a chat template, so that ``vllm.LLM(folder)`` and ``transformers`` both load
it. ``load_hf`` gives the transformers model of the same weights.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from .models import (
    QWEN_KINDS,
    QWEN_PATCHES,
    clip_tower,
    decoder,
    make_gemma3,
    make_gemma4,
    make_internvl,
    make_llava,
    make_llava_next,
    make_llava_onevision,
    qwen_classes,
    sharpen,
    siglip_tower,
)

DEMO = Path(__file__).resolve().parents[1] / "assets" / "demo_model"
IMAGE_TOKEN = 4  # "<image>" in the demo tokenizer
VOCAB = 71  # the demo tokenizer's vocabulary: every generated id decodes


@dataclass(frozen=True)
class TinySize:
    """A LLaVA-1.5-shaped model scaled down: ``layers`` decoder layers of ``hidden`` (``heads`` heads of
    ``hidden // heads``), a CLIP tower of ``vision_layers`` x ``vision_hidden`` on ``image_size`` pixels."""

    hidden: int = 128
    heads: int = 4
    layers: int = 4
    intermediate: int = 256
    vision_hidden: int = 64
    vision_heads: int = 4
    vision_layers: int = 4
    image_size: int = 336
    patch_size: int = 14
    vocab: int = VOCAB


def _clip(size: TinySize):
    return clip_tower(size.image_size, size.patch_size, size.vision_layers, size.vision_hidden, size.vision_heads,
                      intermediate=4 * size.vision_hidden)


def _llama(size: TinySize):
    from transformers import LlamaConfig

    return LlamaConfig(**decoder(size.layers, size.hidden, size.vocab, size.heads, size.heads,
                                 intermediate=size.intermediate), tie_word_embeddings=False)


def old_layout(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers 5's keys of a LLaVA-like model (LLaVA, Gemma 3) -> the layout vLLM 0.32 loads."""
    renames = (
        ("model.vision_tower.", "vision_tower.vision_model."),
        ("model.language_model.", "language_model.model."),
        ("model.multi_modal_projector.", "multi_modal_projector."),
        ("model.image_newline", "image_newline"),
        ("lm_head.", "language_model.lm_head."),
    )
    out = {}
    for key, value in state.items():
        for old, new in renames:
            if key.startswith(old):
                key = new + key[len(old) :]
                break
        out[key] = value.detach().contiguous().clone()
    return out


def _tokenizer_files(folder: Path, processor_class: str) -> None:
    shutil.copy(DEMO / "tokenizer.json", folder / "tokenizer.json")
    shutil.copy(DEMO / "chat_template.jinja", folder / "chat_template.jinja")
    config = json.loads((DEMO / "tokenizer_config.json").read_text())
    config["processor_class"] = processor_class
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))


def _clip_image_processor(size: int, cls: str = "CLIPImageProcessor") -> dict:
    return {
        "crop_size": {"height": size, "width": size}, "do_center_crop": True, "do_convert_rgb": True,
        "do_normalize": True, "do_rescale": True, "do_resize": True,
        "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711],
        "image_processor_type": cls, "resample": 3, "rescale_factor": 1 / 255, "size": {"shortest_edge": size},
    }


def _write(model, folder: Path, processor: dict, processor_class: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    config["dtype"] = "float32"
    config["architectures"] = [type(model).__name__]
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    save_file(old_layout(model.state_dict()), str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "processor_config.json").write_text(json.dumps({**processor, "processor_class": processor_class}, indent=2))
    _tokenizer_files(folder, processor_class)
    (folder / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}))
    return folder


def write_llava(folder: str | Path, size: TinySize = TinySize(), seed: int = 0, sharpness: float = 4.0) -> Path:
    """A LLaVA-1.5-shaped checkpoint (CLIP tower, feature layer -2, "default" strategy)."""
    model = make_llava(
        layers=size.layers, heads=size.heads, kv_heads=size.heads, hidden=size.hidden, seed=seed,
        intermediate=size.intermediate, vocab=size.vocab, max_positions=4096, vision=_clip(size),
        image_token_id=IMAGE_TOKEN, sharpness=sharpness, projector_hidden_act="gelu", tie_word_embeddings=False,
    )
    processor = {
        "image_processor": _clip_image_processor(size.image_size), "image_token": "<image>",
        "num_additional_image_tokens": 1, "patch_size": size.patch_size, "vision_feature_select_strategy": "default",
    }
    return _write(model, Path(folder), processor, "LlavaProcessor")


def write_llava_next(folder: str | Path, size: TinySize = TinySize(image_size=112), seed: int = 0, sharpness: float = 4.0) -> Path:
    """A LLaVA-NeXT-shaped checkpoint: anyres tiles of ``size.image_size`` pixels on a 1x2, 2x1 and
    2x2 grid of pinpoints, unpadding and newline tokens."""
    tile = size.image_size
    side = tile // size.patch_size
    model = make_llava_next(
        seed=seed, vision=_clip(size), text=_llama(size), image_token_id=IMAGE_TOKEN, sharpness=sharpness, newline=True,
        image_seq_length=side * side, projector_hidden_act="gelu", tie_word_embeddings=False,
    )
    pinpoints = model.config.image_grid_pinpoints
    image_processor = {
        **_clip_image_processor(tile, "LlavaNextImageProcessor"), "image_grid_pinpoints": pinpoints,
        "do_pad": True,
    }
    processor = {
        "image_processor": image_processor, "image_token": "<image>", "num_additional_image_tokens": 1,
        "patch_size": size.patch_size, "vision_feature_select_strategy": "default",
    }
    return _write(model, Path(folder), processor, "LlavaNextProcessor")


def write_llava_onevision(folder: str | Path, size: TinySize = TinySize(image_size=112), seed: int = 0,
                          sharpness: float = 4.0, largest_grid: int = 2) -> Path:
    """A LLaVA-OneVision-shaped checkpoint (a family the plugin does not serve yet): anyres tiles of
    ``size.image_size`` pixels on the pinpoints of ``write_llava_next``, a CLIP tower, every feature
    kept (strategy "full") from a SigLIP tower (no CLS, as released), ``<video>`` added to the demo
    vocabulary. ``largest_grid``: also a pinpoint of that many tiles a side (above 3, a large image's
    unpadded grid exceeds ``anyres_max_9`` and is resized after projection)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tile = size.image_size
    pinpoints = [[tile, 2 * tile], [2 * tile, tile], [2 * tile, 2 * tile]]
    if largest_grid > 2:
        pinpoints.append([largest_grid * tile, largest_grid * tile])
    side = tile // size.patch_size
    tokenizer = json.loads((DEMO / "tokenizer.json").read_text())
    video = len(tokenizer["model"]["vocab"])
    tokenizer["model"]["vocab"]["<video>"] = video
    tokenizer["added_tokens"].append({"id": video, "content": "<video>", "single_word": False, "lstrip": False,
                                      "rstrip": False, "normalized": False, "special": True})
    text = _llama(size)
    text.vocab_size = max(text.vocab_size, video + 1)
    model = make_llava_onevision(
        seed=seed, vision=siglip_tower(tile, size.patch_size, size.vision_layers, size.vision_hidden, size.vision_heads),
        text=text, pinpoints=pinpoints, image_token_id=IMAGE_TOKEN, video_token_id=video, sharpness=sharpness,
        vision_aspect_ratio="anyres_max_9", projector_hidden_act="gelu", tie_word_embeddings=False,
    )
    image_processor = {
        **_clip_image_processor(tile, "LlavaOnevisionImageProcessor"), "image_grid_pinpoints": pinpoints, "do_pad": True,
        "do_center_crop": False, "size": {"height": tile, "width": tile},
    }
    video_processor = {**{k: v for k, v in image_processor.items() if k != "image_processor_type"},
                       "video_processor_type": "LlavaOnevisionVideoProcessor"}
    processor = {
        "image_processor": image_processor, "video_processor": video_processor, "image_token": "<image>",
        "video_token": "<video>", "num_image_tokens": side * side, "vision_feature_select_strategy": "full",
    }
    _write(model, folder, processor, "LlavaOnevisionProcessor")
    (folder / "tokenizer.json").write_text(json.dumps(tokenizer))
    (folder / "chat_template.jinja").write_text(_with_videos((DEMO / "chat_template.jinja").read_text()))
    return folder


def _with_videos(template: str) -> str:
    """The demo's chat template with a ``<video>`` line for each video after the images' ``<image>`` lines."""
    images = "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    if images not in template:
        raise RuntimeError("the demo chat template no longer writes its images as expected: write its videos anew")
    return template.replace(images, images + images.replace("'image'", "'video'").replace("<image>", "<video>"))


#: A chat template in Gemma 3's form (turns, ``<start_of_image>`` where an image goes, Gemma 4's
#: ``<|video|>`` where a video goes), without ``{% generation %}`` spans, as Gemma's own templates are.
GEMMA_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<start_of_turn>{{ 'model' if message['role'] == 'assistant' "
    "else message['role'] }}\n{% for content in message['content'] %}{% if content['type'] == 'image' %}"
    "<start_of_image>{% elif content['type'] == 'video' %}<|video|>"
    "{% elif content['type'] == 'text' %}{{ content['text'] | trim }}{% endif %}{% endfor %}"
    "<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)


def _gemma_tokenizer(tokens) -> tuple[dict, dict[str, int]]:
    """The demo tokenizer (``tokenizer.json``'s content) with ``tokens`` added after its vocabulary
    as special tokens, and their ids."""
    tokenizer = json.loads((DEMO / "tokenizer.json").read_text())
    ids = {}
    for token in tokens:
        ids[token] = len(tokenizer["model"]["vocab"])
        tokenizer["model"]["vocab"][token] = ids[token]
        tokenizer["added_tokens"].append({"id": ids[token], "content": token, "single_word": False, "lstrip": False,
                                          "rstrip": False, "normalized": False, "special": True})
    return tokenizer, ids


def write_gemma3(folder: str | Path, seed: int = 0, layers: int = 2, gemma_template: bool = True,
                 space_token: bool = False, window: int = 16, layer_types: list[str] | None = None) -> Path:
    """A Gemma-3-shaped checkpoint: a SigLIP tower on 32-pixel images (16 soft tokens), ``layers``
    decoder layers (sliding ones of a ``window``-token window, the last global; or ``layer_types``),
    the demo tokenizer with Gemma's image tokens and
    newlines added after its vocabulary; with ``gemma_template`` (the default) a chat template in
    Gemma's form (``GEMMA_CHAT_TEMPLATE``, which writes the ``<start_of_image>`` vLLM's processor
    expands), else the demo's (``<image>``: a chat request with an image then fails). With
    ``space_token`` a token for a space too, which the word-level tokenizer otherwise drops:
    Gemma's own tokenizer keeps the space the processor
    writes between pan-and-scan blocks, and without it vLLM's Gemma 3 processor joins the blocks'
    newline tokens and puts the crops' embeddings in the wrong places (unreduced, too). Enough for
    vLLM to serve it and for ``duet-vlm train`` to fine-tune it."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    newlines = ("\n" * n for n in range(1, 5))  # vLLM's Gemma 3 processor looks up runs of 1 to 4
    tokenizer, ids = _gemma_tokenizer(("<start_of_image>", "<end_of_image>", "<image_soft_token>", *newlines,
                                       *((" ",) if space_token else ())))
    model = make_gemma3(
        layers=layers, seed=seed, window=window,
        layer_types=layer_types or ["sliding_attention"] * (layers - 1) + ["full_attention"],
        vocab=max(ids.values()) + 1, head_dim=32, vision_layers=2, image_token_id=ids["<image_soft_token>"],
        boi=ids["<start_of_image>"], eoi=ids["<end_of_image>"], sharpened=False,
    )
    image_processor = {
        "image_processor_type": "Gemma3ImageProcessor", "do_resize": True, "size": {"height": 32, "width": 32},
        "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": [0.5, 0.5, 0.5],
        "image_std": [0.5, 0.5, 0.5], "do_convert_rgb": True, "do_pan_and_scan": False, "resample": 2,
    }
    _write(model, folder, {"image_processor": image_processor, "image_seq_length": 16}, "Gemma3Processor")
    (folder / "tokenizer.json").write_text(json.dumps(tokenizer))
    tokenizer_config = json.loads((folder / "tokenizer_config.json").read_text())
    tokenizer_config["extra_special_tokens"] = {
        "boi_token": "<start_of_image>", "eoi_token": "<end_of_image>", "image_token": "<image_soft_token>",
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2))
    if gemma_template:
        (folder / "chat_template.jinja").write_text(GEMMA_CHAT_TEMPLATE)
    return folder


def write_gemma4(folder: str | Path, seed: int = 0, layers: int = 4, head_dim: int = 16, image_blocks: bool = True,
                 layer_types: list[str] | None = None, kv_shared: int = 0) -> Path:
    """A Gemma-4-shaped checkpoint in transformers' layout, for ``duet-vlm train`` and the Hugging Face
    path: a 2-layer vision tower of 4-pixel patches pooled 3x3 into soft tokens (``max_soft_tokens``
    70, the ladder's lowest rung), ``layers`` decoder layers (sliding, the last global, unless
    ``layer_types`` says; the last ``kv_shared`` of them reusing the keys and values of the last earlier
    layer of their kind, none by default), a window of 16 tokens,
    per-layer inputs, the demo tokenizer with Gemma 4's image, video and audio tokens, and a chat
    template in Gemma's form (``GEMMA_CHAT_TEMPLATE``, the image marked by its soft token, as Gemma 4's
    processor expects). ``head_dim``: the sliding layers' (the global layers' is twice it; vLLM's CPU
    attention needs 32 or more). ``image_blocks``: whether an image's tokens attend to each other both
    ways in the sliding layers (``use_bidirectional_attention="vision"``, as released Gemma 4 does),
    else causally everywhere (what vLLM 0.32's CPU backend runs). Needs no torchvision: the video
    processor (its patches and pooling as the images') is written as the config it is built from."""
    from transformers import Gemma4AudioFeatureExtractor, Gemma4ImageProcessorPil, Gemma4Processor, PreTrainedTokenizerFast

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer, ids = _gemma_tokenizer((
        "<start_of_image>", "<end_of_image>", "<image_soft_token>", "<|video|>", "<start_of_audio>", "<end_of_audio>",
        "<audio_soft_token>",
    ))
    # ``default_output_length``: the soft-token capacity released Gemma 4 configs carry (280 there), which
    # vLLM 0.32 reads and transformers 5.23's config class no longer declares (kept as given)
    model = make_gemma4(
        layers=layers, seed=seed, window=16,
        layer_types=layer_types or ["sliding_attention"] * (layers - 1) + ["full_attention"], kv_shared=kv_shared, bidirectional="vision" if image_blocks else None, vocab=max(ids.values()) + 1, head_dim=head_dim,
        vision_layers=2, image_token_id=ids["<image_soft_token>"], boi=ids["<start_of_image>"],
        eoi=ids["<end_of_image>"], video_token_id=ids["<|video|>"], audio_token_id=ids["<audio_soft_token>"],
        sharpness=None, default_output_length=70,
    )
    model.save_pretrained(folder)
    (folder / "tokenizer.json").write_text(json.dumps(tokenizer))
    fast = PreTrainedTokenizerFast(
        tokenizer_file=str(folder / "tokenizer.json"), bos_token="<s>", eos_token="</s>", pad_token="<pad>",
        unk_token="<unk>", extra_special_tokens={
            "boi_token": "<start_of_image>", "eoi_token": "<end_of_image>", "image_token": "<image_soft_token>",
            "boa_token": "<start_of_audio>", "eoa_token": "<end_of_audio>", "audio_token": "<audio_soft_token>",
        },
    )
    images = Gemma4ImageProcessorPil(patch_size=4, max_soft_tokens=70, pooling_kernel_size=3)

    class Gemma4ProcessorWithoutVideo(Gemma4Processor):
        """Takes ``video_processor=None``: transformers' ``Gemma4VideoProcessor`` needs torchvision."""

        def check_argument_for_proper_class(self, argument_name, argument):
            if argument_name != "video_processor":
                return super().check_argument_for_proper_class(argument_name, argument)

    processor = Gemma4ProcessorWithoutVideo(
        feature_extractor=Gemma4AudioFeatureExtractor(), image_processor=images, tokenizer=fast, video_processor=None,
        image_seq_length=70, chat_template=GEMMA_CHAT_TEMPLATE.replace("<start_of_image>", "<image_soft_token>"),
    )
    # What save_pretrained writes, the video processor as the config AutoVideoProcessor builds it from
    fast._set_processor_class("Gemma4Processor")
    fast.save_pretrained(folder)
    (folder / "chat_template.jinja").write_text(processor.chat_template)
    video = {"video_processor_type": "Gemma4VideoProcessor", "patch_size": 4, "max_soft_tokens": 70, "pooling_kernel_size": 3}
    config = {**processor.to_dict(), "video_processor": video, "processor_class": "Gemma4Processor"}
    (folder / "processor_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return folder


def load_hf(folder: str | Path):
    """The transformers model of a folder written here (the old layout read back), float32, eval."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForImageTextToText

    folder = Path(folder)
    config = AutoConfig.from_pretrained(folder)
    model = AutoModelForImageTextToText.from_config(config).float().eval()
    state = load_file(str(folder / "model.safetensors"))
    back = {}
    for key, value in state.items():
        for new, old in (
            ("vision_tower.vision_model.", "model.vision_tower."),
            ("language_model.model.", "model.language_model."),
            ("multi_modal_projector.", "model.multi_modal_projector."),
            ("image_newline", "model.image_newline"),
            ("language_model.lm_head.", "lm_head."),
        ):
            if key.startswith(new):
                key = old + key[len(new) :]
                break
        back[key] = value
    missing, unexpected = model.load_state_dict(back, strict=False)
    if unexpected or [m for m in missing if "position_ids" not in m]:
        raise RuntimeError(f"checkpoint mismatch: missing {missing}, unexpected {unexpected}")
    return model


QWEN_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
QWEN_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for content in message['content'] %}"
    "{% if content['type'] in ('image', 'image_url') %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] in ('video', 'video_url') %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _added_tokens(folder: Path, special: list[str], config: dict, template: str) -> dict[str, int]:
    """The demo vocabulary plus ``special`` tokens (ids after it), with ``config`` as the tokenizer's
    config and ``template`` as its chat template; returns the special ids."""
    tokenizer = json.loads((DEMO / "tokenizer.json").read_text())
    vocab = tokenizer["model"]["vocab"]
    ids = {}
    for token in special:
        ids[token] = len(vocab)
        vocab[token] = ids[token]
        tokenizer["added_tokens"].append(
            {"id": ids[token], "content": token, "single_word": False, "lstrip": False, "rstrip": False,
             "normalized": False, "special": True}
        )
    (folder / "tokenizer.json").write_text(json.dumps(tokenizer))
    (folder / "chat_template.jinja").write_text(template)
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "backend": "tokenizers", "tokenizer_class": "TokenizersBackend", "unk_token": "<unk>", "model_max_length": 4096,
        "padding_side": "left", **config,
    }, indent=2))
    return ids


def _qwen_tokenizer(folder: Path, processor_class: str = "Qwen2_5_VLProcessor") -> dict[str, int]:
    """The demo vocabulary plus Qwen's special tokens (ids after it); returns the special ids."""
    return _added_tokens(folder, QWEN_SPECIAL, {
        "bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
        "processor_class": processor_class, "image_token": "<|image_pad|>", "video_token": "<|video_pad|>",
        "vision_start_token": "<|vision_start|>", "vision_end_token": "<|vision_end|>",
        "extra_special_tokens": {"image_token": "<|image_pad|>", "video_token": "<|video_pad|>",
                                 "vision_start_token": "<|vision_start|>", "vision_end_token": "<|vision_end|>"},
    }, QWEN_TEMPLATE)


def _save_native(model, folder: Path) -> None:
    """``model``'s config and weights under transformers 5's own key layout (which vLLM 0.32 maps for
    the Qwen-VL families and InternVL), float32, its class named as the architecture."""
    model.config.save_pretrained(folder)
    written = json.loads((folder / "config.json").read_text())
    written["architectures"] = [type(model).__name__]
    written["dtype"] = "float32"
    (folder / "config.json").write_text(json.dumps(written, indent=2))
    state = {key: value.detach().contiguous().clone() for key, value in model.state_dict().items()}
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})


def write_qwen_vl(folder: str | Path, seed: int = 0, sharpness: float = 4.0, layers: int = 4,
                  kind: str = "qwen2_5_vl", *, hidden: int = 128, heads: int = 4, kv_heads: int = 2,
                  intermediate: int | None = None, vision_fields: dict | None = None, max_pixels: int = 448 * 448) -> Path:
    """A tiny Qwen-VL checkpoint of the real classes: a 4-block vision tower with 14-pixel patches
    and a 2x2 merger, a decoder with head_dim 32 and M-RoPE; the processor resizes to multiples of
    28 pixels between 56x56 and 448x448. ``kind``: ``"qwen2_5_vl"`` (window attention, full
    attention in blocks 1 and 3), ``"qwen2_vl"`` (every block attends over the whole image) or
    ``"qwen3_vl"`` (learned position embeddings, DeepStack from blocks 1 and 2, interleaved M-RoPE
    and a q/k-normed decoder) or ``"qwen3_5"`` (Qwen3-VL's tower without DeepStack; a hybrid decoder,
    Gated-DeltaNet linear attention in layers 0 and 2 and full attention with a gated query and
    partial RoPE in layers 1 and 3 (released models attend in every fourth layer; two of four here
    make positions matter beyond bfloat16's noise); linear heads of 128 channels,
    the one size vLLM's CPU kernel takes) or ``"qwen3_5_moe"`` (the same with 4 experts, 2 per token).
    Larger (the serving benchmark's): ``hidden``, ``heads``, ``kv_heads`` and ``intermediate`` size the
    decoder (its M-RoPE sections scale with the head's width), ``vision_fields`` overrides the tower's config
    fields, ``max_pixels`` the largest image the processor keeps."""
    config_class, model_class = qwen_classes(kind)
    processor_class = QWEN_KINDS[kind][2]
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    ids = _qwen_tokenizer(folder, processor_class)
    vocab = max(ids.values()) + 1
    text = {
        **decoder(layers, hidden, vocab, heads, kv_heads, intermediate=intermediate), "rms_norm_eps": 1e-6,
        "tie_word_embeddings": False,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [
            hidden // heads // 8, 3 * hidden // heads // 16, 3 * hidden // heads // 16]},  # [4, 6, 6] at head_dim 32
        "bos_token_id": None, "eos_token_id": ids["<|im_end|>"], "pad_token_id": ids["<|endoftext|>"],
    }
    vision = dict(
        QWEN_PATCHES, depth=4, hidden_size=64, intermediate_size=128, num_heads=2, out_hidden_size=hidden, window_size=56,
        fullatt_block_indexes=[1, 3], in_channels=3, tokens_per_second=2,
    )
    if kind == "qwen2_vl":
        vision = dict(QWEN_PATCHES, depth=4, embed_dim=64, hidden_size=hidden, mlp_ratio=2, num_heads=2, in_channels=3)
    elif kind in ("qwen3_vl", "qwen3_5", "qwen3_5_moe"):
        text["rope_parameters"]["mrope_interleaved"] = True
        vision = dict(QWEN_PATCHES, depth=4, hidden_size=64, intermediate_size=128, num_heads=2, out_hidden_size=hidden,
                      in_channels=3, num_position_embeddings=256, deepstack_visual_indexes=[1, 2])
    if kind in ("qwen3_5", "qwen3_5_moe"):
        vision.pop("deepstack_visual_indexes")
        # a quarter of head_dim 32 rotates: the M-RoPE sections add up to 4; a short wavelength
        # (theta 100), so that positions move the attention layers' output beyond bfloat16's noise
        text["rope_parameters"].update(mrope_section=[2, 1, 1], partial_rotary_factor=0.25, rope_theta=100.0)
        text.update(linear_conv_kernel_dim=4, linear_key_head_dim=128, linear_value_head_dim=128, linear_num_key_heads=1,
                    linear_num_value_heads=2, layer_types=[
                        "full_attention" if i % 2 else "linear_attention" for i in range(layers)])
    vision.update(vision_fields or {})
    if kind == "qwen3_5_moe":
        text.update(moe_intermediate_size=64, shared_expert_intermediate_size=64, num_experts=4, num_experts_per_tok=2)
    config = config_class(
        text_config=text, vision_config=vision, image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        bos_token_id=None, eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"], tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = sharpen(model_class(config), sharpness).float().eval()
    with torch.no_grad():  # the vision tower's fused qkv: sharpen its query and key rows too
        for block in model.model.visual.blocks:
            width = block.attn.qkv.weight.shape[0] // 3
            block.attn.qkv.weight[: 2 * width].mul_(sharpness)
    _save_native(model, folder)
    image_processor = {
        "image_processor_type": "Qwen2VLImageProcessor", "do_resize": True, "do_rescale": True, "do_normalize": True,
        "do_convert_rgb": True, "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_std": [0.26862954, 0.26130258, 0.27577711], "rescale_factor": 1 / 255, "patch_size": 14,
        "merge_size": 2, "temporal_patch_size": 2, "size": {"shortest_edge": 56 * 56, "longest_edge": max_pixels},
        "resample": 3,
    }
    video_processor = {
        **{k: v for k, v in image_processor.items() if k != "image_processor_type"},
        "video_processor_type": "Qwen3VLVideoProcessor" if kind == "qwen3_vl" else "Qwen2VLVideoProcessor", "size": {"shortest_edge": 56 * 56, "longest_edge": 4 * 224 * 224},
        "fps": 2.0, "do_sample_frames": False,
    }
    (folder / "processor_config.json").write_text(json.dumps(
        {"image_processor": image_processor, "video_processor": video_processor,
         "processor_class": processor_class},
        indent=2,
    ))
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": ids["<|im_end|>"], "pad_token_id": ids["<|endoftext|>"]}))
    return folder


INTERNVL_SPECIAL = ["<|im_start|>", "<|im_end|>", "<img>", "</img>", "<IMG_CONTEXT>", "<video>"]
INTERNVL_TEMPLATE = (QWEN_TEMPLATE.replace("<|vision_start|><|image_pad|><|vision_end|>", "<IMG_CONTEXT>")
                     .replace("<|vision_start|><|video_pad|><|vision_end|>", "<video>"))


def write_internvl(folder: str | Path, seed: int = 0, sharpness: float = 4.0, layers: int = 4, tile: int = 56) -> Path:
    """A tiny InternVL3 checkpoint of the real classes (``InternVLForConditionalGeneration``, which
    vLLM 0.32 serves with its ``InternS1ForConditionalGeneration``): ``tile``-pixel tiles of 7-pixel
    patches (8 x 8 at 56 px), a 0.5 pixel shuffle (16 tokens a tile), a 3-layer ViT of width 64 (2
    heads of 32) with a random CLS token and position embeddings, and a Qwen2 decoder with head_dim
    32; the processor (``GotOcr2ImageProcessor``) cuts an image into 1 to 6 tiles by its aspect ratio
    and adds a thumbnail when there is more than one, as InternVL's does at 448 px."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    ids = _added_tokens(folder, INTERNVL_SPECIAL, {
        "bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<pad>", "processor_class": "InternVLProcessor",
        "extra_special_tokens": {"start_image_token": "<img>", "end_image_token": "</img>",
                                 "context_image_token": "<IMG_CONTEXT>", "video_token": "<video>"},
    }, INTERNVL_TEMPLATE)
    patch = 7
    tokens = (tile // patch // 2) ** 2
    model = make_internvl(
        layers=layers, seed=seed, tile=tile, patch=patch, vision_hidden=64, vision_heads=2, hidden=128,
        vocab=max(ids.values()) + 1, image_token_id=ids["<IMG_CONTEXT>"], sharpness=sharpness,
        text_fields=dict(bos_token_id=None, eos_token_id=ids["<|im_end|>"], tie_word_embeddings=False),
        fields=dict(tie_word_embeddings=False),
    )
    _save_native(model, folder)
    image_processor = {
        "image_processor_type": "GotOcr2ImageProcessor", "do_resize": True, "do_rescale": True, "do_normalize": True,
        "do_convert_rgb": True, "crop_to_patches": True, "min_patches": 1, "max_patches": 6,
        "image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225], "rescale_factor": 1 / 255,
        "size": {"height": tile, "width": tile}, "resample": 3,
    }
    video_processor = {**{k: v for k, v in image_processor.items() if k not in ("image_processor_type", "crop_to_patches",
                                                                              "min_patches", "max_patches")},
                       "video_processor_type": "InternVLVideoProcessor", "do_sample_frames": False}
    (folder / "processor_config.json").write_text(json.dumps(
        {"image_processor": image_processor, "video_processor": video_processor, "image_seq_length": tokens,
         "processor_class": "InternVLProcessor"}, indent=2))
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": ids["<|im_end|>"], "pad_token_id": 0}))
    return folder
