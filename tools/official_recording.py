"""What the drivers that record official code share (tools/record_*_official.py): for the official
LLaVA-1.5 code, the checkpoint's CLIP tower in transformers 4.37's layout and the official model with
a transformers-5 LLaVA checkpoint's weights (the tiny one of tests/data/vectors, or the shipped demo
model); for any, a seeded prompt, ``torch.topk`` logged inside an official module, each boundary's
record from those calls, and the command line that runs each configuration in a process of its own.
Runs in the official code's environment, imported by those scripts from their own folder. Not part
of the library."""

from __future__ import annotations

import json
import types
from pathlib import Path

#: transformers-5 LLaVA key prefixes -> the official LLaVA's
NAMES = {"multi_modal_projector.linear_1.": "model.mm_projector.0.", "multi_modal_projector.linear_2.": "model.mm_projector.2.",
         "language_model.model.": "model.", "language_model.lm_head.": "lm_head."}


def prompt_ids(seed: int, prefix: int, suffix: int) -> tuple[list[int], list[int]]:
    """``prefix`` and ``suffix`` ids in 2..900 drawn from a generator of ``seed``."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, 900, (prefix + suffix,), generator=generator).tolist()
    return ids[:prefix], ids[prefix:]


def write_tower(checkpoint: Path, folder: Path) -> None:
    """The checkpoint's CLIP tower in transformers 4.37's layout, for the official tower to load."""
    from safetensors.torch import load_file
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    config = json.loads((checkpoint / "config.json").read_text())["vision_config"]
    tower = CLIPVisionModel(CLIPVisionConfig(**{k: v for k, v in config.items() if k != "model_type"}))
    weights = load_file(checkpoint / "model.safetensors")
    state = {"vision_model." + k.removeprefix("vision_tower."): v for k, v in weights.items() if k.startswith("vision_tower.")}
    missing, unexpected = tower.load_state_dict(state, strict=False)
    assert not unexpected and all("position_ids" in k for k in missing), (missing, unexpected)
    tower.save_pretrained(folder)
    CLIPImageProcessor(crop_size=336, size=336).save_pretrained(folder)


def build(config_class, model_class, checkpoint: Path, tower: Path, **model_kwargs):
    """The official ``model_class`` (a ``LlavaLlamaForCausalLM``) with the checkpoint's weights, SDPA,
    its tower loaded from ``tower`` (``write_tower``), in eval mode."""
    from safetensors.torch import load_file

    whole = json.loads((checkpoint / "config.json").read_text())
    text = whole["text_config"]
    config = config_class(
        vocab_size=text["vocab_size"], hidden_size=text["hidden_size"], intermediate_size=text["intermediate_size"],
        num_hidden_layers=text["num_hidden_layers"], num_attention_heads=text["num_attention_heads"],
        num_key_value_heads=text["num_key_value_heads"], rms_norm_eps=text["rms_norm_eps"],
        rope_theta=text["rope_parameters"]["rope_theta"], max_position_embeddings=text["max_position_embeddings"],
        tie_word_embeddings=False, mm_vision_tower=str(tower), mm_hidden_size=whole["vision_config"]["hidden_size"],
        mm_projector_type="mlp2x_gelu", mm_vision_select_layer=-2, mm_vision_select_feature="patch",
        mm_patch_merge_type="flat", mm_use_im_start_end=False, mm_use_im_patch_token=False, image_aspect_ratio="pad",
    )
    config._attn_implementation = "sdpa"
    model = model_class(config, **model_kwargs)
    vision = model.get_vision_tower()
    if not vision.is_loaded:  # (built with delay_load, as the official builder loads it)
        vision.load_model()
    state = {}
    for key, value in load_file(checkpoint / "model.safetensors").items():
        for old, new in NAMES.items():
            if key.startswith(old):
                state[new + key[len(old):]] = value
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and all(k.startswith("model.vision_tower.") for k in missing), (missing, unexpected)
    return model.eval()


def log_topk(module) -> list:
    """Wrap ``torch.topk`` as ``module`` (an official module) sees it: each call's scores, ``k`` and
    indices are appended to the list returned; the results are unchanged."""
    import torch

    calls = []

    def topk(scores, k, dim=-1, largest=True):
        result = torch.topk(scores, k=k, dim=dim, largest=largest)
        calls.append((scores.detach().clone(), k, result.indices.clone()))
        return result

    module.torch = types.SimpleNamespace(**{n: getattr(torch, n) for n in dir(torch) if not n.startswith("__")})
    module.torch.topk = topk
    return calls


def boundary_records(calls, layers) -> tuple[list, dict]:
    """Each logged ``topk`` call (``log_topk``) as the recordings write a boundary: its layer, the
    tokens entering it, ``k``, the kept ones among them (ascending) and the margin between the k-th
    and the next score; and its scores as ``scores_layer<layer>``."""
    records, tensors = [], {}
    for (scores, k, indices), layer in zip(calls, layers):
        ordered = scores.sort(descending=True).values
        records.append({"layer": layer, "n_before": scores.shape[0], "k": k,
                        "kept_rel_sorted": sorted(indices.tolist()),
                        "margin": float(ordered[k - 1] - ordered[k]) if k < scores.shape[0] else None})
        tensors[f"scores_layer{layer}"] = scores.contiguous()
    return records, tensors


def main(script: str, record, configs) -> None:
    """``python SCRIPT OFFICIAL REFERENCE [CONFIG]``: ``record(official, reference, reference, config)``
    for one configuration, or each of ``configs`` in a process of its own (each imports its own copy
    of the official code)."""
    import subprocess
    import sys

    official_dir, reference_dir = Path(sys.argv[1]), Path(sys.argv[2])
    if len(sys.argv) > 3:
        record(official_dir, reference_dir, reference_dir, sys.argv[3])
    else:
        for config in configs:
            subprocess.run([sys.executable, script, *sys.argv[1:3], config], check=True)
