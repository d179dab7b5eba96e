"""Gemma 4 under vLLM: vLLM's own ``Gemma4ForConditionalGeneration`` and its processor, subclassed.

As in the Hugging Face path (``duet_vlm.adapters.gemma4``), an image is one item of its own size:
the processor resizes it to at most ``max_soft_tokens`` cells of ``k x k`` patches, and the tower
pools each cell into one soft token, row by row. vLLM runs transformers' own Gemma 4 vision tower
(``AutoModel.from_config``), so a soft token's score is computed by the Hugging Face adapter's own
function (``adapters.gemma4.pooled_layer_scores``) on vLLM's layers: the attention its patches
receive in the tower's last layer, summed over the cell by the tower's own pooler, its key averaged
the same way. The stage chooses among the projected soft tokens, each kept token in the slot of the
token it stands for; the processor writes ``<start_of_image>``, the method's count of soft tokens
and ``<end_of_image>``.

A reduced batch's images run through vLLM's own encoding one image at a time (its taps then hold
one image per call); an unreduced batch runs as vLLM batches it. Videos are served unreduced, as on
the Hugging Face path, with a log line. The tower is replicated on every tensor-parallel rank (it
is transformers' module), so every rank scores with all heads.

The mask inside an image is vLLM's: a checkpoint with ``use_bidirectional_attention="vision"`` lets
an image's tokens, the kept ones here, attend to each other both ways in its sliding layers on
attention backends with a multimodal prefix (FlashAttention on a GPU); vLLM 0.32's CPU backend
attends causally inside the image, reduced or not (the serving page).
"""

from __future__ import annotations

import sys

import torch
from vllm.model_executor.models.gemma4_mm import (
    Gemma4DummyInputsBuilder,
    Gemma4ForConditionalGeneration,
    Gemma4ImagePixelInputs,
    Gemma4MultiModalProcessor,
    Gemma4ProcessingInfo,
)
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.multimodal.parse import ImageProcessorItems
from vllm.multimodal.processing import PromptReplacement

from ...adapters.gemma4 import NOMINAL_SIDE, image_grid, kv_sharing, pooled_layer_scores
from ...geometry import Geometry
from .common import DuetInfoMixin, DuetProcessorMixin, DuetTowerMixin, cut_runs
from .options import RefusedMethod, strip
from .select import encoder_index


def gemma4_geometry(config, grid: tuple[int, int]) -> Geometry:
    """An image of ``grid`` soft tokens, as ``Gemma4Adapter.image_geometry`` gives it."""
    rows, cols = grid
    layers = config.text_config.num_hidden_layers
    return Geometry(layers, rows * cols, (rows, cols), False, encoder_depth=config.vision_config.num_hidden_layers,
                    last_boundary=kv_sharing(config.text_config, layers)[0])


def positions_grid(config, positions) -> tuple[int, int]:
    """An image's soft-token grid from its patches' positions (a tensor, or vLLM's field of one)."""
    positions = getattr(positions, "data", positions)
    return image_grid(torch.as_tensor(positions), config.vision_config.pooling_kernel_size)


class DuetGemma4ProcessingInfo(DuetInfoMixin, Gemma4ProcessingInfo):
    """vLLM's Gemma 4 processing info, whose Hugging Face processor never sees duet-vlm's options."""


class DuetGemma4MultiModalProcessor(DuetProcessorMixin, Gemma4MultiModalProcessor):
    """vLLM's Gemma 4 processor with each image's soft tokens cut to the reduced count."""

    def item_geometries(self, processed, hf_kwargs) -> list[Geometry]:
        config = self.info.get_hf_config()
        return [gemma4_geometry(config, positions_grid(config, positions)) for positions in processed["pixel_position_ids"]]

    unreduced_videos = "Gemma 4 (as on the Hugging Face path)"

    def prompt_text(self, prompt: list[int]) -> tuple[int, ...]:
        """The prompt's text with ``<start_of_image>`` and ``<end_of_image>`` where each image's soft token stands."""
        config = self.info.get_hf_config()
        return self.text_with_markers(prompt, config.image_token_id, [config.boi_token_id, config.eoi_token_id])

    def _get_prompt_updates(self, mm_items, hf_processor_mm_kwargs, out_mm_kwargs):
        updates = super()._get_prompt_updates(mm_items, strip(hf_processor_mm_kwargs), out_mm_kwargs)
        if not self.settings().active:
            return updates
        config = self.info.get_hf_config()
        image_update = next((update for update in updates if update.modality == "image"), None)
        if image_update is None:  # a server taking no images (videos, audio)
            return updates

        def replacement(item_idx: int):
            full = image_update.replacement(item_idx)  # vLLM's: <start_of_image>, the image's soft tokens, <end_of_image>
            if not isinstance(mm_items.get("image"), ImageProcessorItems):
                return full
            geometry = gemma4_geometry(config, positions_grid(config, out_mm_kwargs["image"][item_idx]["pixel_position_ids"]))
            count = self.reduced_tokens(hf_processor_mm_kwargs, geometry)
            return full if count == geometry.visual_tokens else cut_runs(full.full, config.image_token_id, count)

        others = [update for update in updates if update.modality != "image"]
        return [PromptReplacement(modality="image", target=image_update.target, replacement=replacement), *others]


@MULTIMODAL_REGISTRY.register_processor(
    DuetGemma4MultiModalProcessor, info=DuetGemma4ProcessingInfo, dummy_inputs=Gemma4DummyInputsBuilder
)
class DuetGemma4ForConditionalGeneration(DuetTowerMixin, Gemma4ForConditionalGeneration):
    """vLLM's Gemma 4 with duet-vlm's vision-side reduction of images in ``embed_multimodal``."""

    tower_types = ("gemma4_vision",)

    def __init__(self, *, vllm_config, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self.setup_duet(vllm_config, gemma4_geometry(self.config, (NOMINAL_SIDE, NOMINAL_SIDE)))
        if self.duet.active and getattr(vllm_config.compilation_config, "cudagraph_mm_encoder", False):
            # the encoder then replays a captured graph of vLLM's whole image path, without the taps
            raise RefusedMethod(
                "duet-vlm reduces Gemma 4 images in embed_multimodal, which encoder CUDA graphs replace: start the server "
                "without cudagraph_mm_encoder"
            )

    def embed_multimodal(self, **kwargs: object):
        request = self.duet_pixels(kwargs)
        if request is None:
            return super().embed_multimodal(**kwargs)
        image_input, budgets, texts = request
        pixels, positions = image_input["pixel_values"], image_input["pixel_position_ids"]
        outputs = []
        for index, budget in enumerate(budgets):
            one = Gemma4ImagePixelInputs(pixel_values=[pixels[index]], pixel_position_ids=[positions[index]])
            geometry = gemma4_geometry(self.config, positions_grid(self.config, positions[index]))
            plan = self.duet_plan(budget, geometry, index)
            if plan is None:
                outputs += self._process_image_input(one)
                continue
            (features,), signals = self.encode_with_taps(one, plan, geometry)
            scores, keys, maps = signals
            reduced = self.reduce_item(plan, geometry, features[None], scores, keys, maps, self.text_embeddings(texts, index),
                                       project=lambda f: f)
            outputs.append(reduced.in_slot_order())
        return outputs

    def encode_with_taps(self, image_input, plan, geometry: Geometry):
        """vLLM's encoding of one image (its projected soft tokens) with the tower's last layer tapped
        (and the layers the plan's stage reads): ``(features, (scores, keys, maps))``, each of the
        image's own soft tokens (its first cells)."""
        layers = self.vision_tower.encoder.layers
        last = len(layers) - 1
        wanted = {last} | {encoder_index(layer, len(layers)) for layer in plan.vision.encoder_layers()}
        captured: dict = {}
        handles = [
            layers[index].register_forward_pre_hook(
                lambda module, args, kwargs, index=index: captured.__setitem__(
                    index, ((args[0] if args else kwargs["hidden_states"]).detach(), kwargs)
                ),
                with_kwargs=True,
            )
            for index in sorted(wanted)
        ]
        try:
            with torch.no_grad():
                features = self._process_image_input(image_input)
        finally:
            for handle in handles:
                handle.remove()
        modeling = sys.modules[type(self.vision_tower).__module__]
        kernel = self.config.vision_config.pooling_kernel_size
        cells = geometry.visual_tokens

        def signals(index: int):
            layer_input, layer_kwargs = captured[index]
            return pooled_layer_scores(layers[index], layer_input, [{"layer_kwargs": layer_kwargs}], modeling, kernel,
                                       self.vision_tower.pooler)

        scores, keys = signals(last)
        maps = {layer: signals(encoder_index(layer, len(layers)))[0][:, :cells] for layer in plan.vision.encoder_layers()}
        return features, (scores[:, :cells], keys[:, :cells], maps)
