"""Tiny models of every supported family and tower variant, and prompts for them.

The models are ``duet_vlm.tiny.models``' builders (the real transformers classes, built from
configs with random weights, no network, with the query and key projections of every attention
sharpened so that selections have clear margins), imported here; this module adds what only the
tests need: the prompts, the registry of families, the demo-tokenizer LLaVA.

``FAMILIES`` maps a name to a ``Family``: a model builder and three kinds of inputs, (a) ``one``:
one row holding one visual item, (b) ``batch``: a left-padded batch of two rows of different text
lengths (and items of different sizes where the family allows), (c) ``row``: one row of that batch
alone (its own pixels, without padding), so that "a batch equals its rows" can be checked. A
family's name is its adapter's ``family``, with ``-<tower>`` for a vision tower other than the
one the family is usually released with. tests/conftest.py's ``family`` fixture runs over it, so
tests/test_invariants.py checks every method on every family; an adapter (or a tower an adapter
accepts) without an entry here fails that file.

>>> family = FAMILIES["qwen2_5_vl"]
>>> model = family.model()                        # built once per session, then shared
>>> model(**family.batch(model)).logits.shape     # doctest: +SKIP

The prompts of LLaVA-1.5 (``make_inputs``, ``row``), Video-LLaVA, LLaVA-NeXT, LLaVA-OneVision and
Qwen-VL were moved here from conftest.py, test_families.py and test_qwen.py, which import them from
here, as they import the builders (``make_llava`` ...).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn
from transformers import LlavaForConditionalGeneration

import duet_vlm
from duet_vlm.compat import VIDEO_LLAVA_IMAGES
from duet_vlm.tiny.models import (  # noqa: F401 - the tests import the builders and their token ids from here
    BOI,
    EOI,
    FRAMES,
    GEMMA4_IMAGE,
    GEMMA4_KERNEL,
    GEMMA4_PATCH,
    GEMMA4_VIDEO,
    GEMMA_IMAGE,
    GEMMA_TOKENS,
    GEMMA_WINDOW,
    IMAGE,
    IMAGE_TOKEN,
    IMG_END,
    IMG_START,
    INTERNVL_IMAGE,
    INTERNVL_TILE,
    INTERNVL_TOKENS,
    QWEN_IMAGE,
    QWEN_VIDEO,
    SIDE,
    VEND,
    VIDEO,
    VIDEO_FRAMES_OV,
    VOCAB,
    VSTART,
    llava_with,
    make_gemma3,
    make_gemma4,
    make_internvl,
    make_llava,
    make_llava_next,
    make_llava_onevision,
    make_qwen,
    make_qwen3_5,
    make_video_llava,
    siglip_tower,
)

#: The registered methods that take a budget or a ratio and run on every family: the method
#: matrices iterate these. PixelPrune takes none and runs on the Qwen families only; it has its own
#: matrix in tests/test_pixelprune.py.
BUDGETED = [name for name in sorted(duet_vlm.METHODS) if duet_vlm.METHODS[name].takes_budget]


def left_pad(rows: list[list[int]], pad: int = 0) -> dict[str, torch.Tensor]:
    """``input_ids`` and ``attention_mask`` of token rows, left-padded (the HF default for generation)."""
    width = max(map(len, rows))
    return {
        "input_ids": torch.tensor([[pad] * (width - len(r)) + r for r in rows]),
        "attention_mask": torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows]),
    }


def items_row(inputs: dict[str, torch.Tensor], b: int, entries: dict[str, list[int]]) -> dict[str, torch.Tensor]:
    """Row ``b`` of a left-padded batch, without its padding, with its own visual inputs:
    ``entries[key][r]`` is how many entries of ``inputs[key]`` (along the first dimension, in row
    order) row ``r`` owns; a key row ``b`` owns none of is left out."""
    keep = inputs["attention_mask"][b].bool()
    out = {key: inputs[key][b : b + 1, keep] for key in ("input_ids", "attention_mask")}
    for key, counts in entries.items():
        if counts[b]:
            start = sum(counts[:b])
            out[key] = inputs[key][start : start + counts[b]]
    return out


# ----------------------------------------------------------------------------- LLaVA-1.5 (CLIP)
def make_demo_llava(processor, seed: int = 0) -> LlavaForConditionalGeneration:
    """A 4-layer LLaVA-1.5-geometry model (576 patches) whose image token is the demo tokenizer's
    (``processor``: ``duet_vlm.demo.processor.build_processor()``), for the training commands."""
    model = make_llava(layers=4, seed=seed)
    model.config.image_token_id = processor.tokenizer.convert_tokens_to_ids("<image>")
    return model


def image_tokens(model) -> int:
    return model.config.image_seq_length


def make_inputs(
    model,
    *,
    batch: int = 1,
    prefix: int = 5,
    suffix: int | tuple[int, ...] = 12,
    images_per_row: int = 1,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """Prompts ``<s> (prefix ids + image tokens) * images + suffix ids`` with random pixels, for a
    LLaVA model (any tower: the image token and the image's size come from its config).

    ``suffix`` may differ per row; shorter rows are left-padded (the HF default for generation).
    """
    generator = torch.Generator().manual_seed(seed)
    suffixes = suffix if isinstance(suffix, tuple) else (suffix,) * batch
    n_image = image_tokens(model)
    token = model.config.image_token_id
    rows = []
    for b in range(batch):
        ids = [1]
        for _ in range(images_per_row):
            ids += torch.randint(3, 900, (prefix,), generator=generator).tolist() + [token] * n_image
        rows.append(ids + torch.randint(3, 900, (suffixes[b],), generator=generator).tolist())
    size = model.config.vision_config.image_size
    pixels = torch.randn(batch * images_per_row, 3, size, size, generator=generator)
    return {**left_pad(rows), "pixel_values": pixels.to(model.dtype)}


def row(inputs: dict[str, torch.Tensor], b: int, images_per_row: int = 1) -> dict[str, torch.Tensor]:
    """Row ``b`` of a batch from ``make_inputs``, without its padding."""
    keep = inputs["attention_mask"][b].bool()
    return {
        "input_ids": inputs["input_ids"][b : b + 1, keep],
        "attention_mask": inputs["attention_mask"][b : b + 1, keep],
        "pixel_values": inputs["pixel_values"][b * images_per_row : (b + 1) * images_per_row],
    }


# ----------------------------------------------------------------------------- LLaVA with other towers, Video-LLaVA
def _prompt(generator, image: bool, video: bool, suffix: int):
    ids = [1] + torch.randint(3, 900, (3,), generator=generator).tolist()
    if image:
        ids += [IMAGE] * SIDE * SIDE + torch.randint(3, 900, (2,), generator=generator).tolist()
    if video:
        ids += [VIDEO] * FRAMES * (SIDE * SIDE + 1)
    return ids + torch.randint(3, 900, (suffix,), generator=generator).tolist()


def mixed_batch(seed=0):
    """Video-LLaVA. Row 0: an image and a video; row 1: a video only, shorter text (left-padded). The
    image under the installed release's argument name (``compat.VIDEO_LLAVA_IMAGES``)."""
    generator = torch.Generator().manual_seed(seed)
    rows = [_prompt(generator, True, True, 12), _prompt(generator, False, True, 5)]
    size = 14 * SIDE
    return {
        **left_pad(rows),
        VIDEO_LLAVA_IMAGES: torch.randn(1, 3, size, size, generator=generator),
        "pixel_values_videos": torch.randn(2, FRAMES, 3, size, size, generator=generator),
    }


def batch_row(inputs, b):
    """Row ``b`` of ``mixed_batch`` alone."""
    keep = inputs["attention_mask"][b].bool()
    out = {"input_ids": inputs["input_ids"][b : b + 1, keep], "attention_mask": inputs["attention_mask"][b : b + 1, keep]}
    out["pixel_values_videos"] = inputs["pixel_values_videos"][b : b + 1]
    if (out["input_ids"] == IMAGE).any():
        out[VIDEO_LLAVA_IMAGES] = inputs[VIDEO_LLAVA_IMAGES][:1]
    return out


def one_video(seed=0, suffix=6):
    """Video-LLaVA: one row holding one video."""
    generator = torch.Generator().manual_seed(seed)
    size = 14 * SIDE
    return {
        **left_pad([_prompt(generator, False, True, suffix)]),
        "pixel_values_videos": torch.randn(1, FRAMES, 3, size, size, generator=generator),
    }


# ----------------------------------------------------------------------------- LLaVA-NeXT (anyres)
# (height, width) -> placeholder slots: base tile 16 + unpadded grid + one newline per grid row
NEXT_SIZES = {(112, 112): 16 + 8 * 9, (56, 112): 16 + 4 * 9, (100, 60): 16 + 8 * 5}


def next_batch(rows_sizes, seed=0, suffixes=None):
    """Rows of anyres images (each image followed by two text tokens), left-padded."""
    generator = torch.Generator().manual_seed(seed)
    rows, sizes = [], []
    for r, row_sizes in enumerate(rows_sizes):
        ids = [1] + torch.randint(3, 900, (3,), generator=generator).tolist()
        for size in row_sizes:
            ids += [IMAGE] * NEXT_SIZES[size] + torch.randint(3, 900, (2,), generator=generator).tolist()
            sizes.append(size)
        suffix = suffixes[r] if suffixes else 6
        rows.append(ids + torch.randint(3, 900, (suffix,), generator=generator).tolist())
    return {
        **left_pad(rows),
        "pixel_values": torch.randn(len(sizes), 5, 3, 56, 56, generator=generator),
        "image_sizes": torch.tensor(sizes),
    }


# ----------------------------------------------------------------------------- LLaVA-OneVision
# (height, width) -> slots; a video of 4 frames: 4 x 16 pooled tokens + a newline
OV_SIZES = {(64, 64): 336, (32, 64): 200}
OV_VIDEO = VIDEO_FRAMES_OV * 16 + 1


def ov_batch(rows, seed=0, suffixes=None):
    """Rows of items: ``("image", size)`` or ``("video", None)``, each followed by a text token."""
    generator = torch.Generator().manual_seed(seed)
    ids_rows, sizes, videos = [], [], 0
    for r, row in enumerate(rows):
        ids = [1] + torch.randint(3, 900, (3,), generator=generator).tolist()
        for kind, size in row:
            ids += [IMAGE] * OV_SIZES[size] if kind == "image" else [VIDEO] * OV_VIDEO
            ids += torch.randint(3, 900, (1,), generator=generator).tolist()
            sizes += [size] if kind == "image" else []
            videos += kind == "video"
        suffix = suffixes[r] if suffixes else 4
        ids_rows.append(ids + torch.randint(3, 900, (suffix,), generator=generator).tolist())
    out = left_pad(ids_rows)
    if sizes:
        out["pixel_values"] = torch.randn(len(sizes), 5, 3, 32, 32, generator=generator)
        out["image_sizes"] = torch.tensor(sizes)
    if videos:
        out["pixel_values_videos"] = torch.randn(videos, VIDEO_FRAMES_OV, 3, 32, 32, generator=generator)
    return out


def ov_row(inputs, rows, b):
    """Row ``b`` of an ``ov_batch`` of ``rows`` alone."""
    images = [sum(kind == "image" for kind, _ in r) for r in rows]
    videos = [sum(kind == "video" for kind, _ in r) for r in rows]
    return items_row(inputs, b, {"pixel_values": images, "image_sizes": images, "pixel_values_videos": videos})


# ----------------------------------------------------------------------------- Qwen2-VL, Qwen2.5-VL, Qwen3-VL
PATCH = 3 * 14 * 14 * 2  # channels x patch x patch x temporal patch


def _qwen_row(generator, items, prefix=3, suffix=4, frames_apart=False):
    """Token ids of one prompt; ``items``: ``("image", h, w)`` or ``("video", t, h, w)`` in patches.
    ``frames_apart``: each temporal slice of a video in its own run behind a timestamp (Qwen3-VL)."""
    ids = [1] + torch.randint(10, 99, (prefix,), generator=generator).tolist()
    types = [0] * len(ids)
    for item in items:
        t, h, w = (1, *item[1:]) if item[0] == "image" else item[1:]
        token, kind = (QWEN_IMAGE, 1) if item[0] == "image" else (QWEN_VIDEO, 2)
        runs = [h * w // 4] * t if frames_apart and kind == 2 else [t * h * w // 4]
        for count in runs:
            stamp = [40 + len(ids) % 9] if frames_apart and kind == 2 else []
            ids += stamp + [VSTART] + [token] * count + [VEND]
            types += [0] * len(stamp) + [0] + [kind] * count + [0]
    tail = torch.randint(10, 99, (suffix,), generator=generator).tolist()
    return ids + tail, types + [0] * len(tail)


def qwen_batch(rows, seed=0, frames_apart=False):
    """Left-padded rows of items; pixels and grids in row-major order, as Qwen's processor makes them."""
    generator = torch.Generator().manual_seed(seed)
    built = [_qwen_row(generator, items, suffix=4 + 2 * b, frames_apart=frames_apart) for b, items in enumerate(rows)]
    width = max(len(ids) for ids, _ in built)
    pad = lambda xs: [0] * (width - len(xs)) + xs  # noqa: E731
    batch = {
        "input_ids": torch.tensor([pad(ids) for ids, _ in built]),
        "attention_mask": torch.tensor([pad([1] * len(ids)) for ids, _ in built]),
        "mm_token_type_ids": torch.tensor([pad(types) for _, types in built]),
    }
    for kind, pixels, grids in (("image", "pixel_values", "image_grid_thw"), ("video", "pixel_values_videos", "video_grid_thw")):
        shapes = [(1, *i[1:]) if kind == "image" else tuple(i[1:]) for items in rows for i in items if i[0] == kind]
        if shapes:
            batch[pixels] = torch.randn(sum(t * h * w for t, h, w in shapes), PATCH, generator=generator)
            batch[grids] = torch.tensor([list(s) for s in shapes])
    return batch


def qwen_batch_for(model, rows, seed=0):
    return qwen_batch(rows, seed, frames_apart=model.config.model_type in ("qwen3_vl", "qwen3_5", "qwen3_5_moe"))


def qwen_row(batch, rows, b):
    """Row ``b`` of a batch built from ``rows``, unpadded, with its own pixels and grids."""
    keep = batch["attention_mask"][b].bool()
    out = {k: batch[k][b : b + 1, keep] for k in ("input_ids", "attention_mask", "mm_token_type_ids")}
    for kind, pixels, grids in (("image", "pixel_values", "image_grid_thw"), ("video", "pixel_values_videos", "video_grid_thw")):
        if grids not in batch:
            continue
        sizes = batch[grids].prod(-1).tolist()
        owners = [r for r, items in enumerate(rows) for i in items if i[0] == kind]
        chosen = [i for i, owner in enumerate(owners) if owner == b]
        if chosen:
            starts = [sum(sizes[:i]) for i in range(len(sizes))]
            out[pixels] = torch.cat([batch[pixels][starts[i] : starts[i] + sizes[i]] for i in chosen])
            out[grids] = batch[grids][chosen]
    return out


QWEN_MIXED = [[("image", 8, 8), ("video", 2, 8, 4)], [("image", 12, 8)]]  # row 0: 16 + 16 tokens; row 1: 24


# ----------------------------------------------------------------------------- InternVL3 / 3.5
def internvl_batch(rows, seed=0, suffixes=None):
    """Rows of images given by their tiles (thumbnail included: 5 = 2x2 tiles and a thumbnail, 1 = a
    single tile), each ``<img>`` + 16 placeholders per tile + ``</img>`` and two text tokens,
    left-padded; ``pixel_values``: every tile of every image, in order."""
    generator = torch.Generator().manual_seed(seed)
    ids_rows, tiles = [], 0
    for r, row_tiles in enumerate(rows):
        ids = [1] + torch.randint(3, 900, (3,), generator=generator).tolist()
        for count in row_tiles:
            ids += [IMG_START] + [INTERNVL_IMAGE] * INTERNVL_TOKENS * count + [IMG_END]
            ids += torch.randint(3, 900, (2,), generator=generator).tolist()
            tiles += count
        suffix = suffixes[r] if suffixes else 5
        ids_rows.append(ids + torch.randint(3, 900, (suffix,), generator=generator).tolist())
    size = INTERNVL_TILE
    return {**left_pad(ids_rows), "pixel_values": torch.randn(tiles, 3, size, size, generator=generator)}


def internvl_row(inputs, rows, b):
    """Row ``b`` of an ``internvl_batch`` of ``rows`` alone, with its own tiles."""
    return items_row(inputs, b, {"pixel_values": [sum(r) for r in rows]})


INTERNVL_ROWS = [[5], [3, 1]]  # 2x2 tiles + thumbnail | 1x2 tiles + thumbnail, then a single tile


# ----------------------------------------------------------------------------- Gemma 3
def gemma3_batch(rows, seed=0, suffixes=None):
    """Rows of ``rows[r]`` images each: ``<bos>``, three text tokens, then per image
    ``<start_of_image>`` + 16 soft-token placeholders + ``<end_of_image>`` and two text tokens, then
    ``suffixes[r]`` text tokens; left-padded, with the ``token_type_ids`` the processor returns (1
    on the placeholders) and one ``pixel_values`` row per image, in order."""
    generator = torch.Generator().manual_seed(seed)
    ids_rows, images = [], 0
    for r, count in enumerate(rows):
        ids = [1] + torch.randint(3, 900, (3,), generator=generator).tolist()
        for _ in range(count):
            ids += [BOI] + [GEMMA_IMAGE] * GEMMA_TOKENS + [EOI] + torch.randint(3, 900, (2,), generator=generator).tolist()
        images += count
        suffix = suffixes[r] if suffixes else 5
        ids_rows.append(ids + torch.randint(3, 900, (suffix,), generator=generator).tolist())
    inputs = left_pad(ids_rows)
    inputs["token_type_ids"] = (inputs["input_ids"] == GEMMA_IMAGE).long()
    inputs["pixel_values"] = torch.randn(images, 3, 32, 32, generator=generator)
    return inputs


def gemma3_row(inputs, rows, b):
    """Row ``b`` of a ``gemma3_batch`` of ``rows`` alone, with its own images."""
    out = items_row(inputs, b, {"pixel_values": list(rows)})
    out["token_type_ids"] = inputs["token_type_ids"][b : b + 1, inputs["attention_mask"][b].bool()]
    return out


GEMMA_ROWS = [1, 2]  # one image | two images


# ----------------------------------------------------------------------------- Gemma 4
GEMMA4_MAX_TOKENS = 16  # the tiny processor's max_soft_tokens: every image is padded to 16 x 9 patches


def gemma4_patches(rows: int, cols: int, generator) -> tuple[torch.Tensor, torch.Tensor]:
    """One image of ``rows x cols`` soft tokens as the processor gives it: its patches (row by row)
    and their ``(x, y)`` positions, padded to ``GEMMA4_MAX_TOKENS`` cells' patches with ``-1``."""
    k, p = GEMMA4_KERNEL, GEMMA4_PATCH
    h, w = rows * k, cols * k
    image = torch.rand(3, h * p, w * p, generator=generator)
    patches = image.reshape(3, h, p, w, p).permute(1, 3, 2, 4, 0).reshape(h * w, -1)
    grid = torch.stack(torch.meshgrid(torch.arange(w), torch.arange(h), indexing="xy"), dim=-1).reshape(-1, 2)
    pad = GEMMA4_MAX_TOKENS * k * k - h * w
    return torch.cat([patches, patches.new_zeros(pad, patches.shape[1])]), torch.cat([grid, grid.new_full((pad, 2), -1)])


def gemma4_batch(rows, seed=0, suffixes=None):
    """Rows of images given by their soft-token grids (``(4, 4)``: 16 tokens, ``(3, 4)``: 12):
    ``<bos>``, three text tokens, then per image ``<start_of_image>`` + its placeholders +
    ``<end_of_image>`` and two text tokens, then ``suffixes[r]`` text tokens; left-padded, with the
    ``mm_token_type_ids`` the processor returns and the images' patches and positions, in order."""
    generator = torch.Generator().manual_seed(seed)
    ids_rows, patches, positions = [], [], []
    for r, grids in enumerate(rows):
        ids = [1] + torch.randint(3, 900, (3,), generator=generator).tolist()
        for grid in grids:
            ids += [BOI] + [GEMMA4_IMAGE] * (grid[0] * grid[1]) + [EOI] + torch.randint(3, 900, (2,), generator=generator).tolist()
            image, where = gemma4_patches(*grid, generator)
            patches.append(image)
            positions.append(where)
        suffix = suffixes[r] if suffixes else 5
        ids_rows.append(ids + torch.randint(3, 900, (suffix,), generator=generator).tolist())
    inputs = left_pad(ids_rows)
    inputs["mm_token_type_ids"] = (inputs["input_ids"] == GEMMA4_IMAGE).long()
    inputs["pixel_values"] = torch.stack(patches)
    inputs["image_position_ids"] = torch.stack(positions)
    return inputs


def gemma4_row(inputs, rows, b):
    """Row ``b`` of a ``gemma4_batch`` of ``rows`` alone, with its own images."""
    counts = [len(r) for r in rows]
    out = items_row(inputs, b, {"pixel_values": counts, "image_position_ids": counts})
    out["mm_token_type_ids"] = inputs["mm_token_type_ids"][b : b + 1, inputs["attention_mask"][b].bool()]
    return out


GEMMA4_ROWS = [[(4, 4)], [(3, 4), (2, 4)]]  # one image | two smaller images


# ----------------------------------------------------------------------------- the registry
LAYERS = 6  # decoder layers of the registry's models: every method's default boundaries fit


@dataclass(frozen=True)
class Family:
    """A tiny model of one family and tower variant, and its prompts.

    ``one(model)``: one row holding one visual item; ``batch(model)``: two left-padded rows of
    different text lengths; ``row(batch, b)``: row ``b`` of that batch alone. ``known_failure``: why
    every check of this family fails today, a ``TypeError`` at attach (a bug in the library,
    reported), or ``None``; conftest's ``family`` fixture marks the family's cases strict xfail.
    """

    name: str
    build: Callable[[], nn.Module]
    one: Callable[[nn.Module], dict]
    batch: Callable[[nn.Module], dict]
    row: Callable[[dict, int], dict]
    known_failure: str | None = None

    def model(self) -> nn.Module:
        """The model, built once per session, after one forward of each input: transformers adds
        its output-capturing hooks at the first forward."""
        return _built(self)


@functools.cache
def _built(family: Family) -> nn.Module:
    model = family.build()
    with torch.no_grad():
        model(**family.one(model))
        model(**family.batch(model))
    return model


def _llava_family(name, build):
    """One fixed-size image per row."""
    return Family(
        name, build,
        one=lambda model: make_inputs(model, seed=1),
        batch=lambda model: make_inputs(model, batch=2, suffix=(9, 4), seed=2),
        row=row,
    )


NEXT_ROWS = [[(112, 112)], [(56, 112)]]


def _next_family(name, tower, known_failure=None):
    """Anyres images of different sizes (88 and 52 slots)."""
    images = [len(r) for r in NEXT_ROWS]
    return Family(
        name, lambda: make_llava_next(tower=tower, layers=LAYERS),
        one=lambda model: next_batch([[(112, 112)]], seed=1),
        batch=lambda model: next_batch(NEXT_ROWS, seed=2, suffixes=[7, 3]),
        row=lambda inputs, b: items_row(inputs, b, {"pixel_values": images, "image_sizes": images}),
        known_failure=known_failure,
    )


def _ov_family(name, tower, one, rows):
    """``one``: the items of the single row; ``rows``: the items of the batch's rows."""
    return Family(
        name, lambda: make_llava_onevision(tower=tower, layers=LAYERS),
        one=lambda model: ov_batch([one], seed=1),
        batch=lambda model: ov_batch(rows, seed=2, suffixes=[6, 2]),
        row=lambda inputs, b: ov_row(inputs, rows, b),
    )


def _qwen_family(name, build=None):
    """One image alone; a batch of an image and a video | a larger image."""
    return Family(
        name, build or (lambda: make_qwen(name, layers=LAYERS)),
        one=lambda model: qwen_row(qwen_batch_for(model, QWEN_MIXED, seed=1), QWEN_MIXED, 1),
        batch=lambda model: qwen_batch_for(model, QWEN_MIXED, seed=2),
        row=lambda inputs, b: qwen_row(inputs, QWEN_MIXED, b),
    )


FAMILIES: dict[str, Family] = {
    family.name: family
    for family in (
        _llava_family("llava", lambda: make_llava(layers=LAYERS, image_size=112, vision_layers=3)),
        _llava_family("llava-siglip", lambda: llava_with(siglip_tower(), layers=LAYERS)),
        _next_family("llava_next", "clip"),
        _next_family("llava_next-siglip", "siglip"),
        # SigLIP: a video alone; a batch of an image | a video and a smaller image.
        # CLIP: an image alone; a batch of an image and a video | a smaller image.
        _ov_family("llava_onevision", "siglip", [("video", None)],
                   [[("image", (64, 64))], [("video", None), ("image", (32, 64))]]),
        _ov_family("llava_onevision-clip", "clip", [("image", (32, 64))],
                   [[("image", (64, 64)), ("video", None)], [("image", (32, 64))]]),
        # A video alone; a batch of an image and a video | a video.
        Family(
            "video_llava", lambda: make_video_llava(layers=LAYERS),
            one=lambda model: one_video(seed=1), batch=lambda model: mixed_batch(seed=2), row=batch_row,
        ),
        _qwen_family("qwen2_vl"),
        _qwen_family("qwen2_5_vl"),
        _qwen_family("qwen3_vl"),
        # Hybrid language models: attention in layers 0, 2 and 4, linear attention in 1, 3 and 5, so
        # that every method's boundaries fit six layers (the released pattern, attention in every
        # 4th layer from layer 3, needs more layers: tests/test_qwen3_5.py).
        _qwen_family("qwen3_5", lambda: make_qwen3_5(layers=LAYERS, interval=2, attention_first=True)),
        _qwen_family("qwen3_5-moe", lambda: make_qwen3_5(moe=True, layers=LAYERS, interval=2, attention_first=True)),
        # One image of 2x2 tiles + thumbnail; a batch of such an image | 1x2 tiles + thumbnail and a single tile.
        Family(
            "internvl", lambda: make_internvl(layers=LAYERS),
            one=lambda model: internvl_batch([[5]], seed=1),
            batch=lambda model: internvl_batch(INTERNVL_ROWS, seed=2, suffixes=[7, 3]),
            row=lambda inputs, b: internvl_row(inputs, INTERNVL_ROWS, b),
        ),
        # Five sliding layers (a window of 16, shorter than the prompts), then a global one; one
        # image alone; a batch of one image | two images.
        Family(
            "gemma3", lambda: make_gemma3(layers=LAYERS),
            one=lambda model: gemma3_batch([1], seed=1),
            batch=lambda model: gemma3_batch(GEMMA_ROWS, seed=2, suffixes=[7, 3]),
            row=lambda inputs, b: gemma3_row(inputs, GEMMA_ROWS, b),
        ),
        # Per-layer inputs; two sliding layers, then a global one; the last two layers reuse the keys
        # and values of layers 2 and 3 (boundaries at layer 2 or before). One 4x4-token image alone; a
        # batch of it | two smaller images (3x4 and 2x4), every image padded to 16 cells' patches.
        Family(
            "gemma4", lambda: make_gemma4(layers=LAYERS),
            one=lambda model: gemma4_batch([[(4, 4)]], seed=1),
            batch=lambda model: gemma4_batch(GEMMA4_ROWS, seed=2, suffixes=[7, 3]),
            row=lambda inputs, b: gemma4_row(inputs, GEMMA4_ROWS, b),
        ),
    )
}
