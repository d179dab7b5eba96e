"""LLaVA-1.5 under vLLM: vLLM's own ``LlavaForConditionalGeneration`` and its processor, subclassed.

The processor writes the reduced number of placeholders for each image (a function of the image's
budget and the method, before anything is encoded) and hands the image's budget to the model as an
item field (``duet_budget``); the model's ``embed_multimodal`` runs the vision tower with taps on
its feature layer (and any other layer the stage reads), builds the method's ``VisionView`` and
returns the stage's tokens, projected. Without ``duet_method`` in the server's options both behave
exactly as vLLM's.
"""

from __future__ import annotations

import torch
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.multimodal.parse import ImageProcessorItems
from vllm.multimodal.processing import PromptReplacement

from vllm.model_executor.models.llava import (
    LlavaDummyInputsBuilder,
    LlavaForConditionalGeneration,
    LlavaMultiModalProcessor,
    LlavaProcessingInfo,
    _build_llava_or_pixtral_hf_info,
    _build_llava_or_pixtral_hf_processor,
)

from ...geometry import Geometry
from .common import DuetProcessorMixin, DuetTowerMixin


class DuetLlavaMultiModalProcessor(DuetProcessorMixin, LlavaMultiModalProcessor):
    """vLLM's LLaVA processor with each image's placeholders cut to its reduced count."""

    def item_geometries(self, processed, hf_kwargs) -> list[Geometry]:
        count = len(processed["pixel_values"])
        return [llava_geometry(self.info.get_hf_config())] * count

    def _get_prompt_updates(self, mm_items, hf_processor_mm_kwargs, out_mm_kwargs):
        updates = super()._get_prompt_updates(mm_items, hf_processor_mm_kwargs, out_mm_kwargs)
        settings = self.settings()
        if not settings.active:
            return updates
        image_token_id = self.info.get_hf_config().image_token_index
        geometry = llava_geometry(self.info.get_hf_config())

        def replacement(item_idx: int):
            if not isinstance(mm_items.get("image"), ImageProcessorItems):  # precomputed embeddings: not reduced
                return updates[0].replacement(item_idx)
            return [image_token_id] * self.reduced_tokens(hf_processor_mm_kwargs, geometry)

        return [PromptReplacement(modality="image", target=[image_token_id], replacement=replacement)]


def llava_geometry(config) -> Geometry:
    """The geometry of an image, as ``duet_vlm.adapters.llava.LlavaAdapter`` gives it."""
    vision = config.vision_config
    has_cls = vision.model_type == "clip_vision_model"
    side = vision.image_size // vision.patch_size
    tokens = side * side + int(has_cls)
    slots = tokens - (1 if config.vision_feature_select_strategy == "default" else 0)
    return Geometry(
        config.text_config.num_hidden_layers, slots, (side, side), has_cls, encoder_depth=vision.num_hidden_layers
    )


def _processor(info, dummy_inputs):
    if isinstance(info, LlavaProcessingInfo):
        return DuetLlavaMultiModalProcessor(info, dummy_inputs)
    return _build_llava_or_pixtral_hf_processor(info, dummy_inputs)


@MULTIMODAL_REGISTRY.register_processor(_processor, info=_build_llava_or_pixtral_hf_info, dummy_inputs=LlavaDummyInputsBuilder)
class DuetLlavaForConditionalGeneration(DuetTowerMixin, LlavaForConditionalGeneration):
    """vLLM's LLaVA with duet-vlm's vision-side reduction in ``embed_multimodal``."""

    def __init__(self, *, vllm_config, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self.setup_duet(vllm_config, llava_geometry(self.config))

    def embed_multimodal(self, **kwargs: object):
        request = self.duet_pixels(kwargs)
        if request is None:
            return super().embed_multimodal(**kwargs)
        image_input, budgets, texts = request
        pixel_values = image_input["pixel_values"]
        geometry = self.duet_geometry
        plans = [self.duet_plan(budget, geometry, index) for index, budget in enumerate(budgets)]
        taps = self.run_tower(lambda: self.vision_tower(pixel_values, feature_select_strategy="full"), plans)
        offset = int(self.config.vision_feature_select_strategy == "default")
        outputs = []
        for index, plan in enumerate(plans):
            features = taps.output[index : index + 1]
            if plan is None:
                outputs.append(self.multi_modal_projector(features[0, offset:]))
                continue
            scores, keys, maps = self.tower_signals(taps, plan, slice(index, index + 1))
            outputs.append(self.reduce_item(plan, geometry, features, scores, keys, maps, self.text_embeddings(texts, index)).embeddings)
        return outputs

