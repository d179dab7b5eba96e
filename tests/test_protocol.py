"""The reducer protocol: what the runtime may ask of a reducer (``duet_vlm.runtime.RuntimeReducer``)
is declared once, and mypy checks every registered method against it."""

import ast
import subprocess
import sys
from pathlib import Path

import mypy  # noqa: F401 - the `test` extra installs it; without it this check fails, it does not skip

import duet_vlm

ROOT = Path(__file__).resolve().parent.parent
TYPING = ROOT / "tests" / "typing" / "reducers.py"


def test_mypy_checks_every_method_against_the_protocol():
    result = subprocess.run(
        [sys.executable, "-m", "mypy", "--no-incremental", "--config-file", str(ROOT / "pyproject.toml"), str(TYPING)],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert "Success" in result.stdout


def test_the_checked_list_is_every_registered_method():
    """A new method joins the type check by being registered: the list mypy reads names them all."""
    tree = ast.parse(TYPING.read_text())
    listed = next(
        {element.id for element in node.value.elts}
        for node in tree.body
        if isinstance(node, ast.AnnAssign) and getattr(node.target, "id", "") == "classes"
    )
    registered = {cls.__name__ for cls in duet_vlm.METHODS.values()}
    assert registered <= listed, sorted(registered - listed)

