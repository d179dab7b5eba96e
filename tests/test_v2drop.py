"""V2Drop (methods/v2drop.py): the recorded outputs of the official code replay (tests/data/vectors/
v2drop-official-*, README there), the score equals a deliberately naive one from its definition, the
budget solver's numbers and its floor, clear errors, Compose, and the method on a hybrid model."""

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

from duet_vlm import Compose, Geometry, make
from duet_vlm.methods.v2drop import HiddenStateChange, V2Drop, v2drop_counts, v2drop_schedule

from checks import assert_replays_recorded_run, layer_calls

LLAVA15 = Geometry(num_layers=32, visual_tokens=576, grid=(24, 24), has_cls=True)


def naive_change(current, previous):
    """Each token's change, in plain Python and float64: sqrt(sum((h(l) - h(l-1))^2))."""
    return [sum((a - b) ** 2 for a, b in zip(x, y)) ** 0.5 for x, y in zip(current.double().tolist(), previous.double().tolist())]


class _RecordingStage(HiddenStateChange):
    def score(self, view):
        scores = super().score(view)
        index = view.visual_index[0, 0]
        self.log.append((view.layer_index, scores[0, 0], view.hidden_states[0, index], view.previous_hidden_states[0, index]))
        return scores


class _Recording(V2Drop):
    def language_stage(self):
        stage = _RecordingStage()
        stage.log = self.log
        return stage


@pytest.fixture(scope="module")
def v2drop_recorded(official_model, reference_dir):
    """``(model, input_ids, pixel_values, reference_dir)`` of the official V2Drop runs: the tiny
    LLaVA-1.5 of the DUET vectors, 35 prompt ids, the 576 image placeholders (999), 12 more."""
    sample = json.loads((reference_dir / "v2drop-official-inputs.json").read_text())
    input_ids = torch.tensor([sample["prefix_ids"] + [999] * 576 + sample["suffix_ids"]])
    pixel_values = load_file(reference_dir / "inputs.safetensors")["pixel_values_0"]
    return official_model, input_ids, pixel_values, reference_dir


@pytest.mark.parametrize("name", ["released", "paper-128"])
def test_replays_the_official_run(v2drop_recorded, name):
    """Everything the official code computed replays: each boundary's scores (atol 1e-5) and kept
    tokens, each layer's length and positions in the prefill and at every decoding step, the
    prefill's last logits and every step's (atol 1e-4), the greedy tokens. ``paper-128`` keeps
    0.28 / 0.25 / 0 of what remains (161, then 40, then 1): the official rule's floor on a count
    that is not whole."""
    model, input_ids, pixel_values, reference_dir = v2drop_recorded
    replay(model, input_ids, pixel_values, reference_dir, name)


def test_replays_the_official_run_on_the_demo_model(demo, reference_dir):
    """The same on the shipped demo model (trained weights), its first test question (3 prompt ids
    before the image: the recording set the code's image offset to 3), as released: every score
    within 1e-5 and the rest as above; it answers and stops (two tokens)."""
    sample = json.loads((reference_dir / "demo-inputs.json").read_text())
    input_ids = torch.tensor([sample["prefix_ids"] + [sample["image_token_id"]] * 576 + sample["suffix_ids"]])
    pixel_values = load_file(reference_dir / "demo-inputs.safetensors")["pixel_values"]
    replay(demo[0], input_ids, pixel_values, reference_dir, "demo")


def replay(model, input_ids, pixel_values, reference_dir, name):
    expected = json.loads((reference_dir / f"v2drop-official-{name}.json").read_text())
    tensors = load_file(reference_dir / f"v2drop-official-{name}.safetensors")
    reducer = _Recording(ratios=tuple(expected["keep_ratios"]))
    reducer.log = []
    layers = model.model.language_model.layers
    with torch.no_grad(), reducer(model), layer_calls(layers) as seen:
        logits = model(input_ids=input_ids, pixel_values=pixel_values).logits[0, -1]
        prefill = list(seen)
        stats = reducer.stats
        seen.clear()
        generated = model.generate(input_ids=input_ids, pixel_values=pixel_values, max_new_tokens=5,
                                   do_sample=False, output_scores=True, return_dict_in_generate=True)
    assert [layer for layer, *_ in reducer.log[:3]] == expected["layers"] == [3, 17, 22]
    for (layer, scores, _, _), boundary in zip(reducer.log, expected["boundaries"]):
        assert boundary["layer"] == layer and scores.shape[0] == boundary["n_before"]
        torch.testing.assert_close(scores, tensors[f"scores_layer{layer}"], atol=1e-5, rtol=1e-5)
    assert [stats.tokens_per_layer[layer] for layer in (3, 17, 22)] == [b["k"] for b in expected["boundaries"]]
    # the official record numbers the kept tokens among those that entered the boundary; here they are
    # numbered in the block that entered the language model
    entered = torch.arange(576)
    assert [layer for layer, _ in stats.stage_kept] == [3, 17, 22]
    for (_, ids), boundary in zip(stats.stage_kept, expected["boundaries"]):
        assert ids[0, 0].tolist() == entered[boundary["kept_rel_sorted"]].tolist()
        entered = ids[0, 0]
    assert_replays_recorded_run(expected, tensors, input_ids, logits, prefill, seen, generated, len(layers))


def test_the_score_is_each_tokens_change_by_the_layer_before(v2drop_recorded):
    """The stage's scores equal the definition in plain Python and float64, on the states the
    boundary saw (the input of the boundary layer and of the one before)."""
    model, input_ids, pixel_values, _ = v2drop_recorded
    reducer = _Recording(ratios=(0.5, 0.5, 0.0))
    reducer.log = []
    with torch.no_grad(), reducer(model):
        model(input_ids=input_ids, pixel_values=pixel_values)
    for layer, scores, current, previous in reducer.log:
        assert scores.shape[0] == current.shape[0] and not torch.equal(current, previous)
        assert scores.tolist() == pytest.approx(naive_change(current, previous), rel=1e-5, abs=1e-5)


# ----------------------------------------------------------------------------- budget and options
@pytest.mark.parametrize("budget, boundaries", [
    (192, ((3, 270), (17, 126), (22, 1))), (128, ((3, 154), (17, 41), (22, 1))), (64, ((3, 22), (17, 1), (22, 1))),
])
def test_solver_numbers(budget, boundaries):
    """A budget solves one keep ratio for the first boundaries, the last keeping the released "0" (one token)."""
    schedule = V2Drop(budget=budget).plan(LLAVA15).schedule
    assert schedule.boundaries == boundaries and schedule.llm_input == 576
    assert abs(schedule.average - budget) <= 1


def test_every_reachable_budget_is_met_within_one_token():
    for budget in range(54, 576):
        assert abs(V2Drop(budget=budget).plan(LLAVA15).schedule.average - budget) <= 1, budget


def test_the_released_and_the_papers_schedules():
    """``ratios`` overrides the solver: the released code's (0.5, 0.5, 0) and the paper's three, which
    average about 194, 131 and 67 visual tokens per layer under the code's rule."""
    averages = {ratios: V2Drop(ratios=ratios).plan(LLAVA15).schedule.average
                for ratios in ((0.5, 0.5, 0.0), (0.5, 0.3, 0.0), (0.28, 0.25, 0.0), (0.05, 0.05, 0.0))}
    assert averages == {(0.5, 0.5, 0.0): 202.8125, (0.5, 0.3, 0.0): 193.75, (0.28, 0.25, 0.0): 131.0,
                        (0.05, 0.05, 0.0): 66.71875}
    assert v2drop_counts(576, (0.5, 0.5, 0.0)) == [288, 144, 1] and v2drop_counts(0, (0.5,)) == [0]
    assert V2Drop(budget=64).resolve(LLAVA15).positions == "original"


def test_a_budget_below_the_floor_says_what_reaches_it():
    with pytest.raises(ValueError, match=r"the 3 layers before the first see all 576 tokens \(54.9 per layer"):
        V2Drop(budget=53).plan(LLAVA15)
    plan = V2Drop(budget=53, layers=(2, 17, 22)).plan(LLAVA15)
    assert abs(plan.schedule.average - 53) <= 1


def test_boundaries_on_one_layer_drop_in_turn():
    """A shallow model's scaled boundaries may fall on one layer: they drop there in turn, one
    boundary keeping the last count (the top of the top k is the top of all: one score)."""
    assert v2drop_schedule(32, 576, 576, (3, 3, 22), (0.5, 0.5, 0.0)).boundaries == ((3, 144), (22, 1))
    assert V2Drop(ratios=(0.5, 0.5, 0.0)).plan(Geometry(4, 16, (4, 4), False)).schedule.boundaries == ((1, 8), (2, 4), (3, 1))
    assert V2Drop(ratios=(0.5, 0.5, 0.0)).plan(Geometry(3, 16, (4, 4), False)).schedule.boundaries == ((1, 8), (2, 1))


@given(st.integers(1, 64), st.lists(st.floats(0, 1), min_size=1, max_size=4))
@settings(max_examples=200, deadline=None)
def test_each_boundary_keeps_the_official_count(tokens, ratios):
    """``max(1, int(n * ratio))`` of the ``n`` remaining, never more than remain, at least one."""
    counts = v2drop_counts(tokens, ratios)
    remaining = tokens
    for ratio, count in zip(ratios, counts):
        assert count == min(remaining, max(1, int(remaining * ratio))) and 1 <= count <= remaining
        remaining = count


def test_on_a_hybrid_model_a_boundary_may_follow_any_layer_after_the_first_attention_layer():
    """The score reads states, which every layer kind hands on: on a model whose layers mix linear
    attention and attention (Qwen3.5: attention at 3, 7, ...), a boundary may sit after any layer
    that follows the first attention layer, and the released layers move there."""
    hybrid = Geometry(32, 576, (24, 24), False, attention_layers=tuple(range(3, 32, 4)))
    plan = V2Drop(budget=128).plan(hybrid)
    assert [layer for layer, _ in plan.schedule.boundaries] == [4, 17, 22]
    assert V2Drop(budget=128, layers=(5, 18, 22)).resolve(hybrid).schedule.boundaries[0][0] == 5


def test_compose_after_a_vision_method():
    """Inside a Compose the released ratios fix the shape and the input count is solved."""
    plan = Compose(make("visionzip"), V2Drop(), budget=64).plan(LLAVA15)
    entered = plan.schedule.llm_input
    assert plan.schedule.boundaries == tuple(zip((3, 17, 22), v2drop_counts(entered, (0.5, 0.5, 0.0))))
    assert abs(plan.schedule.average - 64) <= 1 and isinstance(plan.language, HiddenStateChange)


@pytest.mark.parametrize("options, message", [
    (dict(ratios=(0.5, 0.5)), r"ratios \[0.5, 0.5\] need one keep ratio per boundary layer \(3\)"),
    (dict(layers=(3, 17), ratios=(0.5, 0.5, 0.0)), "need one keep ratio per boundary layer"),
    (dict(ratios=(0.5, 1.5, 0.0)), "ratios"),
    (dict(layers=()), "at least one boundary layer"),
    (dict(layers=(0, 17, 22)), "layers"),
    (dict(budget=0), "budget must be a positive int"),
])
def test_bad_options_are_refused(options, message):
    with pytest.raises(ValueError, match=message):
        V2Drop(**options)


def test_a_plan_needs_a_budget_or_ratios():
    with pytest.raises(ValueError, match="V2Drop needs a budget"):
        V2Drop().plan(LLAVA15)
