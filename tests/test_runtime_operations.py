"""What the runtime does around a prefill's decoder layers, counted in tensor operations
(``bench.timing.OperationClock``: the same count on every machine and every run, where seconds are
not; on a GPU each is a kernel launch).

A layer that no boundary opens costs the runtime's hook no tensor operation: it hands the layer
its segment's mask, positions and RoPE, made once at the segment's boundary. The one exception is
a family whose layers each take a per-token argument of their own (Gemma 4's per-layer input, a
slice the model cuts for each layer): after a boundary it is gathered to the segment's tokens, one
operation per layer. On every family and tower variant, for one item and for a left-padded batch,
under a method that prunes in the language model (FastV) and DUET.

What the runtime adds to a whole prefill, hooks and stages together, is bounded the same way: the
count of one forward under a method less the unpatched forward's on the same inputs, per family,
one row and a batch, under ``full``, FastV, DUET and VisionZip, may not exceed what it was when the
bound was written (``ADDED_OPERATIONS``, printed by ``tools/runtime_operations.py``): a runtime change
that does more work per prefill fails here, where seconds would hide it in noise.

A decoding step after a reduced prefill makes no host sync (a device-to-host read: ``.item()``,
``bool`` of a tensor, ``nonzero``) beyond the unpatched model's in the same step: a compiled or
CUDA-graphed decode stalls on each. Gemma's masks, built again for the kept tokens, made one or two
per step (the check whether a mask could be skipped) until they were built without it.
"""


import pytest
import torch

import duet_vlm
from duet_vlm import compat
from duet_vlm.adapters import adapter_for
from duet_vlm.bench.timing import OperationClock, forward_operations

from checks import decoding_syncs

METHODS = ("full", "fastv", "duet", "visionzip")

#: Per family and inputs (``one``: one row; ``batch``: the left-padded batch), the tensor operations one
#: forward under each of ``METHODS`` (ratio 0.5) adds to the unpatched forward on the same inputs, as
#: counted when the bound was written (``python tools/runtime_operations.py`` prints this table; lower
#: it where a change makes the runtime do less).
#: Counted on transformers 5.24 (the default suite's release): where the model's own code differs,
#: what the runtime does around it may differ by a few operations (Gemma 4 on 5.19, one or two more
#: under VisionZip), so the bound holds on the release it was counted on.
COUNTED_ON = "5.24"
ADDED_OPERATIONS = {
    ("llava", "one"): (37, 118, 244, 114),
    ("llava", "batch"): (54, 208, 346, 144),
    ("llava-siglip", "one"): (37, 119, 248, 117),
    ("llava-siglip", "batch"): (54, 210, 351, 147),
    ("llava_next", "one"): (63, 145, 277, 146),
    ("llava_next", "batch"): (94, 312, 588, 268),
    ("llava_next-siglip", "one"): (59, 141, 276, 145),
    ("llava_next-siglip", "batch"): (90, 308, 587, 267),
    ("llava_onevision", "one"): (40, 121, 264, 135),
    ("llava_onevision", "batch"): (101, 389, 774, 365),
    ("llava_onevision-clip", "one"): (66, 147, 278, 149),
    ("llava_onevision-clip", "batch"): (105, 393, 772, 363),
    ("video_llava", "one"): (40, 122, 258, 127),
    ("video_llava", "batch"): (67, 361, 678, 267),
    ("qwen2_vl", "one"): (45, 129, 262, 137),
    ("qwen2_vl", "batch"): (80, 374, 749, 351),
    ("qwen2_5_vl", "one"): (45, 129, 284, 159),
    ("qwen2_5_vl", "batch"): (80, 374, 805, 407),
    ("qwen3_vl", "one"): (63, 156, 303, 160),
    ("qwen3_vl", "batch"): (135, 479, 886, 429),
    ("qwen3_5", "one"): (45, 144, 284, 137),
    ("qwen3_5", "batch"): (87, 464, 802, 363),
    ("qwen3_5-moe", "one"): (45, 144, 284, 137),
    ("qwen3_5-moe", "batch"): (87, 464, 802, 363),
    ("internvl", "one"): (37, 118, 247, 118),
    ("internvl", "batch"): (60, 348, 691, 282),
    ("gemma3", "one"): (43, 216, 439, 170),
    ("gemma3", "batch"): (66, 375, 699, 236),
    ("gemma4", "one"): (47, 199, 409, 255),
    ("gemma4", "batch"): (72, 438, 843, 443),
}


def hook_operations(model, reducer, inputs) -> tuple[dict[int, int], list[list[int]]]:
    """Per decoder layer, the tensor operations of the hooks before it (the runtime's, between a
    pre-hook put first and one put last), and each item's visual tokens per layer."""
    layers = model.model.language_model.layers
    counts: dict[int, int] = {}
    with OperationClock() as clock, reducer(model):
        handles = []
        for index, layer in enumerate(layers):
            def first(module, args, kwargs, index=index):
                counts[index] = -clock.read()

            def last(module, args, kwargs, index=index):
                counts[index] += clock.read()

            handles += [layer.register_forward_pre_hook(first, with_kwargs=True, prepend=True),
                        layer.register_forward_pre_hook(last, with_kwargs=True)]
        try:
            with torch.no_grad():
                model(**inputs)
        finally:
            for handle in handles:
                handle.remove()
        per_item = [list(item.tokens_per_layer) for item in reducer.stats.items]
    return counts, per_item


def boundaries(per_item: list[list[int]]) -> set[int]:
    """The layers before which some item's visual tokens change."""
    return {layer for counts in per_item for layer in range(1, len(counts)) if counts[layer] != counts[layer - 1]}


@pytest.mark.parametrize("method", ["fastv", "duet"])
@pytest.mark.parametrize("inputs", ["one", "batch"])
def test_a_layer_no_boundary_opens_costs_the_runtime_no_tensor_operation(family, method, inputs):
    model = family.model()
    counts, per_item = hook_operations(model, duet_vlm.make(method, ratio=0.5), getattr(family, inputs)(model))
    opened = boundaries(per_item)
    assert opened, per_item  # the method pruned inside the language model
    assert all(counts[layer] > 0 for layer in opened)  # the clock sees a boundary's work
    gathers = adapter_for(model).scheme.layer_token_argument is not None
    after_first = range(min(opened) + 1, len(counts))
    expected = {layer: int(gathers and layer in after_first) for layer in counts if layer not in opened}
    assert {layer: counts[layer] for layer in expected} == expected


@pytest.mark.parametrize("inputs", ["one", "batch"])
def test_what_the_runtime_adds_to_a_prefill_is_bounded(family, inputs):
    installed = f"{compat.INSTALLED.major}.{compat.INSTALLED.minor}"
    if installed != COUNTED_ON:
        pytest.skip(f"the bound was counted on transformers {COUNTED_ON}; {installed} is installed")
    model = family.model()
    batch = getattr(family, inputs)(model)
    plain = forward_operations(model, batch)
    added = {method: forward_operations(model, batch, duet_vlm.make(method, ratio=0.5)) - plain for method in METHODS}
    bound = dict(zip(METHODS, ADDED_OPERATIONS[family.name, inputs]))
    over = {method: (added[method], bound[method]) for method in METHODS if added[method] > bound[method]}
    assert not over, f"the runtime adds more tensor operations than its bound (added, bound): {over}"


@pytest.mark.parametrize("inputs", ["one", "batch"])
def test_a_decoding_step_adds_no_host_sync(family, inputs):
    model = family.model()
    batch = getattr(family, inputs)(model)
    plain = decoding_syncs(model, batch)
    assert plain, "generate decoded no step"
    for method in ("fastv", "duet", "visionzip"):
        steps = decoding_syncs(model, batch, duet_vlm.make(method, ratio=0.5))
        assert steps and all(count <= plain[min(i, len(plain) - 1)] for i, count in enumerate(steps)), (method, steps, plain)
