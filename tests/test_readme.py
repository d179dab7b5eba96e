"""The accuracy numbers of the README and of the site's pages are generated from files a command wrote,
and those files measured the weights that ship: a retrained model, a new evaluation or a hand edit of a
table shows up here. (tests/test_docs.py checks that every page renders current.)"""

import json
import os
import subprocess
import sys
from pathlib import Path

from duet_vlm.demo.evaluate import DEMO_MODEL_DIR, DEMO_MODELS
from duet_vlm.evaluation import weights_digest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "docs"))
from render import GENERATED_BLOCK, pages, render_readme  # noqa: E402 - docs/render.py
README = ROOT / "README.md"


def _blocks() -> list[tuple[str, list[str]]]:
    """Every generated block of the README and the pages, its arguments as paths from the repository
    root (a page's block names its files relative to the page)."""
    blocks = []
    for page in pages():
        for match in GENERATED_BLOCK.finditer(page.read_text()):
            kind, *args = match["spec"].split()
            blocks.append((kind, [os.path.relpath(page.parent / arg, ROOT) if arg != "--" else arg for arg in args]))
    return blocks


def test_generated_tables_are_current():
    text = README.read_text()
    assert render_readme(text, ROOT) == text, "stale README tables: run `python docs/render.py README.md`"


def test_the_docs_report_the_shipped_models():
    models = [paths for kind, paths in _blocks() if kind == "model"]
    shipped = {name: [str((folder / "metrics.json").relative_to(ROOT))] for name, folder in DEMO_MODELS.items()}
    assert all(paths in shipped.values() for paths in models)
    assert all(paths in models for paths in shipped.values()), "a shipped demo model's accuracy is on no page"


def test_every_accuracy_table_measured_the_shipped_weights():
    """Evaluations (``duet-vlm eval``, the adaptation experiment) record the digest of the weights
    they ran on; a table or figure from another model (an earlier demo model) fails here. An evaluation
    of the second shipped model (``--model qwen2_5_vl``) names it and must have measured its weights."""
    digests = {name: weights_digest(folder) for name, folder in DEMO_MODELS.items()}
    for kind, paths in _blocks():
        evaluated = (paths if kind in ("results", "positions", "adaptation") else paths[1:2] if kind == "figure"
                     else [path for path in paths if path != "--"] if kind == "beside" else [])
        for path in evaluated:
            meta = json.loads((ROOT / path).read_text())["meta"]
            model = "qwen2_5_vl" if meta.get("model") == "shipped demo model qwen2_5_vl" else "llava"
            assert meta["weights_sha256"] == digests[model], f"{path} was measured on other weights"
            assert meta["n"] >= 500, f"{path}: fewer than 500 questions per row"


def test_the_digest_check_catches_other_weights(tmp_path):
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "model.safetensors").write_bytes(b"other weights")
    assert weights_digest(model_dir) != weights_digest(DEMO_MODEL_DIR)


def test_a_hand_edit_of_a_generated_table_is_caught():
    text = README.read_text()
    match = next(GENERATED_BLOCK.finditer(text))
    edited = text[: match.start("body")] + match["body"].replace("|", "| 1", 1) + text[match.end("body"):]
    assert render_readme(edited, ROOT) == text


def test_the_renderer_checks_the_readme_from_the_command_line():
    """``python docs/render.py README.md --check``: the command a docs build runs."""
    command = [sys.executable, str(ROOT / "docs" / "render.py"), "README.md", "--check"]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
