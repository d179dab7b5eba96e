"""`duet-vlm train`: LLaVA-format data, labels, freezing, Trainer run, save/resume, wrappers, DDP, bad input."""

from __future__ import annotations

import copy
import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import LlavaForConditionalGeneration
from typer.testing import CliRunner

import duet_vlm
from duet_vlm.cli import app
from duet_vlm import compat
from duet_vlm.compat import enable_checkpointing
from duet_vlm.demo.processor import build_processor
from duet_vlm.training import DataError, TrainConfig, VisionLanguageCollator, encode, synthetic_records, train
from duet_vlm.training.trainer import checkpointing_callback, make_reducer, set_trainable
from duet_vlm.unwrap import unwrap_model

from checks import write_llava_json
from models import BUDGETED
from models import make_demo_llava as tiny

#: What the library says where the installed transformers re-runs module hooks in a checkpoint's
#: recompute (before 5.23: ``compat.check_checkpointing``); the checkpointing tests check it there.
CHECKPOINTING_REFUSED = "checkpointing under a duet-vlm reducer needs transformers 5.23 or newer"

BUDGET = 320  # every method can reach it on 4 decoder layers (FastV's first two layers alone average 288)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, processor) -> Path:
    path = tmp_path_factory.mktemp("tiny_llava")
    tiny(processor).save_pretrained(path)
    processor.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def batch(processor):
    items = [encode(processor, record) for record in synthetic_records(2, questions=3)]
    return VisionLanguageCollator(processor.tokenizer.pad_token_id)(items)


# ----------------------------------------------------------------------------- labels and a training step

def test_labels_are_the_answers_only(processor, batch):
    ids, labels = batch["input_ids"], batch["labels"]
    tokens = processor.tokenizer.convert_ids_to_tokens(ids[0][labels[0] != -100].tolist())
    record = synthetic_records(1, questions=3)[0]
    answers = [m["content"][0]["text"] for m in record.messages if m["role"] == "assistant"]
    assert tokens == [t for a in answers for t in (a, "</s>")]  # multi-turn answers, each closed by EOS
    assert (labels[ids == processor.tokenizer.convert_tokens_to_ids("<image>")] == -100).all()
    assert (labels[batch["attention_mask"] == 0] == -100).all()


def test_an_eos_the_template_already_puts_after_each_answer_is_labelled():
    """A chat template that closes every answer with EOS itself (outside its generation span): the
    ids stay the template's (no second EOS inserted) and the EOS after each answer is labelled, so the
    model learns to stop; with ``eos_after_answer=False`` it stays unlabelled.

    Catches ``eos_after_answer`` labelling only the EOS it inserts (the default template's case, which
    ``test_labels_are_the_answers_only`` covers) and leaving the template's own EOS at -100."""
    processor = copy.deepcopy(build_processor())
    processor.chat_template = processor.chat_template.replace("{% endgeneration %}", "{% endgeneration %}{{ '</s>' }}")
    record = synthetic_records(1, questions=3)[0]
    answers = [m["content"][0]["text"] for m in record.messages if m["role"] == "assistant"]
    tokenizer = processor.tokenizer
    messages = [{**m, "content": [{"type": "image", "image": record.image} if c["type"] == "image" else c
                                  for c in m["content"]]} for m in record.messages]
    template_ids = processor.apply_chat_template(messages, tokenize=True, return_dict=True, return_tensors="pt")["input_ids"][0]
    eos = tokenizer.eos_token_id
    encoded = encode(processor, record)
    ids, labels = encoded["input_ids"], encoded["labels"]
    assert torch.equal(ids, template_ids) and int((ids == eos).sum()) == len(answers)
    assert tokenizer.convert_ids_to_tokens(ids[labels != -100].tolist()) == [t for a in answers for t in (a, "</s>")]
    assert (labels[ids == eos] == eos).all()
    unlabelled = encode(processor, record, eos_after_answer=False)
    assert torch.equal(unlabelled["input_ids"], template_ids) and (unlabelled["labels"][ids == eos] == -100).all()


def test_collator_passes_extra_keys_through():
    """A recipe's own keys: per-token sequences padded like input_ids, other tensors stacked and padded."""
    items = [{"input_ids": torch.tensor([5, 6, 7]), "attention_mask": torch.ones(3, dtype=torch.long),
              "labels": torch.tensor([-100, 6, 7]), "pixel_values": torch.zeros(1, 3, 2, 2),
              "segments": torch.tensor([0, 1, 1]), "query": torch.tensor([2]), "target": torch.ones(1, 4, dtype=torch.bool)},
             {"input_ids": torch.tensor([5]), "attention_mask": torch.ones(1, dtype=torch.long),
              "labels": torch.tensor([-100]), "pixel_values": torch.ones(1, 3, 2, 2),
              "segments": torch.tensor([0]), "query": torch.tensor([0, 1]), "target": torch.ones(2, 4, dtype=torch.bool)}]
    batch = VisionLanguageCollator(0, sequence_keys={"segments": -1}, pad_values={"query": -1})(items)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [5, 0, 0]] and batch["labels"][1].tolist() == [-100] * 3
    assert batch["segments"].tolist() == [[0, 1, 1], [0, -1, -1]]
    assert batch["query"].tolist() == [[2, -1], [0, 1]]
    assert batch["target"].shape == (2, 2, 4) and batch["target"].sum() == 12
    assert batch["pixel_values"].shape == (2, 3, 2, 2)


@pytest.mark.parametrize("method", BUDGETED)  # pixelprune (no budget): test_pixelprune_trains_on_llava
def test_training_step_changes_only_trained_parameters(processor, batch, method):
    model = tiny(processor).train()
    config = TrainConfig(model="-", data="-", output_dir="-", method=method, budget=BUDGET, train="projector")
    model = set_trainable(model, config)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    with make_reducer(config)(model):
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
    assert torch.isfinite(loss)
    changed = {name for name, p in model.named_parameters() if not torch.equal(p, before[name])}
    assert changed and all("multi_modal_projector" in name for name in changed)
    assert all(".vision_tower." not in name for name in changed)


@pytest.mark.parametrize("trained", ["projector", "projector+llm", "lora"])
def test_each_train_mode_trains_exactly_its_parts(processor, batch, trained):
    """``set_trainable`` for every ``--train`` mode: the parameters that require grad are exactly the
    mode's parts (named here from the model's own module tree): the projector; the projector, the
    whole language model and ``lm_head``; LoRA A/B on every decoder layer's q/k/v/o plus a trainable
    copy of the projector. One backward under the reducer then gives each of them a nonzero gradient
    (LoRA A excepted: its gradient is zero while B is still zero) and nothing else one.

    Catches a mode leaving part of what it names frozen (e.g. ``projector+llm`` without ``lm_head``)
    or training the vision tower."""
    model = tiny(processor).train()
    names = [name for name, _ in model.named_parameters()]
    projector = {n for n in names if n.startswith("model.multi_modal_projector.")}
    language = {n for n in names if n.startswith("model.language_model.")}
    head = {n for n in names if n.startswith("lm_head.")}
    assert projector and language and head
    config = TrainConfig(model="-", data="-", output_dir="-", method="duet", budget=BUDGET, train=trained)
    wrapped = set_trainable(model, config)
    trainable = {name for name, p in wrapped.named_parameters() if p.requires_grad}
    if trained == "lora":
        prefix = "base_model.model."
        attention = [f"model.language_model.layers.{i}.self_attn.{proj}" for i in range(4)
                     for proj in ("q_proj", "k_proj", "v_proj", "o_proj")]
        lora_a = {f"{prefix}{m}.lora_A.default.weight" for m in attention}
        copies = {prefix + n.replace("multi_modal_projector.", "multi_modal_projector.modules_to_save.default.")
                  for n in projector}
        expected, silent = lora_a | {n.replace("lora_A", "lora_B") for n in lora_a} | copies, lora_a
    else:
        expected, silent = projector | (language | head if trained == "projector+llm" else set()), set()
    assert trainable == expected
    with make_reducer(config)(wrapped):
        wrapped(**batch).loss.backward()
    graded = {name for name, p in wrapped.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert graded == expected - silent


def test_dropped_visual_positions_never_enter_the_loss(processor, batch):
    model = tiny(processor)
    reducer = duet_vlm.make("duet", budget=64)
    with reducer(model), torch.no_grad():
        out = model(**batch)
    logits, labels = out.logits[:, :-1], batch["labels"][:, 1:]
    read = labels != -100
    dropped = (logits == 0).all(-1)  # slots of dropped visual tokens hold zeros
    assert dropped.sum() > 500 and not (dropped & read).any()
    expected = torch.nn.functional.cross_entropy(logits[read].float(), labels[read])
    torch.testing.assert_close(out.loss, expected)


@pytest.mark.parametrize("trained", ["projector+llm", "lora"])
def test_gradient_checkpointing_matches_the_plain_run_and_leaves_the_tower_out_of_autograd(processor, batch, trained):
    """Checkpointing enabled as ``Trainer`` does it, then the callback ``duet-vlm train`` installs: the same
    loss and gradients as the plain run, and the frozen tower's output does not require grad (transformers'
    input-gradient hooks would make autograd back-propagate through the whole tower)."""
    from types import SimpleNamespace

    config = TrainConfig(model="-", data="-", output_dir="-", budget=64, train=trained)
    results = []
    for checkpointing in (False, True):
        model = set_trainable(tiny(processor).train(), config)
        tower_output = []
        unwrap_model(model).model.vision_tower.register_forward_hook(
            lambda module, args, out: tower_output.append(out.last_hidden_state.requires_grad)
        )
        if checkpointing:
            enable_checkpointing(model, use_reentrant=False)
            model(**batch)
            assert tower_output.pop(), "without the callback transformers' hooks reach the tower"
            checkpointing_callback().on_train_begin(SimpleNamespace(**{compat.CHECKPOINTING: True}), None, None, model=model)
            if not compat.HOOKS_OUTSIDE_CHECKPOINT:
                with pytest.raises(NotImplementedError, match=CHECKPOINTING_REFUSED), make_reducer(config)(model):
                    model(**batch)
                return
        with make_reducer(config)(model):
            loss = model(**batch).loss
            loss.backward()
        assert tower_output == [False]
        results.append((loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}))
    (loss_plain, grads_plain), (loss_ckpt, grads_ckpt) = results
    torch.testing.assert_close(loss_ckpt, loss_plain)
    assert grads_plain.keys() == grads_ckpt.keys()
    for name in grads_plain:
        assert grads_plain[name] is not None, name
        torch.testing.assert_close(grads_ckpt[name], grads_plain[name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.fixture(scope="module")
def uneven_batch(processor):
    """A right-padded batch (the collator's default) of a three-turn and a one-turn conversation: the
    second row carries many pads after its answer; and each row alone, without its pads."""
    records = synthetic_records(1, questions=3) + synthetic_records(1, questions=1, offset=1)
    batch = VisionLanguageCollator(processor.tokenizer.pad_token_id)([encode(processor, r) for r in records])
    alone = []
    for b in range(2):
        keep = batch["attention_mask"][b].bool()
        alone.append({k: v[b : b + 1, keep] if v.dim() == 2 else v[b : b + 1] for k, v in batch.items()})
    assert int((batch["attention_mask"][1] == 0).sum()) > 20
    return batch, alone


@pytest.mark.parametrize("method", BUDGETED)  # pixelprune (no budget): test_pixelprune_trains_on_llava
def test_loss_of_a_right_padded_batch_equals_its_rows_alone(processor, uneven_batch, method):
    """Under every method, a right-padded training batch: each row's logits at its valid positions,
    its loss from them, and the batch loss (the token-weighted mean of the rows' own losses) equal the
    row run alone; under ``full`` the loss also equals the unpatched model's.

    ``test_dropped_visual_positions_never_enter_the_loss`` recomputes the loss from the same call's
    logits, so a wrong loss under a reducer passes it; here the reference is independent. Catches
    padding after the answer leaking into a row's selection (e.g. the pads counted as Stage-B query
    tokens), which left-padded tests cannot see (their pads sit before the image).
    """
    batch, alone = uneven_batch
    model = tiny(processor)
    config = TrainConfig(model="-", data="-", output_dir="-", method=method, budget=BUDGET)
    with torch.no_grad():
        plain = model(**batch).loss
        with make_reducer(config)(model):
            out = model(**batch)
            singles = [model(**single) for single in alone]
    mask, labels = batch["attention_mask"].bool(), batch["labels"]
    counts = [int((single["labels"][0, 1:] != -100).sum()) for single in alone]
    for b, single in enumerate(singles):
        torch.testing.assert_close(out.logits[b, mask[b]], single.logits[0], atol=1e-4, rtol=1e-4, msg=f"row {b}")
        row_loss = torch.nn.functional.cross_entropy(out.logits[b, :-1], labels[b, 1:], ignore_index=-100)
        torch.testing.assert_close(row_loss, single.loss, atol=1e-5, rtol=1e-5, msg=f"row {b} loss")
    torch.testing.assert_close(out.loss, sum(n * s.loss for n, s in zip(counts, singles)) / sum(counts))
    if method == "full":
        torch.testing.assert_close(out.loss, plain, atol=0, rtol=0)


def test_pixelprune_trains_on_llava(processor, uneven_batch):
    """PixelPrune on the demo LLaVA's CLIP tower in training (``mae`` 0.05: the demo scenes' noisy
    backgrounds repeat nothing at the official threshold 0). The two images keep different patch
    counts, so the tower runs them padded under a key mask: each row's logits and loss equal the row
    run alone; ``make_reducer`` builds it without a budget; and the loss's gradient reaches the
    projector only (``train="projector"``)."""
    batch, alone = uneven_batch
    config = TrainConfig(model="-", data="-", output_dir="-", method="pixelprune", train="projector")
    assert make_reducer(config) == duet_vlm.make("pixelprune")
    reducer = duet_vlm.make("pixelprune", metric="mae", threshold=0.05)
    model = set_trainable(tiny(processor).train(), config)
    with reducer(model):
        out = model(**batch)
        counts = [item.tokens_per_layer[0] for item in reducer.stats.items]
        with torch.no_grad():
            singles = [model(**single) for single in alone]
    assert len(set(counts)) == 2 and max(counts) < 576, counts  # reduced, and unevenly
    mask, labels = batch["attention_mask"].bool(), batch["labels"]
    for b, single in enumerate(singles):
        torch.testing.assert_close(out.logits[b, mask[b]].detach(), single.logits[0], atol=1e-4, rtol=1e-4, msg=f"row {b}")
        row_loss = torch.nn.functional.cross_entropy(out.logits[b, :-1], labels[b, 1:], ignore_index=-100)
        torch.testing.assert_close(row_loss.detach(), single.loss, atol=1e-5, rtol=1e-5, msg=f"row {b} loss")
    out.loss.backward()
    trained = {name for name, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert trained and all("multi_modal_projector" in name for name in trained)


# ----------------------------------------------------------------------------- the command

def test_cli_train_saves_a_plain_checkpoint_and_resumes(tmp_path, checkpoint):
    data = write_llava_json(tmp_path)
    out = tmp_path / "out"
    args = ["--model", str(checkpoint), "--data", str(data), "--image-folder", str(tmp_path / "images"),
            "--output-dir", str(out), "--method", "duet", "--budget", "64", "--train", "lora",
            "--batch-size", "2", "--save-steps", "1", "--logging-steps", "1", "--learning-rate", "1e-3",
            "--gradient-checkpointing"]
    if not compat.HOOKS_OUTSIDE_CHECKPOINT:  # refused by name there; the rest runs without checkpointing
        result = CliRunner().invoke(app, ["train", *args, "--max-steps", "2"])
        assert result.exit_code != 0 and CHECKPOINTING_REFUSED in str(result.exception), result.output
        args.remove("--gradient-checkpointing")
        shutil.rmtree(out, ignore_errors=True)
    result = CliRunner().invoke(app, ["train", *args, "--max-steps", "2"])
    assert result.exit_code == 0, result.output

    trained = LlavaForConditionalGeneration.from_pretrained(out)
    original = LlavaForConditionalGeneration.from_pretrained(checkpoint)
    state, base = trained.state_dict(), original.state_dict()
    assert state.keys() == base.keys()  # LoRA merged: no adapter or wrapper weights left
    differs = {name for name in state if not torch.equal(state[name], base[name])}
    assert any("q_proj" in n and "language_model" in n for n in differs)
    assert any("multi_modal_projector" in n for n in differs)
    assert not any("vision_tower" in n for n in differs)
    assert not trained._forward_pre_hooks and not trained.model.language_model.layers[0]._forward_pre_hooks

    saved = json.loads((out / "train_config.json").read_text())
    config = TrainConfig.from_dict(saved)
    assert config == TrainConfig.parse_args([*args, "--max-steps", "2"])
    # the reducer that trained, recorded so that it rebuilds
    assert duet_vlm.from_dict(saved["reducer"]) == make_reducer(config) == duet_vlm.make("duet", budget=64)
    card = (out / "README.md").read_text()
    assert config.command() in card and "`duet`, budget: 64" in card
    assert TrainConfig.parse_args(shlex.split(config.command())[2:]) == config
    summary = json.loads((out / "train_results.json").read_text())
    assert f"{summary['final_loss']:.4f}" in card and summary["global_step"] == 2

    first = json.loads((out / "checkpoint-2" / "trainer_state.json").read_text())["log_history"]
    resume = ["--max-steps", "3", "--resume-from-checkpoint", str(out / "checkpoint-2")]
    resumed = CliRunner().invoke(app, ["train", *args, *resume])
    assert resumed.exit_code == 0, resumed.output
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    losses = [entry for entry in history if "loss" in entry]
    assert [e["step"] for e in losses] == [1, 2, 3]
    assert losses[:2] == [e for e in first if "loss" in e]  # steps 1-2 come from the checkpoint, not re-run


@pytest.mark.parametrize("trained", ["lora", "projector+llm"])
def test_one_checkpointed_training_step_updates_the_language_model_as_the_plain_step_does(tmp_path, checkpoint, trained):
    """``duet-vlm train --gradient-checkpointing`` for one step (through ``TrainConfig.parse_args`` and
    ``train``, so through ``training_arguments`` and the checkpointing callback), with PIO, whose
    scoring differentiates one checkpointed block: every decoder layer's weights changed (the merged
    LoRA q/k/v/o; in ``projector+llm`` every language-model parameter and ``lm_head``), the projector
    changed, the vision tower did not, and the saved weights equal those of the same step without
    checkpointing.

    Catches checkpointing configured so that gradients do not reach the checkpointed layers as they
    should (e.g. reentrant checkpointing, under which no checkpointed input needs grad once the
    input-gradient hooks are dropped, and which PIO's one-block ``autograd.grad`` cannot run under)."""
    common = ["--model", str(checkpoint), "--data", "synthetic", "--synthetic-items", "1", "--synthetic-questions", "2",
              "--method", "pio", "--budget", str(BUDGET), "--train", trained, "--batch-size", "1", "--max-steps", "1",
              "--learning-rate", "1e-3", "--save-steps", "10"]
    states = {}
    for checkpointing in (True, False):
        out = tmp_path / ("checkpointed" if checkpointing else "plain")
        config = TrainConfig.parse_args([*common, "--output-dir", str(out), *["--gradient-checkpointing"] * checkpointing])
        assert config.gradient_checkpointing is checkpointing
        if checkpointing and not compat.HOOKS_OUTSIDE_CHECKPOINT:
            with pytest.raises(NotImplementedError, match=CHECKPOINTING_REFUSED):
                train(config)
            return
        train(config)
        states[checkpointing] = LlavaForConditionalGeneration.from_pretrained(out).state_dict()
    base = LlavaForConditionalGeneration.from_pretrained(checkpoint).state_dict()
    projector = {n for n in base if n.startswith("model.multi_modal_projector.")}
    if trained == "lora":
        trained_names = {f"model.language_model.layers.{i}.self_attn.{proj}.weight"
                         for i in range(4) for proj in ("q_proj", "k_proj", "v_proj", "o_proj")}
    else:
        trained_names = {n for n in base if n.startswith(("model.language_model.", "lm_head."))}
    changed = {name for name in base if not torch.equal(states[True][name], base[name])}
    assert changed == trained_names | projector
    for name in base:
        torch.testing.assert_close(states[True][name], states[False][name], atol=1e-6, rtol=1e-5, msg=name)


def test_the_seed_decides_the_lora_initialisation(tmp_path, checkpoint):
    """Two LoRA runs with one ``--seed`` give the same weights whatever the global random state
    before them (LoRA's A matrices are drawn before the Trainer seeds); another seed, other weights."""
    common = ["--model", str(checkpoint), "--data", "synthetic", "--synthetic-items", "1", "--synthetic-questions", "1",
              "--method", "fastv", "--budget", str(BUDGET), "--train", "lora", "--batch-size", "1", "--max-steps", "1",
              "--learning-rate", "1e-2", "--save-steps", "10"]
    states = []
    for run, (seed, noise) in enumerate(((0, 1), (0, 2), (1, 1))):
        out = tmp_path / f"run{run}"
        torch.manual_seed(noise)  # a different global random state before each run
        train(TrainConfig.parse_args([*common, "--seed", str(seed), "--output-dir", str(out)]))
        states.append(LlavaForConditionalGeneration.from_pretrained(out).state_dict())
    q_proj = "model.language_model.layers.0.self_attn.q_proj.weight"
    assert all(torch.equal(states[0][name], states[1][name]) for name in states[0])
    assert not torch.equal(states[0][q_proj], states[2][q_proj])


# ----------------------------------------------------------------------------- wrapped models

def test_wrapped_models_attach(processor, batch, tmp_path):
    from peft import LoraConfig, get_peft_model

    model = tiny(processor)
    peft_model = get_peft_model(copy.deepcopy(model), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    reducer = duet_vlm.make("duet", budget=64)
    with reducer(peft_model), torch.no_grad():
        peft_model(**batch)
    assert reducer.stats.tokens_per_layer == [102, 102, 51, 0]

    compiled = torch.compile(model)
    assert unwrap_model(compiled) is model
    handle = reducer.attach(compiled)
    assert handle.model is model
    handle.remove()

    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        reducer.stats = None
        with reducer(ddp), torch.no_grad():
            ddp(**batch)
        assert reducer.stats.tokens_per_layer == [102, 102, 51, 0]
        assert unwrap_model(torch.compile(ddp)) is model
    finally:
        torch.distributed.destroy_process_group()

    with pytest.raises(TypeError, match="pass the LlavaForConditionalGeneration"):
        reducer.attach(model.model.language_model)


def test_accelerate_launch_two_processes_keeps_replicas_identical(tmp_path, checkpoint):
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "-m", "duet_vlm.cli", "train", "--model", str(checkpoint), "--data", "synthetic", "--synthetic-items", "4",
               "--output-dir", str(out), "--budget", "64", "--max-steps", "2", "--batch-size", "1", "--save-steps", "2"]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((out / "train_results.json").read_text())
    assert summary["world_size"] == 2 and summary["global_step"] == 2
    assert len(summary["replica_digests"]) == 2 and summary["replicas_identical"]
    LlavaForConditionalGeneration.from_pretrained(out)


# ----------------------------------------------------------------------------- bad input, before training

def config_for(tmp_path, checkpoint, data, **options) -> TrainConfig:
    return TrainConfig(model=str(checkpoint), data=str(data), image_folder=str(tmp_path / "images"),
                       output_dir=str(tmp_path / "out"), budget=options.pop("budget", 64), max_steps=1, **options)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"image": "missing.png"}, r"item 0 \(id 0\): image file .*missing.png not found"),
        ({"conversations": [{"from": "human", "value": "no image here"}, {"from": "gpt", "value": "ok"}]},
         r"item 0 \(id 0\): the conversation has no <image> tag"),
        ({"conversations": [{"from": "human", "value": "<image>\nhi"}]}, "no gpt turn"),
    ],
)
def test_bad_items_are_named_before_training(tmp_path, checkpoint, change, message):
    data = write_llava_json(tmp_path, n=2, **change)
    with pytest.raises(DataError, match=message):
        train(config_for(tmp_path, checkpoint, data))
    assert not (tmp_path / "out").exists()


def test_empty_dataset_is_an_error(tmp_path, checkpoint):
    data = tmp_path / "empty.json"
    data.write_text("[]")
    with pytest.raises(DataError, match="the dataset is empty"):
        train(config_for(tmp_path, checkpoint, data))


@pytest.mark.parametrize(
    "options, message",
    [
        ({"method": "fastv", "budget": 64}, r"--method fastv --budget 64 cannot be met on this model \(4 decoder layers"),
        ({"budget": 576}, "not below this model's 576 visual tokens"),
        ({"budget": None}, "--budget is required for --method duet"),
    ],
)
def test_unreachable_budget_is_an_error_before_training(tmp_path, checkpoint, options, message):
    data = write_llava_json(tmp_path, n=1)
    with pytest.raises(ValueError, match=message):
        train(config_for(tmp_path, checkpoint, data, **options))
    assert not (tmp_path / "out").exists()


def test_cli_reports_bad_input_without_a_traceback(tmp_path, checkpoint):
    data = write_llava_json(tmp_path, n=1, image="missing.png")
    result = CliRunner().invoke(app, ["train", "--model", str(checkpoint), "--data", str(data), "--image-folder",
                                      str(tmp_path / "images"), "--output-dir", str(tmp_path / "out"), "--budget", "64"])
    text = "".join(result.output.replace("│", " ").split())  # rich wraps the message in a box
    assert result.exit_code == 2 and "missing.pngnotfound" in text and "Traceback" not in result.output


# ----------------------------------------------------------------------------- other families: Gemma 3
@pytest.fixture(scope="module")
def gemma3_checkpoint(tmp_path_factory) -> Path:
    """A tiny Gemma 3 (4 decoder layers, the last global; 16 soft tokens per 32-pixel image) with a chat
    template in Gemma's form, which has no ``{% generation %}`` spans, as Gemma's own has not."""
    from duet_vlm.tiny.checkpoints import write_gemma3

    return write_gemma3(tmp_path_factory.mktemp("tiny_gemma3"), layers=4, gemma_template=True)


def test_a_template_without_generation_spans_labels_each_answer_and_its_end_of_turn(gemma3_checkpoint):
    """Gemma's template marks no assistant tokens: each answer is what its message adds to the prompt
    that ends with the generation prompt (``answer_spans``); the image's tokens carry
    ``token_type_ids`` 1, and the EOS inserted after an answer 0."""
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(gemma3_checkpoint)
    record = synthetic_records(1, questions=2)[0]
    item = encode(processor, record)
    tokenizer = processor.tokenizer
    answers = [m["content"][0]["text"] for m in record.messages if m["role"] == "assistant"]
    end_of_turn = tokenizer("<end_of_turn>\n", add_special_tokens=False)["input_ids"]
    expected = []
    for answer in answers:
        expected += tokenizer(answer, add_special_tokens=False)["input_ids"] + end_of_turn + [tokenizer.eos_token_id]
    assert item["labels"][item["labels"] != -100].tolist() == expected
    image = item["input_ids"] == tokenizer.convert_tokens_to_ids("<image_soft_token>")
    assert int(image.sum()) == 16 and torch.equal(item["token_type_ids"].bool(), image)
    assert len(item["token_type_ids"]) == len(item["input_ids"])


def _fine_tune_and_compare(tmp_path, checkpoint, budget: int):
    """``duet-vlm train`` for two LoRA steps under DUET on four items in one batch (its mean loss over
    the answer tokens does not depend on their order). The first logged loss must equal the batch's
    loss through the untrained model under the same reducer, and the merged weights must load as a
    plain model of the same class, changed in the language model and projector and not in the
    tower. Returns ``(batch, untrained model, trained model)``."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    data = write_llava_json(tmp_path)
    out = tmp_path / "out"
    args = ["--model", str(checkpoint), "--data", str(data), "--image-folder", str(tmp_path / "images"),
            "--output-dir", str(out), "--method", "duet", "--budget", str(budget), "--train", "lora",
            "--batch-size", "4", "--logging-steps", "1", "--learning-rate", "1e-2", "--max-steps", "2", "--seed", "3"]
    result = CliRunner().invoke(app, ["train", *args])
    assert result.exit_code == 0, result.output

    processor = AutoProcessor.from_pretrained(checkpoint)
    original = AutoModelForImageTextToText.from_pretrained(checkpoint)
    records = duet_vlm.training.data.load_conversations(data, tmp_path / "images")
    batch = VisionLanguageCollator(processor.tokenizer.pad_token_id)([encode(processor, record) for record in records])
    with torch.no_grad(), make_reducer(TrainConfig.parse_args(args))(original):
        expected = original(**batch).loss.item()
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    logged = [entry["loss"] for entry in history if "loss" in entry]
    assert len(logged) == 2 and abs(logged[0] - expected) < 1e-5, (logged, expected)

    trained = AutoModelForImageTextToText.from_pretrained(out)
    assert type(trained) is type(original) and type(original).__name__ in (out / "README.md").read_text()
    state, base = trained.state_dict(), original.state_dict()
    assert state.keys() == base.keys()
    differs = {name for name in state if not torch.equal(state[name], base[name])}
    assert any("q_proj" in n and "language_model" in n for n in differs)
    assert any("multi_modal_projector" in n or "embed_vision" in n for n in differs)
    assert not any("vision_tower" in n for n in differs)
    return batch, original, trained


def test_cli_train_fine_tunes_gemma3_and_its_first_step_is_the_reduced_models_loss(tmp_path, gemma3_checkpoint):
    """``duet-vlm train`` on Gemma 3 (``AutoModelForImageTextToText``), through
    ``_fine_tune_and_compare``; the batch carries Gemma's ``token_type_ids``, without which its image
    blocks would not attend both ways (the adapter refuses the forward)."""
    batch, original, _ = _fine_tune_and_compare(tmp_path, gemma3_checkpoint, budget=10)
    assert type(original).__name__ == "Gemma3ForConditionalGeneration"
    assert torch.equal(batch["token_type_ids"].bool(), batch["input_ids"] == original.config.image_token_id)


# ----------------------------------------------------------------------------- Gemma 4 (needs torchvision)
@pytest.fixture(scope="module")
def gemma4_checkpoint(tmp_path_factory) -> Path:
    """A tiny Gemma 4 (4 decoder layers; images of up to 70 soft tokens, the ladder's lowest rung).
    Gemma 4's processor always builds its video processor, which needs torchvision: this environment
    lacks it, so these run in the vLLM environment's CI step (``DUET_REQUIRE_TORCHVISION=1``)."""
    if os.environ.get("DUET_REQUIRE_TORCHVISION") != "1":
        pytest.importorskip("torchvision", reason="Gemma 4's processor needs torchvision")
    from duet_vlm.tiny.checkpoints import write_gemma4

    return write_gemma4(tmp_path_factory.mktemp("tiny_gemma4"))


def test_cli_train_fine_tunes_gemma4_and_its_first_step_is_the_reduced_models_loss(tmp_path, gemma4_checkpoint):
    """``duet-vlm train`` on Gemma 4, through ``_fine_tune_and_compare``: the batch carries
    ``mm_token_type_ids`` and each image's patches and positions (``image_position_ids``,
    concatenated image by image)."""
    batch, original, _ = _fine_tune_and_compare(tmp_path, gemma4_checkpoint, budget=32)
    assert type(original).__name__ == "Gemma4ForConditionalGeneration"
    assert batch["image_position_ids"].shape[:2] == batch["pixel_values"].shape[:2] == (4, 630)
    assert torch.equal(batch["mm_token_type_ids"].bool(), batch["input_ids"] == original.config.image_token_id)


@pytest.mark.parametrize("fixed,ok", [(64, True), (16, True), (48, False), (65, False)])
def test_an_image_expanded_into_other_than_the_models_count_is_refused(processor, fixed, ok):
    """``check_encoding``: the first item's image tokens must be a whole number of the model's fixed
    count per image (a multiple: Gemma 3's pan-and-scan crops), and at least one image."""
    from types import SimpleNamespace

    from duet_vlm.training import ConversationDataset
    from duet_vlm.training.trainer import check_encoding

    dataset = ConversationDataset(synthetic_records(1, questions=1), processor)
    image_token = processor.tokenizer.convert_tokens_to_ids("<image>")
    count = int((dataset[0]["input_ids"] == image_token).sum())
    assert count == 576
    model = SimpleNamespace(config=SimpleNamespace(image_token_id=image_token, image_seq_length=fixed * 9))
    if ok:
        check_encoding(dataset, model)
    else:
        with pytest.raises(DataError, match=f"expands an image into 576 tokens but the model expects {fixed * 9}"):
            check_encoding(dataset, model)
    nothing = SimpleNamespace(config=SimpleNamespace(image_token_id=image_token + 1, image_seq_length=576))
    with pytest.raises(DataError, match="expands an image into 0 tokens"):  # no image token found
        check_encoding(dataset, nothing)
