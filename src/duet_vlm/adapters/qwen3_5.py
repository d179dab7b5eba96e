"""Qwen3.5 and Qwen3.5-MoE: the Qwen3-VL tower without DeepStack, and a hybrid language model.

The vision side is Qwen3-VL's (``qwen_vl.py``): no CLS token, a 2x2 merger, full-attention blocks,
M-RoPE, a video written one temporal slice per run behind a timestamp. Vision stages score with the
signal documented there (the attention each patch receives in the last vision block, averaged over
its 2x2 group) and choose among the merged tokens in the language model's space.

The language model is what is new. Three of every four decoder layers (``layer_types``; every
``full_attention_interval``-th is full attention) are Gated-DeltaNet *linear attention*: a
convolution over the last few tokens and a recurrent state of fixed size, no attention scores and no
per-token KV cache. How the runtime meets it (``scheme``, a ``LayerScheme`` of both kinds):

- **Scores come only from attention layers.** A language stage reads the layer after its boundary
  or the one before it (``LanguageStage.reads``); boundaries sit where that layer computes
  attention (``Geometry.boundary_layers``). Methods' default boundaries move to the nearest such
  layer (``Geometry.snap``) before their budgets are solved, so budgets still hold; an explicit
  boundary where the stage could not score is refused at attach, naming the boundaries that work.
  The first attention layer always sees the whole prompt: ``generate`` reads the prompt's length
  from its cache.
- **After a boundary, linear-attention layers run on the kept tokens**, exactly as the unpatched
  layers fed those tokens would: the convolution sees the previous *kept* tokens and the recurrence
  runs over the kept sequence only. What the recurrent state means after tokens are dropped is
  therefore "the state of the shortened prompt": the dropped tokens never entered that layer. This
  is the ideal the tests compare with (the unpatched layers fed the same kept tokens). Their mask is
  the segment's 2-D padding mask (padded states are zeroed before they enter the recurrence, as the
  model does); decoding steps leave it as the model builds it.
- **The cache stays consistent**: attention layers after a boundary hold the kept tokens' keys and
  values; linear-attention layers hold one state whatever the length. Cached decoding continues
  from both, and equals uncached decoding, which re-runs the prefill with the same selection.
- **The gated query**: an attention layer's ``q_proj`` gives a query and an output gate per head;
  scores use the query half (``HybridLayers.layer_queries``), with the per-head ``q_norm``/``k_norm`` and the
  partial M-RoPE the layer applies.
"""

from __future__ import annotations

from functools import cached_property

import torch
from torch import nn

from .qwen_vl import Qwen3VLAdapter
from .scheme import CausalLayers, kinds_of


class Qwen3_5Adapter(Qwen3VLAdapter):
    """``Qwen3_5ForConditionalGeneration`` and ``Qwen3_5MoeForConditionalGeneration`` (and their
    ``...Model``): a hybrid linear-attention language model behind the Qwen3-VL tower."""

    family = "qwen3_5"
    model_types = ("qwen3_5", "qwen3_5_moe")
    vision_model_types = ("qwen3_5_vision", "qwen3_5_moe_vision")
    supported_classes = (
        "Qwen3_5ForConditionalGeneration", "Qwen3_5Model", "Qwen3_5MoeForConditionalGeneration", "Qwen3_5MoeModel",
    )

    @cached_property
    def scheme(self) -> HybridLayers:
        types = self.text_config.layer_types[: self.num_layers()]
        kinds = kinds_of(types, {"full_attention": "attention", "linear_attention": "linear_attention"}, self.family)
        return HybridLayers(self.text_config, self.rotary_emb, kinds)

    def take_layer_additions(self, kwargs: dict):
        return None  # no DeepStack

    def ideal_visual(self, inputs: dict, visual: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
        # The vision blocks on every patch, the merger on the kept tokens' 2x2 groups of patches only
        # (a group's patches are consecutive in the blocks' output).
        visual_model = self.base.visual
        videos = "pixel_values_videos" in inputs
        if videos and "pixel_values" in inputs:
            raise NotImplementedError("the ideal takes images or videos in one batch, not both")
        pixels = inputs["pixel_values_videos" if videos else "pixel_values"]
        merger = visual_model.merger
        visual_model.merger = nn.Identity()  # the blocks' output, unmerged: what the merger reads
        try:
            patches = visual_model(pixels.type(visual_model.dtype), grid_thw=inputs["video_grid_thw" if videos else "image_grid_thw"])
        finally:
            visual_model.merger = merger
        groups = patches.last_hidden_state.view(-1, visual_model.spatial_merge_unit, patches.last_hidden_state.shape[-1])
        return merger(groups[kept[visual]].flatten(0, 1))


class HybridLayers(CausalLayers):
    """Qwen3.5's language side: attention and linear-attention layers, masks from the 2-D mask, and
    attention layers whose ``q_proj`` also gives an output gate."""

    def layer_queries(self, attn: nn.Module, normed: torch.Tensor) -> torch.Tensor:
        # q_proj gives, per head, the query then the output gate (``torch.chunk`` in the layer).
        both = attn.q_proj(normed).view(*normed.shape[:2], -1, attn.head_dim * 2)
        return both[..., : attn.head_dim]
