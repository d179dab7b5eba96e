"""The one ideal model of every benchmark: what a reduction would cost if choosing the tokens were free."""

from __future__ import annotations

from itertools import groupby
from typing import Callable

import torch

from ..compaction import Compaction
from ..compat import KVSharingDict, with_cache


def _family(config) -> str:
    """Which path builds the entry embeddings: ``qwen3_5``, ``internvl``, ``gemma3``, ``gemma4`` or
    ``llava`` (LLaVA-1.5, LLaVA-NeXT, Video-LLaVA)."""
    kind = getattr(config, "model_type", None)
    if kind in ("qwen3_5", "qwen3_5_moe"):
        return "qwen3_5"
    return kind if kind in ("internvl", "gemma3", "gemma4") else "llava"


class IdealModel:
    """The unpatched model run on reduced token counts, with no scoring and no bookkeeping.

    Layer ``l`` of the decoder sees every text token and the first ``visual_per_layer[l]`` visual slots
    of each row (any slots cost the same). The prompt enters the decoder compacted to
    ``visual_per_layer[0]`` slots (``entry``); where the count drops, the sequence is compacted once
    more for the next run of layers (each group's ``step``), whose positions are renumbered and RoPE
    recomputed (1-D RoPE), or, under M-RoPE (Qwen3.5), the kept tokens' own (time, row, column)
    positions gathered from the unreduced prompt's (never renumbered) and RoPE recomputed from them.
    Each layer is the model's own module called directly, so with a ``DynamicCache`` each layer's
    cache holds exactly its own tokens and a decoding step attends over those per-layer lengths.
    Each layer gets the mask of its kind: attention layers a boolean causal mask for padded rows,
    ``None`` (SDPA's causal path) for unpadded ones; linear-attention layers (Qwen3.5's
    Gated-DeltaNet, ``layer_types``) the 2-D padding mask, ``None`` without padding, as the model's
    ``create_recurrent_attention_mask`` gives them.

    ``decode`` runs the decoder alone on entry states (any LLaVA family: the slots are the image or
    video tokens). ``embeddings``, ``forward``, ``generate`` and ``loss`` start from the pixels of a
    LLaVA-1.5, LLaVA-NeXT or Video-LLaVA prompt: the family's tower runs as usual on every tile or
    frame (only its feature layer's states kept), and the projector on the kept count only; with
    nothing dropped at the entry the visual embeddings are the model's own (LLaVA-NeXT's unpadding
    and newlines included), so the ideal of no reduction is the unreduced model. The same holds for
    Qwen3.5 (the vision blocks on every patch, the 2x2 merger on the kept tokens' groups of patches
    only) and InternVL (the ViT on every tile, CLS dropped, the pixel shuffle, the projector on the
    kept tokens only); their visual slots are filled in the model's order (row by row, image by
    image), so the kept slots take the features the model would put there. ``generate`` is a
    bare greedy loop (embed, layers, norm, LM head on the last position, argmax); ``loss`` is a
    training forward.

    >>> ideal = IdealModel(model, inputs, [205] * 16 + [102] * 8 + [0] * 8)      # doctest: +SKIP
    >>> tokens, cache = ideal.generate(32)                                        # doctest: +SKIP
    """

    def __init__(self, model, inputs: dict[str, torch.Tensor], visual_per_layer: list[int]):
        base = model.model
        self.model, self.base, self.language_model = model, base, base.language_model
        self.inputs = inputs
        self.family = _family(model.config)
        ids = inputs["input_ids"]
        mask = inputs.get("attention_mask")
        self.pixel_values = inputs.get("pixel_values")
        self.pixel_values_videos = inputs.get("pixel_values_videos")
        self.image_sizes = inputs.get("image_sizes")
        self.input_ids = ids
        token = model.config.video_token_id if "pixel_values_videos" in inputs else model.config.image_token_id
        visual = ids == token
        rank = visual.long().cumsum(dim=1) - 1
        runs = [(count, len(list(run))) for count, run in groupby(visual_per_layer)]
        self.visual = visual
        self.entry_visual = visual & (rank < runs[0][0])  # visual slots that enter the decoder
        self.entry = Compaction.from_keep(self.entry_visual | ~visual)
        text_config = self.language_model.config
        types = getattr(text_config, "layer_types", None) or ["full_attention"] * len(self.language_model.layers)
        kinds = ["linear" if kind == "linear_attention" else "attention" for kind in types]
        # Gemma: its image blocks attend both ways (Gemma 3 in every layer, Gemma 4 in sliding ones)
        token_types = inputs.get("token_type_ids", inputs.get("mm_token_type_ids"))
        self.gemma = self.family in ("gemma3", "gemma4")
        if self.gemma:
            kinds = list(types)  # a mask and a RoPE per layer type
        # M-RoPE: the unreduced prompt's (3, B, L) positions, of which each group keeps its tokens'.
        original = None
        if self.family == "qwen3_5":
            original, _ = base.get_rope_index(
                ids, inputs["mm_token_type_ids"], image_grid_thw=inputs.get("image_grid_thw"),
                video_grid_thw=inputs.get("video_grid_thw"), attention_mask=mask,
            )
            self.next_position = original.amax(dim=(0, 2))[:, None] + 1  # (B, 1) a decoding step's first position
        # (compaction of the previous group's sequence, or None; valid keys; M-RoPE positions or None; layers; kinds)
        self.groups, self.token_types = [], []  # token types: per group, its sequence's (Gemma 3)
        segment, start = self.entry, 0
        for count, size in runs:
            step = Compaction.from_keep(segment.gather(~visual | (rank < count)))
            segment = segment.then(step)
            valid = torch.ones_like(segment.index, dtype=torch.bool) if mask is None else mask.gather(1, segment.index).bool()
            positions = segment.gather_positions(original)
            if token_types is not None:
                self.token_types.append(segment.gather(token_types))
            self.groups.append((None if step.is_identity else step, valid, positions,
                                self.language_model.layers[start : start + size], kinds[start : start + size]))
            start += size
        self.exit = segment  # the prompt's tokens that reach the last layer

    def _features(self) -> torch.Tensor:
        """``(B, n, C)`` what the projector maps, per row: the family's tower at its feature layer on
        every tile (LLaVA-NeXT) or frame (Video-LLaVA), CLS dropped where the family drops it."""
        config, base = self.model.config, self.base
        layer = config.vision_feature_layer
        if self.pixel_values_videos is not None:  # Video-LLaVA's video path keeps each frame's CLS
            videos = self.pixel_values_videos
            frames = videos.flatten(0, 1)
            features = base.video_tower(frames, output_hidden_states=layer).hidden_states[layer]
            return features.reshape(videos.shape[0], -1, features.shape[-1])
        pixels = self.pixel_values
        tower = base.vision_tower if hasattr(base, "vision_tower") else base.image_tower
        tiles = pixels.flatten(0, 1) if pixels.dim() == 5 else pixels  # LLaVA-NeXT: (B, tiles, 3, H, W)
        # Only the feature layer's states are kept, as get_image_features asks the tower to.
        features = tower(tiles, output_hidden_states=layer).hidden_states[layer]
        if config.vision_feature_select_strategy == "default":
            features = features[:, 1:]
        return features.reshape(pixels.shape[0], -1, features.shape[-1])

    def _qwen3_5_visual(self) -> torch.Tensor:
        """``(kept, width)`` Qwen3.5's kept visual tokens: the vision blocks on every patch, the
        merger on the kept tokens' 2x2 groups of patches only (a group's patches are consecutive)."""
        visual_model = self.base.visual
        videos = "pixel_values_videos" in self.inputs
        pixels = self.inputs["pixel_values_videos" if videos else "pixel_values"]
        grid = self.inputs["video_grid_thw" if videos else "image_grid_thw"]
        merger = visual_model.merger
        visual_model.merger = torch.nn.Identity()  # the blocks' output, unmerged: what the merger reads
        try:
            patches = visual_model(pixels.type(visual_model.dtype), grid_thw=grid).last_hidden_state
        finally:
            visual_model.merger = merger
        groups = patches.view(-1, visual_model.spatial_merge_unit, patches.shape[-1])
        return merger(groups[self.entry_visual[self.visual]].flatten(0, 1))

    def _internvl_visual(self) -> torch.Tensor:
        """``(kept, width)`` InternVL's kept visual tokens: the ViT on every tile (CLS dropped at its
        feature layer, as ``get_image_features`` reads it), the pixel shuffle, and the projector on the
        kept tokens only."""
        config, base = self.model.config, self.base
        pixels = self.inputs["pixel_values"].to(dtype=base.dtype)
        layer = config.vision_feature_layer
        if layer == -1:
            features = base.vision_tower(pixel_values=pixels, return_dict=True).last_hidden_state
        else:
            features = base.vision_tower(pixel_values=pixels, output_hidden_states=True, return_dict=True).hidden_states[layer]
        if config.vision_feature_select_strategy == "default":
            features = features[:, 1:]
        tiles, side = features.shape[0], int(features.shape[1] ** 0.5)
        shuffled = base.pixel_shuffle(features.reshape(tiles, side, side, -1), scale_factor=config.downsample_ratio)
        tokens = shuffled.reshape(-1, shuffled.shape[-1])  # every tile's tokens, in slot order
        return base.multi_modal_projector(tokens[self.entry_visual[self.visual]])

    def _gemma3_visual(self) -> torch.Tensor:
        """``(kept, width)`` Gemma 3's kept soft tokens: the tower and the projector's pool on every
        image (the pool needs the whole grid), the kept tokens' rows of the projection."""
        features = self.base.get_image_features(pixel_values=self.pixel_values.to(self.base.dtype)).pooler_output
        return features.reshape(-1, features.shape[-1])[self.entry_visual[self.visual]]

    def _gemma4_visual(self) -> torch.Tensor:
        """``(kept, width)`` Gemma 4's kept soft tokens: the tower, its pooling and the embedder on
        every image, the kept tokens' rows."""
        features = self.base.get_image_features(self.pixel_values.to(self.base.dtype), self.inputs["image_position_ids"])
        return torch.cat(features.pooler_output)[self.entry_visual[self.visual]]

    def embeddings(self) -> torch.Tensor:
        """``(B, entry.length, width)`` the entry sequence's input embeddings: the text's, and the kept
        count of projected visual tokens in the first visual slots (any slots cost the same). Gemma 4:
        also the per-layer inputs' token part of the entry sequence (image slots read as padding, as
        the model reads them), which ``decode`` projects with the embeddings, as the model does."""
        if self.family != "llava":
            visual = {"qwen3_5": self._qwen3_5_visual, "internvl": self._internvl_visual,
                      "gemma3": self._gemma3_visual, "gemma4": self._gemma4_visual}[self.family]()
            ids = self.input_ids
            if self.family == "gemma4":
                ids = ids.masked_fill(self.visual, self.language_model.config.pad_token_id)
                self.entry_per_layer = self.entry.gather(self.language_model.get_per_layer_inputs(ids, None))
            embeds = self.language_model.embed_tokens(ids)
            embeds = embeds.masked_scatter(self.entry_visual[..., None], visual.to(embeds.dtype))
            return self.entry.gather(embeds)
        features = self._features()
        count = int(self.entry_visual[0].sum())
        if count <= features.shape[1]:
            visual = self.base.multi_modal_projector(features[:, :count])
        else:  # LLaVA-NeXT with (nearly) every slot kept: its own unpadding and newlines
            tiles = self.pixel_values.shape[1]
            projected = self.base.multi_modal_projector(features.reshape(-1, features.shape[1] // tiles, features.shape[-1]))
            packed, _ = self.base.pack_image_features(
                list(projected.split(tiles)), self.image_sizes, self.model.config.vision_feature_select_strategy,
                image_newline=self.base.image_newline,
            )
            visual = torch.stack(packed)[:, :count]  # images of one size in the rows
        embeds = self.language_model.embed_tokens(self.input_ids)
        embeds = embeds.masked_scatter(self.entry_visual[..., None], visual.to(embeds.dtype))
        return self.entry.gather(embeds)

    @staticmethod
    def _mask(valid: torch.Tensor, queries: int):
        """``None`` (causal SDPA) without padding, else a (B, 1, queries, keys) boolean causal mask."""
        if bool(valid.all()):
            return None
        keys = valid.shape[1]
        causal = torch.ones(queries, keys, dtype=torch.bool).tril(keys - queries)
        allowed = causal[None] & valid[:, None, :]
        own = torch.zeros(queries, keys, dtype=torch.bool)
        own[torch.arange(queries), torch.arange(keys - queries, keys)] = True  # a pad attends to itself, not to nothing
        allowed |= own[None]
        return allowed[:, None]

    @staticmethod
    def _recurrent_mask(valid: torch.Tensor):
        """A linear-attention layer's mask: ``None`` without padding, else the ``(B, L)`` padding mask
        (its padded states are zeroed before they enter the recurrence)."""
        return None if bool(valid.all()) else valid.long()

    def _positions(self, valid: torch.Tensor, positions: torch.Tensor | None):
        """``(rotary positions, the layers' position ids)`` of a group: its kept tokens' M-RoPE
        positions (the layers get none, as the model gives them none), or 1-D renumbered ones."""
        if positions is not None:
            return positions, None
        renumbered = (valid.long().cumsum(dim=1) - 1).clamp(min=0)
        return renumbered, renumbered

    def _rope(self, hidden: torch.Tensor, positions: torch.Tensor, kinds) -> dict:
        """``{kind: (cos, sin)}``: Gemma's local and global RoPE per layer type, else one for all."""
        if self.gemma:
            return {kind: self.language_model.rotary_emb(hidden, positions, kind) for kind in dict.fromkeys(kinds)}
        rope = self.language_model.rotary_emb(hidden, positions)
        return {"attention": rope, "linear": rope}

    def _gemma_masks(self, hidden: torch.Tensor, valid: torch.Tensor, types: torch.Tensor) -> dict:
        """Gemma's own masks of a group's sequence (per layer type): bidirectional image blocks,
        sliding windows over the tokens it holds, from the model's ``create_masks_for_vision_model``."""
        import sys

        modeling = sys.modules[type(self.base).__module__]
        blocks = modeling.get_block_sequence_ids_for_mask(types, device=hidden.device)
        return modeling.create_masks_for_vision_model(
            config=self.language_model.config, inputs_embeds=hidden, attention_mask=valid, **with_cache(None),
            position_ids=None, block_sequence_ids=blocks,
        )

    def decode(self, hidden: torch.Tensor, cache=None, last: int | None = None) -> torch.Tensor:
        """The decoder on the entry sequence's states ``hidden`` (``(B, entry.length, width)``): the
        final-normed states of the last layer group's sequence. ``last``: the forward's
        ``logits_to_keep``; a Gemma 4 decoder then passes its KV-shared layers only the last ``last``
        tokens, as the model does (they read every key from an earlier layer)."""
        self.positions = []
        cut = None
        if last is not None and self.family == "gemma4" and self.language_model.config.num_kv_shared_layers:
            cut = self.language_model.first_kv_shared_layer_idx
        # Gemma 4: each layer's per-layer input (projected from the entry's embeddings, as the model
        # does), and the keys and values the storing layers leave for the layers that reuse them.
        per_layer = None
        if self.family == "gemma4":
            per_layer = self.language_model.project_per_layer_inputs(hidden, self.entry_per_layer)
        shared = KVSharingDict() if self.family == "gemma4" else None  # what only Gemma 4's layers read
        for number, (step, valid, original, layers, kinds) in enumerate(self.groups):
            if step is not None:
                hidden = step.gather(hidden)
                per_layer = None if per_layer is None else step.gather(per_layer)
            rotary, positions = self._positions(valid, original)
            self.positions.append(valid.sum(dim=1, keepdim=True))
            rope = self._rope(hidden, rotary, kinds)
            if self.gemma:
                masks = self._gemma_masks(hidden, valid, self.token_types[number])
            else:
                masks = {"attention": self._mask(valid, hidden.shape[1]), "linear": self._recurrent_mask(valid)}
            if cut is not None and step is not None and hidden.shape[1] == last:
                raise ValueError("a Gemma 4 ideal reduces after its KV-shared layers began")
            for layer, kind in zip(layers, kinds):
                if cut is not None and layer.layer_idx == cut:  # the model's own cut to the last queries
                    hidden, per_layer = hidden[:, -last:], per_layer[:, -last:]
                    masks = {k: None if m is None else m[..., -last:, :] for k, m in masks.items()}
                    rope = {k: (c[:, -last:], s[:, -last:]) for k, (c, s) in rope.items()}
                    positions = None if positions is None else positions[..., -last:]
                extra = {} if per_layer is None else {"per_layer_input": per_layer[:, :, layer.layer_idx],
                                                      "shared_kv_states": shared}
                out = layer(hidden, attention_mask=masks[kind], position_ids=positions, **with_cache(cache),
                            use_cache=cache is not None, position_embeddings=rope[kind], **extra)
                hidden = out[0] if isinstance(out, tuple) else out
        return self.language_model.norm(hidden)

    def forward(self, cache=None) -> torch.Tensor:
        """The prompt through the tower, the projector and the decoder (``decode``)."""
        return self.decode(self.embeddings(), cache)

    def generate(self, new_tokens: int, on_token: Callable[[], None] | None = None):
        """Greedy decoding of exactly ``new_tokens`` tokens; ``on_token()`` after each one. Returns the
        tokens ``(B, new_tokens)`` and the cache."""
        from transformers import DynamicCache

        if self.family == "gemma4":
            raise NotImplementedError("the ideal does not decode Gemma 4 (per-layer inputs of each new token)")
        head = self.model.lm_head
        with torch.no_grad():
            cache = DynamicCache(config=self.language_model.config)
            token = head(self.forward(cache)[:, -1]).argmax(-1)
            tokens = [token]
            if on_token:
                on_token()
            for step in range(new_tokens - 1):
                hidden = self.language_model.embed_tokens(token[:, None])
                for (_, valid, original, layers, kinds), length in zip(self.groups, self.positions):
                    # M-RoPE: the unreduced numbering (after the prompt's largest position); 1-D: renumbered
                    positions = (self.next_position if original is not None else length) + step
                    rope = self._rope(hidden, positions, kinds)
                    keys = torch.cat([valid, valid.new_ones(valid.shape[0], step + 1)], dim=1)
                    if self.gemma and not bool(keys.all()):
                        raise NotImplementedError("the ideal decodes Gemma 3 prompts without padding only")
                    # a decoding step has no padding; a sliding cache returns at most its window
                    mask = self._mask(keys, 1)
                    masks = {"attention": mask, "linear": None, "full_attention": mask, "sliding_attention": mask}
                    for layer, kind in zip(layers, kinds):
                        out = layer(hidden, attention_mask=masks[kind], position_ids=None if original is not None else positions,
                                    **with_cache(cache), use_cache=True, position_embeddings=rope[kind])
                        hidden = out[0] if isinstance(out, tuple) else out
                token = head(self.language_model.norm(hidden)[:, -1]).argmax(-1)
                tokens.append(token)
                if on_token:
                    on_token()
        return torch.stack(tokens, dim=1), cache

    def loss(self, labels: torch.Tensor) -> torch.Tensor:
        """A training forward: the LM head over the last group's sequence and the shifted cross-entropy
        with ``labels`` (full-prompt coordinates; -100 is ignored) read at the tokens that reach it."""
        hidden = self.forward()
        logits = self.model.lm_head(hidden).float()
        kept = self.exit.gather(labels)
        return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), kept[:, 1:].flatten(), ignore_index=-100)
