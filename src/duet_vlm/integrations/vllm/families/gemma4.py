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

Inside the language model (FastV, DUET whole and the other stages the plugin serves) the boundary
is Gemma 3's with two things more, both its layers' scheme's (``language.scheme.PerLayerInputLayers``):
each layer's per-layer input, which vLLM's loop hands it for every row of the step, is read for the
rows the layers hold after a boundary; and the last ``num_kv_shared_layers`` layers, which read the
keys and values of the last earlier layer of their kind, read them from that layer's cache of the
kept tokens: every boundary lies at or before that layer (the plans' ``Geometry.last_boundary``, as
on the Hugging Face path), so the layer that stores and the layers that reuse hold one sequence, and
vLLM puts the reusing layers in the storing layer's KV-cache group, whose compacted metadata they
get. vLLM's own ``kv_sharing_fast_prefill`` (the reusing layers run on the logits' rows only) is
refused on a server that drops inside the language model (``language.check_engine``).
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

from ....adapters.gemma4 import NOMINAL_SIDE, gemma4_geometry, image_grid, pooled_layer_scores
from ....geometry import Geometry
from ..common import DuetTowerMixin, Encoded
from ..options import RefusedMethod
from ..processor import DuetInfoMixin, DuetProcessorMixin, cut_runs
from ..select import encoder_index


def positions_grid(config, positions) -> tuple[int, int]:
    """An image's soft-token grid from its patches' positions (a tensor, or vLLM's field of one)."""
    positions = getattr(positions, "data", positions)
    return image_grid(torch.as_tensor(positions), config.vision_config.pooling_kernel_size)


class DuetGemma4ProcessingInfo(DuetInfoMixin, Gemma4ProcessingInfo):
    """vLLM's Gemma 4 processing info, whose Hugging Face processor never sees duet-vlm's options."""


class DuetGemma4MultiModalProcessor(DuetProcessorMixin, Gemma4MultiModalProcessor):
    """vLLM's Gemma 4 processor with each image's soft tokens cut to the reduced count."""

    geometry_fields = {"image": "pixel_position_ids"}

    def item_geometry(self, modality: str, positions) -> Geometry:
        config = self.info.get_hf_config()
        return gemma4_geometry(config, *positions_grid(config, positions))

    def placeholders(self, update, item_idx: int, item, count: int):
        """vLLM's own replacement (``<start_of_image>``, the image's soft tokens, ``<end_of_image>``)
        with its soft tokens cut to ``count``."""
        return cut_runs(update.replacement(item_idx), self.info.get_hf_config().image_token_id, count)

    unreduced_videos = "Gemma 4 (as on the Hugging Face path)"

    def prompt_text(self, prompt: list[int]) -> tuple[int, ...]:
        """The prompt's text with ``<start_of_image>`` and ``<end_of_image>`` where each image's soft token stands."""
        config = self.info.get_hf_config()
        return self.text_with_markers(prompt, config.image_token_id, [config.boi_token_id, config.eoi_token_id])


@MULTIMODAL_REGISTRY.register_processor(
    DuetGemma4MultiModalProcessor, info=DuetGemma4ProcessingInfo, dummy_inputs=Gemma4DummyInputsBuilder
)
class DuetGemma4ForConditionalGeneration(DuetTowerMixin, Gemma4ForConditionalGeneration):
    """vLLM's Gemma 4 with duet-vlm's reductions: images reduced in ``embed_multimodal``, and stages
    that drop inside the language model."""

    def language_geometry(self, feature=None) -> Geometry:
        """An image's geometry from its patches' positions (a typical image's, 16 x 16 soft tokens, at
        start); its decoder layers' scheme (``language.scheme.PerLayerInputLayers``) says what they take."""
        if feature is None:
            return gemma4_geometry(self.config, NOMINAL_SIDE, NOMINAL_SIDE)
        return gemma4_geometry(self.config, *positions_grid(self.config, feature.data["pixel_position_ids"]))

    tower_types = ("gemma4_vision",)
    chooses_projected = True

    def __init__(self, *, vllm_config, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self.setup_duet(vllm_config)
        if self.duet.active and getattr(vllm_config.compilation_config, "cudagraph_mm_encoder", False):
            # the encoder then replays a captured graph of vLLM's whole image path, without the taps
            raise RefusedMethod(
                "duet-vlm reduces Gemma 4 images in embed_multimodal, which encoder CUDA graphs replace: start the server "
                "without cudagraph_mm_encoder"
            )

    def encode(self, image_input, fields, modality: str) -> list[Encoded]:
        """Each image of its own size (its grid from its patches' positions), encoded on its own
        (``units``, ``unreduced``)."""
        pixels, positions = image_input["pixel_values"], image_input["pixel_position_ids"]
        count = len(fields.budgets)
        geometries = [gemma4_geometry(self.config, *positions_grid(self.config, positions[index])) for index in range(count)]
        ones = [Gemma4ImagePixelInputs(pixel_values=[pixels[index]], pixel_position_ids=[positions[index]])
                for index in range(count)]
        return [Encoded(geometry, plan, data=one) for geometry, plan, one in zip(geometries, self.item_plans(fields, geometries), ones)]

    def unreduced(self, item: Encoded, modality: str):
        (embeddings,) = self.embed_as_vllm(item.data)
        return embeddings

    def units(self, item: Encoded, modality: str) -> list[tuple]:
        (features,), (scores, keys, maps) = self.encode_with_taps(item.data, item.plan, item.geometry)
        return [(features[None], scores, keys, maps)]

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
                features = self.embed_as_vllm(image_input)
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
