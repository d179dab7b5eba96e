"""Safe behind a server (issue #22): one model with an attached reducer, many callers, calls that fail.

Each test compares values against a reference that cannot share the defect: the same calls made one
after another (threads), the same call on a fresh attach (after a failed call), greedy decoding
(prompt lookup, generate without a cache) or the unpatched model (a second turn under ``full``).

1. Threads: calls overlapping on one model with one attached reducer give what the same calls give
   one after another: tokens, logits, and ``reducer.stats`` read in the calling thread right after
   its call.
2. A call that raises (transformers' placeholder check, the vision tower, a language stage, a
   logits processor, KeyboardInterrupt in the tower, a decoder layer or after the language model)
   leaves nothing behind: each kind of next call equals that call on a fresh attach, stats included.
3. Prompt lookup: drafts in the prefill are refused before any token under methods that prune
   inside the language model and equal greedy decoding otherwise; drafts that hold image
   placeholders (on a cache) run and equal greedy decoding under vision-side methods and ``full``,
   as the unpatched model does.
4. ``use_cache=False`` equals cached greedy decoding under every method, one prompt or a padded batch.
5. A cached second turn bringing a new image equals the unpatched model under ``full`` and is refused
   clearly where it would be reduced.
6. A text-only prefill resets ``reducer.stats``: no items, no visual tokens at any layer.

Only the public API is used, so that the file also runs against older versions of the library.
"""

from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass

import pytest
import torch
from transformers import LogitsProcessor

import duet_vlm
from duet_vlm.compat import cache_of

from checks import TokenCount, lookup_prompt, outcome, plain, run_overlapping, same, second_turn
from models import BUDGETED, make_inputs, make_llava_next, next_batch

NAMES = BUDGETED  # pixelprune takes no budget: tests/test_pixelprune.py
# Half the visual tokens: at a quarter, FastV after layer 2 of 8 layers keeps no visual token at all
# (its first two layers alone average more than the budget), so there would be nothing to select.
RATIO = 0.5
def _reads_text(name: str) -> bool:
    """Whether the method's vision stage reads the prompt's text (``VisionStage.needs_text``)."""
    stage = duet_vlm.make(name, ratio=RATIO).resolve(duet_vlm.Geometry(8, 576, (24, 24), True)).vision
    return getattr(stage, "needs_text", False)


# Methods whose selection drafted tokens in the prefill would steer (they drop tokens inside the
# language model, or their vision stage reads the prompt's text), and the vision-side rest (full,
# which reduces nothing, apart).
LANGUAGE_SIDE = [n for n in NAMES if duet_vlm.METHODS[n].prunes_in_language_model() or _reads_text(n)]
VISION_SIDE = [name for name in NAMES if name not in LANGUAGE_SIDE and name != "full"]
# ``model``: tests/conftest.py's 8-layer tiny LLaVA-1.5 (seed 2), built once for this module.


def text_only(length: int = 9, seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.cat([torch.tensor([[1]]), torch.randint(3, 900, (1, length - 1), generator=generator)], dim=1)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


# ----------------------------------------------------------------------------- 1. threads
def serving_jobs(model, reducer):
    """Requests of several shapes and modes; each returns its output and the stats its thread reads
    right after the call (grad mode is per thread: each job sets its own)."""
    one = make_inputs(model, seed=11)
    batch = make_inputs(model, batch=2, suffix=(9, 4), seed=12)
    other = make_inputs(model, suffix=3, seed=13)
    text = text_only(seed=14)

    def job(call):
        def run():
            with torch.no_grad():
                out = call()
            return out, plain(reducer.stats)

        return run

    return [
        job(lambda: model.generate(**one, max_new_tokens=4, do_sample=False)),
        job(lambda: model.generate(**batch, max_new_tokens=4, do_sample=False)),
        job(lambda: model(**other).logits),
        job(lambda: model.generate(**text, max_new_tokens=3, do_sample=False)),
        job(lambda: model.generate(**one, max_new_tokens=3, do_sample=False, num_beams=2)),
    ]


@pytest.mark.parametrize("name", NAMES)
def test_overlapping_calls_equal_the_same_calls_one_after_another(model, name):
    """Five threads (greedy, a padded batch, a forward, a text-only prompt, beam search) call one
    model with one attached reducer at once, three times in shuffled orders: each outcome (tokens or
    logits, and the stats read in its thread) equals the same call made alone. Catches per-call
    state kept on the attachment or the reducer (one thread's prefill read by another's decoding
    steps, or its stats reported to another)."""
    reducer = duet_vlm.make(name, ratio=RATIO)
    handle = reducer.attach(model)
    try:
        jobs = serving_jobs(model, reducer)
        alone = [outcome(job) for job in jobs]
        assert not any(isinstance(a, str) for a in alone), alone
        rounds = run_overlapping(jobs, rounds=3, seed=sum(map(ord, name)))
    finally:
        handle.remove()
    for r, results in enumerate(rounds):
        for j, (got, want) in enumerate(zip(results, alone)):
            assert not isinstance(got, str), f"round {r}, job {j}: {got}"
            assert same(got[0], want[0]), f"round {r}, job {j}: output differs from the call alone"
            assert got[1] == want[1], f"round {r}, job {j}: stats differ from the call alone"


# ----------------------------------------------------------------------------- 2. failed calls
_fail_stage = threading.local()


class RaisingStage(duet_vlm.LanguageStage):
    """DUET's Stage B, raising after running the layer itself while ``_fail_stage.on`` is set."""

    def __init__(self, inner):
        self.inner = inner
        self.needs_input_embeddings = getattr(inner, "needs_input_embeddings", False)

    def score(self, view):
        return self.inner.score(view)

    def select(self, view, keep):
        if getattr(_fail_stage, "on", False):
            view.run_layer(view.hidden_states)
            raise RuntimeError("language stage failed")
        return self.inner.select(view, keep)


@dataclass
class FailingDuet(duet_vlm.Duet):
    """DUET whose language stage can be made to raise."""

    def plan(self, geometry):
        plan = super().plan(geometry)
        if plan.language is not None:
            plan.language = RaisingStage(plan.language)
        return plan


class RaiseAt(LogitsProcessor):
    def __init__(self, step: int):
        self.step, self.seen = step, 0

    def __call__(self, input_ids, scores):
        self.seen += 1
        if self.seen >= self.step:
            raise RuntimeError("logits processor failed")
        return scores


def raising_hook(error: BaseException):
    def hook(*args):
        raise error

    return hook


def labelled(inputs):
    """A scoring forward's labels: the last six prompt tokens are answers, the rest instructions."""
    labels = torch.full_like(inputs["input_ids"], -100)
    labels[:, -6:] = inputs["input_ids"][:, -6:]
    return labels


def fail(model, kind: str):
    """Make one call that raises; returns the exception's type name."""
    bad = make_inputs(model, seed=7)
    hooks = []
    try:
        with torch.no_grad():
            if kind == "placeholder_mismatch":  # transformers' own check: 566 placeholders, 576 features
                keep = torch.ones(bad["input_ids"].shape[1], dtype=torch.bool)
                keep[10:20] = False
                model(input_ids=bad["input_ids"][:, keep], pixel_values=bad["pixel_values"])
            elif kind == "vision_tower":
                hooks.append(model.model.vision_tower.register_forward_hook(raising_hook(RuntimeError("tower failed"))))
                model.generate(**bad, max_new_tokens=3, do_sample=False)
            elif kind == "language_stage":
                _fail_stage.on = True
                model(**bad, labels=labelled(bad))
            elif kind == "logits_processor":  # after the prefill and one decoding step
                model.generate(**bad, max_new_tokens=5, do_sample=False, logits_processor=[RaiseAt(2)])
            elif kind == "interrupt_in_vision_tower":
                hooks.append(model.model.vision_tower.register_forward_hook(raising_hook(KeyboardInterrupt())))
                model.generate(**bad, max_new_tokens=3, do_sample=False)
            elif kind == "interrupt_in_decoder_layer":
                layer = model.model.language_model.layers[5]
                hooks.append(layer.register_forward_hook(raising_hook(KeyboardInterrupt())))
                model(**bad, labels=labelled(bad))
            elif kind == "interrupt_after_language_model":  # the prefill finished, the LM head did not run
                language_model = model.model.language_model
                hooks.append(language_model.register_forward_hook(raising_hook(KeyboardInterrupt())))
                model(**bad, labels=labelled(bad))
            else:
                raise AssertionError(kind)
    except (Exception, KeyboardInterrupt) as error:
        return type(error).__name__
    finally:
        _fail_stage.on = False
        for hook in hooks:
            hook.remove()
    raise AssertionError(f"{kind}: the failing call did not fail")


FAILURES = {
    "placeholder_mismatch": "ValueError",
    "vision_tower": "RuntimeError",
    "language_stage": "RuntimeError",
    "logits_processor": "RuntimeError",
    "interrupt_in_vision_tower": "KeyboardInterrupt",
    "interrupt_in_decoder_layer": "KeyboardInterrupt",
    "interrupt_after_language_model": "KeyboardInterrupt",
}


def next_calls(model):
    """Kinds of next call, each with what it returns (stats included)."""
    good = make_inputs(model, seed=1)  # the failing call's shape
    text = text_only(seed=3)

    def with_stats(call):
        def run(reducer):
            with torch.no_grad():
                out = outcome(call)
            return out, plain(reducer.stats)

        return run

    return {
        "generate": with_stats(lambda: model.generate(**good, max_new_tokens=4, do_sample=False)),
        "forward": with_stats(lambda: model(**good).logits),
        "text_forward": with_stats(lambda: model(**text).logits),
        "text_generate": with_stats(lambda: model.generate(**text, max_new_tokens=3, do_sample=False)),
        "base_model_forward": with_stats(lambda: model.model(**good).last_hidden_state),
        "generate_without_cache": with_stats(
            lambda: model.generate(**good, max_new_tokens=3, do_sample=False, use_cache=False)
        ),
    }


@pytest.mark.parametrize("kind", list(FAILURES))
def test_a_failed_call_leaves_nothing_behind(model, kind):
    """Persistent attach: one call fails (``kind``), then each kind of next call (each after its own
    failure) equals that call on a fresh attach: its output or error and the stats it leaves.
    Catches captures of a failed encoding read by the next prefill ("image features were not
    computed under this reducer"), LM-head rows, labels or stats of a failed call read by the next."""
    calls = next_calls(model)
    mismatched = []
    for name, call in calls.items():
        fresh = FailingDuet(budget=144)
        with fresh(model):
            want = call(fresh)
        assert not isinstance(want[0], str), (name, want[0])
        reducer = FailingDuet(budget=144)
        handle = reducer.attach(model)
        try:
            assert fail(model, kind) == FAILURES[kind]
            got = call(reducer)
        finally:
            handle.remove()
        if not (same(got[0], want[0]) and got[1] == want[1]):
            mismatched.append((name, got[0] if isinstance(got[0], str) else "output or stats differ"))
    assert not mismatched, mismatched


# ----------------------------------------------------------------------------- 3. prompt lookup
class Chunks:
    """Forward inputs of the top model: ``(cached tokens, input_ids)`` per call."""

    def __init__(self, model):
        self.seen = []
        self.handle = model.register_forward_pre_hook(self.hook, with_kwargs=True)

    def hook(self, module, args, kwargs):
        cache = cache_of(kwargs)
        cached = cache.get_seq_length() if cache is not None else 0
        self.seen.append((cached, kwargs["input_ids"]))

    def remove(self):
        self.handle.remove()


def reduced(name):
    return duet_vlm.make(name, ratio=RATIO) if name is not None else None


def generate(model, inputs, name, **kwargs):
    reducer = reduced(name)
    with torch.no_grad(), (reducer(model) if reducer is not None else contextlib.nullcontext()):
        return model.generate(**inputs, max_new_tokens=8, do_sample=False, **kwargs)


def accepted_lookup_prompt(model, name):
    """A ``lookup_prompt`` with one draft, which the model accepts under ``name`` when it is in the
    prefill (a forward of prompt + draft predicts it): found by iterating to a fixed point, from the
    first seed that has one. Nothing is cropped then, so a runtime that lets the draft steer its
    selection shows no sign of it but its tokens."""
    for seed in range(3, 12):
        drafts = (904,)
        for _ in range(6):
            inputs = lookup_prompt(model, drafts, seed)
            ids = torch.cat([inputs["input_ids"], torch.tensor([drafts])], dim=1)
            with torch.no_grad(), reduced(name)(model):
                logits = model(**{**inputs, "input_ids": ids, "attention_mask": torch.ones_like(ids)}).logits
            predicted = (int(logits[0, inputs["input_ids"].shape[1] - 1].argmax()),)
            if predicted == drafts:
                return inputs
            if predicted[0] == model.config.image_token_id:
                break
            drafts = predicted
    raise AssertionError(f"no prompt whose draft {name} accepts")


def test_prompt_lookup_drafts_enter_the_prefill(model):
    """The premise of the next tests, on the unpatched model: the first forward holds the prompt
    and its drafts."""
    inputs = lookup_prompt(model)
    chunks = Chunks(model)
    try:
        with torch.no_grad():
            model.generate(**inputs, max_new_tokens=8, do_sample=False, prompt_lookup_num_tokens=3)
    finally:
        chunks.remove()
    cached, first = chunks.seen[0]
    assert cached == 0 and first.shape[1] == inputs["input_ids"].shape[1] + 3
    assert first[0, -3:].tolist() == [904, 905, 906]


@pytest.mark.parametrize("name", LANGUAGE_SIDE)
@pytest.mark.parametrize("drafts", ["rejected", "accepted"])
def test_prompt_lookup_with_drafts_in_the_prefill_is_refused_before_any_token(model, name, drafts):
    """Drafts in the prefill would be text that the language stage reads: refused at the prefill,
    before ``generate`` hands out a token (the streamer gets the prompt only), whether the model
    would have rejected the drafts (three that nothing predicts) or accepted them (one draft that
    the model predicts in that prefill). The old runtime refused only after handing out the first
    tokens, when rejected drafts were cropped from the cache, and returned other tokens than greedy
    decoding without any error when the drafts were accepted."""
    if drafts == "rejected":
        inputs, lookup = lookup_prompt(model), 3
    else:
        inputs, lookup = accepted_lookup_prompt(model, name), 1
    streamer = TokenCount()
    with pytest.raises(NotImplementedError) as refused:
        generate(model, inputs, name, prompt_lookup_num_tokens=lookup, streamer=streamer)
    assert streamer.puts == 1, f"tokens were handed out before the refusal: {refused.value}"
    assert "prompt-lookup" in str(refused.value)


@pytest.mark.parametrize("name", VISION_SIDE + ["full"])
def test_prompt_lookup_with_drafts_in_the_prefill_equals_greedy(model, name):
    inputs = lookup_prompt(model)
    assert torch.equal(generate(model, inputs, name, prompt_lookup_num_tokens=3), generate(model, inputs, name))


@pytest.fixture(scope="module")
def llava_next_6layers():
    """A 6-layer LLaVA-NeXT (anyres), one forward already run (the output-capturing hooks)."""
    model = make_llava_next(layers=6)
    with torch.no_grad():
        model(**next_batch([[(112, 112)]], seed=1))
    return model


def placeholder_draft_prompt(model, build, name, before: int):
    """A prompt of ``build(model, seed)`` whose token just before the image (at ``before``) is the
    first token greedy decoding generates (under ``name``): after that token prompt lookup drafts the
    image's placeholders, in a chunk on the cache. Found by iterating to a fixed point, from the
    first seed that has one."""
    for seed in range(1, 6):
        inputs = build(model, seed)
        ids = inputs["input_ids"].clone()
        for _ in range(6):
            first = int(generate(model, {**inputs, "input_ids": ids}, name)[0, ids.shape[1]])
            if int(ids[0, before]) == first:
                return {**inputs, "input_ids": ids}
            ids[0, before] = first
    raise AssertionError("no prompt whose first generated token precedes the image")


FAMILY_INPUTS = {
    # (model fixture, inputs of a seed, index of the token just before the image)
    "llava_next": ("llava_next_6layers", lambda m, seed: next_batch([[(112, 112)]], seed=seed), 3),
    "llava": ("model", lambda m, seed: make_inputs(m, seed=seed), 5),
}


@pytest.mark.parametrize("family", list(FAMILY_INPUTS))
@pytest.mark.parametrize("name", [None, "full"] + VISION_SIDE)
def test_drafts_holding_placeholders_run_and_equal_greedy(request, family, name):
    """Prompt lookup drafts the image's placeholders in a chunk on top of the cache: the unpatched
    model (``name=None``) runs it, and so must ``full`` and the vision-side methods, with greedy
    decoding's tokens. The old runtime took any chunk holding placeholders for a resent prompt and
    refused it ("to continue a conversation ...")."""
    fixture, build, before = FAMILY_INPUTS[family]
    model = request.getfixturevalue(fixture)
    token = model.config.image_token_id
    inputs = placeholder_draft_prompt(model, build, name, before)
    reducer = reduced(name)
    chunks = Chunks(model)
    try:
        with torch.no_grad(), (reducer(model) if reducer is not None else contextlib.nullcontext()):
            greedy = model.generate(**inputs, max_new_tokens=8, do_sample=False)
            chunks.seen.clear()
            drafted = model.generate(**inputs, max_new_tokens=8, do_sample=False, prompt_lookup_num_tokens=3)
    finally:
        chunks.remove()
    # the premise: a chunk on the cache held drafted placeholders
    assert any(cached > 0 and ids.shape[1] > 1 and bool((ids == token).any()) for cached, ids in chunks.seen)
    assert torch.equal(drafted, greedy)


# ----------------------------------------------------------------------------- 4. without a cache
@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("batch", [1, 2], ids=["one", "padded_batch"])
def test_generate_without_a_cache_equals_cached_decoding(model, name, batch):
    """``use_cache=False`` prefills again at every step; the runtime keeps the first prefill's
    selection, so the tokens equal cached decoding's (the old runtime chose again from each longer
    prompt, e.g. with the generated tokens as the text a language stage reads)."""
    if batch == 1:
        inputs = make_inputs(model, seed=21)
    else:
        inputs = make_inputs(model, batch=2, suffix=(9, 4), seed=22)
    # A generated placeholder would be one placeholder too many for transformers' check in the next
    # prefill without a cache (the unpatched model fails the same way): not generated here.
    kwargs = dict(max_new_tokens=8, do_sample=False, suppress_tokens=[model.config.image_token_id])
    with torch.no_grad(), duet_vlm.make(name, ratio=RATIO)(model):
        cached = model.generate(**inputs, **kwargs)
        uncached = model.generate(**inputs, **kwargs, use_cache=False)
    assert torch.equal(uncached, cached)


# ----------------------------------------------------------------------------- 5. a second turn with an image
def test_a_cached_second_turn_with_a_new_image_under_full_equals_the_unpatched_model(model):
    assert torch.equal(second_turn(model, duet_vlm.make("full")), second_turn(model))


@pytest.mark.parametrize("name", [n for n in NAMES if n != "full"])
def test_a_cached_second_turn_with_a_new_image_is_refused_clearly(model, name):
    """Refused saying what was refused (new images on a cache) and what to do instead. The old runtime
    refused it under ``full`` too, and under FastV, PyramidDrop and SparseVLM with the message of a
    resent prompt (a cache shorter than its prompt, which theirs is not)."""
    clear = "(?is)new images.*pass the whole conversation again without past_key_values"
    with pytest.raises(NotImplementedError, match=clear):
        second_turn(model, duet_vlm.make(name, ratio=RATIO))


# ----------------------------------------------------------------------------- 6. stats of a text-only prefill
@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("mode", ["forward", "generate"])
def test_a_text_only_prefill_resets_the_stats(model, name, mode):
    reducer = duet_vlm.make(name, ratio=RATIO)
    text = text_only(length=11, seed=41)
    with torch.no_grad(), reducer(model):
        model(**make_inputs(model, seed=40))
        assert reducer.stats is not None and len(reducer.stats.items) == 1
        if mode == "forward":
            model(**text)
        else:
            model.generate(**text, max_new_tokens=2, do_sample=False)
    stats = reducer.stats
    assert stats is not None and stats.items == []
    assert stats.tokens_per_layer == [0] * len(model.model.language_model.layers)
    assert stats.llm_input_tokens == 0 and stats.visual_tokens == 0
    assert stats.text_tokens == [11]
