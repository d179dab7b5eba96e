"""The timing helpers of the benchmark (the benchmark itself is run by hand: `duet-vlm bench`)."""

import pytest

from duet_vlm.bench import interleaved, median_ratio
from duet_vlm.cli import expand_list_options


def test_interleaved_times_every_variant_each_round():
    calls = []
    times = interleaved({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, rounds=3, warmup=1)
    assert calls == ["a", "b"] + ["a", "b"] * 3
    assert all(len(v) == 3 for v in times.values())


def test_median_ratio_pairs_rounds():
    times = {"base": [1.0, 2.0, 4.0], "x": [0.5, 1.0, 4.0]}
    assert median_ratio(times, "base") == {"base": 1.0, "x": 0.5}


def test_list_options_take_several_values():
    argv = ["eval", "--methods", "duet", "fastv", "--budgets", "192", "64", "--n", "5"]
    assert expand_list_options(argv) == [
        "eval", "--methods", "duet", "--methods", "fastv", "--budgets", "192", "--budgets", "64", "--n", "5",
    ]


@pytest.mark.parametrize("family", ["llava_next", "video_llava"])
def test_family_benchmark_times_each_variant_against_the_ideal(family):
    from duet_vlm.bench import ModelSize, family_benchmark

    size = ModelSize(vision_hidden=32, vision_layers=2, vision_heads=4, hidden=64, layers=4, heads=4, kv_heads=4,
                     intermediate=128)
    results = family_benchmark(family, size, ["duet"], [0.25], rounds=1)
    row = results["variants"]["duet ratio 0.25"]
    tokens = {"llava_next": 576 + 48 * 49, "video_llava": 8 * 257}[family]
    assert abs(row["avg_visual_tokens"] - 0.25 * tokens) <= 8
    assert row["ideal_s"] > 0 and row["lm_vs_ideal"] > 0 and row["flops_ratio"] < 0.5
