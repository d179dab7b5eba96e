"""Tests of the synthetic visual-QA generator, processor, demo model family and training loop."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import shlex
from collections import Counter

import numpy as np
import pytest
import torch

from duet_vlm import synthetic as data
from duet_vlm.demo.model import build_model, count_parameters, demo_config
from duet_vlm.demo.processor import CHAT_TEMPLATE, build_tokenizer, prompt
from duet_vlm.demo.batching import encode_conversation, pixel_values
from duet_vlm.demo.config import DemoConfig
from duet_vlm.demo.evaluate import DEMO_MODEL_DIR, evaluate_accuracy, load_demo
from duet_vlm.demo.train import train_demo

TINY = dict(text_layers=2, text_hidden=32, text_intermediate=64, text_heads=2, text_kv_heads=2,
            vision_layers=3, vision_hidden=32, vision_intermediate=64, vision_heads=2)


def _digest(img) -> str:
    return hashlib.sha256(img.tobytes()).hexdigest()


# ----------------------------------------------------------------------------- generator

def test_sample_is_deterministic():
    for split in data.SPLIT_SEEDS:
        for i in (0, 5, 123):
            a, b = data.sample(split, i), data.sample(split, i)
            assert _digest(a.image) == _digest(b.image)
            assert (a.question, a.answer, a.qtype, a.scene) == (b.question, b.answer, b.qtype, b.scene)
    a, b = data.conversation("train", 7), data.conversation("train", 7)
    assert _digest(a[0]) == _digest(b[0]) and a[1] == b[1] and a[2] == b[2]


def test_image_geometry():
    s = data.sample("test", 0)
    assert s.image.mode == "RGB" and s.image.size == (336, 336)


def _check_rendering(s):
    """The drawn pixels agree with the scene description (colour at a point inside each object)."""
    arr = np.asarray(s.image).astype(int)
    for o in s.scene:
        y = o["y"] - int(0.6 * o["r"]) if o["char"] is not None else o["y"]
        if o["shape"] == "triangle":
            y = o["y"]
        px = arr[y, o["x"]]
        dist = np.abs(px - np.asarray(data.COLORS[o["color"]])).max()
        assert dist <= 13, (o, px)


def test_answers_match_scene_for_every_type():
    seen = {t: set() for t in data.QUESTION_TYPES}
    for split in ("train", "test"):
        for i in range(140):
            s = data.sample(split, i)
            assert s.qtype == data.QUESTION_TYPES[i % 7]
            assert s.answer == data.answer_from_scene(s.scene, s.qtype, s.params)
            assert s.answer in data.ANSWERS[s.qtype]
            assert " " not in s.answer
            seen[s.qtype].add(s.answer)
            _check_rendering(s)
            # objects do not overlap and are inside the image
            for k, a in enumerate(s.scene):
                assert a["r"] <= a["x"] <= 336 - a["r"] and a["r"] <= a["y"] <= 336 - a["r"]
                for b in s.scene[k + 1:]:
                    assert np.hypot(a["x"] - b["x"], a["y"] - b["y"]) > a["r"] + b["r"]
            # named objects are unique
            names = [f"{o['color']} {o['shape']}" for o in s.scene]
            assert len(set(names)) == len(names)
    for t in data.QUESTION_TYPES:
        assert len(seen[t]) >= 2, (t, seen[t])


def test_independent_answer_checks():
    """Re-derive answers from the question text alone (not the params)."""
    for i in range(210):
        s = data.sample("validation", i)
        q = s.question.rstrip("?").lower().split()
        sc = s.scene
        if s.qtype == "color":
            hits = [o for o in sc if o["shape"] == q[-1]]
            assert len(hits) == 1 and hits[0]["color"] == s.answer
        elif s.qtype == "shape":
            hits = [o for o in sc if o["color"] == q[-2]]
            assert len(hits) == 1 and hits[0]["shape"] == s.answer
        elif s.qtype == "count":
            word = q[2]
            n = sum(o["color"] == word or data.PLURALS[o["shape"]] == word for o in sc)
            assert data.NUMBER_WORDS[n] == s.answer
        elif s.qtype == "exists":
            present = any(o["color"] == q[3] and o["shape"] == q[4] for o in sc)
            assert s.answer == ("yes" if present else "no")
        elif s.qtype == "relation":
            a = next(o for o in sc if (o["color"], o["shape"]) == (q[2], q[3]))
            b = next(o for o in sc if (o["color"], o["shape"]) == (q[-2], q[-1]))
            if "left" in q:
                assert abs(a["x"] - b["x"]) >= 40
                assert s.answer == ("left" if a["x"] < b["x"] else "right")
            else:
                assert abs(a["y"] - b["y"]) >= 40
                assert s.answer == ("above" if a["y"] < b["y"] else "below")
        elif s.qtype == "quadrant":
            o = next(o for o in sc if (o["color"], o["shape"]) == (q[4], q[5]))
            v = "top" if o["y"] + o["r"] < 168 else "bottom" if o["y"] - o["r"] > 168 else None
            h = "left" if o["x"] + o["r"] < 168 else "right" if o["x"] - o["r"] > 168 else None
            assert v and h and s.answer == v + h
        elif s.qtype == "read":
            o = next(o for o in sc if (o["color"], o["shape"]) == (q[-2], q[-1]))
            assert o["char"] == s.answer


def test_exists_is_balanced():
    answers = [data.sample("train", 7 * k + 3).answer for k in range(120)]
    assert 0.35 < answers.count("yes") / len(answers) < 0.65


def test_splits_are_disjoint():
    assert len(set(data.SPLIT_SEEDS.values())) == len(data.SPLIT_SEEDS)
    digests = {split: {_digest(data.sample(split, i).image) for i in range(60)} for split in data.SPLIT_SEEDS}
    assert digests["train"].isdisjoint(digests["validation"])
    assert digests["train"].isdisjoint(digests["test"])
    assert digests["validation"].isdisjoint(digests["test"])
    with pytest.raises(ValueError, match="unknown split 'dev'"):
        data.sample("dev", 0)


def test_conversation_questions_are_distinct_and_correct():
    for i in range(30):
        image, turns, scene = data.conversation("train", i, 6)
        assert 3 <= len(turns) <= 6
        assert len({q for _, q, _ in turns}) == len(turns)
        for qtype, q, a in turns:
            assert a in data.ANSWERS[qtype]


# ----------------------------------------------------------------------------- tokenizer / processor

def test_tokenizer_covers_generator_vocabulary():
    tok = build_tokenizer()
    unk = tok.unk_token_id
    for i in range(140):
        s = data.sample("train", i)
        ids = tok(prompt(s.question), add_special_tokens=False)["input_ids"]
        assert unk not in ids, s.question
        ans = tok(s.answer, add_special_tokens=False)["input_ids"]
        assert len(ans) == 1 and ans[0] != unk
        assert tok.decode(ans) == s.answer
    for word in data.vocabulary():
        assert tok.convert_tokens_to_ids(word) != unk
    for t in data.QUESTION_TYPES:
        for a in data.ANSWERS[t]:
            assert tok.convert_tokens_to_ids(a) != unk
    assert tok("What COLOUR is the circle?", add_special_tokens=False)["input_ids"] == \
        tok("what colour is the circle ?", add_special_tokens=False)["input_ids"]
    for name in ("pad", "bos", "eos", "unk"):
        assert getattr(tok, f"{name}_token_id") is not None
    assert len(set(tok.all_special_ids)) == 5


def test_processor_round_trip(tmp_path, processor):
    from transformers import AutoProcessor

    processor.save_pretrained(tmp_path)
    loaded = AutoProcessor.from_pretrained(tmp_path)
    s = data.sample("test", 0)
    text = "USER: <image>\nWhat colour is the circle? ASSISTANT:"
    for p in (processor, loaded):
        out = p(images=s.image, text=text, return_tensors="pt")
        ids = out["input_ids"][0]
        assert int((ids == p.image_token_id).sum()) == 576
        assert ids[0].item() == p.tokenizer.bos_token_id
        assert out["pixel_values"].shape == (1, 3, 336, 336)
        assert torch.allclose(out["pixel_values"], pixel_values([s.image]), atol=1e-5)
    a = processor(images=s.image, text=text, return_tensors="pt")["input_ids"]
    b = loaded(images=s.image, text=text, return_tensors="pt")["input_ids"]
    assert torch.equal(a, b)
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour is the circle?"}]}]
    assert loaded.apply_chat_template(msgs, add_generation_prompt=True) == text
    assert loaded.chat_template == CHAT_TEMPLATE


def test_training_encoding_matches_processor(processor):
    image, turns, _ = data.conversation("train", 3, 4)
    tok = processor.tokenizer
    ids, labels = encode_conversation(tok, turns, processor.image_token_id)
    ref = processor(images=image, text=prompt(turns[0][1]), return_tensors="pt")["input_ids"][0].tolist()
    assert ids[: len(ref)] == ref
    assert len(ids) == len(labels)
    supervised = [t for t, lab in zip(ids, labels) if lab != -100]
    expected = []
    for _, _, a in turns:
        expected += tok(a, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert supervised == expected
    assert all(lab == -100 for t, lab in zip(ids, labels) if t == processor.image_token_id)


# ----------------------------------------------------------------------------- model

def test_full_demo_config_geometry():
    cfg = demo_config()
    tok = build_tokenizer()
    assert cfg.text_config.num_hidden_layers == 32
    assert cfg.vision_config.image_size == 336 and cfg.vision_config.patch_size == 14
    assert cfg.vision_config.num_hidden_layers >= 3
    assert cfg.vision_feature_layer == -2 and cfg.vision_feature_select_strategy == "default"
    assert cfg.image_token_id == tok.convert_tokens_to_ids("<image>")
    assert cfg.text_config.vocab_size == len(tok)
    assert (cfg.text_config.pad_token_id, cfg.text_config.bos_token_id, cfg.text_config.eos_token_id) == \
        (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id)


def test_tiny_model_save_load_generate(tmp_path, processor):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    model = build_model(demo_config(processor.tokenizer, **TINY), seed=0).eval()
    assert count_parameters(model)["total"] > 0
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    loaded = LlavaForConditionalGeneration.from_pretrained(tmp_path, attn_implementation="sdpa").eval()
    proc = AutoProcessor.from_pretrained(tmp_path)
    s = data.sample("test", 1)
    inputs = proc(images=s.image, text=prompt(s.question), return_tensors="pt")
    with torch.no_grad():
        a = model(**inputs).logits
        b = loaded(**inputs).logits
    assert torch.allclose(a, b, atol=1e-5)
    out = loaded.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert out.shape[1] > inputs["input_ids"].shape[1]

    entered = []

    @contextlib.contextmanager
    def wrap():
        entered.append(True)
        yield

    res = evaluate_accuracy(loaded, proc, split="test", n=7, batch_size=4, wrap=wrap, return_predictions=True)
    assert entered == [True]
    assert res["n"] == 7 and set(res["per_type"]) == set(data.QUESTION_TYPES)
    assert 0.0 <= res["accuracy"] <= 1.0 and len(res["predictions"]) == 7
    res = evaluate_accuracy(loaded, proc, split="test", n=14, batch_size=7, return_predictions=True)
    for qtype, (word, share) in res["top_answer"].items():
        said = [p["prediction"] for p in res["predictions"] if p["qtype"] == qtype]
        assert share == max(said.count(w) for w in said) / len(said) == said.count(word) / len(said)
    blank = evaluate_accuracy(loaded, proc, split="test", n=7, batch_size=7, blank_image=True)
    assert blank["blank_image"] is True and blank["n"] == 7


def tiny_recipe(output_dir, **options) -> DemoConfig:
    settings = dict(model_overrides=json.dumps(TINY), vision_steps=1, steps=1, batch_size=1, n_questions=2,
                    ground_from=1, ground_heads=2, warmup_steps=1, threads="1", save_steps=1, logging_steps=1,
                    eval_steps=0, final_eval_n=7, progress=False)
    return DemoConfig(output_dir=str(output_dir), **{**settings, **options})


def test_train_demo_runs_two_tiny_steps_on_the_shared_loop_and_resumes(tmp_path):
    """A vision-only step and a visual-QA step through the Trainer-based loop, stopped there; the same
    config run again resumes from the checkpoint, trains the third step only and ends with the weights
    of an uninterrupted run; run once more it has nothing left to train; a changed recipe is refused."""
    from transformers import LlavaForConditionalGeneration, TrainerCallback

    class StopAfter(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            control.should_training_stop = state.global_step >= 2

    logs = []
    config = tiny_recipe(tmp_path / "run", steps=2)  # 1 vision-only + 2 visual-QA steps
    out = train_demo(config, log=logs.append, callbacks=(StopAfter(),))
    assert any(line.startswith("training from scratch") for line in logs)
    assert (out / "model.safetensors").exists() and (out / "processor_config.json").exists()
    metrics = json.loads((out / "metrics.json").read_text())
    assert (metrics["vision_steps"], metrics["steps"]) == (1, 1) and "test" in metrics and "test_blank_image" in metrics
    history = json.loads((tmp_path / "run" / "checkpoint-2" / "trainer_state.json").read_text())["log_history"]
    assert [e["step"] for e in history if "loss" in e] == [1, 2]
    assert "answer" not in history[0] and history[1]["answer"] > 0 and history[1]["ground"] > 0  # the two phases
    card = (out / "README.md").read_text()
    assert "Test accuracy" in card and "blank" in card and metrics["command"] in card
    assert metrics["training_seconds"] > 0 and "training wall-clock" in card
    assert DemoConfig.parse_args(shlex.split(metrics["command"])[2:]) == config  # the card's command is the config
    assert metrics["hparams"] == config.to_dict()

    logs.clear()
    resumed = train_demo(config, log=logs.append)
    assert any(line == f"resuming from {tmp_path / 'run' / 'checkpoint-2'}" for line in logs)
    history = json.loads((tmp_path / "run" / "checkpoint-3" / "trainer_state.json").read_text())["log_history"]
    assert [e["step"] for e in history if "loss" in e] == [1, 2, 3]
    # the training clock continues from the checkpoint's value instead of restarting
    clock = [json.loads((tmp_path / "run" / f"checkpoint-{step}" / "trainer_state.json").read_text())
             ["stateful_callbacks"]["TrainingClock"]["args"]["seconds"] for step in (2, 3)]
    assert 0 < clock[0] < clock[1]
    assert json.loads((resumed / "metrics.json").read_text())["training_seconds"] == round(clock[1], 1)
    straight = train_demo(tiny_recipe(tmp_path / "straight", steps=2), log=logs.append)
    a = LlavaForConditionalGeneration.from_pretrained(resumed).state_dict()
    b = LlavaForConditionalGeneration.from_pretrained(straight).state_dict()
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    built = build_model(demo_config(**TINY), seed=0).state_dict()
    key = "model.language_model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(built[key], a[key])

    logs.clear()
    train_demo(config, log=logs.append)  # finished: resumes at the last step and trains nothing
    assert json.loads((tmp_path / "run" / "checkpoint-3" / "trainer_state.json").read_text())["log_history"] == history
    with pytest.raises(ValueError, match=r"different hyper-parameters \(lr\)"):
        train_demo(tiny_recipe(tmp_path / "run", steps=2, lr=1e-2), log=logs.append)


def test_a_step_with_non_finite_gradients_is_skipped_and_logged(tmp_path):
    """One visual-QA step whose gradients turn NaN (forced here through the projector's backward)
    is dropped: the run ends with finite weights, and the log says a step was skipped."""
    import torch
    from transformers import TrainerCallback

    class PoisonOneStep(TrainerCallback):
        def on_step_begin(self, args, state, control, model=None, **kwargs):
            if state.global_step == 1:  # the first visual-QA step
                projector = model.llava.model.multi_modal_projector
                self.handle = projector.register_full_backward_pre_hook(lambda m, grads: tuple(g * float("nan") for g in grads))

        def on_step_end(self, args, state, control, **kwargs):
            if hasattr(self, "handle"):
                self.handle.remove()
                del self.handle

    out = train_demo(tiny_recipe(tmp_path / "run", steps=2, final_eval_n=0), log=lambda message: None,
                     callbacks=(PoisonOneStep(),))
    from transformers import LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(out)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    history = json.loads((out / "training_log.json").read_text())
    assert sum(entry.get("skipped_steps", 0) for entry in history) == 1


def test_train_demo_command_options_come_from_the_config():
    from typer.testing import CliRunner

    from duet_vlm.cli import app

    result = CliRunner().invoke(app, ["train-demo", "--help"])
    assert result.exit_code == 0
    for f in dataclasses.fields(DemoConfig):  # each under its dashed name (--output_dir also parses)
        assert "--" + f.name.replace("_", "-") in result.output
    config = DemoConfig.parse_args(["--steps", "7", "--no-resume", "--random-share", "0.5"])
    assert (config.steps, config.resume, config.random_share) == (7, False, 0.5)
    assert config.command() == "duet-vlm train-demo --no-resume --steps 7 --random-share 0.5"
    assert DemoConfig().command() == "duet-vlm train-demo"
    with pytest.raises(ValueError, match="scene-curriculum"):
        DemoConfig(scene_curriculum="300-1")


# ----------------------------------------------------------------------------- shipped model

@pytest.mark.skipif(not (DEMO_MODEL_DIR / "config.json").exists(),
                    reason=f"no shipped demo model yet at {DEMO_MODEL_DIR} (training still running?)")
def test_shipped_demo_model():
    model, proc = load_demo()
    cfg = model.config
    assert cfg.model_type == "llava"
    assert cfg.text_config.num_hidden_layers == 32
    assert cfg.vision_config.image_size == 336 and cfg.vision_config.patch_size == 14
    assert cfg.vision_feature_layer == -2 and cfg.vision_feature_select_strategy == "default"
    assert cfg.image_token_id == proc.tokenizer.convert_tokens_to_ids("<image>") == proc.image_token_id
    weights = DEMO_MODEL_DIR / "model.safetensors"
    assert weights.stat().st_size <= 60 * 2**20
    s = data.sample("test", 0)
    inputs = proc(images=s.image, text=prompt(s.question), return_tensors="pt")
    assert int((inputs["input_ids"] == cfg.image_token_id).sum()) == 576
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert out.shape[1] > inputs["input_ids"].shape[1]


@pytest.mark.skipif(not (DEMO_MODEL_DIR / "config.json").exists(), reason="no shipped demo model")
def test_shipped_demo_model_answers_from_the_image():
    """The README's claim on a fixed slice of the test split: far above chance with the image,
    back to language priors without it, and the shipped metrics agree with a fresh evaluation."""
    model, proc = load_demo()
    seen = evaluate_accuracy(model, proc, split="test", n=70, batch_size=14)
    blank = evaluate_accuracy(model, proc, split="test", n=70, batch_size=14, blank_image=True)
    assert seen["accuracy"] >= 0.8 and blank["accuracy"] <= 0.4
    assert all(acc >= 0.5 for acc in seen["per_type"].values())
    shipped = json.loads((DEMO_MODEL_DIR / "metrics.json").read_text())
    assert shipped["test"]["n"] == 700 and abs(shipped["test"]["accuracy"] - seen["accuracy"]) < 0.1


@pytest.mark.skipif(not (DEMO_MODEL_DIR / "config.json").exists(), reason="no shipped demo model")
def test_stage_a_dominant_tokens_lie_on_the_objects():
    """What the demo's overlay shows, measured: DUET's Stage A (ranking patches by CLS attention)
    keeps nearly every object patch among its dominant tokens, and its dominant tokens land on
    objects far more often than the objects' share of the image."""
    import duet_vlm

    model, proc = load_demo()
    recall, precision, share = [], [], []
    for index in range(14):
        sample = data.sample("test", index)
        on_object = data.object_patches(sample.scene).any(0)
        reducer = duet_vlm.make("duet", budget=64)
        inputs = proc(images=sample.image, text=prompt(sample.question), return_tensors="pt")
        with reducer(model), torch.no_grad():
            model(**inputs)
        dominant = reducer.stats.vision_roles["dominant"][0].numpy() - 1  # index 0 is CLS
        dominant = dominant[dominant >= 0]
        recall.append(on_object[dominant].sum() / on_object.sum())
        precision.append(on_object[dominant].mean())
        share.append(on_object.mean())
    assert np.mean(recall) >= 0.8
    assert np.mean(precision) >= 4 * np.mean(share)


def test_thread_tuner_adapts_to_contention():
    from duet_vlm.demo.train import ThreadTuner

    cost = {1: 3.0, 2: 2.0}  # idle machine: 2 threads faster
    t = ThreadTuner(2, probe_every=10, probe_steps=3)
    used = []
    for step in range(200):
        if step == 60:
            cost = {1: 8.0, 2: 25.0}  # contention: 2 threads collapse
        if step == 140:
            cost = {1: 3.0, 2: 2.0}
        n = t.threads(step)
        used.append(n)
        t.record(cost[n])
    assert used[50:60].count(2) >= 7
    assert used[100:140].count(1) >= 35  # at most an aborted one-step probe now and then
    assert used[170:200].count(2) >= 20  # probes of 1 thread every 10 steps here


def test_packed_questions_see_exactly_the_single_turn_context(processor):
    """Each packed question's logits equal those of the same question asked alone."""
    from duet_vlm.demo.batching import make_batch
    from duet_vlm.demo.objectives import language_forward, vision_features

    model = build_model(demo_config(processor.tokenizer, **TINY), seed=3).eval()
    tok = processor.tokenizer
    batch, _ = make_batch(tok, processor.image_token_id, step=5, batch_size=2, n_questions=4)
    with torch.no_grad():
        packed = language_forward(model, batch, vision_features(model, batch["pixel_values"])[0]).output.logits
    checked = 0
    for b in range(2):
        image, turns, _ = data.conversation("train", 5 * 2 + b, 4)
        labels = batch["labels"][b]
        answer_pos = [i for i in range(1, labels.shape[0]) if labels[i] != -100 and labels[i - 1] == -100]
        assert len(answer_pos) == len(turns)
        for (_, q, a), pos in zip(turns, answer_pos):
            single = processor(images=image, text=prompt(q), return_tensors="pt")
            with torch.no_grad():
                ref = model(**single).logits[0, -1]
            assert torch.allclose(packed[b, pos - 1], ref, atol=1e-4), q
            checked += 1
    assert checked >= 6


@pytest.mark.parametrize("order", ["original", "contiguous", "shuffled"])
@pytest.mark.parametrize("kind, size", [("random", 50), ("pool", 2), ("pool", 3)])
def test_training_on_a_visual_subset_is_the_model_on_the_shorter_prompt(processor, kind, size, order):
    """``language_forward`` on a subset = the plain model run on the sequence holding only the subset's
    tokens (kept patches, or the projected average of each pooled window), with labels carried along,
    at the kept patches' position ids ("original"; a pooled cell has its centre patch's) or renumbered
    as if the image had fewer tokens (also in a random order for "shuffled")."""
    from duet_vlm.demo.batching import make_batch, packed_attention_mask
    from duet_vlm.demo.objectives import VisualSubset, language_forward, vision_features
    from duet_vlm.methods.pool import pooled_centres

    model = build_model(demo_config(processor.tokenizer, **TINY), seed=4).eval()
    batch, _ = make_batch(processor.tokenizer, processor.image_token_id, step=2, batch_size=2, n_questions=3)
    subset = VisualSubset(kind, size)
    with torch.no_grad():
        patches, _ = vision_features(model, batch["pixel_values"])
        out = language_forward(model, batch, patches, subset, [order, "original"], torch.Generator().manual_seed(0)).output
    length, k = batch["input_ids"].shape[1], subset.tokens
    assert out.logits.shape[1] == length - 576 + k
    generator = torch.Generator().manual_seed(0)  # row 0's draws, again
    if kind == "random":
        kept = torch.randperm(576, generator=generator)[:k].sort().values
        randperm = torch.randperm(576, generator=generator)  # row 1's subset
        tokens = model.model.multi_modal_projector(patches[0, kept])
    else:
        g = 24 // size
        kept = pooled_centres((24, 24), (g, g))
        windows = patches[0].reshape(g, size, g, size, -1).mean((1, 3)).reshape(g * g, -1)
        tokens = model.model.multi_modal_projector(windows)
    order_of = torch.randperm(k, generator=generator) if order == "shuffled" else torch.arange(k)
    first = int((batch["input_ids"][0] == processor.image_token_id).nonzero()[0])
    index = torch.cat([torch.arange(first), torch.full((k,), first), torch.arange(first + 576, length)])
    embeds = model.get_input_embeddings()(batch["input_ids"][:1, index])
    embeds[0, first:first + k] = tokens[order_of]
    positions = batch["position_ids"][:1, index].clone()
    if order == "original":
        positions[0, first:first + k] = first + kept
    else:
        positions[0, first:first + k] = first + torch.arange(k)
        positions[0, first + k:] -= 576 - k
    labels = batch["labels"][:1, index]
    with torch.no_grad():
        ref = model(inputs_embeds=embeds, attention_mask=packed_attention_mask(batch["segments"][:1, index]),
                    position_ids=positions.clamp(min=0), labels=labels)
    assert torch.allclose(out.logits[0], ref.logits[0], atol=1e-5)
    with torch.no_grad():
        full = language_forward(model, batch, patches).output
    assert full.logits.shape[1] == length


def test_subset_mix_draws_every_subset_and_position_mode_and_no_ranked_subset(processor):
    from duet_vlm.demo.objectives import SubsetMix

    draws = [SubsetMix().draw(torch.Generator().manual_seed(step), rows=4) for step in range(400)]
    kinds = Counter((s.kind, s.size if s.kind == "pool" else None) for s, _ in draws)
    assert set(kinds) == {("full", None), ("random", None), ("pool", 2), ("pool", 3)}
    assert kinds["full", None] / 400 == pytest.approx(0.2, abs=0.06)
    sizes = [s.size for s, _ in draws if s.kind == "random"]
    assert min(sizes) >= 64 and max(sizes) <= 256
    orders = Counter(o for s, rows in draws if s.kind != "full" for o in rows)
    assert orders["original"] / sum(orders.values()) == pytest.approx(0.5, abs=0.05)
    assert orders["shuffled"] / orders["contiguous"] == pytest.approx(1.0, abs=0.2)
    assert all(rows == ["original"] * 4 for s, rows in draws if s.kind == "full")
    # the same step draws the same subset (resumable)
    assert SubsetMix().draw(torch.Generator().manual_seed(7), 4) == SubsetMix().draw(torch.Generator().manual_seed(7), 4)


def test_questions_a_random_subset_made_unanswerable_leave_the_loss(processor):
    """A question whose object lost every patch gets no answer label and no grounding query; with all
    patches, or pooled (every patch in some cell), every question stays."""
    from duet_vlm.demo.batching import make_batch
    from duet_vlm.demo.objectives import VisualSubset, language_forward, unanswerable, vision_features

    batch, aux = make_batch(processor.tokenizer, processor.image_token_id, step=1, batch_size=2, n_questions=8,
                            balanced=True)
    required = aux["required"]
    nothing = torch.zeros(2, 576, dtype=torch.bool)
    needs = (required > 0).any(-1)
    assert torch.equal(unanswerable(required, nothing), needs) and needs.any() and not needs.all()  # "no" answers
    assert not unanswerable(required, ~nothing).any()
    # keep exactly one patch of each group: still answerable; drop one whole group: that question goes
    one_each = torch.zeros_like(nothing)
    for b, q in needs.nonzero().tolist():
        for g in required[b, q].unique()[1:]:
            one_each[b, (required[b, q] == g).nonzero()[0]] = True
    assert not unanswerable(required, one_each).any()

    model = build_model(demo_config(processor.tokenizer, **TINY), seed=1).eval()
    with torch.no_grad():
        patches, _ = vision_features(model, batch["pixel_values"])
        kept = language_forward(model, batch, patches, VisualSubset("random", 64), generator=torch.Generator().manual_seed(3),
                                targets=aux)
        pooled = language_forward(model, batch, patches, VisualSubset("pool", 3), targets=aux)
    assert kept.dropped_questions > 0 and pooled.dropped_questions == 0
    # the loss is the mean over the answers of the questions that stayed answerable
    generator = torch.Generator().manual_seed(3)
    subsets = torch.stack([torch.randperm(576, generator=generator)[:64] for _ in range(2)])
    kept_patches = torch.zeros(2, 576, dtype=torch.bool).scatter_(1, subsets, True)
    bad = unanswerable(required, kept_patches)
    assert int(bad.sum()) == kept.dropped_questions
    first = int((batch["input_ids"][0] == processor.image_token_id).nonzero()[0])
    after = batch["labels"][:, first + 576:].clone()
    segments = batch["segments"][:, first + 576:]
    for b, q in bad.nonzero().tolist():
        after[b][segments[b] == q + 1] = -100
    labels = torch.cat([batch["labels"][:, :first], torch.full((2, 64), -100), after], 1)
    expected = torch.nn.functional.cross_entropy(kept.output.logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten())
    assert kept.output.loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_scene_labels_name_what_is_in_the_scene():
    for i in range(20):
        s = data.sample("train", i)
        labels = dict(zip(data.SCENE_LABELS, data.scene_labels(s.scene)))
        for o in s.scene:
            assert labels[o["color"]] == labels[o["shape"]] == labels[f"{o['color']} {o['shape']}"] == 1
        pairs = {f"{o['color']} {o['shape']}" for o in s.scene}
        assert sum(v for k, v in labels.items() if k.count(" ") == 1 and not k.startswith("char")) == len(pairs)


def test_objects_sit_on_the_patch_grid_and_patch_labels_stay_in_their_block():
    """Each object is centred on a patch centre and lies in its own 3x3 block of patches; its
    character is drawn inside the centre patch (what makes the tiny tower learn them)."""
    P, G = data.PATCH_SIZE, data.GRID
    n_chars = 0
    for i in range(60):
        s = data.sample("validation", i)
        labels = data.patch_labels(s.scene)
        colour_cells = set(np.flatnonzero(labels["color"]))
        owned = set()
        for o in s.scene:
            assert (o["x"] - P // 2) % P == 0 and (o["y"] - P // 2) % P == 0
            gx, gy = o["x"] // P, o["y"] // P
            assert 1 <= gx <= G - 2 and 1 <= gy <= G - 2 and o["r"] <= 1.5 * P
            block = {(gy + dy) * G + gx + dx for dy in (-1, 0, 1) for dx in (-1, 0, 1)}
            assert not block & owned  # no two objects share a patch
            owned |= block
            centre = gy * G + gx
            if o["char"] is None:
                assert not labels["char"][list(block)].any()
            mine = {c for c in colour_cells if c in block}
            assert centre in mine and len(mine) >= 3
            assert {int(labels["color"][c]) for c in mine} == {data.COLOR_NAMES.index(o["color"]) + 1}
            assert {int(labels["shape"][c]) for c in mine} == {data.SHAPES.index(o["shape"]) + 1}
            if o["char"] is not None:
                n_chars += 1
                assert {c for c in block if labels["char"][c]} == {centre}
                assert labels["char"][centre] == data.CHARACTERS.index(o["char"]) + 1
                # the glyph's ink lies inside the centre patch
                ink = np.asarray(data.GLYPH_INK[o["color"]])
                arr = np.asarray(s.image).astype(int)
                window = arr[o["y"] - 10:o["y"] + 11, o["x"] - 10:o["x"] + 11]
                ys, xs = np.nonzero(np.abs(window - ink).max(-1) < 40)
                assert len(ys) and (np.abs(ys - 10) <= P // 2).all() and (np.abs(xs - 10) <= P // 2).all()
        assert colour_cells <= owned
    assert n_chars > 10


def test_questions_use_the_right_article_and_count_answers_are_balanced():
    samples = [data.sample("train", i) for i in range(7 * 120)]
    for s in samples:
        if s.qtype == "exists":
            first = s.question.split()[2]
            assert first == ("an" if s.question.split()[3][0] in "aeiou" else "a"), s.question
    counts = [s.answer for s in samples if s.qtype == "count"]
    for word in ("one", "two", "three", "four"):
        assert 0.12 < counts.count(word) / len(counts) < 0.4, (word, counts.count(word))


def test_scene_curriculum_caps_the_number_of_objects():
    for cap in (1, 2, 3):
        for i in range(10):
            _image, turns, scene = data.conversation("train", i, 16, max_objects=cap)
            assert 1 <= len(scene) <= cap and turns
            if cap == 1:  # one object: nothing to compare, a single count
                assert all(qtype != "relation" for qtype, _q, _a in turns)
                assert all(a == "one" for qtype, _q, a in turns if qtype == "count")
    with pytest.raises(ValueError, match="max_objects"):
        data.conversation("train", 0, 4, max_objects=0)
    # without a cap, scenes are unchanged (the test split never uses one)
    assert data.conversation("test", 5, 4)[2] == data.conversation("test", 5, 4, None)[2]


def test_word_alignment_trains_only_the_answer_words_rows(processor):
    """The alignment term reads object patches through the decoder's norm and lm_head and
    scores them among the words of one kind, so only those lm_head rows get gradients."""
    from duet_vlm.demo.batching import vision_batch as _vision_batch
    from duet_vlm.demo.objectives import AuxHeads, answer_words, image_features

    model = build_model(demo_config(processor.tokenizer, **TINY), seed=6)
    words = answer_words(processor.tokenizer)
    assert processor.tokenizer.unk_token_id not in sum(words.values(), [])
    labels, pixels = _vision_batch(0, 2, offset=0)
    feats, cls = image_features(model, pixels)
    heads = AuxHeads(feats.shape[-1], cls.shape[-1], words)
    heads.loss(feats, cls, labels, model).backward()
    grad = model.lm_head.weight.grad.abs().sum(-1)
    used = sorted(set(sum(words.values(), [])))
    assert (grad[used] > 0).sum() >= len(used) - len(words["char"])  # characters may be absent
    unused = [i for i in range(grad.shape[0]) if i not in used]
    assert torch.all(grad[unused] == 0)
    assert model.model.multi_modal_projector.linear_1.weight.grad.abs().sum() > 0
    without = AuxHeads(feats.shape[-1], cls.shape[-1])
    model.zero_grad()
    without.loss(feats.detach(), cls.detach(), labels, model).backward()
    assert model.lm_head.weight.grad is None


def test_patch_word_probe_reads_patches_through_the_decoder_head(processor):
    from duet_vlm.demo.batching import vision_batch as _vision_batch
    from duet_vlm.demo.evaluate import patch_word_probe

    model = build_model(demo_config(processor.tokenizer, **TINY), seed=0).eval()
    # an all-zero head ties every word, argmax picks the first of each kind: the probe must score
    # exactly the share of labelled patches whose true word is that first one
    with torch.no_grad():
        model.lm_head.weight.zero_()
    probe = patch_word_probe(model, processor.tokenizer, n_images=4)
    assert set(probe) == {"color", "shape", "char"}
    labels, _ = _vision_batch(0, 4, 60_000_000)
    for name in ("color", "shape", "char"):
        on = labels[name] > 0
        assert probe[name] == pytest.approx((labels[name][on] == 1).float().mean().item())


# ----------------------------------------------------------------------------- grounding loss

def test_question_objects_are_the_objects_the_answer_is_about():
    seen = set()
    for i in range(40):
        _image, turns, scene = data.conversation("train", i, 16, balanced=True, with_params=True)
        for qtype, _q, answer, params in turns:
            seen.add(qtype)
            objs = [scene[k] for k in data.question_objects(scene, qtype, params)]
            if qtype == "color":
                assert [o["color"] for o in objs] == [answer]
            elif qtype == "shape":
                assert [o["shape"] for o in objs] == [answer]
            elif qtype == "count":
                assert len(objs) == data.NUMBER_WORDS.index(answer)
            elif qtype == "exists":
                assert len(objs) == (answer == "yes")
            elif qtype == "relation":
                a, b = objs
                assert (f"{a['color']} {a['shape']}", f"{b['color']} {b['shape']}") == (params["a"], params["b"])
            elif qtype == "quadrant":
                assert [data._quadrant(o) for o in objs] == [answer]
            else:
                assert [o["char"] for o in objs] == [answer]
    assert seen == set(data.QUESTION_TYPES)
    with pytest.raises(ValueError, match="unknown question type"):
        data.question_objects(scene, "size", {})


def test_balanced_conversations_give_every_possible_type_an_equal_share():
    read_turns = {False: 0, True: 0}
    for i in range(30):
        for balanced in (False, True):
            _image, turns, scene = data.conversation("train", i, 16, balanced=balanced)
            counts = Counter(qtype for qtype, _q, _a in turns)
            read_turns[balanced] += counts["read"]
            if balanced:
                assert len(turns) == 16 and max(counts.values()) - min(counts.values()) <= 1
                assert ("read" in counts) == any(o["char"] is not None for o in scene)
            else:
                assert len({q for _, q, _ in turns}) == len(turns)
    assert read_turns[True] > 1.5 * read_turns[False]


def test_grounding_targets_name_the_patches_of_the_asked_objects(processor):
    from duet_vlm.demo.batching import grounding_targets

    _image, turns, scene = data.conversation("train", 11, 16, balanced=True, with_params=True)
    patches = data.object_patches(scene)
    assert patches.shape == (len(scene), 576) and not (patches.sum(0) > 1).any()  # objects never share a patch
    for (qtype, _q, answer, params), target in zip(turns, grounding_targets(scene, turns)):
        objects = data.question_objects(scene, qtype, params)
        assert target[2].sum() == (len(objects) if qtype == "count" else 0)
        if qtype == "count":  # one patch per counted object, inside it
            assert not target[0].any() and np.array_equal(target[2] & patches[objects].any(0), target[2])
        elif qtype == "exists" and answer == "no":
            assert not target.any()
        elif qtype == "read":
            assert np.array_equal(target[0], data.char_patches(scene[objects[0]])) and target[0].sum() >= 1
        else:
            assert np.array_equal(target[0], patches[objects].any(0))
        assert target[1].any() == target[3].any() == (qtype == "relation")
        if qtype == "relation":
            assert np.array_equal(target[1], patches[objects[0]]) and np.array_equal(target[3], patches[objects[1]])


def test_a_question_a_subset_made_unanswerable_leaves_no_nan_gradient(processor):
    """Regression: a relation question whose first object a random subset dropped still had its
    second object's patches as a grounding target; its row had no visual token to attend to, and the
    logsumexp over only -inf gave NaN gradients (the demo retrain turned to NaN at its first
    two-object scenes). The dropped question must leave the loss without a trace."""
    from duet_vlm.demo.batching import make_batch
    from duet_vlm.demo.objectives import VisualSubset, language_forward, vision_features

    tok = processor.tokenizer
    model = build_model(demo_config(tok, **{**TINY, "text_heads": 4, "text_kv_heads": 2}), seed=2)
    batch, aux = make_batch(tok, processor.image_token_id, step=3, batch_size=2, n_questions=8, balanced=True)
    patches, _ = vision_features(model, batch["pixel_values"])
    targets = {k: aux[k] for k in ("ground_query", "ground_target", "required")}
    result = language_forward(model, batch, patches, VisualSubset("random", 40), ["original", "shuffled"],
                              torch.Generator().manual_seed(0), targets, ground_layers=(1,))
    assert result.dropped_questions > 0
    (result.output.loss + result.grounding).backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


@pytest.mark.parametrize("keep_visual", [None, 100])
def test_grounding_loss_is_minus_log_the_layers_attention_on_the_targets(processor, keep_visual):
    """Differential test: the loss equals -log(attention mass on the target patches) taken from
    the layer's full attention matrix, itself checked against the module's own output."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    from duet_vlm.demo.batching import make_batch, packed_attention_mask
    from duet_vlm.demo.objectives import FULL, VisualSubset, language_forward, vision_features

    tok = processor.tokenizer
    model = build_model(demo_config(tok, **{**TINY, "text_heads": 4, "text_kv_heads": 2}), seed=2)
    batch, aux = make_batch(tok, processor.image_token_id, step=3, batch_size=2, n_questions=8, balanced=True)
    assert aux["ground_target"][..., 2, :].any() and aux["ground_target"][..., 3, :].any()  # count, relation
    layer = model.model.language_model.layers[1]
    seen = {}
    hooks = [layer.self_attn.register_forward_hook(lambda _m, _a, out: seen.__setitem__("out", out[0])),
             layer.register_forward_pre_hook(lambda _m, a, kw: seen.__setitem__("in", (a[0] if a else kw["hidden_states"], kw["position_embeddings"])), with_kwargs=True)]
    patches, _ = vision_features(model, batch["pixel_values"])
    subset = VisualSubset("random", keep_visual) if keep_visual else FULL
    targets = {k: aux[k] for k in ("ground_query", "ground_target")}  # no "required": every query stays
    _out, loss, _ = language_forward(model, batch, patches, subset, generator=torch.Generator().manual_seed(0),
                                     targets=targets, ground_layers=(1,))
    loss.backward()  # targets that are empty must not leak NaN gradients
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    with torch.no_grad():
        # the same subsets, drawn again
        gen, first = torch.Generator().manual_seed(0), int((batch["input_ids"][0] == processor.image_token_id).nonzero()[0])
        kept, rows = [], []
        for b in range(2):
            order = torch.randperm(576, generator=gen)
            kept.append(order[:keep_visual].sort().values if keep_visual else torch.arange(576))
            rows.append(torch.cat([torch.arange(first), first + kept[-1],
                                   torch.arange(first + 576, batch["input_ids"].shape[1])]))
        mask = packed_attention_mask(torch.gather(batch["segments"], 1, torch.stack(rows)))
        hidden, (cos, sin) = seen["in"]
        attn = layer.self_attn
        x = layer.input_layernorm(hidden)
        heads = [proj(x).view(*x.shape[:2], -1, attn.head_dim).transpose(1, 2)
                 for proj in (attn.q_proj, attn.k_proj, attn.v_proj)]
        heads[1:] = [h.repeat_interleave(attn.num_key_value_groups, dim=1) for h in heads[1:]]
        q, k = apply_rotary_pos_emb(heads[0], heads[1], cos, sin)
        probs = ((q @ k.transpose(-1, -2)) * attn.scaling).masked_fill(~mask, float("-inf")).softmax(-1)
        own = attn.o_proj((probs @ heads[2]).transpose(1, 2).flatten(2))
        assert torch.allclose(own, seen["out"], atol=1e-5)
    for h in hooks:
        h.remove()
    shift = 576 - len(kept[0])
    terms = []
    for b in range(2):
        for qi, pos in enumerate(aux["ground_query"][b].tolist()):
            if pos < 0:
                continue
            row = probs[b, :, pos - shift]
            for head in (0, 1, 3):
                target = aux["ground_target"][b, qi, head][kept[b]]
                if target.any():
                    terms.append(-row[head, first:first + len(kept[b])][target].sum().log())
            spread = aux["ground_target"][b, qi, 2][kept[b]]
            if spread.any():  # cross-entropy against uniform over <s> and the counted patches
                chosen = torch.cat([row[2, :1], row[2, first:first + len(kept[b])][spread]])
                terms.append(-chosen.log().mean())
    assert len(terms) > 4
    assert loss.item() == pytest.approx(torch.stack(terms).mean().item(), rel=1e-5)
