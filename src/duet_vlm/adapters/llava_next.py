"""LLaVA-NeXT (`LlavaNextForConditionalGeneration`): anyres tiles, unpadding and newline tokens."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .base import (
    Capture,
    Geometry,
    ModelAdapter,
    UnitFeatures,
    VisualItem,
    feature_layer,
)
from .llava import first_projected, tower_features


@dataclass(frozen=True)
class AnyresLayout:
    """Where each patch slot of one anyres image comes from.

    Attributes:
        slot_tile, slot_patch: ``(candidates,)`` captured tile row and patch (raster index within
            the tile) of every slot that holds a patch, in slot order; newline slots hold none.
        candidate_slots: ``(candidates,)`` those slots' offsets within the image's block.
    """

    slot_tile: torch.Tensor
    slot_patch: torch.Tensor
    candidate_slots: torch.Tensor


def anyres_geometry(config, slots: int, candidates: int | None = None) -> Geometry:
    """An anyres image's geometry (the adapter's, and vLLM's ``integrations.vllm.llava_next``):
    ``slots`` placeholders (tiles, unpadding and newlines), ``candidates`` of them patch slots (all
    where not given), as one sequence (``grid = (1, candidates)``).

    >>> from transformers import LlavaNextConfig
    >>> anyres_geometry(LlavaNextConfig(), 2928, 2880).grid
    (1, 2880)
    """
    candidates = slots if candidates is None else candidates
    return Geometry(config.text_config.num_hidden_layers, slots, (1, candidates), False,
                    encoder_depth=config.vision_config.num_hidden_layers)


#: How far (relative to a slot's largest magnitude) the projector run again may round a slot apart
#: from the model's own run of it: a GPU's matrix kernels need not round two calls alike (seen on an
#: H200 in float32: every SigLIP-tower slot off by a few units in the last place). An image resized
#: after the projector (LLaVA-OneVision above anyres_max tiles) is interpolated, far from any of them.
TRACE_TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 2.0**-6, torch.float16: 2.0**-9}


def _nearest_within_rounding(flat: torch.Tensor, wanted: torch.Tensor, found: torch.Tensor) -> bool:
    """Where the exact lookup missed a slot, take the projected row nearest to it; ``True`` (and
    ``found`` updated in place) if every slot is then within ``TRACE_TOLERANCE`` of its row."""
    missed = (flat[found] != wanted).any(-1).nonzero()[:, 0]
    rows = flat.float()
    for chunk in missed.split(1024):
        found[chunk] = torch.cdist(wanted[chunk].float(), rows).argmin(-1)
    scale = wanted[missed].float().abs().amax(-1, keepdim=True).clamp(min=torch.finfo(torch.float32).tiny)
    difference = (rows[found[missed]] - wanted[missed].float()).abs() / scale
    return bool(difference.max() <= TRACE_TOLERANCE.get(wanted.dtype, 2.0**-6))


class LlavaNextAdapter(ModelAdapter):
    """An image is every slot transformers' packing produces for it: the base tile, the unpadded
    grid of high-resolution tiles and one ``image_newline`` per grid row, so its size depends on
    the image's size. An image is one run of placeholders (transformers' processors put text
    between images; two images with nothing between them count as one item).

    Which tile and patch each slot holds is traced, not re-derived: ``generate()`` encodes images
    before the prefill and drops ``image_sizes``, so instead the captured tile features are projected
    once more (the same call on the same tensor, hence the same bits) and every slot written by
    transformers' packing is matched to its projected patch; newline slots equal ``image_newline``.
    No packing logic is copied, and copies made by ``generate`` (beams, several sequences) match the
    same tiles.

    Vision stages see one unit per image: the pre-projector features of every patch slot of all its
    tiles (newlines excluded), scored by its tile's CLS attention (attention received for SigLIP),
    so Stage A ranks all tiles of an image together. Their output fills the image's first slots and
    newline slots are dropped with the rest; language stages rank every remaining slot, newlines
    included. ``Geometry.grid`` of an anyres image is ``(1, patch slots)``: there is no single 2-D
    grid, so the pooling baseline pools that sequence in slot order.
    """

    family = "llava_next"
    model_types = ("llava_next",)
    vision_model_types = ("clip_vision_model", "siglip_vision_model")
    supported_classes = ("LlavaNextForConditionalGeneration", "LlavaNextModel")

    def __init__(self, model: nn.Module):
        config = model.config
        self.check_vision(model)
        clip = config.vision_config.model_type == "clip_vision_model"
        if clip and config.vision_feature_select_strategy != "default":
            # A CLIP tower's CLS would sit among the patch slots of every tile.
            raise TypeError("duet-vlm's llava_next adapter supports CLIP towers with vision_feature_select_strategy='default' only")
        self._setup(model)

    def _setup(self, model: nn.Module) -> None:
        config = model.config
        self.bind_modules(model)
        self.towers = {"image": feature_layer(self.base.vision_tower, config.vision_feature_layer)}
        self.tower_entries = {"image": self.base.vision_tower}
        self.placeholder_ids = {config.image_token_id: "image"}
        self.has_cls = config.vision_config.model_type == "clip_vision_model"
        # Tower tokens dropped before the projector ("default" drops CLS): projected index q is token q + offset.
        self.feature_offset = int(config.vision_feature_select_strategy == "default")
        vision = config.vision_config
        side = vision.image_size // vision.patch_size
        self.tile_side = side
        self.encoder_depth = vision.num_hidden_layers
        self.tile_patches = side * side
        # The base tile alone and its newline: what `duet-vlm plan` shows by default.
        self.geometry = self.geometry_of_run(self.tile_patches + 1)

    def ideal_visual(self, inputs: dict, visual: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
        features = tower_features(self.base, inputs)
        count = int(kept[0].sum())
        if count <= features.shape[1]:
            return first_projected(self.projector, features, kept)
        # (nearly) every slot kept: the model's own unpadding and newlines, images of one size in the rows
        tiles = inputs["pixel_values"].shape[1]
        projected = self.projector(features.reshape(-1, features.shape[1] // tiles, features.shape[-1]))
        packed, _ = self.base.pack_image_features(
            list(projected.split(tiles)), inputs["image_sizes"], self.base.config.vision_feature_select_strategy,
            image_newline=self.base.image_newline,
        )
        return torch.stack(packed)[:, :count].flatten(0, 1)

    def geometry_of_run(self, slots: int, candidates: int | None = None) -> Geometry:
        return anyres_geometry(self.base.config, slots, candidates)

    def find_items(self, input_ids: torch.Tensor, kwargs: dict, captures: dict | None = None) -> list[VisualItem]:
        (token_id, tower), = self.placeholder_ids.items()
        return [
            VisualItem(item.row, item.start, item.geometry, tower)
            for item in self.items_from_runs(input_ids, token_id, tower, self.geometry_of_run)
            for _ in [None]
        ]

    def trace(self, items: list[VisualItem], captures: dict[str, Capture], inputs_embeds: torch.Tensor) -> None:
        """Give each item its ``AnyresLayout`` and the geometry of its patch slots (see the class docstring)."""
        capture = captures.get("image")
        items = [item for item in items if item.tower == "image"]
        if capture is None or not items:
            return
        features = capture.output[:, self.feature_offset :]  # what the model projected
        with torch.no_grad():
            projected = self.projector(features).to(inputs_embeds.dtype)
        flat = projected.reshape(-1, projected.shape[-1])
        probe = torch.randn(flat.shape[-1], generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        keys = flat.double() @ probe.to(flat.device)
        order = keys.argsort()
        sorted_keys = keys[order]
        newline = self.base.image_newline.to(inputs_embeds.dtype)
        for item in items:
            slots = inputs_embeds[item.row, item.start : item.start + item.length].detach()
            candidates = (~(slots == newline).all(-1)).nonzero()[:, 0]
            wanted = slots[candidates]
            found = order[torch.searchsorted(sorted_keys, wanted.double() @ probe.to(flat.device)).clamp(max=len(order) - 1)]
            if not torch.equal(flat[found], wanted) and not _nearest_within_rounding(flat, wanted, found):
                continue  # resized after projection (OneVision's anyres_max): no slot-to-patch map
            item.layout = AnyresLayout(found // self.tile_patches, found % self.tile_patches, candidates)
            item.geometry = self.geometry_of_run(item.length, len(candidates))

    def units_needed(self, item: VisualItem) -> int:
        return 0  # slots are traced to tiles, not consumed in order

    def slot_units(self, item: VisualItem) -> torch.Tensor:
        """The tile (0 = the base tile) of each slot; -1 on newlines, and everywhere if untraced."""
        units = torch.full((item.length,), -1)
        if item.layout is not None and item.tower == "image":
            tiles = item.layout.slot_tile
            units[item.layout.candidate_slots.cpu()] = (tiles - tiles.min()).cpu()
            return units
        return super().slot_units(item) if item.tower != "image" else units

    def cell_views(self, item: VisualItem) -> tuple[list[tuple[str, int, int]], torch.Tensor]:
        """The base tile's grid and the unpadded high-resolution grid (newline slots: -1); both
        cover the whole picture, since unpadding removes exactly the processor's padding."""
        if item.tower != "image" or item.layout is None:
            return super().cell_views(item)
        side = self.tile_side
        cells = torch.full((item.length, 3), -1)
        base = torch.arange(side * side)
        cells[: side * side] = torch.stack([torch.zeros_like(base), base // side, base % side], dim=1)
        rows = item.length - len(item.layout.candidate_slots)  # one newline per high-resolution row
        if rows:
            cols = (item.length - side * side) // rows - 1
            grid = torch.arange(item.length - side * side)
            row, col = grid // (cols + 1), grid % (cols + 1)
            hires = torch.stack([torch.ones_like(row), row, col], dim=1)
            hires[col == cols] = -1
            cells[side * side :] = hires
            return [("base tile", side, side), ("high resolution", rows, cols)], cells
        return [("base tile", side, side)], cells

    def vision_slots(self, item: VisualItem, vision_kept: torch.Tensor) -> torch.Tensor:
        if item.tower != "image":
            return super().vision_slots(item, vision_kept)
        return item.layout.candidate_slots.cpu()[vision_kept.cpu().reshape(-1)]

    def view_units(self, item: VisualItem, view_index: torch.Tensor) -> torch.Tensor:
        tiles = item.layout.slot_tile
        return (tiles - tiles.min())[view_index]

    def unit_features(self, items, capture: Capture, signals, first_row, inputs_embeds=None) -> UnitFeatures:
        if any(item.layout is None for item in items):
            raise ValueError(
                "this image's slots could not be traced to its tiles (it was resized after the projector, as "
                "LLaVA-OneVision does above anyres_max tiles): use a language-side method, or a smaller image"
            )
        features, unit_keys = [], []
        unit_scores: dict = {None: [], **{layer: [] for layer in signals.maps}}
        for item in items:
            layout = item.layout
            tokens = layout.slot_patch + self.feature_offset
            features.append(capture.output[layout.slot_tile, tokens])
            for layer, scores in ((None, signals.scores), *signals.maps.items()):  # CLIP scores skip CLS
                unit_scores[layer].append(scores[layout.slot_tile, tokens - int(self.has_cls)])
            unit_keys.append(signals.keys[layout.slot_tile, tokens])
        maps = {layer: torch.stack(scores) for layer, scores in unit_scores.items() if layer is not None}
        return UnitFeatures(torch.stack(features), torch.stack(unit_scores[None]), torch.stack(unit_keys), maps)

    # One tower encodes everything in this family (LLaVA-OneVision's videos too).
    def vision_scores(
        self, layer_input: torch.Tensor, tower: str = "image", received: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return self.layer_scores(self.towers["image"], layer_input, received)

    def encoder_layer(self, tower: str, layer) -> nn.Module:
        return super().encoder_layer("image", layer)
