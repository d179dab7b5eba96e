"""The invariant matrix: every registered method x every family and tower variant (tests/models.py).

Nothing here names a method or a family: a method joins by ``register_method``, a family by an
entry in ``models.FAMILIES`` (and an adapter without one fails ``test_every_adapter_and_tower_has_a_factory``).
A family known to fail is marked strict xfail, with the reason, in its ``models.FAMILIES`` entry
(``known_failure``).

Invariants, on tiny models of the real transformers classes:
- ``full`` is bit-identical to no reducer; after any method attached and detached, the hooks are
  the ones before and the logits bit-identical to the unpatched model's;
- ``generate`` under ``make(name, ratio=0.5)``, on one item and on each row of the batch alone: the
  visual tokens each decoder layer receives are the items' ``tokens_per_layer`` (each item keeps
  about half), and each layer's KV cache holds its prefill plus the generated tokens;
- a left-padded batch equals each row run alone: logits at every valid position (within 1e-4) and
  greedy tokens;
- a training forward: the batch loss is the row losses combined as the model combines them (the
  mean over every labelled token, within 1e-5 relative), and gradients reach the projector (or the
  merger) and the first and last decoder layers;
- ``from_dict(reducer.to_dict()) == reducer``, for the budget and the ratio forms, through JSON too;
- budgets per row (``reducer.per_row(budget=[...])``): a left-padded batch whose rows have
  different budgets equals each row alone with its budget (logits at every valid position, greedy
  tokens), each item's counts are the ones it gets alone, and each decoder layer receives the
  longest row's text plus its items' tokens;
- content-adaptive budgets (``Adaptive`` over the method, calibrated): the batch equals its rows
  (logits), each item's average lies within the floor and the ceiling, each layer receives what the
  stats say, the hooks are the ones before, and the record rebuilds an equal reducer.
"""

import functools
import json

import pytest
import torch

import duet_vlm
from duet_vlm.adapters import ADAPTERS
from duet_vlm.content import SIGNALS

from models import BUDGETED, FAMILIES
from checks import LayerInputs, generate_and_check_counts, hook_ids

pytestmark = pytest.mark.matrix  # CI's own step (`pytest -m matrix`); `pytest` alone leaves it out

NAMES = BUDGETED  # pixelprune takes no budget: tests/test_pixelprune.py
NEW_TOKENS = 3


@functools.cache
def _unpatched(name: str):
    """The unpatched model's logits on its family's batch and its hooks, at first use in the session."""
    family = FAMILIES[name]
    model = family.model()
    with torch.no_grad():
        return model(**family.batch(model)).logits, hook_ids(model)


def _visual(model, input_ids: torch.Tensor) -> torch.Tensor:
    """Where the placeholders of images and videos are, by the ids the model's config names."""
    ids = [getattr(model.config, key, None) for key in ("image_token_id", "video_token_id")]
    return sum((input_ids == i) for i in ids if i is not None).bool()


def _labels(model, inputs) -> torch.Tensor:
    """The prompt as its own labels, visual placeholders and padding left out, and each row's first
    token (in a left-padded row the padding before it would predict it)."""
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    return ids.masked_fill(_visual(model, ids) | (mask == 0) | (mask.cumsum(-1) == 1), -100)


def _tower(adapter, vision_type: str) -> str:
    """The tower variant a vision ``model_type`` names: CLIP or SigLIP, or a Qwen-VL model's own
    tower (adapters accept it as ``<model_type>`` or ``<model_type>_vision``: one variant)."""
    return "own" if vision_type.removesuffix("_vision") in adapter.model_types else vision_type


# ----------------------------------------------------------------------------- the axis itself
def test_every_adapter_and_tower_has_a_factory():
    """Every adapter, with every vision tower it accepts, has a tiny model in ``models.FAMILIES``,
    named after the adapter's family (``<family>`` or ``<family>-<tower>``)."""
    covered = {}
    for name, family in FAMILIES.items():
        model = family.build()
        (adapter,) = [a for a in ADAPTERS if a.matches(model)]
        assert type(model).__name__ in adapter.supported_classes, name
        assert name.split("-")[0] == adapter.family, name
        covered[adapter, _tower(adapter, model.config.vision_config.model_type)] = name
    wanted = {(adapter, _tower(adapter, kind)) for adapter in ADAPTERS for kind in adapter.vision_model_types}
    missing = sorted(f"{adapter.__name__} with a {tower} tower" for adapter, tower in wanted - covered.keys())
    assert not missing, f"no tiny model in tests/models.py FAMILIES for: {', '.join(missing)}"


# ----------------------------------------------------------------------------- no-op and restore
def test_full_is_bit_identical(family):
    model = family.model()
    plain, _ = _unpatched(family.name)
    with torch.no_grad(), duet_vlm.make("full")(model):
        reduced = model(**family.batch(model)).logits
    assert torch.equal(reduced, plain)


@pytest.mark.parametrize("name", NAMES)
def test_layer_counts_cache_and_restore(family, name):
    """``generate`` on one item, and on each row of the batch alone (rows with several items, of
    several kinds): each layer's visual tokens are the stats', each layer's KV cache its prefill plus
    the generated tokens; afterwards the hooks are the ones before and the model's logits
    bit-identical to the unpatched model's."""
    model = family.model()
    plain, hooks = _unpatched(family.name)
    batch = family.batch(model)
    for inputs in (family.one(model), family.row(batch, 0), family.row(batch, 1)):
        generate_and_check_counts(model, name, inputs)  # also: no hook left behind
    assert hook_ids(model) == hooks
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, plain)


# ----------------------------------------------------------------------------- batches
@pytest.mark.parametrize("name", NAMES)
def test_padded_batch_equals_rows_alone(family, name):
    """Each row of a left-padded batch (rows of different lengths and items) gets, at every valid
    position, the logits it gets alone, and the same greedy tokens. Catches padding that leaks into
    a row's selection, mask, positions or scatter-back, and one row's items read for another's."""
    model = family.model()
    inputs = family.batch(model)
    kwargs = dict(max_new_tokens=NEW_TOKENS, do_sample=False)
    with torch.no_grad(), duet_vlm.make(name, ratio=0.5)(model):
        logits = model(**inputs).logits
        tokens = model.generate(**inputs, **kwargs)[:, inputs["input_ids"].shape[1] :]
        for b in range(len(logits)):
            alone = family.row(inputs, b)
            valid = inputs["attention_mask"][b].bool()
            torch.testing.assert_close(logits[b, valid], model(**alone).logits[0], atol=1e-4, rtol=1e-4,
                                       msg=lambda m: f"row {b}: {m}")
            single = model.generate(**alone, **kwargs)[0, alone["input_ids"].shape[1] :]
            assert tokens[b, : len(single)].tolist() == single.tolist(), f"row {b}"


@pytest.mark.parametrize("name", NAMES)
def test_training_forward_equals_rows_and_reaches_projector_and_llm(family, name):
    """With labels, the batch's loss is the mean over every labelled token of the batch, i.e. the
    rows' own losses weighted by their labelled tokens; backward reaches the projector (Qwen-VL: the
    merger) and the first and last decoder layers."""
    model = family.model()
    inputs = family.batch(model)
    labels = _labels(model, inputs)
    adapter = duet_vlm.adapter_for(model)
    parts = {
        "projector": list(adapter.projector.parameters()),
        "first layer": list(adapter.layers[0].parameters()),
        "last layer": list(adapter.layers[-1].parameters()),
    }
    model.zero_grad(set_to_none=True)
    try:
        with duet_vlm.make(name, ratio=0.5)(model):
            loss = model(**inputs, labels=labels).loss
            rows, weights = [], []
            with torch.no_grad():
                for b in range(len(labels)):
                    alone = family.row(inputs, b)
                    row_labels = _labels(model, alone)
                    rows.append(model(**alone, labels=row_labels).loss)
                    weights.append(int((row_labels[:, 1:] != -100).sum()))  # the tokens each row predicts
        assert torch.isfinite(loss)
        expected = sum(w * r for w, r in zip(weights, rows)) / sum(weights)
        torch.testing.assert_close(loss.detach(), expected, rtol=1e-5, atol=0)
        loss.backward()
        for part, parameters in parts.items():
            assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in parameters), f"no gradient reaches the {part}"
    finally:
        model.zero_grad(set_to_none=True)


# ----------------------------------------------------------------------------- records
@pytest.mark.parametrize("form", [dict(budget=64), dict(ratio=0.5)], ids=["budget", "ratio"])
@pytest.mark.parametrize("name", NAMES)
def test_records_rebuild_an_equal_reducer(name, form):
    reducer = duet_vlm.make(name, **form)
    record = reducer.to_dict()
    assert duet_vlm.from_dict(record) == reducer
    assert duet_vlm.from_dict(json.loads(json.dumps(record))) == reducer


# ----------------------------------------------------------------------------- budgets per row and per item
ROW_RATIOS = (0.4, 0.5)  # each row's share of its items' tokens (every method reaches both on every family)
ADAPTIVE_RANGE = (0.8, 1.0)  # the floor and ceiling around an average of half the tokens: within ROW_RATIOS


def _check_batch_counts(probe, stats, length: int) -> None:
    """Each decoder layer's input is the padded batch (``length`` tokens) less the tokens the row
    that dropped fewest dropped from its items by that layer (``stats.items``): rows are compacted
    and left-padded to the longest."""
    seen = [length for _, length in sorted(probe.calls[0].items())]
    rows = range(len(stats.text_tokens))
    expected = [
        length - min(sum(i.tokens - i.tokens_per_layer[layer] for i in stats.items if i.row == b) for b in rows)
        for layer in range(len(seen))
    ]
    assert seen == expected


def _rows_alone(model, family, inputs, logits, reducers, kwargs=None, tokens=None):
    """Each row of ``inputs`` run alone under its own reducer: the batch's ``logits`` at the row's
    valid positions (and its greedy ``tokens``, when given); returns the rows' item stats."""
    items = []
    for b, reducer in enumerate(reducers):
        alone = family.row(inputs, b)
        valid = inputs["attention_mask"][b].bool()
        with torch.no_grad(), reducer(model):
            torch.testing.assert_close(logits[b, valid], model(**alone).logits[0], atol=1e-4, rtol=1e-4,
                                       msg=lambda m: f"row {b}: {m}")
            items += reducer.stats.items
            if tokens is not None:
                single = model.generate(**alone, **kwargs)[0, alone["input_ids"].shape[1] :]
                assert tokens[b, : len(single)].tolist() == single.tolist(), f"row {b}"
    return items


@pytest.mark.parametrize("name", NAMES)
def test_per_row_budgets_equal_rows_alone(family, name):
    """``reducer.per_row(ratio=[...])``: a left-padded batch whose rows have different budgets equals
    each row run alone with its own (logits at every valid position, greedy tokens); each item's
    counts in the batch's stats are the ones it gets alone, and each decoder layer receives what the
    stats say. (Ratios, so that rows holding items of several sizes stay in every method's range;
    budgets per row take the same path: test_per_row_absolute_budgets.)"""
    if name == "full":
        pytest.skip("full has no budget to give per row (test_per_row_refusals)")
    model = family.model()
    inputs = family.batch(model)
    kwargs = dict(max_new_tokens=NEW_TOKENS, do_sample=False)
    reducer = duet_vlm.make(name, ratio=0.5)
    with torch.no_grad(), reducer(model), reducer.per_row(ratio=list(ROW_RATIOS)):
        probe = LayerInputs(model)
        try:
            logits = model(**inputs).logits
        finally:
            probe.remove()
        stats = reducer.stats
        tokens = model.generate(**inputs, **kwargs)[:, inputs["input_ids"].shape[1] :]
    _check_batch_counts(probe, stats, inputs["input_ids"].shape[1])
    alone = [duet_vlm.make(name, ratio=r) for r in ROW_RATIOS]
    items = _rows_alone(model, family, inputs, logits, alone, kwargs, tokens)
    assert [i.tokens_per_layer for i in stats.items] == [i.tokens_per_layer for i in items]


@pytest.mark.parametrize("name", NAMES)
def test_adaptive_batch_equals_rows_alone(family, name):
    """``Adaptive`` over the method (a signal per method, in turn), calibrated on the family's one-item
    prompt: a left-padded batch equals each row alone (logits at every valid position); each item's
    average lies within the floor and the ceiling (within a frame count); each decoder layer receives
    what the stats say; the reducer's record rebuilds it."""
    if name == "full":
        pytest.skip("full has no budget to adapt (test_adaptive_refusals)")
    model = family.model()
    inputs = family.batch(model)
    signal = SIGNALS[NAMES.index(name) % len(SIGNALS)]
    adaptive = duet_vlm.Adaptive(duet_vlm.make(name, ratio=0.5), signal=signal, floor=ADAPTIVE_RANGE[0],
                                 ceiling=ADAPTIVE_RANGE[1])
    adaptive = adaptive.calibrate(model, [family.one(model)])
    assert adaptive.threshold is not None
    assert duet_vlm.from_dict(json.loads(json.dumps(adaptive.to_dict()))) == adaptive
    hooks = hook_ids(model)
    with torch.no_grad(), adaptive(model):
        probe = LayerInputs(model)
        try:
            logits = model(**inputs).logits
        finally:
            probe.remove()
        stats = adaptive.stats
    assert hook_ids(model) == hooks
    _check_batch_counts(probe, stats, inputs["input_ids"].shape[1])
    for item in stats.items:
        average = round(0.5 * item.tokens)
        low, high = max(1, round(ADAPTIVE_RANGE[0] * average)), min(round(ADAPTIVE_RANGE[1] * average), item.tokens)
        assert low - item.units <= item.average_tokens <= high + item.units, (item.modality, item.tokens, item.tokens_per_layer)
    items = _rows_alone(model, family, inputs, logits, [adaptive, adaptive])
    assert [i.tokens_per_layer for i in stats.items] == [i.tokens_per_layer for i in items]
