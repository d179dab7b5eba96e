"""InternVL3 / InternVL3.5 (`InternVLForConditionalGeneration`): dynamic tiles, a 0.5 pixel shuffle.

What differs from the LLaVA families, and how this adapter meets it:

- **An image is many tiles.** The processor cuts an image into 448 px tiles (a grid chosen from the
  image's aspect ratio) and, when there is more than one, appends a thumbnail of the whole image;
  every tile goes through the ViT on its own (one row of ``pixel_values`` each, in image order,
  thumbnail last) and fills ``image_seq_length`` placeholder slots (256 at 448 px). The processor
  writes ``<img>`` + the placeholders of all of an image's tiles + ``</img>``, so **one run of
  placeholders is one image and one visual item**: all its tiles and its thumbnail, with one budget,
  as for LLaVA-NeXT. The tiles of a run are ``run length / tokens per tile`` (the tokens per tile
  are read from the tower's captured rows, else from the config); a run that is not a whole number
  of tiles, or runs asking for more (or other) tiles than ``pixel_values`` holds, is a
  ``ValueError``. The processor does not hand the model its tile grid (``num_patches`` is popped):
  tiles are known by count and order only (``cell_views`` draws one grid per tile, the last of a
  multi-tile image named the thumbnail, as the processor's ``use_thumbnail`` default puts it).
- **Tokens come out of a pixel shuffle.** The ViT (a CLS token, then ``side x side`` patches)
  feeds its feature layer's output, CLS dropped (``vision_feature_select_strategy="default"``), to
  ``pixel_shuffle(0.5)``, which concatenates each 2x2 group of patches into one token, then to the
  ``multi_modal_projector`` MLP. Vision stages choose among these **post-shuffle** tokens, in the
  language model's space, as the Qwen-VL adapter does for its merger: their features are read from
  ``inputs_embeds`` at the language model's entry (exactly what the projector produced and the
  model scattered into the slots), ``project`` is the identity, the view has no CLS
  (``has_cls=False``), and each output is written in the slot of the token it stands for. Choosing
  before the projector would give the same tokens, but a merging stage would then average 4 x 1024
  concatenated ViT channels and project the average, whereas here it averages what the language
  model reads (the choice the Qwen-VL and LLaVA-OneVision adapters made for their post-merge tokens);
  and reading the slots makes no assumption about which hidden state the model projected (the last
  layer with or without its final norm, any ``vision_feature_layer``).
- **The signal: CLS attention pooled through the shuffle.** A post-shuffle token's score is the
  CLS-to-patch attention of the feature layer (softmax of the CLS query over every key of its tile,
  summed over heads, as for CLIP), **summed** over the 2x2 group of patches the shuffle put in the
  token: the attention mass the CLS gives to what the token holds, so a tile's token scores add up
  to what its patches' scores add up to and the tiles of an image stay comparable. (Raw per-patch
  scores would rank a quarter of a token; averaging would only divide every score by 4.) Keys are
  the layer's head-averaged keys **averaged** over the same group. The groups are the model's own
  ``pixel_shuffle`` applied to a grid of patch indices, so the 4 -> 1 map is the model's, not a
  copy. Scores and keys come from the layer's own ``layernorm_before``, ``q_proj``/``k_proj`` and
  ``q_norm``/``k_norm`` on its captured input (``scoring.attention_scores``), so the tower keeps its
  attention backend; no ``output_attentions``, no eager attention. Other encoder layers a stage
  reads (VScan's and TRIO's shallow layer) are scored and pooled the same way.
- **Geometry.** An item of ``t`` tiles of ``s x s`` post-shuffle tokens has ``t * s * s`` slots and
  the grid ``(t * s, s)``: the tiles stacked top to bottom, which is exactly the slot order, so a
  unit's token ``k`` is grid cell ``(k // s, k % s)``. Spatial baselines (``pool``, the scan
  windows) see a tall image: their cells can straddle two tiles. The attach-time geometry is one
  tile and only nominal (images come in 1 to ``max_patches`` + 1 tiles): each image gets the plan of
  its own size.
- **Language side.** A Qwen2 / Qwen3 (or Llama) decoder with 1-D RoPE: the base adapter's
  conventions. Other decoders InternVL3.5 ships with (GPT-OSS: attention sinks and sliding windows)
  are refused at attach.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..scoring import patch_scores
from .base import Capture, Geometry, ModelAdapter, Signals, UnitFeatures, VisualItem, check_layer

#: Decoders whose layers the language side knows (input_layernorm, q/k projections, optional
#: per-head q/k norms, rotate-half 1-D RoPE).
TEXT_MODEL_TYPES = ("qwen2", "qwen3", "qwen3_moe", "llama")


def internvl_layer_scores(
    layer: nn.Module, layer_input: torch.Tensor, received: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(scores (U, P), keys (U, 1 + P, d))`` of an InternVL vision layer on its input ``(U, 1 + P, C)``
    (CLS first): the CLS query's attention to each patch, summed over heads (with ``received``: the
    attention each patch receives from every token), and the keys averaged over heads; from the
    layer's own ``layernorm_before``, projections and q/k norms."""
    attn = layer.attention
    units, tokens, _ = layer_input.shape
    # transformers' layer has identity q/k norms when the ViT has none; vLLM's (which serves the
    # same checkpoints, ``integrations.vllm.internvl``) has no such modules
    q_norm, k_norm = (getattr(attn, name, None) for name in ("q_norm", "k_norm"))
    q_norm, k_norm = (nn.Identity() if norm is None else norm for norm in (q_norm, k_norm))
    with torch.no_grad():
        x = layer.layernorm_before(layer_input)
        keys = k_norm(attn.k_proj(x)).view(units, tokens, attn.num_heads, attn.head_dim).transpose(1, 2)
        rows = x if received else x[:, :1]
        query = q_norm(attn.q_proj(rows)).view(units, rows.shape[1], attn.num_heads, attn.head_dim).transpose(1, 2)
        scores = patch_scores(query, keys, attn.scale, has_cls=True, received=received)
    return scores, keys.mean(dim=1)


def shuffle_groups(pixel_shuffle, side: int, ratio: float) -> torch.Tensor:
    """``(tokens, group)``: the raster indices of the patches of a ``side x side`` tile that the
    model's ``pixel_shuffle`` (called as ``pixel_shuffle(x, scale_factor=ratio)``) concatenates into
    each post-shuffle token, in its channel order."""
    index = torch.arange(side * side, dtype=torch.long).view(1, side, side, 1)
    shuffled = pixel_shuffle(index, scale_factor=ratio)  # (1, s, s, group)
    return shuffled.reshape(-1, shuffled.shape[-1])


def pool_through_shuffle(scores: torch.Tensor, keys: torch.Tensor, groups: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-patch ``scores (U, P)`` and ``keys (U, 1 + P, d)`` (CLS first) -> each post-shuffle token's:
    the scores summed over its group of patches, the keys averaged over it."""
    groups = groups.to(scores.device)
    return scores[:, groups].sum(dim=-1), keys[:, 1:][:, groups].mean(dim=-2)


@dataclass(frozen=True)
class TileLayout:
    """The tiles of one image: ``tiles`` rows of ``pixel_values`` (the thumbnail last when there is
    more than one), each ``side x side`` post-shuffle tokens."""

    tiles: int
    side: int

    @property
    def tile_tokens(self) -> int:
        return self.side * self.side


def internvl_geometry(config, tiles: int, side: int | None = None) -> Geometry:
    """An image of ``tiles`` tiles, its thumbnail included (the adapter's, and vLLM's
    ``integrations.vllm.internvl``): each ``side x side`` post-shuffle tokens (the config's where not
    given), stacked top to bottom.

    >>> from transformers import InternVLConfig
    >>> internvl_geometry(InternVLConfig(), 7).grid  # 448 px tiles of 14 px patches, shuffled 2x2
    (112, 16)
    """
    if side is None:
        vision = config.vision_config
        side = round((vision.image_size[0] // vision.patch_size[0]) * config.downsample_ratio)
    return Geometry(config.text_config.num_hidden_layers, tiles * side * side, (tiles * side, side), False,
                    encoder_depth=config.vision_config.num_hidden_layers)


class InternVLAdapter(ModelAdapter):
    """``InternVLForConditionalGeneration`` / ``InternVLModel`` (InternVL3, InternVL3.5)."""

    family = "internvl"
    model_types = ("internvl",)
    vision_model_types = ("internvl_vision",)
    supported_classes = ("InternVLForConditionalGeneration", "InternVLModel")
    nominal_geometry = True
    has_cls = False  # the views hold post-shuffle tokens: no CLS among them

    def __init__(self, model: nn.Module):
        self.check_vision(model)
        config = model.config
        text_type = getattr(config.text_config, "model_type", None)
        if text_type not in TEXT_MODEL_TYPES:
            raise TypeError(
                f"duet-vlm's internvl adapter supports language models of type {', '.join(TEXT_MODEL_TYPES)}; this "
                f"model's is {text_type!r} (its attention is not the Llama-like one the language stages recompute)"
            )
        if config.vision_feature_select_strategy != "default":
            raise TypeError("duet-vlm's internvl adapter supports vision_feature_select_strategy='default' only (CLS dropped)")
        self.bind_modules(model)
        self.tower = self.base.vision_tower
        self.vision_layers = self.tower.encoder.layer
        self._groups: dict[int, torch.Tensor] = {}
        self.towers = {"image": self._feature_layer(config.vision_feature_layer)}
        self.tower_entries = {"image": self.tower}
        self.placeholder_ids = {config.image_token_id: "image"}
        self.ratio = config.downsample_ratio
        vision = config.vision_config
        side = vision.image_size[0] // vision.patch_size[0]
        self.config_side = self.shuffled_side(side)  # post-shuffle tokens per tile side
        self.geometry = self.item_geometry(TileLayout(1, self.config_side))

    def ideal_visual(self, inputs: dict, visual: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
        # The ViT on every tile (CLS dropped at its feature layer, as ``get_image_features`` reads
        # it), the pixel shuffle, and the projector on the kept tokens only.
        config, base = self.base.config, self.base
        pixels = inputs["pixel_values"].to(dtype=base.dtype)
        layer = config.vision_feature_layer
        if layer == -1:
            features = self.tower(pixel_values=pixels, return_dict=True).last_hidden_state
        else:
            features = self.tower(pixel_values=pixels, output_hidden_states=True, return_dict=True).hidden_states[layer]
        features = features[:, 1:]
        tiles, side = features.shape[0], int(features.shape[1] ** 0.5)
        shuffled = base.pixel_shuffle(features.reshape(tiles, side, side, -1), scale_factor=config.downsample_ratio)
        tokens = shuffled.reshape(-1, shuffled.shape[-1])  # every tile's tokens, in slot order
        return self.projector(tokens[kept[visual]])

    def _feature_layer(self, index) -> nn.Module:
        """The encoder layer whose output is ``hidden_states[index]`` (as ``get_image_features`` reads it)."""
        if isinstance(index, bool) or not isinstance(index, int):
            raise TypeError(f"vision_feature_layer={index!r}: duet-vlm's internvl adapter supports a single layer")
        depth = len(self.vision_layers)
        layer = index % (depth + 1) - 1  # hidden_states[0] is the embeddings, [k] the output of layer k - 1
        if layer < 0:
            raise TypeError("vision_feature_layer selects the patch embeddings: no attention layer to score with")
        return self.vision_layers[layer]

    # ----------------------------------------------------------------- the pixel shuffle
    def shuffle_groups(self, side: int) -> torch.Tensor:
        """``(tokens, group)``: the raster indices of the patches of a ``side x side`` tile that the
        model's ``pixel_shuffle`` concatenates into each post-shuffle token (in its channel order)."""
        groups = self._groups.get(side)
        if groups is None:
            groups = self._groups[side] = shuffle_groups(self.base.pixel_shuffle, side, self.ratio)
        return groups

    def shuffled_side(self, side: int) -> int:
        """Post-shuffle tokens per side of a tile of ``side x side`` patches."""
        return round(self.shuffle_groups(side).shape[0] ** 0.5)

    def tile_side(self, captures: dict | None) -> int:
        """Post-shuffle tokens per tile side: from the tower's captured rows (what the model encoded),
        else from the config's image size."""
        capture = (captures or {}).get("image")
        if capture is None:
            return self.config_side
        return self.shuffled_side(round((capture.output.shape[1] - 1) ** 0.5))

    def item_geometry(self, layout: TileLayout) -> Geometry:
        return internvl_geometry(self.base.config, layout.tiles, layout.side)

    # ----------------------------------------------------------------- visual items
    def find_items(self, input_ids: torch.Tensor, kwargs: dict, captures: dict | None = None) -> list[VisualItem]:
        """One item per run of image placeholders (all of one image's tiles, between ``<img>`` and
        ``</img>``), its tiles ``run / tokens per tile``; refuses runs that are not whole tiles and
        runs asking for a number of tiles ``pixel_values`` does not hold (or a multiple of it, for
        rows ``generate`` repeated)."""
        (token_id, tower), = self.placeholder_ids.items()
        side = self.tile_side(captures)
        tokens = side * side
        layouts: dict[int, TileLayout] = {}

        def geometry_of_run(length: int) -> Geometry:
            if length % tokens:
                raise ValueError(
                    f"a run of {length} image placeholders is not a whole number of InternVL tiles of {tokens} tokens "
                    f"(each image's <img>...</img> holds image_seq_length placeholders per tile, thumbnail included)"
                )
            layout = layouts.setdefault(length, TileLayout(length // tokens, side))
            return self.item_geometry(layout)

        items = self.items_from_runs(input_ids, token_id, tower, geometry_of_run)
        for item in items:
            item.layout = layouts[item.length]
        capture = (captures or {}).get("image")
        if capture is not None and items:
            wanted, have = sum(item.layout.tiles for item in items), self.captured_units(capture)
            if wanted % have:
                per_image = [item.layout.tiles for item in items]
                raise ValueError(
                    f"the image placeholders ask for {wanted} tiles of {tokens} tokens (per image: {per_image}), but "
                    f"pixel_values held {have} tiles"
                )
        return items

    def units_needed(self, item: VisualItem) -> int:
        return item.layout.tiles

    # ----------------------------------------------------------------- vision side
    def encoder_layer(self, tower: str, layer) -> nn.Module:
        return self.vision_layers[check_layer({"first_full_attention": 0, "last": -1}.get(layer, layer), len(self.vision_layers))]

    def layer_scores(
        self, layer: nn.Module, layer_input: torch.Tensor, received: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(scores (rows, T), keys (rows, T, d))`` of every captured tile's post-shuffle tokens:
        ``layer``'s CLS-to-patch attention (or attention received) summed over each token's group of
        patches, its keys averaged over the group."""
        scores, keys = internvl_layer_scores(layer, layer_input, received)
        return pool_through_shuffle(scores, keys, self.shuffle_groups(round(scores.shape[1] ** 0.5)))

    def unit_features(self, items, capture: Capture, signals: Signals, first_row, inputs_embeds=None) -> UnitFeatures:
        """One unit per image: its post-shuffle tokens as the language model receives them (read from
        ``inputs_embeds``), with the pooled scores and keys of its tiles, in slot order."""
        features, unit_keys = [], []
        unit_scores: dict = {None: [], **{layer: [] for layer in signals.maps}}
        for item in items:
            rows = torch.arange(item.layout.tiles, device=signals.scores.device) + first_row(item)
            features.append(inputs_embeds[item.row, item.start : item.start + item.length])
            for layer, scores in ((None, signals.scores), *signals.maps.items()):
                unit_scores[layer].append(scores[rows].reshape(-1))
            unit_keys.append(signals.keys[rows].reshape(item.length, -1))
        maps = {layer: torch.stack(scores) for layer, scores in unit_scores.items() if layer is not None}
        return UnitFeatures(torch.stack(features), torch.stack(unit_scores[None]), torch.stack(unit_keys), maps)

    def project(self, item: VisualItem, features: torch.Tensor) -> torch.Tensor:
        return features  # the stage chose among projected tokens already

    def reduced_slots(self, item: VisualItem, kept: torch.Tensor) -> torch.Tensor:
        # Each output in the slot of the token it stands for (a merged token: its anchor's).
        return item.start + kept[0].cpu()

    def slot_units(self, item: VisualItem) -> torch.Tensor:
        """The tile (the thumbnail last) of each slot."""
        return torch.arange(item.layout.tiles).repeat_interleave(item.layout.tile_tokens)

    def view_units(self, item: VisualItem, view_index: torch.Tensor) -> torch.Tensor:
        return view_index // item.layout.tile_tokens

    def cell_views(self, item: VisualItem) -> tuple[list[tuple[str, int, int]], torch.Tensor]:
        """One grid per tile; the last of an image of several tiles is its thumbnail (the processor's
        default ``use_thumbnail``)."""
        layout = item.layout
        side, tiles = layout.side, layout.tiles
        within = torch.arange(layout.tile_tokens).repeat(tiles)
        tile = torch.arange(tiles).repeat_interleave(layout.tile_tokens)
        cells = torch.stack([tile, within // side, within % side], dim=1)
        names = [f"tile {t}" for t in range(tiles)]
        if tiles > 1:
            names[-1] = "thumbnail"
        return [(name, side, side) for name in names], cells

