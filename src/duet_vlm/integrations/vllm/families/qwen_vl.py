"""Qwen2-VL, Qwen2.5-VL and Qwen3-VL under vLLM: reduction among the merger's tokens, kept tokens at their original M-RoPE positions.

As in the Hugging Face path (``duet_vlm.adapters.qwen_vl``): a stage chooses and merges among the
merged tokens of an image, in the language model's space (``project`` is the identity), scored by
the attention each patch receives in the last vision block that attends over whole images (every
block of Qwen2-VL's and Qwen3-VL's towers, ``fullatt_block_indexes`` in Qwen2.5-VL's; within its image; mean over
heads, summed over queries, averaged over its 2x2 group, put in the merger's output order), and
every output takes the slot, and so the 3-D position, of the token it stands for: the kept tokens
enter the language model in their original order with their original (t, h, w) positions, and the
text after the image keeps the positions the unreduced model gives it.

vLLM numbers a request's tokens before its encoder runs (``get_mrope_input_positions``), and the
kept tokens are known only after. So each item's embedding carries extra channels, its kept
tokens' (t, h, w) within their run of placeholders, written in base-256 digits that every dtype
holds exactly (``position_channels``); ``embed_input_ids`` takes them off as it writes
the tokens into the sequence, and ``forward`` adds them to the run's slots, which
``get_mrope_input_positions`` numbered at the run's start (text after the run keeps the unreduced
model's positions: vLLM numbers the unreduced prompt, and the reduced one reads its positions back).

Videos are reduced as the Hugging Face path reduces them: Qwen2-VL's and Qwen2.5-VL's video is one
run under one budget, its temporal slices the units of one item; Qwen3-VL (and Qwen3.5) writes each
slice as its own run behind its timestamp, and each slice is an item with its own budget
(``slices_are_items``). vLLM 0.32's Qwen3-VL processor with transformers 5.23 needs one call
adjusted to process a video at all (``processor.WithoutDuetOptions``). vLLM's
own multimodal-pruning interface (``SupportsMultiModalPruning.recompute_mrope_positions``, the one
EVS uses) would serve, but vLLM 0.32 calls it only with ``--video-pruning-rate`` > 0 and never on
the CPU backend (``CPUModelRunner.load_model`` leaves it off): this path works on every backend, and
refuses to run together with EVS.

The families differ in a few places, each a method of ``DuetQwenVLMixin`` a family's class
overrides: which block scores (``score_block``), which block is the first to attend over whole
images (``first_full_attention``), where each merger output sits among the blocks' merged groups
(``merger_order``: Qwen2.5-VL's window attention reorders them), and the channels of a token as the
tower returns it (``duet_width``, ``main_width``: Qwen3-VL's DeepStack features follow its own).
"""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np
import torch
from vllm.model_executor.layers.linear import QKVParallelLinear
from vllm.model_executor.models.qwen2_5_vl import (
    Qwen2_5_VLDummyInputsBuilder,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLMultiModalProcessor,
    Qwen2_5_VLProcessingInfo,
)
from vllm.model_executor.models.qwen2_vl import (
    Qwen2VLDummyInputsBuilder,
    Qwen2VLForConditionalGeneration,
    Qwen2VLMultiModalProcessor,
    Qwen2VLProcessingInfo,
)
from vllm.multimodal import MULTIMODAL_REGISTRY

from ....adapters.qwen_vl import language_attention_layers, qwen_geometry
from ....geometry import Geometry
from ....scoring import segment_scores
from ..common import DuetModelMixin, tower_groups
from ..options import RefusedMethod, plan_for
from ..processor import PIXELS, DuetProcessorMixin
from ..select import all_heads, encoder_index, reduce_unit


class DuetQwenProcessorMixin(DuetProcessorMixin):
    """Each item's placeholder run as long as the method keeps at its budget (before vLLM's processor
    class): images and videos."""

    geometry_fields = {"image": "image_grid_thw", "video": "video_grid_thw"}
    #: whether each temporal slice of a video is an item of its own, with its own budget, as on the
    #: Hugging Face path (``Qwen2VLAdapter.slices_are_items``): Qwen3-VL writes each slice as its own
    #: run behind a timestamp; Qwen2-VL's and Qwen2.5-VL's video is one run with one budget.
    slices_are_items = False

    def item_geometry(self, modality: str, grid) -> Geometry:
        """What an item's budget applies to: an image, a whole video, or each of its temporal slices."""
        t, h, w = (int(v) for v in grid)
        config = self.info.get_hf_config()
        return qwen_geometry(config, (1 if modality == "video" and self.slices_are_items else t, h, w), modality,
                             language_attention_layers(config.text_config))

    def apply(self, inputs, timing_ctx):
        """A prompt with a video whose slices are items refuses methods that read the prompt's text:
        the text is taken here, before vLLM writes each slice's timestamp, which the Hugging Face path
        reads as text (for every item of the prompt, its images too)."""
        if self.slices_are_items and inputs.mm_data_items.get_count("video", strict=False):
            settings = self.settings(inputs.hf_processor_mm_kwargs)
            if settings.needs_text():
                raise RefusedMethod(
                    f"duet-vlm does not run {settings.method} on a {type(self.info.get_hf_config()).__name__} prompt with a "
                    "video under vLLM: the method reads the prompt's text, which is taken before vLLM writes each "
                    "frame's timestamp; use a method that does not read the text"
                )
        return super().apply(inputs, timing_ctx)

    def placeholders(self, update, item_idx: int, item, count: int):
        config = self.info.get_hf_config()
        return [config.image_token_id if update.modality == "image" else config.video_token_id] * count


class DuetQwenVLMixin(DuetModelMixin):
    """duet-vlm's reduction of images and videos inside vLLM's Qwen-VL model classes (before vLLM's class in the bases)."""

    #: the family's name, for messages.
    #: whether each temporal slice of a video is an item (as the processor's ``slices_are_items``).
    slices_are_items = False

    def __init__(self, *, vllm_config, prefix: str = "") -> None:  # vLLM reads these two names
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self._duet_pending = None
        self.read_settings(vllm_config)
        self._duet_items: dict = {}
        if self.duet.active:
            self.duet.reducer()
            if getattr(self, "is_multimodal_pruning_enabled", False):
                raise RefusedMethod(
                    f"duet-vlm's {self.family} path numbers the kept tokens itself; it does not run together with "
                    "vLLM's EVS (--video-pruning-rate): start the server without it"
                )
            # --mm-encoder-tp-mode data (the tower replicated on every rank) is exact as it is: each rank
            # holds every head. vLLM's own path then splits a batch's images among the ranks; images a
            # method reduces run whole on every rank (``_process_image_input``).

    # ------------------------------------------------------------------------------ family differences
    def score_block(self) -> int:
        """The block whose received attention ranks the tokens: the last that attends over whole images."""
        return len(self.visual.blocks) - 1

    def first_full_attention(self) -> int:
        return 0

    def merger_order(self, grids: list):
        """Where each merger output sits among the blocks' merged groups (``None``: the same order)."""
        return None

    def duet_width(self) -> int:
        """The channels of a visual token's embedding as the tower returns it."""
        return self.config.text_config.hidden_size

    def main_width(self) -> int:
        """The channels that enter the sequence; the rest (DeepStack's) travel with the token."""
        return self.config.text_config.hidden_size

    def language_geometry(self, feature=None) -> Geometry:
        """An image's or a video's geometry from its grid (a 448-pixel square image's at start)."""
        if feature is None:
            return qwen_geometry(self.config, (1, 32, 32), "image", language_attention_layers(self.config.text_config))
        t, h, w = (int(v) for v in torch.as_tensor(feature.data[f"{feature.modality}_grid_thw"].data).reshape(-1))
        return qwen_geometry(self.config, (1 if self.runs_are_items(feature.modality) else t, h, w), feature.modality,
                             language_attention_layers(self.config.text_config))

    def runs_are_items(self, modality: str) -> bool:
        return modality == "video" and self.slices_are_items

    # ------------------------------------------------------------------------------ positions
    def get_mrope_input_positions(self, input_tokens, mm_features):
        """vLLM's own positions of the unreduced prompt, read back onto the reduced one: text keeps the
        unreduced model's positions (Qwen3-VL's timestamps between a video's runs included), the slots
        of each run of placeholders all hold the run's start (``forward`` adds each kept token's own
        (t, h, w)). The unreduced prompt is the reduced one with each run written at its full length
        (an item's, or a temporal slice's where slices are items), so each family numbers it its own
        way and nothing of vLLM's numbering is copied here.

        Both of vLLM's model runners call this at a request's prefill (V1: ``_init_mrope_positions``;
        Model Runner V2, 0.33's default: ``v1/worker/gpu/mm/rope.py``); V2 calls
        ``recompute_mrope_positions`` only for vLLM's own pruning, which ``__init__`` refuses."""
        if not self.duet.active:
            return super().get_mrope_input_positions(input_tokens, mm_features)
        merge = self.config.vision_config.spatial_merge_size
        tokens = list(input_tokens)
        expanded, source, features, cursor = [], [], [], 0
        for feature in sorted(mm_features, key=lambda f: f.mm_position.offset):
            offset, length = feature.mm_position.offset, feature.mm_position.length
            source += range(len(expanded), len(expanded) + offset - cursor)
            expanded += tokens[cursor:offset]
            start = len(expanded)
            # each run of placeholders written at its full length, every slot at the run's start
            # ((t, h, w) = (0, 0, 0)); the text between runs (Qwen3-VL's timestamps) as it is
            modality = feature.modality
            placeholder = self.config.image_token_id if modality == "image" else self.config.video_token_id
            t, h, w = (int(v) for v in feature.data[f"{modality}_grid_thw"].data)
            run = (h * w if self.runs_are_items(modality) else t * h * w) // merge // merge
            for is_placeholder, group in itertools.groupby(tokens[offset : offset + length], placeholder.__eq__):
                group = list(group)
                if is_placeholder:
                    source += [len(expanded)] * len(group)
                    expanded += [placeholder] * run
                else:
                    source += range(len(expanded), len(expanded) + len(group))
                    expanded += group
            placed = dataclasses.replace(feature.mm_position, offset=start, length=len(expanded) - start, is_embed=None)
            features.append(dataclasses.replace(feature, mm_position=placed))
            cursor = offset + length
        source += range(len(expanded), len(expanded) + len(tokens) - cursor)
        expanded += tokens[cursor:]
        positions, _ = super().get_mrope_input_positions(expanded, features)
        return positions[:, source].contiguous(), int(positions.max()) + 1 - len(tokens)

    def embed_input_ids(self, input_ids, multimodal_embeddings=None, *, is_multimodal=None):
        """Take each item's position channels off its embedding (kept for ``forward``)."""
        if not self.duet.active or multimodal_embeddings is None or is_multimodal is None or len(multimodal_embeddings) == 0:
            return super().embed_input_ids(input_ids, multimodal_embeddings, is_multimodal=is_multimodal)
        width = self.duet_width()
        embeddings, offsets = [], []
        for embedding in multimodal_embeddings:
            if embedding.shape[-1] != width + POSITION_CHANNELS:  # every item of ``_reduce_items`` carries them
                raise RuntimeError(f"duet-vlm: a {self.family} visual embedding of {embedding.shape[-1]} channels, not "
                                   f"{width} and its {POSITION_CHANNELS} position channels")
            offsets.append(positions_of_channels(embedding[:, width:]))
            embeddings.append(embedding[:, :width])
        self._duet_pending = (is_multimodal.clone(), torch.cat(offsets))
        return super().embed_input_ids(input_ids, embeddings, is_multimodal=is_multimodal)

    def forward(self, input_ids, positions, intermediate_tensors=None, inputs_embeds=None, **kwargs):
        pending, self._duet_pending = self._duet_pending, None
        if pending is not None and positions.dim() == 2:
            mask, offsets = pending
            positions = positions.clone()
            count = mask.shape[0]
            window = positions[:, :count]
            window[:, mask.to(positions.device)] += offsets.T.to(positions.device, positions.dtype)
        return super().forward(input_ids, positions, intermediate_tensors, inputs_embeds, **kwargs)

    # ------------------------------------------------------------------------------ images
    def _process_image_input(self, image_input):
        if not self.duet.active:
            return super()._process_image_input(image_input)
        return self._reduce_items(image_input, "image", super()._process_image_input)

    def _process_video_input(self, video_input):
        if not self.duet.active:
            return super()._process_video_input(video_input)
        return self._reduce_items(video_input, "video", super()._process_video_input)

    def temporal_factors(self, visual_input, modality: str, count: int) -> list[float]:
        """How far apart in M-RoPE time each item's temporal slices are: 1 for images; for a video
        ``second_per_grid_ts * tokens_per_second``, as vLLM numbers it (``iter_mm_grid_thw``)."""
        if modality == "image":
            return [1.0] * count
        try:
            seconds = visual_input["second_per_grid_ts"]
        except (KeyError, TypeError, AttributeError):  # Qwen2-VL's video input has none
            seconds = None
        if seconds is None:  # Qwen2-VL's, and Qwen3-VL's (each slice its own run, at time 0)
            return [1.0] * count
        seconds = torch.as_tensor(seconds).reshape(-1).tolist()
        per_second = getattr(self.config.vision_config, "tokens_per_second", 1.0)
        return [float(second) * per_second for second in seconds]

    def _reduce_items(self, visual_input, modality: str, unreduced):
        """The items of one modality under duet-vlm: each reduced by its own method at its own budget
        (an unreduced one as vLLM embeds it), its tokens in slot order, each with its (t, h, w)."""
        fields = self.reduced_fields(visual_input, modality)
        grid_thw = visual_input[f"{modality}_grid_thw"]
        grids = grid_thw.tolist()
        merge = self.visual.spatial_merge_size
        factors = self.temporal_factors(visual_input, modality, len(grids))
        # what a budget applies to: an item, or each temporal slice of a video whose slices are items
        # (each then positioned from its own run's start)
        if self.runs_are_items(modality):
            parts = [(i, [1, h, w], f) for i, ((t, h, w), f) in enumerate(zip(grids, factors)) for _ in range(t)]
        else:
            parts = [(i, g, f) for i, (g, f) in enumerate(zip(grids, factors))]
        if fields is None:  # unreduced, with their positions
            embeds = unreduced(visual_input)
            return tuple(
                torch.cat([e, position_channels(torch.cat([grid_positions(g, merge, f) for i, g, f in parts if i == index]), e)], dim=1)
                for index, e in enumerate(embeds)
            )
        attention = language_attention_layers(self.config.text_config)
        geometries = [qwen_geometry(self.config, grid, modality, attention) for _, grid, _ in parts]
        plans = [plan_for(fields.settings(self.duet, i), fields.budgets[i], geometry)
                 for (i, _, _), geometry in zip(parts, geometries)]
        blocks = self.visual.blocks
        score_block = self.score_block()
        wanted = {score_block}
        for plan in plans:
            if plan is not None:
                wanted |= {self.block_for(layer) for layer in plan.vision.encoder_layers()}
        captured: dict = {}
        # Taps on each block's attention (vLLM's blocks are compiled modules whose calls skip hooks):
        # its input is the block's normed input.
        handles = [
            blocks[index].attn.register_forward_pre_hook(
                lambda module, args, kwargs, index=index: captured.__setitem__(index, (args, kwargs)), with_kwargs=True
            )
            for index in sorted(wanted)
        ]
        # the tower in groups of items no larger than an unreduced step's (``tower_groups``), each
        # group's signals read from its own call and put together in item order
        pixels = visual_input[PIXELS[modality]]
        patches = [t * h * w for t, h, w in grids]
        starts = [0, *itertools.accumulate(patches)]
        embeds, parts_of = [], {index: [] for index in wanted}
        try:
            for group in tower_groups([count // merge**2 for count in patches], self._duet_tower_budget):
                captured.clear()
                with torch.no_grad():
                    embeds.append(self.visual(pixels[starts[group.start]:starts[group.stop]], grid_thw=grids[group]))
                order = self.merger_order(grids[group])
                for index in wanted:
                    parts_of[index].append(self.received(index, *captured[index], order))
        finally:
            for handle in handles:
                handle.remove()
        embeds = torch.cat(embeds)
        signals = {index: tuple(torch.cat(signal) for signal in zip(*parts)) for index, parts in parts_of.items()}
        sizes = [geometry.visual_tokens for geometry in geometries]
        outputs, start = [[] for _ in grids], 0
        for (index, grid, factor), size, plan, geometry, item in zip(parts, sizes, plans, geometries, embeds.split(sizes)):
            rows = slice(start, start + size)
            start += size
            full = grid_positions(grid, merge, factor)  # integers: channels of the item's dtype hold them as digits
            if plan is None:
                outputs[index].append(torch.cat([item, position_channels(full, item)], dim=1))
                continue
            units, tokens = geometry.units, geometry.unit_tokens  # a video: one unit per temporal slice
            scores, keys = signals[score_block]
            maps = {layer: signals[self.block_for(layer)][0][rows].view(units, tokens)
                    for layer in plan.vision.encoder_layers()}
            text = None
            if fields.texts is not None:
                ids = torch.as_tensor(fields.texts[index]).reshape(-1).to(device=item.device, dtype=torch.long)
                text = self.language_model.embed_input_ids(ids)
            reduced = reduce_unit(
                plan, item.view(units, tokens, -1), scores[rows].view(units, tokens), keys[rows].view(units, tokens, -1),
                geometry.grid, False, lambda f: f, maps, text, main=self.main_width(),
            )
            slots = (reduced.units * tokens + reduced.kept).cpu()
            ranks = slots.argsort()  # each output in the slot of the token it stands for
            embeddings = reduced.embeddings[ranks.to(reduced.embeddings.device)]
            outputs[index].append(torch.cat([embeddings, position_channels(full[slots[ranks]], embeddings)], dim=1))
        return tuple(torch.cat(item) for item in outputs)

    def block_for(self, layer) -> int:
        """A block a stage names, as ``Qwen2VLAdapter.encoder_layer`` resolves it."""
        if layer == "first_full_attention":
            return self.first_full_attention()
        return encoder_index(layer, len(self.visual.blocks))

    def received(self, index: int, args, kwargs, order):
        """Scores ``(tokens,)`` and keys ``(tokens, d)`` of every merged token of block ``index``, in
        the merger's output order (``duet_vlm.scoring.segment_scores``, as the Hugging Face adapter
        scores them)."""
        attn = self.visual.blocks[index].attn
        x = args[0] if args else kwargs["x"]  # the block's input after its norm1
        cu_seqlens = kwargs["cu_seqlens"]
        cos, sin = kwargs["rotary_pos_emb_cos"], kwargs["rotary_pos_emb_sin"]
        heads = attn.num_attention_heads_per_partition
        tp_size = getattr(attn, "tp_size", 1)
        # Under tensor parallelism each rank holds some heads. Qwen2.5-VL's and Qwen3-VL's fused
        # projection (QKVParallelLinear) gives each rank its heads' q, k and v: their rotated queries
        # and keys are gathered below. Qwen2-VL's (ColumnParallelLinear) gives a rank a slice of the
        # concatenated q|k|v: it is gathered first, as Qwen2-VL's own ``split_qkv`` does.
        per_head = isinstance(attn.qkv, QKVParallelLinear)
        with torch.no_grad():
            qkv, _ = attn.qkv(x)  # (s, 1, 3 * H * d)
            if not per_head:
                (qkv,) = all_heads((qkv,), -1, tp_size)
                heads *= tp_size
            tokens = qkv.shape[0]
            qkv = qkv.reshape(tokens, 3, heads, -1)
            qk = qkv[:, :2].permute(1, 0, 2, 3).contiguous()  # (2, s, H, d)
            rotated = attn.apply_rotary_emb(qk, cos, sin)
            query, key = rotated[0].transpose(0, 1).float(), rotated[1].transpose(0, 1).float()  # (H, s, d)
            if per_head:
                query, key = all_heads((query, key), 0, tp_size)
            scale = attn.hidden_size_per_attention_head ** -0.5
            received = segment_scores(query, key, cu_seqlens.tolist(), scale, chunk=512)
            group = self.visual.spatial_merge_size ** 2
            received = received.view(-1, group).mean(dim=1)
            merged_keys = key.mean(dim=0).view(-1, group, key.shape[-1]).mean(dim=1)
        if order is None:
            return received, merged_keys
        order = order.to(received.device)
        return received[order], merged_keys[order]


class DuetQwen2VLMultiModalProcessor(DuetQwenProcessorMixin, Qwen2VLMultiModalProcessor):
    pass


class DuetQwen2_5_VLMultiModalProcessor(DuetQwenProcessorMixin, Qwen2_5_VLMultiModalProcessor):
    pass


@MULTIMODAL_REGISTRY.register_processor(
    DuetQwen2VLMultiModalProcessor, info=Qwen2VLProcessingInfo, dummy_inputs=Qwen2VLDummyInputsBuilder
)
class DuetQwen2VLForConditionalGeneration(DuetQwenVLMixin, Qwen2VLForConditionalGeneration):
    """vLLM's Qwen2-VL with duet-vlm's vision-side reduction of images: every block attends over whole images."""



@MULTIMODAL_REGISTRY.register_processor(
    DuetQwen2_5_VLMultiModalProcessor, info=Qwen2_5_VLProcessingInfo, dummy_inputs=Qwen2_5_VLDummyInputsBuilder
)
class DuetQwen2_5_VLForConditionalGeneration(DuetQwenVLMixin, Qwen2_5_VLForConditionalGeneration):
    """vLLM's Qwen2.5-VL with duet-vlm's vision-side reduction of images: window attention except in
    ``fullatt_block_indexes``, whose window order the merger undoes (``reverse_indices``)."""


    def score_block(self) -> int:
        return max(self.visual.fullatt_block_indexes)

    def first_full_attention(self) -> int:
        return min(self.visual.fullatt_block_indexes)

    def merger_order(self, grids: list):
        return self.visual.prepare_encoder_metadata(grids)["reverse_indices"]


#: a kept token's (t, h, w) travels with its embedding as base-``POSITION_BASE`` digits, one channel
#: each, lowest first: a channel of the embedding's dtype holds 0..255 exactly in every dtype, and
#: bfloat16 no integer above 256 (a video's temporal slice 257, from 0, would be numbered 256, and 259 260).
POSITION_BASE = 256
POSITION_DIGITS = 3
POSITION_CHANNELS = 3 * POSITION_DIGITS


def position_channels(positions: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``(tokens, 3)`` integer positions as ``(tokens, POSITION_CHANNELS)`` channels of ``like``'s
    dtype and device, exact in every dtype (``positions_of_channels`` reads them back).

    >>> channels = position_channels(torch.tensor([[257, 1, 70000]]), torch.zeros(1, dtype=torch.bfloat16))
    >>> positions_of_channels(channels).tolist()
    [[257, 1, 70000]]
    """
    positions = torch.as_tensor(positions).long()
    limit = POSITION_BASE ** POSITION_DIGITS
    if positions.numel() and (int(positions.min()) < 0 or int(positions.max()) >= limit):
        raise ValueError(f"duet-vlm: M-RoPE positions within an item run from 0 to {limit - 1}; got "
                         f"{int(positions.min())} to {int(positions.max())}")
    digits = [positions // POSITION_BASE ** i % POSITION_BASE for i in range(POSITION_DIGITS)]
    return torch.cat(digits, dim=1).to(like.device, like.dtype)


def positions_of_channels(channels: torch.Tensor) -> torch.Tensor:
    """``(tokens, 3)`` integer positions from their channels (``position_channels``)."""
    digits = channels.float().round().long().view(-1, POSITION_DIGITS, 3)
    weights = POSITION_BASE ** torch.arange(POSITION_DIGITS, device=digits.device)
    return (digits * weights[None, :, None]).sum(dim=1)


def grid_positions(grid, merge: int, factor: float = 1.0) -> torch.Tensor:
    """``(tokens, 3)`` the M-RoPE (t, h, w) of each merged token of an item within it, in the merger's
    output order; a video's temporal index scaled by ``factor`` as vLLM scales it."""
    t, h, w = grid[0], grid[1] // merge, grid[2] // merge
    positions = np.indices((t, h, w)).reshape(3, -1)
    if factor != 1.0:
        positions[0] = (positions[0] * factor).astype(np.int64)
    return torch.from_numpy(positions.T.copy()).long()
