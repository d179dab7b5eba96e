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
from vllm.model_executor.models.llava_next import get_anyres_image_grid_shape

from ....adapters.llava_next import anyres_geometry
from ....geometry import Geometry
from ..common import DuetTowerMixin, Encoded
from ..options import RefusedMethod, plan_for
from ..processor import DuetProcessorMixin, consecutive


class StageNotServedHere(RefusedMethod):
    """An item this family does not serve with a method that drops inside the language model."""


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
    return anyres_geometry(config, slots, slots - newlines)


class AnyresProcessorMixin(DuetProcessorMixin):
    """Each image's placeholder run as long as the method keeps of its anyres slots (LLaVA-NeXT,
    LLaVA-OneVision; before vLLM's processor class)."""

    geometry_fields = {"image": "image_sizes"}

    def item_geometry(self, modality: str, size) -> Geometry:
        height, width = (int(v) for v in size)
        return next_geometry(self.info, width, height)


class DuetLlavaNextMultiModalProcessor(AnyresProcessorMixin, LlavaNextMultiModalProcessor):
    pass


class AnyresTowerMixin(DuetTowerMixin):
    """duet-vlm's reduction of anyres images (LLaVA-NeXT, LLaVA-OneVision; before vLLM's model class)."""


    def language_geometry(self, feature=None) -> Geometry:
        """An image's geometry from its size, as the processor gives it (``next_geometry``, with the
        processing info of vLLM's processor for this model, made once); a base-tile square image's
        at start."""
        info = getattr(self, "_duet_info", None)
        if info is None:
            from vllm.multimodal import MULTIMODAL_REGISTRY

            info = self._duet_info = MULTIMODAL_REGISTRY.create_processor(self._duet_model_config).info
        if feature is None:
            side = self.config.vision_config.image_size
            return next_geometry(info, side, side)
        if feature.modality != "image":
            return self.video_geometry(feature)
        height, width = (int(v) for v in torch.as_tensor(feature.data["image_sizes"].data).reshape(-1))
        return next_geometry(info, width, height)

    def video_geometry(self, feature) -> Geometry:
        raise StageNotServedHere(f"a {feature.modality} is not served dropping inside the language model on this family")

    def __init__(self, *, vllm_config, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self.setup_duet(vllm_config)
        config = self.config
        if self.duet.active:  # without a method this is vLLM's class as it is
            if config.vision_config.model_type == "clip_vision_model" and config.vision_feature_select_strategy != "default":
                raise RefusedMethod("duet-vlm's anyres path supports CLIP towers with vision_feature_select_strategy='default'")
            if getattr(self, "select_layers", None) is not None:
                raise RefusedMethod("duet-vlm supports a single vision feature layer")

    def encode(self, image_input, fields, modality: str) -> list[Encoded]:
        """Every image's tiles through the tower at once, then each image's projected tiles packed
        by vLLM and its slots traced to their tiles and patches, which gives its geometry (the taps
        cover the layers the server's methods read at any budget)."""
        pixel_values = image_input["pixel_values"]
        tiles = [len(p) for p in pixel_values]
        stacked = torch.cat(list(pixel_values)) if not isinstance(pixel_values, torch.Tensor) else pixel_values.flatten(0, 1)
        taps = self.run_tower(lambda: self.vision_tower(stacked, feature_select_strategy="full"), self.method_plans())
        offset = int(self.config.vision_feature_select_strategy == "default")
        geometries, traced = [], []
        for index, rows in enumerate(consecutive(tiles)):
            features = taps.output[rows]
            projected = self.multi_modal_projector(features[:, offset:])
            packed = self.pack(image_input["image_sizes"][index], projected)
            tile, patch = trace_slots(packed, projected, self.image_newline)
            geometries.append(anyres_geometry(self.config, packed.shape[0], len(tile)))
            traced.append((packed, features, tile, patch))
        plans = self.item_plans(fields, geometries)
        return [Encoded(geometry, plan, rows, taps, data)
                for geometry, plan, rows, data in zip(geometries, plans, consecutive(tiles), traced)]

    def unreduced(self, item: Encoded, modality: str):
        packed, _, _, _ = item.data
        return packed

    def units(self, item: Encoded, modality: str) -> list[tuple]:
        """The image's patch slots, in slot order, as one unit (a CLIP tower's scores skip its CLS)."""
        _, features, tile, patch = item.data
        scores, keys, maps = self.tower_signals(item.taps, item.plan, item.rows)
        tokens = patch + int(self.config.vision_feature_select_strategy == "default")
        return [(features[tile, tokens][None], scores[tile, patch][None], keys[tile, tokens][None],
                 {layer: m[tile, patch][None] for layer, m in maps.items()})]

    def pack(self, image_size, projected: torch.Tensor) -> torch.Tensor:
        """vLLM's own packing of an image's projected tiles into its slots."""
        return self._merge_image_patch_embeddings(image_size, projected, strategy="spatial_unpad")

    def method_plans(self) -> list:
        """A plan of each method the server runs (its own, those it allows) at an arbitrary budget, for
        the layers their stages read."""
        geometry = anyres_geometry(self.config, 4096, 4000)  # half its tokens: a budget every method meets
        return [plan_for(self.duet.choose(index), 2048, geometry) for index in range(len(self.duet.methods))]


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
