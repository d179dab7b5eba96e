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
"""

from __future__ import annotations

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
