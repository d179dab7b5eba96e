"""Every doctest in the package runs (a module's examples are tests too: a ``tower_groups`` that
may start with an empty group failed only its own doctest, which nothing ran).

Each module of ``duet_vlm`` that imports here is tested; one that needs an optional engine (vLLM,
lmms-eval) is tested where that engine is installed (the vLLM suite runs this file too), and listed
here as skipped otherwise. ``# doctest: +SKIP`` marks examples that need a model or a checkpoint.
"""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest

import duet_vlm

#: Modules that need what the default test environment does not have: (prefix, the package it needs).
OPTIONAL = {"duet_vlm.integrations.vllm": "vllm", "duet_vlm.integrations.lmms_eval_models": "lmms_eval",
            "duet_vlm.integrations.lmms_eval_qwen": "lmms_eval"}
# The package's modules (``__main__`` runs the command line when imported).
MODULES = [info.name for info in pkgutil.walk_packages(duet_vlm.__path__, "duet_vlm.") if not info.name.endswith("__main__")]


@pytest.mark.parametrize("name", MODULES)
def test_the_modules_doctests_pass(name):
    needs = next((package for prefix, package in OPTIONAL.items() if name.startswith(prefix)), None)
    if needs is not None:
        pytest.importorskip(needs)
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
    assert result.failed == 0, f"{name}: {result.failed} of {result.attempted} examples failed"


def test_the_modules_whose_doctests_were_never_run_have_examples():
    """The modules the mutation audit named (``compat``, Gemma 4's adapter) run examples here."""
    for name in ("duet_vlm.compat", "duet_vlm.adapters.gemma4"):
        assert doctest.testmod(importlib.import_module(name)).attempted > 0, name
