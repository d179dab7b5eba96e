"""The drops as operators of vLLM's compiled graph. Where vLLM compiles the language model, it
traces the decoder once, at warm-up, no step running, the layers' hooks with it: each hook then
puts one of these custom operators into the graph (``duet_vlm::layer`` before a decoder layer,
``duet_vlm::attention`` before its attention). The compiler treats them as opaque; run at each step,
they do what the hooks do eagerly (``LanguageStages.layer_inputs`` and ``attention_inputs``): record
a scoring layer's queries and keys and its input, gather the kept rows at a boundary, hand every
layer after one the held rows' positions (and Gemma 4's per-layer inputs). A boundary's row count is
an unbacked size of the graph, so one graph serves every step whatever each request keeps, and no
request makes the server compile."""

from __future__ import annotations

import weakref

import torch

#: the hooks of the language model this process serves (``LanguageStages``, the last installed; a
#: weak reference, so that a model let go is not kept by it)
_ACTIVE: weakref.ref | None = None


def install(stages) -> None:
    global _ACTIVE
    _ACTIVE = weakref.ref(stages)


def uninstall(stages) -> None:
    global _ACTIVE
    if _ACTIVE is not None and _ACTIVE() is stages:
        _ACTIVE = None


def _active():
    stages = _ACTIVE() if _ACTIVE is not None else None
    if stages is None:
        raise RuntimeError("a duet_vlm operator ran with no language model's hooks installed in this process")
    return stages


def _layer(index: int, gathers: bool, positions: torch.Tensor, hidden: torch.Tensor, residual: torch.Tensor | None,
           own: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Decoder layer ``index``'s positions, hidden states, residual stream and per-layer input as
    its hooks hand them on (``gathers``: a boundary may keep fewer rows here). An absent input comes
    back empty; an operator's outputs are new tensors, never its inputs nor what the hooks keep (the
    held rows' positions, handed to every layer after a boundary, are copied: a compiled graph may
    reuse a tensor it no longer reads)."""
    given = (positions, hidden, residual, own)
    stages = _active()
    out = stages.layer_inputs(index, positions, hidden, residual, own)
    kept = stages.state is not None  # (where nothing drops, the positions are new: less the layer's offsets)
    return tuple(hidden.new_empty(0) if value is None else value.clone() if value is old or (place == 0 and kept)
                 else value for place, (value, old) in enumerate(zip(out, given)))


def _layer_fake(index, gathers, positions, hidden, residual, own):
    # a boundary keeps at least one row: a prompt's last token is never dropped (some layers, Qwen3.5's
    # Gated-DeltaNet reshaping by -1 among them, cannot be traced on a row count that may be 0)
    rows = torch.library.get_ctx().new_dynamic_size(min=1) if gathers else hidden.shape[0]
    return (positions.new_empty((*positions.shape[:-1], rows)), hidden.new_empty((rows, *hidden.shape[1:])),
            hidden.new_empty(0) if residual is None else residual.new_empty((rows, *residual.shape[1:])),
            hidden.new_empty(0) if own is None else own.new_empty((rows, *own.shape[1:])))


def _attention(index: int, query: torch.Tensor, key: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Layer ``index``'s rotated queries and keys, copies recorded where a boundary reads them."""
    _active().attention_inputs(index, query, key, copy=True)
    return query.clone(), key.clone()


def _attention_fake(index, query, key):
    return torch.empty_like(query), torch.empty_like(key)


# Registered on the dispatcher directly, as vLLM registers its own operators
# (``vllm.utils.torch_utils.direct_register_custom_op``): ``torch.library.custom_op``'s wrapper
# costs more per call than these operators do at a decoding step, and a dropping server calls one
# before every decoder layer of every step. Neither has a gradient (serving only).
_LIBRARY = torch.library.Library("duet_vlm", "FRAGMENT")
for _name, _function, _fake in (("layer", _layer, _layer_fake), ("attention", _attention, _attention_fake)):
    _LIBRARY.define(_name + torch.library.infer_schema(_function, mutates_args=()))
    _LIBRARY.impl(_name, _function, "CompositeExplicitAutograd")
    _LIBRARY._register_fake(_name, _fake)
