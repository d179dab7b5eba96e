"""ApET (methods/apet.py): the recorded outputs of the official code replay (tests/data/vectors/
apet-official-*, README there), both as the rule on the official inputs and as a run of the model, and
its parts equal deliberately naive ones from their definitions; budgets, options and clear errors."""

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

from duet_vlm import Compose, Geometry, from_dict, make
from duet_vlm.methods.apet import (
    ApET,
    ApproximationErrorPrune,
    approximate,
    basis_start,
    farthest_points,
    reconstruction_errors,
)

from checks import assert_replays_recorded_run, layer_calls

LLAVA15 = Geometry(num_layers=32, visual_tokens=576, grid=(24, 24), has_cls=True)
CONFIGS = {"64": 64, "192": 192}  # the recorded configurations on the tiny model, and the budget that gives their counts
SEED = 80


@pytest.fixture(scope="module")
def apet_recorded(official_model, reference_dir):
    sample = json.loads((reference_dir / "apet-official-inputs.json").read_text())
    input_ids = torch.tensor([sample["prefix_ids"] + [999] * 576 + sample["suffix_ids"]])
    pixel_values = load_file(reference_dir / "inputs.safetensors")["pixel_values_0"]
    return official_model, input_ids, pixel_values, reference_dir


def _recorded(reference_dir, name):
    return (json.loads((reference_dir / f"apet-official-{name}.json").read_text()),
            load_file(reference_dir / f"apet-official-{name}.safetensors"))


@pytest.mark.parametrize("name", [*CONFIGS, "demo"])
def test_the_rule_replays_the_official_stages_on_their_inputs(reference_dir, name):
    """On the tokens each official stage saw, ``approximate`` draws the same basis, gives the same
    errors (to 3e-5 of the largest: a float32 least-squares solve, whose reductions differ between
    CPUs' kernels), keeps the same tokens in the same ranking, and writes the same states: the
    projector's input at the kept slots (vision side, basis states in slot order) and the boundary
    layer's input (inside the model, in rank order)."""
    expected, tensors = _recorded(reference_dir, name)
    vision, inner = expected["stages"]
    for stage, draw, slots, dtype, wanted in (
        (vision, 0, "position", None, tensors["projector_input"]),
        (inner, 1, "rank", torch.float32, None),
    ):
        tokens = tensors[f"tokens_{'vision' if stage is vision else 'layer16'}"]
        start = basis_start(SEED, draw, tokens.shape[0])
        assert start == stage["basis"][0]
        assert farthest_points(tokens, stage["basis_count"], start).tolist() == stage["basis"]
        result = approximate(tokens, stage["keep"], expected["basis_token_num"], start, basis_slots=slots, merge_dtype=dtype)
        recorded = tensors[f"errors_{'vision' if stage is vision else 'layer16'}"]
        torch.testing.assert_close(result.errors, recorded, atol=3e-5 * float(recorded.abs().max()), rtol=1e-5)
        assert result.errors.topk(stage["keep"]).indices.tolist() == stage["ranked"]
        assert result.kept.tolist() == stage["kept_sorted"]
        if wanted is not None:
            torch.testing.assert_close(result.states, wanted[result.kept], atol=1e-6, rtol=1e-6)
    inner_states = approximate(tensors["tokens_layer16"], inner["keep"], expected["basis_token_num"],
                               basis_start(SEED, 1, inner["n_before"]), basis_slots="rank", merge_dtype=torch.float32)
    torch.testing.assert_close(inner_states.states, tensors["layer16_visual_input"], atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("name", CONFIGS)
def test_replays_the_official_run(apet_recorded, name):
    """The model under ``ApET(budget=...)`` replays the official run: the language model's input
    visual tokens (the projected merged tokens, 1e-5) and the boundary layer's (1e-4: sixteen float32
    layers after a least-squares merge, as CPUs' kernels round them), each layer's length
    and positions in the prefill and at every decoding step, the logits (1e-4), the greedy tokens."""
    model, input_ids, pixel_values, reference_dir = apet_recorded
    replay(model, input_ids, pixel_values, reference_dir, name, CONFIGS[name])


def test_replays_the_official_run_on_the_demo_model(demo, reference_dir):
    """The same on the shipped demo model (trained weights) and its first test question, as released
    (96, then 32 from layer 16): it answers and stops (two tokens)."""
    sample = json.loads((reference_dir / "demo-inputs.json").read_text())
    input_ids = torch.tensor([sample["prefix_ids"] + [sample["image_token_id"]] * 576 + sample["suffix_ids"]])
    pixel_values = load_file(reference_dir / "demo-inputs.safetensors")["pixel_values"]
    replay(demo[0], input_ids, pixel_values, reference_dir, "demo", 64)


def replay(model, input_ids, pixel_values, reference_dir, name, budget):
    expected, tensors = _recorded(reference_dir, name)
    prefix = int((input_ids[0] == model.config.image_token_id).nonzero()[0])
    reducer = ApET(budget=budget, seed=SEED)
    plan = reducer.resolve(LLAVA15)
    assert plan.schedule.llm_input == expected["visual_token_num"]
    assert plan.schedule.boundaries == ((expected["layer_list"][0], expected["image_token_list"][0]),)
    layers = model.model.language_model.layers
    inputs = {}

    def keep(index):
        def hook(module, args, kwargs):
            inputs.setdefault(index, (args[0] if args else kwargs["hidden_states"])[0].clone())
        return hook

    with torch.no_grad(), reducer(model), layer_calls(layers) as seen:
        # registered after the reducer's hooks: each layer's input after its boundary
        handles = [layers[index].register_forward_pre_hook(keep(index), with_kwargs=True) for index in (0, 16)]
        try:
            logits = model(input_ids=input_ids, pixel_values=pixel_values).logits[0, -1]
        finally:
            for handle in handles:
                handle.remove()
        prefill = list(seen)
        stats = reducer.stats
        seen.clear()
        generated = model.generate(input_ids=input_ids, pixel_values=pixel_values, max_new_tokens=5,
                                   do_sample=False, output_scores=True, return_dict_in_generate=True)
    vision, inner = expected["stages"]
    assert (stats.vision_kept[0] - 1).tolist() == vision["kept_sorted"]
    assert stats.stage_kept[0][1][0, 0].tolist() == inner["kept_sorted"]
    torch.testing.assert_close(inputs[0][prefix:prefix + vision["keep"]], tensors["layer0_visual_input"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(inputs[16][prefix:prefix + inner["keep"]], tensors["layer16_visual_input"], atol=1e-4, rtol=1e-4)
    assert_replays_recorded_run(expected, tensors, input_ids, logits, prefill, seen, generated, len(layers))


# ----------------------------------------------------------------------------- the parts, naively
def naive_farthest(points, count, start):
    chosen, best = [start], [float("inf")] * len(points)
    for _ in range(count - 1):
        last = points[chosen[-1]]
        best = [min(b, sum((a - c) ** 2 for a, c in zip(p, last))) for b, p in zip(best, points)]
        chosen.append(max(range(len(points)), key=lambda i: (best[i], -i)))
    return chosen


@given(st.integers(0, 2**31 - 1), st.integers(3, 12), st.integers(1, 3))
@settings(max_examples=50, deadline=None)
def test_farthest_points_equal_their_definition(seed, n, count):
    points = torch.randn(n, 4, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    start = seed % n
    assert farthest_points(points, count, start).tolist() == naive_farthest(points.tolist(), count, start)


def test_errors_are_the_distance_to_the_ridge_reconstruction():
    """``||x - c B||`` with ``c`` the ridge least-squares coefficients, checked against the normal
    equations solved in float64: the residual is orthogonal to the basis up to the ridge term."""
    generator = torch.Generator().manual_seed(0)
    tokens, basis = torch.randn(20, 6, generator=generator), torch.randn(3, 6, generator=generator)
    b, x = basis.double(), tokens.double()
    coefficients = torch.linalg.solve(b @ b.T + 1e-5 * torch.eye(3, dtype=torch.float64), b @ x.T).T
    torch.testing.assert_close(reconstruction_errors(tokens, basis).double(), (x - coefficients @ b).norm(dim=-1),
                               atol=1e-5, rtol=1e-5)
    assert reconstruction_errors(basis, basis).max() < 1e-3  # a basis token reconstructs itself


def test_the_merge_averages_each_dropped_token_into_its_nearest_stayer():
    """Every token not kept goes to the stayer (not a basis slot) it is most cosine-similar to; each
    stayer ends as the mean of itself and its members, the basis slots hold the basis tokens."""
    generator = torch.Generator().manual_seed(1)
    tokens = torch.randn(30, 5, generator=generator)
    result = approximate(tokens, 8, 3, 0, basis_slots="position")
    seeds = farthest_points(tokens, 3, 0)
    order = result.errors.topk(8).indices
    slots, targets = order[5:].sort().values, order[:5]
    assert result.basis.tolist() == slots.tolist()
    rest = [i for i in range(30) if i not in order.tolist()]
    members = {int(t): [int(t)] for t in targets}
    for i in rest:
        sims = [torch.nn.functional.cosine_similarity(tokens[i], tokens[t], dim=0) for t in targets]
        members[int(targets[int(torch.stack(sims).argmax())])].append(i)
    for position, index in enumerate(result.kept.tolist()):
        if index in members:
            torch.testing.assert_close(result.states[position], tokens[members[index]].mean(dim=0))
        else:
            torch.testing.assert_close(result.states[position], tokens[seeds[slots.tolist().index(index)]])


def test_the_two_stages_place_the_basis_differently():
    """The vision side writes the basis tokens through a mask (slot order), the language side by the
    ranked list (error order), as the released code does: the same tokens, other slots."""
    tokens = torch.randn(40, 6, generator=torch.Generator().manual_seed(3))
    by_position = approximate(tokens, 12, 4, 5, basis_slots="position")
    by_rank = approximate(tokens, 12, 4, 5, basis_slots="rank")
    assert by_position.kept.tolist() == by_rank.kept.tolist()
    assert sorted(by_position.basis.tolist()) == sorted(by_rank.basis.tolist())
    assert not torch.equal(by_position.states, by_rank.states)


def test_small_counts():
    """A stage that keeps ``basis`` tokens or fewer uses one basis token fewer than it keeps; keeping
    every token returns the unit unchanged; one token keeps the mean of everything."""
    tokens = torch.randn(10, 3, generator=torch.Generator().manual_seed(4))
    assert len(approximate(tokens, 4, 10, 0, basis_slots="rank").basis) == 3
    whole = approximate(tokens, 10, 3, 0, basis_slots="rank")
    assert whole.kept.tolist() == list(range(10)) and torch.equal(whole.states, tokens)
    one = approximate(tokens, 1, 3, 0, basis_slots="rank")
    torch.testing.assert_close(one.states[0], tokens.mean(dim=0))
    with pytest.raises(ValueError, match="keeps at least one token"):
        approximate(tokens, 0, 3, 0, basis_slots="rank")


# ----------------------------------------------------------------------------- budget and options
@pytest.mark.parametrize("budget, llm_input, inner", [(192, 288, 96), (128, 192, 64), (64, 96, 32)])
def test_budgets_keep_the_released_shape(budget, llm_input, inner):
    schedule = ApET(budget=budget).plan(LLAVA15).schedule
    assert (schedule.llm_input, schedule.boundaries, schedule.average) == (llm_input, ((16, inner),), budget)


def test_every_budget_is_met_within_one_token():
    """Up to 384 (every token in, a third from layer 16) by the count entering; above it by the
    share kept inside."""
    assert ApET(budget=500).plan(LLAVA15).vision is None
    for budget in range(1, 576):
        assert abs(ApET(budget=budget).plan(LLAVA15).schedule.average - budget) <= 1, budget


def test_a_hybrid_model_takes_the_inner_boundary_after_any_layer_past_the_first_attention_layer():
    hybrid = Geometry(32, 576, (24, 24), False, attention_layers=tuple(range(3, 32, 4)))
    assert ApET(budget=64).resolve(hybrid).schedule.boundaries == ((16, 32),)
    schedule = ApET(budget=64, layer=5).resolve(hybrid).schedule
    assert schedule.boundaries[0][0] == 5 and abs(schedule.average - 64) <= 1


def test_compose_after_a_vision_method():
    plan = Compose(make("visionzip"), ApET(), budget=64).plan(LLAVA15)
    assert isinstance(plan.language, ApproximationErrorPrune) and abs(plan.schedule.average - 64) <= 1


def test_round_trip_and_positions():
    reducer = make("apet", budget=64, basis=6, seed=3)
    assert from_dict(reducer.to_dict()) == reducer
    assert reducer.to_dict() == {"method": "apet", "positions": None, "budget": 64, "basis": 6, "layer": None,
                                 "inner_ratio": 32 / 96, "seed": 3}
    assert ApET(budget=64).resolve(LLAVA15).positions == "contiguous"


@pytest.mark.parametrize("options, message", [
    (dict(budget=64, basis=0), "basis"),
    (dict(budget=64, inner_ratio=0), "inner_ratio"),
    (dict(budget=64, inner_ratio=1.5), "inner_ratio"),
    (dict(budget=64, layer=0), "layer"),
    (dict(budget=0), "budget must be a positive int"),
])
def test_bad_options_are_refused(options, message):
    with pytest.raises(ValueError, match=message):
        ApET(**options)


def test_a_plan_needs_a_budget_and_a_layer_inside_the_model():
    with pytest.raises(ValueError, match="ApET needs a budget"):
        ApET().plan(LLAVA15)
    with pytest.raises(ValueError, match="layer=32 but the language model has 32 layers"):
        ApET(budget=64, layer=32).plan(LLAVA15)
