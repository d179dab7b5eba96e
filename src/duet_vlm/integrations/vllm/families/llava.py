"""LLaVA-1.5 under vLLM: vLLM's own ``LlavaForConditionalGeneration`` and its processor, subclassed.

The processor writes the reduced number of placeholders for each image (a function of the image's
budget and the method, before anything is encoded) and hands the image's budget to the model as an
item field (``duet_budget``); the model's embedding of images (``common.DuetTowerMixin``'s loop)
runs the vision tower with taps on its feature layer (and any other layer the stage reads), builds
the method's ``VisionView`` and returns the stage's tokens, projected. Without ``duet_method`` in
the server's options both behave exactly as vLLM's. What is LLaVA's here: its geometry (the Hugging
Face adapter's ``llava_geometry``), and one tower row per image.
"""

from __future__ import annotations

from vllm.multimodal import MULTIMODAL_REGISTRY

from vllm.model_executor.models.llava import (
    LlavaDummyInputsBuilder,
    LlavaForConditionalGeneration,
    LlavaMultiModalProcessor,
    LlavaProcessingInfo,
    _build_llava_or_pixtral_hf_info,
    _build_llava_or_pixtral_hf_processor,
)

from ....adapters.llava import llava_geometry
from ..common import DuetTowerMixin, Encoded
from ..processor import DuetProcessorMixin


class DuetLlavaMultiModalProcessor(DuetProcessorMixin, LlavaMultiModalProcessor):
    """vLLM's LLaVA processor with each image's placeholders cut to its reduced count."""

    def item_geometry(self, modality: str, sizes):
        return llava_geometry(self.info.get_hf_config())


def _processor(info, dummy_inputs):
    if isinstance(info, LlavaProcessingInfo):
        return DuetLlavaMultiModalProcessor(info, dummy_inputs)
    return _build_llava_or_pixtral_hf_processor(info, dummy_inputs)


@MULTIMODAL_REGISTRY.register_processor(_processor, info=_build_llava_or_pixtral_hf_info, dummy_inputs=LlavaDummyInputsBuilder)
class DuetLlavaForConditionalGeneration(DuetTowerMixin, LlavaForConditionalGeneration):
    """vLLM's LLaVA with duet-vlm's vision-side reduction of its images: every image one unit of the
    feature layer's tokens, its stage's output projected by the model's projector."""


    def __init__(self, *, vllm_config, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self.setup_duet(vllm_config)

    def language_geometry(self, feature=None):
        return llava_geometry(self.config)

    def encode(self, image_input, fields, modality: str) -> list[Encoded]:
        geometry = llava_geometry(self.config)
        plans = self.item_plans(fields, [geometry] * len(fields.budgets))
        taps = self.run_tower(lambda: self.in_tower_groups(
            lambda pixels: self.vision_tower(pixels, feature_select_strategy="full"), image_input["pixel_values"],
            geometry.visual_tokens), plans)
        return [Encoded(geometry, plan, slice(index, index + 1), taps) for index, plan in enumerate(plans)]

    def unreduced(self, item: Encoded, modality: str):
        offset = int(self.config.vision_feature_select_strategy == "default")
        return self.multi_modal_projector(item.taps.output[item.rows][0, offset:])

    def units(self, item: Encoded, modality: str) -> list[tuple]:
        return [(item.taps.output[item.rows], *self.tower_signals(item.taps, item.plan, item.rows))]
