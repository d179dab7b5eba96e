"""Training under FSDP2 (``torch.distributed.fsdp.fully_shard``) equals one process, for every method.

Two gloo processes on CPU each take one row of a two-row batch of the tiny LLaVA-1.5 model, sharded
as the Trainer's FSDP would shard it (each decoder layer, each vision-encoder layer, then the root;
and the decoder layers alone), with the reducer attached after sharding. A training forward and
backward under each registered method: the loss of each rank and every parameter's gradient
(gathered from its shards, averaged over the ranks as FSDP reduces it) equal one process running
both rows alone under the same method and averaging their losses. Before the runtime gathered the
parameters of the layers a stage reads outside their forward (``runtime.sharded``), FastV failed with
"mixed torch.Tensor and DTensor" (it scores with the layer before the boundary, re-sharded after its
forward) and DUET likewise in its vision stage (the feature layer's norm and projections).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

import duet_vlm

from checks import answer_labels, assert_step_equals_one_process, free_port, run_two_ranks, two_rank_model, two_rank_rows
from models import BUDGETED

NAMES = BUDGETED  # pixelprune takes no budget: tests/test_pixelprune.py
POLICIES = ("decoder", "decoder+vision")
RATIO = 0.5


def _shard(model, policy):
    from torch.distributed.fsdp import fully_shard

    if "vision" in policy:
        tower = model.model.vision_tower
        for layer in getattr(tower, "vision_model", tower).encoder.layers:
            fully_shard(layer)
    for layer in model.model.language_model.layers:
        fully_shard(layer)
    fully_shard(model)


def _sharded_layers(model, policy):
    """Whether a parameter name belongs to a layer ``_shard`` shards on its own (not the root)."""
    layers = list(model.model.language_model.layers)
    if "vision" in policy:
        tower = model.model.vision_tower
        layers += list(getattr(tower, "vision_model", tower).encoder.layers)
    prefixes = tuple(f"{name}." for name, module in model.named_modules() if any(module is layer for layer in layers))
    assert len(prefixes) == len(layers)
    return lambda name: name.startswith(prefixes)


def _worker(rank: int, world: int, port: int, out: str) -> None:
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    results = {}
    try:
        for policy in POLICIES:
            for name in NAMES:
                model = two_rank_model()
                inputs = two_rank_rows(model)[rank]
                layered = _sharded_layers(model, policy)
                _shard(model, policy)
                handle = duet_vlm.make(name, ratio=RATIO).attach(model)
                try:
                    loss = model(**inputs, labels=answer_labels(inputs)).loss
                    # The layers kept unsharded for a stage's read are freed once it is read: after
                    # the forward every sharded layer holds its shards again (the root stays whole).
                    whole = [n for n, p in model.named_parameters() if not isinstance(p, DTensor) and layered(n)]
                    loss.backward()
                finally:
                    handle.remove()
                grads = {n: (p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad).clone()
                         for n, p in model.named_parameters() if p.grad is not None}
                results[(policy, name)] = (loss.detach(), grads, whole)
        torch.save(results, Path(out) / f"rank{rank}.pt")
        dist.barrier()  # every collective of both ranks done before the group goes
    finally:
        dist.destroy_process_group()


def _unkept_worker(rank: int, world: int, port: int, out: str) -> None:
    """A read of a sharded decoder layer through the path every stage's read takes (``reading_full``
    around ``text_to_visual_attention``), with nothing kept unsharded: refused with duet-vlm's own
    message. No forward runs, so no collective is left half done when the error is raised."""
    import torch.distributed as dist

    from duet_vlm.adapters import adapter_for
    from duet_vlm.runtime.sharded import reading_full

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        model = two_rank_model()
        _shard(model, "decoder")
        adapter = adapter_for(model)
        hidden = torch.zeros(1, 5, model.config.text_config.hidden_size)
        rope = adapter.rotary_emb(hidden, torch.arange(5)[None])
        try:
            reading_full(adapter.scheme.text_to_visual_attention)(
                adapter.layers[1], hidden, rope, [torch.tensor([4])], torch.ones(1, 5, dtype=torch.bool),
                torch.tensor([[[1, 2]]]),
            )
            message = "no error"
        except RuntimeError as error:
            message = str(error)
        (Path(out) / f"unkept{rank}.txt").write_text(message)
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def sharded_runs(tmp_path_factory):
    return run_two_ranks(_worker, tmp_path_factory.mktemp("fsdp"))


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("name", NAMES)
def test_fsdp2_training_step_equals_one_process(sharded_runs, policy, name):
    assert_step_equals_one_process(name, RATIO, [results[(policy, name)][:2] for results in sharded_runs])


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("name", NAMES)
def test_fsdp2_kept_layers_are_sharded_again_after_the_forward(sharded_runs, policy, name):
    """What the runtime kept unsharded for a stage's read (``KeptUnsharded``) is resharded once read:
    after the forward no sharded layer's parameter is whole on any rank. Losses and gradients cannot
    show it (a layer left whole computes the same); the memory FSDP2 bounds can."""
    for rank, results in enumerate(sharded_runs):
        assert results[(policy, name)][2] == [], f"rank {rank}: still whole after the forward: {results[(policy, name)][2]}"


def test_a_sharded_read_is_refused_with_what_to_do(tmp_path):
    """Where nothing kept a layer unsharded, reading it is refused with a message that names FSDP2 and
    the remedy, not torch's "mixed torch.Tensor and DTensor"."""
    import torch.multiprocessing as mp

    sys.path.insert(0, str(Path(__file__).parent))
    mp.spawn(_unkept_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):
        message = (tmp_path / f"unkept{rank}.txt").read_text()
        assert "while FSDP2 holds them sharded" in message and "reshard_after_forward=False" in message, message
