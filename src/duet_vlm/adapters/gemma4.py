"""Gemma 4 (`Gemma4ForConditionalGeneration`): variable-resolution images, per-layer inputs, and
layers that share keys and values. The language side is Gemma 3's shape (masks the base model
builds, a local and a global RoPE), so this adapter extends ``Gemma3Adapter``; what differs:

- **An image is one run of soft tokens of its own size.** The processor resizes each image to
  at most ``max_soft_tokens`` (the ladder 70/140/280/560/1120) times ``k x k`` patches, with sides
  a multiple of ``k`` patches (``pooling_kernel_size``, 3); ``pixel_values`` holds each image's
  patches padded to the longest (``image_position_ids`` is ``(-1, -1)`` on padding), and the
  tower pools each ``k x k`` cell of patches into one soft token, row by row. One run of image
  placeholders is one item; its grid ``(rows, cols)`` is read from its image's patch positions,
  and a run whose length is not its image's token count is a ``ValueError``.
- **The signal: the attention each patch receives, pooled.** The tower has no CLS token. A soft
  token's score is the attention its patches receive in the tower's last layer (the layer's own
  norms, projections and 2-D RoPE on its captured input; padding patches are neither keys nor
  queries), **summed** over its ``k x k`` patches by the tower's own pooling by positions. Stages
  choose among soft tokens in the language model's space, as for Gemma 3.
- **Bidirectional image blocks only where the model has them**: with
  ``use_bidirectional_attention="vision"`` the sliding layers let an image's tokens attend to each
  other both ways and the global layers stay causal (``create_masks_for_vision_model``, read from
  ``mm_token_type_ids``, which a prefill that reduces must then carry); otherwise every mask is
  causal. The masks of a shorter sequence are built by the model's own functions, as for Gemma 3.
- **Per-layer inputs.** The language model adds to each layer's output a per-token input
  (``per_layer_inputs``, computed from the token ids and the merged embeddings): it is cut to the
  entry sequence with the embeddings (``LayerScheme.token_arguments``) and to each later segment's tokens
  at each decoder layer (``LayerScheme.layer_token_argument``).
- **KV sharing.** The last ``num_kv_shared_layers`` layers reuse the keys and values of the last
  earlier layer of their type (which *stores* them). Every boundary must then lie at or before the
  first storing layer, so that the storing and the reusing layers see one sequence:
  ``Geometry.last_boundary``; methods' default boundaries snap to it and explicit ones past it are
  refused. Under ``generate`` the model (transformers 5.23 and later) passes its shared layers only
  the last token of the prefill (``queries_cut_from``); that token is the prompt's last, which every
  reduction keeps. The store, the layers' parts and that cut are read through ``compat``.
- Videos (``pixel_values_videos``) are not reduced: a forward that brings one is refused while a
  method would reduce (the tower encodes frames through the same layers as images), and runs
  unpatched under ``full`` (``UnreducibleInput``).
"""

from __future__ import annotations

import sys

import torch
from torch import nn

from .. import compat
from ..scoring import attention_scores
from .base import Capture, Geometry, Signals, UnitFeatures, UnreducibleInput, VisualItem
from .gemma3 import Gemma3Adapter, GemmaLayers

#: the processor's default ``max_soft_tokens`` gives a square image 16 x 16 soft tokens.
NOMINAL_SIDE = 16


class Gemma4Adapter(Gemma3Adapter):
    """``Gemma4ForConditionalGeneration`` / ``Gemma4Model``."""

    family = "gemma4"
    model_types = ("gemma4",)
    vision_model_types = ("gemma4_vision",)
    supported_classes = ("Gemma4ForConditionalGeneration", "Gemma4Model")
    has_cls = False
    nominal_geometry = True  # images come in any size up to the processor's max_soft_tokens

    def __init__(self, model: nn.Module):
        self.check_vision(model)
        config = model.config
        text = config.text_config
        if getattr(text, "model_type", None) != "gemma4_text":
            raise TypeError(f"duet-vlm's gemma4 adapter supports a gemma4_text language model; this one is {text.model_type!r}")
        if getattr(text, "use_bidirectional_attention", None) == "all":
            raise TypeError("duet-vlm's gemma4 adapter does not support use_bidirectional_attention='all' (an encoder)")
        self.bind_modules(model)
        self.modeling = sys.modules[type(self.base).__module__]
        self.tower = self.base.vision_tower
        if self.tower is None:
            raise TypeError("this Gemma 4 has no vision tower (vision_config is None): duet-vlm reduces images")
        self.vision_layers = self.tower.encoder.layers
        self.towers = {"image": self.vision_layers[-1]}
        self.tower_entries = {"image": self.tower}
        self.placeholder_ids = {config.image_token_id: "image"}
        self.video_token_id = getattr(config, "video_token_id", None)
        self.projector = self.base.embed_vision
        self.kernel = config.vision_config.pooling_kernel_size
        self.image_blocks = text.use_bidirectional_attention == "vision"  # in the sliding layers only
        self.scheme = Gemma4Layers(
            text, self.rotary_emb, tuple(text.layer_types[: len(self.layers)]), self.modeling, config.image_token_id,
            image_blocks=self.image_blocks,
            types_argument="mm_token_type_ids",
            blocks_where="this Gemma 4 attends bidirectionally inside each image in its sliding layers", family="gemma4",
        )
        self.last_boundary, self.scheme.queries_cut_from = kv_sharing(text, len(self.layers))
        self.scheme.kv_sources = kv_sources(text, len(self.layers))
        self.geometry = self.image_geometry(NOMINAL_SIDE, NOMINAL_SIDE)

    def ideal_visual(self, inputs: dict, visual: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
        # The tower, its pooling and the embedder on every image.
        features = self.base.get_image_features(inputs["pixel_values"].to(self.base.dtype), inputs["image_position_ids"])
        return torch.cat(features.pooler_output)[kept[visual]]

    def image_geometry(self, rows: int, cols: int) -> Geometry:
        return gemma4_geometry(self.base.config, rows, cols)

    # ----------------------------------------------------------------- visual items
    def image_grids(self, capture: Capture) -> list[tuple[int, int]]:
        """``(rows, cols)`` of soft tokens of every captured image, from its patch positions."""
        grids = []
        for context in capture.contexts:
            kwargs = context.get("entry_kwargs", {})
            positions = kwargs.get("pixel_position_ids")
            if positions is None:
                args = context.get("entry_args", ())
                positions = args[1] if len(args) > 1 else None
            if positions is None:
                raise RuntimeError("the Gemma 4 vision tower was called without pixel_position_ids")
            grids += [image_grid(image, self.kernel) for image in positions]
        return grids

    def find_items(self, input_ids: torch.Tensor, kwargs: dict, captures: dict | None = None) -> list[VisualItem]:
        """One item per run of image placeholders, of the size of its image (read from the
        captured patch positions); refuses videos, and runs that are not their image's tokens."""
        if kwargs.get("pixel_values_videos") is not None or (
            self.video_token_id is not None and bool((input_ids == self.video_token_id).any())
        ):
            raise UnreducibleInput(
                "duet-vlm does not reduce Gemma 4 videos yet (their frames pass through the image tower): pass images, "
                "or run the video without a reducer"
            )
        (token_id, tower), = self.placeholder_ids.items()
        runs = self.items_from_runs(input_ids, token_id, tower, lambda length: self.image_geometry(1, length))
        if not runs:
            return []
        capture = (captures or {}).get("image")
        if capture is None:
            raise RuntimeError(
                "Gemma 4 image features were not computed under this reducer (pass pixel_values, not precomputed "
                "mm_encoder_outputs)"
            )
        grids = self.image_grids(capture)
        if len(runs) % len(grids):
            raise ValueError(
                f"the prompt holds {len(runs)} images' soft tokens, but pixel_values held {len(grids)} images"
            )
        repeat = len(runs) // len(grids)  # rows generate repeated (beams, several sequences) share images
        per_row: dict[int, int] = {}
        for run in runs:
            per_row[run.row] = per_row.get(run.row, 0) + 1
        items, seen = [], {}
        for run in runs:
            j = seen[run.row] = seen.get(run.row, -1) + 1
            first_copy = run.row - run.row % repeat  # images are read in the order of the rows' first copies
            image = sum(count for row, count in per_row.items() if row < first_copy and row % repeat == 0) + j
            rows, cols = grids[image]
            if rows * cols != run.length:
                raise ValueError(
                    f"a run of {run.length} image placeholders in row {run.row}, but its image has {rows}x{cols} = "
                    f"{rows * cols} soft tokens (a prompt cut inside an image, or images out of order?)"
                )
            items.append(VisualItem(run.row, run.start, self.image_geometry(rows, cols), tower))
        return items

    # ----------------------------------------------------------------- vision side
    def captured_layer_scores(self, layer: nn.Module, layer_input: torch.Tensor, contexts) -> tuple[torch.Tensor, torch.Tensor]:
        """``pooled_layer_scores`` on the tower's ``layer`` (its captured input and call arguments)."""
        return pooled_layer_scores(layer, layer_input, contexts, self.modeling, self.kernel, self.tower.pooler)

    def vision_signals(self, capture: Capture, tower: str, layers: tuple = (), received: bool = False) -> Signals:
        # No CLS token: attention received is what every score here is (``received`` changes nothing).
        scores, keys = self.captured_layer_scores(self.towers[tower], capture.layer_input, capture.contexts)
        maps = {}
        for layer in layers:
            layer_input = torch.cat([context["layers"][layer][0] for context in capture.contexts])
            maps[layer] = self.captured_layer_scores(self.encoder_layer(tower, layer), layer_input, capture.contexts)[0]
        return Signals(scores, keys, maps)

    def unit_features(self, items, capture: Capture, signals: Signals, first_row, inputs_embeds=None) -> UnitFeatures:
        """One unit per image: its soft tokens as the language model receives them (read from
        ``inputs_embeds``), with their pooled scores and keys (its own first cells)."""
        rows = torch.tensor([first_row(item) for item in items], device=signals.scores.device)
        length = items[0].length
        features = torch.stack([inputs_embeds[item.row, item.start : item.start + item.length] for item in items])
        maps = {layer: scores[rows, :length] for layer, scores in signals.maps.items()}
        return UnitFeatures(features, signals.scores[rows, :length], signals.keys[rows, :length], maps)



class Gemma4Layers(GemmaLayers):
    """Gemma 4's language side: Gemma 3's, plus a per-token input to every layer and layers that
    share keys and values."""

    token_arguments = ("per_layer_inputs",)
    layer_token_argument = ("per_layer_input", 1)

    def rotate(self, layer: nn.Module, states: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Gemma 4's RoPE function rotates one tensor at a time."""
        return self.modeling.apply_rotary_pos_emb(states, cos, sin, unsqueeze_dim=1)

    def layer_call_kwargs(self) -> dict:
        # A layer run outside the forward shares nothing it stores. transformers' own container
        # (``KVSharingDict``, a ``UserDict`` before 5.23), which FSDP2's helpers leave alone (a plain
        # dict they would walk).
        return {"shared_kv_states": compat.shared_kv_store()}

    def layer_token_inputs(self, language_model: nn.Module, hidden: torch.Tensor, input_ids: torch.Tensor,
                           visual: torch.Tensor):
        # The token part (image slots read as padding, as the model reads them) and the projection of
        # the input states, combined as the language model combines them.
        ids = input_ids.masked_fill(visual, self.text_config.pad_token_id)
        return language_model.project_per_layer_inputs(hidden, language_model.get_per_layer_inputs(ids, None))


def gemma4_geometry(config, rows: int, cols: int) -> Geometry:
    """An image of ``rows x cols`` soft tokens (the adapter's, and vLLM's ``integrations.vllm.gemma4``):
    no boundary after the first layer that stores keys and values for sharing (``kv_sharing``).

    >>> from transformers import Gemma4Config
    >>> gemma4_geometry(Gemma4Config(vision_config={}), 12, 18).grid
    (12, 18)
    """
    layers = config.text_config.num_hidden_layers
    return Geometry(layers, rows * cols, (rows, cols), False, encoder_depth=config.vision_config.num_hidden_layers,
                    last_boundary=kv_sharing(config.text_config, layers)[0])


def kv_sharing(text_config, layers: int) -> tuple[int | None, int | None]:
    """``(last_boundary, queries_cut_from)`` of a Gemma 4 language model of ``layers`` decoder layers:
    the first layer that stores keys and values others reuse (no boundary after it), and the first
    that reuses them, where the model passes it only the rows ``logits_to_keep`` asks for (transformers
    5.23 and later; ``None`` before, which passes every row); ``(None, None)`` where no layer reuses."""
    modes = compat.kv_sharing_modes(text_config)[:layers]
    stores = [i for i, mode in enumerate(modes) if mode == "store"]
    reuses = [i for i, mode in enumerate(modes) if mode == "reuse"]
    if not reuses:
        return None, None
    return min(stores), (min(reuses) if compat.GEMMA4_CUTS_SHARED_QUERIES else None)


def kv_sources(text_config, layers: int) -> dict[int, int]:
    """Each layer of ``layers`` that reuses keys and values -> the layer that stores them: the last
    earlier storing layer of its type.

    >>> from transformers import Gemma4TextConfig
    >>> kv_sources(Gemma4TextConfig(num_hidden_layers=6, num_kv_shared_layers=2,
    ...            layer_types=["sliding_attention", "sliding_attention", "full_attention"] * 2), 6)
    {4: 3, 5: 2}
    """
    modes = compat.kv_sharing_modes(text_config)[:layers]
    types = text_config.layer_types[:layers]
    return {i: max(j for j in range(i) if modes[j] == "store" and types[j] == types[i])
            for i, mode in enumerate(modes) if mode == "reuse"}


def pooled_layer_scores(layer: nn.Module, layer_input: torch.Tensor, contexts, modeling, kernel: int,
                        pooler: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """``(scores (images, cells), keys (images, cells, d))`` of a Gemma 4 vision tower layer: the
    attention each patch receives in ``layer`` (its norms, projections and 2-D RoPE on its input,
    ``layer_input``, with the call arguments each of ``contexts`` holds as ``layer_kwargs``; padding
    patches masked), summed over each soft token's ``k x k`` patches by the tower's own ``pooler``;
    the keys (head-averaged, rotated) averaged by it. ``cells``: the longest image's soft tokens
    (each image's own first). ``modeling``: transformers' Gemma 4 modeling module (its RoPE). The
    Hugging Face adapter and the vLLM plugin (whose Gemma 4 runs transformers' tower) both call it."""
    kwargs = [context["layer_kwargs"] for context in contexts]
    cos = torch.cat([kw["position_embeddings"][0] for kw in kwargs])
    sin = torch.cat([kw["position_embeddings"][1] for kw in kwargs])
    positions = torch.cat([kw["position_ids"] for kw in kwargs])
    attn = layer.self_attn
    units, tokens = layer_input.shape[:2]
    valid = (positions != -1).all(dim=-1)
    with torch.no_grad():
        x = layer.input_layernorm(layer_input.detach())
        queries = attn.q_norm(attn.q_proj(x).view(units, tokens, -1, attn.head_dim))
        keys = attn.k_norm(attn.k_proj(x).view(units, tokens, -1, attn.head_dim))
        queries = modeling.apply_multidimensional_rope(queries, cos, sin, positions).transpose(1, 2)
        keys = modeling.apply_multidimensional_rope(keys, cos, sin, positions).transpose(1, 2)
        keys = keys.repeat_interleave(attn.num_key_value_groups, dim=1)
        scores = received(queries, keys, attn.scaling, valid)
        cells = tokens // (kernel * kernel)
        pool = pooler._avg_pool_by_positions
        pooled, _ = pool(scores[..., None], positions, cells)
        pooled_keys, _ = pool(keys.mean(dim=1).float(), positions, cells)
    return (pooled[..., 0] * (kernel * kernel)).to(layer_input.dtype), pooled_keys.to(layer_input.dtype)


def received(queries: torch.Tensor, keys: torch.Tensor, scale: float, valid: torch.Tensor) -> torch.Tensor:
    """``(units, T)`` the attention each patch receives from its image's patches: on each image's
    own patches alone where the processor put its padding after them (no mask to apply, no
    padded rows to compute), else over all of them with the padding masked."""
    units, tokens = valid.shape
    counts = valid.sum(dim=1).tolist()
    if not all(bool(valid[u, :n].all()) for u, n in enumerate(counts)):
        return attention_scores(queries, keys, scale, has_cls=False, valid=valid)
    scores = torch.zeros(units, tokens, dtype=torch.float32, device=keys.device)
    for u, n in enumerate(counts):
        scores[u, :n] = attention_scores(queries[u : u + 1, :, :n], keys[u : u + 1, :, :n], scale, has_cls=False)[0]
    return scores


def image_grid(positions: torch.Tensor, kernel: int) -> tuple[int, int]:
    """``(rows, cols)`` of soft tokens of one image from its patches' ``(x, y)`` positions (``(-1, -1)``
    on padding)."""
    x, y = (int(v) + 1 for v in positions.reshape(-1, 2).max(dim=0).values.tolist())
    return y // kernel, x // kernel
