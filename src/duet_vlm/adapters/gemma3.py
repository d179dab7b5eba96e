"""Gemma 3 (`Gemma3ForConditionalGeneration`): a SigLIP tower, pooled soft tokens, a language model
that attends bidirectionally inside each image and through sliding windows in most layers.

What differs from the LLaVA families, and how this adapter meets it:

- **An image is one block of ``mm_tokens_per_image`` soft tokens** (256 for an 896 px image):
  the SigLIP tower's last layer (after its post-layernorm), average-pooled ``k x k`` over its
  ``p x p`` patch grid (``p / k`` tokens a side), normed and projected. The processor writes
  ``<start_of_image>`` + the image's placeholders + ``<end_of_image>``; every pan-and-scan crop is an
  image of its own (one row of ``pixel_values`` and one block each, after the whole image). So **one
  run of placeholders is one visual item** of the same fixed size; a run of another length, or runs
  asking for more images than ``pixel_values`` holds, is a ``ValueError``.
- **The signal: the attention each patch receives, pooled.** SigLIP has no CLS token. A soft token's
  score is the attention its patches receive in the tower's last layer (every patch's query, softmax
  over the keys, averaged over queries and heads: ``scoring.clip_layer_scores`` without a CLS),
  **summed** over the ``k x k`` patches the model's own ``avg_pool`` puts in the token (the pool
  run on the score map, times ``k^2``), so a token's score is the attention mass of what it holds.
  Keys are the layer's head-averaged keys averaged by the same pool. Scores come from the layer's
  own ``layer_norm1`` and ``q_proj``/``k_proj`` on its captured input: the tower keeps its attention
  backend. Other encoder layers a stage reads are scored and pooled the same way.
- **Vision stages choose among the soft tokens in the language model's space**, as for InternVL and
  Qwen-VL: their features are read from ``inputs_embeds`` at the language model's entry (exactly
  what the projector produced), ``project`` is the identity, and each output is written in the
  slot of the token it stands for. A merged token averages what the language model reads.
- **Masks are Gemma's own.** ``Gemma3Model`` builds the language model's masks before calling it: a
  causal mask in which the tokens of an image block (``token_type_ids == 1``) attend to each other in
  both directions, and for five of every six layers the same within a **sliding window**. After
  tokens are dropped the runtime asks this adapter for the masks of the shorter sequence
  (``layer_masks``), and it builds them with the model's own ``create_masks_for_vision_model`` on
  the kept tokens' types: the kept tokens of an image still attend to each other both ways, and
  nothing attends across what the model keeps apart. **A window counts tokens of the sequence the
  layer sees** (kept tokens), which is what the unpatched layers fed the kept tokens compute, and
  what their sliding cache holds (its last ``sliding_window - 1`` tokens). Language stages that
  score with a sliding layer see only the keys inside its window.
- **Two RoPEs.** Local (sliding) and global layers rotate with different bases; the runtime keeps
  each kind's ``(cos, sin)`` (``layer_rope``) and hands a stage the ones of the layer it reads.
- ``token_type_ids`` is required in a prefill that reduces anything (the processor returns it),
  and must be 1 exactly on the image placeholders: without it the model would attend causally
  inside images, which Gemma 3 was not trained for, and the runtime cannot know the blocks.
"""

from __future__ import annotations

import sys

import torch
from torch import nn
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

from ..compat import with_cache
from ..scoring import clip_layer_scores
from .base import Capture, Geometry, ModelAdapter, Signals, UnitFeatures, VisualItem, check_layer
from .scheme import FamilyMasks

#: the model's layer types -> the runtime's layer kinds.
KINDS = {"full_attention": "attention", "sliding_attention": "sliding_attention"}


def pooled_scores(pool: nn.Module, kernel: int, scores: torch.Tensor) -> torch.Tensor:
    """Per-patch ``scores (U, P)`` on a square grid -> each soft token's ``(U, T)``: the sum over the
    ``kernel x kernel`` patches the model's own ``pool`` (its projector's ``avg_pool``) puts in it."""
    units, patches = scores.shape
    side = round(patches ** 0.5)
    pooled = pool(scores.view(units, 1, side, side).to(torch.float32)).flatten(1) * (kernel * kernel)
    return pooled.to(scores.dtype)


def pooled_keys(pool: nn.Module, keys: torch.Tensor) -> torch.Tensor:
    """Per-patch ``keys (U, P, d)`` on a square grid -> each soft token's ``(U, T, d)``: averaged by ``pool``."""
    units, patches, width = keys.shape
    side = round(patches ** 0.5)
    return pool(keys.transpose(1, 2).reshape(units, width, side, side)).flatten(2).transpose(1, 2)


def gemma3_geometry(config) -> Geometry:
    """An image block's geometry (the adapter's, and vLLM's ``integrations.vllm.gemma3``):
    ``mm_tokens_per_image`` soft tokens on a square grid (the projector's ``tokens_per_side``).

    >>> from transformers import Gemma3Config
    >>> gemma3_geometry(Gemma3Config()).grid
    (16, 16)
    """
    side = int(config.mm_tokens_per_image ** 0.5)
    return Geometry(config.text_config.num_hidden_layers, side * side, (side, side), False,
                    encoder_depth=config.vision_config.num_hidden_layers)


class Gemma3Adapter(ModelAdapter):
    """``Gemma3ForConditionalGeneration`` / ``Gemma3Model``."""

    family = "gemma3"
    model_types = ("gemma3",)
    vision_model_types = ("siglip_vision_model",)
    supported_classes = ("Gemma3ForConditionalGeneration", "Gemma3Model")
    has_cls = False
    #: Gemma 3 attends both ways inside each image block, in every layer (``GemmaLayers``).
    image_blocks = True

    def __init__(self, model: nn.Module):
        self.check_vision(model)
        config = model.config
        text = config.text_config
        if getattr(text, "model_type", None) != "gemma3_text":
            raise TypeError(f"duet-vlm's gemma3 adapter supports a gemma3_text language model; this one is {text.model_type!r}")
        if getattr(text, "use_bidirectional_attention", False):
            raise TypeError("duet-vlm's gemma3 adapter does not support use_bidirectional_attention=True (an encoder)")
        self.bind_modules(model)
        self.modeling = sys.modules[type(self.base).__module__]
        self.tower = self.base.vision_tower
        self.vision_layers = getattr(self.tower, "vision_model", self.tower).encoder.layers
        self.towers = {"image": self.vision_layers[-1]}
        self.tower_entries = {"image": self.tower}
        self.placeholder_ids = {config.image_token_id: "image"}
        self.pool = self.projector.avg_pool
        self.kernel = self.projector.kernel_size
        self.geometry = gemma3_geometry(config)
        self.scheme = GemmaLayers(
            text, self.rotary_emb, tuple(text.layer_types[: len(self.layers)]), self.modeling, config.image_token_id,
            image_blocks=self.image_blocks, types_argument="token_type_ids",
            blocks_where="Gemma 3 attends bidirectionally inside each image block",
        )

    # ----------------------------------------------------------------- visual items
    def find_items(self, input_ids: torch.Tensor, kwargs: dict, captures: dict | None = None) -> list[VisualItem]:
        """One item per run of image placeholders (an image or a pan-and-scan crop); refuses runs
        that are not one image's tokens and more runs than ``pixel_values`` holds images (or a
        multiple of it, for rows ``generate`` repeated)."""
        (token_id, tower), = self.placeholder_ids.items()
        tokens = self.geometry.visual_tokens

        def geometry_of_run(length: int) -> Geometry:
            if length != tokens:
                raise ValueError(
                    f"a run of {length} image placeholders: every Gemma 3 image (and pan-and-scan crop) is one block of "
                    f"mm_tokens_per_image={tokens} placeholders between <start_of_image> and <end_of_image> "
                    f"(a prompt cut inside an image block?)"
                )
            return self.geometry

        items = self.items_from_runs(input_ids, token_id, tower, geometry_of_run)
        capture = (captures or {}).get("image")
        if capture is not None and items and len(items) % self.captured_units(capture):
            raise ValueError(
                f"the prompt holds {len(items)} image blocks, but pixel_values held {self.captured_units(capture)} images "
                f"(pan-and-scan crops and their blocks must match one to one)"
            )
        return items

    # ----------------------------------------------------------------- vision side
    def ideal_visual(self, inputs: dict, visual: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
        # The tower and the projector's pool on every image (the pool needs the whole grid).
        features = self.base.get_image_features(pixel_values=inputs["pixel_values"].to(self.base.dtype)).pooler_output
        return features.reshape(-1, features.shape[-1])[kept[visual]]

    def encoder_layer(self, tower: str, layer) -> nn.Module:
        return self.vision_layers[check_layer({"first_full_attention": 0, "last": -1}.get(layer, layer), len(self.vision_layers))]

    def layer_scores(
        self, layer: nn.Module, layer_input: torch.Tensor, received: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(scores (rows, T), keys (rows, T, d))`` of every captured image's soft tokens: the
        attention ``layer``'s patches receive, summed over each token's ``k x k`` patches by the
        model's own pool; the keys averaged by it."""
        scores, keys = clip_layer_scores(layer, layer_input, False)
        return pooled_scores(self.pool, self.kernel, scores), pooled_keys(self.pool, keys)

    def unit_features(self, items, capture: Capture, signals: Signals, first_row, inputs_embeds=None) -> UnitFeatures:
        """One unit per image: its soft tokens as the language model receives them (read from
        ``inputs_embeds``), with their pooled scores and keys."""
        rows = torch.tensor([first_row(item) for item in items], device=signals.scores.device)
        features = torch.stack([inputs_embeds[item.row, item.start : item.start + item.length] for item in items])
        maps = {layer: scores[rows] for layer, scores in signals.maps.items()}
        return UnitFeatures(features, signals.scores[rows], signals.keys[rows], maps)

    def project(self, item: VisualItem, features: torch.Tensor) -> torch.Tensor:
        return features  # the stage chose among projected tokens already

    def reduced_slots(self, item: VisualItem, kept: torch.Tensor) -> torch.Tensor:
        return item.start + kept[0].cpu()  # each output in the slot of the token it stands for


class GemmaLayers(FamilyMasks):
    """Gemma's language side: its base model builds one mask per layer type (``create_masks_for_vision_model``),
    bidirectional inside each image block (where ``image_blocks``: from ``types_argument``, 1 on every
    image token; ``blocks_where`` says in which layers) and within a sliding window in sliding layers;
    local and global layers rotate with their own RoPE."""

    def __init__(self, text_config, rotary_emb: nn.Module, types: tuple[str, ...], modeling, image_token_id: int, *,
                 image_blocks: bool, types_argument: str, blocks_where: str, family: str = "gemma3"):
        super().__init__(text_config, rotary_emb, types, KINDS, family)
        self.modeling, self.image_token_id = modeling, image_token_id
        self.image_blocks, self.types_argument, self.blocks_where = image_blocks, types_argument, blocks_where

    def rope(self, hidden: torch.Tensor, positions: torch.Tensor) -> dict:
        return {KINDS[t]: self.rotary_emb(hidden, positions, t) for t in dict.fromkeys(self.types)}

    def token_types(self, input_ids: torch.Tensor, kwargs: dict, items: list) -> torch.Tensor | None:
        if not self.image_blocks:
            return None  # every mask is causal: the model reads no token types
        name = self.types_argument
        types = kwargs.get(name)
        if types is None:
            raise ValueError(
                f"{self.blocks_where}, which it reads from {name} (1 on image tokens, as the processor returns "
                f"them); without them duet-vlm cannot keep the model's mask. Pass the processor's {name}"
            )
        types = types.to(input_ids.device)
        if types.dim() == 2 and types.shape[0] == input_ids.shape[0] and types.shape[1] < input_ids.shape[1]:
            # Tokens generate appended after the prompt (assisted and prompt-lookup drafts in the
            # prefill) carry no types; the model's mask reads the missing positions as text.
            types = torch.nn.functional.pad(types, (0, input_ids.shape[1] - types.shape[1]))
        image = input_ids == self.image_token_id
        if types.shape != input_ids.shape or not bool(((types == 1) == image).all()):
            raise ValueError(
                f"{name} of shape {tuple(types.shape)} do not mark exactly the image placeholders of input_ids "
                f"{tuple(input_ids.shape)} (1 on every image token, 0 elsewhere)"
            )
        return types

    def build(self, hidden: torch.Tensor, key_valid: torch.Tensor, types: torch.Tensor | None,
              cache=None, layers: dict | None = None) -> dict:
        config = self.text_config
        common = dict(config=config, inputs_embeds=hidden, attention_mask=key_valid, **with_cache(cache),
                      position_ids=None)
        if layers is None and self.image_blocks:  # a prefill: the model's own builder, image blocks from the types
            blocks = self.modeling.get_block_sequence_ids_for_mask(types, device=hidden.device)
            built = self.modeling.create_masks_for_vision_model(block_sequence_ids=blocks, **common)
            return {KINDS[t]: mask for t, mask in built.items()}
        # Causal masks: a decoding step (no image tokens among its queries, so no blocks, as the model
        # builds it), sized against the cache layer where each kind's mask is used; or the prefill of
        # a model without image blocks.
        if layers is None:
            layers = dict.fromkeys(KINDS[t] for t in self.types)
        elif key_valid is not None:
            # A decoding step with a mask: built whole, never checked on the host for whether it could
            # be skipped (``fast_all``, a device sync the model's own step does not add a second time);
            # where it could, every key is valid and it is ``None`` here (``step_mask``).
            common["allow_is_causal_skip"] = False
        build = {"attention": create_causal_mask, "sliding_attention": create_sliding_window_causal_mask}
        return {kind: build[kind](**common, layer_idx=layer) for kind, layer in layers.items()}
