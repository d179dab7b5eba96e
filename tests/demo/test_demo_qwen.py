"""The second demo model's architecture (Qwen2.5-VL: no CLS token, a 2x2 merger, M-RoPE) under the demo recipe.

The recipe is the first demo model's; what is checked here is what the architecture changes: the
processor and the recipe's own encoding agree, the M-RoPE positions the recipe computes are the ones
``get_rope_index`` gives a prompt, packed questions and visual subsets are exactly the plain model on
the prompt they stand for, patch targets become token targets as documented, and one command trains,
resumes and exports a checkpoint that ``load_demo`` and ``from_pretrained`` read back.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from duet_vlm import synthetic as data
from duet_vlm.demo import qwen
from duet_vlm.demo.batching import encode_packed, make_batch, packed_attention_mask, pixel_values
from duet_vlm.demo.config import DemoConfig
from duet_vlm.demo.geometry import LLAVA, QWEN2_5_VL, geometry_of

TINY = dict(text_layers=2, text_hidden=36, text_intermediate=64, text_heads=3, text_kv_heads=3,
            vision_layers=2, vision_hidden=32, vision_intermediate=64, vision_heads=2)


@pytest.fixture(scope="module")
def qwen_processor(tmp_path_factory):
    return qwen.load_qwen_processor(qwen.write_qwen_processor(tmp_path_factory.mktemp("qwen-processor")))


def tiny_model(processor, seed=0):
    return qwen.build_qwen_model(qwen.qwen_demo_config(processor.tokenizer, **TINY), seed=seed).eval()


def test_processor_expands_the_image_into_144_tokens_and_patchify_is_its_pixel_layout(qwen_processor):
    processor = qwen_processor
    sample = data.sample("test", 3)
    text = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": sample.question}]}],
        add_generation_prompt=True, tokenize=False)
    assert text == qwen.qwen_prompt(sample.question)
    inputs = processor(images=[sample.image], text=[text], return_tensors="pt")
    assert int((inputs["input_ids"] == processor.image_token_id).sum()) == 144
    assert inputs["image_grid_thw"].tolist() == [[1, 24, 24]]
    values, grid = qwen.patchify(pixel_values([sample.image]))
    assert torch.equal(grid, inputs["image_grid_thw"])
    assert torch.allclose(values, inputs["pixel_values"], atol=1e-6)
    # the recipe's packed encoding begins with exactly the processor's prompt
    ids, _labels, _segments, _positions = encode_packed(
        processor.tokenizer, [("color", sample.question, sample.answer)], processor.image_token_id, QWEN2_5_VL)
    assert ids[: inputs["input_ids"].shape[1]] == inputs["input_ids"][0].tolist()


def test_config_is_qwen2_5_vl_geometry_and_loads_back(tmp_path, qwen_processor):
    processor = qwen_processor
    from transformers import AutoModelForImageTextToText, Qwen2_5_VLForConditionalGeneration

    config = qwen.qwen_demo_config(processor.tokenizer)
    assert config.model_type == "qwen2_5_vl" and config.text_config.num_hidden_layers == 32
    assert config.vision_config.fullatt_block_indexes == [1, 3] and config.vision_config.window_size == 112
    assert config.text_config.rope_parameters["mrope_section"] == [4, 4, 4]
    assert config.image_token_id == processor.image_token_id
    model = tiny_model(processor)
    assert geometry_of(model) is QWEN2_5_VL
    model.save_pretrained(tmp_path)
    loaded = AutoModelForImageTextToText.from_pretrained(tmp_path, attn_implementation="sdpa").eval()
    assert isinstance(loaded, Qwen2_5_VLForConditionalGeneration)
    inputs = processor(images=[data.sample("test", 0).image], text=[qwen.qwen_prompt("what color is it?")],
                       return_tensors="pt")
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, loaded(**inputs).logits)


def test_positions_are_get_rope_index_s_for_a_prompt(qwen_processor):
    """``Geometry.positions`` of the recipe's 1-D positions = what the model numbers a prompt with."""
    processor = qwen_processor
    model = tiny_model(processor)
    sample = data.sample("test", 5)
    inputs = processor(images=[sample.image], text=[qwen.qwen_prompt(sample.question)], return_tensors="pt")
    ids = inputs["input_ids"]
    first = int((ids[0] == processor.image_token_id).nonzero()[0])
    mm = (ids == processor.image_token_id).int()
    expected, _ = model.model.get_rope_index(ids, mm_token_type_ids=mm, image_grid_thw=inputs["image_grid_thw"],
                                             attention_mask=inputs["attention_mask"])
    ours = QWEN2_5_VL.positions(torch.arange(ids.shape[1])[None], first)
    assert torch.equal(ours, expected)
    assert torch.equal(LLAVA.positions(torch.arange(5)[None], 2), torch.arange(5)[None])


def test_packed_questions_see_exactly_the_single_turn_context(qwen_processor):
    """Each packed question's logits equal those of the same question asked alone (3-D positions, packed mask)."""
    processor = qwen_processor
    from duet_vlm.demo.objectives import language_forward

    model = tiny_model(processor, seed=3)
    batch, _ = make_batch(processor.tokenizer, processor.image_token_id, step=5, batch_size=2, n_questions=4,
                          geometry=QWEN2_5_VL)
    with torch.no_grad():
        tokens, _ = QWEN2_5_VL.features(model, batch)
        packed = language_forward(model, batch, tokens).output.logits
    checked = 0
    for b in range(2):
        image, turns, _ = data.conversation("train", 5 * 2 + b, 4)
        labels = batch["labels"][b]
        answer_pos = [i for i in range(1, labels.shape[0]) if labels[i] != -100 and labels[i - 1] == -100]
        assert len(answer_pos) == len(turns)
        for (_, q, _a), pos in zip(turns, answer_pos):
            single = processor(images=[image], text=[qwen.qwen_prompt(q)], return_tensors="pt")
            with torch.no_grad():
                ref = model(**single).logits[0, -1]
            assert torch.allclose(packed[b, pos - 1], ref, atol=1e-4), q
            checked += 1
    assert checked >= 6


@pytest.mark.parametrize("kind, size", [("random", 50), ("pool", 2), ("pool", 3)])
def test_training_on_a_visual_subset_is_the_model_on_the_shorter_prompt_at_the_kept_positions(qwen_processor, kind, size):
    """``language_forward`` on a subset = the plain model run on the sequence holding only the subset's tokens
    (kept merged tokens, or each pooled window's average), every token at its own M-RoPE position (a pooled
    cell at its centre token's) and the text after the image where it was; renumbering is refused."""
    processor = qwen_processor
    from duet_vlm.demo.objectives import VisualSubset, language_forward
    from duet_vlm.methods.pool import pooled_centres

    model = tiny_model(processor, seed=4)
    batch, _ = make_batch(processor.tokenizer, processor.image_token_id, step=2, batch_size=2, n_questions=3,
                          geometry=QWEN2_5_VL)
    subset = VisualSubset(kind, size)
    k = subset.count(12)
    assert k == {"random": 12, "pool": 36 if size == 2 else 16}[kind]  # 50 of 576 is 12.5 of 144
    with torch.no_grad():
        tokens, _ = QWEN2_5_VL.features(model, batch)
        out = language_forward(model, batch, tokens, subset, generator=torch.Generator().manual_seed(0)).output
    length = batch["input_ids"].shape[1]
    assert out.logits.shape[1] == length - 144 + k
    if kind == "random":
        kept = torch.randperm(144, generator=torch.Generator().manual_seed(0))[:k].sort().values
        visual = tokens[0, kept]
    else:
        g = 12 // size
        kept = pooled_centres((12, 12), (g, g))
        visual = tokens[0].reshape(g, size, g, size, -1).mean((1, 3)).reshape(g * g, -1)
    ids = batch["input_ids"][:1]
    first = int((ids[0] == processor.image_token_id).nonzero()[0])
    index = torch.cat([torch.arange(first), first + kept, torch.arange(first + 144, length)])
    embeds = model.get_input_embeddings()(ids[:, index])
    embeds[0, first:first + k] = visual
    full_positions = QWEN2_5_VL.positions(batch["position_ids"][:1], first)
    with torch.no_grad():
        ref = model(inputs_embeds=embeds, attention_mask=packed_attention_mask(batch["segments"][:1, index]),
                    position_ids=full_positions[:, :, index])
    assert torch.allclose(out.logits[0], ref.logits[0], atol=1e-5)
    with pytest.raises(ValueError, match="renumbering"):
        language_forward(model, batch, tokens, subset, ["contiguous", "original"], torch.Generator().manual_seed(0))


def test_patch_targets_become_token_targets():
    """Colour / shape / character: a token's 2x2 patches' most frequent label (background only where all are);
    grounding targets and required groups: any patch of the token."""
    labels = np.zeros(576, np.int64)
    labels[0] = 3  # token 0: one patch of colour 3, three of background -> 3
    labels[[2, 3, 26]] = [1, 2, 2]  # token 1 (patches 2, 3, 26, 27): 2 twice, 1 once -> 2
    labels[[4, 5, 28, 29]] = [4, 5, 4, 5]  # token 2: a tie -> the smaller id
    ground = np.zeros((1, 4, 576), bool)
    ground[0, 1, 575] = True  # the last patch: the last token
    required = np.zeros((1, 576), np.int8)
    required[0, [48, 49]] = [1, 2]  # token 12 (patches 48, 49, 72, 73) holds groups 1 and 2 -> 2
    out = QWEN2_5_VL.token_targets({"color": labels, "ground_target": ground, "required": required})
    assert out["color"].shape == (144,) and out["color"][:4].tolist() == [3, 2, 4, 0] and out["color"][4:].sum() == 0
    assert out["ground_target"].shape == (1, 4, 144) and np.flatnonzero(out["ground_target"][0, 1]).tolist() == [143]
    assert np.flatnonzero(out["required"][0]).tolist() == [12] and out["required"][0, 12] == 2
    same = LLAVA.token_targets({"color": labels})
    assert same["color"] is labels


def test_every_object_and_character_keeps_a_token_and_quadrants_split_evenly():
    """On real scenes: each object's patches reach at least one token of its colour, a character's patch its
    token, and the aux heads' quadrant of a token is the quadrant of its centre."""
    from duet_vlm.demo.objectives import AuxHeads

    for index in range(20):
        scene = data.make_scene(data.rng_for("train", index, stream=2))
        tokens = QWEN2_5_VL.token_targets(data.patch_labels(scene))
        patches = data.object_patches(scene)
        for obj, mask in zip(scene, patches):
            cells = np.unique((np.flatnonzero(mask) // 24 // 2) * 12 + (np.flatnonzero(mask) % 24) // 2)
            assert (tokens["color"][cells] == data.COLOR_NAMES.index(obj["color"]) + 1).any()
    heads = AuxHeads(8, 8, grid=12)
    assert heads.quadrant.reshape(12, 12)[:6, :6].eq(0).all() and heads.quadrant.reshape(12, 12)[6:, 6:].eq(3).all()


def test_the_recipe_refuses_renumbering_and_unknown_architectures(tmp_path):
    with pytest.raises(ValueError, match="--renumber-share 0"):
        DemoConfig(output_dir=str(tmp_path), architecture="qwen2_5_vl")
    with pytest.raises(ValueError, match="--architecture must be one of"):
        DemoConfig(output_dir=str(tmp_path), architecture="gemma3")
    config = DemoConfig.parse_args(["--output-dir", "runs/q", "--architecture", "qwen2_5_vl", "--renumber-share", "0"])
    assert config.command() == "duet-vlm train-demo --output-dir runs/q --renumber-share 0.0 --architecture qwen2_5_vl"


def test_one_command_trains_resumes_and_exports_a_loadable_qwen2_5_vl(tmp_path):
    """Two tiny steps (vision-only, then visual-QA), stopped, resumed to the third, equal to a straight run;
    the export loads with ``load_demo`` (``AutoModelForImageTextToText``, the processor without torchvision)
    and answers through ``evaluate_accuracy``; its card names the architecture."""
    from transformers import TrainerCallback

    from duet_vlm.demo.evaluate import evaluate_accuracy, load_demo
    from duet_vlm.demo.train import train_demo

    class StopAfter(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            control.should_training_stop = state.global_step >= 2

    def recipe(folder, **options):
        return DemoConfig(output_dir=str(folder), architecture="qwen2_5_vl", renumber_share=0.0,
                          model_overrides=json.dumps(TINY), vision_steps=1, steps=2, batch_size=2, n_questions=2,
                          ground_from=1, ground_heads=2, warmup_steps=1, threads="1", save_steps=1, logging_steps=1,
                          eval_steps=0, final_eval_n=7, progress=False, **options)

    logs: list[str] = []
    train_demo(recipe(tmp_path / "run"), log=logs.append, callbacks=(StopAfter(),))
    resumed = train_demo(recipe(tmp_path / "run"), log=logs.append)
    assert any(line.startswith("resuming from") for line in logs)
    straight = train_demo(recipe(tmp_path / "straight"), log=logs.append)
    model, processor = load_demo(resumed)
    other, _ = load_demo(straight)
    assert type(model).__name__ == "Qwen2_5_VLForConditionalGeneration"
    for (name, a), (_, b) in zip(model.state_dict().items(), other.state_dict().items()):
        assert torch.allclose(a, b, atol=1e-6), name
    metrics = json.loads((resumed / "metrics.json").read_text())
    assert metrics["hparams"]["architecture"] == "qwen2_5_vl" and metrics["steps"] == 2
    assert metrics["test"]["n"] == 7 and set(metrics["patch_word_probe"]) == {"color", "shape", "char"}
    card = (resumed / "README.md").read_text()
    assert "Qwen2_5_VLForConditionalGeneration" in card and "all 144 visual tokens" in card and "M-RoPE" in card
    result = evaluate_accuracy(model, processor, n=7, return_predictions=True)
    assert result["n"] == 7 and all(p["prediction"] is not None for p in result["predictions"])


def test_eval_and_demo_pick_a_shipped_model_by_name_and_refuse_another(tmp_path):
    from duet_vlm.demo.evaluate import DEMO_MODEL_DIR, DEMO_MODELS, demo_model_dir
    from duet_vlm.demo.showcase import showcase
    from duet_vlm.demo.sweep import evaluate_methods

    assert demo_model_dir() == DEMO_MODEL_DIR == DEMO_MODELS["llava"]
    assert demo_model_dir("qwen2_5_vl").name == "demo_model_qwen2_5_vl"
    assert demo_model_dir(tmp_path) == tmp_path
    with pytest.raises(ValueError, match="--model must be one of the shipped demo models llava, qwen2_5_vl"):
        evaluate_methods(["duet"], (16,), n=7, output_dir=tmp_path, demo="gemma3")
    with pytest.raises(ValueError, match="not both"):
        evaluate_methods(["duet"], (16,), n=7, model_path=tmp_path, output_dir=tmp_path, demo="qwen2_5_vl")
    with pytest.raises(ValueError, match="--model must be one of"):
        showcase(demo="internvl", output=tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists() and not (tmp_path / "results.json").exists()


# ----------------------------------------------------------------------------- the shipped model

def _shipped():
    from duet_vlm.demo.evaluate import QWEN_DEMO_MODEL_DIR

    return QWEN_DEMO_MODEL_DIR


@pytest.mark.skipif(not (_shipped() / "config.json").exists(), reason="no shipped Qwen2.5-VL demo model")
def test_shipped_qwen_demo_model_answers_from_the_image():
    """The second shipped model loads as a Qwen2.5-VL (no CLS token, 144 tokens a scene), is small enough to
    ship, answers a fixed slice of the test split far above chance with the image and falls back to language
    priors without it, and its shipped metrics agree with a fresh evaluation."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    from duet_vlm.demo.evaluate import evaluate_accuracy, load_demo

    model, processor = load_demo("qwen2_5_vl")
    assert isinstance(model, Qwen2_5_VLForConditionalGeneration)
    assert (_shipped() / "model.safetensors").stat().st_size <= 60 * 2**20
    metrics = json.loads((_shipped() / "metrics.json").read_text())
    assert metrics["hparams"]["architecture"] == "qwen2_5_vl" and metrics["hparams"]["renumber_share"] == 0
    seen = evaluate_accuracy(model, processor, split="test", n=70, batch_size=14)
    blank = evaluate_accuracy(model, processor, split="test", n=70, batch_size=14, blank_image=True)
    assert seen["accuracy"] >= 0.75 and blank["accuracy"] <= 0.4
    assert metrics["test"]["n"] == 700 and abs(metrics["test"]["accuracy"] - seen["accuracy"]) < 0.1


@pytest.mark.skipif(not (_shipped() / "config.json").exists(), reason="no shipped Qwen2.5-VL demo model")
def test_duet_runs_on_the_shipped_qwen_model_at_the_demo_budget(tmp_path):
    """``duet-vlm demo --model qwen2_5_vl``: DUET at 16 of its 144 tokens answers, and the overlay is drawn on
    the image's own 12x12 token grid."""
    from duet_vlm.demo.showcase import showcase

    shown = showcase(index=3, output=tmp_path / "overlay.png", rounds=1, demo="qwen2_5_vl")
    assert [answer.label for answer in shown.answers] == ["all tokens", "DUET 16"]
    stats = shown.answers[1].stats
    assert stats.items[0].tokens == 144 and stats.items[0].average_tokens <= 16.5
    assert shown.overlay.exists()


@pytest.mark.skipif(not (_shipped() / "config.json").exists(), reason="no shipped Qwen2.5-VL demo model")
def test_eval_records_the_position_mode_of_the_images_it_ran(tmp_path):
    """``duet-vlm eval --model qwen2_5_vl``: a row's position mode is resolved for the evaluated images (144
    tokens), not for the adapter's default Qwen image (1,024), where FastV at 48 cannot be planned."""
    from duet_vlm.demo.sweep import evaluate_methods

    run = evaluate_methods(["fastv"], (48,), n=7, output_dir=tmp_path, control=False, demo="qwen2_5_vl")
    (row,) = [row for row in run.rows if row["method"] == "fastv"]
    assert row["positions"] == "original" and 47 <= row["avg_visual_tokens"] <= 49
    assert json.loads((tmp_path / "results.json").read_text())["meta"]["model"] == "shipped demo model qwen2_5_vl"
