"""LLaVA-OneVision under vLLM: its images as LLaVA-NeXT's (anyres tiles, unpadding, newlines), scored
by the attention each patch receives (a SigLIP tower has no CLS token), as in the Hugging Face path
(``duet_vlm.adapters.llava_onevision``).

Everything but three things is the LLaVA-NeXT class's (``llava_next``): vLLM's OneVision packing
takes the newline as an argument (``pack``); an image whose unpadded grid exceeds ``anyres_max`` is
resized after projection, so its slots cannot be traced to patches: the request is refused with a
400 (``next_geometry``), as the Hugging Face path refuses it; and videos (pooled frames) are served
as vLLM embeds them, unreduced, which the server's log says.
"""

from __future__ import annotations

from vllm.model_executor.models.llava_onevision import (
    LlavaOnevisionDummyInputsBuilder,
    LlavaOnevisionForConditionalGeneration,
    LlavaOnevisionMultiModalProcessor,
    LlavaOnevisionProcessingInfo,
)
from vllm.multimodal import MULTIMODAL_REGISTRY

from .common import LOG
from .llava_next import AnyresProcessorMixin, AnyresTowerMixin


class DuetLlavaOnevisionMultiModalProcessor(AnyresProcessorMixin, LlavaOnevisionMultiModalProcessor):
    pass


@MULTIMODAL_REGISTRY.register_processor(
    DuetLlavaOnevisionMultiModalProcessor, info=LlavaOnevisionProcessingInfo, dummy_inputs=LlavaOnevisionDummyInputsBuilder
)
class DuetLlavaOnevisionForConditionalGeneration(AnyresTowerMixin, LlavaOnevisionForConditionalGeneration):
    """vLLM's LLaVA-OneVision with duet-vlm's vision-side reduction of images."""

    def pack(self, image_size, projected):
        return self._merge_image_patch_embeddings(image_size, projected, image_newline=self.image_newline, strategy="spatial_unpad")

    def embed_multimodal(self, **kwargs: object):
        request = self.duet_pixels(kwargs)
        if request is None:
            return super().embed_multimodal(**kwargs)
        embeddings: tuple = ()
        for modality, parsed in self._parse_and_validate_multimodal_inputs(**kwargs).items():
            if modality == "image":
                embeddings += tuple(self.reduce_anyres(*request))
            elif modality == "video":
                LOG.warning("duet-vlm: videos are served unreduced on LLaVA-OneVision (pooled frames)")
                embeddings += tuple(self._process_video_pixels(parsed))
        return embeddings
