"""LLaVA-NeXT under vLLM (and LLaVA-OneVision's images, ``llava_onevision``): anyres tiles, unpadding
and newline tokens, as in the Hugging Face path.

An image is one unit whose tokens are every patch slot vLLM's packing produces for it (the base
tile, then the unpadded high-resolution grid; newline slots excluded), scored by its own tile's CLS
attention, so a stage ranks all of an image's tiles together (``duet_vlm.adapters.llava_next``).
Which tile and patch each slot holds is traced, not re-derived: vLLM's own packing
(``_merge_image_patch_embeddings``) runs on the projected tiles and every packed slot is matched to
the projected patch it holds. The stage's output (projected) is the image's tokens; its newlines
are dropped with the rest, as in the Hugging Face path.
"""

from __future__ import annotations

import torch
from vllm.model_executor.models.llava import LlavaDummyInputsBuilder
from vllm.model_executor.models.llava_next import (
    LlavaNextForConditionalGeneration,
    LlavaNextMultiModalProcessor,
    LlavaNextProcessingInfo,
)
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.multimodal.parse import ImageProcessorItems
from vllm.multimodal.processing import PromptReplacement
from vllm.model_executor.models.llava_next import get_anyres_image_grid_shape

from ...geometry import Geometry
from .common import DuetProcessorMixin, DuetTowerMixin
from .options import RefusedMethod, plan_for


def next_geometry(info: LlavaNextProcessingInfo, width: int, height: int) -> Geometry:
    """An image's geometry before anything is encoded: its slots (base tile, unpadded grid, one
    newline per grid row) and its patch slots (``grid = (1, candidates)``), as the Hugging Face
    adapter traces them."""
    config = info.get_hf_config()
    encoder = info.get_vision_encoder_info()
    slots = info.get_num_image_tokens(image_width=width, image_height=height)
    rows, cols = get_anyres_image_grid_shape(
        image_size=(height, width), grid_pinpoints=config.image_grid_pinpoints, patch_size=encoder.get_image_size()
    )
    grid = dict(original_height=height, original_width=width, npatches=encoder.get_patch_grid_length(),
                num_patch_height=rows, num_patch_width=cols)
    unpadded = info._get_num_unpadded_features(**grid)
    _, newlines = unpadded
    if unpadded != LlavaNextProcessingInfo._get_num_unpadded_features(info, **grid):
        # LLaVA-OneVision's anyres_max: the unpadded grid is resized after projection
        raise RefusedMethod(
            f"duet-vlm: LLaVA-OneVision resizes the grid of a {width}x{height} image after projection (its unpadded "
            "grid exceeds anyres_max), so its tokens cannot be traced to the patches a vision-side method ranks; "
            "send a smaller image, or serve it without a method"
        )
    return Geometry(
        config.text_config.num_hidden_layers, slots, (1, slots - newlines), False,
        encoder_depth=config.vision_config.num_hidden_layers,
    )


class AnyresProcessorMixin(DuetProcessorMixin):
    """Each image's placeholder run as long as the method keeps of its anyres slots (LLaVA-NeXT,
    LLaVA-OneVision; before vLLM's processor class)."""

    def item_geometries(self, processed, hf_kwargs) -> list[Geometry]:
        return [next_geometry(self.info, int(w), int(h)) for h, w in processed["image_sizes"].tolist()]

    def _get_prompt_updates(self, mm_items, hf_processor_mm_kwargs, out_mm_kwargs):
        updates = super()._get_prompt_updates(mm_items, hf_processor_mm_kwargs, out_mm_kwargs)
        if not self.settings().active:
            return updates
        image_token_id = self.info.get_hf_config().image_token_index

        image_update = next(update for update in updates if update.modality == "image")

        def replacement(item_idx: int):
            images = mm_items.get("image")
            if not isinstance(images, ImageProcessorItems):
                return image_update.replacement(item_idx)
            size = images.get_image_size(item_idx)
            geometry = next_geometry(self.info, size.width, size.height)
            return [image_token_id] * self.reduced_tokens(hf_processor_mm_kwargs, geometry)

        others = [update for update in updates if update.modality != "image"]  # LLaVA-OneVision's videos
        return [PromptReplacement(modality="image", target=[image_token_id], replacement=replacement), *others]


class DuetLlavaNextMultiModalProcessor(AnyresProcessorMixin, LlavaNextMultiModalProcessor):
    pass


class AnyresTowerMixin(DuetTowerMixin):
    """duet-vlm's reduction of anyres images (LLaVA-NeXT, LLaVA-OneVision; before vLLM's model class)."""

    def __init__(self, *, vllm_config, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self.setup_duet(vllm_config, None)
        config = self.config
        if self.duet.active:  # without a method this is vLLM's class as it is
            if config.vision_config.model_type == "clip_vision_model" and config.vision_feature_select_strategy != "default":
                raise RefusedMethod("duet-vlm's anyres path supports CLIP towers with vision_feature_select_strategy='default'")
            if getattr(self, "select_layers", None) is not None:
                raise RefusedMethod("duet-vlm supports a single vision feature layer")

    def embed_multimodal(self, **kwargs: object):
        request = self.duet_pixels(kwargs)
        if request is None:
            return super().embed_multimodal(**kwargs)
        return self.reduce_anyres(*request)

    def reduce_anyres(self, image_input, budgets, texts) -> list:
        """Each image reduced by its method at its budget (an unreduced one as vLLM packs it)."""
        pixel_values = image_input["pixel_values"]
        tiles = [len(p) for p in pixel_values]
        stacked = torch.cat(list(pixel_values)) if not isinstance(pixel_values, torch.Tensor) else pixel_values.flatten(0, 1)
        config = self.config
        # Geometries are known once the tiles are traced: the taps cover the layers the method's
        # stage reads at any budget.
        taps = self.run_tower(lambda: self.vision_tower(stacked, feature_select_strategy="full"), self.method_plans())
        offset = int(config.vision_feature_select_strategy == "default")
        features_all = taps.output
        outputs = []
        start = 0
        for index, count in enumerate(tiles):
            rows = slice(start, start + count)
            start += count
            features = features_all[rows]
            projected = self.multi_modal_projector(features[:, offset:])
            packed = self.pack(image_input["image_sizes"][index], projected)
            tile, patch = trace_slots(packed, projected, self.image_newline)
            geometry = Geometry(
                config.text_config.num_hidden_layers, packed.shape[0], (1, len(tile)), False,
                encoder_depth=config.vision_config.num_hidden_layers,
            )
            plan = self.duet_plan(budgets[index], geometry, index)
            if plan is None:
                outputs.append(packed)
                continue
            scores, keys, maps = self.tower_signals(taps, plan, rows)
            tokens = patch + offset
            unit_features = features[tile, tokens][None]
            unit_scores = scores[tile, patch][None]  # scores are the patches' (a CLIP tower's skip CLS)
            unit_keys = keys[tile, tokens][None]
            unit_maps = {layer: m[tile, patch][None] for layer, m in maps.items()}
            reduced = self.reduce_item(
                plan, geometry, unit_features, unit_scores, unit_keys, unit_maps, self.text_embeddings(texts, index)
            )
            outputs.append(reduced.embeddings)
        return outputs

    def pack(self, image_size, projected: torch.Tensor) -> torch.Tensor:
        """vLLM's own packing of an image's projected tiles into its slots."""
        return self._merge_image_patch_embeddings(image_size, projected, strategy="spatial_unpad")

    def method_plans(self) -> list:
        """A plan of each method the server runs (its own, those it allows) at an arbitrary budget, for
        the layers their stages read."""
        geometry = Geometry(self.config.text_config.num_hidden_layers, 4096, (1, 4000), False,
                            encoder_depth=self.config.vision_config.num_hidden_layers)
        return [plan_for(self.duet.choose(index), 64, geometry) for index in range(len(self.duet.methods))]


@MULTIMODAL_REGISTRY.register_processor(
    DuetLlavaNextMultiModalProcessor, info=LlavaNextProcessingInfo, dummy_inputs=LlavaDummyInputsBuilder
)
class DuetLlavaNextForConditionalGeneration(AnyresTowerMixin, LlavaNextForConditionalGeneration):
    """vLLM's LLaVA-NeXT with duet-vlm's vision-side reduction in ``embed_multimodal``."""


def trace_slots(packed: torch.Tensor, projected: torch.Tensor, newline: torch.Tensor):
    """``(tile, patch)`` of every packed slot that holds a patch (newline slots skipped), in slot order:
    each slot matched to the identical projected patch (the packing only moves vectors)."""
    flat = projected.reshape(-1, projected.shape[-1])
    probe = torch.randn(flat.shape[-1], generator=torch.Generator().manual_seed(0), dtype=torch.float64).to(flat.device)
    keys = flat.double() @ probe
    order = keys.argsort()
    sorted_keys = keys[order]
    is_newline = (packed == newline.to(packed.dtype)).all(-1)
    wanted = packed[~is_newline]
    found = order[torch.searchsorted(sorted_keys, wanted.double() @ probe).clamp(max=len(order) - 1)]
    if not torch.equal(flat[found], wanted):
        raise RuntimeError("LLaVA-NeXT: packed slots could not be traced to their tiles")
    patches = projected.shape[1]
    return found // patches, found % patches
