"""Full parameters for a stage that reads a layer after that layer's own forward, under FSDP2.

A stage scores with a layer's weights when the layer is not running: FastV, SparseVLM and HoliTom
with the decoder layer *before* the boundary (which ran already), DART with its keys, PIO by running
that layer on a probe copy, every vision stage with the tower's feature layer after the tower
returned. Under FSDP2 (``torch.distributed.fsdp.fully_shard``, what the Trainer's FSDP and
accelerate apply) a layer holds only its shard of each parameter outside its forward
(``reshard_after_forward``), and reading it gave torch's "mixed torch.Tensor and DTensor" error.

Gathering the parameters again for the read (``FSDPModule.unshard``) would be a collective that
ranks with other prompts (fewer items, no boundary there) would not join. Instead the runtime asks
FSDP not to free the parameters of exactly the layers this prompt will read after their forward:
``KeptUnsharded.keep`` before the layer runs (on every rank FSDP all-gathers every layer in its own
forward, as always), ``release`` once the read is done, which frees them (``reshard``: local, no
communication) and restores the layer's setting. The layer *after* a boundary is read in its own
pre-forward, where FSDP (whose hook runs first) has gathered it. Without FSDP all of this does
nothing. ``check_full`` turns a read of still-sharded parameters (a path that kept nothing) into an
error that says what to do.

Under DeepSpeed ZeRO-3 a stage's read goes through the layer's modules, whose DeepSpeed hooks
gather the partitioned weights: an all-gather every rank must make alike, so ranks whose stage calls
differ can hang. ``same_stage_calls`` compares the ranks' stage-call layouts with one small
all-gather at the language model's entry, before any stage reads, and stops every rank with one
message naming the cause and the fix where they differ.
"""

from __future__ import annotations

import hashlib

import torch
from torch import nn


def _fsdp_modules(modules) -> list[nn.Module]:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - torch without distributed
        return []
    found: list[nn.Module] = []
    for module in modules:
        if module is None:
            continue
        for candidate in module.modules():
            if isinstance(candidate, FSDPModule) and candidate not in found:
                found.append(candidate)
    return found


def _reshards_after_forward(module) -> bool:
    """Whether FSDP frees ``module``'s parameters after its forward (the default, ``True``). An integer
    ``reshard_after_forward`` (a smaller mesh) or an unknown state counts as not: left alone."""
    group = getattr(module._get_fsdp_state(), "_fsdp_param_group", None)
    return group is not None and group.post_forward_mesh_info is group.mesh_info


class KeptUnsharded:
    """The FSDP2 modules a prompt reads after their forward, kept unsharded until it has."""

    def __init__(self) -> None:
        self.modules: list[nn.Module] = []

    def keep(self, *modules: nn.Module | None) -> None:
        """FSDP keeps the full parameters of ``modules`` (and their FSDP submodules) after their next
        forward, until ``release``."""
        for module in _fsdp_modules(modules):
            if module not in self.modules and _reshards_after_forward(module):
                module.set_reshard_after_forward(False, recurse=False)
                self.modules.append(module)

    def release(self) -> None:
        """Free what ``keep`` kept (a local ``reshard``) and restore FSDP's setting."""
        modules, self.modules = self.modules, []
        for module in modules:
            module.set_reshard_after_forward(True, recurse=False)
            module.reshard()


def check_full(*modules: nn.Module | None) -> None:
    """Refuse to read parameters that FSDP2 holds sharded (a ``DTensor``): a clear error instead of
    torch's "mixed torch.Tensor and DTensor"."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch without distributed
        return
    for module in modules:
        if module is not None and any(isinstance(p, DTensor) for p in module.parameters()):
            raise RuntimeError(
                f"duet-vlm would read the parameters of {type(module).__name__} while FSDP2 holds them sharded; "
                "this path (e.g. gradient checkpointing recomputing a pruning boundary in the backward pass) is "
                "not supported under FSDP2: shard that layer with reshard_after_forward=False, or train without "
                "gradient checkpointing"
            )


def reading_full(fn):
    """``fn`` whose first argument (a layer) is checked to hold its full parameters (``check_full``)."""

    def call(module, *args, **kwargs):
        check_full(module)
        return fn(module, *args, **kwargs)

    return call


# ----------------------------------------------------------------------------- DeepSpeed ZeRO-3
def stage_call_layout(rows: list[list[tuple]]) -> tuple:
    """What decides a forward's stage calls, from each row's items in order (``rows``: per row, one
    ``(tower, geometry, budget)`` per item, which fixes its plan): the vision stages' buckets (one
    per distinct item kind, in order) and the language stages' calls (one call per kind over the
    whole batch when every row holds the same items, else one per kind and row:
    ``boundary.stage_calls``). Two ranks with equal layouts make the same stage calls; the items'
    count within a call does not change which modules a stage calls.

    >>> one, two = ("image", "g", None), ("image", "h", None)
    >>> stage_call_layout([[one]]) == stage_call_layout([[one, one], [one, one]])
    True
    >>> stage_call_layout([[one], [one]]) == stage_call_layout([[one], [one, one]])   # row by row
    False
    >>> stage_call_layout([[one]]) == stage_call_layout([[one, two]])
    False
    """
    buckets = tuple(dict.fromkeys(kind for row in rows for kind in row))
    if all(row == rows[0] for row in rows):
        calls = ("batch", tuple(dict.fromkeys(rows[0])) if rows else ())
    else:
        calls = ("rows", tuple(tuple(dict.fromkeys(row)) for row in rows if row))
    return buckets, calls


def zero3_group(adapter):
    """The process group ZeRO-3 partitions the decoder's weights over (``None``: not ZeRO-3)."""
    for parameter in adapter.layers[0].parameters():
        return getattr(parameter, "ds_process_group", None) if hasattr(parameter, "ds_status") else None
    return None


def same_stage_calls(adapter, batch: int, items, budgets) -> None:
    """Under ZeRO-3, check that every rank makes the same stage calls in this forward (one all-gather
    of each rank's ``stage_call_layout`` digest), else stop every rank with the same message. Every
    rank calls it at the same point of every prefill (``items``: this rank's visual items, ``budgets``:
    each item's budget). Without ZeRO-3 it does nothing."""
    group = zero3_group(adapter)
    if group is None:
        return
    import torch.distributed as dist
    from deepspeed.accelerator import get_accelerator

    rows: list[list[tuple]] = [[] for _ in range(batch)]
    for item, budget in zip(items, budgets):
        rows[item.row].append((item.tower, repr(item.geometry), repr(budget)))
    digest = hashlib.blake2b(repr(stage_call_layout(rows)).encode(), digest_size=8).digest()
    mine = torch.tensor([int.from_bytes(digest, "little", signed=True), len(items), batch], dtype=torch.long,
                        device=get_accelerator().current_device_name())
    every = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(every, mine, group=group)
    if len({int(theirs[0]) for theirs in every}) > 1:  # the counts only describe each rank
        ranks = "; ".join(f"rank {r}: {int(t[1])} items in {int(t[2])} rows" for r, t in enumerate(every))
        raise RuntimeError(
            "duet-vlm: under DeepSpeed ZeRO-3 the ranks' batches would make different stage calls in this "
            f"forward ({ranks}; their items differ in number per row, size or budget). A stage reads layers "
            "outside their forward, and ZeRO-3 gathers their weights with an all-gather every rank must make "
            "alike, so the run could hang. Give every rank batches of the same layout (the same images per "
            "row, of one size and budget: one fixed-size image per sample, as LLaVA-1.5), or train with "
            "ZeRO-2 or FSDP2, which add no collective for a stage's read."
        )
