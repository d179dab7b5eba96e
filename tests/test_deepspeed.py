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
import sys
from pathlib import Path

import pytest
import torch

import duet_vlm

from checks import answer_labels, assert_step_equals_one_process, free_port, two_rank_model, two_rank_rows

if os.environ.get("DUET_REQUIRE_DEEPSPEED") != "1":  # CI sets it: there the suite must run
    pytest.importorskip("deepspeed")

NAMES = sorted(duet_vlm.METHODS)
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
    import torch.multiprocessing as mp

    out = tmp_path_factory.mktemp("zero")
    sys.path.insert(0, str(Path(__file__).parent))  # the spawned workers import this module
    mp.spawn(_worker, args=(2, free_port(), str(out)), nprocs=2, join=True)
    return [torch.load(out / f"rank{rank}.pt") for rank in range(2)]


@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize("name", NAMES)
def test_zero_training_step_equals_one_process(zero_runs, stage, name):
    assert_step_equals_one_process(name, RATIO, [results[(stage, name)] for results in zero_runs], zero_filled=True)
