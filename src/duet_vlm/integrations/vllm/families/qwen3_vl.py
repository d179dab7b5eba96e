"""Qwen3-VL, Qwen3.5 and Qwen3.5-MoE under vLLM: Qwen2.5-VL's path (``qwen_vl``), with Qwen3-VL's
processor (each temporal slice of a video an item behind its timestamp, its Hugging Face processor
adjusted to process a video at all), DeepStack features selected with their tokens and read for the
rows the decoder layers hold (``HeldRows``), and Qwen3.5's hybrid language model, whose
Gated-DeltaNet layers after a boundary run on the kept tokens (their metadata compacted as the
attention layers', ``language.kv``) and whose boundaries sit where a stage can score
(``adapters.qwen_vl.language_attention_layers``, in every item's geometry)."""

from __future__ import annotations

from vllm.model_executor.models.qwen3_5 import (
    Qwen3_5ForConditionalGeneration,
    Qwen3_5MoeForConditionalGeneration,
    Qwen3_5MoeProcessingInfo,
    Qwen3_5ProcessingInfo,
)
from vllm.model_executor.models.qwen3_vl import (
    Qwen3VLDummyInputsBuilder,
    Qwen3VLForConditionalGeneration,
    Qwen3VLMultiModalProcessor,
    Qwen3VLProcessingInfo,
)
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.sequence import IntermediateTensors

from ..processor import DuetInfoMixin, WithoutDuetOptions
from .qwen_vl import DuetQwenProcessorMixin, DuetQwenVLMixin


class VideoPlaceholdersAsText(WithoutDuetOptions):
    """Qwen3-VL's Hugging Face processor as vLLM 0.32 calls it (``WithoutDuetOptions``: its text-only
    call with the videos' placeholders made without the video token), answering vLLM's check of
    which video token it expands."""

    def replace_video_token(self, *args, **kwargs):
        """The processor's own. vLLM reads from the processor's class whether it expands only the
        video token (transformers 5.10 and later, keeping the prompt's ``<|vision_start|>`` and
        ``<|vision_end|>`` around the frames) or the whole ``<|vision_start|><|video_pad|><|vision_end|>``
        (``_expands_only_video_token``): the wrapper's class says what Qwen3-VL's processor does in
        every transformers duet-vlm takes (5.19 and later: the video token only)."""
        return self.processor.replace_video_token(*args, **kwargs)


class DuetQwen3VLProcessingInfoMixin(DuetInfoMixin):
    wrapper = VideoPlaceholdersAsText


class DuetQwen3VLProcessingInfo(DuetQwen3VLProcessingInfoMixin, Qwen3VLProcessingInfo):
    pass


class DuetQwen3_5ProcessingInfo(DuetQwen3VLProcessingInfoMixin, Qwen3_5ProcessingInfo):
    pass


class DuetQwen3_5MoeProcessingInfo(DuetQwen3VLProcessingInfoMixin, Qwen3_5MoeProcessingInfo):
    pass


class DuetQwen3VLMultiModalProcessor(DuetQwenProcessorMixin, Qwen3VLMultiModalProcessor):
    slices_are_items = True

    def placeholders(self, update, item_idx: int, item, count: int):
        """A video: vLLM's own frames (each temporal slice's timestamp, ``<|vision_start|>``, its
        placeholders, ``<|vision_end|>``), each slice with ``count`` placeholders."""
        if update.modality != "video":
            return super().placeholders(update, item_idx, item, count)
        config = self.info.get_hf_config()
        return self.get_video_repl(
            tokens_per_frame=[count] * int(item["video_grid_thw"].data[0]), timestamps=item["timestamps"].data,
            tokenizer=self.info.get_tokenizer(), vision_start_token_id=config.vision_start_token_id,
            vision_end_token_id=config.vision_end_token_id, video_token_id=config.video_token_id, select_token_id=True,
        )


@MULTIMODAL_REGISTRY.register_processor(
    DuetQwen3VLMultiModalProcessor, info=DuetQwen3VLProcessingInfo, dummy_inputs=Qwen3VLDummyInputsBuilder
)
class DuetQwen3VLForConditionalGeneration(DuetQwenVLMixin, Qwen3VLForConditionalGeneration):
    """vLLM's Qwen3-VL with duet-vlm's vision-side reduction of images and videos (each temporal slice an
    item): every block attends over whole images; the tower returns each token's DeepStack features as extra channels after its own, and
    they are selected and merged with it (the Hugging Face runtime's ``additions``), so a kept token
    carries its own DeepStack rows into the decoder layers that add them."""

    slices_are_items = True

    def duet_width(self) -> int:
        return self.visual_dim + (self.multiscale_dim if self.use_deepstack else 0)

    def _get_deepstack_input_embeds(self, num_tokens: int):
        """vLLM's DeepStack rows of the step, read for the rows the layers hold: after a boundary the
        decoder adds them to fewer rows (``language.LanguageStages.held``)."""
        rows = super()._get_deepstack_input_embeds(num_tokens)
        stages = self.duet_language_stages()
        return rows if rows is None or stages is None else HeldRows(rows.tensors, stages)

    def main_width(self) -> int:
        return self.visual_dim

    def rows_fixed_before(self) -> int:
        """The decoder's loop adds the step's DeepStack rows to the output of its first layers, one
        a level: a compiled graph gathers at boundaries after them only (``LanguageStages.trace``)."""
        return self.deepstack_num_level if self.use_deepstack else 0


@MULTIMODAL_REGISTRY.register_processor(
    DuetQwen3VLMultiModalProcessor, info=DuetQwen3_5ProcessingInfo, dummy_inputs=Qwen3VLDummyInputsBuilder
)
class DuetQwen3_5ForConditionalGeneration(DuetQwen3VLForConditionalGeneration, Qwen3_5ForConditionalGeneration):
    """vLLM's Qwen3.5 (Qwen3-VL's tower and processor, a hybrid linear-attention language model) with
    duet-vlm's reductions: the tower side is Qwen3-VL's; inside the language model a stage scores
    with its attention layers only, and its Gated-DeltaNet layers after a boundary run their
    convolution and recurrence over the kept tokens, as the Hugging Face path's do."""



@MULTIMODAL_REGISTRY.register_processor(
    DuetQwen3VLMultiModalProcessor, info=DuetQwen3_5MoeProcessingInfo, dummy_inputs=Qwen3VLDummyInputsBuilder
)
class DuetQwen3_5MoeForConditionalGeneration(DuetQwen3VLForConditionalGeneration, Qwen3_5MoeForConditionalGeneration):
    """vLLM's Qwen3.5-MoE with duet-vlm's vision-side reduction of images (as Qwen3.5)."""



class HeldRows(IntermediateTensors):
    """vLLM's per-layer DeepStack rows of a step, each read for the rows the decoder layers hold at
    the time (all of them before the first boundary)."""

    def __init__(self, tensors: dict, stages) -> None:
        super().__init__(tensors)
        self.stages = stages

    def __getitem__(self, key):
        value = super().__getitem__(key)
        held = self.stages.held() if isinstance(key, str) else None
        return value if held is None else value[held]
