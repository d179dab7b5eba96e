"""The one ideal model of every benchmark: what a reduction would cost if choosing the tokens were free."""

from __future__ import annotations

from itertools import groupby
from typing import Callable

import torch

from ..compaction import Compaction


class IdealModel:
    """The unpatched model run on reduced token counts, with no scoring and no bookkeeping.

    Layer ``l`` of the decoder sees every text token and the first ``visual_per_layer[l]`` visual slots
    of each row (any slots cost the same). The prompt enters the decoder compacted to
    ``visual_per_layer[0]`` slots (``entry``); where the count drops, the sequence is compacted once
    more for the next run of layers (each group's ``step``), whose positions are renumbered and RoPE
    recomputed. Each layer is the model's own module called directly, so with a ``DynamicCache`` each
    layer's cache holds exactly its own tokens and a decoding step attends over those per-layer
    lengths. Padded rows get a boolean mask; unpadded ones run SDPA's causal path.

    ``decode`` runs the decoder alone on entry states (any LLaVA family: the slots are the image or
    video tokens). ``embeddings``, ``forward``, ``generate`` and ``loss`` start from the pixels of a
    LLaVA-1.5, LLaVA-NeXT or Video-LLaVA prompt: the family's tower runs as usual on every tile or
    frame (only its feature layer's states kept), and the projector on the kept count only; with
    nothing dropped at the entry the visual embeddings are the model's own (LLaVA-NeXT's unpadding
    and newlines included), so the ideal of no reduction is the unreduced model. ``generate`` is a
    bare greedy loop (embed, layers, norm, LM head on the last position, argmax); ``loss`` is a
    training forward.

    >>> ideal = IdealModel(model, inputs, [205] * 16 + [102] * 8 + [0] * 8)      # doctest: +SKIP
    >>> tokens, cache = ideal.generate(32)                                        # doctest: +SKIP
    """

    def __init__(self, model, inputs: dict[str, torch.Tensor], visual_per_layer: list[int]):
        base = model.model
        self.model, self.base, self.language_model = model, base, base.language_model
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
        self.entry_visual = visual & (rank < runs[0][0])  # visual slots that enter the decoder
        self.entry = Compaction.from_keep(self.entry_visual | ~visual)
        self.groups = []  # (compaction of the previous group's sequence, or None; valid keys; layers)
        segment, start = self.entry, 0
        for count, size in runs:
            step = Compaction.from_keep(segment.gather(~visual | (rank < count)))
            segment = segment.then(step)
            valid = torch.ones_like(segment.index, dtype=torch.bool) if mask is None else mask.gather(1, segment.index).bool()
            self.groups.append((None if step.is_identity else step, valid, self.language_model.layers[start : start + size]))
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

    def embeddings(self) -> torch.Tensor:
        """``(B, entry.length, width)`` the entry sequence's input embeddings: the text's, and the kept
        count of projected visual tokens in the first visual slots (any slots cost the same)."""
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

    def decode(self, hidden: torch.Tensor, cache=None) -> torch.Tensor:
        """The decoder on the entry sequence's states ``hidden`` (``(B, entry.length, width)``): the
        final-normed states of the last layer group's sequence."""
        self.positions = []
        for step, valid, layers in self.groups:
            if step is not None:
                hidden = step.gather(hidden)
            positions = (valid.long().cumsum(dim=1) - 1).clamp(min=0)
            self.positions.append(valid.sum(dim=1, keepdim=True))
            rope = self.language_model.rotary_emb(hidden, positions)
            mask = self._mask(valid, hidden.shape[1])
            for layer in layers:
                out = layer(hidden, attention_mask=mask, position_ids=positions, past_key_values=cache,
                            use_cache=cache is not None, position_embeddings=rope)
                hidden = out[0] if isinstance(out, tuple) else out
        return self.language_model.norm(hidden)

    def forward(self, cache=None) -> torch.Tensor:
        """The prompt through the tower, the projector and the decoder (``decode``)."""
        return self.decode(self.embeddings(), cache)

    def generate(self, new_tokens: int, on_token: Callable[[], None] | None = None):
        """Greedy decoding of exactly ``new_tokens`` tokens; ``on_token()`` after each one. Returns the
        tokens ``(B, new_tokens)`` and the cache."""
        from transformers import DynamicCache

        head = self.model.lm_head
        with torch.no_grad():
            cache = DynamicCache(config=self.language_model.config)
            token = head(self.forward(cache)[:, -1]).argmax(-1)
            tokens = [token]
            if on_token:
                on_token()
            for step in range(new_tokens - 1):
                hidden = self.language_model.embed_tokens(token[:, None])
                for (_, valid, layers), length in zip(self.groups, self.positions):
                    positions = length + step
                    rope = self.language_model.rotary_emb(hidden, positions)
                    keys = torch.cat([valid, valid.new_ones(valid.shape[0], step + 1)], dim=1)
                    mask = self._mask(keys, 1)
                    for layer in layers:
                        out = layer(hidden, attention_mask=mask, position_ids=positions, past_key_values=cache,
                                    use_cache=True, position_embeddings=rope)
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
