"""The budget convention and the DUET schedule solver."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import duet_vlm
from duet_vlm.adapters import Geometry
from duet_vlm.flops import LLAVA_15_7B, DecoderDims, exact_flops, fastv_flops, kv_cache_bytes
from duet_vlm.schedule import Schedule

LLAVA15 = Geometry(num_layers=32, visual_tokens=576, grid=(24, 24), has_cls=True)


@pytest.mark.parametrize(
    "budget, dominant, contextual, groups",
    [(192, 300, 7, [307] * 16 + [153] * 8 + [0] * 8), (128, 170, 35, [205] * 16 + [102] * 8 + [0] * 8)],
)
def test_reference_configurations_come_out_exactly(budget, dominant, contextual, groups):
    plan = duet_vlm.Duet(budget=budget).plan(LLAVA15)
    assert plan.schedule.boundaries == ((16, groups[16]), (24, 0))
    assert plan.schedule.tokens_per_layer == groups
    assert plan.schedule.llm_input - plan.vision.contextual == dominant
    assert plan.vision.contextual == contextual and plan.vision.cluster_width == 4


@settings(max_examples=200, deadline=None)
@given(st.integers(2, 80), st.integers(8, 3000), st.data())
def test_any_geometry_meets_the_budget_within_one(layers, tokens, data):
    budget = data.draw(st.integers(1, tokens - 1))
    geometry = Geometry(layers, tokens, (1, tokens), True)
    try:
        plan = duet_vlm.Duet(budget=budget).plan(geometry)
    except ValueError as error:
        # Only budgets above what the default staged schedule can reach are refused.
        assert "no schedule" in str(error)
        full = duet_vlm.Duet(budget=budget).schedule_for(geometry, tokens).average
        assert budget > full + 1
        return
    assert abs(plan.schedule.average - budget) <= 1
    boundaries = [layer for layer, _ in plan.schedule.boundaries]
    assert boundaries == sorted(set(boundaries))


def test_boundaries_scale_with_depth():
    plan = duet_vlm.Duet(budget=20).plan(Geometry(16, 144, (12, 12), True))
    assert [layer for layer, _ in plan.schedule.boundaries] == [8, 12]


def test_explicit_parameters_override_the_solver():
    plan = duet_vlm.Duet(dominant=100, contextual=10, layers=(8, 16), ratios=(0.5, 0.25)).plan(LLAVA15)
    assert plan.schedule.tokens_per_layer == [110] * 8 + [55] * 8 + [27] * 16
    assert plan.vision.contextual == 10
    plan = duet_vlm.Duet(budget=64, layers=(), ratios=()).plan(LLAVA15)  # Stage A only
    assert plan.schedule.boundaries == () and plan.schedule.llm_input == 64 and plan.language is None


def test_budget_at_or_above_the_token_count_is_a_noop_with_a_warning():
    with pytest.warns(UserWarning, match="nothing is reduced"):
        plan = duet_vlm.Duet(budget=576).resolve(LLAVA15)
    assert plan.schedule.is_identity and plan.vision is None and plan.language is None


@pytest.mark.parametrize("budget", [0, -3, 1.5, "64", True, None])
def test_bad_budgets(budget):
    with pytest.raises(ValueError, match="budget"):
        duet_vlm.Duet(budget=budget)


def test_bad_options():
    with pytest.raises(ValueError, match="query"):
        duet_vlm.Duet(budget=64, query="everything")
    with pytest.raises(ValueError, match="tokenizer"):
        duet_vlm.Duet(budget=64, query="salient")
    with pytest.raises(ValueError, match="layers and ratios"):
        duet_vlm.Duet(budget=64, layers=(8, 16))
    with pytest.raises(ValueError, match=r"keep ratios must lie in \[0, 1\]"):
        duet_vlm.Duet(budget=64, ratios=(0.5, 1.5), layers=(8, 16)).plan(LLAVA15)
    with pytest.raises(ValueError, match=r"boundary layers must be increasing and inside \(0, 32\)"):
        Schedule(32, 576, 307, ((24, 100), (16, 50)))
    with pytest.raises(ValueError, match="positions"):
        duet_vlm.Duet(budget=64, positions="gaps").plan(LLAVA15)


def test_fastv_flops_formula_by_hand():
    dims = DecoderDims(hidden=4, intermediate=8, heads=2, kv_heads=2, head_dim=2)
    n = 10
    assert fastv_flops(dims, [n, n]) == 2 * (4 * n * 16 + 2 * n * n * 4 + 2 * n * 4 * 8)


def test_exact_flops_counts_gqa_gated_mlp_and_causal_attention():
    dims = DecoderDims(hidden=8, intermediate=16, heads=4, kv_heads=2, head_dim=2)
    n = 5
    projections = n * 8 * (8 + 4 + 4 + 8)
    attention = 2 * 4 * 2 * (n * (n + 1) // 2)
    mlp = 3 * n * 8 * 16
    assert exact_flops(dims, [n]) == 2 * (projections + attention + mlp)
    assert kv_cache_bytes(dims, [n, 3], bytes_per_element=2) == 2 * (n + 3) * 2 * 2 * 2


def test_flops_of_the_paper_configuration():
    # The reduction DUET's tables quote at 192 tokens comes from the same formula.
    full = fastv_flops(LLAVA_15_7B, [576 + 60] * 32)
    reduced = fastv_flops(LLAVA_15_7B, [n + 60 for n in [307] * 16 + [153] * 8 + [0] * 8])
    assert 0.3 < reduced / full < 0.4
