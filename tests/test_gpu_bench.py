"""``duet-vlm bench --gpu`` (``duet_vlm.bench.gpu``), checked where no GPU is: its smoke run at toy
shapes on the CPU (every column of every row present, consistent and written to the record as each
row finishes; the time budget skipping by name), and the set of files its recipe carries to the
lent GPU machine under that machine's 64 MiB (tools/gpu_bench.sh, docs/check.md).

The default suite runs LLaVA-1.5's and the four-image Qwen2.5-VL's toy shapes; ``-m matrix`` all five.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import re
import subprocess
from pathlib import Path

import pytest

from duet_vlm import compat
from duet_vlm.bench.gpu import FULL, SHAPES, SMOKE_SETTINGS, SMOKE_SHAPES, gpu_benchmark, markdown, shape_record

ROOT = Path(__file__).resolve().parent.parent
#: The wheels tools/gpu_bench.sh fetches, as `bash tools/gpu_bench.sh fetch` measured them (2026-11-28).
WHEEL_BYTES = {"transformers==5.24.0": 13_549_890, "regex==2026.5.9": 801_239}


def visual_tokens(name: str) -> int:
    """An image's visual tokens in a LLaVA shape: 576, or LLaVA-NeXT's 5 tiles with newlines."""
    return {"llava15_7b": 576, "llava_next_7b": 576 + 48 * 49}[name]


def _check_record(record: dict, shapes: list[str]) -> None:
    settings = record["settings"]
    assert list(record["shapes"]) == shapes and record["smoke"] and record["attention"] == "sdpa"
    batches = [f"batch {b}" for b in settings["batches"]]
    for name in shapes:
        shape = record["shapes"][name]
        assert shape["skipped"] == [] and list(shape["rows"]) == list(settings["rows"]), name
        full = shape["rows"][FULL]
        for row_name, cells in shape["rows"].items():
            errors = dict(cells.get("errors", {}))
            timed_static = row_name in settings["static_rows"]
            if timed_static and row_name != FULL and not compat.STATIC_UNDER_REDUCTION:
                # before transformers 5.24 a static cache under a reduction is refused by name
                assert "needs transformers 5.24 or newer" in errors.pop("static decoding")
                timed_static = False
            assert not errors, (name, row_name, errors)
            assert cells["prefill_s"] > 0 and cells["first_token_s"] > 0
            assert set(cells["decode_tokens_per_s"]) == set(batches) and all(v > 0 for v in cells["decode_tokens_per_s"].values())
            assert cells["kv_bytes"] > 0 and cells["peak_bytes"] is None  # no GPU: peak memory is not measured
            static = cells.get("static_decode_tokens_per_s")
            assert (static is not None) == timed_static
            if static is not None:
                assert static["compiled"] is False and all(static[b] > 0 for b in batches)
            if row_name == FULL:
                assert "visual_per_layer" not in cells and "ideal_prefill_s" not in cells
                continue
            # LLaVA-1.5's budget as the same share of each image's tokens (within the solver's 1 token per image)
            share = int(row_name.split()[-1]) / 576
            images = SMOKE_SHAPES[name].grids or [None]
            tokens = [t * h * w // 4 for t, h, w in images] if images[0] else [visual_tokens(name)]
            counts = cells["visual_per_layer"]  # the whole row's, all its images
            want = sum(max(1, round(share * n)) for n in tokens)
            assert abs(sum(counts) / len(counts) - want) <= len(tokens), (name, row_name, counts, want)
            assert cells["ideal_prefill_s"] > 0
            assert cells["decoder_flops"] < cells["decoder_flops_unreduced"]
            assert cells["kv_bytes"] < full["kv_bytes"]  # the cache holds the kept tokens only
    table = markdown(record)
    for name in shapes:
        rows = table.split(f"**{name}**")[1].split("**")[0]
        assert all(f"| {row} |" in rows for row in settings["rows"])


def test_the_smoke_run_fills_every_column_and_writes_as_it_goes(tmp_path):
    output = tmp_path / "gpu.json"
    seen = []

    def progress(label: str) -> None:  # the record on disk when each row starts: every earlier row in it
        seen.append((label, json.loads(output.read_text()) if output.exists() else None))

    shapes = ["llava15_7b", "qwen2_5_vl_7b_4images"]
    record = gpu_benchmark(shapes, output=output, smoke=True, progress=progress)
    _check_record(record, shapes)
    assert json.loads(output.read_text()) == json.loads(json.dumps(record))
    labels = [label for label, _ in seen]
    assert labels == [f"{s}: {r}" for s in shapes for r in [*SMOKE_SETTINGS.rows, "training"][: 4 if s == shapes[0] else 3]]
    for index, (label, written) in enumerate(seen[1:], 1):
        shape, row = label.split(": ")
        previous_shape, previous_row = labels[index - 1].split(": ")
        if previous_row != "training":  # the row before this one is on disk, measured
            assert written["shapes"][previous_shape]["rows"][previous_row]["prefill_s"] > 0, label
    training = record["shapes"]["llava15_7b"]["training"]
    assert list(training) == list(SMOKE_SETTINGS.training_rows)
    if compat.HOOKS_OUTSIDE_CHECKPOINT:
        assert all(row["step_s"] > 0 for row in training.values())
    else:  # transformers before 5.23: checkpointing under a reducer is refused by name, the unreduced step runs
        assert training[FULL]["step_s"] > 0
        assert "needs transformers 5.23 or newer" in training["duet 64"]["errors"]["training step"]


@pytest.mark.matrix
def test_the_smoke_run_of_every_shape():
    shapes = list(SMOKE_SHAPES)
    _check_record(gpu_benchmark(shapes, smoke=True, progress=lambda label: None), shapes)


def test_a_spent_time_budget_skips_each_cell_by_name(tmp_path):
    """Past the time budget a shape is not built, and within a shape no cell starts: each is named
    in the record and under its table, and the record is still written."""
    import torch

    settings = dataclasses.replace(SMOKE_SETTINGS, time_budget_s=0.0)
    record = gpu_benchmark(["llava15_7b", "qwen2_5_vl_7b_1k"], output=tmp_path / "gpu.json", smoke=True,
                           settings=settings, progress=lambda label: None)
    assert record["shapes"] == {name: {"skipped": ["the whole shape: time budget"]} for name in record["shapes"]}
    assert json.loads((tmp_path / "gpu.json").read_text())["shapes"] == record["shapes"]
    shape: dict = {}
    shape_record("llava15_7b", SMOKE_SHAPES["llava15_7b"], torch.device("cpu"), torch.float32, "sdpa", settings,
                 deadline=0.0, record=shape, write=lambda: None, progress=lambda label: None)
    assert shape["rows"] == {row: {} for row in settings.rows}
    assert f"{FULL}: prefill" in shape["skipped"] and "duet 64: training step" in shape["skipped"]
    assert "skipped (time budget): fastv 64: decoding" in markdown({**record, "shapes": {"llava15_7b": shape}})


def test_the_shapes_are_the_released_geometries():
    """The 7B shapes' decoders and visual tokens (built nowhere here: their sizes only)."""
    llava, qwen = SHAPES["llava15_7b"].size, SHAPES["qwen2_5_vl_7b_1k"].size
    assert (llava.hidden, llava.layers, llava.heads, llava.intermediate, llava.vision_hidden) == (4096, 32, 32, 11008, 1024)
    assert (qwen.hidden, qwen.layers, qwen.heads, qwen.kv_heads, qwen.intermediate, qwen.vocab) == (3584, 28, 28, 4, 18944, 152064)
    tokens = {name: sum(t * h * w // 4 for t, h, w in shape.grids) for name, shape in SHAPES.items() if shape.grids}
    assert tokens == {"qwen2_5_vl_7b_1k": 1008, "qwen2_5_vl_7b_4k": 4032, "qwen2_5_vl_7b_4images": 4032}
    assert set(SMOKE_SHAPES) == set(SHAPES)


def test_the_carried_set_fits_the_device_call():
    """The working tree that travels, once the fetch has moved tests/data/vectors aside, plus the wheels
    tools/gpu_bench.sh fetches stay under 64 MiB (the fetched wheels where .whl/ holds them, else their
    measured sizes), and the script fetches exactly those wheels and moves exactly that aside."""
    spec = importlib.util.spec_from_file_location("device_carry", ROOT / "tools" / "device_carry.py")
    carry = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(carry)
    script = (ROOT / "tools" / "gpu_bench.sh").read_text()
    assert re.findall(r'"([\w.-]+==[\w.]+)"', script.split("wheels=(")[1].split(")")[0]) == list(WHEEL_BYTES)
    fetched = ROOT / ".whl"
    wheels = carry.carried_bytes([fetched]) if fetched.is_dir() and any(fetched.iterdir()) else sum(WHEEL_BYTES.values())
    assert "device_carry.py --aside .whl" in script and "device_carry.py --restore" in script
    assert carry.ASIDE == ("tests/data/vectors",)
    assert carry.travelling_bytes(aside=carry.ASIDE) + wheels <= carry.LIMIT - 2 * 2**20  # 2 MiB to spare


def test_setting_aside_moves_the_vectors_out_of_what_travels_and_back(tmp_path):
    """``--aside`` moves tests/data/vectors into .aside/ (excluded from git): what travels shrinks by its
    bytes; ``--restore`` puts it back as it was."""
    spec = importlib.util.spec_from_file_location("device_carry", ROOT / "tools" / "device_carry.py")
    carry = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(carry)
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    (tmp_path / "tests" / "data" / "vectors").mkdir(parents=True)
    (tmp_path / "tests" / "data" / "vectors" / "a.safetensors").write_bytes(b"x" * 1000)
    (tmp_path / "kept.py").write_bytes(b"y" * 10)
    subprocess.run(["git", "add", "-A"], cwd=tmp_path, check=True)
    assert carry.travelling_bytes(tmp_path) == 1010 and carry.travelling_bytes(tmp_path, aside=carry.ASIDE) == 10
    carry.set_aside(tmp_path)
    assert not (tmp_path / "tests" / "data" / "vectors").exists()
    assert carry.travelling_bytes(tmp_path) == 10
    carry.restore(tmp_path)
    assert (tmp_path / "tests" / "data" / "vectors" / "a.safetensors").read_bytes() == b"x" * 1000
    assert carry.travelling_bytes(tmp_path) == 1010
