"""Training under DeepSpeed ZeRO-2 and ZeRO-3 equals one process, for every method.

Two gloo processes on CPU (DeepSpeed's CPU accelerator) each take one row of a two-row batch of the
tiny LLaVA-1.5 model, wrapped by ``deepspeed.initialize`` with ZeRO stage 2 or 3, the reducer
attached to the engine. ZeRO-3 is configured to free every layer's parameters as soon as it can
(no persistent parameters, no live-parameter cache, no prefetch), so that a stage reading a layer
after its forward meets partitioned weights unless the runtime kept them. A training forward and
backward under each registered method: each rank's loss and every parameter's gradient (the full,
averaged gradient DeepSpeed reduced: ``safe_get_full_grad``) equal one process running both rows
alone and averaging their losses. Skipped where DeepSpeed is not installed (``pip install -c
constraints/torch-cpu.txt -e ".[deepspeed]"``); CI installs it and runs this suite with
``DUET_REQUIRE_DEEPSPEED=1``, under which it must not skip.

Through the Trainer (``duet-vlm train --deepspeed`` with the shipped ``configs/deepspeed/zero{2,3}.json``),
two processes of one row each train as one process on the same two-row batches: every step's loss
and every saved weight (``test_the_trainers_deepspeed_path_equals_one_process``).

Under ZeRO-3 a stage's read of a layer outside its forward goes through the layer's modules, whose
DeepSpeed hooks gather the partitioned weights: an all-gather that every rank must make alike. Ranks
whose batches make the same stage calls with different image counts (one row of one image against
one row of two) train as one process; ranks whose stage calls differ (two rows of one image against
rows of one and two images, which the language stages rank row by row) stop, every rank with the
same message, instead of hanging (``test_zero3_ranks_of_other_layouts_train_or_stop``, under a
timeout).
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest
import torch

import duet_vlm

from checks import answer_labels, assert_step_equals_one_process, free_port, run_two_ranks, two_rank_model, two_rank_rows
from models import BUDGETED, left_pad, make_inputs

if os.environ.get("DUET_REQUIRE_DEEPSPEED") != "1":  # CI sets it: there the suite must run
    pytest.importorskip("deepspeed")

NAMES = BUDGETED  # pixelprune takes no budget: tests/test_pixelprune.py
STAGES = (2, 3)
RATIO = 0.5


def _config(stage: int) -> dict:
    zero = {"stage": stage}
    if stage == 3:  # free every layer's parameters as soon as DeepSpeed may
        zero.update(stage3_param_persistence_threshold=0, stage3_max_live_parameters=0, stage3_max_reuse_distance=0,
                    stage3_prefetch_bucket_size=0)
    return {"train_micro_batch_size_per_gpu": 1, "zero_optimization": zero, "zero_allow_untested_optimizer": True,
            "optimizer": {"type": "SGD", "params": {"lr": 0.0}}}


def _worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    import deepspeed
    from deepspeed.utils import safe_get_full_grad

    deepspeed.init_distributed(dist_backend="gloo")
    torch.set_num_threads(1)
    results = {}
    for stage in STAGES:
        for name in NAMES:
            model = two_rank_model()
            inputs = two_rank_rows(model)[rank]
            engine, *_ = deepspeed.initialize(model=model, config=_config(stage), model_parameters=model.parameters())
            handle = duet_vlm.make(name, ratio=RATIO).attach(engine)
            try:
                loss = engine(**inputs, labels=answer_labels(inputs)).loss
                engine.backward(loss)
            finally:
                handle.remove()
            grads = {}
            for n, p in engine.module.named_parameters():
                grad = safe_get_full_grad(p)
                if grad is not None:
                    grads[n] = grad.clone()
            results[(stage, name)] = (loss.detach(), grads)
            engine.destroy()
    torch.save(results, Path(out) / f"rank{rank}.pt")


@pytest.fixture(scope="module")
def zero_runs(tmp_path_factory):
    return run_two_ranks(_worker, tmp_path_factory.mktemp("zero"))


@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize("name", NAMES)
def test_zero_training_step_equals_one_process(zero_runs, stage, name):
    assert_step_equals_one_process(name, RATIO, [results[(stage, name)] for results in zero_runs], zero_filled=True)


# ----------------------------------------------------------------------------- through the Trainer
CONFIGS = Path(__file__).parents[1] / "configs" / "deepspeed"
TRAIN = ["--data", "synthetic", "--synthetic-items", "4", "--method", "duet", "--budget", "64", "--max-steps", "2",
         "--save-steps", "2", "--logging-steps", "1", "--learning-rate", "0.01"]


@pytest.fixture(scope="module")
def trainer_runs(tmp_path_factory):
    """``duet-vlm train`` on the tiny demo-shaped LLaVA-1.5: one process on batches of two rows, and
    two processes of one row each under ``--deepspeed configs/deepspeed/zero{2,3}.json`` (the shipped
    configs: the official recipe's settings). Returns each run's output folder."""
    import subprocess

    from duet_vlm.demo.processor import build_processor
    from models import make_demo_llava

    root = tmp_path_factory.mktemp("trainer")
    processor = build_processor()
    make_demo_llava(processor).save_pretrained(root / "model")
    processor.save_pretrained(root / "model")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    runs = {}
    for name, launcher, extra in [
        ("one", [sys.executable, "-m", "duet_vlm.cli"], ["--batch-size", "2"]),
        *[(f"zero{stage}", [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                            "--main_process_port", str(free_port()), "-m", "duet_vlm.cli"],
           ["--batch-size", "1", "--deepspeed", str(CONFIGS / f"zero{stage}.json")]) for stage in STAGES],
    ]:
        out = root / name
        done = subprocess.run([*launcher, "train", "--model", str(root / "model"), "--output-dir", str(out), *TRAIN, *extra],
                              env=env, capture_output=True, text=True, timeout=400)
        assert done.returncode == 0, done.stderr[-3000:]
        runs[name] = out
    return root / "model", runs


@pytest.mark.parametrize("stage", STAGES)
def test_the_trainers_deepspeed_path_equals_one_process(trainer_runs, stage):
    """Two optimizer steps through the Trainer's ``deepspeed=`` (two processes, one row each) against
    one process on the same two-row batches: every step's logged loss, and every saved weight (under
    ZeRO-3 the weights are partitioned across the ranks; ``duet-vlm train`` gathers them for the
    digest and the save, else the saved tensors would be a rank's empty partitions). The projector,
    the default trained part, moved."""
    import json

    from safetensors.torch import load_file

    start, runs = trainer_runs
    one, zero = runs["one"], runs[f"zero{stage}"]

    def losses(folder):
        return [entry["loss"] for entry in json.loads((folder / "trainer_state.json").read_text())["log_history"] if "loss" in entry]

    assert len(losses(zero)) == 2
    torch.testing.assert_close(torch.tensor(losses(zero)), torch.tensor(losses(one)), rtol=1e-6, atol=1e-6)
    summary = json.loads((zero / "train_results.json").read_text())
    assert summary["world_size"] == 2 and summary["replicas_identical"]
    initial, expected, saved = (load_file(folder / "model.safetensors") for folder in (start, one, zero))
    assert saved.keys() == expected.keys()
    moved = [name for name in expected if not torch.equal(expected[name], initial[name])]
    assert moved and all(name.startswith("multi_modal_projector") for name in moved)
    for name, weight in expected.items():
        torch.testing.assert_close(saved[name], weight, rtol=1e-5, atol=1e-6, msg=lambda m, name=name: f"{name}: {m}")


# ----------------------------------------------------------------------------- ranks of other layouts
LAYOUT_NAMES = ("duet", "pio")  # DUET's vision and language stages; PIO runs layers and the head itself
SAME_CALLS = ([1], [2])  # images per row, per rank: one call per stage on each rank
OTHER_CALLS = ([1, 1], [1, 2])  # rank 1's rows differ: its language stages rank them row by row
OTHER_NAME = "pio"  # whose calls row by row run the layer and the head again: other gathers
TIMEOUT = 300  # seconds for both runs; a hang fails the test instead of CI


def _batch(model, images: list[int], seed: int) -> dict:
    """One left-padded batch whose row ``b`` holds ``images[b]`` images of the model's size."""
    ids, pixels = [], []
    for b, count in enumerate(images):
        one = make_inputs(model, images_per_row=count, suffix=4 + 3 * b, seed=seed + b)
        ids.append(one["input_ids"][0].tolist())
        pixels.append(one["pixel_values"])
    return {**left_pad(ids), "pixel_values": torch.cat(pixels)}


def _zero3_step(name: str, inputs: dict):
    """A ZeRO-3 training step of the two-rank model under ``name``: the loss and every full gradient."""
    import deepspeed
    from deepspeed.utils import safe_get_full_grad

    model = two_rank_model()
    engine, *_ = deepspeed.initialize(model=model, config=_config(3), model_parameters=model.parameters())
    handle = duet_vlm.make(name, ratio=RATIO).attach(engine)
    try:
        loss = engine(**inputs, labels=answer_labels(inputs)).loss
        engine.backward(loss)
        grads = {n: safe_get_full_grad(p) for n, p in engine.module.named_parameters()}
        return loss.detach(), {n: grad.clone() for n, grad in grads.items() if grad is not None}
    finally:
        handle.remove()
        engine.destroy()


def _layout_worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    import deepspeed
    import torch.distributed as dist

    deepspeed.init_distributed(dist_backend="gloo")
    torch.set_num_threads(1)
    model = two_rank_model()
    results = {name: _zero3_step(name, _batch(model, SAME_CALLS[rank], seed=10 * rank)) for name in LAYOUT_NAMES}
    torch.save(results, Path(out) / f"rank{rank}.pt")
    try:
        _zero3_step(OTHER_NAME, _batch(model, OTHER_CALLS[rank], seed=10 * rank))
        message = "no error"
    except RuntimeError as error:
        message = str(error)
    (Path(out) / f"stopped{rank}.txt").write_text(message)
    dist.barrier()  # both ranks got here: neither waits in a collective the other left


def _run_within(worker, out: Path, seconds: float) -> None:
    """``worker(rank, 2, port, out)`` in two spawned processes, killed (and the test failed) if they
    have not finished within ``seconds``: a hang fails instead of stalling the suite."""
    import torch.multiprocessing as mp

    sys.path.insert(0, str(Path(__file__).parent))
    context = mp.start_processes(worker, args=(2, free_port(), str(out)), nprocs=2, join=False, start_method="spawn")
    deadline = time.monotonic() + seconds
    while not context.join(timeout=5):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"the two ZeRO-3 ranks did not finish within {seconds} s (a hang)")


def test_zero3_ranks_of_other_layouts_train_or_stop(tmp_path):
    """Ranks with different image counts. One row of one image against one row of two (the same
    stage calls: each stage ranks its row's items in one call): each rank's loss and every full
    gradient equal one process on both rows (1e-6). Two rows of one image against rows of one and
    two images under PIO (rank 1's language stages rank its rows one by one, and PIO runs the layer
    and the head in each call, so rank 1 gathers their weights twice): every rank stops with the
    same message naming the cause and the fix, and nothing hangs (without the check the ranks'
    gathers mismatch)."""
    _run_within(_layout_worker, tmp_path, TIMEOUT)
    model = two_rank_model()
    for name in LAYOUT_NAMES:
        rows = [_batch(model, SAME_CALLS[rank], seed=10 * rank) for rank in range(2)]
        with duet_vlm.make(name, ratio=RATIO)(model):
            losses = [model(**inputs, labels=answer_labels(inputs)).loss for inputs in rows]
            (sum(losses) / 2).backward()
        grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
        model.zero_grad()
        for rank in range(2):
            loss, reduced = torch.load(tmp_path / f"rank{rank}.pt")[name]
            torch.testing.assert_close(loss, losses[rank].detach(), atol=1e-6, rtol=1e-6)
            assert grads.keys() <= reduced.keys() and not any(reduced[n].any() for n in reduced.keys() - grads.keys())
            for parameter, grad in grads.items():
                torch.testing.assert_close(reduced[parameter], grad, atol=1e-6, rtol=1e-5,
                                           msg=lambda m, parameter=parameter: f"{name} {parameter}: {m}")
    messages = [(tmp_path / f"stopped{rank}.txt").read_text() for rank in range(2)]
    assert messages[0] == messages[1], messages
    assert "ZeRO-3" in messages[0] and "different stage calls" in messages[0], messages[0]
    assert "rank 0: 2 items in 2 rows; rank 1: 3 items in 2 rows" in messages[0], messages[0]
    assert "ZeRO-2 or FSDP2" in messages[0] and "the same layout" in messages[0], messages[0]
