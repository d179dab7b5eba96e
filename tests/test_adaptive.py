"""Content-adaptive and per-row budgets (issue #25) outside the invariant matrix: the signals'
curves and the calibration against a brute-force search (hypothesis), the errors a user can make,
rows of equal length with different budgets, the commands (``duet-vlm calibrate``, ``eval
--adaptive``, ``run`` with a budget per image) and a checkpoint that carries its reducer.

The matrix itself (every method x every family: a padded batch with a budget per row equals its
rows, an adaptive batch equals its rows, counts, hooks, records) is in tests/test_invariants.py.
"""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

import duet_vlm
from duet_vlm import synthetic as data
from duet_vlm.cli import app, expand_list_options
from duet_vlm.content import Curve, calibrate_threshold, coverage_curve, distinct_curve, rank_curve
from duet_vlm.geometry import Geometry

from checks import write_llava_json
from models import make_demo_llava, make_inputs, make_llava, row

runner = CliRunner()
GEOMETRY = Geometry(32, 576, (24, 24), True)


def _invoke(*args):
    result = runner.invoke(app, expand_list_options([str(a) for a in args]))
    assert result.exit_code == 0, result.output + repr(result.exception)
    return result.output


# ----------------------------------------------------------------------------- signals and calibration
scores = st.integers(1, 3).flatmap(lambda units: st.integers(2, 12).flatmap(lambda patches: st.lists(
    st.lists(st.floats(0, 10, allow_nan=False), min_size=patches, max_size=patches), min_size=units, max_size=units)))


def _thresholds(low, high, count=41):
    return [low + (high - low) * k / (count - 1) for k in range(count)]


@settings(max_examples=60, deadline=None)
@given(scores)
def test_coverage_curves_are_non_decreasing_and_cover_their_share(values):
    attention = torch.tensor(values)
    curve = coverage_curve(attention)
    counts = [curve.count(t) for t in _thresholds(0.0, 1.0)]
    assert counts == sorted(counts)
    units, patches = attention.shape
    assert units <= counts[0] and counts[-1] <= units * patches
    for share in (0.3, 0.7, 1.0):  # the k most attended patches of each unit hold at least the share
        per_unit = [int(torch.searchsorted(steps, torch.tensor(share), right=True)) for steps in curve.steps]
        for unit, k in zip(attention, per_unit):
            mass = unit.clamp(min=0)
            if mass.sum() > 0:
                assert mass.sort(descending=True).values[:k].sum() >= share * mass.sum() - 1e-5


@settings(max_examples=40, deadline=None)
@given(scores, st.integers(0, 2**16))
def test_distinct_and_rank_curves_are_non_decreasing(values, seed):
    attention = torch.tensor(values)
    units, patches = attention.shape
    generator = torch.Generator().manual_seed(seed)
    keys = torch.randn(units, patches + 1, 4, generator=generator)  # a CLS first
    distinct = distinct_curve(attention, keys)
    counts = [distinct.count(t) for t in _thresholds(-1.0, 1.0)]
    assert counts == sorted(counts) and counts[-1] == units * patches
    rank = rank_curve(torch.randn(units, patches, 4, generator=generator))
    counts = [rank.count(t) for t in _thresholds(0.0, 64.0)]
    assert counts == sorted(counts)


@settings(max_examples=40, deadline=None)
@given(st.lists(scores, min_size=1, max_size=6), st.integers(1, 20), st.floats(0.2, 1.0), st.floats(1.0, 3.0))
def test_calibration_meets_the_average_as_well_as_a_brute_force_search(items, target, floor, ceiling):
    """The calibrated threshold's average is as close to the target as the best of a fine grid of
    thresholds (the step granularity: one item's step more or less), and never further than the
    nearest threshold found by checking every step of every curve."""
    curves = [coverage_curve(torch.tensor(values)) for values in items]
    sizes = [torch.tensor(values).numel() for values in items]
    floors = [max(1, round(floor * target)) for _ in curves]
    ceilings = [max(f, min(round(ceiling * target), size)) for f, size in zip(floors, sizes)]

    def average(threshold):
        return sum(min(max(c.count(threshold), f), g) for c, f, g in zip(curves, floors, ceilings)) / len(curves)

    found = calibrate_threshold(curves, [target] * len(curves), floors, ceilings, 0.0, 1.0)
    # every threshold where some count changes, and just above it: the averages a threshold can give
    candidates = {0.0, 1.0} | {float(s) for c in curves for steps in c.steps for s in steps.tolist() if 0 <= s <= 1}
    candidates |= {t + 1e-6 for t in candidates}  # just above (counts compare in float32)
    candidates = {t for t in candidates if 0.0 <= t <= 1.0}  # the signal's range, where calibration searches
    best = min(abs(average(t) - target) for t in candidates)
    assert abs(average(found) - target) <= best + 1e-9 or abs(average(found) - target) <= 1 / len(curves) + 1e-9


def test_calibration_counts_the_budgets_a_method_reaches():
    """PyramidDrop keeps every token in its first layers: an item's budget below what it reaches is
    moved up to the nearest it reaches, and the calibration counts that (the average still lands)."""
    adaptive = duet_vlm.Adaptive(duet_vlm.make("pyramiddrop", budget=64), floor=0.25)
    assert adaptive.reach(16, GEOMETRY) == 35 and adaptive.reach(64, GEOMETRY) == 64
    assert adaptive.budget_of(1, GEOMETRY) == 35 and adaptive.budget_of(10**6, GEOMETRY) == 128
    from duet_vlm.methods.adaptive import Recorded

    flat = [Recorded(Curve(scale=float(k)), GEOMETRY) for k in (1, 2, 3, 40, 50, 60, 61)]
    fitted = duet_vlm.Adaptive(duet_vlm.make("pyramiddrop", budget=64), signal="rank").fit(flat)
    counts = fitted.counts(flat)
    assert min(counts) >= 35 and abs(sum(counts) / len(counts) - 64) <= 6


# ----------------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    "options, message",
    [
        (dict(signal="coverage", threshold=1.5), r"threshold of the coverage signal must lie in \[0.0, 1.0\]"),
        (dict(threshold=float("nan")), "threshold of the rank signal"),
        (dict(threshold="0.5"), "threshold of the rank signal"),
        (dict(signal="rank", threshold=-1.0), r"threshold of the rank signal must lie in \[0.0, 64.0\]"),
        (dict(signal="entropy"), "signal must be one of"),
        (dict(floor=0.0), r"floor must lie in \(0, 1\]"),
        (dict(floor=1.5), r"floor must lie in \(0, 1\]"),
        (dict(ceiling=0.5), r"ceiling must be >= 1 .*got 0.5"),
    ],
)
def test_adaptive_refuses_bad_settings(options, message):
    with pytest.raises(ValueError, match=message):
        duet_vlm.Adaptive(duet_vlm.make("duet", budget=64), **options)


def test_adaptive_refusals():
    with pytest.raises(ValueError, match="a method with a budget or a ratio"):
        duet_vlm.Adaptive(duet_vlm.make("full"))
    with pytest.raises(ValueError, match="wraps one method"):
        duet_vlm.Adaptive(duet_vlm.Adaptive(duet_vlm.make("duet", budget=64)))
    with pytest.raises(ValueError, match="wraps one method"):
        duet_vlm.Adaptive("duet")
    model = make_llava(layers=4, image_size=112, vision_layers=2)
    with pytest.raises(ValueError, match="no threshold: calibrate it"):
        with torch.no_grad(), duet_vlm.Adaptive(duet_vlm.make("duet", budget=16))(model):
            model(**make_inputs(model))
    with pytest.raises(ValueError, match="calibration saw no image"):
        duet_vlm.Adaptive(duet_vlm.make("duet", budget=16)).calibrate(model, [])


def test_per_row_refusals():
    model = make_llava(layers=4, image_size=112, vision_layers=2)
    inputs = make_inputs(model, batch=2, suffix=(9, 4), seed=2)
    reducer = duet_vlm.make("duet", budget=32)
    for wrong in ([16], [16, 24, 32]):  # one budget per row: neither fewer nor more
        with pytest.raises(ValueError, match=f"per-row budgets: {len(wrong)} given for a batch of 2 rows"):
            with torch.no_grad(), reducer(model), reducer.per_row(budget=wrong):
                model(**inputs)
    with pytest.raises(ValueError, match="one value per row"):
        with reducer.per_row(budget=[]):
            pass
    with pytest.raises(ValueError, match="budget must be a positive int"):
        with reducer.per_row(budget=[16, 0]):
            pass
    with pytest.raises(ValueError, match=r"per-row ratios must lie in \(0, 1\]"):
        with reducer.per_row(ratio=[0.5, 1.5]):
            pass
    with pytest.raises(ValueError, match="give per-row budgets or per-row ratios"):
        with reducer.per_row(budget=[16, 16], ratio=[0.5, 0.5]):
            pass


# ----------------------------------------------------------------------------- batches beyond the matrix
@pytest.mark.parametrize("name", ["duet", "pyramiddrop"])
def test_rows_of_equal_length_with_different_budgets_equal_rows_alone(name):
    """No padding at all (an all-ones mask, as a processor gives for prompts of one length), yet the
    rows keep different counts in the decoder's later layers; and absolute per-row budgets (the
    matrix uses ratios)."""
    model = make_llava(layers=8, image_size=112, vision_layers=2)
    inputs = make_inputs(model, batch=2, suffix=(5, 5), seed=3)
    assert bool(inputs["attention_mask"].all())
    budgets = [24, 40]
    kwargs = dict(max_new_tokens=3, do_sample=False)
    reducer = duet_vlm.make(name, budget=32)
    with torch.no_grad(), reducer(model), reducer.per_row(budget=budgets):
        tokens = model.generate(**inputs, **kwargs)[:, inputs["input_ids"].shape[1] :]
        logits = model(**inputs).logits
    for b, budget in enumerate(budgets):
        alone = row(inputs, b)
        single = duet_vlm.make(name, budget=budget)
        with torch.no_grad(), single(model):
            torch.testing.assert_close(logits[b], model(**alone).logits[0], atol=1e-4, rtol=1e-4)
            assert tokens[b].tolist() == model.generate(**alone, **kwargs)[0, alone["input_ids"].shape[1] :].tolist()


def test_beams_share_their_rows_budget():
    """generate repeats each row for its beams: the repeated rows take their row's budget."""
    model = make_llava(layers=8, image_size=112, vision_layers=2)
    inputs = make_inputs(model, batch=2, suffix=(9, 4), seed=2)
    reducer = duet_vlm.make("duet", budget=32)
    kwargs = dict(max_new_tokens=2, do_sample=False, num_beams=2)
    with torch.no_grad(), reducer(model), reducer.per_row(budget=[16, 40]):
        tokens = model.generate(**inputs, **kwargs)[:, inputs["input_ids"].shape[1] :]
    assert [round(item.average_tokens) for item in reducer.stats.items] in ([16, 16, 40, 40], [16, 40, 16, 40])
    for b, budget in enumerate((16, 40)):
        alone = row(inputs, b)
        with torch.no_grad(), duet_vlm.make("duet", budget=budget)(model):
            single = model.generate(**alone, **kwargs)[0, alone["input_ids"].shape[1] :]
        assert tokens[b, : len(single)].tolist() == single.tolist()


# ----------------------------------------------------------------------------- the commands
def test_calibrate_command_finds_the_threshold_and_writes_it(tiny_demo_model, tmp_path):
    output = tmp_path / "calibration.json"
    printed = _invoke("calibrate", "--model", tiny_demo_model, "--data", "synthetic:validation", "--method", "visionzip",
                      "--budget", 64, "--signal", "distinct", "--n", 6, "--batch-size", 3, "--output", output)
    record = json.loads(output.read_text())
    reducer = duet_vlm.from_dict(record["reducer"])
    assert isinstance(reducer, duet_vlm.Adaptive) and reducer.threshold == record["threshold"]
    assert reducer.signal == "distinct" and reducer.reducer == duet_vlm.make("visionzip", budget=64)
    assert record["items"] == 6 and record["asked_average"] == 64
    assert abs(record["realised_average"] - 64) <= max(record["counts"]) - min(record["counts"]) + 1
    assert f"{record['threshold']:.6g}" in printed and "realised" in printed
    # a folder of images works the same; a bad spec is one line before the model loads
    folder = tmp_path / "images"
    folder.mkdir()
    for index in range(2):
        data.sample("validation", index).image.save(folder / f"{index}.png")
    assert "threshold" in _invoke("calibrate", "--model", tiny_demo_model, "--data", folder, "--n", 2)
    bad = runner.invoke(app, ["calibrate", "--model", "unused", "--data", str(tmp_path / "none")])
    assert bad.exit_code == 1 and "no images" in bad.stderr
    bad = runner.invoke(app, ["calibrate", "--model", "unused", "--signal", "entropy"])
    assert bad.exit_code == 1 and "signal must be one of" in bad.stderr


def test_eval_adaptive_reports_the_realised_average_and_the_counts(tiny_demo_model, tmp_path):
    printed = _invoke("eval", "--model-path", tiny_demo_model, "--methods", "duet", "--budgets", 64, "--n", 7,
                      "--batch-size", 7, "--no-control", "--adaptive", "coverage", "--calibration-n", 7,
                      "--output-dir", tmp_path)
    results = json.loads((tmp_path / "results.json").read_text())
    adaptive = next(row for row in results["rows"] if row["method"] == "duet")
    assert adaptive["adaptive"] == "coverage" and adaptive["budget"] == 64
    assert len(adaptive["item_tokens"]) == 7
    assert adaptive["avg_visual_tokens"] == pytest.approx(sum(adaptive["item_tokens"]) / 7)
    assert duet_vlm.from_dict(adaptive["reducer"]).threshold == adaptive["threshold"]
    table = (tmp_path / "results.md").read_text().splitlines()
    assert table[0].startswith("| method | budget | realised tok/layer |")
    assert table[3].startswith(f"| duet (adaptive: coverage) | 64 | {adaptive['avg_visual_tokens']:.1f} |")
    # the console wraps a long path at its width (pytest-xdist's temporary folders are longer)
    assert (tmp_path / "counts.png").stat().st_size > 5_000 and str(tmp_path / "counts.png") in printed.replace("\n", "")
    bad = runner.invoke(app, ["eval", "--model-path", str(tiny_demo_model), "--threshold", "0.5"])
    assert bad.exit_code == 1 and "--threshold needs --adaptive" in bad.stderr


def test_run_gives_each_image_of_a_batch_its_own_budget(tiny_demo_model, tmp_path):
    images = []
    for index in range(2):
        images.append(tmp_path / f"{index}.png")
        data.sample("test", index).image.save(images[-1])
    overlay = tmp_path / "rows.png"
    printed = _invoke("run", "--model", tiny_demo_model, "--image", images[0], "--image", images[1],
                      "--prompt", "what color is the circle ?", "--method", "visionzip", "--budgets", 32, 96,
                      "--max-new-tokens", 2, "--overlay", overlay)
    flat = " ".join(printed.split())
    assert "32.0" in flat and "96.0" in flat and overlay.stat().st_size > 10_000
    bad = runner.invoke(app, ["run", "--model", "unused", "--image", str(images[0]), "--image", str(images[1]),
                              "--prompt", "?", "--budgets", "32"])
    assert bad.exit_code == 1 and "1 given for 2 images" in bad.stderr


# ----------------------------------------------------------------------------- a checkpoint carries its reducer
def test_a_saved_reducer_is_loaded_and_attached_unless_told_otherwise(tiny_demo_model, tmp_path):
    import shutil

    assert duet_vlm.load_reducer(tiny_demo_model) is None
    folder = tmp_path / "tuned"
    shutil.copytree(tiny_demo_model, folder)
    reducer = duet_vlm.Adaptive(duet_vlm.make("visionzip", budget=96), signal="rank", threshold=3.0)
    path = duet_vlm.save_reducer(reducer, folder)
    assert path.name == duet_vlm.REDUCER_FILE and duet_vlm.load_reducer(folder) == reducer
    image = tmp_path / "scene.png"
    data.sample("test", 0).image.save(image)
    args = ["run", "--model", folder, "--image", image, "--prompt", "what color is the circle ?", "--max-new-tokens", 1,
            "--rounds", 1]
    assert "saved with the checkpoint" in " ".join(_invoke(*args).split())
    assert "duet 64" in " ".join(_invoke(*args, "--no-saved-reducer").split())
    assert "pool 32" in " ".join(_invoke(*args, "--method", "pool", "--budget", 32).split())
    (folder / duet_vlm.REDUCER_FILE).write_text("{not json")
    with pytest.raises(ValueError, match="is not a reducer record"):
        duet_vlm.load_reducer(folder)


def test_train_adaptive_carries_its_reducer_beside_the_weights(tmp_path):
    """``duet-vlm train --adaptive``: calibrated on training images before training, the same
    allocation in every step; the saved model (and every checkpoint) carries the reducer, and
    ``load_reducer`` rebuilds it."""
    from duet_vlm.demo.processor import build_processor

    processor = build_processor()
    checkpoint = tmp_path / "base"
    make_demo_llava(processor).save_pretrained(checkpoint)
    processor.save_pretrained(checkpoint)
    data = write_llava_json(tmp_path, n=2)
    out = tmp_path / "out"
    args = ["train", "--model", checkpoint, "--data", data, "--image-folder", tmp_path / "images", "--output-dir", out,
            "--method", "visionzip", "--budget", 96, "--adaptive", "distinct", "--calibration-items", 2,
            "--batch-size", 2, "--save-steps", 1, "--max-steps", 1]
    _invoke(*args)
    saved = duet_vlm.load_reducer(out)
    assert isinstance(saved, duet_vlm.Adaptive) and saved.signal == "distinct" and saved.threshold is not None
    assert saved.reducer == duet_vlm.make("visionzip", budget=96)
    assert duet_vlm.load_reducer(out / "checkpoint-1") == saved
    assert json.loads((out / "train_config.json").read_text())["reducer"] == saved.to_dict()
    assert "duet_vlm.load_reducer(path)" in (out / "README.md").read_text()
    bad = runner.invoke(app, ["train", "--model", "m", "--data", "synthetic", "--output-dir", str(out), "--budget", "64",
                              "--threshold", "0.5"])
    assert bad.exit_code != 0 and "--threshold needs --adaptive" in bad.output
