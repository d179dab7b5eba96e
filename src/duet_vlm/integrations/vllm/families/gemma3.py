"""Gemma 3 under vLLM: vLLM's own ``Gemma3ForConditionalGeneration`` and its processor, subclassed.

As in the Hugging Face path (``duet_vlm.adapters.gemma3``), an image block (the image, or a
pan-and-scan crop) is one unit of ``mm_tokens_per_image`` soft tokens: the SigLIP tower's last
layer, average-pooled ``k x k`` by the projector's own pool, normed and projected. A soft token's
score is the attention its patches receive in the tower's last layer, summed over the ``k x k`` patches the pool puts in it; its key the layer's keys
averaged by the same pool. The stage chooses among projected tokens, so its output reaches the
language model as it is, each token in the slot of the token it stands for. The processor writes
each block's ``<start_of_image>``, the method's count of soft tokens and ``<end_of_image>``. A
pan-and-scan image is one vLLM item of several blocks (the image, then each crop): each block is
reduced on its own at the image's budget, as the Hugging Face path reduces each as an item; methods
that read the prompt's text refuse such an image (the text is taken before the crops are known).

The mask inside an image block is vLLM's: its attention backends that support a multimodal prefix
(``is_mm_prefix_lm``: FlashAttention on a GPU) let a block's tokens, the kept ones here, attend to
each other both ways, as Gemma 3 and the Hugging Face path do; vLLM 0.32's CPU backend attends
causally inside the block, reduced or not (the serving page).

Methods that drop inside the language model are served with duet-vlm's worker, each block an item
of its own at the image's budget (``runs_are_items``). A sliding layer after a boundary counts its
window in the tokens it holds, the kept ones: vLLM's kernels on its cache of the kept tokens, the
Hugging Face path's windowed masks and sliding caches over them (``adapters.gemma3``), and a stage's
scores where it reads such a layer (``language.hooks``); its blocks are freed behind that window
(``memory.DroppedSlidingSpec``). Where a backend lets image blocks attend both ways, the layers after
a boundary get each block's range in the kept tokens' coordinates (``language.kv.compact_ranges``).
"""

from __future__ import annotations

import torch
from vllm.model_executor.models.gemma3_mm import (
    Gemma3DummyInputsBuilder,
    Gemma3ForConditionalGeneration,
    Gemma3MultiModalProcessor,
    Gemma3ProcessingInfo,
)
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.multimodal.processing.processor import cached_encode, replace_token_matches

from ....adapters.gemma3 import gemma3_geometry, pooled_keys, pooled_scores
from ....geometry import Geometry
from ..common import DuetTowerMixin, Encoded
from ..options import RefusedMethod
from ..processor import DuetInfoMixin, DuetProcessorMixin, consecutive, cut_runs


class DuetGemma3ProcessingInfo(DuetInfoMixin, Gemma3ProcessingInfo):
    """vLLM's Gemma 3 processing info, whose Hugging Face processor never sees duet-vlm's options
    (vLLM's Gemma 3 processor asks for it with the request's options)."""


class DuetGemma3MultiModalProcessor(DuetProcessorMixin, Gemma3MultiModalProcessor):
    """vLLM's Gemma 3 processor with each image block's soft tokens cut to the reduced count."""

    geometry_fields = {"image": "num_patches"}  # an image's blocks: the image, then its pan-and-scan crops

    def item_geometry(self, modality: str, blocks) -> Geometry:
        return gemma3_geometry(self.info.get_hf_config())

    def item_geometries(self, processed, hf_kwargs, modality: str = "image") -> list[Geometry]:
        settings = self.settings(hf_kwargs)
        if any(count > 1 for count in processed["num_patches"].tolist()) and settings.needs_text():
            # the prompt's text is read before the image is cut into crops (``apply``), so it would
            # miss the words vLLM writes around them
            raise RefusedMethod(
                f"duet-vlm does not run {settings.method} on Gemma 3's pan-and-scan crops under vLLM: the method reads "
                "the prompt's text, which is taken before the image is cut into crops; send the image with "
                "do_pan_and_scan off, or use a method that does not read the text"
            )
        return super().item_geometries(processed, hf_kwargs, modality)

    def placeholders(self, update, item_idx: int, item, count: int):
        """vLLM's own replacement (the image's blocks, each ``<start_of_image>``, its soft tokens and
        ``<end_of_image>``) with each block's soft tokens cut to ``count``."""
        return cut_runs(update.replacement(item_idx), self.info.get_hf_config().image_token_index, count)

    def prompt_text(self, prompt: list[int]) -> tuple[int, ...]:
        """The prompt's text as the Hugging Face path reads it: each ``<start_of_image>`` written out as
        the processor writes an image (``full_image_sequence``: newlines, ``<start_of_image>``,
        ``<end_of_image>``, newlines) without its soft tokens, runs of newline tokens joined as vLLM
        joins them (``_apply_token_matches``)."""
        processor = self.info.get_hf_processor()
        tokenizer = self.info.get_tokenizer()
        vocab = tokenizer.get_vocab()
        boi = vocab[processor.boi_token]
        soft = self.info.get_hf_config().image_token_index
        block = [t for t in cached_encode(tokenizer, processor.full_image_sequence, add_special_tokens=False) if t != soft]
        text = []
        for token in prompt:
            text.extend(block if token == boi else [token])
        one, two, three, four = (vocab["\n" * n] for n in range(1, 5))
        for pair, joined in (([one, two], [three]), ([two, one], [three]), ([two, two], [four])):
            text = replace_token_matches(text, pair, joined)
        return tuple(text)


@MULTIMODAL_REGISTRY.register_processor(
    DuetGemma3MultiModalProcessor, info=DuetGemma3ProcessingInfo, dummy_inputs=Gemma3DummyInputsBuilder
)
class DuetGemma3ForConditionalGeneration(DuetTowerMixin, Gemma3ForConditionalGeneration):
    """vLLM's Gemma 3 with duet-vlm's vision-side reduction of its images."""

    chooses_projected = True

    def __init__(self, *, vllm_config, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self.setup_duet(vllm_config)

    def language_geometry(self, feature=None) -> Geometry:
        return gemma3_geometry(self.config)

    def runs_are_items(self, modality: str) -> bool:
        """A pan-and-scan image's blocks (the image, then each crop) are items of their own, at the
        image's budget, as the Hugging Face path reduces them."""
        return True

    def encode(self, image_input, fields, modality: str) -> list[Encoded]:
        """Every image's blocks through the tower and the projector at once (an image's rows: its
        block, then one per pan-and-scan crop)."""
        geometry = gemma3_geometry(self.config)
        plans = self.item_plans(fields, [geometry] * len(fields.budgets))
        features = []
        taps = self.run_tower(lambda: features.append(self.vision_tower(image_input["pixel_values"])), plans)
        projected = self.multi_modal_projector(features[0])  # (blocks, tokens, D)
        blocks = [int(n) for n in torch.as_tensor(image_input["num_patches"]).reshape(-1).tolist()]
        return [Encoded(geometry, plan, rows, taps, projected[rows]) for plan, rows in zip(plans, consecutive(blocks))]

    def unreduced(self, item: Encoded, modality: str):
        return item.data.flatten(0, 1)

    def units(self, item: Encoded, modality: str) -> list[tuple]:
        """Each block a unit of its own at the image's budget, as the Hugging Face path reduces it."""
        scores, keys, maps = self.tower_signals(item.taps, item.plan, item.rows)
        blocks = [slice(block, block + 1) for block in range(len(item.data))]
        return [(item.data[one], scores[one], keys[one], {layer: m[one] for layer, m in maps.items()}) for one in blocks]

    def tower_signals(self, taps, plan, rows) -> tuple[torch.Tensor, torch.Tensor, dict]:
        """The soft tokens' scores and keys: each patch's received attention (SigLIP has no CLS) summed
        by the projector's own ``k x k`` pool, the keys averaged by it; the other layers' scores too."""
        scores, keys, maps = super().tower_signals(taps, plan, rows)
        pool, kernel = self.multi_modal_projector.avg_pool, self.multi_modal_projector.kernel_size
        return (pooled_scores(pool, kernel, scores), pooled_keys(pool, keys),
                {layer: pooled_scores(pool, kernel, m) for layer, m in maps.items()})
