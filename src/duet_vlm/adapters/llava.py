"""LLaVA-1.5 (`LlavaForConditionalGeneration` / `LlavaModel`): one tower, one fixed-size image."""

from __future__ import annotations

import torch
from torch import nn

from .base import Geometry, ModelAdapter, VisualItem, feature_layer


class LlavaAdapter(ModelAdapter):
    """Images are runs of ``config.image_token_id``, ``image_seq_length`` slots each; CLIP towers
    (CLS scores) or SigLIP towers (no CLS: attention received instead); 1-D RoPE."""

    family = "llava"
    model_types = ("llava",)
    vision_model_types = ("clip_vision_model", "siglip_vision_model")
    supported_classes = ("LlavaForConditionalGeneration", "LlavaModel")

    def __init__(self, model: nn.Module):
        config = model.config
        self.check_vision(model)
        self.bind_modules(model)
        self.select_strategy = config.vision_feature_select_strategy
        self.towers = {"image": feature_layer(self.base.vision_tower, config.vision_feature_layer)}
        self.tower_entries = {"image": self.base.vision_tower}
        self.placeholder_ids = {config.image_token_id: "image"}
        self.has_cls = config.vision_config.model_type == "clip_vision_model"

        vision_config = config.vision_config
        side = vision_config.image_size // vision_config.patch_size
        tokens = side * side + int(self.has_cls)  # what the feature layer outputs per image
        slots = tokens - (1 if self.select_strategy == "default" else 0)
        self.geometry = Geometry(
            config.text_config.num_hidden_layers, slots, (side, side), self.has_cls,
            encoder_depth=config.vision_config.num_hidden_layers,
        )

    @property
    def slots_have_cls(self) -> bool:
        """Whether the image's placeholder slots hold the CLS feature too (LLaVA "full" strategy)."""
        return self.has_cls and self.select_strategy == "full"

    def find_items(self, input_ids: torch.Tensor, kwargs: dict, captures: dict | None = None) -> list[VisualItem]:
        (token_id, tower), = self.placeholder_ids.items()
        return self.items_from_runs(input_ids, token_id, tower, lambda n: self.geometry)
