"""LLaVA-OneVision under vLLM: its images as LLaVA-NeXT's (anyres tiles, unpadding, newlines), scored
by the attention each patch receives (a SigLIP tower has no CLS token), and its videos per frame, as
in the Hugging Face path (``duet_vlm.adapters.llava_onevision``).

Everything about images but two things is the LLaVA-NeXT class's (``llava_next``): vLLM's OneVision
packing takes the newline as an argument (``pack``); an image whose unpadded grid exceeds
``anyres_max`` is resized after projection, so its slots cannot be traced to patches: the request is
refused with a 400 (``next_geometry``), as the Hugging Face path refuses it.

A video is one item of one budget: its frames are encoded, projected and pooled 2x2 by the model's
own ``apply_pooling``, and each frame is a unit of the vision stage (the budget is the video's, its
tokens shared over the frames), with the scores and keys of the feature layer pooled the same way,
so that a pooled token is ranked by the attention its four patches received. The stage's output is
the video's tokens, its trailing newline dropped with the rest, as the Hugging Face path does.
"""

from __future__ import annotations

import torch
from vllm.model_executor.models.llava_onevision import (
    LlavaOnevisionDummyInputsBuilder,
    LlavaOnevisionForConditionalGeneration,
    LlavaOnevisionMultiModalProcessor,
    LlavaOnevisionProcessingInfo,
)
from vllm.multimodal import MULTIMODAL_REGISTRY

from ....adapters.llava_onevision import onevision_video_geometry
from ....geometry import Geometry
from ..common import Encoded, identity
from .llava_next import AnyresProcessorMixin, AnyresTowerMixin
from ..processor import DuetInfoMixin, consecutive


class DuetLlavaOnevisionMultiModalProcessor(AnyresProcessorMixin, LlavaOnevisionMultiModalProcessor):
    """Images as LLaVA-NeXT's; each video's placeholder run as long as the method keeps at its budget."""

    geometry_fields = {**AnyresProcessorMixin.geometry_fields, "video": "pixel_values_videos"}

    def item_geometry(self, modality: str, sizes) -> Geometry:
        if modality == "video":  # its frames
            return onevision_video_geometry(self.info.get_hf_config(), len(sizes))
        return super().item_geometry(modality, sizes)


class DuetLlavaOnevisionProcessingInfo(DuetInfoMixin, LlavaOnevisionProcessingInfo):
    """vLLM's OneVision processing info, whose Hugging Face processor never sees duet-vlm's options
    (vLLM's OneVision processor calls it directly for videos, with the request's options)."""


@MULTIMODAL_REGISTRY.register_processor(
    DuetLlavaOnevisionMultiModalProcessor, info=DuetLlavaOnevisionProcessingInfo,
    dummy_inputs=LlavaOnevisionDummyInputsBuilder,
)
class DuetLlavaOnevisionForConditionalGeneration(AnyresTowerMixin, LlavaOnevisionForConditionalGeneration):
    """vLLM's LLaVA-OneVision with duet-vlm's vision-side reduction of images and videos."""

    def pack(self, image_size, projected):
        return self._merge_image_patch_embeddings(image_size, projected, image_newline=self.image_newline, strategy="spatial_unpad")

    def video_geometry(self, feature) -> Geometry:
        return onevision_video_geometry(self.config, len(feature.data["pixel_values_videos"].data))

    def _process_video_pixels(self, inputs):
        """vLLM's embedding of a batch of videos, reduced where a method reduces it."""
        return self.reduce_or_embed(inputs, super()._process_video_pixels, "video")

    def stage_projector(self, modality: str):
        return identity if modality == "video" else super().stage_projector(modality)  # a video's are pooled projected tokens

    def encode(self, parsed, fields, modality: str) -> list[Encoded]:
        """A video: its frames through the tower, projected and pooled by the model's own
        ``apply_pooling``, every video at once (an image: as LLaVA-NeXT's)."""
        if modality != "video":
            return super().encode(parsed, fields, modality)
        videos = list(parsed["pixel_values_videos"])  # a (videos, frames, C, H, W) tensor or a list
        counts = [len(frames) for frames in videos]
        stacked = torch.cat(videos)
        taps = self.run_tower(lambda: self.vision_tower(stacked, feature_select_strategy="full"), self.method_plans())
        offset = int(self.config.vision_feature_select_strategy == "default")  # a CLIP tower's CLS row
        geometries = [onevision_video_geometry(self.config, frames) for frames in counts]
        return [Encoded(geometry, plan, rows, taps, self.apply_pooling(self.multi_modal_projector(taps.output[rows, offset:])))
                for geometry, plan, rows in zip(geometries, self.item_plans(fields, geometries), consecutive(counts))]

    def unreduced(self, item: Encoded, modality: str):
        if modality != "video":
            return super().unreduced(item, modality)
        return torch.cat([item.data.flatten(0, 1), self.image_newline[None].to(item.data.dtype)])

    def units(self, item: Encoded, modality: str) -> list[tuple]:
        """A video's frames, each a unit, with the feature layer's scores and keys pooled as its tokens
        are, so that a pooled token is ranked by the attention its four patches received."""
        if modality != "video":
            return super().units(item, modality)
        scores, keys, maps = self.tower_signals(item.taps, item.plan, item.rows)
        offset = int(self.config.vision_feature_select_strategy == "default")
        has_cls = self.config.vision_config.model_type == "clip_vision_model"
        pool = self.apply_pooling

        def pooled(values):  # the patches the projector saw (a CLIP tower's scores already skip CLS)
            return pool(values[:, offset - int(has_cls) :][..., None])[..., 0]

        return [(item.data, pooled(scores), pool(keys[:, offset:]), {layer: pooled(m) for layer, m in maps.items()})]
