"""What the runtime does around a prefill's decoder layers, counted in tensor operations
(``bench.timing.OperationClock``: the same count on every machine and every run, where seconds are
not; on a GPU each is a kernel launch).

A layer that no boundary opens costs the runtime's hook no tensor operation: it hands the layer
its segment's mask, positions and RoPE, made once at the segment's boundary. The one exception is
a family whose layers each take a per-token argument of their own (Gemma 4's per-layer input, a
slice the model cuts for each layer): after a boundary it is gathered to the segment's tokens, one
operation per layer. On every family and tower variant, for one item and for a left-padded batch,
under a method that prunes in the language model (FastV) and DUET.
"""

import pytest
import torch

import duet_vlm
from duet_vlm.adapters import adapter_for
from duet_vlm.bench.timing import OperationClock


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
