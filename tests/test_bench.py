"""The timing helpers of the benchmark (the benchmark itself is run by hand: `duet-vlm bench`)."""

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
