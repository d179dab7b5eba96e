"""``torch.compile`` on a model with a reducer attached (backend ``aot_eager``: dynamo's tracing,
guards and graph breaks, without inductor's slow CPU code generation).

Compiled generation gives the same tokens as eager generation. The reducer's hooks break the graph
only where the prefill selects tokens (finding the items, layer 0 and each boundary layer, the
scatter back at the end: all ``torch.compiler.disable``-d, so dynamo runs them eagerly instead of
breaking at every data-dependent line); a decoding step runs inside the compiled graph, a second
``generate`` with the same shapes compiles nothing new, and the decoder-layer hook (one code object
for every layer) is compiled a fixed number of times (3), not once per layer.
"""

import pytest
import torch
import torch._dynamo as dynamo

import duet_vlm
from models import make_inputs, make_llava
from duet_vlm.runtime import Attachment
from torch._dynamo.eval_frame import _debug_get_cache_entry_list

DISABLED = ("_begin_prompt", "_prefill_layer", "_finish_prefill")


# FastV prunes after layer 2 of 4; V2Drop after 1, 2 and 3, scored by the states' change (no attention);
# ApET merges on the vision side and again after layer 2 (merged states take the kept slots)
@pytest.mark.parametrize("name, ratio", [("duet", 0.25), ("fastv", 0.6), ("v2drop", 0.5), ("apet", 0.5)])
def test_compiled_generation_equals_eager(name, ratio):
    model = make_llava(layers=4)
    inputs = make_inputs(model)
    reducer = duet_vlm.make(name, ratio=ratio)
    with torch.no_grad(), reducer(model):
        eager = model.generate(**inputs, max_new_tokens=5, do_sample=False)
    dynamo.reset()
    counters = dynamo.utils.counters
    counters.clear()
    model.compile(backend="aot_eager")
    try:
        with torch.no_grad(), reducer(model):
            compiled = model.generate(**inputs, max_new_tokens=5, do_sample=False)
        breaks = dict(counters["graph_break"])
        counters.clear()
        with torch.no_grad(), reducer(model):
            again = model.generate(**inputs, max_new_tokens=5, do_sample=False)
        new_graphs = counters["stats"]["unique_graphs"]
        hook_code = Attachment._layer_hook(None, 0).__code__  # the code object every layer's hook shares
        hook_versions = len(_debug_get_cache_entry_list(hook_code))
    finally:
        model._compiled_call_impl = None  # undo model.compile()
        dynamo.reset()
    assert torch.equal(compiled, eager) and torch.equal(again, eager)
    ours = [reason for reason in breaks if "Attachment" in reason or "duet_vlm" in reason]
    assert ours and all(any(f"Attachment.{fn}" in reason for fn in DISABLED) for reason in ours), ours
    assert new_graphs == 0
    # Prefill, first decoding step, later steps (3 on 4, 8 and 12 layers alike); once per layer would be >= 4.
    assert 1 <= hook_versions <= 3, f"the layer hook was compiled {hook_versions} times (once per layer?)"
