"""A compiled model in every order of compile, attach, remove and switch (``duet_vlm.runtime.retrace``).

``torch.compile`` does not guard on a module's empty hook dictionaries by default, so a graph traced
before a reducer was attached used to keep running after it, unreduced and silent. Each test here
makes a sequence of calls on one compiled model (unreduced, under reducers of the vision side
(VisionZip), the language side (FastV) and both (DUET), at other budgets, attached with ``with`` or
``attach()``, removed and attached again) and compares every call with the same sequence made on
the model before it was compiled: the tokens and every step's logits of ``generate`` (with
``model.compile()`` and with ``model.forward = torch.compile(model.forward)``), every position's
logits of a forward (with ``torch.compile(model)``, whose ``generate`` calls the model inside it,
uncompiled). A per-row batch and a static cache the same way. Backend ``aot_eager`` (dynamo's
tracing and guards without inductor's CPU code generation); the first order again with inductor
under ``-m matrix``.

Recompilations are counted per call: a new reducer costs at most ``NEW_GRAPHS_BOUND`` graphs, one
already served compiles nothing however often it is attached and removed, and a second round of the
whole sequence compiles nothing at all.
"""

from __future__ import annotations

import contextlib
import functools

import pytest
import torch
import torch._dynamo as dynamo

import duet_vlm
from duet_vlm import compat
from duet_vlm.runtime.retrace import compiled_modules

from models import make_inputs, make_llava

NEW = 3
# Graphs one new reducer may cost on the 4-layer model (12 for the first reduced call measured,
# most of them transformers' own, 6 for a second budget, 0 after dynamo marks the sizes dynamic).
NEW_GRAPHS_BOUND = 16
FORMS = ("model.compile()", "torch.compile(model)", "model.forward = torch.compile(model.forward)")

# (label, method, ratio): None is the unreduced model. Vision side, language side, both, other budgets,
# removed in between, the same reducer again.
SWITCHES = [
    ("unreduced", None, None),
    ("duet", "duet", 0.25),
    ("unreduced again", None, None),
    ("duet again", "duet", 0.25),
    ("visionzip", "visionzip", 0.3),
    ("fastv", "fastv", 0.6),
    ("v2drop", "v2drop", 0.5),
    ("apet", "apet", 0.5),
    ("duet, another budget", "duet", 0.5),
    ("duet, a third budget", "duet", 0.4),
    ("unreduced at the end", None, None),
]


@pytest.fixture
def llava4():
    built = make_llava(layers=4)
    yield built
    built._compiled_call_impl = None  # undo model.compile()
    dynamo.reset()


def compile_as(model, form: str, backend: str = "aot_eager"):
    """What the user calls after compiling ``model`` in ``form``."""
    if form == "model.compile()":
        model.compile(backend=backend)
        return model
    if form == "torch.compile(model)":
        return torch.compile(model, backend=backend)
    model.forward = torch.compile(model.forward, backend=backend)
    return model


def outputs(target, inputs: dict, form: str, **generate_kwargs) -> list[torch.Tensor]:
    """The tokens and each step's logits of ``generate``, or every position's logits of a forward."""
    with torch.no_grad():
        if form == "torch.compile(model)":
            return [target(**inputs).logits]
        out = target.generate(**inputs, max_new_tokens=NEW, do_sample=False, return_dict_in_generate=True,
                              output_logits=True, **generate_kwargs)
        return [out.sequences, *out.logits]


def call(target, inputs: dict, form: str, method: str | None, ratio: float | None, **generate_kwargs):
    reducer = duet_vlm.make(method, ratio=ratio) if method else None
    with reducer(target) if reducer else contextlib.nullcontext():
        return outputs(target, inputs, form, **generate_kwargs), reducer


def assert_same(compiled: list[torch.Tensor], eager: list[torch.Tensor], label: str) -> None:
    assert len(compiled) == len(eager), label
    for step, (a, b) in enumerate(zip(compiled, eager)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0, msg=lambda m: f"{label}, output {step}: {m}")


def new_graphs(run):
    counters = dynamo.utils.counters
    counters.clear()
    result = run()
    return result, counters["stats"]["unique_graphs"]


@pytest.mark.parametrize("form", FORMS)
def test_compile_then_attach_remove_and_switch_equal_eager(llava4, form):
    """Compile, serve unreduced, then attach, remove and switch reducers on the compiled model: each
    call equals the same call made eagerly (before, the reduced calls answered unreduced: their
    logits equal the unreduced model's, and ``reducer.stats`` stayed empty)."""
    model = llava4
    inputs = make_inputs(model)
    eager = {label: call(model, inputs, form, method, ratio)[0] for label, method, ratio in SWITCHES}
    target = compile_as(model, form)
    assert compiled_modules(model) or form == "torch.compile(model)"
    graphs = {}
    for label, method, ratio in SWITCHES:
        (compiled, reducer), graphs[label] = new_graphs(lambda: call(target, inputs, form, method, ratio))
        assert_same(compiled, eager[label], label)
        if reducer is not None:
            assert reducer.stats.tokens_per_layer, f"{label}: the reducer did not run"
    assert max(graphs.values()) <= NEW_GRAPHS_BOUND, graphs
    # What a server attaching one reducer per request pays once, not per request: a reducer served
    # before compiles nothing (the first unreduced call after a reduced one may: dynamo marks the
    # sizes a reduction changed dynamic, 1 graph on transformers 5.24 and 6 on 5.19), and the whole
    # sequence again compiles nothing at all.
    assert graphs["duet again"] == graphs["unreduced at the end"] == 0, graphs
    for label, method, ratio in SWITCHES:
        (compiled, _), again = new_graphs(lambda: call(target, inputs, form, method, ratio))
        assert_same(compiled, eager[label], f"{label}, second round")
        assert again == 0, f"{label}, second round: {again} new graphs"


@pytest.mark.parametrize("form", ["model.compile()", "model.forward = torch.compile(model.forward)"])
def test_attach_then_compile_then_remove_and_attach_another_equal_eager(llava4, form):
    """A reducer attached for the model's life (``attach()``) before compiling, then removed, an
    unreduced call, and another reducer attached: each call equals the same call made eagerly."""
    model = llava4
    inputs = make_inputs(model, seed=2)

    def sequence(target):
        handle = duet_vlm.make("duet", ratio=0.25).attach(target)
        results = [outputs(target, inputs, form)]
        handle.remove()
        results.append(outputs(target, inputs, form))
        handle = duet_vlm.make("fastv", ratio=0.6).attach(target)
        results.append(outputs(target, inputs, form))
        handle.remove()
        return results

    eager = sequence(model)
    compiled = sequence(compile_as(model, form))
    for label, a, b in zip(("duet attached first", "removed", "fastv attached"), compiled, eager):
        assert_same(a, b, label)


def test_per_row_budgets_on_a_compiled_model_equal_eager(llava4):
    """Per-row budgets of a padded batch on a model compiled and served unreduced first."""
    model = llava4
    inputs = make_inputs(model, batch=2, suffix=(12, 7))
    reducer = duet_vlm.make("duet", budget=32)

    def sequence(target):
        unreduced = outputs(target, inputs, "model.compile()")
        with reducer(target), reducer.per_row(budget=[16, 40]):
            rows = outputs(target, inputs, "model.compile()")
            kept = [item.average_tokens for item in reducer.stats.items]
        return unreduced, rows, kept

    eager = sequence(model)
    compiled = sequence(compile_as(model, "model.compile()"))
    assert_same(compiled[0], eager[0], "unreduced")
    assert_same(compiled[1], eager[1], "per-row budgets")
    assert compiled[2] == eager[2] and compiled[2][0] < compiled[2][1]


@pytest.mark.skipif(not compat.STATIC_UNDER_REDUCTION, reason="a static cache under a reduction needs 5.24")
def test_a_static_cache_on_a_compiled_model_equals_eager(llava4):
    """``cache_implementation="static"`` on a model compiled and served unreduced first, then under
    DUET and VisionZip."""
    model = llava4
    inputs = make_inputs(model, seed=4)
    steps = [(None, None), ("duet", 0.25), ("visionzip", 0.3), (None, None)]

    def sequence(target):
        return [call(target, inputs, "model.compile()", m, r, cache_implementation="static")[0] for m, r in steps]

    eager = sequence(model)
    compiled = sequence(compile_as(model, "model.compile()"))
    for (method, _), a, b in zip(steps, compiled, eager):
        assert_same(a, b, f"static cache, {method or 'unreduced'}")


@pytest.mark.matrix
def test_compile_then_attach_and_switch_under_inductor_equal_eager(llava4):
    """The first order with inductor, the default backend (generated CPU code, so only the first,
    switching and returning steps: about a minute on 2 cores)."""
    model = llava4
    inputs = make_inputs(model)
    steps = [SWITCHES[0], SWITCHES[1], SWITCHES[5], SWITCHES[4], SWITCHES[8]]
    eager = [call(model, inputs, "model.compile()", m, r)[0] for _, m, r in steps]
    target = compile_as(model, "model.compile()", backend="inductor")
    for (label, method, ratio), reference in zip(steps, eager):
        compiled, _ = call(target, inputs, "model.compile()", method, ratio)
        assert_same(compiled, reference, f"inductor, {label}")


def test_a_compiled_model_whose_hooked_module_has_its_own_forward_is_refused(llava4):
    """A decoder layer with a forward of its own (as accelerate's dispatch hooks set one) cannot carry
    the mark that makes a compiled graph trace again: on a compiled model, attaching is refused by
    name and leaves no hook and no mark behind; uncompiled, it attaches as before."""
    model = llava4
    layer = model.model.language_model.layers[1]
    layer.forward = functools.partial(type(layer).forward, layer)
    reducer = duet_vlm.make("duet", ratio=0.25)
    with reducer(model):  # not compiled: nothing to refuse
        pass
    model.compile(backend="aot_eager")
    before = {name: (dict(m._forward_pre_hooks), dict(m._forward_hooks), m.__dict__.get("forward"))
              for name, m in model.named_modules()}
    with pytest.raises(RuntimeError, match=r"compiled model \('the model'\) whose modules \['model.language_model.layers.1'\]"
                       r".*skip_nnmodule_hook_guards = False"):
        reducer.attach(model)
    after = {name: (dict(m._forward_pre_hooks), dict(m._forward_hooks), m.__dict__.get("forward"))
             for name, m in model.named_modules()}
    assert after == before


def test_remove_deletes_its_marks_and_only_its_own(llava4):
    """While attached, each hooked module holds its class's forward bound to itself; ``remove()``
    deletes those, and leaves a forward a user set over one of them in the meantime."""
    model = llava4
    handle = duet_vlm.make("fastv", ratio=0.6).attach(model)
    marked = [m for m in model.modules() if "forward" in m.__dict__]
    assert model.model.language_model.layers[0] in marked and model.lm_head in marked
    for module in marked:
        assert module.forward.__func__ is type(module).forward and module.forward.__self__ is module
    mine = torch.compile(model.lm_head.forward, backend="aot_eager")
    model.lm_head.forward = mine
    handle.remove()
    assert [m for m in model.modules() if "forward" in m.__dict__] == [model.lm_head]
    assert model.lm_head.forward is mine
