"""Scoring with the layer before a boundary (FastV, SparseVLM) reads the keys that layer wrote to the
cache instead of computing them again: with one row and nothing cached before, they are the same
computation on the same tensor, so every score, kept index and logit is unchanged (bit for bit).
"""

import pytest
import torch
from transformers import DynamicCache

import duet_vlm
from duet_vlm.compat import with_cache

from models import FAMILIES


def _layer_inputs(model, adapter, inputs, cache):
    """Each decoder layer's (hidden states, position embeddings) in one forward on ``cache``."""
    seen = {}
    handles = [
        layer.register_forward_pre_hook(
            lambda m, a, kw, i=i: seen.__setitem__(i, (a[0] if a else kw["hidden_states"], kw["position_embeddings"])),
            with_kwargs=True,
        )
        for i, layer in enumerate(adapter.layers)
    ]
    try:
        with torch.no_grad():
            model(**inputs, **with_cache(cache), use_cache=True)
    finally:
        for handle in handles:
            handle.remove()
    return seen


def _scores(adapter, layer, hidden, rope, keys=None):
    """Attention from the last five tokens to tokens 1..8 (any fixed sets: the keys are what is compared)."""
    length = hidden.shape[1]
    queries = [torch.arange(length - 5, length)]
    visual = torch.arange(1, 9).view(1, 1, 8)
    valid = torch.ones(1, length, dtype=torch.bool)
    extra = {} if keys is None else {"layer_keys": keys}
    return adapter.scheme.text_to_visual_attention(layer, hidden, rope, queries, valid, visual, **extra)


def test_the_cached_keys_are_the_scorers_own_on_every_family(family):
    """On every family's tiny model, every attention layer whose cache holds the prompt's keys scores
    with them exactly as it scores computing them (``torch.equal``); a sliding layer whose window
    the prompt outgrows holds fewer and is not used. Catches another layer's keys (an off-by-one
    index: tiny random layers differ), keys before RoPE or before ``k_norm``, a cache read past a
    window."""
    model = family.model()
    adapter = duet_vlm.adapter_for(model)
    inputs = family.one(model)
    cache = DynamicCache(config=model.config.get_text_config())
    seen = _layer_inputs(model, adapter, inputs, cache)
    used = 0
    for index, layer in enumerate(adapter.layers):
        if adapter.scheme.kinds[index] != "attention" or index not in seen:
            continue
        hidden, rope = seen[index]
        keys = adapter.scheme.cached_layer_keys(layer, index, cache, hidden)
        window = getattr(layer.self_attn, "sliding_window", None)
        if window is not None and hidden.shape[1] > window - 1:
            assert keys is None, f"layer {index}: a sliding window's cache read as the whole prompt's"
            continue
        if getattr(model.config.get_text_config(), "num_kv_shared_layers", 0) and index >= len(adapter.layers) - 2:
            continue  # Gemma 4's shared layers store nothing of their own (no boundary lies there)
        assert keys is not None, f"layer {index}: its cache holds the prompt's keys"
        used += 1
        recomputed = _scores(adapter, layer, hidden, rope)
        assert torch.equal(_scores(adapter, layer, hidden, rope, keys), recomputed), f"layer {index}"
        # and another layer's keys would not pass for them
        other = next((j for j in seen if j != index and adapter.scheme.kinds[j] == "attention"
                      and adapter.scheme.cached_layer_keys(adapter.layers[j], j, cache, seen[j][0]) is not None), None)
        if other is not None:
            wrong = adapter.scheme.cached_layer_keys(adapter.layers[other], other, cache, seen[other][0])
            assert not torch.equal(_scores(adapter, layer, hidden, rope, wrong), recomputed)
    assert used, "no layer's cached keys were used"


def test_cached_keys_are_refused_where_they_are_not_the_prompts():
    """Two rows (a batched projection may round differently from a row's own), a cache holding an
    earlier turn's tokens too, or no cache: ``None``, and the scorer computes them."""
    family = FAMILIES["llava"]
    model = family.model()
    adapter = duet_vlm.adapter_for(model)
    layer = adapter.layers[1]
    batch = family.batch(model)
    cache = DynamicCache(config=model.config.get_text_config())
    seen = _layer_inputs(model, adapter, batch, cache)
    assert adapter.scheme.cached_layer_keys(layer, 1, cache, seen[1][0]) is None
    assert adapter.scheme.cached_layer_keys(layer, 1, cache, seen[1][0][:1]) is None  # two rows cached
    with pytest.raises(ValueError, match="one row's keys"):  # and the scorer takes them for one row only
        _scores(adapter, layer, seen[1][0], seen[1][1], keys=cache.layers[1].keys[:1])
    assert adapter.scheme.cached_layer_keys(layer, 1, None, seen[1][0][:1]) is None
    one = family.one(model)
    cache = DynamicCache(config=model.config.get_text_config())
    seen = _layer_inputs(model, adapter, one, cache)
    assert adapter.scheme.cached_layer_keys(layer, 1, cache, seen[1][0]) is not None
    with torch.no_grad():  # a second turn's tokens on the same cache
        model(input_ids=one["input_ids"][:, -3:], **with_cache(cache), use_cache=True)
    assert adapter.scheme.cached_layer_keys(layer, 1, cache, seen[1][0]) is None


def test_cached_keys_of_another_dtype_or_device_are_refused_and_the_scores_are_the_computed_ones():
    """The prompt's keys held in another dtype than the hidden states (bfloat16 or float64 for a
    float32 layer: a cache made for another precision) or on another device (``meta`` stands in for
    one): ``None``, so the scorer computes them, and its scores equal those it gives with no cache
    (bit for bit). The premise, checked here: the bfloat16 keys, used, would change the scores.
    Catches the dtype and device check dropped (keys of the right shape reused whatever they hold)."""
    family = FAMILIES["llava"]
    model = family.model()
    adapter = duet_vlm.adapter_for(model)
    layer = adapter.layers[1]
    cache = DynamicCache(config=model.config.get_text_config())
    hidden, rope = _layer_inputs(model, adapter, family.one(model), cache)[1]
    own = adapter.scheme.cached_layer_keys(layer, 1, cache, hidden)
    assert own is not None and own.dtype == hidden.dtype == torch.float32, "the premise: the cache holds the prompt's keys"
    computed = _scores(adapter, layer, hidden, rope)
    assert not torch.equal(_scores(adapter, layer, hidden, rope, own.bfloat16()), computed), \
        "the premise: bfloat16 keys give other scores"
    for other in (own.bfloat16(), own.double(), own.to("meta")):
        cache.layers[1].keys = other
        keys = adapter.scheme.cached_layer_keys(layer, 1, cache, hidden)
        assert keys is None, f"{other.dtype} keys on {other.device} reused for {hidden.dtype} states on {hidden.device}"
        assert torch.equal(_scores(adapter, layer, hidden, rope, keys), computed)


@pytest.mark.parametrize("name", ["fastv", "sparsevlm"])
def test_scoring_with_the_previous_layer_reads_its_cache_and_changes_nothing(family, name):
    """A one-row prefill under a method that scores with the layer before its boundary, with a cache
    (the keys are read from it) and without (computed): the same logits at every position and the
    same kept tokens, bit for bit; and with a cache the layer's key projection is not run again."""
    model = family.model()
    inputs = family.one(model)
    reducer = duet_vlm.make(name, ratio=0.5)
    adapter = duet_vlm.adapter_for(model)
    runs = {}
    for use_cache in (True, False):
        calls = []
        handles = [layer.self_attn.k_proj.register_forward_hook(lambda m, a, o, i=i: calls.append(i))
                   for i, layer in enumerate(adapter.layers) if hasattr(getattr(layer, "self_attn", None), "k_proj")]
        try:
            with torch.no_grad(), reducer(model):
                out = model(**inputs, use_cache=use_cache)
        finally:
            for handle in handles:
                handle.remove()
        stage_kept = reducer.stats.stage_kept
        assert stage_kept, "the method pruned nothing: the test would compare nothing"
        runs[use_cache] = (out.logits, stage_kept, calls)
    assert torch.equal(runs[True][0], runs[False][0])
    assert [layer for layer, _ in runs[True][1]] == [layer for layer, _ in runs[False][1]]
    for (_, cached), (_, computed) in zip(runs[True][1], runs[False][1]):
        assert torch.equal(cached, computed)
    if any(getattr(getattr(layer, "self_attn", None), "sliding_window", None) for layer in adapter.layers):
        # Gemma's layers before these boundaries are sliding ones whose window the prompt outgrows:
        # their cache holds the window only, and the keys are computed
        assert len(runs[True][2]) == len(runs[False][2])
    else:
        assert len(runs[True][2]) < len(runs[False][2]), "the layer before the boundary projected its keys again"


def test_a_boundary_that_keeps_nothing_scores_nothing_and_changes_nothing(monkeypatch):
    """DUET's last boundary keeps 0 of its tokens (ratios 0.5, 0.0): every token goes whatever the
    scores, so the runtime runs no stage there. The prefill's logits at every position and every
    boundary's kept tokens equal those of a run whose stage runs there too; the scorer runs at the
    first boundary only. Catches a shortcut that keeps tokens, or that skips a boundary keeping some."""
    from duet_vlm.runtime import boundary

    family = FAMILIES["llava"]
    model = family.model()
    inputs = family.batch(model)
    adapter = duet_vlm.adapter_for(model)
    scheme = adapter.scheme
    original = type(scheme).text_to_visual_attention
    runs = []
    for always_score in (False, True):
        if always_score:
            monkeypatch.setattr(boundary, "drops_all", lambda keep: False)
        calls = []
        monkeypatch.setattr(type(scheme), "text_to_visual_attention",
                            lambda self, *args, **kwargs: calls.append(1) or original(self, *args, **kwargs))
        reducer = duet_vlm.make("duet", budget=16)
        with torch.no_grad(), reducer(model):
            out = model(**inputs)
        runs.append((out.logits, reducer.stats.stage_kept, len(calls)))
    (logits, kept, scored), (logits_always, kept_always, scored_always) = runs
    assert [layer for layer, _ in kept] == [layer for layer, _ in kept_always] and len(kept) == 2
    assert kept[-1][1].shape[-1] == 0 and kept[0][1].shape[-1] > 0
    for (_, mine), (_, theirs) in zip(kept, kept_always):
        assert torch.equal(mine, theirs)
    mask = inputs["attention_mask"].bool()
    assert torch.equal(logits[mask], logits_always[mask])
    assert scored > 0 and scored_always == 2 * scored  # the first boundary's calls, then both's
