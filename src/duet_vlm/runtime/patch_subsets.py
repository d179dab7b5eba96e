"""Patches left out of the vision encoder: a method's ``InputStage`` at each tower's entry.

On a family whose tower takes a subset of its patches (``ModelAdapter.takes_patch_subsets``), the
tower's entry gets two more hooks: before the call, the adapter hands the tower only the patches
the stage lets in and the captures note which tokens entered (``TowerCaptures.note_entered``);
after it, the adapter puts the tower's outputs (and, where it reads them one row per unit, the
call's captures) back at their tokens' places. Modules inside the tower the adapter names get a
forward hook for the call too (``subset_inner_hooks``: CLIP's embeddings leave the other rows out),
and a module the model runs on the tower's whole output right after it (``subset_after_tower``:
LLaVA's projector) runs on the entered rows only, its output put back in place. Elsewhere a method
with an input stage is refused at attach, with the family's reason.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from ..adapters import ModelAdapter
from ..plan import InputStage
from .protocol import RuntimeReducer


def input_stage_of(reducer: RuntimeReducer, adapter: ModelAdapter) -> InputStage | None:
    """The reducer's input stage (``None``: every patch enters), refused where the tower cannot
    encode a subset of its patches."""
    stage = reducer.input_stage()
    if stage is not None and not adapter.takes_patch_subsets:
        raise ValueError(f"{reducer.method_name}: {adapter.no_patch_subsets()}")
    return stage


def patch_subset_hooks(adapter: ModelAdapter, captures: Callable, tower: str, module: nn.Module,
                       stage: InputStage) -> list:
    """Register the two hooks on ``module`` (the tower's entry; the pre-hook after the entry's own,
    so the capture keeps the whole call's arguments; the forward hook before the one that closes
    the call) and return their handles. ``captures()``: the calling thread's ``TowerCaptures``."""

    @torch.compiler.disable  # chooses patches (data-dependent shapes)
    def enter(module, args, kwargs):
        args, kwargs, entered = adapter.enter_patch_subset(stage, args, kwargs)
        captures().note_entered(tower, entered)
        return args, kwargs

    after_tower = adapter.subset_after_tower(tower)

    def expand(module, args, output):
        entered = captures().entered(tower, done=True)
        adapter.expand_tower_output(output, entered)
        for capture in captures().open.get(tower, ()):  # this call's captures (the entry's last hook closes them)
            adapter.expand_capture(capture, entered)
        if after_tower:  # for the module the model runs next (LLaVA's projector)
            captures().after_tower[tower] = (entered, False)

    def inner(reshape):
        def hook(module, args, output):
            entered = captures().entered(tower, running=True)
            return output if entered is None else reshape(output, entered)  # None: called outside a tower call
        return hook

    def compact_input(compact):
        def hook(module, args):
            entered, running = captures().after_tower.pop(tower, (None, False))
            rows = None if entered is None or running else compact(args[0], entered)
            if rows is None:  # not the tower's whole output (another call of the module): as it is
                return None
            captures().after_tower[tower] = (entered, True)
            return (rows, *args[1:])
        return hook

    def expand_output(put_back):
        def hook(module, args, output):
            entered, running = captures().after_tower.get(tower, (None, False))
            if not running:
                return None
            del captures().after_tower[tower]
            return put_back(output, entered)
        return hook

    handles = [module.register_forward_pre_hook(enter, with_kwargs=True), module.register_forward_hook(expand)]
    for inside, reshape in adapter.subset_inner_hooks(tower).items():
        handles.append(inside.register_forward_hook(inner(reshape)))
    for after, (compact, put_back) in after_tower.items():
        handles += [after.register_forward_pre_hook(compact_input(compact)), after.register_forward_hook(expand_output(put_back))]
    return handles
