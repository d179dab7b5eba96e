"""Differential test against outputs of the official DUET-VLM code (tests/data/vectors)."""

import json

import pytest
import torch
from safetensors.torch import load_file

import duet_vlm

SALIENT_SUFFIX = [1, 3, 6, 11]  # the official run's idxs [7, 9, 12, 17] are suffix tokens 1, 3, 6 and 11


def _salient_queries(view):
    return [after[SALIENT_SUFFIX] for after in view.text_after_image]


CONFIGS = {
    "192": lambda: duet_vlm.Duet(budget=192),
    "128": lambda: duet_vlm.Duet(budget=128),
    "stageA": lambda: duet_vlm.Duet(dominant=300, contextual=7, layers=()),
    "192-salient": lambda: duet_vlm.Duet(budget=192, query=_salient_queries),
    "none": lambda: None,
}


# ``official``: (model, input_ids, pixel_values, reference_dir) of the recorded runs (tests/conftest.py).


def _record_layer_inputs(model):
    seen = []

    def hook(module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        seen.append((hidden.shape[1], kwargs["position_ids"].reshape(-1).tolist()))

    handles = [layer.register_forward_pre_hook(hook, with_kwargs=True) for layer in model.model.language_model.layers]
    return seen, handles


@pytest.mark.parametrize("name", list(CONFIGS))
def test_matches_official_implementation(official, name):
    model, input_ids, pixel_values, reference_dir = official
    expected = json.loads((reference_dir / f"duet-official-{name}.json").read_text())["samples"]["0"]
    tensors = load_file(reference_dir / f"duet-official-{name}.safetensors")
    reducer = CONFIGS[name]()
    handle = reducer.attach(model) if reducer else None
    seen, hooks = _record_layer_inputs(model)  # registered after the reducer's, so they see its output
    try:
        with torch.no_grad():
            logits = model(input_ids=input_ids, pixel_values=pixel_values).logits[0, -1]
            prefill = list(seen)
            seen.clear()
            generated = model.generate(
                input_ids=input_ids, pixel_values=pixel_values, max_new_tokens=5, do_sample=False,
                output_scores=True, return_dict_in_generate=True,
            )
    finally:
        for hook in hooks:
            hook.remove()
        if handle:
            handle.remove()

    assert [length for length, _ in prefill] == expected["per_layer_seq_len"]
    assert [positions for _, positions in prefill] == expected["per_layer_position_ids"]
    torch.testing.assert_close(logits, tensors["s0_prefill_last_logits"], atol=1e-4, rtol=0)
    if expected.get("greedy_new_tokens") is not None:  # the salient run recorded the prefill only
        assert generated.sequences[0, input_ids.shape[1]:].tolist() == expected["greedy_new_tokens"]
        for step, scores in enumerate(generated.scores):
            torch.testing.assert_close(scores[0], tensors[f"s0_gen_step{step}_logits"], atol=1e-4, rtol=0)
    if expected.get("decode_step_position_ids_per_layer") is not None:
        layers = len(model.model.language_model.layers)
        decode = [seen[i * layers : (i + 1) * layers] for i in range(1, 5)]  # step 0 is the prefill
        assert [[p[0] for _, p in step] for step in decode] == expected["decode_step_position_ids_per_layer"]
    if reducer is None:
        return

    stats = reducer.stats
    stage_a = expected["stageA"]
    assert stats.vision_roles["dominant"][0].tolist() == stage_a["dominant_kept_577_in_output_order"]
    assert stats.vision_roles["anchors"][0].tolist() == stage_a["anchors_577_in_output_order"]
    assert stats.vision_roles["members"][0].tolist() == stage_a["members_577"]
    assert stats.llm_input_tokens == stage_a["num_output_tokens"]
    assert len(stats.stage_kept) == len(expected["stageB"])
    for (layer, kept), boundary in zip(stats.stage_kept, expected["stageB"]):
        assert layer == boundary["after_layer_1based"]
        assert kept[0, 0].tolist() == boundary["kept_as_stageA_output_index"]


def test_stage_a_features_and_scores(official):
    """The merged CLIP-space features and CLS scores themselves, not only what follows from them."""
    model, input_ids, pixel_values, reference_dir = official
    tensors = load_file(reference_dir / "duet-official-192.safetensors")
    captured = {}
    handle = duet_vlm.Duet(budget=192).attach(model)
    def keep(module, args):
        captured["features"] = args[0]

    probe = model.model.multi_modal_projector.register_forward_pre_hook(keep)
    try:
        with torch.no_grad():
            model(input_ids=input_ids, pixel_values=pixel_values)
    finally:
        probe.remove()
        handle.remove()
    torch.testing.assert_close(captured["features"][0], tensors["s0_stageA_features_preproj"], atol=1e-4, rtol=1e-5)
    scores, _ = duet_vlm.adapter_for(model).vision_scores(
        model.model.vision_tower(pixel_values, output_hidden_states=True).hidden_states[-3]
    )
    torch.testing.assert_close(scores[0], tensors["s0_stageA_cls_attention_sum"], atol=1e-5, rtol=1e-5)
