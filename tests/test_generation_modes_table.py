"""The README's generation-modes table (``duet_vlm.generation_modes``), checked cell by cell.

Every (mode, kind) cell runs here on a method of that kind, on the tiny LLaVA-1.5 model, and is
checked by values against what the table says: an ``equal`` cell's tokens and logits against the
mode's reference (each row alone, the prompt repeated, cached decoding, greedy decoding, the
unpatched model, the same tokens forced in one call, eager generation, the same calls one after
another), a ``refused`` cell's ``NotImplementedError`` and its message, a ``warns`` cell's warning.
The test reads the expected outcome from the table, so a cell changed in the table (or a behaviour
changed in the library) fails here until the two agree again.
"""

from __future__ import annotations

import doctest
import warnings

import pytest
import torch
import torch._dynamo as dynamo

import duet_vlm
import duet_vlm.generation_modes as table
from duet_vlm.generation_modes import KINDS, MODES, cell, kind_of, methods_by_kind

from checks import Force, TokenCount, lookup_prompt, plain, run_overlapping, same, second_turn, twice
from models import BUDGETED, make_inputs, make_llava, row

RATIO = 0.5  # as tests/test_serving.py: at a quarter FastV keeps no visual token after layer 2 of 8
COMPILE_RATIO = 0.6  # on the 4-layer model compiled: FastV keeps 115 after layer 2 (as tests/test_compile.py)
# The method a kind's cells run on, where it is of that kind (else the kind's first registered method).
PREFERRED = ("full", "visionzip", "cdpruner", "fastv", "duet")
# ``model``: tests/conftest.py's 8-layer tiny LLaVA-1.5 (seed 2), built once for this module.


def representative(kind: str) -> str:
    members = methods_by_kind()[kind]
    assert members, f"no registered method of kind {kind!r}: its cells cannot be checked"
    return next((name for name in PREFERRED if name in members), members[0])


@pytest.fixture(scope="module")
def draft():
    """An assistant with the main model's weights: it drafts the unreduced model's greedy tokens, so
    some drafts are accepted (all of them under ``full``) and some rejected."""
    return make_llava(layers=8, seed=2)


@pytest.fixture(scope="module")
def small():
    """A 4-layer model with a 2-layer tower for ``torch.compile`` (tracing time grows with depth).

    Dynamo's cache is kept between the kinds' cells (a cell compiles what the earlier ones left
    uncompiled, about halving the row's time), with room for their recompiles; a hit limit fails
    instead of falling back to eager frames, which would equal eager generation trivially."""
    dynamo.reset()
    limits = {"recompile_limit": 64, "fail_on_recompile_limit_hit": True}  # both exist from torch 2.6
    with dynamo.config.patch({key: value for key, value in limits.items() if hasattr(dynamo.config, key)}):
        yield make_llava(layers=4, vision_layers=2, seed=2)
    dynamo.reset()


def reducer_for(name: str, ratio: float = RATIO):
    return duet_vlm.make(name, ratio=ratio)


def generate(model, inputs, **kwargs):
    kwargs = {"max_new_tokens": 4, "do_sample": False, **kwargs}
    return model.generate(**inputs, **kwargs)


def scored(model, inputs, **kwargs):
    """``generate`` returning its sequences and each step's raw logits."""
    return generate(model, inputs, return_dict_in_generate=True, output_logits=True, **kwargs)


def assert_tokens_equal(got, want):
    assert torch.equal(got, want), f"{got.tolist()} != {want.tolist()}"


def assert_steps_close(got, want, atol=1e-5):
    assert len(got) == len(want)
    for step, (a, b) in enumerate(zip(got, want)):
        torch.testing.assert_close(a, b, atol=atol, rtol=atol, msg=lambda m: f"step {step}: {m}")


def before_any_token(call):
    """``call(streamer)``; a refusal must come before ``generate`` handed out a token."""
    streamer = TokenCount()
    try:
        return call(streamer)
    except NotImplementedError:
        assert streamer.puts == 1, "tokens were handed out before the refusal"
        raise


# ----------------------------------------------------------------------------- one runner per mode
# Each returns ``(got, want, compare)``: ``got()`` makes the mode's call under the method (it may be
# refused), ``want()`` its reference, ``compare(got, want)`` asserts that they are equal.


def run_greedy(request, name):
    model = request.getfixturevalue("model")
    batch = make_inputs(model, batch=2, suffix=(9, 4), seed=22)

    def got():
        with torch.no_grad(), reducer_for(name)(model):
            return scored(model, batch)

    def want():
        with torch.no_grad(), reducer_for(name)(model):
            return [scored(model, row(batch, b)) for b in range(2)]

    def compare(out, rows):
        width = batch["input_ids"].shape[1]
        for b, alone in enumerate(rows):
            start = alone.sequences.shape[1] - 4
            assert out.sequences[b, width:].tolist() == alone.sequences[0, start:].tolist(), f"row {b}"
            assert_steps_close([step[b : b + 1] for step in out.logits], alone.logits, atol=1e-4)

    return got, want, compare


def run_sampling(request, name):
    model = request.getfixturevalue("model")
    inputs = make_inputs(model, seed=2)
    kwargs = dict(do_sample=True, top_k=0)

    def got():
        with torch.no_grad(), reducer_for(name)(model):
            torch.manual_seed(0)
            return scored(model, inputs, num_return_sequences=2, **kwargs)

    def want():
        with torch.no_grad(), reducer_for(name)(model):
            torch.manual_seed(0)
            return scored(model, twice(inputs), **kwargs)

    def compare(several, repeated):
        assert torch.equal(several.sequences, repeated.sequences)
        assert_steps_close(several.logits, repeated.logits)

    return got, want, compare


def run_beam_search(request, name):
    model = request.getfixturevalue("model")
    inputs = make_inputs(model, seed=1)
    kwargs = dict(num_beams=2, return_dict_in_generate=True, output_scores=True)

    def got():
        with torch.no_grad(), reducer_for(name)(model):
            return generate(model, twice(inputs), **kwargs)

    def want():
        with torch.no_grad(), reducer_for(name)(model):
            return generate(model, inputs, **kwargs)

    def compare(two, one):
        for b in range(2):
            assert torch.equal(two.sequences[b], one.sequences[0]), f"row {b}"
            torch.testing.assert_close(two.sequences_scores[b], one.sequences_scores[0], atol=1e-5, rtol=1e-5)

    return got, want, compare


def run_no_cache(request, name):
    model = request.getfixturevalue("model")
    inputs = make_inputs(model, seed=21)
    # a generated placeholder would be one too many for transformers' check in the next prefill
    kwargs = dict(max_new_tokens=6, suppress_tokens=[model.config.image_token_id])

    def got():
        with torch.no_grad(), reducer_for(name)(model):
            return scored(model, inputs, use_cache=False, **kwargs)

    def want():
        with torch.no_grad(), reducer_for(name)(model):
            return scored(model, inputs, **kwargs)

    def compare(uncached, cached):
        assert torch.equal(uncached.sequences, cached.sequences)
        assert_steps_close(uncached.logits, cached.logits, atol=1e-4)

    return got, want, compare


def run_prompt_lookup(request, name):
    model = request.getfixturevalue("model")
    inputs = lookup_prompt(model)  # its last tokens repeat earlier text: drafts enter the prefill

    def got():
        with torch.no_grad(), reducer_for(name)(model):
            return before_any_token(lambda streamer: generate(
                model, inputs, max_new_tokens=8, prompt_lookup_num_tokens=3, streamer=streamer))

    def want():
        with torch.no_grad(), reducer_for(name)(model):
            return generate(model, inputs, max_new_tokens=8)

    return got, want, assert_tokens_equal


def run_assisted(request, name):
    model, draft = request.getfixturevalue("model"), request.getfixturevalue("draft")
    inputs = make_inputs(model, seed=3)

    def got():
        with torch.no_grad(), reducer_for(name)(model):
            return before_any_token(
                lambda streamer: generate(model, inputs, max_new_tokens=8, assistant_model=draft, streamer=streamer)
            )

    def want():
        with torch.no_grad(), reducer_for(name)(model):
            return generate(model, inputs, max_new_tokens=8)

    return got, want, assert_tokens_equal


def run_static_cache(request, name):
    model = request.getfixturevalue("model")
    inputs = make_inputs(model, seed=5)
    kwargs = dict(max_new_tokens=3, cache_implementation="static")

    def got():
        with torch.no_grad(), reducer_for(name)(model):
            return scored(model, inputs, **kwargs)

    def want():  # the unpatched model
        with torch.no_grad():
            return scored(model, inputs, **kwargs)

    def compare(reduced, plain_model):
        assert torch.equal(reduced.sequences, plain_model.sequences)
        assert_steps_close(reduced.logits, plain_model.logits, atol=0)

    return got, want, compare


FOLLOW_UP = [11, 12, 13]


def run_second_turn(request, name):
    """A first turn of three tokens, then a text-only turn on its cache; the reference decodes the
    same turn token by token in one call (the follow-up forced after the first three tokens)."""
    model = request.getfixturevalue("model")
    inputs = make_inputs(model, seed=4)
    width = inputs["input_ids"].shape[1]

    def got():
        with torch.no_grad(), reducer_for(name)(model):
            first = generate(model, inputs, max_new_tokens=3, return_dict_in_generate=True)
            ids = torch.cat([first.sequences, torch.tensor([FOLLOW_UP])], dim=1)
            turn = dict(input_ids=ids, attention_mask=torch.ones_like(ids), past_key_values=first.past_key_values)
            return scored(model, turn, max_new_tokens=3)

    def want():
        with torch.no_grad(), reducer_for(name)(model):
            return scored(model, inputs, max_new_tokens=9, logits_processor=[Force(width + 3, FOLLOW_UP)])

    def compare(second, forced):
        assert torch.equal(second.sequences, forced.sequences)
        assert_steps_close(second.logits, forced.logits[6:])

    return got, want, compare


def run_second_turn_image(request, name):
    model = request.getfixturevalue("model")

    def got():
        return second_turn(model, reducer_for(name))

    def want():
        return second_turn(model)  # the unpatched model

    return got, want, assert_tokens_equal


def run_compile(request, name):
    """``model.compile()`` with dynamo's ``eager`` backend (its tracing, guards and graph breaks;
    tests/test_compile.py runs ``aot_eager`` and counts the graph breaks)."""
    model = request.getfixturevalue("small")
    inputs = make_inputs(model, seed=6)
    reducer = reducer_for(name, COMPILE_RATIO)

    def got():
        model.compile(backend="eager")
        try:
            with torch.no_grad(), reducer(model):
                return scored(model, inputs, max_new_tokens=3)
        finally:
            model._compiled_call_impl = None  # undo model.compile()

    def want():
        with torch.no_grad(), reducer(model):
            return scored(model, inputs, max_new_tokens=3)

    def compare(compiled, eager):
        assert torch.equal(compiled.sequences, eager.sequences)
        assert_steps_close(compiled.logits, eager.logits)

    return got, want, compare


def run_threads(request, name):
    """Three requests (greedy, a padded batch, a forward) in three threads at once, twice in shuffled
    orders: each equals the same call made alone, with the stats its thread reads after it."""
    model = request.getfixturevalue("model")
    reducer = reducer_for(name)
    one, batch, other = (make_inputs(model, seed=11), make_inputs(model, batch=2, suffix=(9, 4), seed=12),
                         make_inputs(model, suffix=3, seed=13))

    def job(call):
        def run():
            with torch.no_grad():
                out = call()
            return out, plain(reducer.stats)

        return run

    jobs = [job(lambda: generate(model, one)), job(lambda: generate(model, batch)), job(lambda: model(**other).logits)]

    def calls(overlapping: bool):
        handle = reducer.attach(model)
        try:
            return run_overlapping(jobs, rounds=2, seed=sum(map(ord, name))) if overlapping else [j() for j in jobs]
        finally:
            handle.remove()

    def compare(rounds, alone):
        for r, results in enumerate(rounds):
            for j, (got, want) in enumerate(zip(results, alone)):
                assert not isinstance(got, str), f"round {r}, job {j}: {got}"
                assert same(got[0], want[0]) and got[1] == want[1], f"round {r}, job {j} differs from the call alone"

    return (lambda: calls(True)), (lambda: calls(False)), compare


def run_hidden_states(request, name):
    """Besides the warning and greedy decoding's tokens: the prefill's hidden states are the input
    of layer 0 and each layer's output, each at the length that layer ran at (its visual tokens and
    the text)."""
    model = request.getfixturevalue("model")
    inputs = make_inputs(model, seed=7)
    reducer = reducer_for(name)

    def got():
        with torch.no_grad(), reducer(model):
            out = generate(model, inputs, max_new_tokens=3, output_hidden_states=True, return_dict_in_generate=True)
        return out, reducer.stats

    def want():
        with torch.no_grad(), reducer_for(name)(model):
            return generate(model, inputs, max_new_tokens=3)

    def compare(out_stats, greedy):
        out, stats = out_stats
        assert torch.equal(out.sequences, greedy)
        text = stats.text_tokens[0]
        lengths = [text + stats.llm_input_tokens] + [text + n for n in stats.tokens_per_layer]
        assert [h.shape[1] for h in out.hidden_states[0]] == lengths

    return got, want, compare


RUNNERS = {
    "greedy": run_greedy, "sampling": run_sampling, "beam_search": run_beam_search, "no_cache": run_no_cache,
    "prompt_lookup": run_prompt_lookup, "assisted": run_assisted, "static_cache": run_static_cache,
    "second_turn": run_second_turn, "second_turn_image": run_second_turn_image, "compile": run_compile,
    "threads": run_threads, "hidden_states": run_hidden_states,
}


def check_cell(request, mode_key: str, name: str) -> None:
    """Run ``mode_key`` under method ``name`` and check the outcome its kind's cell states."""
    expected = cell(mode_key, kind_of(name))
    got, want, compare = RUNNERS[mode_key](request, name)
    if expected.outcome == "refused":
        with pytest.raises(NotImplementedError, match=expected.says):
            got()
        return
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        value = got()
    warned = [w for w in seen if issubclass(w.category, duet_vlm.ReducedHiddenStatesWarning)]
    assert bool(warned) == (expected.outcome == "warns"), f"expected {expected.outcome!r}, warnings: {warned}"
    compare(value, want())


@pytest.mark.parametrize("kind", [kind.key for kind in KINDS])
@pytest.mark.parametrize("mode_key", [mode.key for mode in MODES])
def test_every_cell(request, mode_key, kind):
    check_cell(request, mode_key, representative(kind))


# ----------------------------------------------------------------------------- the table itself
def test_every_mode_has_a_runner_and_a_cell_per_kind():
    assert set(RUNNERS) == {mode.key for mode in MODES}
    for mode in MODES:
        assert set(mode.cells) == {kind.key for kind in KINDS}, mode.key


def test_every_registered_method_has_one_kind_that_its_plan_shows():
    members = methods_by_kind()
    listed = [name for names in members.values() for name in names]
    assert sorted(listed) == sorted(duet_vlm.METHODS)
    for kind, names in members.items():
        for name in names:
            # independent of the plan: a method with a language stage overrides Reducer.language_stage
            prunes = duet_vlm.METHODS[name].prunes_in_language_model()
            assert prunes == (kind in ("language", "vision_language")), name
    composed = duet_vlm.Compose(duet_vlm.make("visionzip"), duet_vlm.make("pyramiddrop"), budget=128)
    assert kind_of(composed) == "vision_language"


def test_a_cell_changed_in_the_table_fails_its_check(request, monkeypatch):
    """The planted bug: the table says the static cache runs under a language-side method."""
    static = table.mode("static_cache")
    monkeypatch.setitem(static.cells, "language", table.EQUAL)
    with pytest.raises(NotImplementedError, match="Use the default dynamic cache"):
        check_cell(request, "static_cache", representative("language"))


def test_doctests():
    assert doctest.testmod(table).failed == 0


# PIO's language stage runs its boundary layer's input through the layer once more for its proxy loss;
# that pass is not one of the model's layer calls and must not be recorded as one (it once gave 10
# hidden states on 8 layers).
@pytest.mark.parametrize("name", BUDGETED)  # pixelprune runs on the Qwen families: tests/test_pixelprune.py
def test_hidden_states_are_one_per_layer_under_every_method(model, name):
    """The ``warns`` cells' claim for every method, not one per kind: a forward's hidden states are
    the input of layer 0 and each decoder layer's output at the length that layer ran at."""
    inputs = make_inputs(model, seed=7)
    reducer = reducer_for(name)
    with torch.no_grad(), reducer(model), warnings.catch_warnings():
        warnings.simplefilter("ignore", duet_vlm.ReducedHiddenStatesWarning)
        hidden = model(**inputs, output_hidden_states=True).hidden_states
    stats = reducer.stats
    text = stats.text_tokens[0]
    assert [h.shape[1] for h in hidden] == [text + stats.llm_input_tokens] + [text + n for n in stats.tokens_per_layer]
