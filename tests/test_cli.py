"""The command line."""

import os
import subprocess
import sys

import pytest
from PIL import Image
from typer.testing import CliRunner

from duet_vlm.cli import app, layer_groups

runner = CliRunner()


def test_plan_prints_the_paper_schedule():
    result = runner.invoke(app, ["plan", "--budget", "192", "--layers", "32", "--tokens", "576"])
    assert result.exit_code == 0, result.output
    assert "307 tokens enter the LLM" in " ".join(result.output.split())  # rich wraps long lines
    for row in ("1-16", "17-24", "25-32"):
        assert row in result.output
    assert "191.75" in result.output and "FLOPs (FastV formula)" in result.output and "KV cache" in result.output


def test_plan_rejects_a_bad_budget():
    result = runner.invoke(app, ["plan", "--budget", "0"])
    assert result.exit_code != 0 and "budget must be a positive int" in result.output


def test_layer_groups():
    assert layer_groups([5, 5, 3, 0, 0]) == [(1, 2, 5), (3, 3, 3), (4, 5, 0)]


# A user's mistake: one line on stderr, exit 1, no traceback; --debug shows the traceback.


def _one_line_error(result, *fragments):
    assert result.exit_code == 1, result.output
    assert not isinstance(result.exception, Exception) or isinstance(result.exception, SystemExit), result.exception
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    assert "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


@pytest.fixture
def image(tmp_path):
    path = tmp_path / "scene.png"
    Image.new("RGB", (336, 336), "white").save(path)
    return path


def _run(image, *extra):
    return runner.invoke(app, ["run", "--model", "unused", "--image", str(image), "--prompt", "What?", *extra])


def test_an_unreadable_image_is_one_line(tmp_path):
    not_an_image = tmp_path / "notes.png"
    not_an_image.write_text("not an image")
    _one_line_error(_run(not_an_image), "cannot identify image file", "notes.png")
    _one_line_error(_run(tmp_path / "missing.png"), "No such file or directory", "missing.png")


def test_a_wrong_model_path_is_one_line(image, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    missing = tmp_path / "no" / "such" / "model"
    _one_line_error(_run(image, "--model", str(missing)), "cannot load a checkpoint from --model", str(missing))
    _one_line_error(
        runner.invoke(app, ["demo", "--model-path", str(missing)]), "no demo model at", str(missing)
    )


def test_a_budget_out_of_range_is_one_line(image):
    _one_line_error(_run(image, "--budget", "0"), "budget must be a positive int")
    _one_line_error(runner.invoke(app, ["plan", "--budget", "-3"]), "budget must be a positive int", "-3")
    _one_line_error(runner.invoke(app, ["eval", "--budgets", "64", "--budgets", "0", "--n", "1"]), "budget must be a positive int")


def test_an_unknown_method_is_one_line(image):
    _one_line_error(_run(image, "--method", "duett"), "unknown method 'duett'", "duet, fastv")
    _one_line_error(runner.invoke(app, ["plan", "--budget", "64", "--method", "duett"]), "unknown method 'duett'")
    _one_line_error(runner.invoke(app, ["eval", "--methods", "duet", "--methods", "duett"]), "unknown methods ['duett']")


def test_typer_usage_errors_pass_through():
    result = runner.invoke(app, ["plan", "--budget", "many"])
    assert result.exit_code == 2 and "Usage:" in result.output and "Invalid value for '--budget'" in result.output


def test_debug_shows_the_traceback(image):
    result = runner.invoke(app, ["--debug", "plan", "--budget", "0"])
    assert result.exit_code == 1 and isinstance(result.exception, ValueError)
    assert "budget must be a positive int" in str(result.exception)
    result = runner.invoke(app, ["--debug", "run", "--model", "unused", "--image", str(image), "--prompt", "?", "--method", "x"])
    assert isinstance(result.exception, ValueError) and "unknown method 'x'" in str(result.exception)


def test_the_console_script_exits_non_zero_with_one_line_or_a_traceback():
    command = [sys.executable, "-c", "import sys; from duet_vlm.cli import main; sys.argv[0] = 'duet-vlm'; main()"]
    plain = subprocess.run([*command, "plan", "--budget", "0"], capture_output=True, text=True, timeout=300)
    assert plain.returncode == 1, plain.stderr
    assert plain.stderr.strip().splitlines() == [
        "Error: budget must be a positive int (visual tokens per layer per image), got 0 (--debug shows the traceback)"
    ]
    debug = subprocess.run([*command, "--debug", "plan", "--budget", "0"], capture_output=True, text=True, timeout=300,
                           env={**os.environ, "TYPER_STANDARD_TRACEBACK": "1"})
    assert debug.returncode == 1
    assert "Traceback (most recent call last)" in debug.stderr and "ValueError: budget must be a positive int" in debug.stderr
