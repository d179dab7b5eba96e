"""``duet-vlm check``'s invariants on a CUDA device (``pytest -m cuda``; skipped where torch sees none).

Every family's tiny model of tests/models.py, moved to the GPU in bfloat16, float16 and float32, under
SDPA, eager and (where the flash-attn package is installed) FlashAttention-2: for each method, the check
of ``duet_vlm.check.check_model`` passes -- ``full`` equals the unpatched model, the padded batch equals
its rows, the per-layer counts and KV caches equal the plan, the reduced prefill equals its ideal within
the dtype's tolerance, the generation modes behave as the table says, and removing the reducer restores
the model. These are the same checks the default suite runs on the CPU (tests/test_check.py); here the
kernels are CUDA's, where the arithmetic differs between shapes and the tolerances are the dtype's. In
half precision the padded batch and the generation modes are left out (see ``_report``).

``DUET_TEST_DEVICE`` picks another device (``cpu`` runs the same cases here, to try the file itself).
"""

from __future__ import annotations

import os

import pytest
import torch

from duet_vlm.check import check_model

from checks import assert_check_passes, family_on, release_needed
from models import FAMILIES

pytestmark = pytest.mark.cuda

DEVICE = os.environ.get("DUET_TEST_DEVICE", "cuda")
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
#: The methods of each kind the field serves most: DUET (both stages), FastV and PyramidDrop
#: (language side), SparseVLM and DART (language side, recycling and duplicates), VisionZip (vision side).
METHODS = ("duet", "fastv", "pyramiddrop", "sparsevlm", "dart", "visionzip")


def _flash_attention_installed() -> bool:
    from transformers.utils import is_flash_attn_2_available

    return is_flash_attn_2_available()


def _report(family_name: str, method: str, dtype: str, attn: str):
    if DEVICE.startswith("cuda") and not torch.cuda.is_available():
        pytest.skip("torch sees no CUDA device")
    if attn == "flash_attention_2" and not _flash_attention_installed():
        pytest.skip("the flash-attn package is not installed")
    family = FAMILIES[family_name]
    if family.known_failure:
        pytest.skip(f"known failure: {family.known_failure}")
    needed = release_needed(family.model())
    if needed is not None:
        pytest.skip(f"{family_name} needs transformers {needed}")
    if attn == "flash_attention_2" and dtype == "float32":
        pytest.skip("FlashAttention-2 runs in half precision only")
    model, batch, rows = family_on(family, DTYPES[dtype], DEVICE, attn)
    # The padded batch and the generation modes ask for the same tokens chosen and generated in two
    # shapes; the tiny models' random weights give nearly flat scores and logits, whose near-ties
    # half precision rounds apart (the padded check names them): they run in float32 here, and in
    # every dtype on the demo model (tools/cuda_check.sh).
    skip = ("timing",) if dtype == "float32" else ("timing", "modes", "padded")
    return check_model(model, batch, rows, method, ratio=0.5, rounds=1, new_tokens=3, skip=skip)


@pytest.mark.parametrize("attn", ["sdpa", "eager", "flash_attention_2"])
@pytest.mark.parametrize("family_name", sorted(FAMILIES))
def test_duet_in_bfloat16(family_name, attn):
    assert_check_passes(_report(family_name, "duet", "bfloat16", attn), family_name)


@pytest.mark.parametrize("dtype", ["float16", "float32"])
@pytest.mark.parametrize("family_name", sorted(FAMILIES))
def test_duet_in_other_dtypes(family_name, dtype):
    assert_check_passes(_report(family_name, "duet", dtype, "sdpa"), family_name)


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
@pytest.mark.parametrize("method", [m for m in METHODS if m != "duet"])
@pytest.mark.parametrize("family_name", sorted(FAMILIES))
def test_each_kind_of_method_under_sdpa(family_name, method, dtype):
    assert_check_passes(_report(family_name, method, dtype, "sdpa"), family_name)
