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
from vllm.multimodal.parse import ImageProcessorItems
from vllm.multimodal.processing import PromptReplacement, PromptUpdateDetails

from ...adapters.internvl import internvl_layer_scores, pool_through_shuffle, shuffle_groups
from ...geometry import Geometry
from .common import DuetInfoMixin, DuetProcessorMixin, DuetTowerMixin
from .options import RefusedMethod
from .select import encoder_index


def internvl_geometry(config, tiles: int) -> Geometry:
    """An image of ``tiles`` tiles (its thumbnail included), as ``adapters.internvl`` gives it."""
    vision = config.vision_config
    side = round((vision.image_size[0] // vision.patch_size[0]) * config.downsample_ratio)
    return Geometry(
        config.text_config.num_hidden_layers, tiles * side * side, (tiles * side, side), False,
        encoder_depth=vision.num_hidden_layers,
    )


class DuetInternVLProcessingInfo(DuetInfoMixin, InternS1ProcessingInfo):
    """vLLM's InternVL processing info, whose Hugging Face processor never sees duet-vlm's options
    (vLLM's InternVL processor calls it directly, with the server's and the request's options)."""


class DuetInternVLMultiModalProcessor(DuetProcessorMixin, InternS1MultiModalProcessor):
    """vLLM's InternVL processor with each image's ``<IMG_CONTEXT>`` run cut to its reduced count."""

    def item_geometries(self, processed, hf_kwargs) -> list[Geometry]:
        config = self.info.get_hf_config()
        return [internvl_geometry(config, int(tiles)) for tiles in processed["image_num_patches"].tolist()]

    unreduced_videos = "InternVL (its frames are runs of their own)"

    def prompt_text(self, prompt: list[int]) -> tuple[int, ...]:
        """The prompt's text with ``<img>`` and ``</img>`` where each image's ``<IMG_CONTEXT>`` stands."""
        processor = self.info.get_hf_processor()
        return self.text_with_markers(prompt, processor.image_token_id,
                                      [processor.start_image_token_id, processor.end_image_token_id])

    def _get_prompt_updates(self, mm_items, hf_processor_mm_kwargs, out_mm_kwargs):
        updates = super()._get_prompt_updates(mm_items, hf_processor_mm_kwargs, out_mm_kwargs)
        if not self.settings().active:
            return updates
        config = self.info.get_hf_config()
        processor = self.info.get_hf_processor(**hf_processor_mm_kwargs)
        start, end, context = processor.start_image_token_id, processor.end_image_token_id, processor.image_token_id
        image_update = next(update for update in updates if update.modality == "image")

        def replacement(item_idx: int):
            if not isinstance(mm_items.get("image"), ImageProcessorItems):  # precomputed embeddings: not reduced
                return image_update.replacement(item_idx)
            tiles = int(out_mm_kwargs["image"][item_idx]["image_num_patches"].data)
            count = self.reduced_tokens(hf_processor_mm_kwargs, internvl_geometry(config, tiles))
            return PromptUpdateDetails.select_token_id([start] + [context] * count + [end], context)

        others = [update for update in updates if update.modality != "image"]
        return [PromptReplacement(modality="image", target=[context], replacement=replacement), *others]


@MULTIMODAL_REGISTRY.register_processor(
    DuetInternVLMultiModalProcessor, info=DuetInternVLProcessingInfo, dummy_inputs=InternS1DummyInputsBuilder
)
class DuetInternVLForConditionalGeneration(DuetTowerMixin, InternS1ForConditionalGeneration):
    """vLLM's InternVL with duet-vlm's vision-side reduction in ``embed_multimodal``."""

    tower_types = ("internvl_vision",)

    def __init__(self, *, vllm_config, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self.setup_duet(vllm_config, None)
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

    def embed_multimodal(self, **kwargs: object):
        request = self.duet_pixels(kwargs)
        if request is None:
            return super().embed_multimodal(**kwargs)
        image_input, budgets, texts = request
        outputs: tuple = ()
        for modality, parsed in self._parse_and_validate_multimodal_inputs(**kwargs).items():  # vLLM's order
            if modality == "images":
                outputs += tuple(self.reduce_tiles(image_input, budgets, texts))
            elif parsed is not None:
                outputs += tuple(self._process_vision_input(parsed))
        return outputs

    def reduce_tiles(self, image_input, budgets, texts) -> list:
        """Each image's post-shuffle tokens reduced by its method at its budget (an unreduced image
        as vLLM embeds it)."""
        counts = [int(n) for n in torch.as_tensor(image_input["num_patches"]).reshape(-1).tolist()]
        geometries = [internvl_geometry(self.config, tiles) for tiles in counts]
        plans = [self.duet_plan(budget, geometry, index) for index, (budget, geometry) in enumerate(zip(budgets, geometries))]
        projected = []
        taps = self.run_tower(lambda: projected.append(self.extract_feature(image_input["pixel_values"])), plans)
        tokens_all = projected[0]
        outputs, start = [], 0
        for index, (plan, geometry, tiles) in enumerate(zip(plans, geometries, counts)):
            rows = slice(start, start + tiles)
            start += tiles
            tokens = tokens_all[rows].reshape(-1, tokens_all.shape[-1])
            if plan is None:
                outputs.append(tokens)
                continue
            scores, keys, maps = self.tower_signals(taps, plan, rows)
            reduced = self.reduce_item(plan, geometry, tokens[None], scores, keys, maps, self.text_embeddings(texts, index),
                                       project=lambda features: features)
            outputs.append(reduced.in_slot_order())
        return outputs

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
