"""The README's generation-modes table (``duet_vlm.generation_modes``), checked cell by cell.

Every (mode, kind) cell runs here on a method of that kind, on the tiny LLaVA-1.5 model in the
default suite and on every family of tests/models.py under ``-m matrix`` (a family whose cache or
inputs are laid out differently cannot fall through), and is checked by values against what the table says: an ``equal`` cell's tokens and logits against the
mode's reference (each row alone, the prompt repeated, cached decoding, greedy decoding, the
unpatched model, the same tokens forced in one call, eager generation, the same calls one after
another), a ``refused`` cell's ``NotImplementedError`` and its message, a ``warns`` cell's warning.
The test reads the expected outcome from the table, so a cell changed in the table (or a behaviour
changed in the library) fails here until the two agree again.
"""

from __future__ import annotations

import contextlib
import doctest
import functools
import warnings

import pytest
import torch
import torch._dynamo as dynamo

import duet_vlm
import duet_vlm.generation_modes as table
from duet_vlm import compat
from duet_vlm.generation_modes import KINDS, MODES, cell, kind_of, methods_by_kind

from checks import Force, TokenCount, lookup_prompt, plain, run_overlapping, same, second_turn, twice
from models import BUDGETED, FAMILIES, make_inputs, make_llava, row

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
def compile_limits():
    """Dynamo's cache is kept between the kinds' cells (a cell compiles what the earlier ones left
    uncompiled, about halving the row's time), with room for their recompiles; a hit limit fails
    instead of falling back to eager frames, which would equal eager generation trivially."""
    dynamo.reset()
    limits = {"recompile_limit": 64, "fail_on_recompile_limit_hit": True}  # both exist from torch 2.6
    with dynamo.config.patch({key: value for key, value in limits.items() if hasattr(dynamo.config, key)}):
        yield
    dynamo.reset()


@pytest.fixture(scope="module")
def small(compile_limits):
    """A 4-layer model with a 2-layer tower for ``torch.compile`` (tracing time grows with depth)."""
    return make_llava(layers=4, vision_layers=2, seed=2)


class LlavaSetup:
    """The default suite's prompts, on conftest's 8-layer tiny LLaVA-1.5 (``model``), its assistant
    (``draft``) and a 4-layer copy for ``torch.compile`` (``small``)."""

    follow_up = [11, 12, 13]
    ratio, compile_ratio = RATIO, COMPILE_RATIO
    transformers_refuses: dict[str, str] = {}

    def __init__(self, request):
        self.request = request

    @property
    def model(self):
        return self.request.getfixturevalue("model")

    @property
    def draft(self):
        return self.request.getfixturevalue("draft")

    @property
    def small(self):
        return self.request.getfixturevalue("small")

    def one(self, seed: int, model=None, **options):
        return make_inputs(model or self.model, seed=seed, **options)

    def batch(self, seed: int):
        return make_inputs(self.model, batch=2, suffix=(9, 4), seed=seed)

    def row(self, batch, b: int):
        return row(batch, b)

    def other(self, seed: int):
        return make_inputs(self.model, suffix=3, seed=seed)

    def placeholders(self) -> list[int]:
        return [self.model.config.image_token_id]

    def lookup(self):
        return lookup_prompt(self.model)  # its last tokens repeat earlier text: drafts enter the prefill

    def second_turn(self, reducer=None):
        return second_turn(self.model, reducer)


class FamilySetup:
    """The same calls on one family of tests/models.py: its one-item prompt, its padded batch of two
    rows (row 1 alone for a third request), ids that no prompt holds for the follow-up turn and the
    prompt-lookup marks, an assistant with the model's weights, and the model itself compiled."""

    # On the families' six layers, 0.4 of the tokens leaves every kind's stages something to do (at
    # 0.5 DUET's entry keeps every token: its vision stage reduces nothing) and every schedule solvable.
    ratio = compile_ratio = 0.4

    def __init__(self, request, family):
        self.request, self.family = request, family
        self.model = family.model()
        # generate's own refusals, with or without a reducer: what the cell's method cannot change.
        self.transformers_refuses = {
            mode: "not supported with stateful models" for mode in ("prompt_lookup", "assisted")
            if getattr(self.model, "_is_stateful", False)
        }

    @property
    def draft(self):
        return _assistant(self.family.name)

    @property
    def small(self):
        self.request.getfixturevalue("compile_limits")
        if _compiled[0] != self.family.name:  # a family's recompiles are counted afresh
            dynamo.reset()
            _compiled[0] = self.family.name
        return self.model

    def one(self, seed: int, model=None, **options):
        return self.family.one(self.model)

    def batch(self, seed: int):
        return self.family.batch(self.model)

    def row(self, batch, b: int):
        return self.family.row(batch, b)

    def other(self, seed: int):
        return self.row(self.batch(seed), 1)

    def placeholders(self) -> list[int]:
        return [i for i in (getattr(self.model.config, key, None) for key in ("image_token_id", "video_token_id"))
                if i is not None]

    def free_ids(self, count: int) -> list[int]:
        """``count`` ids from the top of the vocabulary that neither a prompt nor the config uses."""
        config = self.model.config
        used = set(self.one(0)["input_ids"].flatten().tolist()) | set(self.batch(0)["input_ids"].flatten().tolist())
        for source in (config, config.get_text_config()):
            used |= {v for k, v in vars(source).items() if k.endswith(("token_id", "token_index")) and isinstance(v, int)}
        free = [i for i in range(config.get_text_config().vocab_size - 1, 2, -1) if i not in used]
        return free[:count]

    @property
    def follow_up(self) -> list[int]:
        return self.free_ids(3)

    def lookup(self):
        mark_a, mark_b, *drafts = self.free_ids(6)
        return extended(self.one(0), [mark_a, mark_b, *drafts[:3], drafts[3], mark_a, mark_b])

    def second_turn(self, reducer=None):
        """As ``checks.second_turn``: the family's prompt again, its items with it, on the first turn's cache."""
        model, prompt = self.model, self.one(0)
        with torch.no_grad(), (reducer(model) if reducer is not None else contextlib.nullcontext()):
            first = model.generate(**prompt, max_new_tokens=3, do_sample=False, return_dict_in_generate=True)
            turn = dict(prompt, past_key_values=first.past_key_values)
            for key, value in prompt.items():  # per-token inputs: the first turn's part, then the new prompt
                if isinstance(value, torch.Tensor) and value.shape == prompt["input_ids"].shape:
                    head = first.sequences if key == "input_ids" else torch.full_like(first.sequences, int(key == "attention_mask"))
                    turn[key] = torch.cat([head, value], dim=1)
            return model.generate(**turn, max_new_tokens=3, do_sample=False)


def extended(inputs: dict, tokens: list[int]) -> dict:
    """``inputs`` (one row) with ``tokens`` appended: ids, an attended mask, and 0 in every other
    per-token input (token types)."""
    length = inputs["input_ids"].shape[1]
    out = dict(inputs)
    for key, value in inputs.items():
        if isinstance(value, torch.Tensor) and value.shape == (1, length):
            tail = torch.tensor([tokens]) if key == "input_ids" else torch.full((1, len(tokens)), int(key == "attention_mask"))
            out[key] = torch.cat([value, tail.to(value.dtype)], dim=1)
    if "attention_mask" not in out:
        out["attention_mask"] = torch.ones_like(out["input_ids"])
    return out


_compiled = [None]  # the family whose frames dynamo's cache holds


@functools.cache
def _assistant(name: str):
    """A second build of family ``name``: the same seeded weights, so it drafts the unreduced model's
    greedy tokens."""
    family = FAMILIES[name]
    model = family.build()
    with torch.no_grad():
        model(**family.one(model))
    return model


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


def run_greedy(setup, name):
    model = setup.model
    batch = setup.batch(22)

    def got():
        with torch.no_grad(), reducer_for(name, setup.ratio)(model):
            return scored(model, batch)

    def want():
        with torch.no_grad(), reducer_for(name, setup.ratio)(model):
            return [scored(model, setup.row(batch, b)) for b in range(2)]

    def compare(out, rows):
        width = batch["input_ids"].shape[1]
        for b, alone in enumerate(rows):
            # a row alone may stop at its end-of-sequence token before the batch does (then it is padded)
            new = alone.sequences[0, setup.row(batch, b)["input_ids"].shape[1]:].tolist()
            got = out.sequences[b, width:].tolist()
            assert got[: len(new)] == new and len(set(got[len(new):])) <= 1, f"row {b}: {got} != {new}"
            assert_steps_close([step[b : b + 1] for step in out.logits[: len(new)]], alone.logits, atol=1e-4)

    return got, want, compare


def run_sampling(setup, name):
    model = setup.model
    inputs = setup.one(2)
    kwargs = dict(do_sample=True, top_k=0)

    def got():
        with torch.no_grad(), reducer_for(name, setup.ratio)(model):
            torch.manual_seed(0)
            return scored(model, inputs, num_return_sequences=2, **kwargs)

    def want():
        with torch.no_grad(), reducer_for(name, setup.ratio)(model):
            torch.manual_seed(0)
            return scored(model, twice(inputs), **kwargs)

    def compare(several, repeated):
        assert torch.equal(several.sequences, repeated.sequences)
        assert_steps_close(several.logits, repeated.logits)

    return got, want, compare


def run_beam_search(setup, name):
    model = setup.model
    inputs = setup.one(1)
    kwargs = dict(num_beams=2, return_dict_in_generate=True, output_scores=True)

    def got():
        with torch.no_grad(), reducer_for(name, setup.ratio)(model):
            return generate(model, twice(inputs), **kwargs)

    def want():
        with torch.no_grad(), reducer_for(name, setup.ratio)(model):
            return generate(model, inputs, **kwargs)

    def compare(two, one):
        for b in range(2):
            assert torch.equal(two.sequences[b], one.sequences[0]), f"row {b}"
            torch.testing.assert_close(two.sequences_scores[b], one.sequences_scores[0], atol=1e-5, rtol=1e-5)

    return got, want, compare


def run_no_cache(setup, name):
    model = setup.model
    inputs = setup.one(21)
    # a generated placeholder would be one too many for transformers' check in the next prefill
    kwargs = dict(max_new_tokens=6, suppress_tokens=setup.placeholders())

    def got():
        with torch.no_grad(), reducer_for(name, setup.ratio)(model):
            return scored(model, inputs, use_cache=False, **kwargs)

    def want():
        with torch.no_grad(), reducer_for(name, setup.ratio)(model):
            return scored(model, inputs, **kwargs)

    def compare(uncached, cached):
        assert torch.equal(uncached.sequences, cached.sequences)
        assert_steps_close(uncached.logits, cached.logits, atol=1e-4)

    return got, want, compare


def run_prompt_lookup(setup, name):
    model = setup.model
    inputs = setup.lookup()  # its last tokens repeat earlier text: drafts enter the prefill

    def got():
        with torch.no_grad(), reducer_for(name, setup.ratio)(model):
            return before_any_token(lambda streamer: generate(
                model, inputs, max_new_tokens=8, prompt_lookup_num_tokens=3, streamer=streamer))

    def want():
        with torch.no_grad(), reducer_for(name, setup.ratio)(model):
            return generate(model, inputs, max_new_tokens=8)

    return got, want, assert_tokens_equal


def run_assisted(setup, name):
    model, draft = setup.model, setup.draft
    inputs = setup.one(3)

    def got():
        with torch.no_grad(), reducer_for(name, setup.ratio)(model):
            return before_any_token(
                lambda streamer: generate(model, inputs, max_new_tokens=8, assistant_model=draft, streamer=streamer)
            )

    def want():
        with torch.no_grad(), reducer_for(name, setup.ratio)(model):
            return generate(model, inputs, max_new_tokens=8)

    return got, want, assert_tokens_equal


def run_static_cache(setup, name):
    model = setup.model
    inputs = setup.one(5)
    kwargs = dict(max_new_tokens=3, cache_implementation="static")

    def got():
        with torch.no_grad(), reducer_for(name, setup.ratio)(model):
            return scored(model, inputs, **kwargs)

    def want():  # the same reducer on the default dynamic cache
        with torch.no_grad(), reducer_for(name, setup.ratio)(model):
            return scored(model, inputs, max_new_tokens=3)

    def compare(fixed, grown):
        # a static layer attends over its whole buffer (slots not yet written masked): the keys sum
        # in another order than on a dynamic cache, unpatched alike
        assert torch.equal(fixed.sequences, grown.sequences)
        assert_steps_close(fixed.logits, grown.logits, atol=1e-5)

    return got, want, compare


def run_second_turn(setup, name):
    """A first turn of three tokens, then a text-only turn on its cache; the reference decodes the
    same turn token by token in one call (the follow-up forced after the first three tokens)."""
    model, follow_up = setup.model, setup.follow_up
    inputs = setup.one(4)
    width = inputs["input_ids"].shape[1]

    def got():
        # min_new_tokens: neither turn may end at an end-of-sequence token before the follow-up
        with torch.no_grad(), reducer_for(name, setup.ratio)(model):
            first = generate(model, inputs, max_new_tokens=3, min_new_tokens=3, return_dict_in_generate=True)
            turn = dict(extended(dict(input_ids=first.sequences), follow_up), past_key_values=first.past_key_values)
            return scored(model, turn, max_new_tokens=3, min_new_tokens=3)

    def want():
        with torch.no_grad(), reducer_for(name, setup.ratio)(model):
            return scored(model, inputs, max_new_tokens=9, min_new_tokens=9, logits_processor=[Force(width + 3, follow_up)])

    def compare(second, forced):
        assert torch.equal(second.sequences, forced.sequences)
        assert_steps_close(second.logits, forced.logits[6:])

    return got, want, compare


def run_second_turn_image(setup, name):
    model = setup.model

    def got():
        return setup.second_turn(reducer_for(name, setup.ratio))

    def want():
        return setup.second_turn()  # the unpatched model

    return got, want, assert_tokens_equal


def run_compile(setup, name):
    """``model.compile()`` with dynamo's ``eager`` backend (its tracing, guards and graph breaks;
    tests/test_compile.py runs ``aot_eager`` and counts the graph breaks)."""
    model = setup.small
    inputs = setup.one(6, model)
    reducer = reducer_for(name, setup.compile_ratio)

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


def run_threads(setup, name):
    """Three requests (greedy, a padded batch, a forward) in three threads at once, twice in shuffled
    orders: each equals the same call made alone, with the stats its thread reads after it."""
    model = setup.model
    reducer = reducer_for(name, setup.ratio)
    one, batch, other = setup.one(11), setup.batch(12), setup.other(13)

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


def run_hidden_states(setup, name):
    """Besides the warning and greedy decoding's tokens: the prefill's hidden states are the input
    of layer 0 and each layer's output, each at the length that layer ran at (its visual tokens and
    the text)."""
    model = setup.model
    inputs = setup.one(7)
    reducer = reducer_for(name, setup.ratio)

    def got():
        with torch.no_grad(), reducer(model):
            out = generate(model, inputs, max_new_tokens=3, output_hidden_states=True, return_dict_in_generate=True)
        return out, reducer.stats

    def want():
        with torch.no_grad(), reducer_for(name, setup.ratio)(model):
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


def check_cell(setup, mode_key: str, name: str) -> None:
    """Run ``mode_key`` under method ``name`` on ``setup``'s model and prompts, and check the
    outcome its kind's cell states."""
    expected = cell(mode_key, kind_of(name))
    got, want, compare = RUNNERS[mode_key](setup, name)
    if mode_key in setup.transformers_refuses:  # the unpatched model's refusal passes through unchanged
        with pytest.raises(ValueError, match=setup.transformers_refuses[mode_key]):
            got()
        return
    if expected.outcome == "refused":
        with pytest.raises(NotImplementedError, match=expected.says):
            got()
        return
    if mode_key == "static_cache" and kind_of(name) != "full" and not compat.STATIC_UNDER_REDUCTION:
        with pytest.raises(NotImplementedError, match="needs transformers 5.24 or newer"):  # refused by name
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
    check_cell(LlavaSetup(request), mode_key, representative(kind))


# The tower variants (``-siglip``, ``-clip``) share their family's adapter, language model and cache:
# one entry per adapter.
TABLE_FAMILIES = [name for name in FAMILIES if "-" not in name or name.endswith("-moe")]


@pytest.mark.matrix
@pytest.mark.parametrize("kind", [kind.key for kind in KINDS])
@pytest.mark.parametrize("mode_key", [mode.key for mode in MODES])
@pytest.mark.parametrize("family_name", TABLE_FAMILIES)
def test_every_cell_on_every_family(request, family_name, mode_key, kind):
    """The same cells on each family's model and prompts: a family whose cache, masks or positions
    are laid out differently (hybrid, sliding, M-RoPE) meets the table or fails here."""
    check_cell(FamilySetup(request, FAMILIES[family_name]), mode_key, representative(kind))


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
    """The planted bug: the table says a second turn with a new image runs under a language-side method."""
    second = table.mode("second_turn_image")
    monkeypatch.setitem(second.cells, "language", table.EQUAL)
    with pytest.raises(NotImplementedError, match="new images or videos on top of a cache"):
        check_cell(LlavaSetup(request), "second_turn_image", representative("language"))


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
