"""The adaptation experiment's plumbing on a tiny model of the demo's geometry: every fine-tune runs
with its reducer, every model is evaluated in every setting, a re-run reuses finished fine-tunes, and
the README's renderer reads what it wrote."""

import json
import sys
from pathlib import Path

from duet_vlm.demo.adaptation import AdaptationConfig, run
from duet_vlm.evaluation import weights_digest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "docs"))
from render import render_adaptation  # noqa: E402 - docs/render.py


def test_adaptation_runs_every_arm_and_resumes(tiny_demo_model, tmp_path):
    config = AdaptationConfig(output_dir=str(tmp_path), model=str(tiny_demo_model), budgets="64", steps=2,
                              batch_size=2, n=7)
    results = run(config)
    cells = {(row["model"], row["evaluated_with"]) for row in results["rows"]}
    models = ["shipped", "fine-tuned, all tokens", "fine-tuned, duet 64"]
    assert cells == {(model, setting) for model in models for setting in (None, 64)}
    assert all(row["n"] == 7 for row in results["rows"])
    trained = json.loads((tmp_path / "duet64" / "train_config.json").read_text())
    assert trained["method"] == "duet" and trained["budget"] == 64 and trained["synthetic_offset"] == 100_000
    assert json.loads((tmp_path / "full" / "train_config.json").read_text())["method"] == "full"
    assert results["meta"]["weights_sha256"] == weights_digest(tiny_demo_model)
    # the fine-tunes changed the weights; the starting model was not touched
    assert weights_digest(tmp_path / "duet64") != weights_digest(tiny_demo_model)

    first = results["meta"]["fine_tunes"]
    again = run(config)  # finished fine-tunes are reused, not retrained
    assert again["meta"]["fine_tunes"] == first
    # a fine-tune of other weights (a demo model since replaced) is redone, not reused
    timing = tmp_path / "duet64" / "adaptation_timing.json"
    timing.write_text(json.dumps({**json.loads(timing.read_text()), "base_sha256": "other weights"}))
    redone = run(config)["meta"]["fine_tunes"]
    assert redone["fine-tuned, duet 64"]["seconds"] != first["fine-tuned, duet 64"]["seconds"]
    assert redone["fine-tuned, duet 64"]["base_sha256"] == weights_digest(tiny_demo_model)
    assert redone["fine-tuned, all tokens"] == first["fine-tuned, all tokens"]

    table = render_adaptation(tmp_path, "adaptation.json").splitlines()
    assert table[2] == "| model | evaluated with all tokens | evaluated with duet 64 | fine-tune wall-clock |"
    assert [line.split(" | ")[0] for line in table[4:]] == ["| " + model for model in models]
