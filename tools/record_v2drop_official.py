"""Record what the official V2Drop code computes on the tiny LLaVA-1.5 of tests/data/vectors
(``tiny-llava15-hf``), for tests/test_v2drop.py to replay. Not part of the library: it runs the
official code, which needs the transformers it was written for, in an environment of its own:

    python3.11 -m venv /tmp/v2drop-venv
    /tmp/v2drop-venv/bin/pip install torch==2.13.0 transformers==4.37.2 tokenizers==0.15.2 \\
        accelerate==0.21.0 safetensors sentencepiece protobuf pillow
    git -C <V2Drop clone> archive 219e03ede8cf6a70d1534903fa238b13dd900bbb | tar -x -C /tmp/v2drop-official
    /tmp/v2drop-venv/bin/python tools/record_v2drop_official.py /tmp/v2drop-official tests/data/vectors

It builds the official ``LlavaLlamaForCausalLM`` (whose language model is ``V2DropLlamaModel``) with the
tiny model's weights (the CLIP tower saved in transformers 4.37's layout, loaded by the official
``CLIPVisionTower``), runs one prefill and a 5-token greedy ``generate`` on CPU in fp32, and writes
``v2drop-official-<config>.{json,safetensors}`` and ``v2drop-official-inputs.json``. Recording is
read-only: forward pre-hooks on the decoder layers log lengths and positions, and the official module's
``torch.topk`` is wrapped to log its scores, ``k`` and result. The configuration ``released`` runs the
code as released; ``paper-128`` runs it with its three ``keep_ratio`` assignments rewritten to the
paper's 128-token schedule (keep 0.28, 0.25, 0), the only change to the code. The environment
has one change (``whole_table`` below): without it the released code fails at its first drop under
the transformers it pins.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from pathlib import Path

import official_recording as shared  # (this folder: the script's own, first on the path)

COMMIT = "219e03ede8cf6a70d1534903fa238b13dd900bbb"
PREFIX, SUFFIX = 35, 12  # the official code's image offset (LLaVA-1.5's system prompt) and a question
CONFIGS = {"released": (0.5, 0.5, 0.0), "paper-128": (0.28, 0.25, 0.0), "demo": (0.5, 0.5, 0.0)}
DEMO_MODEL = Path(__file__).resolve().parent.parent / "src" / "duet_vlm" / "assets" / "demo_model"
SOURCE = "llava/model/language_model/V2Drop.py"


def prompt_ids() -> tuple[list[int], list[int]]:
    return shared.prompt_ids(79, PREFIX, SUFFIX)


def build(official: Path, checkpoint: Path, tower: Path):
    sys.path.insert(0, str(official))
    import torch

    from llava.model.language_model.llava_llama import LlavaConfig, LlavaLlamaForCausalLM

    return shared.build(LlavaConfig, LlavaLlamaForCausalLM, checkpoint, tower), torch


def record(official: Path, reference: Path, out: Path, name: str) -> None:
    work = Path(tempfile.mkdtemp())
    shutil.copytree(official, work / "official")
    source = work / "official" / SOURCE
    code = source.read_text()
    if name == "demo":  # the shipped demo model's first test question, as released otherwise
        checkpoint = DEMO_MODEL
        inputs = json.loads((reference / "demo-inputs.json").read_text())
        prefix, suffix = inputs["prefix_ids"], inputs["suffix_ids"]
        pixel_file, pixel_key = reference / "demo-inputs.safetensors", "pixel_values"
        # the code's image offset: LLaVA-1.5's system prompt (35 ids), the demo prompt's 3 here
        lines = code.split("\n")
        offsets = [i for i, line in enumerate(lines) if "arange(" in line and "35" in line]
        assert len(offsets) == 2, offsets
        for i in offsets:
            lines[i] = lines[i].replace("35", str(len(prefix)))
        code = "\n".join(lines)
        source.write_text(code)
    else:
        checkpoint = reference / "tiny-llava15-hf"
        prefix, suffix = prompt_ids()
        pixel_file, pixel_key = reference / "inputs.safetensors", "pixel_values_0"
    if name not in ("released", "demo"):  # the three keep_ratio assignments, in layer order
        released = ["keep_ratio = 0.5", "keep_ratio = 0.5", "keep_ratio = 0"]
        head, rest = "", code
        for old, ratio in zip(released, CONFIGS[name]):
            before, _, rest = rest.partition(old)
            head += before + f"keep_ratio = {ratio}"
        code = head + rest
        source.write_text(code)
    shared.write_tower(checkpoint, work / "tower")
    model, torch = build(work / "official", checkpoint, work / "tower")
    # The released code gathers the kept tokens' original position ids, but transformers 4.37.2 (which
    # it pins) cuts each layer's RoPE table to that layer's key count before indexing it with them: at
    # the first drop, IndexError (position 409 of a 335-row table). The table is handed whole instead,
    # what the code's gather means and what later transformers compute from position ids: the one
    # change to the environment, which leaves every layer without a drop as it was.
    from transformers.models.llama import modeling_llama

    def whole_table(self, x, seq_len=None):
        if seq_len > self.max_seq_len_cached:
            self._set_cos_sin_cache(seq_len=seq_len, device=x.device, dtype=x.dtype)
        return self.cos_cached.to(dtype=x.dtype), self.sin_cached.to(dtype=x.dtype)

    modeling_llama.LlamaRotaryEmbedding.forward = whole_table
    from safetensors.torch import load_file, save_file

    from llava.model.language_model import V2Drop as official_module

    calls = shared.log_topk(official_module)
    seen = []

    def hook(module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        seen.append((hidden.shape[1], kwargs["position_ids"].reshape(-1).tolist()))

    layers = model.model.layers
    handles = [layer.register_forward_pre_hook(hook, with_kwargs=True) for layer in layers]
    input_ids = torch.tensor([prefix + [-200] + suffix])
    pixels = load_file(pixel_file)[pixel_key]
    with torch.no_grad():
        logits = model(input_ids=input_ids, images=pixels).logits[0, -1]
        prefill, boundaries = list(seen), list(calls)
        seen.clear()
        # the official ``LlavaLlamaForCausalLM.generate`` without its CUDA timing (no GPU here): its
        # multimodal preparation, then transformers' generate on the embeddings, as it calls them
        from transformers import LlamaForCausalLM

        _, position_ids, attention_mask, _, embeds, _ = model.prepare_inputs_labels_for_multimodal(
            input_ids, None, None, None, None, pixels, image_sizes=None)
        generated = LlamaForCausalLM.generate(model, position_ids=position_ids, attention_mask=attention_mask,
                                              inputs_embeds=embeds, max_new_tokens=5, do_sample=False,
                                              output_scores=True, return_dict_in_generate=True, use_cache=True)
    for handle in handles:
        handle.remove()
    lengths = [length for length, _ in seen]
    steps = [seen[k * len(layers) : (k + 1) * len(layers)] for k in range(1, len(generated.scores))]
    tokens = generated.sequences[0].tolist()
    if tokens and tokens[0] == 1:  # generate from inputs_embeds puts BOS first in transformers 4.37
        tokens = tokens[1:]
    records, tensors = shared.boundary_records(boundaries, (3, 17, 22))
    tensors = {"prefill_last_logits": logits.contiguous(), **tensors}
    for step, scores in enumerate(generated.scores):
        tensors[f"gen_step{step}_logits"] = scores[0].contiguous()
    import transformers

    summary = {
        "official_run": {"repository": "xuyang-liu16/V2Drop", "commit": COMMIT, "source": SOURCE,
                         "torch": torch.__version__, "transformers": transformers.__version__, "attention": "sdpa",
                         "dtype": "float32", "device": "cpu"},
        "config": name, "keep_ratios": list(CONFIGS[name]), "layers": [3, 17, 22],
        "boundaries": records,
        "prefill_per_layer_seq_len": [length for length, _ in prefill],
        "prefill_per_layer_position_ids": [positions for _, positions in prefill],
        "generate_prefill_per_layer_seq_len": lengths[: len(layers)],
        "decode_step_seq_len_per_layer": [[length for length, _ in step] for step in steps],
        "decode_step_position_ids_per_layer": [[positions[0] for _, positions in step] for step in steps],
        "greedy_new_tokens": tokens,
    }
    (out / f"v2drop-official-{name}.json").write_text(json.dumps(summary) + "\n")
    save_file(tensors, out / f"v2drop-official-{name}.safetensors")
    if name != "demo":
        (out / "v2drop-official-inputs.json").write_text(json.dumps({"prefix_ids": prefix, "suffix_ids": suffix,
                                                                     "pixel_values": "inputs.safetensors:pixel_values_0"}) + "\n")
    print(name, [(r["layer"], r["n_before"], r["k"], r["margin"]) for r in records], tokens)


if __name__ == "__main__":
    shared.main(__file__, record, CONFIGS)
