"""`duet-vlm demo`, `eval` and `run` end to end on an untrained model of the demo's geometry."""

import json
import sys
from pathlib import Path

from typer.testing import CliRunner

import duet_vlm
from duet_vlm import synthetic as data
from duet_vlm.cli import app, expand_list_options
from duet_vlm.evaluation import weights_digest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "docs"))
from render import render_positions  # noqa: E402 - docs/render.py

runner = CliRunner()


def _invoke(*args):
    result = runner.invoke(app, expand_list_options([str(a) for a in args]))
    assert result.exit_code == 0, result.output + repr(result.exception)
    return result.output


def test_demo_prints_both_runs_and_writes_the_overlay(tiny_demo_model, tmp_path):
    png = tmp_path / "overlay.png"
    output = _invoke("demo", "--model-path", tiny_demo_model, "--output", png, "--rounds", 1)
    flat = " ".join(output.split())
    assert "DUET 64: decoder FLOPs x" in flat and "prefill time x" in flat
    assert png.stat().st_size > 10_000


def test_eval_writes_table_json_csv_and_plot(tiny_demo_model, tmp_path):
    output = _invoke(
        "eval", "--model-path", tiny_demo_model, "--methods", "duet", "visionzip", "--budgets", 192, 64, "--n", 7,
        "--batch-size", 4, "--output-dir", tmp_path, "--positions", "original",
    )
    results = json.loads((tmp_path / "results.json").read_text())
    rows = {(row["method"], row["budget"]): row for row in results["rows"]}
    assert set(rows) == {("full", None), ("duet", 192), ("duet", 64), ("visionzip", 192), ("visionzip", 64), ("blank image", None)}
    assert rows[("full", None)]["avg_visual_tokens"] == 576
    assert abs(rows[("duet", 64)]["avg_visual_tokens"] - 64) <= 1
    assert rows[("duet", 64)]["decoder_tflops_per_sample"] < rows[("full", None)]["decoder_tflops_per_sample"]
    assert all(row["n"] == 7 for row in results["rows"])
    # the position mode reaches the methods that have one; VisionZip hands the decoder a shorter input instead
    assert rows[("duet", 64)]["positions"] == "original" and rows[("visionzip", 64)]["positions"] is None
    default = _invoke("eval", "--model-path", tiny_demo_model, "--methods", "duet", "fastv", "--budgets", 192, "--n", 7,
                      "--batch-size", 7, "--no-control", "--output-dir", tmp_path / "default")
    assert "Synthetic visual QA" in default
    modes = {row["method"]: row["positions"] for row in json.loads((tmp_path / "default" / "results.json").read_text())["rows"]}
    assert modes == {"full": None, "duet": "contiguous", "fastv": "original"}  # each method's default, resolved
    table = render_positions(tmp_path, "results.json", "default/results.json").splitlines()
    assert table[0] == ("| method | budget | original: avg | original: relation | original: quadrant | "
                        "renumbered: avg | renumbered: relation | renumbered: quadrant |")
    assert [line.split(" | ")[:2] for line in table[2:]] == [["| duet", "192"], ["| duet", "64"], ["| fastv", "192"]]
    duet192, fastv192 = table[2].split(" | "), table[4].split(" | ")
    assert duet192[2] != "" and duet192[5] != ""  # both modes measured for DUET 192
    assert fastv192[2] != "" and fastv192[5] == ""  # FastV only in its default, original
    meta = results["meta"]
    assert meta["positions"] == "original" and meta["weights_sha256"] == weights_digest(tiny_demo_model)
    assert meta["chance"]["exists"] == 0.5
    assert (tmp_path / "results.csv").read_text().count("\n") == 7
    assert (tmp_path / "retention.png").stat().st_size > 5_000
    assert "Synthetic visual QA" in output  # the table was printed
    markdown = (tmp_path / "results.md").read_text().splitlines()
    assert len(markdown) == 2 + 6 + 1 and markdown[0].startswith("| method | budget | color |")
    assert markdown[2].startswith("| full |  |") and "| 576.0 |" in markdown[2]
    assert markdown[-1].startswith("| chance |  | 16.7 |")
    # every row records the reducer that ran, and the record rebuilds an equal reducer
    assert duet_vlm.from_dict(rows[("duet", 64)]["reducer"]) == duet_vlm.make("duet", budget=64, positions="original")
    assert duet_vlm.from_dict(rows[("visionzip", 192)]["reducer"]) == duet_vlm.make("visionzip", budget=192)
    assert duet_vlm.from_dict(rows[("full", None)]["reducer"]) == duet_vlm.make("full")
    assert "reducer" not in rows[("blank image", None)]


def test_eval_refuses_an_unknown_position_mode(tiny_demo_model, tmp_path):
    result = runner.invoke(app, ["eval", "--model-path", str(tiny_demo_model), "--positions", "shuffled"])
    assert result.exit_code != 0 and "--positions must be original or contiguous" in result.output


def test_run_on_a_local_checkpoint(tiny_demo_model, tmp_path):
    image = tmp_path / "scene.png"
    data.sample("test", 0).image.save(image)
    output = _invoke(
        "run", "--model", tiny_demo_model, "--image", image, "--prompt", "what color is the circle ?",
        "--method", "duet", "--budget", 128, "--max-new-tokens", 2, "--rounds", 1, "--overlay", tmp_path / "o.png",
    )
    assert "duet 128" in " ".join(output.split()) and (tmp_path / "o.png").exists()


def test_demo_without_a_model_says_how_to_get_one(tmp_path):
    result = runner.invoke(app, ["demo", "--model-path", str(tmp_path)])
    assert result.exit_code != 0 and "train-demo" in result.output


def test_eval_resumes_from_the_rows_a_previous_run_saved(tiny_demo_model, tmp_path):
    args = ["eval", "--model-path", tiny_demo_model, "--methods", "duet", "--budgets", 64, "--n", 7, "--batch-size", 7,
            "--output-dir", tmp_path]
    _invoke(*args)
    saved = tmp_path / "rows" / "duet-64.json"
    assert sorted(p.name for p in (tmp_path / "rows").iterdir()) == ["blank_image-all.json", "duet-64.json", "full-all.json"]
    record = json.loads(saved.read_text())
    saved.write_text(json.dumps({**record, "row": {**record["row"], "accuracy": 0.123}}))

    def duet64(*extra):
        _invoke(*args, *extra)
        rows = json.loads((tmp_path / "results.json").read_text())["rows"]
        return next(row["accuracy"] for row in rows if row["method"] == "duet")

    assert duet64() == 0.123  # the saved row is reused, not recomputed
    assert duet64("--no-resume") == record["row"]["accuracy"]  # recomputed, and saved again
    saved.write_text(json.dumps({**record, "key": {**record["key"], "weights_sha256": "other weights"}, "row": {**record["row"], "accuracy": 0.123}}))
    assert duet64() == record["row"]["accuracy"]  # a row of other weights is not reused
