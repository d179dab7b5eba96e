"""Video-LLaVA (`VideoLlavaForConditionalGeneration`): an image tower and a video tower, one projector."""

from __future__ import annotations

import torch
from torch import nn

from .base import Geometry, ModelAdapter, VisualItem, feature_layer
from .llava import first_projected, tower_features


class VideoLlavaAdapter(ModelAdapter):
    """Images are runs of ``image_token_id`` (CLS dropped under the "default" strategy); a video is a
    run of ``video_token_id`` holding every frame's tokens, CLS included (transformers keeps it for
    videos). A video is one item whose units are its frames: vision stages reduce each frame (the
    reference's per-frame Stage A), language stages rank all of its frames' tokens together."""

    family = "video_llava"
    model_types = ("video_llava",)
    vision_model_types = ("clip_vision_model",)
    supported_classes = ("VideoLlavaForConditionalGeneration", "VideoLlavaModel")

    def __init__(self, model: nn.Module):
        config = model.config
        self.check_vision(model)
        self.bind_modules(model)
        layer = config.vision_feature_layer
        self.towers = {
            "image": feature_layer(self.base.image_tower, layer),
            "video": feature_layer(self.base.video_tower, layer),
        }
        self.tower_entries = {"image": self.base.image_tower, "video": self.base.video_tower}
        self.placeholder_ids = {config.image_token_id: "image", config.video_token_id: "video"}
        vision = config.vision_config
        side = vision.image_size // vision.patch_size
        layers = config.text_config.num_hidden_layers
        image_slots = side * side + (0 if config.vision_feature_select_strategy == "default" else 1)
        self.frame_tokens = side * side + 1
        self.geometry = Geometry(layers, image_slots, (side, side), True, encoder_depth=vision.num_hidden_layers)
        self._layers, self._grid = layers, (side, side)

    def ideal_visual(self, inputs: dict, visual: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
        return first_projected(self.projector, tower_features(self.base, inputs), kept)

    def video_geometry(self, frames: int) -> Geometry:
        return Geometry(
            self._layers, frames * self.frame_tokens, self._grid, True, units=frames, modality="video",
            encoder_depth=self.geometry.encoder_depth,
        )

    def find_items(self, input_ids: torch.Tensor, kwargs: dict, captures: dict | None = None) -> list[VisualItem]:
        (image_id, _), (video_id, _) = self.placeholder_ids.items()
        images = self.items_from_runs(input_ids, image_id, "image", lambda n: self.geometry)
        videos = self.items_from_runs(input_ids, video_id, "video", self._video_run)
        return sorted(images + videos, key=lambda item: (item.row, item.start))

    def _video_run(self, length: int) -> Geometry:
        if length % self.frame_tokens:
            raise ValueError(
                f"a run of {length} video placeholder tokens is not a whole number of frames of {self.frame_tokens}"
            )
        return self.video_geometry(length // self.frame_tokens)
