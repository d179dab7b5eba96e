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
from pathlib import Path

import official_recording as shared  # (this folder: the script's own, first on the path)

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
    return shared.prompt_ids(SEED, PREFIX, SUFFIX)


def build(official: Path, checkpoint: Path, tower: Path, visual_tokens: int):
    sys.path.insert(0, str(official))
    import torch

    from llava.model.language_model.llava_llama_x import LlavaConfig, LlavaLlamaForCausalLM_X

    model = shared.build(LlavaConfig, LlavaLlamaForCausalLM_X, checkpoint, tower, visual_token_num=visual_tokens,
                                 selected_indices=[])
    return model, torch


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
    shared.write_tower(checkpoint, work / "tower")
    visual_tokens, inner = CONFIGS[name]
    model, torch = build(work / "official", checkpoint, work / "tower", visual_tokens)
    # as the official eval scripts set them (model_vqa*.py)
    model.model.basis_token_num = BASIS
    model.model.layer_list = [LAYER]
    model.model.image_token_list = [visual_tokens, inner]
    from safetensors.torch import load_file, save_file

    from llava.model import llava_arch, modeling_llama_x

    fps_calls = []
    for module in (llava_arch, modeling_llama_x):
        fps = module.fps

        def logged_fps(x, k, fps=fps):
            result = fps(x, k)
            fps_calls.append((x.detach().clone(), k, result.clone()))
            return result

        module.fps = logged_fps
    vision_calls, inner_calls = shared.log_topk(llava_arch), shared.log_topk(modeling_llama_x)
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
        prefill, stages, draws, merged_input = list(seen), vision_calls + inner_calls, list(fps_calls), projector_inputs[0]
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
    shared.main(__file__, record, CONFIGS)
