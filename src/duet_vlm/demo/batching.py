"""Training items of the demo recipe: one image with its packed questions and the targets of the
training-only objectives. Items are pure functions of their index; batches are padded by the shared
``duet_vlm.training.VisionLanguageCollator`` (``demo_collator``), which passes the extra keys through.

>>> dataset = DemoQADataset(processor.tokenizer, processor.image_token_id, n_items=8)   # doctest: +SKIP
>>> batch = demo_collator(processor.tokenizer)([dataset[0], dataset[1]])               # doctest: +SKIP
>>> batch["input_ids"].shape, batch["ground_target"].shape                              # doctest: +SKIP
"""

from __future__ import annotations

from collections import defaultdict
from typing import Sequence

import numpy as np
import torch

from ..training.data import VisionLanguageCollator
from .. import synthetic
from .geometry import LLAVA, Geometry
from .processor import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

N_IMAGE_TOKENS = synthetic.GRID * synthetic.GRID
_MEAN = np.asarray(OPENAI_CLIP_MEAN, np.float32)
_STD = np.asarray(OPENAI_CLIP_STD, np.float32)

# batch keys that are not model inputs: the targets of the auxiliary and grounding objectives
AUX_KEYS = ("color", "shape", "char", "scene", "ground_query", "ground_target", "required")


def pixel_values(images) -> torch.Tensor:
    """CLIP normalisation of 336x336 RGB images (identical to the processor's output)."""
    arr = np.stack([np.asarray(im.convert("RGB"), np.float32) / 255.0 for im in images])
    arr = (arr - _MEAN) / _STD
    return torch.from_numpy(arr.transpose(0, 3, 1, 2).copy())


def _encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def encode_conversation(tokenizer, turns, image_token_id: int) -> tuple[list[int], list[int]]:
    """Token ids and labels for ``USER: <image>\\nQ1 ASSISTANT: A1</s>USER: Q2 ASSISTANT: A2</s>...``.

    Labels are -100 everywhere except on answer tokens and their ``</s>``; the first turn's
    prompt tokenises exactly like ``processor(text=prompt(Q1))``.
    """
    ids = [tokenizer.bos_token_id] + _encode(tokenizer, "USER:") + [image_token_id] * N_IMAGE_TOKENS
    labels = [-100] * len(ids)
    for k, (_qtype, q, a) in enumerate(turns):
        p = _encode(tokenizer, ("\n" if k == 0 else "USER: ") + q + " ASSISTANT:")
        ans = _encode(tokenizer, a) + [tokenizer.eos_token_id]
        ids += p + ans
        labels += [-100] * len(p) + ans
    return ids, labels


def encode_packed(tokenizer, turns, image_token_id: int, geometry: Geometry = LLAVA):
    """Several independent single-turn questions sharing one image prefix.

    Returns ``(ids, labels, segments, positions)``: the prefix ``<s> USER: <image>*576`` has
    segment 0, question ``k`` (``\\nQ ASSISTANT: A</s>``) segment ``k + 1`` and position ids that
    restart right after the prefix, so with :func:`packed_attention_mask` every question sees
    exactly what it would see alone: training on 16 questions costs one image forward, and no
    answer leaks into another question. ``geometry``: the architecture's prefix (Qwen's image sits
    between ``<|vision_start|>`` and ``<|vision_end|>``); positions are 1-D here (``Geometry.positions``).
    """
    prefix = geometry.prefix(tokenizer, image_token_id, _encode)
    ids, labels = list(prefix), [-100] * len(prefix)
    segments, positions = [0] * len(prefix), list(range(len(prefix)))
    for k, (_qtype, q, a) in enumerate(turns):
        p = _encode(tokenizer, "\n" + q + " ASSISTANT:")
        ans = _encode(tokenizer, a) + [tokenizer.eos_token_id]
        ids += p + ans
        labels += [-100] * len(p) + ans
        segments += [k + 1] * (len(p) + len(ans))
        positions += list(range(len(prefix), len(prefix) + len(p) + len(ans)))
    return ids, labels, segments, positions


def packed_attention_mask(segments: torch.Tensor) -> torch.Tensor:
    """(B, L) segment ids (-1 = padding) -> (B, 1, L, L) boolean mask (True = may attend):
    causal, and a token sees the shared prefix (segment 0) and its own segment only."""
    L = segments.shape[1]
    causal = torch.ones(L, L, dtype=torch.bool, device=segments.device).tril()
    qs, ks = segments[:, :, None], segments[:, None, :]
    allowed = causal & ((ks == 0) | (ks == qs)) & (ks >= 0)
    allowed[:, :, 0] = True  # padding rows attend to <s> only (avoids empty softmax rows)
    return allowed[:, None]


def aux_targets(scene, geometry: Geometry = LLAVA) -> dict[str, torch.Tensor]:
    """Per-token colour / shape / character ids and the scene's multi-hot labels (``AuxHeads``)."""
    targets = {k: torch.from_numpy(v) for k, v in geometry.token_targets(synthetic.patch_labels(scene)).items()}
    targets["scene"] = torch.from_numpy(synthetic.scene_labels(scene))
    return targets


def grounding_targets(scene, turns) -> list[np.ndarray]:
    """Per question, ``(4, 576)`` bool: the patches each grounding head should attend to from
    the answer position (see ``objectives.grounding_loss``).

    - head 0: every object the question names (for reading, the character's patch); nothing
      for counting and for existence questions answered "no";
    - heads 1 and 3: the first and the second object of a relation;
    - head 2: the centre patch of each counted object. Its loss spreads attention evenly over
      those and ``<s>``, so the share left on ``<s>`` is 1 / (count + 1): a count the next
      layers can read.
    """
    patches = synthetic.object_patches(scene)
    out = []
    for qtype, _q, _a, params in turns:
        target = np.zeros((4, N_IMAGE_TOKENS), bool)
        objects = synthetic.question_objects(scene, qtype, params)
        if qtype == "count":
            for i in objects:
                o = scene[i]
                target[2, (o["y"] // synthetic.PATCH_SIZE) * synthetic.GRID + o["x"] // synthetic.PATCH_SIZE] = True
        else:
            for i in objects:
                target[0] |= synthetic.char_patches(scene[i]) if qtype == "read" else patches[i]
        if qtype == "relation":
            target[1], target[3] = patches[objects[0]], patches[objects[1]]
        out.append(target)
    return out


def required_patches(scene, turns) -> list[np.ndarray]:
    """Per question, ``(576,)`` int8 group ids: the question is answerable from a subset of the
    patches only if every group ``g > 0`` keeps at least one patch (each object the question is
    about is a group; for reading, the character's patch). An existence question answered "no"
    needs nothing. Used to leave out the loss of questions a random subset made unanswerable."""
    patches = synthetic.object_patches(scene)
    out = []
    for qtype, _q, _a, params in turns:
        groups = np.zeros(N_IMAGE_TOKENS, np.int8)
        for g, i in enumerate(synthetic.question_objects(scene, qtype, params), start=1):
            groups[synthetic.char_patches(scene[i]) if qtype == "read" else patches[i]] = g
        out.append(groups)
    return out


def _stack(arrays: list[np.ndarray], shape: tuple[int, ...], dtype) -> np.ndarray:
    return np.stack(arrays) if arrays else np.zeros((0, *shape), dtype)


def encode_item(tokenizer, image_token_id: int, image, turns, scene, geometry: Geometry = LLAVA) -> dict[str, torch.Tensor]:
    """One training item: model inputs (packed questions) and the objectives' targets (per visual token)."""
    ids, labels, segments, positions = encode_packed(tokenizer, [t[:3] for t in turns], image_token_id, geometry)
    token_targets = geometry.token_targets({
        "ground_target": _stack(grounding_targets(scene, turns), (4, N_IMAGE_TOKENS), bool),
        "required": _stack(required_patches(scene, turns), (N_IMAGE_TOKENS,), np.int8)})
    # each answer's first token is predicted by the position before it
    queries = [t - 1 for t in range(1, len(ids)) if labels[t] != -100 and labels[t - 1] == -100]
    item = {
        "input_ids": torch.tensor(ids), "attention_mask": torch.ones(len(ids), dtype=torch.long),
        "labels": torch.tensor(labels), "position_ids": torch.tensor(positions), "segments": torch.tensor(segments),
        **geometry.image_inputs(pixel_values([image])),
        "ground_query": torch.tensor(queries, dtype=torch.long).reshape(-1),
        "ground_target": torch.from_numpy(token_targets["ground_target"]),
        "required": torch.from_numpy(token_targets["required"]),
    }
    item.update(aux_targets(scene, geometry))
    return item


def demo_collator(tokenizer) -> VisionLanguageCollator:
    """The shared collator, told how to pad the recipe's extra keys."""
    return VisionLanguageCollator(
        pad_token_id=tokenizer.pad_token_id, padding_side="right",
        sequence_keys={"position_ids": 0, "segments": -1}, pad_values={"ground_query": -1},
    )


class DemoQADataset(torch.utils.data.Dataset):
    """Item ``i`` is training image ``offset + i`` with ``n_questions`` packed questions, a pure
    function of ``i``. ``curriculum`` ``[(until_step, max_objects), ...]`` caps the scene size by
    training step (``step = i // batch_size - curriculum_start``; no cap before ``curriculum_start``,
    i.e. in the vision-only phase, and after the last entry).

    >>> DemoQADataset(tok, image_token_id, n_items=4)[0]["input_ids"].shape           # doctest: +SKIP
    """

    def __init__(self, tokenizer, image_token_id: int, n_items: int, n_questions: int = 16, balanced: bool = True,
                 curriculum: Sequence[tuple[int, int]] = (), batch_size: int = 1, curriculum_start: int = 0,
                 offset: int = 0, split: str = "train", geometry: Geometry = LLAVA):
        self.tokenizer, self.image_token_id, self.n_items, self.geometry = tokenizer, image_token_id, n_items, geometry
        self.n_questions, self.balanced, self.curriculum = n_questions, balanced, list(curriculum)
        self.batch_size, self.curriculum_start, self.offset, self.split = batch_size, curriculum_start, offset, split

    def __len__(self) -> int:
        return self.n_items

    def max_objects(self, index: int) -> int | None:
        step = index // self.batch_size - self.curriculum_start
        if step < 0:
            return None
        return next((cap for until, cap in self.curriculum if step < until), None)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        image, turns, scene = synthetic.conversation(self.split, self.offset + index, self.n_questions,
                                                self.max_objects(index), balanced=self.balanced, with_params=True)
        return encode_item(self.tokenizer, self.image_token_id, image, turns, scene, self.geometry)


def split_batch(batch: dict) -> tuple[dict, dict]:
    """``(model inputs, objective targets)`` of a collated batch."""
    aux = {k: batch[k] for k in AUX_KEYS if k in batch}
    return {k: v for k, v in batch.items() if k not in aux}, aux


def make_batch(tokenizer, image_token_id: int, step: int, batch_size: int, n_questions: int,
               split: str = "train", max_objects: int | None = None, balanced: bool = False,
               geometry: Geometry = LLAVA):
    """``(batch, aux)`` of training images ``step * batch_size ...``: model inputs (with
    ``position_ids`` and ``segments``) and the objectives' targets, ``ground_query`` (B, Q) the
    position that predicts each answer (-1 = none), ``ground_target`` (B, Q, 4, 576) and
    ``required`` (B, Q, 576)."""
    items = []
    for b in range(batch_size):
        image, turns, scene = synthetic.conversation(split, step * batch_size + b, n_questions, max_objects,
                                                balanced=balanced, with_params=True)
        items.append(encode_item(tokenizer, image_token_id, image, turns, scene, geometry))
    return split_batch(demo_collator(tokenizer)(items))


def vision_batch(step: int, batch_size: int, offset: int, geometry: Geometry = LLAVA):
    """``(auxiliary targets, image inputs)`` of ``batch_size`` fresh scenes (no questions): for LLaVA the
    image inputs are the pixel values, for another geometry its ``image_inputs`` dict."""
    images, labels = [], defaultdict(list)
    for b in range(batch_size):
        rng = synthetic.rng_for("train", offset + step * batch_size + b, stream=2)
        scene = synthetic.make_scene(rng)
        images.append(synthetic.render_scene(scene, rng))
        for k, v in aux_targets(scene, geometry).items():
            labels[k].append(v)
    pixels = pixel_values(images)
    return {k: torch.stack(v) for k, v in labels.items()}, pixels if geometry is LLAVA else geometry.image_inputs(pixels)
