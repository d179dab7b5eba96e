"""Record what the official V2Drop code's Qwen2-VL path computes on a tiny seeded Qwen2-VL, for
tests/test_v2drop.py to replay (``test_replays_the_official_qwen2_vl_run``). Not part of the library.

The official path (``Qwen2-VL/Qwen2VL_V2Drop/modeling_qwen2_vl_self.py``) is a modified copy of the
Qwen2-VL modeling file of the transformers the repository vendors (``Qwen2-VL/transformers``, version
4.45.0.dev0): it imports ``Qwen2RotaryEmbedding`` from that file, which transformers 4.45.0, the first
release with Qwen2-VL, renamed ``Qwen2VLRotaryEmbedding``, so no release runs it. It runs under the
vendored transformers itself, in an environment of its own:

    python3.11 -m venv /tmp/qwen2vl-venv
    git -C <V2Drop clone> archive 219e03ede8cf6a70d1534903fa238b13dd900bbb Qwen2-VL/Qwen2VL_V2Drop \\
        Qwen2-VL/transformers/src Qwen2-VL/transformers/setup.py Qwen2-VL/transformers/pyproject.toml \\
        Qwen2-VL/transformers/README.md Qwen2-VL/transformers/LICENSE | tar -x -C /tmp/v2drop-qwen
    /tmp/qwen2vl-venv/bin/pip install torch==2.13.0 tokenizers==0.19.1 safetensors pillow \\
        /tmp/v2drop-qwen/Qwen2-VL/transformers
    # the tiny model's weights, drawn with duet-vlm's environment (transformers 5):
    .venv/bin/python tools/record_v2drop_qwen2vl_official.py weights /tmp/tiny-qwen2vl.safetensors
    /tmp/qwen2vl-venv/bin/python tools/record_v2drop_qwen2vl_official.py /tmp/v2drop-qwen \\
        /tmp/tiny-qwen2vl.safetensors tests/data/vectors

The model (``hf_model``: the transformers-5 ``Qwen2VLForConditionalGeneration`` of ``TEXT`` and
``VISION``, 28 decoder layers, weights drawn from a seeded generator) and the inputs (``inputs``: a
336 x 448 px image of 192 merged tokens and its prompt) are defined here, once: the replay builds
them with these functions and checks their fingerprints against the recording's. The driver builds the
official ``Qwen2VLForConditionalGeneration`` (whose language model is the code's ``DART`` class) with
the same weights, runs one prefill and a 5-token greedy ``generate`` on CPU in fp32 (SDPA), and writes
``v2drop-official-qwen2vl.{json,safetensors}``. Recording is read-only: forward pre-hooks on the decoder
layers log lengths and 3-D M-RoPE position ids, a forward hook on the tower logs its output (the visual
tokens entering the language model), and the official module's ``torch.topk`` is wrapped to log its
scores, ``k`` and result. The code and the vendored transformers run unchanged, with no shim; what the driver supplies is what its
evaluation supplies from outside the repository (``DART_config``, the prefill's positions): see
``record``.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import sys
from pathlib import Path

COMMIT = "219e03ede8cf6a70d1534903fa238b13dd900bbb"
SOURCE = "Qwen2-VL/Qwen2VL_V2Drop/modeling_qwen2_vl_self.py"
LAYERS, RATIOS = (3, 16, 22), (0.25, 0.05, 0.0)  # the code's target_layer_indices and keep_ratio values
SEED = 2026  # the weights
INPUT_SEED = 81  # the prompt's ids and the pixels

#: The decoder (head_dim 8: the three M-RoPE sections add up to 4) and the tower (2 blocks of 32, 14 px
#: patches, 2 frames deep, merged 2x2).
TEXT = dict(vocab_size=99, hidden_size=32, intermediate_size=37, num_hidden_layers=28, num_attention_heads=4,
            num_key_value_heads=2, hidden_act="silu", rms_norm_eps=1e-5, max_position_embeddings=1024,
            rope_theta=10000.0, mrope_section=[2, 1, 1])
VISION = dict(depth=2, embed_dim=32, hidden_size=32, hidden_act="quick_gelu", mlp_ratio=2, num_heads=4, in_channels=3,
              patch_size=14, spatial_merge_size=2, temporal_patch_size=2)
IMAGE, VIDEO, VSTART, VEND = 3, 4, 5, 6
PAD, BOS, EOS = 0, 1, 2
IDS = dict(image_token_id=IMAGE, video_token_id=VIDEO, vision_start_token_id=VSTART, vision_end_token_id=VEND)
GRID = (1, 24, 32)  # patches (t, h, w): a 336 x 448 px image, 12 x 16 = 192 merged tokens
PREFIX, SUFFIX = 5, 10  # text ids before <|vision_start|> and after <|vision_end|>
QK_SCALE = 2.0  # query and key weights (the tower's too) scaled up: attention that is not flat


def hf_model():
    """The tiny Qwen2-VL under transformers 5 (duet-vlm's environment), its weights drawn in sorted
    name order from a generator seeded with ``SEED``: matrices (and the patch convolution) N(0, 1) /
    sqrt(fan_in), query and key rows times ``QK_SCALE``; token embeddings N(0, 1); norm weights 1 +
    N(0, 0.1^2); biases N(0, 0.02^2)."""
    import torch
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    text = {k: v for k, v in TEXT.items() if k not in ("rope_theta", "mrope_section")}
    text.update(rope_parameters={"rope_type": "default", "rope_theta": TEXT["rope_theta"],
                                 "mrope_section": TEXT["mrope_section"]},
                pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS, tie_word_embeddings=False)
    config = Qwen2VLConfig(text_config=text, vision_config=dict(VISION), tie_word_embeddings=False, **IDS)
    model = Qwen2VLForConditionalGeneration(config)
    generator = torch.Generator().manual_seed(SEED)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            draw = torch.randn(param.shape, generator=generator)
            if name.endswith("embed_tokens.weight"):
                value = draw
            elif param.ndim >= 2:
                value = draw / (param[0].numel() ** 0.5)
                if name.endswith(("q_proj.weight", "k_proj.weight")):
                    value = value * QK_SCALE
                elif name.endswith("attn.qkv.weight"):
                    value[: 2 * param.shape[0] // 3] *= QK_SCALE
            elif name.endswith("bias"):
                value = 0.02 * draw
            else:
                value = 1 + 0.1 * draw
            param.copy_(value)
    model.set_attn_implementation("sdpa")
    return model.float().eval()


def inputs():
    """``(input_ids, pixel_values, image_grid_thw)`` of the one sample: ``PREFIX`` text ids,
    <|vision_start|>, 192 <|image_pad|>, <|vision_end|>, ``SUFFIX`` text ids (ids in 7..98); the
    pixels are an image of 0.5 N(0, 1) noise and four flat rectangles, already normalised, cut into
    patches in Qwen's processor order (each 2x2 group of patches consecutive, both frames the image)."""
    import torch

    generator = torch.Generator().manual_seed(INPUT_SEED)
    text = torch.randint(7, TEXT["vocab_size"], (PREFIX + SUFFIX,), generator=generator).tolist()
    t, h, w = GRID
    merge, patch, frames = VISION["spatial_merge_size"], VISION["patch_size"], VISION["temporal_patch_size"]
    tokens = t * h * w // merge**2
    ids = text[:PREFIX] + [VSTART] + [IMAGE] * tokens + [VEND] + text[PREFIX:]
    image = 0.5 * torch.randn(3, h * patch, w * patch, generator=generator)
    for (top, left, height, width), colour in zip(
        [(28, 42, 84, 112), (150, 250, 112, 140), (220, 30, 90, 90), (10, 330, 60, 100)],
        [(1.2, -0.8, 0.4), (-1.0, 0.9, 1.1), (0.6, 1.3, -1.2), (-0.7, -0.6, 1.5)],
    ):
        image[:, top : top + height, left : left + width] += torch.tensor(colour)[:, None, None]
    patches = image[None].expand(frames, -1, -1, -1).reshape(
        t, frames, 3, h // merge, merge, patch, w // merge, merge, patch)
    pixels = patches.permute(0, 3, 6, 4, 7, 2, 1, 5, 8).reshape(t * h * w, 3 * frames * patch * patch)
    return torch.tensor([ids]), pixels.contiguous(), torch.tensor([GRID])


def fingerprint(tensors: dict) -> str:
    """sha256 over the sorted names and the float32 bytes of ``tensors``."""
    import torch

    digest = hashlib.sha256()
    for name in sorted(tensors):
        digest.update(name.encode())
        digest.update(tensors[name].detach().to(torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()


def parameters(model) -> dict:
    return {name: param for name, param in model.named_parameters()}


def write_weights(path: Path) -> None:
    """The helper run with duet-vlm's environment: ``hf_model``'s weights, transformers 5's names."""
    from safetensors.torch import save_file

    state = {name: param.detach().contiguous() for name, param in parameters(hf_model()).items()}
    save_file(state, str(path), metadata={"sha256": fingerprint(state)})
    print(path, fingerprint(state))


def build(official: Path, weights: Path):
    """The official ``Qwen2VLForConditionalGeneration`` (language model ``DART``) with the weights of
    ``weights`` (transformers 5's names mapped to the vendored 4.45's: ``model.language_model.`` ->
    ``model.``, ``model.visual.`` -> ``visual.``, ``lm_head.`` unchanged)."""
    sys.path.insert(0, str(official / "Qwen2-VL"))
    import torch
    from safetensors.torch import load_file

    from Qwen2VL_V2Drop import Qwen2VLForConditionalGeneration
    from Qwen2VL_V2Drop import modeling_qwen2_vl_self as module
    from Qwen2VL_V2Drop.configuration_qwen2_vl import Qwen2VLConfig

    text = {k: v for k, v in TEXT.items() if k != "mrope_section"}
    config = Qwen2VLConfig(**text, vision_config=dict(VISION), rope_scaling={"type": "mrope",
                           "mrope_section": TEXT["mrope_section"]}, tie_word_embeddings=False, use_sliding_window=False,
                           pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS, **IDS)
    config._attn_implementation = "sdpa"
    model = Qwen2VLForConditionalGeneration(config)
    names = {"model.language_model.": "model.", "model.visual.": "visual.", "lm_head.": "lm_head."}
    loaded = load_file(weights)
    state = {}
    for key, value in loaded.items():
        old = next(prefix for prefix in names if key.startswith(prefix))
        state[names[old] + key[len(old):]] = value
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not missing and not unexpected, (missing, unexpected)
    assert model.model.config is model.config
    return model.float().eval(), module, fingerprint(loaded)


def record(official: Path, weights: Path, out: Path) -> None:
    import torch
    import transformers
    from safetensors.torch import save_file

    model, module, weights_sha = build(official, weights)
    input_ids, pixels, grid = inputs()
    ids = input_ids[0].tolist()
    mask = torch.ones_like(input_ids)
    # The code reads the image block from ``config.DART_config`` (it is gated on it: ``None`` runs the
    # plain model). The released eval script passes image_token_start_index=0 and image_token_length=0,
    # which drop nothing; its lmms-eval model wrapper (not in the repository) must set them per sample.
    # Set here as the block's first <|image_pad|> and its length up to <|vision_end|>.
    start = ids.index(IMAGE)
    model.config.DART_config = {"image_token_start_index": start, "image_token_length": ids.index(VEND) - start}

    from official_recording import log_topk  # (this folder: the script's own, first on the path)

    calls = log_topk(module)
    seen = []

    def hook(layer, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        seen.append((hidden.shape[1], kwargs["position_ids"].reshape(3, -1).tolist()))

    features = []  # the tower's output: the merged visual tokens entering the language model

    def tower(module, args, output):
        features.append(output.detach().clone())

    layers = model.model.layers
    handles = [layer.register_forward_pre_hook(hook, with_kwargs=True) for layer in layers]
    handles.append(model.visual.register_forward_hook(tower))
    printed = io.StringIO()  # the code prints image_token_length / image_token_start_index at every layer
    with torch.no_grad(), contextlib.redirect_stdout(printed):
        # The code's forward takes its M-RoPE positions from ``generate`` (its
        # prepare_inputs_for_generation calls get_rope_index); without them it would number the
        # prompt 0..L-1 on all three axes. The prefill is the forward ``generate`` makes first.
        position_ids, rope_deltas = model.get_rope_index(input_ids, grid, None, mask)
        logits = model(input_ids=input_ids, attention_mask=mask, position_ids=position_ids, pixel_values=pixels,
                       image_grid_thw=grid, rope_deltas=rope_deltas).logits[0, -1]
        prefill, boundaries = list(seen), list(calls)
        seen.clear()
        calls.clear()
        generated = model.generate(input_ids=input_ids, attention_mask=mask, pixel_values=pixels, image_grid_thw=grid,
                                   max_new_tokens=5, do_sample=False, output_scores=True, return_dict_in_generate=True,
                                   eos_token_id=EOS, pad_token_id=PAD)
    for handle in handles:
        handle.remove()
    assert [k for _, k, _ in calls] == [k for _, k, _ in boundaries]  # generate's prefill dropped the same
    assert all(torch.equal(a[2], b[2]) for a, b in zip(calls, boundaries))
    assert len(features) == 2 and torch.equal(features[0], features[1])
    n = len(layers)
    steps = [seen[k * n : (k + 1) * n] for k in range(1, len(generated.scores))]
    from official_recording import boundary_records

    records, tensors = boundary_records(boundaries, LAYERS)
    tensors = {"prefill_last_logits": logits.contiguous(), "visual_features": features[0].contiguous(), **tensors}
    for step, scores in enumerate(generated.scores):
        tensors[f"gen_step{step}_logits"] = scores[0].contiguous()
    summary = {
        "official_run": {"repository": "xuyang-liu16/V2Drop", "commit": COMMIT, "source": SOURCE,
                         "torch": torch.__version__, "transformers": transformers.__version__ + " (Qwen2-VL/transformers)",
                         "attention": "sdpa", "dtype": "float32", "device": "cpu"},
        "config": "qwen2vl", "keep_ratios": list(RATIOS), "layers": list(LAYERS),
        "model": {"builder": "tools/record_v2drop_qwen2vl_official.py:hf_model", "seed": SEED, "weights_sha256": weights_sha},
        "inputs": {"builder": "tools/record_v2drop_qwen2vl_official.py:inputs", "seed": INPUT_SEED,
                   "input_ids": ids, "image_grid_thw": list(GRID), "pixel_values_sha256": fingerprint({"pixel_values": pixels})},
        "dart_config": model.config.DART_config,
        "boundaries": records,
        "prefill_per_layer_seq_len": [length for length, _ in prefill],
        "prefill_per_layer_position_ids": [positions for _, positions in prefill],
        "generate_prefill_per_layer_seq_len": [length for length, _ in seen[:n]],
        "decode_step_seq_len_per_layer": [[length for length, _ in step] for step in steps],
        "decode_step_position_ids_per_layer": [[[axis[0] for axis in positions] for _, positions in step] for step in steps],
        "greedy_new_tokens": generated.sequences[0, input_ids.shape[1]:].tolist(),
    }
    (out / "v2drop-official-qwen2vl.json").write_text(json.dumps(summary) + "\n")
    save_file(tensors, out / "v2drop-official-qwen2vl.safetensors")
    print([(r["layer"], r["n_before"], r["k"], r["margin"]) for r in records], summary["greedy_new_tokens"])


if __name__ == "__main__":
    if sys.argv[1] == "weights":
        write_weights(Path(sys.argv[2]))
    else:
        record(Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]))
