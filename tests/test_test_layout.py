"""The layout of tests/ (issue #31): shared code in helper modules, fixtures defined once; and the
suite loads without pytest-xdist.

- No file under tests/ imports a ``test_*`` module: a check or helper two test modules use lives in
  tests/checks.py (tiny models and prompts in tests/models.py), not in one of the test modules.
- No fixture name is defined in two files: a fixture more than one module uses is defined once in
  tests/conftest.py; a module-local fixture has a name of its own. A deliberate override (a module
  replacing a conftest fixture for its tests) is listed in ``OVERRIDES`` with its files and reason.
- The suite loads without pytest-xdist: the README runs it with ``-n auto``, but the vLLM environment
  runs pytest without xdist, and a conftest hook of xdist's that is not optional stops pytest there
  before it collects anything (CI's vLLM step did, at f484c42).

The first two checks read the sources with ``ast`` (nothing is imported), so they cost nothing to run;
the third starts pytest's collection in a subprocess (a few seconds).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent

# Fixture name -> (the files defining it, relative to tests/, and why). Empty: no override today.
OVERRIDES: dict[str, tuple[frozenset[str], str]] = {}


def sources() -> list[Path]:
    return sorted(TESTS.rglob("*.py"))


def _is_test_module(dotted: str) -> bool:
    return any(part.startswith("test_") for part in dotted.split("."))


def imported_test_modules(source: str) -> list[str]:
    """The ``test_*`` modules ``source`` imports, anywhere in it (inside functions too):
    ``import test_x``, ``from test_x import y``, ``from tests.test_x import y``, ``from tests import
    test_x``, ``from . import test_x``, ``importlib.import_module("test_x")``, ``__import__("test_x")``."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names if _is_test_module(alias.name)]
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if _is_test_module(module):
                found.append(module)
            else:  # ``from tests import test_x`` / ``from . import test_x``: the names are modules
                found += [
                    f"{module}.{alias.name}".lstrip(".") for alias in node.names if alias.name.startswith("test_")
                    and (not module or module.split(".")[-1] == "tests")
                ]
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
            target = node.args[0].value
            if name in ("import_module", "__import__") and isinstance(target, str) and _is_test_module(target):
                found.append(target)
    return found


def _fixture_decorator(decorator: ast.expr) -> ast.expr | None:
    """The decorator if it is ``pytest.fixture``, ``fixture`` or either called, else ``None``."""
    func = decorator.func if isinstance(decorator, ast.Call) else decorator
    if (isinstance(func, ast.Attribute) and func.attr == "fixture") or (isinstance(func, ast.Name) and func.id == "fixture"):
        return decorator
    return None


def fixture_names(source: str) -> list[str]:
    """The names of the fixtures ``source`` defines (the ``name=`` of the decorator where given)."""
    names = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        for decorator in node.decorator_list:
            fixture = _fixture_decorator(decorator)
            if fixture is None:
                continue
            name = node.name
            if isinstance(fixture, ast.Call):
                for keyword in fixture.keywords:
                    if keyword.arg == "name" and isinstance(keyword.value, ast.Constant):
                        name = keyword.value.value
            names.append(name)
    return names


# ----------------------------------------------------------------------------- the scanners themselves
@pytest.mark.parametrize(
    "source, expected",
    [
        ("from test_serving import plain, same", ["test_serving"]),
        ("import test_methods_matrix as matrix", ["test_methods_matrix"]),
        ("from tests.test_pio import reference_nms", ["tests.test_pio"]),
        ("from tests import test_pio, models", ["tests.test_pio"]),
        ("from . import test_pio", ["test_pio"]),
        ("def f():\n    from test_train import tiny\n", ["test_train"]),
        ("import importlib\nimportlib.import_module('test_soak')", ["test_soak"]),
        ("from checks import hook_ids\nfrom models import make_llava\nimport pytest", []),
        ("from duet_vlm import testing_utils\nfrom models import test_inputs", []),  # names, not modules
    ],
    ids=["from", "import", "from-tests", "from-tests-names", "relative", "in-a-function", "importlib", "helpers",
         "names"],
)
def test_the_import_scanner_finds_test_modules(source, expected):
    assert imported_test_modules(source) == expected


def test_the_fixture_scanner_finds_every_form():
    source = '''
import pytest
from pytest import fixture

@pytest.fixture
def plain_one(): ...

@pytest.fixture(scope="module", params=[1, 2])
def called(request): ...

@fixture
def bare(): ...

@pytest.fixture(name="renamed")
def _renamed(): ...

class TestGroup:
    @pytest.fixture
    def in_a_class(self): ...

@pytest.mark.parametrize("x", [1])
def test_not_a_fixture(x): ...

def helper(): ...
'''
    assert sorted(fixture_names(source)) == ["bare", "called", "in_a_class", "plain_one", "renamed"]


# ----------------------------------------------------------------------------- the rules, on tests/
def test_no_test_module_is_imported():
    """Shared checks live in tests/checks.py (or tests/models.py), never in a test module."""
    offenders = {
        str(path.relative_to(TESTS)): found for path in sources() if (found := imported_test_modules(path.read_text()))
    }
    assert not offenders, f"move what these import into tests/checks.py: {offenders}"


def test_no_fixture_name_is_defined_in_two_files():
    """A fixture two modules use is defined once in tests/conftest.py; a module's own fixture has a
    name of its own (a module's ``model`` silently replaces conftest's ``model`` for its tests)."""
    files = defaultdict(set)
    for path in sources():
        for name in fixture_names(path.read_text()):
            files[name].add(str(path.relative_to(TESTS)))
    duplicated = {name: sorted(where) for name, where in files.items() if len(where) > 1}
    unlisted = {name: where for name, where in duplicated.items() if name not in OVERRIDES}
    assert not unlisted, (
        f"fixture names defined in more than one file: {unlisted}; define a shared one once in "
        "tests/conftest.py, rename a module-local one, or list a deliberate override in OVERRIDES"
    )
    stale = {name: sorted(where) for name, (where, _) in OVERRIDES.items() if set(duplicated.get(name, ())) != where}
    assert not stale, f"OVERRIDES entries that no longer match the files defining them: {stale}"


def test_the_scans_cover_the_suite():
    """The scans read the modules pytest collects, conftest and the helper modules."""
    names = {str(path.relative_to(TESTS)) for path in sources()}
    assert {"conftest.py", "checks.py", "models.py", "test_test_layout.py", "demo/test_demo.py"} <= names


def test_the_suite_collects_without_xdist():
    """pytest with xdist's plugin blocked (as where it is not installed) collects a module's tests."""
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:xdist", "-p", "no:cacheprovider", "--collect-only", "-q",
         str(Path(__file__).resolve())],
        cwd=TESTS.parent, capture_output=True, text=True, timeout=300,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "test_test_layout.py: " in run.stdout  # the file's count of tests (addopts' -q, with --collect-only's -q)
