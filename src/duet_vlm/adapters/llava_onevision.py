"""LLaVA-OneVision (`LlavaOnevisionForConditionalGeneration`): SigLIP, anyres images, pooled video frames."""

from __future__ import annotations

import math

import torch
from torch import nn

from .base import Capture, Geometry, UnitFeatures, VisualItem
from .llava_next import LlavaNextAdapter


def onevision_video_geometry(config, frames: int) -> Geometry:
    """A video of ``frames`` frames (the adapter's, and vLLM's ``integrations.vllm.llava_onevision``):
    each frame a unit of its tile's grid pooled 2x2, one newline after the last.

    >>> from transformers import LlavaOnevisionConfig
    >>> onevision_video_geometry(LlavaOnevisionConfig(), 8).visual_tokens  # 8 frames of 14 x 14, a newline
    1569
    """
    side = math.ceil(config.vision_config.image_size // config.vision_config.patch_size / 2)
    return Geometry(
        config.text_config.num_hidden_layers, frames * side * side + 1, (side, side), False, units=frames,
        modality="video", trailing=1, encoder_depth=config.vision_config.num_hidden_layers,
    )


class LlavaOnevisionAdapter(LlavaNextAdapter):
    """Images as in LLaVA-NeXT (slots traced to their tiles), scored by the attention each patch
    receives (SigLIP has no CLS token). A video is one item: every frame's tokens after the model's
    own 2x2 bilinear pooling, then one ``image_newline``. The same tower encodes images, then
    videos; its captured rows are split by call.

    Pooling happens after the projector, so a video's vision stage works in the language model's
    space: its features are the pooled projected tokens (the model's ``apply_pooling`` on the
    model's projector output, i.e. exactly what fills the slots), and its scores and keys are
    pooled the same way, so each pooled token is ranked by the attention its four patches received.
    Nothing is projected afterwards. Images resized after projection (grids above ``anyres_max``)
    cannot be traced to patches: vision stages refuse them with a clear error, language stages work.
    """

    family = "llava_onevision"
    model_types = ("llava_onevision",)
    vision_model_types = ("siglip_vision_model", "clip_vision_model")
    supported_classes = ("LlavaOnevisionForConditionalGeneration", "LlavaOnevisionModel")

    def __init__(self, model: nn.Module):
        self.check_vision(model)
        self._setup(model)
        config = model.config
        self.placeholder_ids = {config.image_token_id: "image", config.video_token_id: "video"}
        pooled_side = math.ceil(self.tile_side / 2)
        self.pooled_grid = (pooled_side, pooled_side)
        self.frame_tokens = pooled_side * pooled_side

    def video_geometry(self, frames: int) -> Geometry:
        return onevision_video_geometry(self.base.config, frames)

    def _video_run(self, length: int) -> Geometry:
        if (length - 1) % self.frame_tokens:
            raise ValueError(f"a run of {length} video placeholders is not frames of {self.frame_tokens} plus a newline")
        return self.video_geometry((length - 1) // self.frame_tokens)

    def find_items(self, input_ids: torch.Tensor, kwargs: dict, captures: dict | None = None) -> list[VisualItem]:
        (image_id, _), (video_id, _) = self.placeholder_ids.items()
        images = self.items_from_runs(input_ids, image_id, "image", self.geometry_of_run)
        videos = self.items_from_runs(input_ids, video_id, "video", self._video_run)
        return sorted(images + videos, key=lambda item: (item.row, item.start))

    def trace(self, items: list[VisualItem], captures: dict[str, Capture], inputs_embeds: torch.Tensor) -> None:
        capture = captures.get("image")
        if capture is not None and any(item.tower == "video" for item in items):
            # Images are encoded first when the forward has both; the last call holds the videos.
            split = sum(capture.calls[:-1]) if any(item.tower == "image" for item in items) else 0
            captures["video"] = Capture(
                capture.layer_input[split:], capture.output[split:], capture.calls[-1:], capture.contexts[-1:]
            )
            if split:
                captures["image"] = Capture(
                    capture.layer_input[:split], capture.output[:split], capture.calls[:-1], capture.contexts[:-1]
                )
            else:
                del captures["image"]
        super().trace(items, captures, inputs_embeds)

    def units_needed(self, item: VisualItem) -> int:
        return item.geometry.units if item.tower == "video" else 0

    def unit_features(self, items, capture: Capture, signals, first_row, inputs_embeds=None) -> UnitFeatures:
        if items[0].tower != "video":
            return super().unit_features(items, capture, signals, first_row, inputs_embeds)
        frames = items[0].geometry.units
        rows = torch.cat([torch.arange(frames) + first_row(item) for item in items]).to(signals.scores.device)
        tokens = slice(self.feature_offset, None)
        pool = self.base.apply_pooling
        features = pool(self.projector(capture.output[rows, tokens]))

        def pooled_scores(scores):  # of the same tokens the projector saw (CLIP scores already skip CLS)
            return pool(scores[rows, self.feature_offset - int(self.has_cls) :][..., None])[..., 0]

        maps = {layer: pooled_scores(scores) for layer, scores in signals.maps.items()}
        return UnitFeatures(features, pooled_scores(signals.scores), pool(signals.keys[rows, tokens]), maps)

    def project(self, item: VisualItem, features: torch.Tensor) -> torch.Tensor:
        return features if item.tower == "video" else self.projector(features)
