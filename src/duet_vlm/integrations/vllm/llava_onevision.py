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

import math

import torch
from vllm.model_executor.models.llava_onevision import (
    LlavaOnevisionDummyInputsBuilder,
    LlavaOnevisionForConditionalGeneration,
    LlavaOnevisionMultiModalProcessor,
    LlavaOnevisionProcessingInfo,
)
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.multimodal.parse import VideoProcessorItems
from vllm.multimodal.processing import PromptReplacement

from ...geometry import Geometry
from .common import DuetInfoMixin, ItemFields, item_fields_config, write_item_fields
from .llava_next import AnyresProcessorMixin, AnyresTowerMixin
from .options import plan_for


def video_geometry(config, frames: int) -> Geometry:
    """A video of ``frames`` frames as ``LlavaOnevisionAdapter.video_geometry`` gives it: each frame
    a unit of its pooled grid, one newline after the last."""
    side = math.ceil(config.vision_config.image_size // config.vision_config.patch_size / 2)
    return Geometry(
        config.text_config.num_hidden_layers, frames * side * side + 1, (side, side), False, units=frames,
        modality="video", trailing=1, encoder_depth=config.vision_config.num_hidden_layers,
    )


class DuetLlavaOnevisionMultiModalProcessor(AnyresProcessorMixin, LlavaOnevisionMultiModalProcessor):
    """Images as LLaVA-NeXT's; each video's placeholder run as long as the method keeps at its budget."""

    def _postprocess_hf_mm_data(self, mm_inputs, hf_processor_mm_kwargs, processed_data):
        processed_data = super()._postprocess_hf_mm_data(mm_inputs, hf_processor_mm_kwargs, processed_data)
        settings = self.settings(hf_processor_mm_kwargs)
        videos = processed_data.get("pixel_values_videos")
        if settings.active and videos is not None:
            config = self.info.get_hf_config()
            geometries = [video_geometry(config, len(frames)) for frames in videos]
            write_item_fields(processed_data, settings, geometries, hf_processor_mm_kwargs.get("duet_text"), "video")
        return processed_data

    def _get_mm_fields_config(self, hf_inputs, hf_processor_mm_kwargs):
        return {**super()._get_mm_fields_config(hf_inputs, hf_processor_mm_kwargs), **item_fields_config(hf_inputs, "video")}

    def _get_prompt_updates(self, mm_items, hf_processor_mm_kwargs, out_mm_kwargs):
        updates = super()._get_prompt_updates(mm_items, hf_processor_mm_kwargs, out_mm_kwargs)
        if not self.settings().active:
            return updates
        config = self.info.get_hf_config()
        video_update = next((update for update in updates if update.modality == "video"), None)

        def replacement(item_idx: int):
            videos = mm_items.get("video")
            if not isinstance(videos, VideoProcessorItems):
                return video_update.replacement(item_idx)
            geometry = video_geometry(config, videos.get_num_frames(item_idx))
            return [config.video_token_index] * self.reduced_tokens(hf_processor_mm_kwargs, geometry)

        others = [update for update in updates if update.modality != "video"]
        return [*others, PromptReplacement(modality="video", target=[config.video_token_index], replacement=replacement)]


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

    def embed_multimodal(self, **kwargs: object):
        videos = ItemFields.take(kwargs, "video")
        request = self.duet_pixels(kwargs)
        if request is None and (not self.duet.active or videos.budgets is None):
            return super().embed_multimodal(**kwargs)
        embeddings: tuple = ()
        for modality, parsed in self._parse_and_validate_multimodal_inputs(**kwargs).items():
            if modality == "image":
                embeddings += tuple(self.reduce_anyres(*request) if request is not None else self._process_image_input(parsed))
            elif modality == "video":
                embeddings += tuple(self.reduce_videos(parsed, videos))
        return embeddings

    def reduce_videos(self, video_input, fields: ItemFields) -> list:
        """Each video reduced by its method at its budget, frame by frame (an unreduced one as vLLM
        embeds it)."""
        videos = list(video_input["pixel_values_videos"])  # a (videos, frames, C, H, W) tensor or a list
        counts = [len(frames) for frames in videos]
        stacked = torch.cat(videos)
        config = self.config
        taps = self.run_tower(lambda: self.vision_tower(stacked, feature_select_strategy="full"), self.method_plans())
        offset = int(config.vision_feature_select_strategy == "default")  # a CLIP tower's CLS row
        has_cls = config.vision_config.model_type == "clip_vision_model"
        pool = self.apply_pooling
        outputs, start = [], 0
        for index, frames in enumerate(counts):
            rows = slice(start, start + frames)
            start += frames
            features = pool(self.multi_modal_projector(taps.output[rows, offset:]))
            geometry = video_geometry(config, frames)
            plan = plan_for(fields.settings(self.duet, index), fields.budgets[index], geometry)
            if plan is None:
                outputs.append(torch.cat([features.flatten(0, 1), self.image_newline[None].to(features.dtype)]))
                continue
            scores, keys, maps = self.tower_signals(taps, plan, rows)

            def pooled(values):  # the patches the projector saw (a CLIP tower's scores already skip CLS)
                return pool(values[:, offset - int(has_cls) :][..., None])[..., 0]

            reduced = self.reduce_item(
                plan, geometry, features, pooled(scores), pool(keys[:, offset:]),
                {layer: pooled(m) for layer, m in maps.items()}, self.text_embeddings(fields.texts, index),
                project=lambda f: f,
            )
            outputs.append(reduced.embeddings)
        return outputs
