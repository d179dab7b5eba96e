"""A compiled model traces again when a reducer's hooks come or go.

``torch.compile`` does not guard on a module's hook dictionaries while they are empty
(``torch._dynamo.config.skip_nnmodule_hook_guards``, true by default): a graph traced before a
reducer was attached, or after it was removed, keeps running once hooks are installed, without
them, and answers unreduced without a word. What Dynamo does guard, in every frame that calls a
module, is that the module's instance dictionary holds no ``forward`` of its own (the class's
forward is what it traced). So while a reducer is attached, each module it hooks holds its own
class's forward, bound to itself, as an instance attribute: the same function on the same module,
so nothing runs differently, and every graph traced without it fails that guard and is traced
again, with the hooks. ``remove()`` deletes exactly what it set, so the graphs traced without a
reducer match again. A graph traced with the hooks is guarded on them as on any non-empty hook
dictionary (their count and code), so switching reducers traces again where the hooks differ.

A module that already has a forward of its own (accelerate's dispatch hooks, a user's
``module.forward = torch.compile(module.forward)``) cannot carry the mark: on a model that is
visibly compiled, attaching to such a module is refused by name (``unmarked_refusal``). On the
module whose forward was compiled that way the hooks run outside the compiled frame, eagerly, so
that module needs no mark.
"""

from __future__ import annotations

import types

from torch import nn


def _compiled_function(value) -> bool:
    return callable(value) and hasattr(value, "_torchdynamo_orig_callable")


def compiled_modules(model: nn.Module) -> list[str]:
    """Names of ``model``'s modules that ``torch.compile`` visibly wraps: ``module.compile()``, or
    a ``forward`` replaced by ``torch.compile(module.forward)`` (``""`` is the model itself). A
    ``torch.compile(model)`` wrapper is not visible from the model inside it."""
    return [
        name
        for name, module in model.named_modules()
        if getattr(module, "_compiled_call_impl", None) is not None or _compiled_function(module.__dict__.get("forward"))
    ]


class ForwardMarks:
    """The modules a reducer hooks, each holding its class's forward while the reducer is attached.

    >>> marks = ForwardMarks(model, handles)     # doctest: +SKIP
    >>> marks.remove()                           # doctest: +SKIP
    """

    def __init__(self, model: nn.Module, handles: list):
        hooked = [d for d in (handle.hooks_dict_ref() for handle in handles) if d is not None]
        self._marked: list[tuple[nn.Module, types.MethodType]] = []
        self.unmarked: list[str] = []
        for name, module in model.named_modules():
            if not any(d is module._forward_pre_hooks or d is module._forward_hooks for d in hooked):
                continue
            own = module.__dict__.get("forward")
            if own is None:
                mark = types.MethodType(type(module).forward, module)
                module.forward = mark
                self._marked.append((module, mark))
            elif not _compiled_function(own):
                self.unmarked.append(name)

    def remove(self) -> None:
        for module, mark in self._marked:
            if module.__dict__.get("forward") is mark:  # not what a user set over it since
                del module.forward
        self._marked.clear()


def unmarked_refusal(model: nn.Module, marks: ForwardMarks) -> str | None:
    """Why the reducer cannot attach exactly to a compiled ``model`` (``None`` when it can)."""
    compiled = compiled_modules(model)
    if not compiled or not marks.unmarked:
        return None
    where = ", ".join(repr(name or "the model") for name in compiled)
    return (
        f"a compiled model ({where}) whose modules {marks.unmarked[:3]} have a forward of their own (accelerate's "
        "dispatch hooks?): torch.compile does not guard on module hooks by default, so a graph compiled before the "
        "reducer was attached would run without its hooks. Attach the reducer before compiling and keep it attached, "
        "or set torch._dynamo.config.skip_nnmodule_hook_guards = False before compiling the model"
    )
