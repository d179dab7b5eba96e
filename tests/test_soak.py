"""Soak: threads sending a few hundred mixed requests to shared models with reducers attached.

Six tiny models of five families, each with one reducer attached persistently (a different method
each): LLaVA-1.5 with a CLIP tower (DUET), LLaVA with a SigLIP tower (FastV), Video-LLaVA with an
image and a video (VisionZip), LLaVA-NeXT with anyres images of two sizes (PyramidDrop),
LLaVA-OneVision with images of two sizes and a video (PIO) and Qwen2.5-VL with an image and a video
(SparseVLM). Each model gets requests of every mode: greedy ``generate`` (one item, a left-padded
batch of two, one row of it alone, a text-only prompt), beam search returning two sequences,
``use_cache=False``, a static cache, prompt lookup (with its drafts in the prefill: refused under a method that
prunes inside the language model, equal to greedy decoding under a vision-side one), a plain
forward's logits, and bad inputs interleaved: placeholders that do not match the features
(transformers' error), a video without frames (Video-LLaVA, refused).
No sampling: a sampled request would draw from the global generator every thread shares.

First every distinct request runs once, alone, in order, on the attached models: the reference
(each bad request must raise there). Then four threads send ``REQUESTS`` requests drawn from
them (seeded) at once; each outcome must equal its reference: the tokens or logits, the exception's
type and message, and for good requests the ``reducer.stats`` its thread reads right after it.
At the end every request runs again on a fresh attach of each model, after the threads are gone,
and equals its reference (no state of the soak changes a later call); the hooks on every model are
the ones before attaching; the tensors alive are those alive before the threads ran (nothing a
call made is kept), and the process's RSS grows by less in the second half of the requests than a
bound far below what keeping one call's state per request would take.

Qwen2.5-VL: transformers keeps ``rope_deltas`` on the model between calls, but (transformers 5.x)
``generate`` computes its 3-D positions once, at its start, and hands them to every step, so a call
from scratch writes ``rope_deltas`` and never reads it; only a call continuing a cache passed in
(or a forward on a cache without ``position_ids``) reads it. The soak makes no such call, and
``test_unpatched_qwen_is_safe_under_concurrent_generate`` checks the premise on the unpatched model.
"""

from __future__ import annotations

import gc
import os
import random
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable

import torch

import duet_vlm
from duet_vlm import compat

from checks import hook_ids, outcome, plain, same
from models import FAMILIES

SERVED = [  # (family, method)
    ("llava", "duet"),
    ("llava-siglip", "fastv"),
    ("video_llava", "visionzip"),
    ("llava_next", "pyramiddrop"),
    ("llava_onevision", "pio"),
    ("qwen2_5_vl", "sparsevlm"),
]
LANGUAGE_SIDE = {"duet", "fastv", "pio", "pyramiddrop", "sparsevlm"}
THREADS = 4
REQUESTS = 240
RATIO = 0.5
SLACK = 200  # tensors: a few calls' stats; a leak of one call's state per request is thousands


@dataclass
class Request:
    model: str  # the family
    kind: str
    call: Callable[[], object]
    error: str | None = None  # the exception type a bad request must raise


def placeholder_ids(model) -> list[int]:
    keys = ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")
    return [getattr(model.config, key) for key in keys if getattr(model.config, key, None) is not None]


def with_tokens(inputs: dict, tokens: list[int]) -> dict:
    """``inputs`` (one row) with text tokens appended."""
    out = dict(inputs)
    extra = torch.tensor([tokens])
    out["input_ids"] = torch.cat([inputs["input_ids"], extra], dim=1)
    out["attention_mask"] = torch.cat([inputs["attention_mask"], torch.ones_like(extra)], dim=1)
    if "mm_token_type_ids" in inputs:
        out["mm_token_type_ids"] = torch.cat([inputs["mm_token_type_ids"], torch.zeros_like(extra)], dim=1)
    return out


def without_placeholders(model, inputs: dict, count: int = 2) -> dict:
    """``inputs`` (one row) without its first ``count`` visual placeholders: fewer slots than features."""
    visual = torch.zeros_like(inputs["input_ids"][0], dtype=torch.bool)
    for token in (model.config.image_token_id, getattr(model.config, "video_token_id", None)):
        if token is not None:
            visual |= inputs["input_ids"][0] == token
    keep = torch.ones_like(visual)
    keep[visual.nonzero()[:count, 0]] = False
    return {
        key: value[:, keep] if key in ("input_ids", "attention_mask", "mm_token_type_ids") else value
        for key, value in inputs.items()
    }


def requests_for(name: str, model, method: str, reducers: dict) -> list[Request]:
    """The distinct requests to one model; good ones return their output and the stats of
    ``reducers[name]`` (the reducer attached at the time) read in their thread right after."""
    family = FAMILIES[name]
    one, batch = family.one(model), family.batch(model)
    alone = family.row(batch, 1)
    vocab = model.config.text_config.vocab_size
    mark, drafts = [vocab - 10, vocab - 9], [vocab - 8, vocab - 7, vocab - 6]
    lookup = with_tokens(one, mark + drafts + [vocab - 5] + mark)  # drafts in the prefill
    text = {"input_ids": torch.tensor([[1, vocab - 20, vocab - 21, vocab - 22, vocab - 23]])}
    text["attention_mask"] = torch.ones_like(text["input_ids"])
    if "mm_token_type_ids" in one:
        text["mm_token_type_ids"] = torch.zeros_like(text["input_ids"])
    greedy = dict(do_sample=False, suppress_tokens=placeholder_ids(model))

    def run(call, with_stats=True):
        def request():
            with torch.no_grad():
                out = call()
            return (out, plain(reducers[name].stats)) if with_stats else out

        return request

    def generate(inputs, new=4, **kwargs):
        return run(lambda: model.generate(**inputs, max_new_tokens=new, **greedy, **kwargs))

    out = [
        Request(name, "greedy", generate(one)),
        Request(name, "batch", generate(batch, 3)),
        Request(name, "row", generate(alone, 3)),
        Request(name, "text", generate(text, 3)),
        Request(name, "beams", generate(one, 3, num_beams=2, num_return_sequences=2)),
        Request(name, "no_cache", generate(one, 3, use_cache=False)),
        Request(name, "forward", run(lambda: model(**batch).logits)),
        Request(name, "mismatch", run(lambda: model(**without_placeholders(model, one)), False), "ValueError"),
        # refused by name before transformers 5.24 (``compat.check_static_cache``): an error request there
        Request(name, "static_cache", generate(one, 2, cache_implementation="static"),
                None if compat.STATIC_UNDER_REDUCTION else "NotImplementedError"),
    ]
    if method in LANGUAGE_SIDE:
        out.append(Request(name, "lookup", generate(lookup, 3, prompt_lookup_num_tokens=3), "NotImplementedError"))
    else:
        out.append(Request(name, "lookup", generate(lookup, 3, prompt_lookup_num_tokens=3)))
    if "pixel_values_videos" in one and one["pixel_values_videos"].dim() == 5:  # Video-LLaVA: (videos, frames, ...)
        empty = {**one, "pixel_values_videos": one["pixel_values_videos"][:, :0]}
        out.append(Request(name, "no_frames", run(lambda: model(**empty), False), "ValueError"))
    return out


def check(request: Request, want, got) -> None:
    if request.error is not None:
        assert got == want, f"{request.model} {request.kind}: {got}"
    else:
        assert not isinstance(got, str), f"{request.model} {request.kind}: {got}"
        assert same(got[0], want[0]), f"{request.model} {request.kind}: output differs from the request alone"
        assert got[1] == want[1], f"{request.model} {request.kind}: stats differ from the request alone"


def serve(requests: list[Request], reference: list, schedule: list[int]) -> None:
    """Run ``schedule`` (indices into ``requests``) from ``THREADS`` threads at once; check each."""
    with ThreadPoolExecutor(max_workers=THREADS) as pool:
        results = list(pool.map(lambda i: outcome(requests[i].call), schedule))
    for i, got in zip(schedule, results):
        check(requests[i], reference[i], got)


def rss_bytes() -> int:
    with open(f"/proc/{os.getpid()}/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def live_tensors() -> int:
    gc.collect()
    return sum(1 for obj in gc.get_objects() if issubclass(type(obj), torch.Tensor))


def build(name: str):
    family = FAMILIES[name]
    model = family.build()
    with torch.no_grad():  # transformers adds a tower's output-capturing hooks at its first forward
        model(**family.one(model))
        model(**family.batch(model))
    return model


def test_unpatched_qwen_is_safe_under_concurrent_generate():
    """The premise for serving Qwen2.5-VL in the soak: the unpatched model, four threads generating
    from prompts whose ``rope_deltas`` differ (images of three grids, a video), gives what each
    prompt gives alone."""
    from models import qwen_batch_for

    model = build("qwen2_5_vl")
    prompts = [[("image", 8, 8)], [("image", 12, 8)], [("image", 4, 16)], [("video", 2, 8, 4)]]
    inputs = [qwen_batch_for(model, [items], seed=i) for i, items in enumerate(prompts)]
    kwargs = dict(max_new_tokens=5, do_sample=False, suppress_tokens=placeholder_ids(model))

    def call(i):
        with torch.no_grad():
            return model.generate(**inputs[i], **kwargs)

    alone = [call(i) for i in range(len(inputs))]
    deltas = set()
    for i in range(len(inputs)):
        call(i)
        deltas.add(tuple(model.model.rope_deltas.flatten().tolist()))
    assert len(deltas) > 1  # the prompts leave different rope_deltas behind
    for _ in range(4):
        barrier = threading.Barrier(len(inputs))

        def job(i):
            barrier.wait(timeout=120)
            return call(i)

        with ThreadPoolExecutor(len(inputs)) as pool:
            results = list(pool.map(job, range(len(inputs))))
        assert all(torch.equal(got, want) for got, want in zip(results, alone))


def test_soak_of_mixed_requests_from_threads():
    models = {name: build(name) for name, _ in SERVED}
    hooks = {name: hook_ids(model) for name, model in models.items()}
    reducers = {name: duet_vlm.make(method, ratio=RATIO) for name, method in SERVED}
    handles = [reducers[name].attach(models[name]) for name, _ in SERVED]
    try:
        requests = [r for name, method in SERVED for r in requests_for(name, models[name], method, reducers)]

        # The reference: each request alone, in order, on the attached models.
        reference = [outcome(r.call) for r in requests]
        for r, want in zip(requests, reference):
            if r.error is None:
                assert not isinstance(want, str), f"{r.model} {r.kind}: {want}"
            else:
                assert isinstance(want, str) and want.startswith(r.error + ":"), f"{r.model} {r.kind}: {want}"

        rng = random.Random(22)
        schedule = [rng.randrange(len(requests)) for _ in range(REQUESTS)]
        tensors, rss = [live_tensors()], []
        for half in (schedule[: REQUESTS // 2], schedule[REQUESTS // 2 :]):
            serve(requests, reference, half)
            tensors.append(live_tensors())
            rss.append(rss_bytes())
        # Nothing a call made outlives it (the per-thread state of threads that are gone included):
        # the tensors alive after each half are those alive before, give or take the newest stats
        # each reducer keeps for threads that made no call.
        assert max(tensors) - tensors[0] <= SLACK, f"tensors alive before and after each half: {tensors}"
    finally:
        for handle in handles:
            handle.remove()
    assert {name: hook_ids(model) for name, model in models.items()} == hooks
    # A call's state is a few MB here (a prefill over a few hundred tokens): 120 requests keeping
    # theirs would take hundreds of MB; allocator noise stays far below the bound.
    assert rss[1] - rss[0] < 64 * 2**20, f"RSS grew by {(rss[1] - rss[0]) / 2**20:.0f} MiB in the second half"

    # After the soak, on fresh attaches: every request as before.
    for name, method in SERVED:
        reducers[name] = fresh = duet_vlm.make(method, ratio=RATIO)
        handle = fresh.attach(models[name])
        try:
            again = [
                (r, want, outcome(r.call)) for r, want in zip(requests, reference) if r.model == name
            ]
        finally:
            handle.remove()
        for r, want, got in again:
            check(r, want, got)
