"""InternVL3 / InternVL3.5 under vLLM: vLLM 0.32 serves transformers' ``InternVLForConditionalGeneration``
checkpoints with its ``InternS1ForConditionalGeneration`` (``interns1.py``), subclassed here.

As in the Hugging Face path (``duet_vlm.adapters.internvl``), an image is one item: all its 448 px
tiles and its thumbnail, with one budget, whose tokens are the post-shuffle tokens the projector
produced for every tile, in slot order (the tiles stacked top to bottom: the grid
``(tiles * side, side)``). A token's score is the feature layer's CLS attention summed over the 2x2
group of patches the model's own ``pixel_shuffle`` puts in it, its key the layer's keys averaged
over the group (``adapters.internvl.internvl_layer_scores`` and ``pool_through_shuffle``, run on
vLLM's layers, which carry the same module names). The stage chooses among projected tokens, so
its output reaches the language model as it is, each token in the slot of the token it stands for
(a merged token: its anchor's), as the Hugging Face path orders them. The processor writes
``<img>`` + the method's count of ``<IMG_CONTEXT>`` + ``</img>`` for each image; the tile count is
the processor's ``image_num_patches``, known before anything is encoded.

vLLM's InternVL vision tower is replicated on every tensor-parallel rank (plain linear layers), so
every rank scores with all heads. Videos (each frame a run of its own under ``<video>`` tokens) are
served as vLLM serves them, and the server's log says so.
"""

from __future__ import annotations

import torch
from vllm.model_executor.models.interns1 import (
    InternS1DummyInputsBuilder,
    InternS1ForConditionalGeneration,
    InternS1MultiModalProcessor,
    InternS1ProcessingInfo,
)
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.multimodal.processing import PromptUpdateDetails

from ....adapters.internvl import internvl_geometry, internvl_layer_scores, pool_through_shuffle, shuffle_groups
from ....geometry import Geometry
from ..common import DuetTowerMixin, Encoded
from ..options import RefusedMethod
from ..processor import DuetInfoMixin, DuetProcessorMixin, consecutive
from ..select import encoder_index


class DuetInternVLProcessingInfo(DuetInfoMixin, InternS1ProcessingInfo):
    """vLLM's InternVL processing info, whose Hugging Face processor never sees duet-vlm's options
    (vLLM's InternVL processor calls it directly, with the server's and the request's options)."""


class DuetInternVLMultiModalProcessor(DuetProcessorMixin, InternS1MultiModalProcessor):
    """vLLM's InternVL processor with each image's ``<IMG_CONTEXT>`` run cut to its reduced count."""

    geometry_fields = {"image": "image_num_patches"}  # an image's tiles, its thumbnail included

    def item_geometry(self, modality: str, tiles) -> Geometry:
        return internvl_geometry(self.info.get_hf_config(), int(tiles))

    def placeholders(self, update, item_idx: int, item, count: int):
        """``<img>``, ``count`` ``<IMG_CONTEXT>``, ``</img>``."""
        processor = self.info.get_hf_processor()
        context = processor.image_token_id
        ids = [processor.start_image_token_id] + [context] * count + [processor.end_image_token_id]
        return PromptUpdateDetails.select_token_id(ids, context)

    unreduced_videos = "InternVL (its frames are runs of their own)"

    def prompt_text(self, prompt: list[int]) -> tuple[int, ...]:
        """The prompt's text with ``<img>`` and ``</img>`` where each image's ``<IMG_CONTEXT>`` stands."""
        processor = self.info.get_hf_processor()
        return self.text_with_markers(prompt, processor.image_token_id,
                                      [processor.start_image_token_id, processor.end_image_token_id])


@MULTIMODAL_REGISTRY.register_processor(
    DuetInternVLMultiModalProcessor, info=DuetInternVLProcessingInfo, dummy_inputs=InternS1DummyInputsBuilder
)
class DuetInternVLForConditionalGeneration(DuetTowerMixin, InternS1ForConditionalGeneration):
    """vLLM's InternVL with duet-vlm's vision-side reduction in ``embed_multimodal``."""

    tower_types = ("internvl_vision",)
    chooses_projected = True

    def language_geometry(self, feature=None) -> Geometry:
        """An image's geometry from its tiles (a thumbnail and 6 tiles at start)."""
        tiles = 7 if feature is None else int(torch.as_tensor(feature.data["image_num_patches"].data).reshape(-1)[0])
        return internvl_geometry(self.config, tiles)

    def __init__(self, *, vllm_config, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self.setup_duet(vllm_config)
        config = self.config
        if self.duet.active:  # without a method this is vLLM's class as it is
            if config.vision_feature_select_strategy != "default":
                raise RefusedMethod("duet-vlm's InternVL path supports vision_feature_select_strategy='default' (CLS dropped)")
            if config.vision_feature_layer != -1:
                # vLLM's InternVL projects the tower's last layer whatever the config names
                raise RefusedMethod(
                    f"vision_feature_layer={config.vision_feature_layer}: vLLM's InternVL projects the tower's last "
                    "layer, so duet-vlm serves InternVL checkpoints whose feature layer is -1"
                )
        vision = config.vision_config
        self._duet_groups = shuffle_groups(self.pixel_shuffle, vision.image_size[0] // vision.patch_size[0],
                                           config.downsample_ratio)

    def encoder_layers_of(self) -> list:
        return list(self.vision_tower.encoder.layer)

    def _process_vision_input(self, image_input):
        """vLLM's embedding of a batch of images (or videos, which it serves as it is), the images a
        method reduces reduced."""
        return self.reduce_or_embed(image_input, super()._process_vision_input)

    def encode(self, image_input, fields, modality: str) -> list[Encoded]:
        """Every image's tiles through the tower and the projector at once (an image's rows: its tiles)."""
        counts = [int(n) for n in torch.as_tensor(image_input["num_patches"]).reshape(-1).tolist()]
        geometries = [internvl_geometry(self.config, tiles) for tiles in counts]
        plans = self.item_plans(fields, geometries)
        projected = []
        taps = self.run_tower(lambda: projected.append(self.extract_feature(image_input["pixel_values"])), plans)
        tokens = projected[0]
        return [Encoded(geometry, plan, rows, taps, tokens[rows].reshape(-1, tokens.shape[-1]))
                for geometry, plan, rows in zip(geometries, plans, consecutive(counts))]

    def unreduced(self, item: Encoded, modality: str):
        return item.data

    def units(self, item: Encoded, modality: str) -> list[tuple]:
        return [(item.data[None], *self.tower_signals(item.taps, item.plan, item.rows))]

    def tower_signals(self, taps, plan, rows) -> tuple[torch.Tensor, torch.Tensor, dict]:
        """An image's post-shuffle token scores ``(1, tiles * tokens)`` and keys from the feature layer
        (the tower's last), and the scores of the other layers its stage reads: each tile's CLS
        attention pooled through the shuffle, the tiles in slot order (one unit per image)."""
        layers = self.encoder_layers_of()
        depth = self.config.vision_config.num_hidden_layers
        received = plan.vision.received

        def pooled(index: int):
            scores, keys = internvl_layer_scores(layers[index], taps.inputs[index][rows], received)
            scores, keys = pool_through_shuffle(scores, keys, self._duet_groups)
            return scores.reshape(1, -1), keys.reshape(1, scores.numel(), -1)

        scores, keys = pooled(len(layers) - 1)
        maps = {layer: pooled(encoder_index(layer, depth))[0] for layer in plan.vision.encoder_layers()}
        return scores, keys, maps
