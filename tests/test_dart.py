"""DART (methods/dart.py): the recorded outputs of the official code replay (tests/data/vectors/
dart-official-*, README there), the selection rule equals a deliberately naive implementation of its
definition, the budget solver's numbers, clear errors, and the method end to end on LLaVA-1.5."""

import json

import pytest
import torch
import torch.nn.functional as F
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

import duet_vlm
from duet_vlm import Compose, Geometry, make
from duet_vlm.methods.dart import DART, DuplicationPrune, dart_select, duplication_select, pivot_quotas

from checks import assert_replays_recorded_run, layer_calls
from models import IMAGE_TOKEN, make_inputs, make_llava, row

LLAVA15 = Geometry(num_layers=32, visual_tokens=576, grid=(24, 24), has_cls=True)
START, N_IMAGE = 5, 576  # the recorded prompt: 5 prefix ids, 576 image tokens, 12 suffix ids
# Recorded configuration -> the same selection here: the official code keeps 4 + 8 * TOKEN_TOPK.
OFFICIAL_KEEP = {"128": 132, "64": 68, "ratio": 124}


# ----------------------------------------------------------------------------- the naive reference
def naive_dart(image_keys, image_states, text_keys, text_states, keep, image_pivots, text_pivots):
    """One item, in plain Python and float64, straight from the definition (official
    ``get_retained_image_token`` with the pivots visited in listed order and quotas shared evenly).
    Returns the kept indices and the smallest gap at any decision (pivot ranks, quota cut-offs)."""
    n = len(image_keys)
    if keep == n:
        return list(range(n)), float("inf")
    gaps = []

    def ranked(values, count):
        order = sorted(range(len(values)), key=lambda i: -values[i])
        if 0 < count < len(values):
            gaps.append(values[order[count - 1]] - values[order[count]])
        return order[:count]

    norms = [sum(abs(x) for x in key) for key in image_keys.double().tolist()]
    image_pivot = ranked(norms, min(image_pivots, keep))
    text_norms = [sum(abs(x) for x in key) for key in text_keys.double().tolist()]
    text_pivot = ranked(text_norms, min(text_pivots, len(text_norms))) if keep > len(image_pivot) else []
    pivots = [image_states[i] for i in image_pivot] + [text_states[i] for i in text_pivot]
    rest = keep - len(image_pivot)
    quotas = [rest // len(pivots) + (j < rest % len(pivots)) for j in range(len(pivots))]
    kept, remaining = set(image_pivot), [i for i in range(n) if i not in image_pivot]
    for pivot, quota in zip(pivots, quotas):
        cos = {i: F.cosine_similarity(pivot.double(), image_states[i].double(), dim=0).item() for i in remaining}
        order = sorted(remaining, key=lambda i: cos[i])
        if 0 < quota < len(order):
            gaps.append(cos[order[quota]] - cos[order[quota - 1]])
        kept.update(order[:quota])
        remaining = [i for i in remaining if i not in order[:quota]]
    return sorted(kept), min(gaps, default=float("inf"))


@st.composite
def problems(draw):
    batch, items = draw(st.integers(1, 3)), draw(st.integers(1, 2))
    n = draw(st.integers(1, 30))
    texts = draw(st.lists(st.integers(0, 7), min_size=batch, max_size=batch))
    keep = draw(st.integers(0, n))
    image_pivots, text_pivots = draw(st.integers(1, 5)), draw(st.integers(0, 5))
    seed = draw(st.integers(0, 2**16))
    return batch, items, n, texts, keep, image_pivots, text_pivots, seed


@settings(max_examples=150, deadline=None)
@given(problems())
def test_selection_equals_the_naive_definition(problem):
    """Every item of a padded batch (rows with different numbers of text tokens, several items per
    row) keeps what the naive one-item reference keeps."""
    batch, items, n, texts, keep, image_pivots, text_pivots, seed = problem
    generator = torch.Generator().manual_seed(seed)
    width = max(texts)
    image_keys = torch.randn(batch, items, n, 6, generator=generator)
    image_states = torch.randn(batch, items, n, 5, generator=generator)
    text_keys = torch.randn(batch, width, 6, generator=generator)
    text_states = torch.randn(batch, width, 5, generator=generator)
    text_valid = torch.arange(width)[None] < torch.tensor(texts)[:, None]
    got = dart_select(image_keys, image_states, text_keys, text_states, text_valid, keep, image_pivots, text_pivots)
    assert got.shape == (batch, items, keep)
    for b in range(batch):
        for i in range(items):
            t = texts[b]
            expected, gap = naive_dart(
                image_keys[b, i], image_states[b, i], text_keys[b, :t], text_states[b, :t], keep, image_pivots,
                text_pivots,
            )
            assume(gap > 1e-4)  # closer decisions may flip between float32 and float64
            assert got[b, i].tolist() == expected


def test_quotas_share_the_rest_evenly():
    assert pivot_quotas(166, 4, torch.tensor([4])).tolist() == [[21, 21, 20, 20, 20, 20, 20, 20]]
    assert pivot_quotas(98, 4, torch.tensor([4])).tolist() == [[12] * 6 + [11] * 2]
    assert pivot_quotas(132, 4, torch.tensor([4, 0])).tolist() == [[16] * 8, [32] * 4 + [0] * 4]


def test_duplicates_of_a_pivot_go_first():
    """A hand example: the image pivot (largest key norm) stays, its near-copies go, the tokens least
    like it are kept."""
    states = torch.tensor([[1.0, 0.0], [0.99, 0.05], [0.98, -0.05], [0.0, 1.0], [-1.0, 0.1]])
    keys = torch.tensor([[5.0], [1.0], [1.0], [1.0], [1.0]])
    no_text = torch.zeros(1, 0, 1), torch.zeros(1, 0, 2), torch.zeros(1, 0, dtype=torch.bool)
    kept = dart_select(keys[None, None], states[None, None], *no_text, keep=3, image_pivots=1)
    assert kept.tolist() == [[[0, 3, 4]]]
    taken = duplication_select(states, states[:1], torch.tensor([False, True, True, True, True]), torch.tensor([1]))
    assert taken.tolist() == [False, False, False, False, True]


# ----------------------------------------------------------------------------- the official code's outputs
# ``official``: (model, input_ids, pixel_values, reference_dir) of the recorded runs (tests/conftest.py).


def _expected(reference_dir, name):
    return json.loads((reference_dir / f"dart-official-{name}.json").read_text())


class _RecordingStage(DuplicationPrune):
    def select(self, view, keep):
        self.log.append((view.keys(previous_layer=True).abs().sum(-1)[0], view.final_norm(view.hidden_states)[0]))
        return super().select(view, keep)


class _Recording(DART):
    def language_stage(self):
        stage = _RecordingStage(self.image_pivots, self.text_pivots)
        stage.log = self.log
        return stage


@pytest.mark.parametrize("name", ["128", "64", "ratio"])
def test_replays_the_official_run(official, name):
    """With the pivots visited in listed order, everything replays: the pivot signals, the kept
    tokens, each layer's length and positions in the prefill and at every decoding step, every
    logit (atol 1e-4) and the greedy tokens."""
    model, input_ids, pixel_values, reference_dir = official
    expected = _expected(reference_dir, f"{name}-ordered")
    tensors = load_file(reference_dir / f"dart-official-{name}-ordered.safetensors")
    signals = load_file(reference_dir / "dart-official-signals.safetensors")
    reducer = _Recording(keep=OFFICIAL_KEEP[name])
    reducer.log = []
    layers = model.model.language_model.layers
    with torch.no_grad(), reducer(model), layer_calls(layers) as seen:
        logits = model(input_ids=input_ids, pixel_values=pixel_values).logits[0, -1]
        prefill = list(seen)
        kept = reducer.stats.stage_kept[0][1][0, 0].tolist()
        seen.clear()
        generated = model.generate(
            input_ids=input_ids, pixel_values=pixel_values, max_new_tokens=5, do_sample=False,
            output_scores=True, return_dict_in_generate=True,
        )
    norms, states = reducer.log[0]
    torch.testing.assert_close(norms, signals["key_l1_norm"], atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(states, signals["layer2_input_normed"], atol=1e-4, rtol=1e-5)
    assert kept == expected["kept_rel_sorted"] and len(kept) == expected["n_kept"] == OFFICIAL_KEEP[name]
    assert_replays_recorded_run(expected, tensors, input_ids, logits, prefill, seen, generated, len(layers))


@pytest.mark.parametrize("name", ["128", "64"])
def test_the_released_pivot_order_replays_through_the_selection_rule(reference_dir, name):
    """On the official layer-2 signals, ``dart_select`` keeps what the listed-order run kept, and the
    same greedy rule with the pivots in the released code's set order keeps what it kept."""
    signals = load_file(reference_dir / "dart-official-signals.safetensors")
    norms, states = signals["key_l1_norm"], signals["layer2_input_normed"]
    image, text = slice(START, START + N_IMAGE), slice(START + N_IMAGE, None)
    ordered, released = _expected(reference_dir, f"{name}-ordered"), _expected(reference_dir, f"{name}-set")
    keep = OFFICIAL_KEEP[name]
    kept = dart_select(
        norms[None, None, image, None], states[None, None, image], norms[None, text, None], states[None, text],
        torch.ones(1, len(states) - START - N_IMAGE, dtype=torch.bool), keep,
    )
    assert kept[0, 0].tolist() == ordered["kept_rel_sorted"]
    assert ordered["pivot_order_pos"] == [START + p for p in ordered["image_pivots_rel"]] + ordered["text_pivots_pos"]

    order = torch.tensor(released["pivot_order_pos"])
    assert sorted(order.tolist()) == sorted(ordered["pivot_order_pos"]) and order.tolist() != ordered["pivot_order_pos"]
    is_pivot = torch.zeros(N_IMAGE, dtype=torch.bool)
    is_pivot[torch.tensor(released["image_pivots_rel"])] = True
    quotas = torch.full((len(order),), released["token_topk"])
    taken = duplication_select(states[image], states[order], ~is_pivot, quotas)
    assert (is_pivot | taken).nonzero()[:, 0].tolist() == released["kept_rel_sorted"]
    assert released["kept_rel_sorted"] != ordered["kept_rel_sorted"]  # the order matters here


# ----------------------------------------------------------------------------- budget and options
@pytest.mark.parametrize("budget, keep, quotas", [
    (192, 166, [21, 21] + [20] * 6), (128, 98, [12] * 6 + [11] * 2), (64, 30, [4, 4] + [3] * 6),
])
def test_solver_numbers(budget, keep, quotas):
    schedule = DART(budget=budget).plan(LLAVA15).schedule
    assert schedule.boundaries == ((2, keep),) and schedule.llm_input == 576
    assert abs(schedule.average - budget) <= 1
    assert pivot_quotas(keep, 4, torch.tensor([4]))[0].tolist() == quotas


def test_every_reachable_budget_is_met_within_one_token():
    for budget in range(37, 576):
        assert abs(DART(budget=budget).plan(LLAVA15).schedule.average - budget) <= 1, budget


def test_explicit_parameters_override_the_solver():
    assert DART(keep=132).plan(LLAVA15).schedule.boundaries == ((2, 132),)
    assert DART(budget=64, keep=132).plan(LLAVA15).schedule.boundaries == ((2, 132),)
    assert DART(ratio=0.222).plan(LLAVA15).schedule.boundaries == ((2, 127),)
    assert DART(budget=64, layer=3).plan(LLAVA15).schedule.boundaries == ((3, 11),)
    assert DART(budget=64).resolve(LLAVA15).positions == "original"


def test_compose_after_a_vision_method():
    """Inside a Compose the official ratio (keep 22.2% of what enters) fixes the shape and the
    input count is solved; an explicit keep or ratio replaces it."""
    plan = Compose(make("visionzip"), DART(), budget=64).plan(LLAVA15)
    (layer, keep), = plan.schedule.boundaries
    assert layer == 2 and keep == int(plan.schedule.llm_input * (1 - 0.778))
    assert abs(plan.schedule.average - 64) <= 1 and isinstance(plan.language, DuplicationPrune)
    plan = Compose(make("visionzip"), DART(ratio=0.5), budget=128).plan(LLAVA15)
    assert plan.schedule.boundaries[0][1] == plan.schedule.llm_input // 2 and abs(plan.schedule.average - 128) <= 1


@pytest.mark.parametrize("options, message", [
    (dict(layer=0), "layer must be an int >= 1"),
    (dict(layer=True), "layer must be an int >= 1"),
    (dict(image_pivots=0), "image_pivots must be an int >= 1"),
    (dict(text_pivots=-1), "text_pivots must be an int >= 0"),
    (dict(keep=-1), "keep must be an int >= 0"),
    (dict(keep=2.5), "keep must be an int >= 0"),
    (dict(ratio=1.5), "ratio must lie in"),
    (dict(keep=10, ratio=0.5), "keep or ratio, not both"),
    (dict(budget=0), "budget must be a positive int"),
])
def test_bad_options_are_refused(options, message):
    with pytest.raises(ValueError, match=message):
        DART(**options)


@pytest.mark.parametrize("options, message", [
    (dict(), "DART needs a budget"),
    (dict(budget=64, layer=32), "layer=32 but the language model has 32 layers"),
    (dict(budget=64, layer=16), "DART after layer 16 cannot average 64 .* first 16 layers alone give 288.0"),
    (dict(keep=600), "keep=600 exceeds the 576 visual tokens"),
])
def test_impossible_plans_are_refused(options, message):
    with pytest.raises(ValueError, match=message):
        DART(**options).plan(LLAVA15)


def test_registered_and_recorded():
    assert duet_vlm.METHODS["dart"] is DART
    for reducer in (make("dart", budget=64), make("dart", ratio=0.25, text_pivots=2), DART(keep=132, layer=3)):
        assert duet_vlm.from_dict(json.loads(json.dumps(reducer.to_dict()))) == reducer


# ----------------------------------------------------------------------------- end to end on LLaVA-1.5
def _counts(model, reducer, inputs, images_per_row=1):
    """Visual tokens each decoder layer receives in a prefill, and each layer's KV length after it."""
    text = int(inputs["input_ids"].shape[1] - (inputs["input_ids"] == IMAGE_TOKEN).sum(1)[0])
    seen = []

    def hook(module, args, kwargs):
        seen.append((args[0] if args else kwargs["hidden_states"]).shape[1])

    layers = model.model.language_model.layers
    with torch.no_grad(), reducer(model):
        handles = [layer.register_forward_pre_hook(hook, with_kwargs=True) for layer in layers]
        try:
            out = model(**inputs, use_cache=True)
        finally:
            for handle in handles:
                handle.remove()
    kv = [layer.keys.shape[2] - text for layer in out.past_key_values.layers]
    return [(n - text) // images_per_row for n in seen], [n // images_per_row for n in kv]


@pytest.mark.parametrize("budget", [192, 128, 64])
def test_layers_see_the_schedule(llava15, budget):
    inputs = make_inputs(llava15, batch=2, suffix=(12, 9))
    reducer = DART(budget=budget)
    seen, kv = _counts(llava15, reducer, inputs)
    assert seen == kv == reducer.stats.tokens_per_layer == reducer.plan(LLAVA15).schedule.tokens_per_layer
    assert abs(reducer.stats.average_tokens - budget) <= 1


def test_padded_batch_equals_rows_even_with_fewer_text_pivots(llava15):
    """Row 1 has two instruction tokens (two text pivots; the others take their share) and is
    left-padded, numbered from the padding in a forward (the key norms are taken as the row alone
    rotates them): the batch keeps, scores and generates what each row alone does."""
    inputs = make_inputs(llava15, batch=2, suffix=(12, 2), seed=3)
    reducer = DART(budget=64)
    new = 3
    with torch.no_grad(), reducer(llava15):
        logits = llava15(**inputs).logits
        forward_kept = reducer.stats.stage_kept[0][1]
        batch = llava15.generate(**inputs, max_new_tokens=new, do_sample=False)
        batch_kept = reducer.stats.stage_kept[0][1]
        for b in range(2):
            alone, valid = row(inputs, b), inputs["attention_mask"][b].bool()
            torch.testing.assert_close(logits[b, valid], llava15(**alone).logits[0], atol=1e-4, rtol=1e-4)
            assert reducer.stats.stage_kept[0][1][0].tolist() == forward_kept[b].tolist() == batch_kept[b].tolist()
            single = llava15.generate(**alone, max_new_tokens=new, do_sample=False)
            assert single[0, -new:].tolist() == batch[b, -new:].tolist()
    assert batch_kept.shape == (2, 1, 30)


def test_two_images_per_row_and_grouped_query_keys(llava15_gqa):
    inputs = make_inputs(llava15_gqa, images_per_row=2, suffix=8)
    reducer = DART(budget=128)
    seen, kv = _counts(llava15_gqa, reducer, inputs, images_per_row=2)
    assert seen == kv == reducer.stats.tokens_per_layer and reducer.stats.stage_kept[0][1].shape == (1, 2, 98)


def test_after_visionzip(llava15):
    inputs = make_inputs(llava15, batch=2, suffix=(12, 9), seed=1)
    reducer = Compose(make("visionzip"), DART(), budget=64)
    seen, kv = _counts(llava15, reducer, inputs)
    assert seen == kv == reducer.stats.tokens_per_layer == reducer.plan(LLAVA15).schedule.tokens_per_layer


def test_training_forward_reaches_the_projector():
    model = make_llava(layers=4, image_size=112, seed=5).train()  # 64 patches
    inputs = make_inputs(model, batch=2, suffix=(6, 4), seed=2)
    ignored = (inputs["attention_mask"] == 0) | (inputs["input_ids"] == IMAGE_TOKEN)
    labels = inputs["input_ids"].masked_fill(ignored, -100)
    with DART(keep=16)(model):
        loss = model(**inputs, labels=labels).loss
    loss.backward()
    assert torch.isfinite(loss)
    assert model.model.multi_modal_projector.linear_1.weight.grad.abs().sum() > 0
