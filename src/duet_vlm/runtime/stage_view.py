"""What a language stage sees at a boundary (``LayerView``), built from the segment before it: the
rows and tokens it ranks, their mask, positions and RoPE, and the model's own layers, norm and head
for a stage that runs them outside the forward (PIO's probe, a scoring pass)."""

from __future__ import annotations

import torch
from torch import nn

from ..compat import with_cache
from ..plan import LayerView
from .inputs import LayerInputs
from .sharded import reading_full
from .state import Placement, PrefillState, Segment


def stage_view(segment: Segment, state: PrefillState, adapter, layer_index: int, layer: nn.Module,
               hidden: torch.Tensor, rows: list[int], placements: list[Placement]) -> LayerView:
    """What a language stage sees at boundary ``layer_index`` of the sequence ``segment`` holds:
    the whole batch, or only ``rows`` (a row ranked alone), and the tokens of ``placements`` (items
    per row, row-major)."""
    whole = len(rows) == hidden.shape[0]
    select = slice(None) if whole else torch.tensor(rows, device=hidden.device)

    def take(x):  # the rows of this call from a (B, ...) tensor; batch-1 broadcasts stay
        return x if x is None or whole or x.shape[0] == 1 else x[select]

    steps, tokens, scratch = segment.steps, state.tokens, state.scratch
    kinds = adapter.scheme.kinds
    text_after = []
    for b in rows:
        present = steps.index[b] if steps.pad is None else steps.index[b][~steps.pad[b]]
        offset = 0 if steps.pad is None else int(steps.pad[b].sum())
        text_after.append(torch.searchsorted(present.contiguous(), tokens.text_after_image[b].contiguous()) + offset)
    inputs = segment.rows(None if whole else rows)
    visual_index = torch.stack([p.positions for p in placements]).view(len(rows), len(placements) // len(rows), -1)
    visual_ids = torch.stack([p.ids for p in placements]).view(visual_index.shape)
    # Per-prompt memory of a stage (e.g. SparseVLM's raters), one per call: rows and items.
    memory = scratch.stages.setdefault((tuple(rows), tuple((p.item.row, p.item.source.start) for p in placements)), {})
    previous_input = scratch.boundary_inputs.get(layer_index, scratch.last_layer_input)
    embeddings = scratch.input_embeddings
    return LayerView(
        layer_index=layer_index,
        layer=layer,
        hidden_states=take(hidden),
        position_embeddings=inputs.position_embeddings(kinds[layer_index]),
        previous_position_embeddings=inputs.position_embeddings(kinds[layer_index - 1]),
        visual_index=visual_index,
        visual_ids=visual_ids,
        valid=take(steps.valid(tokens.valid)),
        input_ids=take(steps.gather(tokens.ids)),
        input_embeddings=None if embeddings is None else take(steps.gather(embeddings)),
        text_after_image=text_after,
        previous_layer=adapter.layers[layer_index - 1],
        previous_hidden_states=take(previous_input),
        previous_layer_keys=scratch.last_layer_keys if previous_input is scratch.last_layer_input else None,
        scratch=memory,
        # A stage reads layers outside their own forward: under FSDP2 the runtime kept them
        # unsharded (``sharded.KeptUnsharded``), and a read of sharded ones is a clear error.
        attention_fn=reading_full(adapter.scheme.text_to_visual_attention),
        run_layer_fn=reading_full(lambda module, hidden_, index: state.with_layer_features(
            run_layer(module, hidden_, inputs, kinds[index], layer_extras(segment, state, adapter, index, take)),
            index, placements,
            None if whole else list(rows),
        )),
        output_head_fn=lambda hidden_: output_head(adapter, hidden_),
        final_norm_fn=adapter.final_norm,
        keys_fn=reading_full(adapter.scheme.layer_keys),
    )

def layer_extras(segment: Segment, state: PrefillState, adapter, layer_index: int, take) -> dict:
    """What layer ``layer_index`` needs besides its mask and RoPE when a stage runs it outside
    the forward on ``segment``'s sequence (rows chosen by ``take``): the adapter's
    ``layer_call_kwargs`` and its per-token argument cut to this segment's tokens."""
    extra = adapter.scheme.layer_call_kwargs()
    spec = adapter.scheme.layer_token_argument
    value = None if spec is None else state.scratch.layer_arguments.get(layer_index)
    if value is not None:
        extra[spec[0]] = take(segment.steps.gather(value))
    return extra


def run_layer(layer: nn.Module, hidden: torch.Tensor, inputs: LayerInputs, kind: str = "attention",
              extra: dict | None = None) -> torch.Tensor:
    """``layer`` (of ``kind``) on ``hidden`` with a segment's mask and positions, outside the KV cache.

    A stage's own extra pass (PIO's proxy loss, a scoring probe), not one of the model's layer
    calls: ``forward`` directly, so module hooks (transformers' output recorder for
    ``output_hidden_states``/``output_attentions``) do not count it as a layer's output."""
    output = layer.forward(hidden, **inputs.kwargs(kind), **(extra or {}), **with_cache(None), use_cache=False)
    return output[0] if isinstance(output, tuple) else output


def output_head(adapter, hidden: torch.Tensor) -> torch.Tensor:
    if adapter.lm_head is None:
        raise RuntimeError("this model has no LM head (attach the reducer to the ...ForConditionalGeneration)")
    return adapter.lm_head(adapter.final_norm(hidden))
