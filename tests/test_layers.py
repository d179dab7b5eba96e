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


@pytest.mark.parametrize("contract", ["layers", "library", "acyclic", "methods-independent"])
def test_import_contract_is_kept(contract):
    result = lint(contract)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
    assert "BROKEN" not in result.stdout and "1 kept, 0 broken" in result.stdout


def test_every_method_module_is_in_the_independence_contract():
    """A new method file joins "methods do not import methods" (pyproject.toml) by being listed."""
    import tomllib

    import duet_vlm

    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    contract = next(c for c in config["tool"]["importlinter"]["contracts"] if c["id"] == "methods-independent")
    modules = {cls.__module__ for cls in duet_vlm.METHODS.values()} - {"duet_vlm.methods.base"}
    assert modules <= set(contract["modules"]), sorted(modules - set(contract["modules"]))
    assert "duet_vlm.methods.stages" not in contract["modules"] and "duet_vlm.methods.shapes" not in contract["modules"]


def test_vision_scores_have_one_implementation():
    """The vLLM plugin and the adapters score vision tokens with ``duet_vlm.scoring``: they import it,
    and no softmax over attention logits is written anywhere else outside the methods (the one left
    in adapters/scheme.py is the language side's text-to-visual attention, ``visual_attention``,
    which the Hugging Face path and the vLLM plugin's language stages both call)."""
    import ast

    import grimp

    graph = grimp.build_graph("duet_vlm")
    for module in ("duet_vlm.integrations.vllm.select", "duet_vlm.integrations.vllm.families.qwen_vl",
                   "duet_vlm.adapters.base", "duet_vlm.adapters.qwen_vl"):
        assert graph.direct_import_exists(importer=module, imported="duet_vlm.scoring"), module
    src = ROOT / "src" / "duet_vlm"
    found = []
    for folder in ("adapters", "runtime", "integrations"):
        for path in sorted((src / folder).rglob("*.py")):
            tree = ast.parse(path.read_text())
            for function in ast.walk(tree):
                if not isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    continue
                for node in ast.walk(function):
                    if isinstance(node, ast.Attribute) and node.attr == "softmax":
                        found.append(f"{path.relative_to(src)}:{function.name}")
    assert sorted(set(found)) == ["adapters/scheme.py:visual_attention"], found
    assert graph.direct_import_exists(importer="duet_vlm.integrations.vllm.language.hooks", imported="duet_vlm.adapters.scheme")


def test_the_prefill_state_stays_small():
    """Issue #31's targets, kept: one PrefillState of at most 8 fields per call, no side table keyed
    by ``id(...)`` in the runtime (items and segments are their own keys), and a prefill's opening
    that reads as its steps (plan items, reduce vision, compact, open) in at most 30 lines."""
    import ast
    import dataclasses
    import re

    from duet_vlm.runtime.state import PrefillState

    assert len(dataclasses.fields(PrefillState)) <= 8, [f.name for f in dataclasses.fields(PrefillState)]
    runtime = ROOT / "src" / "duet_vlm" / "runtime"
    keyed = [f"{path.name}:{n}" for path in sorted(runtime.glob("*.py"))
             for n, line in enumerate(path.read_text().splitlines(), 1) if re.search(r"\bid\(", line)]
    assert not keyed, keyed
    tree = ast.parse((runtime / "prefill.py").read_text())
    start = next(node for node in tree.body if isinstance(node, ast.FunctionDef) and node.name == "start_prefill")
    assert start.end_lineno - start.lineno + 1 <= 30


def test_a_familys_language_side_is_one_object():
    """Issue #52's targets: the runtime asks the family's ``LayerScheme`` which mask each layer gets,
    so no runtime module names a layer kind or a mask source; ``ModelAdapter`` shed the members that
    moved there (at most 440 lines and 38 methods); the prefill visits the vision side once."""
    import ast
    import re

    runtime = ROOT / "src" / "duet_vlm" / "runtime"
    branches = re.compile(r'"(?:linear_attention|sliding_attention|full_attention)"|builds_masks|layer_masks|by_layer_type'
                          r'|isinstance\([^)]*attention_mask[^)]*dict\)')
    found = [f"{path.name}:{n}" for path in sorted(runtime.glob("*.py"))
             for n, line in enumerate(path.read_text().splitlines(), 1) if branches.search(line)]
    assert not found, found
    tree = ast.parse((ROOT / "src" / "duet_vlm" / "adapters" / "base.py").read_text())
    adapter = next(node for node in tree.body if isinstance(node, ast.ClassDef) and node.name == "ModelAdapter")
    methods = [node for node in adapter.body if isinstance(node, ast.FunctionDef)]
    assert adapter.end_lineno - adapter.lineno + 1 <= 440 and len(methods) <= 38, (adapter.end_lineno - adapter.lineno + 1, len(methods))
    prefill = ast.parse((runtime / "prefill.py").read_text())
    start = next(node for node in prefill.body if isinstance(node, ast.FunctionDef) and node.name == "start_prefill")
    calls = {node.func.id for node in ast.walk(start) if isinstance(node, ast.Call) and isinstance(node.func, ast.Name)}
    imported = {alias.name for node in prefill.body if isinstance(node, ast.ImportFrom) and node.module == "vision"
                for alias in node.names}
    assert calls & imported == {"vision_step"}, calls & imported
