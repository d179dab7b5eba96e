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

Under ZeRO-3 a stage's read of a layer outside its forward goes through the layer's modules, whose
DeepSpeed hooks gather the partitioned weights: an all-gather that every rank must make alike. The
ranks here make the same stage calls (one image per row, as the official LLaVA-1.5 recipe); with
items of different sizes or text-only rows on some ranks they would not (docs/training.md).
"""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

import pytest
import torch

import duet_vlm

from models import make_inputs, make_llava, row

if os.environ.get("DUET_REQUIRE_DEEPSPEED") != "1":  # CI sets it: there the suite must run
    pytest.importorskip("deepspeed")

NAMES = sorted(duet_vlm.METHODS)
STAGES = (2, 3)
RATIO = 0.5


def _model():
    torch.manual_seed(0)
    return make_llava(layers=4, image_size=112, vision_layers=3).train()


def _rows(model):
    inputs = make_inputs(model, batch=2, suffix=(9, 4), seed=2)
    return [row(inputs, b) for b in range(2)]


def _labels(inputs):
    labels = inputs["input_ids"].clone()
    labels[labels == 999] = -100  # the image placeholders
    return labels


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
            model = _model()
            inputs = _rows(model)[rank]
            engine, *_ = deepspeed.initialize(model=model, config=_config(stage), model_parameters=model.parameters())
            handle = duet_vlm.make(name, ratio=RATIO).attach(engine)
            try:
                loss = engine(**inputs, labels=_labels(inputs)).loss
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


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def zero_runs(tmp_path_factory):
    import torch.multiprocessing as mp

    out = tmp_path_factory.mktemp("zero")
    sys.path.insert(0, str(Path(__file__).parent))  # the spawned workers import this module
    mp.spawn(_worker, args=(2, _free_port(), str(out)), nprocs=2, join=True)
    return [torch.load(out / f"rank{rank}.pt") for rank in range(2)]


@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize("name", NAMES)
def test_zero_training_step_equals_one_process(zero_runs, stage, name):
    model = _model()
    losses = []
    with duet_vlm.make(name, ratio=RATIO)(model):
        for inputs in _rows(model):
            losses.append(model(**inputs, labels=_labels(inputs)).loss)
        (sum(losses) / len(losses)).backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    for rank, results in enumerate(zero_runs):
        loss, reduced = results[(stage, name)]
        torch.testing.assert_close(loss, losses[rank].detach(), atol=1e-6, rtol=1e-6)
        # DeepSpeed keeps a gradient buffer for every trainable parameter: zeros where none flows
        # (the tower's last layer, past its feature layer)
        assert grads.keys() <= reduced.keys()
        assert all(not reduced[n].any() for n in reduced.keys() - grads.keys())
        for parameter, grad in grads.items():
            torch.testing.assert_close(reduced[parameter], grad, atol=1e-6, rtol=1e-5,
                                       msg=lambda m: f"{parameter}: {m}")
