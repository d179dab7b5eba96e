"""The architecture is checked, not hoped for: the import contracts of pyproject.toml
(``[tool.importlinter]``) hold: each module imports only from the layers below its own; the library
a model runs under imports no command-line, plotting, fine-tuning or evaluation framework; and no
two modules of an upper-layer package import each other in a circle.

``lint-imports`` from the repository root gives the same report."""

import os
import subprocess
import sys
from pathlib import Path

import importlinter  # noqa: F401 - the `test` extra installs it; without it this check fails, it does not skip
import pytest

ROOT = Path(__file__).resolve().parent.parent


def lint(*contracts: str) -> subprocess.CompletedProcess:
    code = "import sys; from importlinter.cli import lint_imports_command; sys.exit(lint_imports_command())"
    command = [sys.executable, "-c", code, "--config", str(ROOT / "pyproject.toml"), "--no-cache"]
    for contract in contracts:
        command += ["--contract", contract]
    # the package as installed (editable: src/), not a stray copy on the working directory's path
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)


@pytest.mark.parametrize("contract", ["layers", "library", "acyclic"])
def test_import_contract_is_kept(contract):
    result = lint(contract)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
    assert "BROKEN" not in result.stdout and "1 kept, 0 broken" in result.stdout
