"""LLaVA-1.5 (`LlavaForConditionalGeneration` / `LlavaModel`) with a CLIP vision tower."""

from __future__ import annotations

import torch
from torch import nn

from .base import Geometry, ModelAdapter


class LlavaAdapter(ModelAdapter):
    """Vision span = runs of ``config.image_token_id``; 1-D RoPE; Llama-like decoder."""

    family = "llava"
    supported_classes = ("LlavaForConditionalGeneration", "LlavaModel")

    def __init__(self, model: nn.Module):
        config = model.config
        self.top = model if hasattr(model, "lm_head") else None
        self.base = model.model if self.top is not None else model
        self.language_model = self.base.language_model
        self.layers = self.language_model.layers
        self.rotary_emb = self.language_model.rotary_emb
        self.projector = self.base.multi_modal_projector
        self.final_norm = self.language_model.norm
        self.lm_head = self.top.lm_head if self.top is not None else None
        self.image_token_id = config.image_token_id
        self.select_strategy = config.vision_feature_select_strategy

        feature_layer = config.vision_feature_layer
        if not isinstance(feature_layer, int):
            raise ValueError(
                f"vision_feature_layer={feature_layer}: duet-vlm supports a single vision feature layer"
            )
        tower = self.base.vision_tower
        encoder_layers = getattr(tower, "vision_model", tower).encoder.layers
        n = len(encoder_layers)
        # hidden_states[0] is the embedding output and hidden_states[k] the output of layer k - 1.
        layer_index = feature_layer % (n + 1) - 1
        if layer_index < 0:
            raise ValueError("vision_feature_layer selects the patch embeddings; no attention layer to score with")
        self.vision_layer = encoder_layers[layer_index]

        vision_config = config.vision_config
        side = vision_config.image_size // vision_config.patch_size
        patches = side * side
        self.geometry = Geometry(
            num_layers=config.text_config.num_hidden_layers,
            visual_tokens=patches + (1 if self.slots_have_cls else 0),
            grid=(side, side),
            has_cls=True,
        )

    @property
    def slots_have_cls(self) -> bool:
        return self.select_strategy == "full"

    def vision_scores(self, layer_input: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        layer = self.vision_layer
        attn = layer.self_attn
        with torch.no_grad():
            x = layer.layer_norm1(layer_input)
            images, tokens, _ = x.shape
            keys = attn.k_proj(x).view(images, tokens, -1, attn.head_dim).transpose(1, 2)  # (I, H, T, d)
            cls_query = attn.q_proj(x[:, :1]).view(images, 1, -1, attn.head_dim).transpose(1, 2)
            logits = (cls_query.float() @ keys.float().transpose(-1, -2)) * attn.scale  # (I, H, 1, T)
            cls_attention = logits.softmax(dim=-1)[:, :, 0, 1:].sum(dim=1)
        return cls_attention, keys.mean(dim=1)
