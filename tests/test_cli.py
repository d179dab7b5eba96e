"""The command line."""

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
