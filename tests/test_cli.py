"""The command line."""

import os
import subprocess
import sys

import pytest
from PIL import Image
from typer.testing import CliRunner

from duet_vlm.cli import app, layer_groups
from duet_vlm.cli.commands import debug_first

runner = CliRunner()


def test_plan_prints_the_paper_schedule():
    result = runner.invoke(app, ["plan", "--budget", "192", "--layers", "32", "--tokens", "576"])
    assert result.exit_code == 0, result.output
    assert "307 tokens enter the LLM" in " ".join(result.output.split())  # rich wraps long lines
    for row in ("1-16", "17-24", "25-32"):
        assert row in result.output
    assert "191.75" in result.output and "FLOPs (FastV formula)" in result.output and "KV cache" in result.output


def test_plan_presets_take_the_family_config():
    """``--preset qwen3.5``: transformers' default Qwen3.5 decoder, its hybrid pattern (attention in
    layers 3, 7, ...): DUET's default boundaries (16, 24) move to layers 15 and 23, which attend, and
    the costs count the linear-attention layers (whose states do not shrink) apart from the FastV
    formula; ``--preset internvl --tiles 2``: two 448 px tiles and a thumbnail of 256 tokens each."""
    from duet_vlm.costs import plan_costs

    result = runner.invoke(app, ["plan", "--preset", "qwen3.5", "--budget", "192"])
    assert result.exit_code == 0, result.output
    flat = " ".join(result.output.split())
    assert "784 visual tokens per image, 32 layers" in flat and "after layer 15" in flat and "after layer 23" in flat
    assert "FastV formula" not in flat and "linear-attention states" in flat
    costs = plan_costs("duet", budget=192, preset="qwen3.5")
    (_, _, reduced, full), = [row for row in costs.rows if "states" in row[0]]
    assert 0.5 < reduced / full < 1  # a quarter of the layers shrink their cache; the states stay
    assert plan_costs("fastv", budget=256, preset="internvl", tiles=2).tokens == 3 * 256
    # Gemma 3: 256 soft tokens, sliding layers whose window (4,096 by default) is longer than the prompt.
    gemma = plan_costs("duet", budget=64, preset="gemma3")
    assert gemma.tokens == 256 and [name for name, *_ in gemma.rows] == [
        "FLOPs (exact: sliding windows, image blocks)", "KV cache (sliding layers: last W - 1)"]
    _one_line_error(runner.invoke(app, ["plan", "--preset", "qwen3.5", "--budget", "64", "--layers", "8"]),
                    "--preset qwen3.5 sets the decoder; drop --layers")
    _one_line_error(runner.invoke(app, ["plan", "--preset", "qwen3.5", "--budget", "64", "--tiles", "2"]), "--tiles")
    _one_line_error(runner.invoke(app, ["plan", "--preset", "gemma", "--budget", "64"]), "unknown preset 'gemma'")


def test_plan_gemma4_ladder_chooses_the_cheapest_rung_that_reaches_the_budget():
    """``--preset gemma4 --ladder``: each rung's square image (8x8 .. 33x33 soft tokens), the tower's
    FLOPs growing with the rung (it runs on max_soft_tokens x 9 padded patches) and the decoder's
    level at a fixed budget; the choice is the smallest rung with at least the budget's tokens (64:
    the 70 rung as is; 128: 280, then DUET; 192: 560, since DUET's shape cannot average 192 of 256),
    and a budget above every rung gets the largest, unreduced. ``--soft-tokens`` picks a rung for a
    plan; both refuse what is not Gemma 4's."""
    from duet_vlm.costs import GEMMA4_LADDER, ladder_costs

    rungs, chosen = ladder_costs("duet", 128)
    assert [r.tokens for r in rungs] == [64, 121, 256, 529, 1089]
    assert chosen.max_soft_tokens == 280 and abs(chosen.plan.schedule.average - 128) <= 1
    towers = [r.encoder_flops for r in rungs]
    assert towers == sorted(towers) and len(set(towers)) == len(GEMMA4_LADDER)
    reduced = [r for r in rungs if r.plan is not None]
    assert max(r.decoder_flops for r in reduced) / min(r.decoder_flops for r in reduced) < 1.05
    assert ladder_costs("duet", 64)[1].max_soft_tokens == 70 and ladder_costs("duet", 64)[1].plan is None
    rungs192, chosen192 = ladder_costs("duet", 192)
    assert rungs192[2].unreachable and chosen192.max_soft_tokens == 560
    assert ladder_costs("fastv", 192)[1].max_soft_tokens == 280
    assert ladder_costs("duet", 2000)[1].max_soft_tokens == 1120 and ladder_costs("duet", 2000)[1].plan is None
    result = runner.invoke(app, ["plan", "--preset", "gemma4", "--budget", "128", "--ladder"])
    assert result.exit_code == 0, result.output
    assert "chosen: max_soft_tokens=280 (256 soft tokens), then duet to 128" in " ".join(result.output.split())
    result = runner.invoke(app, ["plan", "--preset", "gemma4", "--budget", "64", "--soft-tokens", "560"])
    assert result.exit_code == 0 and "529 visual tokens per image, 30 layers" in result.output
    _one_line_error(runner.invoke(app, ["plan", "--preset", "gemma3", "--budget", "64", "--ladder"]), "--ladder needs")
    _one_line_error(runner.invoke(app, ["plan", "--preset", "gemma3", "--budget", "64", "--soft-tokens", "280"]),
                    "--soft-tokens is a rung of Gemma 4's ladder")
    _one_line_error(runner.invoke(app, ["plan", "--preset", "gemma4", "--budget", "64", "--soft-tokens", "300"]),
                    "must be one of Gemma 4's 70, 140, 280, 560, 1120")


def test_plan_takes_a_methods_own_options():
    """``--option KEY=VALUE``: V2Drop's paper schedule for "128" (keep 0.28, 0.25, 0 of what remains)
    needs no budget; with a budget, an option shapes what the budget solves; a malformed or wrong
    option is one line."""
    result = runner.invoke(app, ["plan", "--method", "v2drop", "--option", "ratios=[0.28,0.25,0]"])
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert "v2drop at ratios=[0.28, 0.25, 0]" in text and "average: 131.00 visual tokens per layer" in text
    for row in ("1-3 576", "4-17 161", "18-22 40", "23-32 1"):
        assert row in text
    result = runner.invoke(app, ["plan", "--method", "v2drop", "--budget", "128", "--option", "layers=[2,17,22]"])
    assert result.exit_code == 0 and "after layer 2: keep 177" in " ".join(result.output.split()), result.output
    _one_line_error(runner.invoke(app, ["plan", "--method", "v2drop", "--option", "ratios"]), "KEY=VALUE, given 'ratios'")
    _one_line_error(runner.invoke(app, ["plan", "--method", "v2drop", "--option", "ratios=[0.5]"]),
                    "need one keep ratio per boundary layer")
    _one_line_error(runner.invoke(app, ["plan", "--method", "v2drop"]), "give --budget or --ratio")


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


def test_debug_after_the_command_shows_the_traceback_too(image):
    """The one-line error says ``--debug shows the traceback``; a user adds it where they read it, after
    the command, and it works there as before it."""
    for args in (["plan", "--budget", "0", "--debug"], ["plan", "--debug", "--budget", "0"],
                 ["--debug", "plan", "--budget", "0", "--debug"]):
        result = runner.invoke(app, args)
        assert result.exit_code == 1 and isinstance(result.exception, ValueError), args
        assert "budget must be a positive int" in str(result.exception)
    result = runner.invoke(app, ["run", "--model", "unused", "--image", str(image), "--prompt", "?", "--method", "x", "--debug"])
    assert isinstance(result.exception, ValueError) and "unknown method 'x'" in str(result.exception)
    # after "--" it is an argument, not the flag; train and train-demo hand theirs to their own parser
    assert debug_first(["plan", "--", "--debug"]) == ["plan", "--", "--debug"]
    assert debug_first(["train", "--debug", "x"]) == ["train", "--debug", "x"]


def test_an_unreachable_pyramiddrop_budget_names_the_lowest_and_what_reaches_lower():
    """``plan --preset internvl --method pyramiddrop --budget 64``: below what the boundaries can reach,
    the message names the lowest budget they reach (which then plans, and one below does not), and
    earlier boundaries and vision-side methods that reach the budget (each of which then plans)."""
    import re

    import duet_vlm
    from duet_vlm.geometry import Geometry

    result = runner.invoke(app, ["plan", "--preset", "internvl", "--method", "pyramiddrop", "--budget", "64"])
    _one_line_error(result, "79 is the lowest budget it reaches", 'make("pyramiddrop", budget=64, layers=(1, 8, 16))')
    for budget, tokens, layers in ((64, 1280, 32), (30, 576, 32), (10, 576, 32)):
        geometry = Geometry(layers, tokens, (1, tokens), False)
        with pytest.raises(ValueError, match="no lambda in") as error:
            duet_vlm.make("pyramiddrop", budget=budget).resolve(geometry)
        message = str(error.value)
        lowest = int(re.search(r"so (\d+) is the lowest budget", message)[1])
        assert abs(duet_vlm.make("pyramiddrop", budget=lowest).resolve(geometry).schedule.average - lowest) <= 1
        with pytest.raises(ValueError, match="lowest budget"):
            duet_vlm.make("pyramiddrop", budget=lowest - 1).resolve(geometry)
        advice = re.findall(r'(make\("pyramiddrop", budget=\d+, layers=\([\d, ]+\)\)|make\("visionzip", budget=\d+\)|'
                            r'Compose\(make\("visionzip"\), make\("pyramiddrop"\), budget=\d+\))', message)
        assert len(advice) == (3 if budget * layers / tokens >= 1 else 2), message  # earlier layers only where one layer fits
        for expression in advice:
            reducer = eval(expression, {"make": duet_vlm.make, "Compose": duet_vlm.Compose})
            assert abs(reducer.resolve(geometry).schedule.average - budget) <= 1, expression


def test_recorded_command_lines_name_paths_under_the_working_directory_relative_to_it(tmp_path, monkeypatch):
    """``command_line``, which every result file's ``command`` comes from: an absolute path under the
    working directory, as a value or in ``--option=PATH``, is written relative to it; a path outside
    it (a sibling folder whose name merely starts with the directory's included) stays absolute, and
    every other argument is left as it was."""
    from duet_vlm.cli.commands import command_line

    (tmp_path / "checkout").mkdir()
    monkeypatch.chdir(tmp_path / "checkout")
    here = os.getcwd()
    sibling = here + "-old/r.json"
    assert command_line(["check", "--model", "demo", "--json", f"{here}/reports/r.json"]) == \
        "duet-vlm check --model demo --json reports/r.json"
    assert command_line(["eval", f"--output-dir={here}/docs/eval", "--budgets", "64"]) == \
        "duet-vlm eval --output-dir=docs/eval --budgets 64"
    assert command_line(["check", "--json", sibling, "--image", "a.png", "--device", "cuda"]) == \
        f"duet-vlm check --json {sibling} --image a.png --device cuda"
    monkeypatch.setattr(sys, "argv", ["duet-vlm", "plan", "--budget", "64"])
    assert command_line() == "duet-vlm plan --budget 64"


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


# Issue #22: every command's user error is one line and a non-zero exit.
@pytest.mark.parametrize("n", ["0", "-3"])
def test_eval_with_no_questions_is_one_line(tmp_path, n):
    result = runner.invoke(app, ["eval", "--n", n, "--output-dir", str(tmp_path), "--methods", "duet"])
    _one_line_error(result, "--n must be at least 1")


@pytest.mark.parametrize("option, value, fragment", [
    ("--tokens", "0", "--tokens must be at least 1"),
    ("--layers", "0", "--layers must be at least 2"),
    ("--layers", "1", "--layers must be at least 2"),
    ("--frames", "0", "--frames must be at least 1"),
])
def test_plan_with_impossible_shapes_is_one_line(option, value, fragment):
    _one_line_error(runner.invoke(app, ["plan", "--budget", "64", option, value]), fragment)


def test_an_overlay_into_a_missing_folder_fails_before_the_model_loads(image, tmp_path):
    # --model "unused" would fail to load: the overlay's folder is checked first.
    result = _run(image, "--overlay", str(tmp_path / "missing" / "kept.png"))
    _one_line_error(result, "does not exist")


def test_a_budget_that_reduces_nothing_is_said_once_in_one_line(tiny_demo_model, image):
    """The no-op warning: once per run (not once per attach), one line, no Python source line."""
    command = [sys.executable, "-c", "from duet_vlm.cli import main; main()", "run", "--model", str(tiny_demo_model),
               "--image", str(image), "--prompt", "What?", "--budget", "600", "--max-new-tokens", "1"]
    env = dict(os.environ, PYTHONWARNINGS="default")
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    said = [line for line in result.stderr.splitlines() if "nothing is reduced" in line]
    assert said == ["warning: budget 600 >= 576 visual tokens per image: nothing is reduced"], result.stderr


def test_reproduce_without_lmms_eval_says_how_to_install_it():
    pytest.importorskip("typer")
    import importlib.util

    if importlib.util.find_spec("lmms_eval") is not None:
        pytest.skip("lmms-eval is installed here (tests/test_lmms_eval.py runs reproduce)")
    result = runner.invoke(app, ["reproduce", "--dry-run"])
    assert result.exit_code == 1
    assert "install the extra" in " ".join(result.output.split())


def test_eval_takes_a_composition(tmp_path):
    """``--methods divprune+random_horizon`` is the paper's "DivPrune + random": one row whose reducer
    is the composition under the budget, whose accuracy is the project evaluation's of that reducer on
    the same questions, and which drops at the horizon (layer 20 of the demo's 32) at 64."""
    import json

    from duet_vlm import Compose, make
    from duet_vlm.demo.evaluate import evaluate_accuracy, load_demo

    result = runner.invoke(app, ["eval", "--methods", "divprune+random_horizon", "--budgets", "64", "--n", "7",
                                 "--no-control", "--output-dir", str(tmp_path)])
    assert result.exit_code == 0, result.output
    row = next(r for r in json.loads((tmp_path / "results.json").read_text())["rows"] if r["budget"] == 64)
    assert row["method"] == "divprune+random_horizon" and row["reducer"]["method"] == "compose"
    reducer = Compose(make("divprune"), make("random_horizon"), budget=64)
    model, processor = load_demo(None)
    direct = evaluate_accuracy(model, processor, split="test", n=7, wrap=lambda: reducer(model), reducer=reducer)
    assert row["accuracy"] == direct["accuracy"]
    from duet_vlm.adapters import adapter_for

    layers = reducer.resolve(adapter_for(model).geometry, quiet=True).schedule.boundaries
    assert [layer for layer, _ in layers] == [20]
    _one_line_error(runner.invoke(app, ["eval", "--methods", "divprune+nope", "--n", "1"]), "unknown methods ['nope']")
