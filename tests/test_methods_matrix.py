"""Every registered method through the same checks (methods registered later join automatically).

Every method x budget: ``generate`` runs; the layer average is within 1 of the budget; the reported
``tokens_per_layer`` is what the decoder layers actually receive; each layer's KV cache holds its
prefill tokens plus the generated ones; detaching leaves no hook behind (and, checked once at the
end, the outputs bit-identical). At one budget each (to keep the file fast): a left-padded batch
decodes each row as if it ran alone; a training forward reaches the projector and the LLM; GQA.
"""

import pytest
import torch

import duet_vlm

from checks import LayerInputs, hook_ids
from models import BUDGETED, IMAGE_TOKEN, make_inputs, row

NAMES = BUDGETED  # pixelprune takes no budget: tests/test_pixelprune.py
BUDGETS = (192, 128, 64)
NEW_TOKENS = 3


def _text_tokens(inputs) -> int:
    return int((inputs["input_ids"][0] != IMAGE_TOKEN).sum())


def _expected_average(name, budget):
    return 576 if name == "full" else budget


def _skip_full(name):
    if name == "full":  # unreduced runs are the slow ones; test_baselines checks "full" is bit-identical
        pytest.skip("full is bit-identical to the unpatched model (test_full_is_bit_identical_to_no_reducer)")


@pytest.fixture(scope="module")
def plain(llava15):
    """The unpatched model's logits on one prompt (and the hook set it carries after a forward)."""
    inputs = make_inputs(llava15, seed=5)
    with torch.no_grad():
        logits = llava15(**inputs).logits
    return inputs, logits, hook_ids(llava15)


def _generate_and_count(model, reducer, inputs):
    """``generate`` under ``reducer``; returns (visual tokens each layer saw in the prefill, its stats, the output)."""
    handle = reducer.attach(model)
    probe = LayerInputs(model)
    try:
        with torch.no_grad():
            out = model.generate(
                **inputs, max_new_tokens=NEW_TOKENS, do_sample=False, return_dict_in_generate=True
            )
    finally:
        probe.remove()
        handle.remove()
    prefill = probe.calls[0]
    seen = [prefill[layer] - _text_tokens(inputs) for layer in range(len(prefill))]
    return seen, reducer.stats, out


def _check_cache(out, inputs, seen):
    generated = out.sequences.shape[1] - inputs["input_ids"].shape[1]
    assert generated >= 1
    for layer, visual in enumerate(seen):
        prefill = _text_tokens(inputs) + visual
        assert out.past_key_values.layers[layer].keys.shape[-2] == prefill + generated - 1, f"layer {layer}"


@pytest.mark.parametrize("budget", BUDGETS)
@pytest.mark.parametrize("name", NAMES)
def test_counts_cache_and_detach(llava15, plain, name, budget):
    if name == "full" and budget != BUDGETS[-1]:
        pytest.skip("full ignores the budget")
    inputs, _, hooks_before = plain
    reducer = duet_vlm.make(name, budget=budget)
    seen, stats, out = _generate_and_count(llava15, reducer, inputs)

    assert abs(stats.average_tokens - _expected_average(name, budget)) <= 1
    assert stats.tokens_per_layer == seen
    assert stats.llm_input_tokens == seen[0]
    assert 0 < stats.flops_exact <= stats.flops_exact_full and 0 < stats.kv_bytes <= stats.kv_bytes_full
    if name != "full":
        assert stats.flops_exact < stats.flops_exact_full
    _check_cache(out, inputs, seen)

    assert hook_ids(llava15) == hooks_before


@pytest.mark.parametrize("budget", [128])
@pytest.mark.parametrize("name", NAMES)
def test_left_padded_batch_equals_rows_alone(llava15, name, budget):
    """Each row of a left-padded batch gets the prefill logits (at every valid position, within 1e-4)
    and the greedy tokens it gets alone. Catches padding that leaks into a row's selection, mask,
    positions or scatter-back, including differences too small to flip 3 greedy tokens."""
    _skip_full(name)
    inputs = make_inputs(llava15, batch=2, suffix=(12, 7))
    reducer = duet_vlm.make(name, budget=budget)
    kwargs = dict(max_new_tokens=NEW_TOKENS, do_sample=False)
    with torch.no_grad(), reducer(llava15):
        batch_logits = llava15(**inputs).logits
        batch = llava15.generate(**inputs, **kwargs)[:, inputs["input_ids"].shape[1] :]
        for b in range(2):
            alone = row(inputs, b)
            single_logits = llava15(**alone).logits[0]
            valid = inputs["attention_mask"][b].bool()
            torch.testing.assert_close(batch_logits[b, -1], single_logits[-1], atol=1e-4, rtol=1e-4, msg=f"row {b}, last")
            torch.testing.assert_close(batch_logits[b, valid], single_logits, atol=1e-4, rtol=1e-4, msg=f"row {b}")
            single = llava15.generate(**alone, **kwargs)[0, alone["input_ids"].shape[1] :]
            assert batch[b, : len(single)].tolist() == single.tolist(), f"row {b}"


@pytest.mark.parametrize("budget", [64])
@pytest.mark.parametrize("name", NAMES)
def test_training_forward_reaches_projector_and_llm(llava15, name, budget):
    _skip_full(name)
    inputs = make_inputs(llava15, batch=2, suffix=(12, 7), seed=4)
    labels = inputs["input_ids"].masked_fill(
        (inputs["input_ids"] == IMAGE_TOKEN) | (inputs["attention_mask"] == 0), -100
    )
    reducer = duet_vlm.make(name, budget=budget)
    parameters = {
        "projector": llava15.model.multi_modal_projector.linear_1.weight,
        "first layer": llava15.model.language_model.layers[0].self_attn.q_proj.weight,
        "last layer": llava15.model.language_model.layers[-1].mlp.down_proj.weight,
    }
    llava15.zero_grad(set_to_none=True)
    try:
        with reducer(llava15):
            loss = llava15(**inputs, labels=labels).loss
        assert torch.isfinite(loss)
        loss.backward()
        for part, parameter in parameters.items():
            assert parameter.grad is not None and parameter.grad.abs().sum() > 0, part
    finally:
        llava15.zero_grad(set_to_none=True)
    assert abs(reducer.stats.average_tokens - _expected_average(name, budget)) <= 1


@pytest.mark.parametrize("name", NAMES)
def test_grouped_query_attention(llava15_gqa, name):
    _skip_full(name)
    inputs = make_inputs(llava15_gqa, seed=6)
    reducer = duet_vlm.make(name, budget=128)
    seen, stats, out = _generate_and_count(llava15_gqa, reducer, inputs)
    assert abs(stats.average_tokens - _expected_average(name, 128)) <= 1
    assert stats.tokens_per_layer == seen
    _check_cache(out, inputs, seen)


def test_model_unchanged_after_the_matrix(llava15, plain):
    """After every method above attached and detached, the model computes exactly what it did before.

    (Each case already checks that its hooks are gone; one unreduced forward here covers any other
    state a method could leave behind, at the cost of one slow forward instead of one per method.)
    """
    inputs, plain_logits, hooks_before = plain
    assert hook_ids(llava15) == hooks_before
    with torch.no_grad():
        assert torch.equal(llava15(**inputs).logits, plain_logits)
