"""A static cache and compiled decoding under a reducer (``duet_vlm.runtime.static``).

``generate(..., cache_implementation="static")`` under DUET, FastV and VisionZip gives the tokens
and every step's logits of the same reducer on the default dynamic cache, on one row and on a
left-padded batch; each decoder layer's static buffer is as long as the tokens that layer keeps
plus the new tokens it will write (``generate`` sizes a static cache to the prompt and all but the
last new token, which is never fed back): the dynamic cache's length at the end, the plan's kept
tokens on one row, not the prompt's length. A decoding step on that cache
(the one ``generate`` runs, captured with its arguments) traces with no graph break and no host
sync the unpatched model's step does not have, and compiled with ``fullgraph=True`` equals eager.

LLaVA-1.5 in the default suite; every family under ``-m matrix`` (hybrid, sliding, M-RoPE and
DeepStack caches, masks and positions).
"""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch
import torch._dynamo as dynamo
from transformers.cache_utils import StaticCache, StaticLayer

import duet_vlm
from duet_vlm import compat
from duet_vlm.compat import with_cache

from checks import decoding_syncs
from models import FAMILIES

# transformers before 5.24 refuses it by name (``compat.check_static_cache``; the last test)
NEEDS_5_24 = pytest.mark.skipif(not compat.STATIC_UNDER_REDUCTION, reason="a static cache under a reduction needs 5.24")

METHODS = ("duet", "fastv", "visionzip")
RATIO = 0.5
NEW = 4
# The logits of a static and a dynamic cache differ by the keys' summation order (a static layer
# attends over its whole buffer, the slots not yet written masked): 2e-7 measured, unpatched alike.
ATOL = 1e-5
# One entry per adapter (a tower variant shares its family's language model and cache).
ADAPTERS = [name for name in FAMILIES if "-" not in name or name.endswith("-moe")]
MATRIX = [pytest.param(name, marks=pytest.mark.matrix) for name in ADAPTERS if name != "llava"]


def generate(model, inputs, method: str | None, cache: str | None):
    kwargs = dict(max_new_tokens=NEW, do_sample=False, return_dict_in_generate=True, output_logits=True)
    if cache is not None:
        kwargs["cache_implementation"] = cache
    reducer = duet_vlm.make(method, ratio=RATIO) if method else None
    with torch.no_grad(), reducer(model) if reducer else contextlib.nullcontext():
        out = model.generate(**inputs, **kwargs)
    return out, reducer


def check_buffers(model, fixed, grown) -> int:
    """Each static layer's buffer: the tokens its layer holds at the end of the dynamic run, plus the
    same spare slots in every layer (a sliding layer: at most its window); returns those. ``generate``
    sizes a static cache to the prompt and all but the last new token, or to the largest size an
    earlier call asked for where that is larger (to avoid recompiling): its spare slots, which each
    layer keeps beyond its own tokens."""
    window = getattr(model.config.get_text_config(decoder=True), "sliding_window", None)
    spare = {int(layer.max_cache_len) - int(grown.layers[index].get_seq_length())
             for index, layer in enumerate(fixed.layers) if isinstance(layer, StaticLayer) and not layer.is_sliding}
    assert len(spare) == 1 and min(spare) >= 0, spare
    extra = spare.pop()
    for index, layer in enumerate(fixed.layers):
        if not isinstance(layer, StaticLayer):
            continue  # a recurrence's state (Qwen3.5's Gated DeltaNet) has no length
        want = int(grown.layers[index].get_seq_length()) + extra
        if layer.is_sliding:
            want = min(want, window)
        assert layer.max_cache_len == want == layer.keys.shape[2], (index, layer.max_cache_len, want)
    return extra


def check_equal(family_name: str, method: str) -> None:
    family = FAMILIES[family_name]
    model = family.model()
    for inputs in (family.one(model), family.batch(model)):
        grown, _ = generate(model, inputs, method, None)
        plain, _ = generate(model, inputs, None, "static")  # the slots generate gives the unreduced prompt
        slots = max(layer.max_cache_len for layer in plain.past_key_values.layers
                    if isinstance(layer, StaticLayer) and not layer.is_sliding)
        fixed, reducer = generate(model, inputs, method, "static")
        assert torch.equal(fixed.sequences, grown.sequences)
        for step, (a, b) in enumerate(zip(fixed.logits, grown.logits)):
            torch.testing.assert_close(a, b, atol=ATOL, rtol=0, msg=lambda m: f"step {step}: {m}")
        extra = check_buffers(model, fixed.past_key_values, grown.past_key_values)
        # the spare slots are what generate leaves beyond this call's unreduced need (none, unless an
        # earlier call asked for more), not the tokens the reduction dropped; generate sizes the cache
        # for max_new_tokens, so a call that ends at EOS first leaves the rest unwritten (the tiny
        # Qwen3.5-MoE under DUET answers 2 tokens of 4: 2 slots, once taken for a runtime's excess)
        spare = slots - (inputs["input_ids"].shape[1] + NEW - 1)
        unwritten = NEW - (fixed.sequences.shape[1] - inputs["input_ids"].shape[1])
        assert extra == spare + unwritten, (extra, spare, unwritten)
        if family_name == "llava" and inputs["input_ids"].shape[0] == 1:  # one row: against the plan
            stats = reducer.stats
            held = [stats.text_tokens[0] + n for n in stats.tokens_per_layer]  # per decoder layer
            lengths = [layer.max_cache_len for layer in fixed.past_key_values.layers]
            assert lengths == [n + NEW - 1 + extra for n in held]
            assert len(set(lengths)) > 1 or method == "visionzip"  # the layers differ where a stage prunes


@NEEDS_5_24
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("family_name", ["llava", *MATRIX])
def test_static_cache_equals_the_dynamic_cache(family_name, method):
    check_equal(family_name, method)


@NEEDS_5_24
@pytest.mark.parametrize("family_name", ["llava", *(pytest.param(name, marks=pytest.mark.matrix)
                                                   for name in ("gemma3", "qwen2_5_vl", "qwen3_5"))])
def test_static_cache_equals_the_dynamic_cache_under_eager_attention(family_name):
    """Eager attention takes additive float masks, padded with the dtype's minimum."""
    family = FAMILIES[family_name]
    model = copy.deepcopy(family.model())
    model.set_attn_implementation("eager")
    for method in METHODS:
        for inputs in (family.one(model), family.batch(model)):
            grown, _ = generate(model, inputs, method, None)
            fixed, _ = generate(model, inputs, method, "static")
            assert torch.equal(fixed.sequences, grown.sequences)
            for a, b in zip(fixed.logits, grown.logits):
                torch.testing.assert_close(a, b, atol=ATOL, rtol=0)
            check_buffers(model, fixed.past_key_values, grown.past_key_values)


class Captured(Exception):
    pass


def decoding_step(model, inputs) -> tuple[tuple, dict]:
    """The arguments ``generate`` passes to the model's first decoding step on a static cache (the
    prefill has run; the step has not)."""
    calls = []

    def hook(module, args, kwargs):
        calls.append(None)
        if len(calls) == 2:
            raise Captured(args, kwargs)

    handle = model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        model.generate(**inputs, max_new_tokens=NEW, do_sample=False, cache_implementation="static")
    except Captured as captured:
        return captured.args
    finally:
        handle.remove()
    raise AssertionError("generate ran no decoding step")


def step_report(model, inputs, reducer) -> dict:
    """Decoding on a static cache: each step's host syncs (``checks.decoding_syncs``, eager), and of
    the first step dynamo's graph breaks and the largest difference of its logits compiled with
    ``fullgraph=True`` from eager (``None``: the model breaks its graph, so fullgraph cannot compile it)."""
    syncs = decoding_syncs(model, inputs, reducer, cache_implementation="static")
    with torch.no_grad(), reducer(model) if reducer else contextlib.nullcontext():
        args, kwargs = decoding_step(model, inputs)

        def fresh() -> dict:  # each run on its own copy of the cache the prefill wrote
            return {key: copy.deepcopy(value) if key in ("cache", "past_key_values") else value
                    for key, value in kwargs.items()}

        eager = model(*args, **fresh()).logits
        dynamo.reset()
        try:
            explained = dynamo.explain(model.forward)(*args, **fresh())
            gap = None
            if explained.graph_break_count == 0:
                dynamo.reset()
                compiled = torch.compile(model.forward, fullgraph=True, backend="aot_eager")
                gap = (compiled(*args, **fresh()).logits - eager).abs().max().item()
        finally:
            dynamo.reset()
    return dict(syncs=syncs, breaks=explained.graph_break_count,
                reasons=[str(reason.reason) for reason in explained.break_reasons], gap=gap)


@NEEDS_5_24
@pytest.mark.parametrize("family_name", ["llava", *MATRIX])
def test_a_compiled_decoding_step_breaks_and_syncs_no_more_than_unpatched(family_name):
    family = FAMILIES[family_name]
    model = family.model()
    inputs = family.one(model)
    plain = step_report(model, inputs, None)
    reduced = step_report(model, inputs, duet_vlm.make("duet", ratio=RATIO))
    assert reduced["breaks"] <= plain["breaks"], reduced["reasons"]
    assert reduced["syncs"] and plain["syncs"]  # decoding steps were counted
    assert all(count <= plain["syncs"][min(i, len(plain["syncs"]) - 1)] for i, count in enumerate(reduced["syncs"]))
    if plain["breaks"] == 0:  # aot_eager's decompositions may sum in another order than eager
        assert reduced["gap"] is not None and reduced["gap"] <= ATOL


@NEEDS_5_24
@pytest.mark.parametrize("method", METHODS)
def test_one_new_token_on_a_static_cache_of_the_prompts_length(method):
    """``max_new_tokens=1``: generate sizes the static cache to the prompt exactly (the new token is
    never fed back), which leaves no room and must be enough; the token and its logits equal the
    dynamic cache's. A cache shorter than the prompt is refused by name."""
    family = FAMILIES["llava"]
    model = family.model()
    inputs = family.one(model)
    kwargs = dict(max_new_tokens=1, do_sample=False, return_dict_in_generate=True, output_logits=True)
    with torch.no_grad(), duet_vlm.make(method, ratio=RATIO)(model):
        grown = model.generate(**inputs, **kwargs)
        fixed = model.generate(**inputs, **kwargs, cache_implementation="static")
        assert torch.equal(fixed.sequences, grown.sequences)
        torch.testing.assert_close(fixed.logits[0], grown.logits[0], atol=ATOL, rtol=0)
        short = StaticCache(config=model.config, max_cache_len=inputs["input_ids"].shape[1] - 1)
        with pytest.raises(ValueError, match=r"a static cache of \d+ slots cannot hold a prompt of \d+ tokens"):
            model(**inputs, **with_cache(short), use_cache=True)


@NEEDS_5_24
def test_a_static_cache_written_before_is_refused():
    family = FAMILIES["llava"]
    model = family.model()
    inputs = family.one(model)
    out, _ = generate(model, inputs, None, "static")
    cache = out.past_key_values
    cache.reset()
    with torch.no_grad(), duet_vlm.make("duet", ratio=RATIO)(model):
        with pytest.raises(NotImplementedError, match="a static cache written before"):
            model(**inputs, **with_cache(cache), use_cache=True)


@NEEDS_5_24
def test_several_tokens_at_once_on_a_reduced_static_cache_are_refused():
    """Drafts to verify (assisted, prompt lookup) or a second turn: a chunk on the cache whose place
    after the reduced prompt would need the cache's length read on the host."""
    family = FAMILIES["llava"]
    model = family.model()
    inputs = family.one(model)
    with torch.no_grad(), duet_vlm.make("visionzip", ratio=RATIO)(model):
        out = model.generate(**inputs, max_new_tokens=2, do_sample=False, cache_implementation="static",
                             return_dict_in_generate=True)
        chunk = out.sequences[:, -1:].repeat(1, 3)
        mask = torch.ones(1, out.sequences.shape[1] + 2, dtype=torch.long)
        with pytest.raises(NotImplementedError, match="several tokens at once on a static cache"):
            model(input_ids=chunk, attention_mask=mask, **with_cache(out.past_key_values), use_cache=True)


@pytest.mark.skipif(compat.STATIC_UNDER_REDUCTION, reason="the installed transformers runs it")
def test_an_older_transformers_refuses_a_static_cache_under_a_reduction_by_name():
    family = FAMILIES["llava"]
    model = family.model()
    with pytest.raises(NotImplementedError, match="needs transformers 5.24 or newer"):
        generate(model, family.one(model), "duet", "static")
