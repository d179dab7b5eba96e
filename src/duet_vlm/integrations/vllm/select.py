"""The selection glue every family shares: a vision tower's captured layers -> the method's own
``VisionStage.reduce`` -> the language model's tokens.

One implementation: the method code that runs under vLLM is the code the Hugging Face path runs
(``duet_vlm.methods``); this module only builds the ``VisionView`` a stage reads (features, scores
and keys of the feature layer, scores of the other encoder layers a stage asks for, the projector)
from vLLM's modules, the way ``duet_vlm.runtime.vision`` builds it from transformers' modules. No
vLLM import at module level: only the module attributes of vLLM's vision layers (``layer_norm1``,
``qkv_proj``), and vLLM's all-gather under tensor parallelism (``all_heads``).

Tensor parallelism: a vision layer split over ranks holds only its rank's heads, and a score that
averages over the heads it holds would differ between ranks (each would keep other tokens, and none
the tokens of one process). Every score here averages over *all* heads: the ranks' queries and keys
are gathered first (``all_heads``), so every rank keeps the tokens one process keeps.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch
from torch import nn

from ...adapters.base import check_layer
from ...plan import Plan, VisionReduction, VisionView, apply_vision_stage
from ...scoring import fused_qk, patch_scores


@dataclass
class Taps:
    """What a tower call left: the inputs of the tapped encoder layers (``{index: (U, T, C)}``,
    concatenated over the call's chunks) and the feature layer's output ``(U, T, C)``."""

    inputs: dict = field(default_factory=dict)
    output: torch.Tensor | None = None


@contextmanager
def tap(layers: dict[int, nn.Module], feature: nn.Module) -> Iterator[Taps]:
    """Keep the inputs of ``layers`` and the output of ``feature`` while the block runs (hooks on
    the model's own layers, removed on exit)."""
    taps = Taps()
    chunks: dict = {index: [] for index in layers}
    outputs: list = []
    handles = []
    for index, layer in layers.items():
        handles.append(layer.register_forward_pre_hook(
            lambda module, args, kwargs, index=index: chunks[index].append(
                (args[0] if args else kwargs["hidden_states"]).detach()
            ),
            with_kwargs=True,
        ))
    handles.append(feature.register_forward_hook(
        lambda module, args, output: outputs.append((output[0] if isinstance(output, tuple) else output).detach())
    ))
    try:
        yield taps
    finally:
        for handle in handles:
            handle.remove()
    taps.inputs = {index: torch.cat(parts) for index, parts in chunks.items() if parts}
    taps.output = torch.cat(outputs) if outputs else None


def all_heads(tensors: tuple, dim: int, tp_size: int) -> tuple:
    """``tensors`` with every tensor-parallel rank's part gathered along ``dim`` (themselves on one
    rank): the heads of all ranks, in rank order, on every rank."""
    if tp_size <= 1:
        return tuple(tensors)
    from vllm.distributed import tensor_model_parallel_all_gather

    return tuple(tensor_model_parallel_all_gather(t.contiguous(), dim=dim) for t in tensors)


def layer_scores(layer: nn.Module, layer_input: torch.Tensor, has_cls: bool, chunk: int = 256, received: bool = False):
    """``(scores (U, P or T), keys (U, T, d))`` of a CLIP / SigLIP encoder layer of vLLM, from its own
    ``layer_norm1`` and fused ``qkv_proj``: ``duet_vlm.scoring.patch_scores`` (the arithmetic the
    Hugging Face path runs on transformers' separate projections) over all heads of every
    tensor-parallel rank (``qkv_proj`` is a ``QKVParallelLinear``: each rank's output is its heads'
    queries, keys and values), keys averaged over heads."""
    attn = layer.self_attn
    heads = getattr(attn, "num_heads_per_partition", None) or attn.num_heads
    with torch.no_grad():
        qkv = attn.qkv_proj(layer.layer_norm1(layer_input))
        qkv = qkv[0] if isinstance(qkv, tuple) else qkv  # (output, bias) unless built with return_bias=False
        queries, keys = all_heads(fused_qk(qkv, heads), 1, getattr(attn, "tp_size", 1))
        scores = patch_scores(queries, keys, attn.scale, has_cls, received, chunk)
    return scores, keys.mean(dim=1)


def encoder_index(layer, depth: int) -> int:
    """A stage's encoder layer (``VisionStage.encoder_layers``: an index, negative from the end of a
    tower of ``depth`` layers, or ``"first_full_attention"`` / ``"last"``) as a layer index >= 0."""
    index = {"first_full_attention": 0, "last": -1}.get(layer, layer)
    return check_layer(index, depth) % depth


#: when a list, every reduction appends its ``VisionReduction`` (what the stage kept: ``kept`` indices
#: into the view's tokens, and its roles): for tests that run vLLM's engine in their own process.
TRACE: list | None = None
#: when a list, every reduction appends the ``VisionView`` it reduced (the scores and keys vLLM's
#: tower computed): tests feed them to the Hugging Face path to compare the selections on identical
#: inputs (``tests/test_vllm.py``, "equal across engines").
VIEWS: list | None = None


@dataclass
class Reduced:
    """One item's reduction: the language model's tokens ``(n, D)``, the vision token each stands
    for (``kept``, ``(n,)`` indices into a unit's tokens; ``units``, ``(n,)`` the unit each comes
    from), and what the stage returned."""

    embeddings: torch.Tensor
    kept: torch.Tensor
    reduction: VisionReduction
    units: torch.Tensor | None = None

    def in_slot_order(self) -> torch.Tensor:
        """The embeddings of a one-unit item, each in the slot of the token it stands for (a merged
        token: its anchor's), as the Hugging Face path places them where it keeps slots."""
        return self.embeddings[self.kept.argsort().to(self.embeddings.device)]


def reduce_unit(
    plan: Plan,
    features: torch.Tensor,
    scores: torch.Tensor,
    keys: torch.Tensor,
    grid: tuple[int, int],
    has_cls: bool,
    project: Callable[[torch.Tensor], torch.Tensor],
    attention: dict | None = None,
    text: torch.Tensor | None = None,
    main: int | None = None,
) -> Reduced:
    """Run ``plan``'s vision stage on one item's units (``features (U, T, C)``, ``scores``, ``keys``)
    and map the result into the language model's space with ``duet_vlm.plan.apply_vision_stage``,
    the application the Hugging Face runtime runs: the stage's own projected output where it merged
    after the projector, else the projector on its features. ``text``: ``(n_text, D)`` the language model's input embeddings of the prompt's
    text, for stages that read it (``VisionView.text``, one per unit). ``main``: the channels the
    projector reads (all by default); the rest are extra channels of the same tokens (Qwen3-VL's
    DeepStack features), selected and merged with them and appended to the projected tokens, as
    the Hugging Face runtime reduces them (``runtime.vision.reduce_vision``). Returns ``U * keep``
    tokens in the stage's output order."""
    width = features.shape[-1] if main is None else main
    dtype = features.dtype
    view = VisionView(
        features, scores, keys, grid, has_cls, dict(attention or {}),
        project=lambda f: project(f[..., :width].to(dtype).contiguous()),
    )
    units = features.shape[0]
    if plan.vision.needs_text:
        if text is None:
            raise RuntimeError(f"{type(plan.vision).__name__} reads the prompt's text, which did not reach the encoder step")
        view.text = [text] * units
    if VIEWS is not None:
        VIEWS.append(view)
    applied = apply_vision_stage(plan.vision, view, plan.schedule.llm_input // units, units)
    if TRACE is not None:
        TRACE.append(applied.reduction)
    valid = applied.valid.flatten()
    tokens = applied.projected.flatten(0, 1)
    if width < features.shape[-1]:
        extra = applied.reduction.features[..., width:].flatten(0, 1).to(features.dtype)
        tokens = torch.cat([tokens, extra.to(tokens.device, tokens.dtype)], dim=-1)
    tokens = tokens[valid.to(tokens.device)]
    kept = applied.reduction.kept
    unit = torch.arange(kept.shape[0], device=kept.device)[:, None].expand_as(kept)
    valid = valid.to(kept.device)
    return Reduced(tokens, kept.flatten()[valid], applied.reduction, unit.flatten()[valid])
