"""Fixtures that more than one test module uses, each defined once, here; a fixture only one module
uses stays in that module (tests/test_test_layout.py fails on a fixture name defined in two files).

The tiny models and their prompts are in tests/models.py, the checks more than one test module
uses in tests/checks.py; test modules import from those two (``from models import ...``,
``from checks import ...``), never from a ``test_*`` module.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

# Busy-waiting OpenMP threads multiply CPU time when other jobs share the cores (seen here: ~9x).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest
import torch

# The tiny-model factories live in tests/models.py; their LLaVA-1.5 names stay importable from here
# (tests/test_runtime.py imports them from conftest).
from models import FAMILIES, IMAGE_TOKEN, VOCAB, image_tokens, make_inputs, make_llava, row  # noqa: F401

# Recorded outputs of the official code of each method (a copy of ../shared/reference/vectors, kept in
# the repository so that the fidelity tests run on a fresh clone): the ``reference_dir`` fixture.
REFERENCE = Path(__file__).resolve().parent / "data" / "vectors"

# Two threads on this project's 2-core machines; under pytest-xdist (the README's `pytest -n auto`) the
# workers share the cores instead: one thread each, more where there are cores to spare. The cores are
# those this process may use (Linux), or the machine's.
_CORES = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
torch.set_num_threads(max(1, min(2, _CORES // _WORKERS)))


@pytest.hookimpl(optionalhook=True)  # an xdist hook: environments without xdist (the vLLM one) skip it
def pytest_xdist_auto_num_workers(config):
    """`-n auto`: one worker per core, at most 8 (each builds its own session-wide tiny models)."""
    return max(1, min(8, _CORES))


@pytest.fixture(
    scope="session",
    params=[
        # strict: the fix of a known failure turns it into a failure, to remove from models.py
        pytest.param(name, marks=pytest.mark.xfail(strict=True, raises=TypeError, reason=family.known_failure))
        if family.known_failure else name
        for name, family in FAMILIES.items()
    ],
)
def family(request):
    """Every family and tower variant of tests/models.py (``FAMILIES``), its model built once per
    session: ``family.model()``, ``family.one(model)``, ``family.batch(model)``, ``family.row(batch, b)``."""
    return FAMILIES[request.param]


@pytest.fixture(scope="session")
def llava15():
    """LLaVA-1.5 geometry (576 patches, 32 decoder layers), multi-head attention, sdpa."""
    return make_llava()


@pytest.fixture(scope="session")
def llava15_gqa():
    """The same geometry with grouped-query attention (2 KV heads for 4 query heads)."""
    return make_llava(kv_heads=2, seed=1)


@pytest.fixture(scope="session")
def tiny_demo_model(tmp_path_factory) -> Path:
    """The demo model's geometry (336 px, 576 patches, its processor) with tiny untrained widths,
    saved like the shipped model: for the commands that load a demo model directory."""
    from duet_vlm.demo.model import build_model, demo_config
    from duet_vlm.demo.processor import build_processor

    path = tmp_path_factory.mktemp("demo_model")
    processor = build_processor()
    config = demo_config(
        processor.tokenizer, vision_hidden=32, vision_intermediate=64, vision_layers=3, vision_heads=2,
        text_hidden=32, text_intermediate=64, text_layers=8, text_heads=2, text_kv_heads=1,
    )
    build_model(config).save_pretrained(path)
    processor.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def reference_dir() -> Path:
    """The in-repo reference vectors; missing files are an error, never a skip."""
    required = ["README.md", "inputs.json", "inputs.safetensors", "tiny-llava15-hf/model.safetensors"]
    missing = [name for name in required if not (REFERENCE / name).is_file()]
    if missing:
        raise FileNotFoundError(f"reference vectors missing from {REFERENCE}: {missing}")
    return REFERENCE


@pytest.fixture(scope="session")
def official_model(reference_dir):
    """The tiny LLaVA-1.5 the official runs were recorded on (``tiny-llava15-hf``), loaded once per
    session. Tests attach reducers to it and remove them; none changes its weights or config."""
    from transformers import LlavaForConditionalGeneration

    return LlavaForConditionalGeneration.from_pretrained(reference_dir / "tiny-llava15-hf").eval()


@pytest.fixture(scope="session")
def official(official_model, reference_dir):
    """``(model, input_ids, pixel_values, reference_dir)``: the official runs' model and their shared
    recorded input (sample 0 of ``inputs.json``: its prefix ids, the 576 image placeholders (999),
    its suffix ids; ``pixel_values_0`` of ``inputs.safetensors``)."""
    from safetensors.torch import load_file

    sample = json.loads((reference_dir / "inputs.json").read_text())["samples"][0]
    input_ids = torch.tensor([sample["prefix_ids"] + [999] * 576 + sample["suffix_ids"]])
    pixel_values = load_file(reference_dir / "inputs.safetensors")["pixel_values_0"]
    return official_model, input_ids, pixel_values, reference_dir


# Module-scoped below (a fresh copy for each module that asks, as when each module built its own).
@pytest.fixture(scope="module")
def model():
    """The 8-layer tiny LLaVA-1.5 (seed 2) of the generation-mode and serving tests, one forward
    already run (transformers adds its output-capturing hooks at the first forward)."""
    model = make_llava(layers=8, seed=2)
    with torch.no_grad():
        model(**make_inputs(model, seed=0))
    return model


@pytest.fixture(scope="module")
def processor():
    """The demo model's processor (``duet_vlm.demo.processor.build_processor``)."""
    from duet_vlm.demo.processor import build_processor

    return build_processor()


@pytest.fixture(scope="module")
def demo():
    """``(model, processor)`` of the shipped demo model (``duet_vlm.demo.evaluate.load_demo``)."""
    from duet_vlm.demo.evaluate import load_demo

    return load_demo()
