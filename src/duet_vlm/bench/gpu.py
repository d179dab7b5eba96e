"""The speed table at the sizes users run (``duet-vlm bench --gpu``).

Random-weight models of released geometries, built on the device in bfloat16 (no download: cost does
not depend on the values): LLaVA-1.5-7B (576 visual tokens), LLaVA-NeXT-7B (a 672x672 image in 5
tiles, 2,928 visual tokens with newlines), Qwen2.5-VL-7B at 1,008 and 4,032 visual tokens and with
four images of 1,008. Each row (unreduced, DUET at 192 / 128 / 64, VisionZip, FastV and PyramidDrop
at 64; budgets of LLaVA-1.5's 576 tokens, kept as the same share of every image's own: ``ROWS``) is
measured in the same process, one after the other, with:

- ``prefill_s``: one forward of the prompt (tower, projector, decoder, a cache written, the last
  token's logits), median after warm-up; ``ideal_prefill_s`` beside it: the unpatched decoder layers
  fed the same per-layer token counts (``IdealModel``: nothing chooses them);
- ``first_token_s``: ``generate`` of one token;
- ``decode_tokens_per_s``: greedy decoding after the first token at batch 1 and 8 on the dynamic
  cache, and on the static cache (``cache_implementation="static"``, which ``generate`` compiles with
  CUDA graphs on a GPU: ``CompileConfig``'s ``reduce-overhead``; uncompiled on a CPU);
- ``peak_bytes`` (the batch-1 ``generate``, weights included), ``kv_bytes`` (its cache, measured),
  ``decoder_flops`` (the prefill's exact decoder FLOPs, ``duet_vlm.flops``);
- and a training step (forward, backward, AdamW on LoRA adapters of the language model, bfloat16,
  gradient checkpointing, batch 4) for unreduced and DUET 192 / 128 / 64.

On a GPU times come from CUDA events; elsewhere from the host clock. The record is written after
every row, so a run cut off keeps what it measured, and ``time_budget_s`` skips the cells that would
start after it (the record names them). ``smoke=True`` is the same at toy shapes on the CPU: the
test suite runs it to check the command and its record (tests/test_gpu_bench.py).

>>> record = gpu_benchmark(["llava15_7b"], output="gpu.json")              # doctest: +SKIP
>>> print(markdown(record))                                                # doctest: +SKIP
"""

from __future__ import annotations

import json
import platform
import statistics
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from ..compat import enable_checkpointing
from ..methods import make
from ..training.trainer import drop_input_grad_hooks
from .generate import cache_bytes
from .ideal import IdealModel
from .models import ModelSize, build_family
from .train import answer_labels

FULL = "no reduction"
#: The rows: (name, method, budget). The budget is LLaVA-1.5's (of its 576 tokens an image), kept as that
#: share of every item's own tokens (``ratio=budget / 576``), the field's convention for anyres images
#: and other towers: "64" keeps 64 of LLaVA-1.5's 576, 325 of LLaVA-NeXT's 2,928 (TRIO's 11.1 %), 112 of
#: a 1,008-token Qwen2.5-VL image.
LLAVA_TOKENS = 576
ROWS = [(FULL, None, None), ("duet 192", "duet", 192), ("duet 128", "duet", 128), ("duet 64", "duet", 64),
        ("visionzip 64", "visionzip", 64), ("fastv 64", "fastv", 64), ("pyramiddrop 64", "pyramiddrop", 64)]
TRAINING_ROWS = (FULL, "duet 192", "duet 128", "duet 64")
#: The rows whose static-cache decoding is compiled and timed by default (each new reducer compiles again).
STATIC_ROWS = (FULL, "duet 64")


@dataclass(frozen=True)
class Shape:
    """A geometry to time: a family of ``build_family``, its model's size and its images' grids."""

    family: str
    size: ModelSize
    grids: tuple[tuple[int, int, int], ...] | None = None
    note: str = ""


LLAMA_7B = ModelSize(hidden=4096, layers=32, heads=32, kv_heads=32, intermediate=11008)  # with CLIP-L/14-336
QWEN_7B = ModelSize(vision_hidden=1280, vision_layers=32, vision_heads=16, hidden=3584, layers=28, heads=28,
                    kv_heads=4, intermediate=18944, vocab=152064)
SHAPES = {
    "llava15_7b": Shape("llava", LLAMA_7B, note="LLaVA-1.5-7B: CLIP-L/14-336, Llama-2-7B; 576 visual tokens"),
    "llava_next_7b": Shape("llava_next", LLAMA_7B, note="LLaVA-NeXT-7B: a 672x672 image, 5 tiles; 2,928 visual tokens"),
    "qwen2_5_vl_7b_1k": Shape("qwen2_5_vl", QWEN_7B, ((1, 56, 72),), "Qwen2.5-VL-7B: a 784x1008 image; 1,008 tokens"),
    "qwen2_5_vl_7b_4k": Shape("qwen2_5_vl", QWEN_7B, ((1, 112, 144),), "Qwen2.5-VL-7B: a 1568x2016 image; 4,032 tokens"),
    "qwen2_5_vl_7b_4images": Shape("qwen2_5_vl", QWEN_7B, ((1, 56, 72),) * 4,
                                   "Qwen2.5-VL-7B: four 784x1008 images; 4 x 1,008 tokens"),
}
# The smoke run's toy shapes: the same families and layouts, small widths; 32 decoder layers, so that
# every method plans at budget 64 (FastV's first two layers hold all 576 tokens).
TOY = ModelSize(vision_hidden=32, vision_layers=2, vision_heads=2, hidden=64, layers=32, heads=4, kv_heads=2,
                intermediate=128)
SMOKE_SHAPES = {
    "llava15_7b": Shape("llava", TOY),
    "llava_next_7b": Shape("llava_next", TOY),
    "qwen2_5_vl_7b_1k": Shape("qwen2_5_vl", TOY, ((1, 32, 36),)),
    "qwen2_5_vl_7b_4k": Shape("qwen2_5_vl", TOY, ((1, 48, 48),)),
    "qwen2_5_vl_7b_4images": Shape("qwen2_5_vl", TOY, ((1, 32, 36),) * 4),
}


@dataclass(frozen=True)
class Settings:
    """How much of each column is measured (the defaults fit the table in one call on one H100 or H200)."""

    rows: tuple[str, ...] = tuple(name for name, _, _ in ROWS)
    training_rows: tuple[str, ...] = TRAINING_ROWS
    warmup: int = 2
    rounds: int = 5  # timed prefills, first tokens and training steps per row
    new_tokens: int = 16  # decoded per timed generate
    batches: tuple[int, ...] = (1, 8)
    static_rows: tuple[str, ...] = STATIC_ROWS
    static_shapes: tuple[str, ...] = ("llava15_7b", "qwen2_5_vl_7b_1k")
    training_shapes: tuple[str, ...] = ("llava15_7b",)
    training_batch: int = 4
    answer_tokens: int = 20
    time_budget_s: float = 540.0


# Every column of every shape at toy sizes, on three rows (the vision side and the language side).
SMOKE_SETTINGS = Settings(rows=(FULL, "duet 64", "fastv 64"), training_rows=(FULL, "duet 64"), warmup=0, rounds=1,
                          new_tokens=2, batches=(1, 2), static_shapes=tuple(SMOKE_SHAPES), training_shapes=("llava15_7b",),
                          training_batch=2, answer_tokens=4, time_budget_s=1e9)


class Clock:
    """Seconds of a call: CUDA events on a GPU (synchronised around it), the host clock elsewhere."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def now(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    def time(self, call: Callable[[], object]) -> float:
        if not self.cuda:
            start = time.perf_counter()
            call()
            return time.perf_counter() - start
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        begin.record()
        call()
        end.record()
        end.synchronize()
        return begin.elapsed_time(end) / 1000

    def median(self, call: Callable[[], object], settings: Settings) -> float:
        for _ in range(settings.warmup):
            call()
        return statistics.median(self.time(call) for _ in range(max(1, settings.rounds)))

    def peak(self, call: Callable[[], object]) -> int | None:
        """Peak bytes allocated on the GPU while ``call`` runs (``None`` on a CPU: not measured)."""
        if not self.cuda:
            call()
            return None
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        call()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated()


class _Stamps(StoppingCriteria):
    """The time each new token exists (synchronised on a GPU); never stops generation."""

    def __init__(self, clock: Clock):
        self.clock, self.times = clock, []

    def __call__(self, input_ids, scores, **kwargs):
        self.times.append(self.clock.now())
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


def repeat_rows(inputs: dict, batch: int) -> dict:
    """``inputs`` (one row) as ``batch`` identical rows: Qwen's flat patches and grids repeat along
    their first axis, everything else along the batch axis."""
    flat = "image_grid_thw" in inputs
    out = {}
    for key, value in inputs.items():
        if flat and key in ("pixel_values", "image_grid_thw"):
            out[key] = value.repeat(batch, *[1] * (value.dim() - 1))
        else:
            out[key] = value.expand(batch, *value.shape[1:]).contiguous()
    return out


def _on(inputs: dict, device: torch.device, dtype: torch.dtype) -> dict:
    return {k: v.to(device, dtype) if v.is_floating_point() else v.to(device) for k, v in inputs.items()}


def _row_counts(stats) -> list[int]:
    """Visual tokens per decoder layer of row 0 (all its items)."""
    items = [item for item in stats.items if item.row == 0]
    return [int(sum(item.tokens_per_layer[layer] for item in items)) for layer in range(len(items[0].tokens_per_layer))]


class Row:
    """One row's cells on one model, each measured by a method that records an error instead of raising."""

    def __init__(self, name: str, model, inputs: dict, clock: Clock, settings: Settings, reducer=None):
        self.name, self.model, self.inputs, self.clock, self.settings = name, model, inputs, clock, settings
        self.reducer = reducer
        self.cells: dict = {}

    def attached(self):
        return self.reducer(self.model) if self.reducer is not None else nullcontext()

    def generate(self, inputs: dict, new_tokens: int, stamps: _Stamps | None = None, **kwargs):
        criteria = StoppingCriteriaList([stamps]) if stamps is not None else None
        with torch.no_grad(), self.attached():
            return self.model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                                       pad_token_id=0, stopping_criteria=criteria, return_dict_in_generate=True, **kwargs)

    def prefill(self) -> None:
        def forward():
            with torch.no_grad(), self.attached():
                self.model(**self.inputs, logits_to_keep=1, use_cache=True)

        self.cells["prefill_s"] = self.clock.median(forward, self.settings)
        if self.reducer is not None:
            stats = self.reducer.stats
            self.cells.update(visual_per_layer=_row_counts(stats), decoder_flops=stats.flops_exact,
                              decoder_flops_unreduced=stats.flops_exact_full)

    def ideal(self) -> None:
        counts = self.cells.get("visual_per_layer")
        if counts is None:
            return
        ideal = IdealModel(self.model, self.inputs, counts)

        def forward():
            with torch.no_grad():
                self.model.lm_head(ideal.forward(ideal.new_cache())[:, -1:])

        self.cells["ideal_prefill_s"] = self.clock.median(forward, self.settings)

    def first_token(self) -> None:
        self.cells["first_token_s"] = self.clock.median(lambda: self.generate(self.inputs, 1), self.settings)

    def decode(self, static: bool) -> None:
        key = "static_decode_tokens_per_s" if static else "decode_tokens_per_s"
        rates = {}
        for batch in self.settings.batches:
            inputs = repeat_rows(self.inputs, batch) if batch > 1 else self.inputs
            extra = {"cache_implementation": "static"} if static else {}
            for _ in range(max(1, self.settings.warmup)):  # compiles and captures the graphs there
                self.generate(inputs, self.settings.new_tokens, **extra)
            stamps = _Stamps(self.clock)
            if batch == 1 and not static:
                out = None

                def run():
                    nonlocal out
                    out = self.generate(inputs, self.settings.new_tokens, stamps)

                self.cells["peak_bytes"] = self.clock.peak(run)
                self.cells["kv_bytes"] = cache_bytes(out.past_key_values)
            else:
                self.generate(inputs, self.settings.new_tokens, stamps, **extra)
            steps = len(stamps.times) - 1
            rates[f"batch {batch}"] = batch * steps / (stamps.times[-1] - stamps.times[0]) if steps > 0 else None
        if static:
            rates["compiled"] = self.clock.cuda  # generate compiles a static cache's steps on a GPU only
        self.cells[key] = rates


def _reducer(method: str | None, budget: int | None):
    """A row's reducer: ``budget`` of LLaVA-1.5's 576 tokens as a share of each item's own (``ROWS``)."""
    return None if method is None else make(method, ratio=budget / LLAVA_TOKENS)


def _cell(row: Row, name: str, measure: Callable[[], None], deadline: float, skipped: list[str]) -> None:
    if time.monotonic() > deadline:
        skipped.append(f"{row.name}: {name}")
        return
    try:
        measure()
    except Exception as error:  # a cell that cannot run is recorded with its reason, the others go on
        row.cells.setdefault("errors", {})[name] = f"{type(error).__name__}: {error}"[:400]


def training_rows(model, inputs: dict, clock: Clock, settings: Settings, deadline: float, skipped: list[str]) -> dict:
    """A training step (forward, backward, AdamW) on LoRA adapters of the language model's projections,
    with gradient checkpointing, for each of ``TRAINING_ROWS``; the model is left with the adapters."""
    from peft import LoraConfig, get_peft_model

    base = model
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=(
        r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)")))
    model.train()
    enable_checkpointing(model, use_reentrant=False)
    drop_input_grad_hooks(model)  # as `duet-vlm train` does: the frozen tower stays out of autograd
    batch = repeat_rows(inputs, settings.training_batch)
    labels = answer_labels(batch, settings.answer_tokens)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-6)
    rows = {}
    for name in settings.training_rows:
        method, budget = next((m, b) for n, m, b in ROWS if n == name)
        row = Row(name, base, batch, clock, settings, _reducer(method, budget))

        def step(row=row):
            with row.attached():
                loss = model(**batch, labels=labels, use_cache=False).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        def measure(row=row, step=step):
            row.cells["step_s"] = clock.median(step, settings)
            row.cells["peak_bytes"] = clock.peak(step)

        _cell(row, "training step", measure, deadline, skipped)
        rows[name] = row.cells
    return rows


def shape_record(name: str, shape: Shape, device: torch.device, dtype: torch.dtype, attn: str, settings: Settings,
                 deadline: float, record: dict, write: Callable[[], None], progress: Callable[[str], None]) -> None:
    """Every row of one geometry (and its training step where ``settings`` asks) into ``record``, the
    shape's entry in the whole record, which ``write()`` writes after each row."""
    started = time.monotonic()
    model, inputs = build_family(shape.family, shape.size, device=str(device), dtype=dtype, grids=shape.grids)
    model.set_attn_implementation(attn)
    inputs = _on(inputs, device, dtype)
    clock = Clock(device)
    if clock.cuda:
        torch.cuda.synchronize()
    record.update(family=shape.family, model=asdict(shape.size), note=shape.note, grids=shape.grids,
                  prompt_tokens=int(inputs["input_ids"].shape[1]), build_s=time.monotonic() - started,
                  weights_bytes=sum(p.numel() * p.element_size() for p in model.parameters()), rows={}, skipped=[])
    skipped = record["skipped"]
    for row_name, method, budget in ROWS:
        if row_name not in settings.rows:
            continue
        progress(f"{name}: {row_name}")
        row = Row(row_name, model, inputs, clock, settings, _reducer(method, budget))
        record["rows"][row_name] = row.cells
        _cell(row, "prefill", row.prefill, deadline, skipped)
        _cell(row, "ideal prefill", row.ideal, deadline, skipped)
        _cell(row, "first token", row.first_token, deadline, skipped)
        _cell(row, "decoding", lambda row=row: row.decode(static=False), deadline, skipped)
        if name in settings.static_shapes and row_name in settings.static_rows:
            _cell(row, "static decoding", lambda row=row: row.decode(static=True), deadline, skipped)
        write()
    if name in settings.training_shapes:
        progress(f"{name}: training")
        record["training"] = training_rows(model, inputs, clock, settings, deadline, skipped)
        write()
    del model
    if clock.cuda:
        torch.cuda.empty_cache()


def gpu_benchmark(shapes: list[str] | None = None, output: str | Path | None = None, smoke: bool = False,
                  settings: Settings | None = None, device: str | None = None, attn: str | None = None,
                  progress: Callable[[str], None] = print, command: str = "") -> dict:
    """The table: each of ``shapes`` (``SHAPES``' names; all by default) built in turn on ``device``
    (CUDA when there is one), every row measured, ``output`` rewritten after every row. ``attn``:
    FlashAttention-2 where ``flash_attn`` imports, SDPA otherwise (the record says which ran)."""
    catalogue = SMOKE_SHAPES if smoke else SHAPES
    names = list(shapes or catalogue)
    unknown = [name for name in names if name not in catalogue]
    if unknown:
        raise ValueError(f"unknown shapes {unknown}; choose from {', '.join(catalogue)}")
    settings = settings or (SMOKE_SETTINGS if smoke else Settings())
    where = torch.device(device or ("cuda" if torch.cuda.is_available() and not smoke else "cpu"))
    dtype = torch.bfloat16 if where.type == "cuda" else torch.float32
    if attn is None:
        try:
            import flash_attn  # noqa: F401

            attn = "flash_attention_2" if where.type == "cuda" else "sdpa"
        except ImportError:
            attn = "sdpa"
    import transformers

    record = {
        "benchmark": "gpu", "command": command, "smoke": smoke, "device": _device_name(where), "dtype": str(dtype),
        "attention": attn, "torch": torch.__version__, "transformers": transformers.__version__,
        "python": platform.python_version(), "settings": asdict(settings), "shapes": {}, "elapsed_s": 0.0,
    }
    started = time.monotonic()
    deadline = started + settings.time_budget_s

    def write():
        record["elapsed_s"] = time.monotonic() - started
        if output:
            Path(output).parent.mkdir(parents=True, exist_ok=True)
            Path(output).write_text(json.dumps(record, indent=1) + "\n")

    for name in names:
        if time.monotonic() > deadline:
            record["shapes"][name] = {"skipped": ["the whole shape: time budget"]}
            continue
        record["shapes"][name] = {}
        shape_record(name, catalogue[name], where, dtype, attn, settings, deadline, record["shapes"][name], write, progress)
        write()
    write()
    return record


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def _ms(value) -> str:
    return "—" if value is None else f"{1000 * value:.1f}"


def _gib(value) -> str:
    return "—" if value is None else f"{value / 2**30:.2f}"


def _ratio(value, reference) -> str:
    return "—" if value is None or not reference else f"{reference / value:.2f}x"


def markdown(record: dict) -> str:
    """The record as tables: per shape, each row's columns (speed-ups against the unreduced row), then
    the training steps."""
    lines = [f"{record['device']}, {record['dtype']}, {record['attention']}, torch {record['torch']}, "
             f"transformers {record['transformers']}; {record['settings']['new_tokens']} new tokens per decode."]
    batches = [f"batch {b}" for b in record["settings"]["batches"]]
    for name, shape in record["shapes"].items():
        rows = shape.get("rows", {})
        about = "; ".join(part for part in (shape.get("note"), f"{shape.get('prompt_tokens', '?')} prompt tokens") if part)
        lines += ["", f"**{name}** ({about})", "",
                  "| row | visual / layer | prefill ms | speed-up | ideal ms | first token ms | "
                  + " | ".join(f"tok/s b{b.split()[1]}" for b in batches) + " | "
                  + " | ".join(f"static tok/s b{b.split()[1]}" for b in batches) + " | peak GiB | KV MiB | decoder TFLOPs |",
                  "|---" * (9 + 2 * len(batches)) + "|"]
        reference = rows.get(FULL, {}).get("prefill_s")
        unreduced_flops = next((c["decoder_flops_unreduced"] for c in rows.values() if "decoder_flops_unreduced" in c), None)
        for row_name, cells in rows.items():
            counts = cells.get("visual_per_layer")
            dynamic, static = cells.get("decode_tokens_per_s", {}), cells.get("static_decode_tokens_per_s", {})
            flops = cells.get("decoder_flops", unreduced_flops if row_name == FULL else None)
            lines.append("| " + " | ".join([
                row_name, "all" if counts is None else f"{sum(counts) / len(counts):.0f}",
                _ms(cells.get("prefill_s")), _ratio(cells.get("prefill_s"), reference), _ms(cells.get("ideal_prefill_s")),
                _ms(cells.get("first_token_s")),
                *(f"{rate:.1f}" if rate else "—" for rate in [dynamic.get(b) for b in batches] + [static.get(b) for b in batches]),
                _gib(cells.get("peak_bytes")),
                "—" if cells.get("kv_bytes") is None else f"{cells['kv_bytes'] / 2**20:.1f}",
                "—" if flops is None else f"{flops / 1e12:.2f}",
            ]) + " |")
        training = shape.get("training")
        if training:
            step = training.get(FULL, {}).get("step_s")
            lines += ["", "| training row | step s | shorter by | peak GiB |", "|---|---|---|---|"]
            for row_name, cells in training.items():
                value = cells.get("step_s")
                shorter = "—" if value is None or not step else f"{100 * (1 - value / step):.0f}%"
                lines.append(f"| {row_name} | {'—' if value is None else f'{value:.3f}'} | {shorter} | "
                             f"{_gib(cells.get('peak_bytes'))} |")
        errors = {f"{row}: {cell}": why for row, cells in rows.items() for cell, why in cells.get("errors", {}).items()}
        if errors or shape.get("skipped"):
            lines += [""] + [f"- could not run {key}: {why}" for key, why in errors.items()]
            lines += [f"- skipped (time budget): {key}" for key in shape.get("skipped", [])]
    return "\n".join(lines) + "\n"
