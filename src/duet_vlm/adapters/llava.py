"""LLaVA-1.5 (`LlavaForConditionalGeneration` / `LlavaModel`): one tower, one fixed-size image.

**Patches left out of the encoder** (``enter_patch_subset``, a method's ``InputStage``: PixelPrune).
A CLIP or SigLIP tower adds its learned absolute position embedding to every patch inside its
embeddings, then attends over all of them. Leaving patches out therefore happens *after* the
embeddings: a forward hook on them keeps each image's CLS row and the rows of its kept patches,
each with its own position embedding (``subset_inner_hooks``), so the encoder layers run on the
kept tokens only, where the cost is. Images of one call that keep different counts are padded to
the longest, and the tower's keyword arguments carry an additive key mask that transformers'
CLIP and SigLIP encoders pass to every layer's attention (eager or SDPA; FlashAttention takes no
such mask, and is refused for such a call). The tower's hidden states and the captures are put
back at their tokens' places, zeros where nothing entered, so LLaVA's feature selection and the
placeholder check see a whole encoding and the method's vision stage keeps the tokens that
entered; LLaVA's projector, which the model runs on that encoding next, projects only the entered
slots (``subset_after_tower``). The patch embedding (one convolution) still runs over the whole image; SigLIP's pooling
head, which LLaVA does not read, pools the kept tokens (and any padding).
"""

from __future__ import annotations

import torch
from torch import nn

from ..compat import images_of
from .base import Capture, Geometry, ModelAdapter, VisualItem, feature_layer

def compact(values: torch.Tensor, layout: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(rows, valid)``: the rows of ``values`` (``(images, T, ...)``) where ``layout`` (``(images,
    T)``) is True, in order, each image padded with zeros to the most any image keeps; ``valid``
    ``(images, n)`` False on the padding."""
    counts = layout.sum(dim=1)
    index = torch.sort((~layout).int(), dim=1, stable=True).indices[:, : int(counts.max())]
    valid = torch.arange(index.shape[1], device=index.device)[None] < counts[:, None]
    rows = values.gather(1, index.view(*index.shape, *[1] * (values.dim() - 2)).expand(-1, -1, *values.shape[2:]))
    return rows.masked_fill(~valid.view(*valid.shape, *[1] * (values.dim() - 2)), 0), valid


def expand(rows: torch.Tensor, layout: torch.Tensor) -> torch.Tensor:
    """The inverse of ``compact``: ``rows`` (``(images, n, ...)``) put back where ``layout`` is True,
    zeros elsewhere."""
    valid = torch.arange(rows.shape[1], device=rows.device)[None] < layout.sum(dim=1)[:, None]
    out = rows.new_zeros(*layout.shape, *rows.shape[2:])
    out[layout] = rows[valid]
    return out


#: OpenAI CLIP's image normalisation (LLaVA-1.5's processor), and SigLIP's.
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
SIGLIP_MEAN, SIGLIP_STD = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)


def llava_geometry(config) -> Geometry:
    """An image's geometry from a LLaVA config (the adapter's, and vLLM's ``integrations.vllm.llava``):
    its feature layer's tokens per image, CLS dropped under the "default" strategy.

    >>> from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig
    >>> vision = CLIPVisionConfig(image_size=336, patch_size=14, num_hidden_layers=24)
    >>> geometry = llava_geometry(LlavaConfig(vision_config=vision, text_config=LlamaConfig(num_hidden_layers=32)))
    >>> geometry.visual_tokens, geometry.grid, geometry.has_cls
    (576, (24, 24), True)
    """
    vision = config.vision_config
    has_cls = vision.model_type == "clip_vision_model"
    side = vision.image_size // vision.patch_size
    tokens = side * side + int(has_cls)  # what the feature layer outputs per image
    slots = tokens - (1 if config.vision_feature_select_strategy == "default" else 0)
    return Geometry(config.text_config.num_hidden_layers, slots, (side, side), has_cls, encoder_depth=vision.num_hidden_layers)


def tower_features(base: nn.Module, inputs: dict) -> torch.Tensor:
    """``(N, n, C)`` what a LLaVA family's projector maps, per image or video: the tower at the
    feature layer (only that layer's states kept, as ``get_image_features`` asks the tower) on every
    tile (LLaVA-NeXT) or frame (Video-LLaVA's videos, each frame's CLS kept), CLS dropped where the
    family drops it."""
    config = base.config
    layer = config.vision_feature_layer
    videos = inputs.get("pixel_values_videos")
    if videos is not None:
        features = base.video_tower(videos.flatten(0, 1), output_hidden_states=layer).hidden_states[layer]
        return features.reshape(videos.shape[0], -1, features.shape[-1])
    pixels = images_of(inputs)
    tower = base.vision_tower if hasattr(base, "vision_tower") else base.image_tower
    tiles = pixels.flatten(0, 1) if pixels.dim() == 5 else pixels  # LLaVA-NeXT: (N, tiles, 3, H, W)
    features = tower(tiles, output_hidden_states=layer).hidden_states[layer]
    if config.vision_feature_select_strategy == "default":
        features = features[:, 1:]
    return features.reshape(pixels.shape[0], -1, features.shape[-1])


def first_projected(projector: nn.Module, features: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """The projector on each image's first tokens, as many as the first row keeps (``(kept, width)``)."""
    return projector(features[:, : int(kept[0].sum())]).flatten(0, 1)


class LlavaAdapter(ModelAdapter):
    """Images are runs of ``config.image_token_id``, ``image_seq_length`` slots each; CLIP towers
    (CLS scores) or SigLIP towers (no CLS: attention received instead); 1-D RoPE."""

    family = "llava"
    model_types = ("llava",)
    vision_model_types = ("clip_vision_model", "siglip_vision_model")
    supported_classes = ("LlavaForConditionalGeneration", "LlavaModel")
    takes_patch_subsets = True

    def __init__(self, model: nn.Module):
        config = model.config
        self.check_vision(model)
        self.bind_modules(model)
        self.select_strategy = config.vision_feature_select_strategy
        self.towers = {"image": feature_layer(self.base.vision_tower, config.vision_feature_layer)}
        self.tower_entries = {"image": self.base.vision_tower}
        self.placeholder_ids = {config.image_token_id: "image"}
        self.has_cls = config.vision_config.model_type == "clip_vision_model"
        #: the processor's normalisation, to read pixels back (``unit_pixels``).
        self.pixel_mean, self.pixel_std = (CLIP_MEAN, CLIP_STD) if self.has_cls else (SIGLIP_MEAN, SIGLIP_STD)
        self.patch_size = config.vision_config.patch_size

        self.geometry = llava_geometry(config)

    def ideal_visual(self, inputs: dict, visual: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
        return first_projected(self.projector, tower_features(self.base, inputs), kept)

    @property
    def slots_have_cls(self) -> bool:
        """Whether the image's placeholder slots hold the CLS feature too (LLaVA "full" strategy)."""
        return self.has_cls and self.select_strategy == "full"

    def find_items(self, input_ids: torch.Tensor, kwargs: dict, captures: dict | None = None) -> list[VisualItem]:
        (token_id, tower), = self.placeholder_ids.items()
        return self.items_from_runs(input_ids, token_id, tower, lambda n: self.geometry)

    # ----------------------------------------------------------------- patches left out of the encoder
    def unit_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        """``(images, rows, cols, 3 * p * p)`` each patch's pixels in ``[0, 1]``, the processor's
        normalisation undone."""
        p = self.patch_size
        mean = torch.tensor(self.pixel_mean, dtype=torch.float32, device=pixels.device)[:, None, None]
        std = torch.tensor(self.pixel_std, dtype=torch.float32, device=pixels.device)[:, None, None]
        images, channels, height, width = pixels.shape
        x = pixels.float() * std + mean
        x = x.reshape(images, channels, height // p, p, width // p, p).permute(0, 2, 4, 1, 3, 5)
        return x.reshape(images, height // p, width // p, -1)

    def enter_patch_subset(self, stage, args: tuple, kwargs: dict) -> tuple[tuple, dict, torch.Tensor]:
        pixels = args[0] if args else kwargs["pixel_values"]
        grid = self.geometry.grid
        if tuple(pixels.shape[-2:]) != (grid[0] * self.patch_size, grid[1] * self.patch_size):
            raise ValueError(
                f"{type(stage).__name__} reads {grid[0]}x{grid[1]} patches of {self.patch_size} px; the tower got "
                f"images of {tuple(pixels.shape[-2:])} px"
            )
        chosen = torch.stack([stage.select(unit).to(pixels.device) for unit in self.unit_pixels(pixels)])
        if chosen.shape[1:] != grid or chosen.dtype != torch.bool or not bool(chosen.flatten(1).any(1).all()):
            raise RuntimeError(
                f"{type(stage).__name__}.select returned {tuple(chosen.shape[1:])} {chosen.dtype}, expected {grid} bool "
                "with at least one token per image"
            )
        entered = chosen.flatten()
        counts = self.tower_layout(entered).sum(dim=1)
        if bool((counts != counts.max()).any()):  # images keep different counts: the padding must not be attended to
            implementation = getattr(self.tower_entries["image"].config, "_attn_implementation", None)
            if implementation not in ("sdpa", "eager"):
                raise ValueError(
                    f"the vision tower runs {implementation!r} attention, which takes no key mask: images that keep "
                    "different numbers of patches cannot share a call. Load the model with attn_implementation='sdpa' "
                    "(or 'eager'), or pass one image per call"
                )
            if kwargs.get("attention_mask") is not None:
                raise ValueError("the vision tower was called with an attention mask: patches cannot be left out of it")
            dtype = self.tower_entries["image"].embeddings.patch_embedding.weight.dtype
            valid = torch.arange(int(counts.max()), device=counts.device)[None] < counts[:, None]
            mask = torch.zeros(valid.shape, dtype=dtype).masked_fill(~valid, torch.finfo(dtype).min).to(pixels.device)
            kwargs = {**kwargs, "attention_mask": mask[:, None, None, :]}
        return args, kwargs, entered

    def slot_layout(self, entered: torch.Tensor) -> torch.Tensor:
        """``(images, slots)`` True on each image's slots whose tokens entered (its CLS slot too,
        under the "full" strategy)."""
        patches = entered.view(-1, self.geometry.patches)
        if self.slots_have_cls:
            patches = torch.cat([patches.new_ones(patches.shape[0], 1), patches], dim=1)
        return patches

    def subset_inner_hooks(self, tower: str) -> dict:
        return {self.tower_entries[tower].embeddings: self.keep_rows}

    def keep_rows(self, embeddings: torch.Tensor, entered: torch.Tensor) -> torch.Tensor:
        """The embeddings' output ``(images, T, C)`` with only the rows the images keep (padded with zeros)."""
        if bool(entered.all()):
            return embeddings
        return compact(embeddings, self.tower_layout(entered.to(embeddings.device)))[0]

    def in_place(self, values: torch.Tensor, entered: torch.Tensor) -> torch.Tensor:
        """A subset call's ``(images, n, ...)`` tower rows put back at their tokens' places
        ``(images, T, ...)``, zeros where nothing entered."""
        if bool(entered.all()):
            return values
        return expand(values, self.tower_layout(entered.to(values.device)))

    def subset_after_tower(self, tower: str) -> dict:
        return {self.projector: (self.compact_slots, self.expand_slots)}

    def compact_slots(self, features: torch.Tensor, entered: torch.Tensor) -> torch.Tensor | None:
        """The projector's input ``(images, slots, C)`` cut to the slots that entered (padded to the
        most any image keeps), so that it projects only those; ``None`` for another input."""
        layout = self.slot_layout(entered.to(features.device))
        if features.dim() != 3 or tuple(features.shape[:2]) != tuple(layout.shape):
            return None
        return compact(features, layout)[0]

    def expand_slots(self, projected: torch.Tensor, entered: torch.Tensor) -> torch.Tensor:
        """The projector's output on the entered slots put back at every slot (zeros elsewhere)."""
        return expand(projected, self.slot_layout(entered.to(projected.device)))

    def expand_tower_output(self, output, entered: torch.Tensor) -> None:
        output.last_hidden_state = self.in_place(output.last_hidden_state, entered)
        if getattr(output, "hidden_states", None) is not None:
            output.hidden_states = tuple(
                None if states is None else self.in_place(states, entered) for states in output.hidden_states
            )

    def expand_capture(self, capture: Capture, entered: torch.Tensor) -> None:
        capture.layer_input = self.in_place(capture.layer_input, entered)
        capture.output = self.in_place(capture.output, entered)
        for context in capture.contexts:
            layers = context.get("layers", {})
            for layer, (layer_input, layer_kwargs) in list(layers.items()):
                layers[layer] = (self.in_place(layer_input, entered), layer_kwargs)
