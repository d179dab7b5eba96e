"""Record what the official ApET code computes on the tiny LLaVA-1.5 of tests/data/vectors
(``tiny-llava15-hf``), for tests/test_apet.py to replay. Not part of the library: it runs the official
code, which needs the transformers it was written for, in an environment of its own:

    python3.11 -m venv /tmp/apet-venv
    /tmp/apet-venv/bin/pip install torch==2.13.0 transformers==4.37.2 tokenizers==0.15.2 \\
        accelerate==0.21.0 safetensors sentencepiece protobuf pillow einops matplotlib
    git -C <ApET clone> archive 70cc01b215f4d74c5661c699919fe3aeda48bed0 llava | tar -x -C /tmp/apet-official
    /tmp/apet-venv/bin/python tools/record_apet_official.py /tmp/apet-official tests/data/vectors

It builds the official ``LlavaLlamaForCausalLM_X`` (the PyramidDrop-derived model whose
``layer_prune`` runs ApET inside the language model) with the tiny model's weights, sets
``basis_token_num``, ``layer_list`` and ``image_token_list`` as the official ``model_vqa*.py`` does,
and runs one prefill and a 5-token greedy ``generate`` on CPU in fp32, each after
``torch.manual_seed(SEED)`` (farthest-point sampling starts at a ``torch.randint`` draw). It writes
``apet-official-<config>.{json,safetensors}`` and ``apet-official-inputs.json``. Recording is
read-only: the official modules' ``fps`` and ``torch.topk`` are wrapped to log their inputs and
results, and forward pre-hooks log the projector's input (the merged features) and each decoder
layer's length, positions and input. The configuration ``64`` is the released setting (96 tokens out of
the vision side, 32 from layer 16, 10 basis tokens); ``192`` the same shape at three times the tokens
(288, then 96).

One change to the code: the released code casts its merged states to float16 (``.half()``, the
dtype its checkpoints run in, four places), which a float32 model cannot take (the projector's weights
are float32). The driver makes each a cast to the model's dtype.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
import types
from pathlib import Path

COMMIT = "70cc01b215f4d74c5661c699919fe3aeda48bed0"
SEED = 80
PREFIX, SUFFIX = 35, 12  # LLaVA-1.5's system prompt length before the image, and a question
CONFIGS = {"64": (96, 32), "192": (288, 96), "demo": (96, 32)}  # --visual_token_num, --image_token_list
DEMO_MODEL = Path(__file__).resolve().parent.parent / "src" / "duet_vlm" / "assets" / "demo_model"
LAYER, BASIS = 16, 10
HALF_CASTS = {  # file -> (released, replaced): each line occurs once in its file
    "llava/model/llava_arch.py": [("image_features = image_features.half()", "image_features = image_features.to(self.dtype)"),
                                  ("seed_features = seed_features.half()", "seed_features = seed_features.to(self.dtype)")],
    "llava/model/modeling_llama_x.py": [("image_embeds = image_embeds.half()", "image_embeds = image_embeds.to(features.dtype)"),
                                        ("seed_features = seed_features.half()", "seed_features = seed_features.to(features.dtype)")],
}


def prompt_ids() -> tuple[list[int], list[int]]:
    import torch

    generator = torch.Generator().manual_seed(SEED)
    ids = torch.randint(2, 900, (PREFIX + SUFFIX,), generator=generator).tolist()
    return ids[:PREFIX], ids[PREFIX:]


def write_tower(checkpoint: Path, folder: Path) -> None:
    """The tiny model's CLIP tower in transformers 4.37's layout, for the official tower to load."""
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


def build(official: Path, checkpoint: Path, tower: Path, visual_tokens: int):
    sys.path.insert(0, str(official))
    import torch
    from safetensors.torch import load_file

    from llava.model.language_model.llava_llama_x import LlavaConfig, LlavaLlamaForCausalLM_X

    whole = json.loads((checkpoint / "config.json").read_text())
    text = whole["text_config"]
    config = LlavaConfig(
        vocab_size=text["vocab_size"], hidden_size=text["hidden_size"], intermediate_size=text["intermediate_size"],
        num_hidden_layers=text["num_hidden_layers"], num_attention_heads=text["num_attention_heads"],
        num_key_value_heads=text["num_key_value_heads"], rms_norm_eps=text["rms_norm_eps"],
        rope_theta=text["rope_parameters"]["rope_theta"], max_position_embeddings=text["max_position_embeddings"],
        tie_word_embeddings=False, mm_vision_tower=str(tower), mm_hidden_size=whole["vision_config"]["hidden_size"], mm_projector_type="mlp2x_gelu",
        mm_vision_select_layer=-2, mm_vision_select_feature="patch", mm_patch_merge_type="flat",
        mm_use_im_start_end=False, mm_use_im_patch_token=False, image_aspect_ratio="pad",
    )
    config._attn_implementation = "sdpa"
    model = LlavaLlamaForCausalLM_X(config, visual_token_num=visual_tokens, selected_indices=[])
    vision = model.get_vision_tower()
    if not vision.is_loaded:  # (built with delay_load, as the official builder loads it)
        vision.load_model()
    weights = load_file(checkpoint / "model.safetensors")
    names = {"multi_modal_projector.linear_1.": "model.mm_projector.0.", "multi_modal_projector.linear_2.": "model.mm_projector.2.",
             "language_model.model.": "model.", "language_model.lm_head.": "lm_head."}
    state = {}
    for key, value in weights.items():
        for old, new in names.items():
            if key.startswith(old):
                state[new + key[len(old):]] = value
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and all(k.startswith("model.vision_tower.") for k in missing), (missing, unexpected)
    return model.eval(), torch


def record(official: Path, reference: Path, out: Path, name: str) -> None:
    work = Path(tempfile.mkdtemp())
    shutil.copytree(official, work / "official")
    for relative, replacements in HALF_CASTS.items():
        source = work / "official" / relative
        code = source.read_text()
        for old, new in replacements:
            assert code.count(old) == 1, (relative, old)
            code = code.replace(old, new)
        source.write_text(code)
    if name == "demo":  # the shipped demo model's first test question, as released otherwise
        checkpoint = DEMO_MODEL
        inputs = json.loads((reference / "demo-inputs.json").read_text())
        prefix, suffix = inputs["prefix_ids"], inputs["suffix_ids"]
        pixel_file, pixel_key = reference / "demo-inputs.safetensors", "pixel_values"
    else:
        checkpoint = reference / "tiny-llava15-hf"
        prefix, suffix = prompt_ids()
        pixel_file, pixel_key = reference / "inputs.safetensors", "pixel_values_0"
    write_tower(checkpoint, work / "tower")
    visual_tokens, inner = CONFIGS[name]
    model, torch = build(work / "official", checkpoint, work / "tower", visual_tokens)
    # as the official eval scripts set them (model_vqa*.py)
    model.model.basis_token_num = BASIS
    model.model.layer_list = [LAYER]
    model.model.image_token_list = [visual_tokens, inner]
    from safetensors.torch import load_file, save_file

    from llava.model import llava_arch, modeling_llama_x

    fps_calls, topk_calls = [], []
    for module in (llava_arch, modeling_llama_x):
        fps = module.fps

        def logged_fps(x, k, fps=fps):
            result = fps(x, k)
            fps_calls.append((x.detach().clone(), k, result.clone()))
            return result

        def topk(scores, k, dim=-1, largest=True):
            result = torch.topk(scores, k=k, dim=dim, largest=largest)
            topk_calls.append((scores.detach().clone(), k, result.indices.clone()))
            return result

        module.fps = logged_fps
        module.torch = types.SimpleNamespace(**{n: getattr(torch, n) for n in dir(torch) if not n.startswith("__")})
        module.torch.topk = topk
    seen, projector_inputs = [], []

    def hook(module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        positions = kwargs["position_ids"]
        positions = torch.stack(list(positions)) if isinstance(positions, list) else positions
        seen.append((hidden.shape[1], positions.reshape(-1).tolist(), hidden[0].detach().clone()))

    layers = model.model.layers
    handles = [layer.register_forward_pre_hook(hook, with_kwargs=True) for layer in layers]
    handles.append(model.model.mm_projector.register_forward_pre_hook(
        lambda module, args: projector_inputs.append(args[0].detach().clone())))
    input_ids = torch.tensor([prefix + [-200] + suffix])
    pixels = load_file(pixel_file)[pixel_key]
    with torch.no_grad():
        torch.manual_seed(SEED)
        logits = model(input_ids=input_ids, images=pixels, return_dict=True).logits[0, -1]
        prefill, stages, draws, merged_input = list(seen), list(topk_calls), list(fps_calls), projector_inputs[0]
        seen.clear()
        torch.manual_seed(SEED)
        generated = model.generate(input_ids, images=pixels, max_new_tokens=5, do_sample=False,
                                   output_scores=True, return_dict_in_generate=True, use_cache=True)
    for handle in handles:
        handle.remove()
    assert len(stages) == 2 and len(draws) == 2, (len(stages), len(draws))
    steps = [seen[k * len(layers) : (k + 1) * len(layers)] for k in range(1, len(generated.scores))]
    tokens = generated.sequences[0].tolist()
    if tokens and tokens[0] == 1:  # generate from inputs_embeds puts BOS first in transformers 4.37
        tokens = tokens[1:]
    tensors = {"prefill_last_logits": logits.contiguous(), "projector_input": merged_input[0].contiguous()}
    records = []
    for where, (errors, k, ranked), (tokens_in, count, basis) in zip(("vision", f"layer{LAYER}"), stages, draws):
        errors, ranked = errors.reshape(-1), ranked.reshape(-1)
        ordered = errors.sort(descending=True).values
        records.append({"stage": where, "n_before": errors.shape[0], "keep": k, "basis_count": count,
                        "basis": basis.reshape(-1).tolist(), "ranked": ranked.tolist(),
                        "kept_sorted": sorted(ranked.tolist()),
                        "margin": float(ordered[k - 1] - ordered[k]) if k < errors.shape[0] else None})
        tensors[f"errors_{where}"] = errors.contiguous()
        tensors[f"tokens_{where}"] = tokens_in.reshape(-1, tokens_in.shape[-1]).contiguous()
    tensors["layer0_visual_input"] = prefill[0][2][len(prefix):len(prefix) + visual_tokens].contiguous()
    tensors[f"layer{LAYER}_visual_input"] = prefill[LAYER][2][len(prefix):len(prefix) + inner].contiguous()
    for step, scores in enumerate(generated.scores):
        tensors[f"gen_step{step}_logits"] = scores[0].contiguous()
    import transformers

    summary = {
        "official_run": {"repository": "MaQianKun0/ApET", "commit": COMMIT,
                         "sources": ["llava/model/llava_arch.py", "llava/model/modeling_llama_x.py", "llava/model/utils.py"],
                         "torch": torch.__version__, "transformers": transformers.__version__, "attention": "sdpa",
                         "dtype": "float32", "device": "cpu", "seed": SEED},
        "config": name, "visual_token_num": visual_tokens, "layer_list": [LAYER], "image_token_list": [inner],
        "basis_token_num": BASIS, "stages": records,
        "prefill_per_layer_seq_len": [length for length, _, _ in prefill],
        "prefill_per_layer_position_ids": [positions for _, positions, _ in prefill],
        "decode_step_seq_len_per_layer": [[length for length, _, _ in step] for step in steps],
        "decode_step_position_ids_per_layer": [[positions[0] for _, positions, _ in step] for step in steps],
        "greedy_new_tokens": tokens,
    }
    (out / f"apet-official-{name}.json").write_text(json.dumps(summary) + "\n")
    save_file(tensors, out / f"apet-official-{name}.safetensors")
    if name != "demo":
        (out / "apet-official-inputs.json").write_text(json.dumps({"prefix_ids": prefix, "suffix_ids": suffix,
                                                                   "pixel_values": "inputs.safetensors:pixel_values_0"}) + "\n")
    print(name, [(r["stage"], r["n_before"], r["keep"], r["basis"][:3], r["margin"]) for r in records], tokens)


if __name__ == "__main__":
    official_dir, reference_dir = Path(sys.argv[1]), Path(sys.argv[2])
    if len(sys.argv) > 3:  # one configuration, in a process of its own (each imports its own copy of the code)
        record(official_dir, reference_dir, reference_dir, sys.argv[3])
    else:
        import subprocess

        for config in CONFIGS:
            subprocess.run([sys.executable, __file__, *sys.argv[1:3], config], check=True)
