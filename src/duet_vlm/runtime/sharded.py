"""Full parameters for a stage that reads a layer outside that layer's own forward, under FSDP2.

A stage scores with a layer's weights when the layer is not running: FastV and SparseVLM with the
decoder layer *before* the boundary (which ran already), DART with its keys, PIO by running a layer
on a probe copy, every vision stage with the tower's feature layer after the tower returned. Under
FSDP2 (``torch.distributed.fsdp.fully_shard``, what the Trainer's FSDP and accelerate apply) such a
layer holds only its shard of each parameter outside its forward (``reshard_after_forward``): reading
it gives torch's "mixed torch.Tensor and DTensor" error. ``full_parameters(*modules)`` all-gathers
the parameters of every sharded FSDP module among ``modules`` and their submodules for the block
(``FSDPModule.unshard``) and frees them again after it (``reshard``); a module whose parameters are
unsharded already (in its own forward, or ``reshard_after_forward=False``) is left as it is. Without
FSDP it does nothing. The runtime wraps the one place each kind of read goes through (``LayerView``'s
callbacks, ``vision_signals``), so methods know nothing of sharding.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

from torch import nn


def _sharded_owners(modules) -> list[nn.Module]:
    try:
        from torch.distributed.fsdp import FSDPModule
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch without distributed
        return []
    owners: list[nn.Module] = []
    for module in modules:
        if module is None:
            continue
        for candidate in module.modules():
            if isinstance(candidate, FSDPModule) and candidate not in owners and any(
                isinstance(p, DTensor) for p in candidate.parameters()
            ):
                owners.append(candidate)
    return owners


@contextmanager
def full_parameters(*modules: nn.Module | None) -> Iterator[None]:
    """Within the block, every FSDP2-sharded module among ``modules`` (and their submodules) holds
    its full parameters; they are sharded again after it."""
    owners = _sharded_owners(modules)
    for owner in owners:
        owner.unshard()
    try:
        yield
    finally:
        for owner in owners:
            owner.reshard()


def with_full_parameters(fn, *fixed: nn.Module | None):
    """``fn`` whose first argument (a module) and ``fixed`` modules hold their full parameters while it runs."""

    def call(module, *args, **kwargs):
        with full_parameters(module, *fixed):
            return fn(module, *args, **kwargs)

    return call
