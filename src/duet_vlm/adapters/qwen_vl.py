"""Qwen2-VL, Qwen2.5-VL and Qwen3-VL: no CLS token, a 2x2 patch merger, window attention, M-RoPE.

What differs from the LLaVA families, and how this adapter meets it:

- **Tokens come out of a merger.** The vision transformer sees ``t x h x w`` patches of an image (or
  of a video's ``t`` temporal slices) and its merger turns each 2x2 group into one language-model
  token. As in the reference port, vision stages choose and merge among these *merged* tokens, in
  the language model's space: their features are read from ``inputs_embeds`` at the language
  model's entry (what the merger produced, Qwen3-VL's DeepStack features along), and nothing is
  projected afterwards.
- **No CLS token.** A merged token's score is the attention its patches *receive* in the last
  full-attention vision block (softmax over keys, mean over heads, summed over queries, within the
  token's own image or frame), averaged over its 2x2 group; keys (after the block's 2-D RoPE,
  averaged over heads) are averaged the same way. Computed from the block's own norm and
  projections on its captured input, a chunk of queries at a time: the tower keeps its attention
  backend and memory stays bounded at high resolution. Qwen2.5-VL runs its blocks on a window
  permutation of the groups; the scores are put back in the merger's output order.
- **One unit per temporal slice.** An image is one unit (``t = 1``); a video has ``t`` units, the
  tower's own attention segments, so vision stages reduce each slice (the reference's per-frame
  Stage A) and language stages rank all of a video's tokens together. Qwen3-VL writes each slice
  as its own run behind a timestamp: there each slice is an item of its own.
- **M-RoPE.** Positions are ``(3, B, L)`` (time, row, column), with a text row first when
  ``generate`` prepared them. Kept tokens keep their positions and a merged (contextual) token takes
  the slot, and so the position, of its anchor: ``rope_deltas`` stays valid and decoding continues
  from the positions the unreduced model would use. Renumbering is refused (``resolve_positions``).
- **DeepStack (Qwen3-VL).** Features of intermediate vision layers are added to the visual
  positions after the first decoder layers. The runtime takes them out of the language model's
  arguments, reduces them with the same selection and merge as the main features, and adds them to
  the kept tokens itself.
- **Patches left out of the encoder** (``enter_patch_subset``, a method's ``InputStage``:
  PixelPrune). The tower takes packed patches with their grid, and transformers' vision utilities
  take precomputed ``position_ids``, ``cu_seqlens`` (and Qwen2.5-VL's ``window_index`` and
  ``cu_window_seqlens``, Qwen3-VL's ``interp_indices`` and ``interp_weights``) from its keyword
  arguments: the tower's entry hook hands it the kept patches (whole 2x2 groups, so the merger
  still merges groups) with those tensors gathered at them. Each image (temporal slice) attends
  within its kept patches; a window over its kept patches of that window. The tower's outputs
  (merged features and DeepStack features) are put back at their tokens' places, zeros where
  nothing entered, so the model's own placeholder checks and splits see a whole encoding and the
  method's vision stage keeps the tokens that entered. An input stage reads each unit's pixels
  back in ``[0, 1]`` with the processor's normalisation (``pixel_mean``, ``pixel_std``: what the
  released checkpoints' preprocessor configs carry), every temporal frame of a patch included. It
  runs on images and on the temporal slices of a video where each slice is an item (Qwen3-VL,
  Qwen3.5); Qwen2/2.5-VL videos of several slices, one item with one budget, enter whole.
"""

from __future__ import annotations

import sys
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from ..scoring import segment_scores
from .base import Capture, Geometry, ModelAdapter, Signals, UnitFeatures, UnreducibleInput, VisualItem, check_layer


def received_attention_and_keys(
    block: nn.Module, layer_input: torch.Tensor, cu_seqlens: torch.Tensor, position_embeddings, chunk: int = 512
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention each patch receives ``(N,)`` within its segment (softmax over the segment's keys,
    mean over heads, sum over queries) and head-averaged keys ``(N, d)`` of a Qwen vision block,
    from the block's own ``norm1``, ``qkv`` and 2-D RoPE on its input ``(N, C)``; no more than a
    ``chunk x segment`` slice of the map exists at once."""
    attn = block.attn
    rotary = sys.modules[type(attn).__module__].apply_rotary_pos_emb_vision
    with torch.no_grad():
        x = block.norm1(layer_input)
        tokens = x.shape[0]
        query, key, _ = attn.qkv(x).reshape(tokens, 3, attn.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
        cos, sin = position_embeddings
        query, key = rotary(query, key, cos, sin)  # (N, H, d)
        query, key = query.transpose(0, 1).float(), key.transpose(0, 1).float()  # (H, N, d)
        received = segment_scores(query, key, cu_seqlens.tolist(), attn.scaling, chunk)
    return received, key.mean(dim=0)


def in_place(values: torch.Tensor, entered: torch.Tensor) -> torch.Tensor:
    """``values`` of the tokens ``entered`` (``(tokens,)`` True where an input stage let them into the
    encoder) put back at every token's place, zeros where nothing entered."""
    full = values.new_zeros(len(entered), *values.shape[1:])
    full[entered.to(values.device)] = values
    return full


def language_attention_layers(text_config) -> tuple[int, ...] | None:
    """The decoder layers that compute softmax attention where the language model mixes in layers
    that do not (Qwen3.5's ``"linear_attention"`` in ``layer_types``); ``None``: every layer (vLLM's
    ``integrations.vllm.qwen_vl`` reads its items' geometries with these, as the adapter's scheme does).

    >>> from types import SimpleNamespace
    >>> language_attention_layers(SimpleNamespace(num_hidden_layers=4, layer_types=["linear_attention", "full_attention"] * 2))
    (1, 3)
    >>> language_attention_layers(SimpleNamespace(num_hidden_layers=2, layer_types=["full_attention"] * 2)) is None
    True
    """
    types = list(getattr(text_config, "layer_types", None) or ())[: text_config.num_hidden_layers]
    scoring = tuple(i for i, kind in enumerate(types) if kind != "linear_attention")
    return None if len(scoring) == len(types) else scoring


def qwen_geometry(config, grid_thw, modality: str = "image", attention_layers: tuple[int, ...] | None = None) -> Geometry:
    """An item of patch grid ``grid_thw`` (its ``image_grid_thw`` / ``video_grid_thw`` row) after the
    merger (the adapter's, and vLLM's ``integrations.vllm.qwen_vl``): a video one unit per temporal
    slice. ``attention_layers``: the language model's softmax-attention layers where it mixes kinds
    (the adapter's scheme's; vLLM's ``language_attention_layers``).

    >>> from transformers import Qwen2VLConfig
    >>> qwen_geometry(Qwen2VLConfig(), (2, 28, 42), "video").grid  # 2 slices of 14 x 21 merged tokens
    (14, 21)
    """
    merge = config.vision_config.spatial_merge_size
    t, h, w = (int(v) for v in grid_thw)
    rows, cols = h // merge, w // merge
    return Geometry(
        config.text_config.num_hidden_layers, t * rows * cols, (rows, cols), False, units=t, modality=modality,
        rope="mrope", encoder_depth=config.vision_config.depth, attention_layers=attention_layers,
    )


class Qwen2VLAdapter(ModelAdapter):
    """``Qwen2VLForConditionalGeneration`` / ``Qwen2VLModel``; the base of the Qwen-VL adapters."""

    family = "qwen2_vl"
    model_types = ("qwen2_vl",)
    vision_model_types = ("qwen2_vl", "qwen2_vl_vision")
    supported_classes = ("Qwen2VLForConditionalGeneration", "Qwen2VLModel")
    nominal_geometry = True
    takes_patch_subsets = True
    #: the image processor's normalisation (OpenAI CLIP's for Qwen2/2.5-VL), to read pixels back.
    pixel_mean = (0.48145466, 0.4578275, 0.40821073)
    pixel_std = (0.26862954, 0.26130258, 0.27577711)
    #: each temporal slice of a video is an item of its own (Qwen3-VL writes it as its own run).
    slices_are_items = False

    def __init__(self, model: nn.Module):
        self.check_vision(model)
        config = model.config
        self.bind_modules(model)
        self.visual = self.base.visual
        self.projector = self.visual.merger  # vision stages run after it: ``project`` is the identity
        self.merge = config.vision_config.spatial_merge_size
        self.towers = {"image": self.score_block()}
        self.tower_entries = {"image": self.visual}
        self.placeholder_ids = {config.image_token_id: "image", config.video_token_id: "video"}
        self._attention_layers = self.scheme.attention_layers()  # of every item's geometry, computed once
        # A nominal 896x896 image (32x32 merged tokens), for attach-time checks and ``duet-vlm plan``;
        # each item gets the plan of its own size.
        self.geometry = self.item_geometry(1, 64, 64, "image")

    def score_block(self) -> nn.Module:
        """The last vision block that attends over whole images (every block here)."""
        return self.visual.blocks[-1]

    def item_geometry(self, t: int, h: int, w: int, modality: str) -> Geometry:
        return qwen_geometry(self.base.config, (t, h, w), modality, self._attention_layers)

    # ----------------------------------------------------------------- visual items
    def find_items(self, input_ids: torch.Tensor, kwargs: dict, captures: dict | None = None) -> list[VisualItem]:
        """Runs of image (video) placeholders, matched in order with the rows of ``image_grid_thw``
        (``video_grid_thw``), or, when ``generate`` encoded the pixels before the forward, with the
        grids the tower was called with. Rows that ``generate`` repeated (several sequences, beams)
        reuse the grids of their original row."""
        runs = {tower: [] for tower in self.placeholder_ids.values()}
        for token_id, tower in self.placeholder_ids.items():
            is_token = input_ids == token_id
            if not bool(is_token.any()):
                continue
            for row in range(input_ids.shape[0]):
                positions = is_token[row].nonzero()[:, 0]
                if len(positions):
                    breaks = ((positions.diff() != 1).nonzero()[:, 0] + 1).tolist()
                    runs[tower] += [(row, int(run[0]), len(run)) for run in torch.tensor_split(positions, breaks)]
        grids = self._grids(kwargs, captures or {}, {tower: bool(found) for tower, found in runs.items()})
        items = []
        for tower, tower_runs in runs.items():
            if not tower_runs:
                continue
            for (row, start, length), (t, h, w) in zip(tower_runs, self._grid_per_run(tower_runs, grids[tower], tower)):
                geometry = self.item_geometry(t, h, w, tower)
                if length != geometry.visual_tokens:
                    raise ValueError(
                        f"a run of {length} {tower} placeholders in row {row}, but its grid {[t, h, w]} gives "
                        f"{geometry.visual_tokens} tokens"
                    )
                items.append(VisualItem(row, start, geometry, tower))
        return sorted(items, key=lambda item: (item.row, item.start))

    def _grids(self, kwargs: dict, captures: dict, present: dict[str, bool]) -> dict[str, list]:
        grids = {"image": kwargs.get("image_grid_thw"), "video": kwargs.get("video_grid_thw")}
        calls = [self._grid(context) for capture in captures.values() for context in capture.contexts]
        # The tower encodes the images, then the videos, one call each.
        for tower in ("image", "video"):
            if grids[tower] is None and present[tower]:
                if not calls:
                    # The text holds a placeholder id without its item (one the model generated, with
                    # use_cache=False re-running the prompt): the unpatched model reads it as text, so
                    # under ``full`` the forward is left to it; a reducing method cannot place it.
                    raise UnreducibleInput(
                        f"{tower} placeholders, but no {tower}_grid_thw and no encoded {tower}s (a placeholder id in "
                        "the text without its item: one the model generated under use_cache=False?); duet-vlm cannot "
                        "reduce it. Keep the cache (use_cache=True) or suppress the placeholder ids (suppress_tokens)"
                    )
                grids[tower] = calls.pop(0)
            elif grids[tower] is not None and present[tower] and calls:
                calls.pop(0)
        return {tower: self.item_grids(tower, grid.tolist() if grid is not None else []) for tower, grid in grids.items()}

    def item_grids(self, tower: str, grids: list) -> list:
        """The grid of each run of placeholders (one per image or video here)."""
        return grids

    @staticmethod
    def _grid_per_run(runs: list[tuple[int, int, int]], grids: list, tower: str) -> list:
        if len(runs) == len(grids):
            return grids
        rows = sorted({row for row, _, _ in runs})
        if not grids or len(runs) % len(grids):
            raise ValueError(f"{len(runs)} runs of {tower} placeholders but {len(grids)} {tower} grids")
        # generate() repeated each row r times (repeat_interleave): copies follow their original.
        repeat = len(runs) // len(grids)
        per_row = {row: [run for run in runs if run[0] == row] for row in rows}
        assigned, cursor = {}, 0
        for row in rows:
            original = row - row % repeat
            if original == row:
                assigned[row] = grids[cursor : cursor + len(per_row[row])]
                cursor += len(per_row[row])
            else:
                assigned[row] = assigned[original]
        return [grid for row in rows for grid in assigned[row]]

    def trace(self, items: list[VisualItem], captures: dict[str, Capture], inputs_embeds: torch.Tensor) -> None:
        capture = captures.get("image")
        if capture is None or not any(item.tower == "video" for item in items):
            return
        # One tower, called for the images first, then for the videos.
        calls = 1 if any(item.tower == "image" for item in items) else 0
        split = sum(capture.calls[:calls])
        captures["video"] = Capture(
            capture.layer_input[split:], capture.output[split:], capture.calls[calls:], capture.contexts[calls:]
        )
        if calls:
            captures["image"] = Capture(
                capture.layer_input[:split], capture.output[:split], capture.calls[:calls], capture.contexts[:calls]
            )
        else:
            del captures["image"]

    @staticmethod
    def _grid(context: dict) -> torch.Tensor:
        kwargs = context.get("entry_kwargs", {})
        return kwargs["grid_thw"] if "grid_thw" in kwargs else context["entry_args"][1]

    def captured_units(self, capture: Capture) -> int:
        return sum(int(self._grid(context)[:, 0].sum()) for context in capture.contexts)

    # ----------------------------------------------------------------- patches left out of the encoder
    def ideal_visual(self, inputs: dict, visual: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
        # The tower and its merger on every image (or every video): the merger, a 2x2 group's MLP, is
        # the tower's last step here (Qwen2.5-VL restores the window order after it), a few percent of
        # the tower's cost, run on every token as the unreduced model runs it.
        videos = "pixel_values_videos" in inputs
        if videos and "pixel_values" in inputs:
            raise NotImplementedError("the ideal takes images or videos in one batch, not both")
        if videos:
            features = self.base.get_video_features(inputs["pixel_values_videos"], inputs["video_grid_thw"])
        else:
            features = self.base.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"])
        return torch.cat(list(features.pooler_output))[kept[visual]]

    def unit_pixels(self, patches: torch.Tensor, grid: torch.Tensor) -> list[torch.Tensor]:
        """Each grid row's pixels ``(t, rows, cols, group * C * T * P * P)`` in ``[0, 1]``, one row per
        merged token (its 2x2 patches, in the processor's order)."""
        channels = self.visual.config.in_channels
        mean = torch.tensor(self.pixel_mean, dtype=torch.float32, device=patches.device)[:, None]
        std = torch.tensor(self.pixel_std, dtype=torch.float32, device=patches.device)[:, None]
        pixels = (patches.float().view(patches.shape[0], channels, -1) * std + mean).flatten(1)
        out, offset = [], 0
        for t, h, w in grid.tolist():
            rows, cols = h // self.merge, w // self.merge
            out.append(pixels[offset : offset + t * h * w].reshape(t, rows, cols, -1))
            offset += t * h * w
        return out

    def enter_patch_subset(self, stage, args: tuple, kwargs: dict) -> tuple[tuple, dict, torch.Tensor]:
        patches = args[0] if args else kwargs["hidden_states"]
        grid = kwargs["grid_thw"] if "grid_thw" in kwargs else args[1]
        entered = []
        for (t, _, _), pixels in zip(grid.tolist(), self.unit_pixels(patches, grid)):
            if t > 1 and not self.slices_are_items:  # one item of several slices: it enters whole
                entered.append(torch.ones(pixels.shape[:3], dtype=torch.bool, device=patches.device).flatten())
                continue
            chosen = torch.stack([stage.select(pixels[s]).to(patches.device) for s in range(t)])
            if chosen.shape != pixels.shape[:3] or chosen.dtype != torch.bool or not bool(chosen.flatten(1).any(1).all()):
                raise RuntimeError(
                    f"{type(stage).__name__}.select returned {tuple(chosen.shape[1:])} {chosen.dtype}, expected "
                    f"{tuple(pixels.shape[1:3])} bool with at least one token per unit"
                )
            entered.append(chosen.flatten())
        entered = torch.cat(entered)
        kept = entered.repeat_interleave(self.merge * self.merge)
        subset = {key: value for key, value in kwargs.items() if key != "hidden_states"}
        subset.update(self.subset_arguments(grid, entered, kept))
        if args:
            return (patches[kept], *args[1:]), subset, entered
        return args, {**subset, "hidden_states": patches[kept]}, entered

    def subset_arguments(self, grid: torch.Tensor, entered: torch.Tensor, kept: torch.Tensor) -> dict:
        """The tower's precomputed arguments for the patches ``kept`` (``(patches,)`` True): each
        patch's rotary position, and one attention segment per image (temporal slice) over its kept
        patches (transformers' ``get_vision_*`` take them from the keyword arguments)."""
        from transformers.vision_utils import get_vision_position_ids

        group = self.merge * self.merge
        per_unit = [h * w // group for t, h, w in grid.tolist() for _ in range(t)]
        counts = torch.stack([chunk.sum() for chunk in entered.split(per_unit)]) * group
        cu_seqlens = F.pad(counts.cumsum(0, dtype=torch.int32), (1, 0), value=0).to(grid.device)
        position_ids = get_vision_position_ids(grid, self.merge)[kept.to(grid.device)]
        return {"position_ids": position_ids, "cu_seqlens": cu_seqlens}

    def expand_tower_output(self, output, entered: torch.Tensor) -> None:
        output.pooler_output = in_place(output.pooler_output, entered)
        if getattr(output, "deepstack_features", None) is not None:
            output.deepstack_features = [in_place(features, entered) for features in output.deepstack_features]

    # ----------------------------------------------------------------- vision side
    def merged_order(self, grid: torch.Tensor, entered: torch.Tensor | None = None) -> torch.Tensor | None:
        """Where each merger output sits in the blocks' order of merged groups (``None``: same
        order); of the tokens ``entered`` only, where an input stage left some out."""
        return None

    def encoder_layer(self, tower: str, layer) -> nn.Module:
        """A vision block by index, ``"first_full_attention"`` (the first block that attends over whole
        images: every block in Qwen2-VL and Qwen3-VL, ``fullatt_block_indexes[0]`` in Qwen2.5-VL) or
        ``"last"``."""
        if layer == "first_full_attention":
            full = getattr(self.visual, "fullatt_block_indexes", None)
            layer = min(full) if full else 0
        return self.visual.blocks[check_layer(-1 if layer == "last" else layer, len(self.visual.blocks))]

    def vision_signals(self, capture: Capture, tower: str, layers: tuple = (), received: bool = False) -> Signals:
        """Scores ``(tokens,)`` and keys ``(tokens, d)`` of every merged token the tower produced, in
        the merger's output order, the same scores at ``layers``, and the first token of each unit
        (temporal slice). Its blocks have no CLS token: ``received`` is what they always give."""
        group = self.merge * self.merge
        blocks = {None: self.towers["image"], **{layer: self.encoder_layer(tower, layer) for layer in layers}}
        scores: dict = {layer: [] for layer in blocks}
        keys, starts, entered_all = [], [], []
        offset = 0
        for rows, layer_input, context in zip(
            capture.calls, capture.layer_input.split(list(capture.calls)), capture.contexts
        ):
            grid = self._grid(context)
            entered = context.get("entered")  # an input stage left patches out: the blocks saw the rest
            order = self.merged_order(grid, entered)

            def merged(values: torch.Tensor) -> torch.Tensor:  # in the merger's order, every token's place
                values = values[order] if order is not None else values
                return values if entered is None else in_place(values, entered)

            for layer, block in blocks.items():
                block_input, kwargs = (layer_input, context["layer_kwargs"]) if layer is None else context["layers"][layer]
                received, key = received_attention_and_keys(
                    block, block_input, kwargs["cu_seqlens"], kwargs["position_embeddings"]
                )
                scores[layer].append(merged(received.view(-1, group).mean(dim=1)))
                if layer is None:
                    keys.append(merged(key.view(-1, group, key.shape[-1]).mean(dim=1)))
            units = sum(t * h * w // group for t, h, w in grid.tolist())
            entered_all.append(torch.ones(units, dtype=torch.bool) if entered is None else entered.cpu())
            for t, h, w in grid.tolist():
                for _ in range(t):
                    starts.append(offset)
                    offset += h * w // group
        maps = {layer: torch.cat(values) for layer, values in scores.items() if layer is not None}
        entered = None
        if any(context.get("entered") is not None for context in capture.contexts):
            entered = torch.cat(entered_all).to(keys[0].device)
        return Signals(torch.cat(scores[None]), torch.cat(keys), maps, starts, entered)

    def unit_features(self, items, capture: Capture, signals: Signals, first_row, inputs_embeds=None) -> UnitFeatures:
        tokens = items[0].geometry.unit_tokens
        features, unit_keys, entered = [], [], []
        unit_scores: dict = {None: [], **{layer: [] for layer in signals.maps}}
        for item in items:
            for unit in range(item.geometry.units):
                begin = signals.starts[first_row(item) + unit]
                slot = item.unit_start(unit)
                features.append(inputs_embeds[item.row, slot : slot + tokens])
                for layer, scores in ((None, signals.scores), *signals.maps.items()):
                    unit_scores[layer].append(scores[begin : begin + tokens])
                unit_keys.append(signals.keys[begin : begin + tokens])
                if signals.entered is not None:
                    entered.append(signals.entered[begin : begin + tokens])
        maps = {layer: torch.stack(scores) for layer, scores in unit_scores.items() if layer is not None}
        return UnitFeatures(
            torch.stack(features), torch.stack(unit_scores[None]), torch.stack(unit_keys), maps,
            torch.stack(entered) if entered else None,
        )

    def project(self, item: VisualItem, features: torch.Tensor) -> torch.Tensor:
        return features

    def reduced_slots(self, item: VisualItem, kept: torch.Tensor) -> torch.Tensor:
        # Each output in the slot (and so the 3-D position) of the token it stands for.
        return torch.cat([item.unit_start(unit) + kept[unit].cpu() for unit in range(kept.shape[0])])

    # ----------------------------------------------------------------- language side
    def split_positions(self, lm_position_ids, layer_kwargs: dict, batch: int):
        positions = lm_position_ids
        if positions is None:  # the text model numbered the sequence itself: 0..L-1 on every axis
            length = layer_kwargs["position_embeddings"][0].shape[1]
            positions = torch.arange(length, device=layer_kwargs["position_embeddings"][0].device)[None]
        if positions.dim() == 2:
            positions = positions.expand(batch, -1)
            return positions, positions[None].expand(3, -1, -1)
        if positions.shape[0] == 4:  # generate()'s text row, then the three M-RoPE rows
            return positions[0].expand(batch, -1), positions[1:].expand(-1, batch, -1)
        return None, positions.expand(-1, batch, -1)


    def text_positions(self, position_ids: torch.Tensor) -> torch.Tensor | None:
        # Continuing on a cache, ``generate`` passes ``(1, B, L)``: its text positions plus the
        # prompt's ``rope_deltas`` (``_prepare_position_ids_for_generation``); take the deltas back.
        deltas = self.base.rope_deltas
        if position_ids.dim() == 3 and position_ids.shape[0] == 1 and deltas is not None:
            return position_ids[0] - deltas.to(position_ids.device).repeat_interleave(
                position_ids.shape[1] // deltas.shape[0], dim=0)
        return super().text_positions(position_ids)

    def decode_position_ids(self, start: int, new: int, batch: int, device) -> torch.Tensor:
        # As Qwen numbers a decoding step itself (``compute_3d_position_ids``), from the unreduced
        # length: text positions continue from the prompt's ``rope_deltas`` on all three axes.
        deltas = self.base.rope_deltas
        steps = torch.arange(start, start + new, device=device)[None]
        if deltas is not None:
            steps = steps + deltas.to(device).repeat_interleave(batch // deltas.shape[0], dim=0)
        return steps.expand(batch, -1)[None].expand(3, -1, -1)


class Qwen2_5_VLAdapter(Qwen2VLAdapter):
    """``Qwen2_5_VLForConditionalGeneration``: window attention except in ``fullatt_block_indexes``."""

    family = "qwen2_5_vl"
    model_types = ("qwen2_5_vl",)
    vision_model_types = ("qwen2_5_vl", "qwen2_5_vl_vision")
    supported_classes = ("Qwen2_5_VLForConditionalGeneration", "Qwen2_5_VLModel")

    def find_items(self, input_ids: torch.Tensor, kwargs: dict, captures: dict | None = None) -> list[VisualItem]:
        seconds = kwargs.get("second_per_grid_ts")
        if isinstance(seconds, torch.Tensor) and seconds.dtype in (torch.float16, torch.bfloat16):
            rounded, total = rounded_time_positions(self.base, input_ids, kwargs)
            if rounded:
                warnings.warn(
                    f"second_per_grid_ts is {seconds.dtype}: transformers' Qwen2.5-VL numbers a video's time "
                    f"positions in that dtype, and {rounded} of this prompt's {total} positions differ from their "
                    "float32 values (bfloat16 holds integers exactly only up to 256, float16 up to 2048). This "
                    "happens without duet-vlm too; pass second_per_grid_ts in float32 (cast the processor's "
                    "output to a half dtype, then inputs['second_per_grid_ts'] = inputs['second_per_grid_ts'].float())",
                    UserWarning, stacklevel=2,
                )
        return super().find_items(input_ids, kwargs, captures)

    def score_block(self) -> nn.Module:
        return self.visual.blocks[max(self.visual.fullatt_block_indexes)]

    def windows(self, grid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The model's own window permutation of the merged groups and its cumulative window lengths
        (in patches)."""
        from transformers.vision_utils import get_vision_window_index

        visual = self.visual
        window_index, cu_window_seqlens = get_vision_window_index(
            grid, visual.spatial_merge_size, visual.config.window_size, visual.config.patch_size
        )
        return window_index.to(grid.device), cu_window_seqlens.to(grid.device)

    def subset_windows(self, grid: torch.Tensor, entered: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The window permutation of the kept groups (indices among the kept ones) and their
        cumulative window lengths: each window holds its own kept groups, in the model's order."""
        window_index, cu_window_seqlens = self.windows(grid)
        entered = entered.to(grid.device)
        rank = entered.long().cumsum(0) - 1
        mine = entered[window_index]  # in window order: which groups are kept
        group = self.merge * self.merge
        window_of = torch.bucketize(
            torch.arange(len(window_index), device=grid.device), cu_window_seqlens[1:].long() // group, right=True
        )
        counts = torch.bincount(window_of[mine], minlength=len(cu_window_seqlens) - 1) * group
        cu_kept = torch.unique_consecutive(F.pad(counts.cumsum(0, dtype=torch.int32), (1, 0), value=0))
        return rank[window_index[mine]], cu_kept

    def subset_arguments(self, grid: torch.Tensor, entered: torch.Tensor, kept: torch.Tensor) -> dict:
        window_index, cu_window_seqlens = self.subset_windows(grid, entered)
        return {
            **super().subset_arguments(grid, entered, kept),
            "window_index": window_index, "cu_window_seqlens": cu_window_seqlens,
        }

    def merged_order(self, grid: torch.Tensor, entered: torch.Tensor | None = None) -> torch.Tensor:
        window_index = self.windows(grid)[0] if entered is None else self.subset_windows(grid, entered)[0]
        return torch.argsort(window_index)


def rounded_time_positions(base: nn.Module, input_ids: torch.Tensor, kwargs: dict) -> tuple[int, int]:
    """``(differing, total)``: how many of a prompt's M-RoPE positions transformers' Qwen2.5-VL
    (``get_rope_index``, its own code) numbers differently with ``second_per_grid_ts`` in the dtype it
    was given than in float32, of how many."""
    config = base.config
    types = kwargs.get("mm_token_type_ids")
    if types is None:  # as the processor writes them: 1 on image, 2 on video placeholders
        types = (input_ids == config.image_token_id).long() + 2 * (input_ids == config.video_token_id).long()
    common = dict(mm_token_type_ids=types, image_grid_thw=kwargs.get("image_grid_thw"),
                  video_grid_thw=kwargs.get("video_grid_thw"), attention_mask=kwargs.get("attention_mask"))
    seconds = kwargs["second_per_grid_ts"]
    given, _ = base.get_rope_index(input_ids, second_per_grid_ts=seconds, **common)
    exact, _ = base.get_rope_index(input_ids, second_per_grid_ts=seconds.float(), **common)
    return int((given != exact).sum()), given.numel()


class Qwen3VLAdapter(Qwen2VLAdapter):
    """``Qwen3VLForConditionalGeneration``: full-attention blocks, DeepStack, q/k-normed decoder."""

    family = "qwen3_vl"
    model_types = ("qwen3_vl",)
    vision_model_types = ("qwen3_vl", "qwen3_vl_vision")
    supported_classes = ("Qwen3VLForConditionalGeneration", "Qwen3VLModel")
    pixel_mean = pixel_std = (0.5, 0.5, 0.5)  # the released checkpoints' preprocessor configs
    slices_are_items = True

    def subset_arguments(self, grid: torch.Tensor, entered: torch.Tensor, kept: torch.Tensor) -> dict:
        # The learned position embeddings, interpolated to the grid, are gathered at the kept patches too.
        from transformers.vision_utils import get_vision_interpolation_indices_and_weights

        visual = self.visual
        indices, weights = get_vision_interpolation_indices_and_weights(
            grid, num_grid_per_side=visual.num_grid_per_side, mode=visual.interpolation_mode,
            align_corners=visual.interpolation_align_corners, spatial_merge_size=visual.config.spatial_merge_size,
        )
        kept = kept.to(indices.device)
        return {**super().subset_arguments(grid, entered, kept), "interp_indices": indices[kept], "interp_weights": weights[kept]}

    def item_grids(self, tower: str, grids: list) -> list:
        # Qwen3-VL writes each temporal slice of a video as its own run, behind a timestamp: each
        # slice is an item (what the model's own ``get_rope_index`` does with ``video_grid_thw``).
        if tower != "video":
            return grids
        return [[1, h, w] for t, h, w in grids for _ in range(t)]

    def take_layer_additions(self, kwargs: dict):
        embeds, mask = kwargs.get("deepstack_visual_embeds"), kwargs.get("visual_pos_masks")
        if embeds is None or mask is None:
            return None
        kwargs["deepstack_visual_embeds"] = kwargs["visual_pos_masks"] = None
        return mask, embeds
