"""Train and evaluate the shipped demo LLaVA model on the synthetic visual-QA benchmark.

Public functions (plain Python; CLI wiring lives elsewhere):

``train_demo(output_dir, steps=2400, batch_size=4, n_questions=16, seed=0, lr=1.5e-3, ...,
             vision_steps=300, vision_batch_size=16, vision_lr=2e-3,
             scene_curriculum=((300, 1), (700, 2), (1100, 3)), focus_steps=1400, focus_keep=96,
             align_words=True, keep_visual=224, full_visual_steps=200, ..., export_dir=None,
             final_eval_n=700, init_from=None, balanced_questions=True, ground_from=4,
             ground_weight=0.25, ground_heads=2, position_regression=False, log=print) -> pathlib.Path``
    Trains from scratch (seeded; the data of every step is a pure function of the step), in
    two phases: the vision tower and projector alone on auxiliary per-patch and per-image
    losses, then visual QA on the whole model (see the function's docstring).  Writes a
    resumable ``checkpoint.pt`` to ``output_dir`` every ``save_every`` steps (re-running the
    same call resumes from it), and finally saves model + processor with ``save_pretrained`` to
    ``export_dir`` (default ``output_dir/final``), evaluates test accuracy with and without the
    image and writes ``metrics.json`` there.  Returns ``export_dir``.  ``init_from`` (an exported
    model directory) starts from its weights instead of a random init, to train longer with a new
    schedule.  ``num_threads="auto"`` picks 1 or 2 threads from measured step times.

``evaluate_accuracy(model, processor, split="test", n=700, blank_image=False, wrap=None,
                    batch_size=8, max_new_tokens=3, start=0, return_predictions=False,
                    progress=None) -> dict``
    Greedy-generation exact-match accuracy on ``n`` samples of ``split`` (question types are
    balanced when ``n`` is a multiple of 7).  ``wrap`` is a zero-argument callable returning a
    context manager entered around all generation (default ``contextlib.nullcontext``), e.g.
    ``wrap=lambda: reducer(model)`` to evaluate a token-reduction method.  ``blank_image=True``
    replaces every image by a uniform grey one (the "no vision" control).  Returns
    ``{"accuracy", "n", "per_type": {qtype: acc}, "per_type_n", "chance", "blank_image", "split"}``
    (+ ``"predictions"`` if requested).

``write_model_card(export_dir) -> pathlib.Path``
    Writes ``README.md`` (architecture, recipe, accuracies from ``metrics.json``) in ``export_dir``.

``load_demo(path=None) -> (model, processor)``
    Loads the shipped model (``duet_vlm/assets/demo_model``) or ``path`` with the standard
    ``LlavaForConditionalGeneration.from_pretrained`` / ``AutoProcessor.from_pretrained``.

Command line (for the long background run): ``python -m duet_vlm.demo.train --output-dir DIR
[--steps N] [--threads T] [--export-dir DIR]`` (see ``--help``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..adapters.base import rotate_like
from . import data
from .model import build_model, count_parameters, demo_config
from .processor import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, build_processor, prompt

DEMO_MODEL_DIR = Path(__file__).resolve().parent.parent / "assets" / "demo_model"

_MEAN = np.asarray(OPENAI_CLIP_MEAN, np.float32)
_STD = np.asarray(OPENAI_CLIP_STD, np.float32)
N_IMAGE_TOKENS = data.GRID * data.GRID


# ----------------------------------------------------------------------------- batching

def pixel_values(images) -> torch.Tensor:
    """CLIP normalisation of 336x336 RGB images (identical to the processor's output)."""
    arr = np.stack([np.asarray(im.convert("RGB"), np.float32) / 255.0 for im in images])
    arr = (arr - _MEAN) / _STD
    return torch.from_numpy(arr.transpose(0, 3, 1, 2).copy())


def encode_conversation(tokenizer, turns, image_token_id: int) -> tuple[list[int], list[int]]:
    """Token ids and labels for ``USER: <image>\\nQ1 ASSISTANT: A1</s>USER: Q2 ASSISTANT: A2</s>...``.

    Labels are -100 everywhere except on answer tokens and their ``</s>``; the first turn's
    prompt tokenises exactly like ``processor(text=prompt(Q1))``.
    """
    def enc(text):
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    ids = [tokenizer.bos_token_id] + enc("USER:") + [image_token_id] * N_IMAGE_TOKENS
    labels = [-100] * len(ids)
    for k, (_qtype, q, a) in enumerate(turns):
        p = enc(("\n" if k == 0 else "USER: ") + q + " ASSISTANT:")
        ans = enc(a) + [tokenizer.eos_token_id]
        ids += p + ans
        labels += [-100] * len(p) + ans
    return ids, labels


def encode_packed(tokenizer, turns, image_token_id: int):
    """Several independent single-turn questions sharing one image prefix.

    Returns ``(ids, labels, segments, positions)``: the prefix ``<s> USER: <image>*576`` has
    segment 0, question ``k`` (``\nQ ASSISTANT: A</s>``) segment ``k + 1`` and position ids that
    restart right after the prefix, so with :func:`packed_attention_mask` every question sees
    exactly what it would see alone (same tokens, same positions, no other question): training
    on 6 questions costs one image forward, and no answer leaks into another question.
    """
    def enc(text):
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    prefix = [tokenizer.bos_token_id] + enc("USER:") + [image_token_id] * N_IMAGE_TOKENS
    ids, labels = list(prefix), [-100] * len(prefix)
    segments, positions = [0] * len(prefix), list(range(len(prefix)))
    for k, (_qtype, q, a) in enumerate(turns):
        p = enc("\n" + q + " ASSISTANT:")
        ans = enc(a) + [tokenizer.eos_token_id]
        ids += p + ans
        labels += [-100] * len(p) + ans
        segments += [k + 1] * (len(p) + len(ans))
        positions += list(range(len(prefix), len(prefix) + len(p) + len(ans)))
    return ids, labels, segments, positions


def packed_attention_mask(segments: torch.Tensor) -> torch.Tensor:
    """(B, L) segment ids (-1 = padding) -> (B, 1, L, L) boolean mask (True = may attend):
    causal, and a token sees the shared prefix (segment 0) and its own segment only."""
    L = segments.shape[1]
    causal = torch.ones(L, L, dtype=torch.bool).tril()
    qs, ks = segments[:, :, None], segments[:, None, :]
    allowed = causal & ((ks == 0) | (ks == qs)) & (ks >= 0)
    allowed[:, :, 0] = True  # padding rows attend to <s> only (avoids empty softmax rows)
    return allowed[:, None]


def aux_targets(scene) -> dict[str, torch.Tensor]:
    """Targets of :class:`AuxHeads`: per-patch colour / shape / character ids and the scene's
    multi-hot labels."""
    targets = {k: torch.from_numpy(v) for k, v in data.patch_labels(scene).items()}
    targets["scene"] = torch.from_numpy(data.scene_labels(scene))
    return targets


def make_batch(tokenizer, image_token_id: int, step: int, batch_size: int, n_questions: int,
               split: str = "train", packed: bool = True, max_objects: int | None = None,
               balanced: bool = False):
    """``(batch, aux)``: model inputs of ``batch_size`` images with their questions, and the
    targets of the training-only losses: :func:`aux_targets` plus ``ground_query`` (B, Q), the
    position that predicts each question's answer (-1 = none), and ``ground_target``
    (B, Q, 4, 576), the patches its grounding heads should attend to (see
    :func:`grounding_targets`)."""
    images, seqs, aux, grounds = [], [], defaultdict(list), []
    for b in range(batch_size):
        image, turns, scene = data.conversation(split, step * batch_size + b, n_questions, max_objects,
                                                balanced=balanced, with_params=True)
        images.append(image)
        grounds.append(grounding_targets(scene, turns))
        turns = [t[:3] for t in turns]
        if packed:
            seqs.append(encode_packed(tokenizer, turns, image_token_id))
        else:
            ids, lab = encode_conversation(tokenizer, turns, image_token_id)
            seqs.append((ids, lab, [0] * len(ids), list(range(len(ids)))))
        for k, v in aux_targets(scene).items():
            aux[k].append(v)
    length = max(len(s[0]) for s in seqs)
    pad = tokenizer.pad_token_id
    input_ids = torch.full((batch_size, length), pad, dtype=torch.long)
    labels = torch.full((batch_size, length), -100, dtype=torch.long)
    segments = torch.full((batch_size, length), -1, dtype=torch.long)
    positions = torch.zeros((batch_size, length), dtype=torch.long)
    n_q = max(len(g) for g in grounds)
    queries = torch.full((batch_size, n_q), -1, dtype=torch.long)
    targets = torch.zeros((batch_size, n_q, 4, N_IMAGE_TOKENS), dtype=torch.bool)
    for b, (ids, lab, seg, pos) in enumerate(seqs):
        n = len(ids)
        input_ids[b, :n] = torch.tensor(ids)
        labels[b, :n] = torch.tensor(lab)
        segments[b, :n] = torch.tensor(seg)
        positions[b, :n] = torch.tensor(pos)
        # each answer's first token is predicted by the position before it
        answer_starts = [t for t in range(1, n) if lab[t] != -100 and lab[t - 1] == -100]
        queries[b, :len(answer_starts)] = torch.tensor(answer_starts) - 1
        targets[b, :len(grounds[b])] = torch.from_numpy(np.stack(grounds[b]))
    batch = {"input_ids": input_ids, "labels": labels, "pixel_values": pixel_values(images),
             "position_ids": positions, "segments": segments}
    aux = {k: torch.stack(v) for k, v in aux.items()}
    aux["ground_query"], aux["ground_target"] = queries, targets
    return batch, aux


def grounding_targets(scene, turns) -> list[np.ndarray]:
    """Per question, ``(4, 576)`` bool: the patches each grounding head should attend to from
    the answer position (see :func:`grounding_loss`).

    - head 0: every object the question names (for reading, the character's patch); nothing
      for counting and for existence questions answered "no";
    - heads 1 and 3: the first and the second object of a relation, so that the decoder gets
      the two positions it compares separately;
    - head 2: the centre patch of each counted object.  Its loss spreads attention evenly over
      those and the ``<s>`` token, so the share left on ``<s>`` is 1 / (count + 1): a
      count the next layers can read, where an average over the objects alone would lose it.
    """
    patches = data.object_patches(scene)
    out = []
    for qtype, _q, _a, params in turns:
        target = np.zeros((4, N_IMAGE_TOKENS), bool)
        objects = data.question_objects(scene, qtype, params)
        if qtype == "count":
            for i in objects:
                o = scene[i]
                target[2, (o["y"] // data.PATCH_SIZE) * data.GRID + o["x"] // data.PATCH_SIZE] = True
        else:
            for i in objects:
                target[0] |= data.char_patches(scene[i]) if qtype == "read" else patches[i]
        if qtype == "relation":
            target[1], target[3] = patches[objects[0]], patches[objects[1]]
        out.append(target)
    return out


class AuxHeads(nn.Module):
    """Training-only auxiliary objectives (the heads are never shipped; the shipped model is a
    plain LLaVA).

    Per patch, on the projector output: colour / shape / character of the object under the
    patch, and the patch's row and column (relations compare two objects' positions, which the
    tower must carry through to the decoder).  Dense supervision makes the tiny vision tower
    learn within a CPU budget.
    Per image, on the CLS token of the feature layer: which colours, shapes, pairs and
    characters the scene contains (multi-label).  A real CLIP's CLS attention lands on the
    objects because its image-level objective needs them; this gives the demo tower the same
    property, which DUET's Stage A and VisionZip rank patches by.
    Word alignment (with ``words=``, the decoder's own final norm and ``lm_head``): each object
    patch, read as if it were a last-layer state, names its colour, shape, character and
    quadrant among the words of that kind.  This is the demo's counterpart of LLaVA's stage-1
    feature alignment: visual tokens arrive in the language model's word space, so answering
    becomes looking up the right patch and copying what it says.
    """

    def __init__(self, hidden: int, vision_hidden: int, words: dict[str, list[int]] | None = None,
                 position_regression: bool = False):
        super().__init__()
        self.color = nn.Linear(hidden, len(data.COLOR_NAMES) + 1)
        self.shape = nn.Linear(hidden, len(data.SHAPES) + 1)
        self.char = nn.Linear(hidden, len(data.CHARACTERS) + 1)
        self.scene = nn.Linear(vision_hidden, len(data.SCENE_LABELS))
        self.row = nn.Linear(hidden, data.GRID)
        self.column = nn.Linear(hidden, data.GRID)
        self.words = words
        grid = torch.arange(data.GRID * data.GRID)
        self.register_buffer("row_id", grid // data.GRID, persistent=False)
        self.register_buffer("column_id", grid % data.GRID, persistent=False)
        # column and row as one number each, in [-1, 1]: comparing two positions is then a
        # subtraction, where the classification heads leave them as 24-way codes
        self.xy = nn.Linear(hidden, 2) if position_regression else None
        centred = torch.stack([self.column_id, self.row_id], -1).float() / (data.GRID - 1) * 2 - 1
        self.register_buffer("xy_target", centred, persistent=False)
        centres = (torch.arange(data.GRID) * data.PATCH_SIZE + data.PATCH_SIZE // 2) >= data.IMAGE_SIZE / 2
        # QUADRANTS order: topleft, topright, bottomleft, bottomright
        self.register_buffer("quadrant", (2 * centres[:, None] + centres[None, :]).reshape(-1), persistent=False)

    def loss(self, feats: torch.Tensor, cls: torch.Tensor, labels: dict[str, torch.Tensor],
             model=None) -> torch.Tensor:
        # Colour (with "none") on every patch; shape on object patches and the character on the
        # patch it is drawn in only: averaged over all 576 patches, the few informative ones
        # would be drowned by the background and the tower would not learn them.
        on_object = labels["color"] > 0
        on_char = labels["char"] > 0
        terms = [F.cross_entropy(self.color(feats).flatten(0, 1), labels["color"].flatten())]
        if on_object.any():
            terms.append(F.cross_entropy(self.shape(feats)[on_object], labels["shape"][on_object]))
        if on_char.any():
            terms.append(F.cross_entropy(self.char(feats)[on_char], labels["char"][on_char]))
        terms.append(F.binary_cross_entropy_with_logits(self.scene(cls), labels["scene"]))
        for head, target in ((self.row, self.row_id), (self.column, self.column_id)):
            terms.append(F.cross_entropy(head(feats).flatten(0, 1), target.repeat(feats.shape[0])))
        if self.xy is not None:
            terms.append(F.mse_loss(self.xy(feats), self.xy_target.expand(feats.shape[0], -1, -1)))
        if self.words is not None and model is not None:
            vocab_logits = model.lm_head(model.model.language_model.norm(feats))
            targets = {"color": labels["color"] - 1, "shape": labels["shape"] - 1, "char": labels["char"] - 1,
                       "quadrant": self.quadrant.expand_as(labels["color"])}
            for name, target in targets.items():
                ids = torch.tensor(self.words[name])
                keep = on_object & (target >= 0)
                if keep.any():
                    terms.append(F.cross_entropy(vocab_logits[keep][:, ids], target[keep]))
        return sum(terms) / len(terms)


def answer_words(tokenizer) -> dict[str, list[int]]:
    """Token ids of the colour, shape, character and quadrant words, in the generator's order."""
    def ids(words):
        return [tokenizer.convert_tokens_to_ids(w) for w in words]

    return {"color": ids(data.COLOR_NAMES), "shape": ids(data.SHAPES), "char": ids(data.CHARACTERS),
            "quadrant": ids(data.QUADRANTS)}


def image_features(model, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(projected patch features (B, 576, H), CLS state of the feature layer (B, Hv))``,
    computed exactly as ``LlavaModel.get_image_features`` does for the model's own config."""
    cfg = model.config
    out = model.model.get_image_features(
        pixel_values=pixel_values, vision_feature_layer=cfg.vision_feature_layer,
        vision_feature_select_strategy=cfg.vision_feature_select_strategy, output_hidden_states=True)
    return torch.stack(list(out.pooler_output)), out.hidden_states[cfg.vision_feature_layer][:, 0]


def language_forward(model, batch: dict, feats: torch.Tensor, keep_visual: int | None = None,
                     generator: torch.Generator | None = None, priority: torch.Tensor | None = None,
                     grounding: dict | None = None, ground_layers: tuple[int, ...] = ()):
    """Run the language model on ``batch`` with image features ``feats`` spliced in.

    ``keep_visual=k`` feeds only ``k`` patches of each image (in order, with their original
    position ids), the same kind of reduction the library applies at inference, which makes
    training steps 2-4x cheaper: uniformly random ones, or, where ``priority`` (B, 576) is
    True, those first (in random order) and random others after them.  Early on, the object
    patches alone give the decoder few distractors to learn where to look.

    With ``grounding`` (the ``ground_query`` / ``ground_target`` of :func:`make_batch`),
    returns ``(output, grounding_loss)``: see :func:`grounding_loss`.
    """
    ids = batch["input_ids"]
    image_mask = ids == model.config.image_token_id
    embeds = model.get_input_embeddings()(ids.masked_fill(image_mask, 0))
    embeds = embeds.masked_scatter(image_mask[..., None], feats.reshape(-1, feats.shape[-1]).to(embeds.dtype))
    labels, positions, segments = batch["labels"], batch["position_ids"], batch["segments"]
    first = int(image_mask[0].nonzero()[0])
    kept = torch.arange(N_IMAGE_TOKENS).expand(ids.shape[0], -1)
    if keep_visual is not None and keep_visual < N_IMAGE_TOKENS:
        before = torch.arange(first)
        after = torch.arange(first + N_IMAGE_TOKENS, ids.shape[1])
        rows, kept_rows = [], []
        for b in range(ids.shape[0]):
            order = torch.randperm(N_IMAGE_TOKENS, generator=generator)
            if priority is not None:  # stable sort: priority patches first, each group still shuffled
                order = order[torch.argsort((~priority[b][order]).to(torch.int8), stable=True)]
            kept_rows.append(order[:keep_visual].sort().values)
            rows.append(torch.cat([before, first + kept_rows[-1], after]))
        index = torch.stack(rows)
        kept = torch.stack(kept_rows)
        embeds = torch.gather(embeds, 1, index[..., None].expand(-1, -1, embeds.shape[-1]))
        labels, positions, segments = (torch.gather(t, 1, index) for t in (labels, positions, segments))
    mask = packed_attention_mask(segments)
    if grounding is None or not ground_layers:
        return model(inputs_embeds=embeds, attention_mask=mask, position_ids=positions, labels=labels)

    layers = model.model.language_model.layers
    inputs: dict[int, tuple] = {}

    def capture(layer_index):
        def hook(_module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            inputs[layer_index] = (hidden, kwargs["position_embeddings"])
        return hook

    handles = [layers[i].register_forward_pre_hook(capture(i), with_kwargs=True) for i in ground_layers]
    try:
        out = model(inputs_embeds=embeds, attention_mask=mask, position_ids=positions, labels=labels)
    finally:
        for h in handles:
            h.remove()
    queries = grounding["ground_query"]
    shift = N_IMAGE_TOKENS - kept.shape[1]  # the questions follow the image, which lost ``shift`` tokens
    queries = torch.where(queries >= 0, queries - shift, queries)
    targets = torch.gather(grounding["ground_target"], 3,
                           kept[:, None, None, :].expand(-1, *grounding["ground_target"].shape[1:3], -1))
    loss = sum(grounding_loss(layers[i], *inputs[i], mask, queries, first, targets) for i in ground_layers)
    return out, loss / len(ground_layers)


def grounding_loss(layer, hidden: torch.Tensor, position_embeddings, mask: torch.Tensor,
                   queries: torch.Tensor, first: int, targets: torch.Tensor) -> torch.Tensor:
    """Grounding loss of ``layer``, averaged over the (question, head) pairs that have targets.

    Heads 0, 1 and 3: ``-log`` of the attention mass the head puts, from each answer position,
    on the patches of ``targets[:, :, h]``.  Head 2 (when ``targets`` has a third row): the
    cross-entropy of its attention against the uniform distribution over ``<s>`` (position 0)
    and the patches of ``targets[:, :, 2]`` (see :func:`grounding_targets`).  ``targets``
    may hold the first 1-4 rows: the heads beyond them stay free.

    A training-only objective that teaches the tiny decoder where to look: finding "the red
    circle" among ~10 objects is the step it does not discover on its own within a CPU budget.
    It constrains up to four heads per supervised layer; the shipped model is
    a plain LLaVA.  The logits are the layer's own (input norm, q/k projections, RoPE), computed
    only for the ``Q`` answer rows.
    """
    attn = layer.self_attn
    n_heads, d = targets.shape[2], attn.head_dim
    x = layer.input_layernorm(hidden)
    rows = queries.clamp(min=0)
    xq = torch.gather(x, 1, rows[..., None].expand(-1, -1, x.shape[-1]))
    q = attn.q_proj(xq).view(*rows.shape, -1, d)[:, :, :n_heads].transpose(1, 2)  # (B, h, Q, d)
    kv_heads = [h // attn.num_key_value_groups for h in range(n_heads)]
    k = attn.k_proj(x).view(*x.shape[:2], -1, d)[:, :, kv_heads].transpose(1, 2)  # (B, h, L, d)
    cos, sin = position_embeddings
    cos_q, sin_q = (torch.gather(t, 1, rows[..., None].expand(-1, -1, d)) for t in (cos, sin))
    q = rotate_like(layer, q, cos_q, sin_q)
    k = rotate_like(layer, k, cos, sin)
    logits = (q @ k.transpose(-1, -2)) * attn.scaling  # (B, h, Q, L)
    allowed = torch.gather(mask[:, 0], 1, rows[..., None].expand(-1, -1, mask.shape[-1]))  # (B, Q, L)
    logp = logits.masked_fill(~allowed[:, None], float("-inf")).log_softmax(-1)
    n_visual = targets.shape[-1]
    visual_logp = logp[..., first:first + n_visual]  # (B, h, Q, n)
    on_target = targets.permute(0, 2, 1, 3)  # (B, h, Q, n)
    losses = -visual_logp.masked_fill(~on_target, float("-inf")).logsumexp(-1)  # (B, h, Q)
    if n_heads > 2:
        spread = on_target[:, 2]
        n = spread.sum(-1)
        losses[:, 2] = -(logp[:, 2, :, 0] + visual_logp[:, 2].masked_fill(~spread, 0.0).sum(-1)) / (n + 1)
    valid = on_target.any(-1) & (queries >= 0)[:, None]
    if not valid.any():
        return logits.sum() * 0.0
    return losses[valid].mean()


# ----------------------------------------------------------------------------- evaluation

def _normalise(text: str) -> str:
    return text.strip().lower().strip(" .!?,").split(" ")[0] if text.strip() else ""


@torch.no_grad()
def evaluate_accuracy(model, processor, split: str = "test", n: int = 700, blank_image: bool = False,
                      wrap: Callable[[], contextlib.AbstractContextManager] | None = None,
                      batch_size: int = 8, max_new_tokens: int = 3, start: int = 0,
                      return_predictions: bool = False, progress: Callable[[str], None] | None = None) -> dict:
    wrap = wrap or contextlib.nullcontext
    was_training = model.training
    model.eval()
    tok = processor.tokenizer
    correct = defaultdict(int)
    total = defaultdict(int)
    answered = defaultdict(Counter)
    preds = []
    blank = data.blank_image() if blank_image else None
    with wrap():
        for lo in range(start, start + n, batch_size):
            samples = [data.sample(split, i) for i in range(lo, min(lo + batch_size, start + n))]
            images = [blank if blank is not None else s.image for s in samples]
            inputs = processor(images=images, text=[prompt(s.question) for s in samples],
                               padding=True, return_tensors="pt")
            out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
            new = out[:, inputs["input_ids"].shape[1]:]
            for s, row in zip(samples, new):
                pred = _normalise(tok.decode(row, skip_special_tokens=True))
                ok = pred == s.answer
                correct[s.qtype] += ok
                total[s.qtype] += 1
                answered[s.qtype][pred] += 1
                if return_predictions:
                    preds.append({"index": s.index, "qtype": s.qtype, "question": s.question,
                                  "answer": s.answer, "prediction": pred, "correct": bool(ok)})
            if progress is not None:
                done = sum(total.values())
                progress(f"eval {split}{' (blank)' if blank_image else ''}: {done}/{n} "
                         f"acc={sum(correct.values()) / done:.3f}")
    if was_training:
        model.train()
    n_done = sum(total.values())
    result = {
        "split": split,
        "blank_image": blank_image,
        "n": n_done,
        "accuracy": sum(correct.values()) / max(n_done, 1),
        "per_type": {t: correct[t] / total[t] for t in data.QUESTION_TYPES if total[t]},
        "per_type_n": {t: total[t] for t in data.QUESTION_TYPES if total[t]},
        "chance": {t: data.CHANCE[t] for t in data.QUESTION_TYPES if total[t]},
        # a model that answers one word to every question of a type has not learned that type
        "top_answer": {t: [word, count / total[t]] for t in data.QUESTION_TYPES if total[t]
                       for word, count in answered[t].most_common(1)},
    }
    if return_predictions:
        result["predictions"] = preds
    return result


@torch.no_grad()
def patch_word_probe(model, tokenizer, n_images: int = 64, seed_offset: int = 60_000_000) -> dict[str, float]:
    """Share of object patches of ``n_images`` fresh scenes that, read through the decoder's own
    final norm and ``lm_head`` (the word alignment of :class:`AuxHeads`), name their object's
    colour and shape, and (on the patch a character is drawn in) the character.  Near 1 means
    the vision tower perceives what the questions ask; the rest is the decoder's job."""
    words = answer_words(tokenizer)
    hits, counts = defaultdict(int), defaultdict(int)
    for chunk in range(0, n_images, 16):
        labels, pixels = _vision_batch(chunk // 16, min(16, n_images - chunk), seed_offset)
        feats, _ = image_features(model, pixels)
        logits = model.lm_head(model.model.language_model.norm(feats))
        for name in ("color", "shape", "char"):
            target = labels[name] - 1
            keep = target >= 0
            pred = logits[..., torch.tensor(words[name])].argmax(-1)
            hits[name] += int((pred[keep] == target[keep]).sum())
            counts[name] += int(keep.sum())
    return {name: hits[name] / max(1, counts[name]) for name in ("color", "shape", "char")}


def load_demo(path: str | os.PathLike | None = None):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    path = Path(path) if path is not None else DEMO_MODEL_DIR
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"no demo model at {path}: train one with `duet-vlm train-demo`")
    model = LlavaForConditionalGeneration.from_pretrained(path, attn_implementation="sdpa")
    processor = AutoProcessor.from_pretrained(path)
    model.eval()
    return model, processor


# ----------------------------------------------------------------------------- training

def _lr_factor(step: int, total: int, warmup: int, min_ratio: float) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


class ThreadTuner:
    """Chooses 1 or ``max_threads`` torch threads from measured step times.

    On a shared 2-core machine two OpenMP threads are ~2x faster than one when the cores are
    idle but several times slower when other processes compete for them (threads wait for each
    other at every barrier).  The tuner runs ``max_threads``, drops to 1 when steps get much
    slower than the best seen, and every ``probe_every`` steps tries the other setting for a few
    steps (aborting after one step if that one is clearly worse), keeping whichever is faster.
    """

    def __init__(self, max_threads: int, probe_every: int = 100, probe_steps: int = 3):
        self.max = max_threads
        self.current = max_threads
        self.probe_every = probe_every
        self.probe_steps = probe_steps
        self.recent: list[float] = []
        self.best: dict[int, float] = {}
        self.probe: dict | None = None

    def _median(self) -> float:
        r = sorted(self.recent[-5:])
        return r[len(r) // 2]

    def threads(self, step: int) -> int:
        if self.max <= 1:
            return 1
        if self.probe is None and step > 0 and step % self.probe_every == 0 and len(self.recent) >= 3:
            other = 1 if self.current != 1 else self.max
            self.probe = {"threads": other, "ref": self._median(), "times": []}
        return self.probe["threads"] if self.probe else self.current

    def record(self, dt: float) -> None:
        if self.probe is not None:
            p = self.probe
            p["times"].append(dt)
            if dt > 2.0 * p["ref"] or len(p["times"]) >= self.probe_steps:
                mean = sum(p["times"]) / len(p["times"])
                if len(p["times"]) >= self.probe_steps and mean < 0.9 * p["ref"]:
                    self.current = p["threads"]
                    self.recent = list(p["times"])
                self.probe = None
            return
        self.recent = (self.recent + [dt])[-5:]
        if len(self.recent) >= 3:
            med = self._median()
            self.best[self.current] = min(self.best.get(self.current, med), med)
            if self.current > 1 and med > 2.0 * self.best[self.current]:
                self.current = 1  # contention: fall back at once, re-probed later
                self.recent = []


def _fmt_time(seconds: float) -> str:
    seconds = int(max(0, seconds))
    return f"{seconds // 3600:d}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def train_demo(output_dir, steps: int = 2400, batch_size: int = 4, n_questions: int = 16, seed: int = 0,
               lr: float = 1.5e-3, warmup_steps: int = 150, min_lr_ratio: float = 0.05,
               weight_decay: float = 0.05, projector_lr_mult: float = 2.0, aux_weight: float = 0.5,
               aux_until: int | None = None, grad_clip: float = 1.0, num_threads: int | str = "auto",
               vision_steps: int = 300, vision_batch_size: int = 16, vision_lr: float = 2e-3,
               scene_curriculum: tuple[tuple[int, int], ...] = ((300, 1), (700, 2), (1100, 3)),
               focus_steps: int = 1400, focus_keep: int = 96, align_words: bool = True,
               keep_visual: int | None = 224, full_visual_steps: int = 200,
               save_every: int = 100, eval_every: int = 600, eval_n: int = 140, log_every: int = 10,
               resume: bool = True, export_dir=None, final_eval_n: int = 700,
               model_overrides: dict | None = None, init_from=None, data_offset: int = 0,
               packed: bool = True, balanced_questions: bool = True, ground_from: int | None = 4,
               ground_weight: float = 0.25, ground_heads: int = 2, position_regression: bool = False,
               log: Callable[[str], None] = print) -> Path:
    """Two phases, both seeded and resumable from ``output_dir/checkpoint.pt``:

    1. ``vision_steps`` steps on the vision tower and projector alone (auxiliary losses only;
       ~10x cheaper per image than a full step because the 32-layer decoder is skipped);
    2. ``steps`` steps of visual QA (answer-token loss + auxiliary losses) on the whole model.
       ``scene_curriculum=((300, 1), (800, 2))`` caps scenes at 1 object before step 300 and
       at 2 before step 800 (with one object, attending to every object patch already answers,
       so the decoder learns to read the image before it must learn to pick an object).
       The first ``focus_steps`` steps show the decoder ``focus_keep`` patches per image, then,
       until the last ``full_visual_steps`` steps, ``keep_visual``; both subsets hold every
       object patch and random background patches (see :func:`language_forward`).  The final
       steps see all 576.

    Each image carries up to ``n_questions`` packed questions, an equal share per question
    type the scene admits (``balanced_questions``).  From decoder layer ``ground_from`` on,
    the first ``ground_heads`` heads are trained to attend from each answer position to what
    the question is about (:func:`grounding_targets`: 0 the named objects, 1 and 3 a relation's
    two objects, 2 the counted objects; :func:`grounding_loss`, weight ``ground_weight``).
    ``position_regression`` adds a per-patch linear regression of the patch's column and row to
    the auxiliary losses, so that positions reach the decoder as numbers it can compare.

    ``init_from`` (an exported model) continues training with a fresh schedule; give it
    ``data_offset`` = the steps already trained on so that it sees new images.
    """
    auto_threads = num_threads in ("auto", 0, None)
    max_threads = min(2, os.cpu_count() or 1) if auto_threads else int(num_threads)
    tuner = ThreadTuner(max_threads) if auto_threads else None
    threads = max_threads
    torch.set_num_threads(threads)
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    export_dir = Path(export_dir) if export_dir is not None else output_dir / "final"
    ckpt_path = output_dir / "checkpoint.pt"
    hparams = dict(steps=steps, batch_size=batch_size, n_questions=n_questions, seed=seed, lr=lr,
                   warmup_steps=warmup_steps, min_lr_ratio=min_lr_ratio, weight_decay=weight_decay,
                   projector_lr_mult=projector_lr_mult, aux_weight=aux_weight, aux_until=aux_until,
                   grad_clip=grad_clip, vision_steps=vision_steps, vision_batch_size=vision_batch_size,
                   vision_lr=vision_lr, scene_curriculum=[list(c) for c in scene_curriculum],
                   focus_steps=focus_steps, focus_keep=focus_keep, align_words=align_words,
                   keep_visual=keep_visual, full_visual_steps=full_visual_steps,
                   packed=packed, balanced_questions=balanced_questions, ground_from=ground_from,
                   ground_weight=ground_weight, ground_heads=ground_heads,
                   position_regression=position_regression,
                   model_overrides=model_overrides or {})
    if init_from is not None:
        hparams["init_from"] = str(init_from)
    if data_offset:
        hparams["data_offset"] = data_offset

    processor = build_processor()
    tok = processor.tokenizer
    config = demo_config(tok, **(model_overrides or {}))
    n_layers = config.text_config.num_hidden_layers
    ground_layers = tuple(range(ground_from, n_layers)) if ground_weight > 0 and ground_from is not None else ()
    if ground_layers and not 1 <= ground_heads <= min(4, config.text_config.num_attention_heads):
        raise ValueError(f"ground_heads must be 1-4 and at most the decoder's heads, got {ground_heads}")
    model = build_model(config, seed=seed)
    if init_from is not None:  # continue training an exported model with a fresh schedule
        from transformers import LlavaForConditionalGeneration

        src = LlavaForConditionalGeneration.from_pretrained(init_from)
        model.load_state_dict(src.state_dict())
        del src
    torch.manual_seed(seed + 1)
    aux = AuxHeads(config.text_config.hidden_size, config.vision_config.hidden_size,
                   words=answer_words(tok) if align_words else None, position_regression=position_regression)
    image_token_id = config.image_token_id

    decay, no_decay, proj = [], [], []
    for name, p in model.named_parameters():
        if "multi_modal_projector" in name:
            proj.append(p)
        elif p.ndim >= 2 and "embed" not in name:
            decay.append(p)
        else:
            no_decay.append(p)
    groups = [
        {"params": decay, "weight_decay": weight_decay, "lr_mult": 1.0},
        {"params": no_decay, "weight_decay": 0.0, "lr_mult": 1.0},
        {"params": proj, "weight_decay": 0.0, "lr_mult": projector_lr_mult},
        {"params": list(aux.parameters()), "weight_decay": 0.0, "lr_mult": projector_lr_mult},
    ]
    opt = torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.98), eps=1e-8)
    vision_params = (list(model.model.vision_tower.parameters()) + proj + list(aux.parameters()))
    vision_opt = torch.optim.AdamW(vision_params, lr=vision_lr, betas=(0.9, 0.98), weight_decay=0.0)

    step = vision_step = 0
    history: list[dict] = []
    if resume and ckpt_path.exists():
        ck = torch.load(ckpt_path, map_location="cpu", weights_only=True)
        if ck.get("hparams") != hparams:
            raise ValueError(f"{ckpt_path} was written with different hyper-parameters:\n"
                             f"  checkpoint: {ck.get('hparams')}\n  now:        {hparams}\n"
                             "use the same arguments, another output_dir, or resume=False")
        model.load_state_dict(ck["model"])
        aux.load_state_dict(ck["aux"])
        opt.load_state_dict(ck["optimizer"])
        vision_opt.load_state_dict(ck["vision_optimizer"])
        step, vision_step = ck["step"], ck["vision_step"]
        history = ck.get("history", [])
        log(f"resumed from {ckpt_path} at vision step {vision_step}/{vision_steps}, step {step}/{steps}")
    else:
        params = count_parameters(model)
        log(f"training from scratch: {params['total'] / 1e6:.2f}M parameters {params}")
        log(f"hparams: {json.dumps(hparams)}")

    def save_checkpoint():
        tmp = ckpt_path.with_suffix(".tmp")
        torch.save({"model": model.state_dict(), "aux": aux.state_dict(), "optimizer": opt.state_dict(),
                    "vision_optimizer": vision_opt.state_dict(), "step": step, "vision_step": vision_step,
                    "hparams": hparams, "history": history}, tmp)
        os.replace(tmp, ckpt_path)

    def set_threads(at: int):
        nonlocal threads
        if tuner is not None:
            new = tuner.threads(at)
            if new != threads:
                threads = new
                torch.set_num_threads(threads)

    model.train()
    window = defaultdict(float)

    # ---- phase 1: vision tower + projector on the auxiliary losses alone
    t0, first = time.time(), vision_step
    while vision_step < vision_steps:
        factor = _lr_factor(vision_step, vision_steps, min(50, vision_steps), min_lr_ratio)
        for g in vision_opt.param_groups:
            g["lr"] = vision_lr * factor
        # images disjoint from phase 2's (those use train indices below steps * batch_size)
        aux_labels, pixels = _vision_batch(vision_step, vision_batch_size, offset=10_000_000)
        feats, cls = image_features(model, pixels)
        aux_loss = aux.loss(feats, cls, aux_labels, model)
        vision_opt.zero_grad(set_to_none=True)
        aux_loss.backward()
        torch.nn.utils.clip_grad_norm_(vision_params, grad_clip)
        vision_opt.step()
        window["aux"] += aux_loss.item()
        window["n"] += 1
        vision_step += 1
        if vision_step % log_every == 0 or vision_step == vision_steps:
            rate = (time.time() - t0) / (vision_step - first)
            log(f"vision step {vision_step}/{vision_steps} | aux {window['aux'] / window['n']:.4f} "
                f"| {rate:.2f} s/step | eta {_fmt_time(rate * (vision_steps - vision_step))}")
            history.append({"vision_step": vision_step, "aux": window["aux"] / window["n"]})
            window.clear()
        if vision_step % save_every == 0 or vision_step == vision_steps:
            save_checkpoint()

    # ---- phase 2: visual QA on the whole model
    t0, start_step = time.time(), step
    sampler = torch.Generator()
    while step < steps:
        set_threads(step)
        t_step = time.time()
        factor = _lr_factor(step, steps, warmup_steps, min_lr_ratio)
        for g in opt.param_groups:
            g["lr"] = lr * factor * g["lr_mult"]
        max_objects = next((cap for until, cap in scene_curriculum if step < until), None)
        batch, aux_labels = make_batch(tok, image_token_id, data_offset + step, batch_size, n_questions,
                                       packed=packed, max_objects=max_objects, balanced=balanced_questions)
        sampler.manual_seed(seed * 1_000_003 + step)  # resumable: the kept patches depend on the step only
        focus = step < focus_steps
        keep = focus_keep if focus else keep_visual if step < steps - full_visual_steps else None
        feats, cls = image_features(model, batch["pixel_values"])
        aux_labels["ground_target"] = aux_labels["ground_target"][:, :, :ground_heads]
        # object patches first: an object covers only ~9 of the 576 patches, so a random
        # subset would often drop the patches a question is about and train on noise
        out = language_forward(model, batch, feats, keep_visual=keep, generator=sampler,
                               priority=aux_labels["color"] > 0,
                               grounding=aux_labels if ground_layers else None, ground_layers=ground_layers)
        out, ground_loss = out if ground_layers else (out, torch.zeros(()))
        loss = out.loss
        use_aux = aux_weight > 0 and (aux_until is None or step < aux_until)
        aux_loss = aux.loss(feats, cls, aux_labels, model) if use_aux else torch.zeros(())
        total = loss + aux_weight * aux_loss if use_aux else loss
        total = total + ground_weight * ground_loss
        opt.zero_grad(set_to_none=True)
        total.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(list(model.parameters()) + list(aux.parameters()), grad_clip)
        opt.step()
        if keep is None:  # logits are aligned with batch["labels"] only when nothing was dropped
            window["acc"] += _answer_accuracy(out.logits, batch["labels"], tok.eos_token_id)
            window["n_acc"] += 1
        window["loss"] += loss.item()
        window["aux"] += float(aux_loss.detach())
        window["ground"] += float(ground_loss.detach())
        window["gnorm"] += float(gnorm)
        window["n"] += 1
        if tuner is not None:
            tuner.record(time.time() - t_step)
        step += 1
        if step % log_every == 0 or step == steps:
            k = window["n"]
            elapsed = time.time() - t0
            rate = elapsed / max(1, step - start_step)
            acc = f"{window['acc'] / window['n_acc']:.3f}" if window["n_acc"] else "-"
            log(f"step {step}/{steps} | loss {window['loss'] / k:.4f} | aux {window['aux'] / k:.4f} "
                f"| ground {window['ground'] / k:.3f} "
                f"| answer-acc {acc} | gnorm {window['gnorm'] / k:.2f} | visual {keep or N_IMAGE_TOKENS} "
                f"| lr {lr * factor:.2e} | thr {threads} | {rate:.2f} s/step ({rate / batch_size:.3f} s/img) "
                f"| elapsed {_fmt_time(elapsed)} | eta {_fmt_time(rate * (steps - step))}")
            history.append({"step": step, "loss": window["loss"] / k, "aux": window["aux"] / k,
                            "ground": window["ground"] / k})
            window.clear()
        if eval_every and step % eval_every == 0 and step < steps:
            res = evaluate_accuracy(model, processor, split="validation", n=eval_n)
            log(f"val step {step}: acc {res['accuracy']:.3f} " +
                " ".join(f"{t}={a:.2f}" for t, a in res["per_type"].items()))
            history.append({"step": step, "val_acc": res["accuracy"], "val_per_type": res["per_type"]})
        if step % save_every == 0 or step == steps:
            save_checkpoint()

    # ---- export + final evaluation
    model.eval()
    export_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(export_dir, safe_serialization=True)
    processor.save_pretrained(export_dir)
    log(f"saved model + processor to {export_dir}")
    metrics = {"hparams": hparams, "parameters": count_parameters(model), "steps": step,
               "vision_steps": vision_step, "images_seen": step * batch_size + vision_step * vision_batch_size,
               "qa_pairs_seen_approx": step * batch_size * n_questions}
    source_metrics = Path(init_from) / "metrics.json" if init_from is not None else None
    if source_metrics is not None and source_metrics.exists():  # the model card describes both stages
        earlier = json.loads(source_metrics.read_text())
        metrics["continues"] = {k: earlier.get(k) for k in ("hparams", "steps", "vision_steps", "continues")}
    if final_eval_n:
        prog = lambda s: None  # noqa: E731
        metrics["test"] = evaluate_accuracy(model, processor, split="test", n=final_eval_n, progress=prog)
        metrics["test_blank_image"] = evaluate_accuracy(model, processor, split="test", n=final_eval_n,
                                                        blank_image=True, progress=prog)
        metrics["patch_word_probe"] = patch_word_probe(model, tok)
        for key in ("test", "test_blank_image"):
            r = metrics[key]
            log(f"{key}: acc {r['accuracy']:.3f} " + " ".join(f"{t}={a:.2f}" for t, a in r["per_type"].items()))
    (export_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    write_model_card(export_dir)
    (output_dir / "metrics.json").write_text(json.dumps({**metrics, "history": history}, indent=2))
    return export_dir


def _vision_batch(step: int, batch_size: int, offset: int):
    """``(auxiliary targets, pixel values)`` of ``batch_size`` fresh scenes (no questions)."""
    images, labels = [], defaultdict(list)
    for b in range(batch_size):
        rng = data.rng_for("train", offset + step * batch_size + b, stream=2)
        scene = data.make_scene(rng)
        images.append(data.render_scene(scene, rng))
        for k, v in aux_targets(scene).items():
            labels[k].append(v)
    return {k: torch.stack(v) for k, v in labels.items()}, pixel_values(images)


@torch.no_grad()
def _answer_accuracy(logits: torch.Tensor, labels: torch.Tensor, eos_id: int) -> float:
    """Next-token accuracy on answer words (the always-easy ``</s>`` after each is left out)."""
    target = labels[:, 1:]
    scored = (target != -100) & (target != eos_id)
    hits = (logits[:, :-1].argmax(-1) == target) & scored
    return hits.sum().item() / max(1, scored.sum().item())


# hparams whose command-line flag is a switch: (flag, the value the switch sets)
_SWITCHES = {"align_words": ("--no-align-words", False), "balanced_questions": ("--no-balanced-questions", False),
             "position_regression": ("--position-regression", True)}


def _train_command(hparams: dict, output_dir: str, init_from: str | None = None) -> str:
    """The command that trains with ``hparams``: ``duet-vlm train-demo`` when they are all
    defaults, else ``python -m duet_vlm.demo.train`` with a flag for each setting that is not.
    Settings without a flag that differ from :func:`train_demo`'s defaults are appended as a
    comment: the command alone would not reproduce them."""
    import inspect

    defaults = {a.dest: a.default for a in build_parser()._actions}
    signature = inspect.signature(train_demo).parameters
    flags, other = [], []
    for name, value in hparams.items():
        if name == "init_from":
            continue
        if name in _SWITCHES:
            flag, on = _SWITCHES[name]
            if value == on:
                flags.append(flag)
        elif name in defaults:
            default = defaults[name]
            if name == "ground_from" and value is None:
                value = -1
            if name == "scene_curriculum":
                default = [list(c) for c in default]
            if value != default and not (name == "model_overrides" and not value):
                text = json.dumps(value) if isinstance(value, (list, dict)) else str(value)
                flags.append(f"--{name.replace('_', '-')} " + (f"'{text}'" if isinstance(value, (list, dict)) else text))
        elif name in signature and value != signature[name].default:
            other.append(f"{name}={value!r}")
    if init_from is not None:
        flags.insert(0, f"--init-from {init_from}")
    if flags:
        command = f"python -m duet_vlm.demo.train --output-dir {output_dir} " + " ".join(flags)
    else:
        command = f"duet-vlm train-demo --output-dir {output_dir}"
    return command + (f"  # and train_demo({', '.join(other)})" if other else "")


def reproduce_commands(metrics: dict) -> list[str]:
    """Shell commands that retrain the model ``metrics`` (an exported ``metrics.json``)
    describes, with ``runs/demo`` (and, for a continued model, ``runs/demo2``) as output
    directories."""
    earlier = metrics.get("continues")
    if not earlier:
        return [_train_command(metrics["hparams"], "runs/demo")]
    return [_train_command(earlier["hparams"], "runs/demo"),
            _train_command(metrics["hparams"], "runs/demo2", init_from="runs/demo/final")]


def write_model_card(export_dir) -> Path:
    """Write ``README.md`` (config, training recipe, accuracies from ``metrics.json``) next to
    an exported demo model."""
    from transformers import AutoConfig

    export_dir = Path(export_dir)
    cfg = AutoConfig.from_pretrained(export_dir)
    metrics = json.loads((export_dir / "metrics.json").read_text()) if (export_dir / "metrics.json").exists() else {}
    v, t = cfg.vision_config, cfg.text_config
    lines = [
        "# duet-vlm demo LLaVA model",
        "",
        "A tiny LLaVA-1.5-architecture model (`LlavaForConditionalGeneration`) trained from scratch on the",
        "offline synthetic visual-QA benchmark of `duet_vlm.demo.data`. Load it like any llava-hf checkpoint:",
        "",
        "```python",
        "from transformers import AutoProcessor, LlavaForConditionalGeneration",
        "model = LlavaForConditionalGeneration.from_pretrained(path)",
        "processor = AutoProcessor.from_pretrained(path)",
        "```",
        "",
        "## Architecture",
        f"- vision tower: CLIP, {v.image_size} px / patch {v.patch_size} -> {(v.image_size // v.patch_size) ** 2} patches + CLS, "
        f"{v.num_hidden_layers} layers, hidden {v.hidden_size}",
        f"- `vision_feature_layer={cfg.vision_feature_layer}`, `vision_feature_select_strategy={cfg.vision_feature_select_strategy!r}`, "
        f"2-layer {cfg.projector_hidden_act} projector",
        f"- language model: Llama, {t.num_hidden_layers} layers, hidden {t.hidden_size}, {t.num_attention_heads} heads, "
        f"vocab {t.vocab_size} (word level)",
        f"- `image_token_id={cfg.image_token_id}`; the processor expands `<image>` into {cfg.image_seq_length} tokens",
    ]
    if metrics.get("parameters"):
        lines.append(f"- parameters: {metrics['parameters']}")
    if metrics.get("continues"):
        earlier = metrics["continues"]
        lines += ["", "## Training, stage 1",
                  f"- {earlier.get('vision_steps')} vision-only steps on the auxiliary losses (the colour, shape and "
                  "character under each patch, the scene's contents from CLS, word alignment of object patches "
                  f"through `lm_head`), then {earlier.get('steps')} visual-QA steps as in stage 2 below, with the "
                  "scene-size curriculum, on the first visual-QA images",
                  f"- hyper-parameters: `{json.dumps(earlier.get('hparams'))}` (a setting missing here has "
                  "the default of `train_demo`)"]
    if metrics.get("hparams"):
        h = metrics["hparams"]
        lines += ["", "## Training, stage 2 (continued from stage 1 on new images)" if metrics.get("continues")
                  else "## Training"]
        if h.get("vision_steps"):
            lines.append(
                  f"- phase 1: {metrics.get('vision_steps', 0)} steps of {h.get('vision_batch_size')} images on the vision "
                  "tower and projector alone, with training-only auxiliary heads (not shipped): the colour, shape "
                  "and character under each patch, and from the CLS token which colours, shapes and characters "
                  "the scene holds (so that CLS attention lands on the objects, as in a real CLIP)"
                  + ("; plus word alignment: read through the decoder's final norm and `lm_head`, each object "
                     "patch names its colour, shape, character and quadrant (LLaVA stage-1 style feature alignment)"
                     if h.get("align_words") else ""))
        lines += [f"- {'phase 2' if h.get('vision_steps') else 'visual QA'}: {metrics.get('steps')} steps of {h.get('batch_size')} images x up to {h.get('n_questions')} "
                  f"independent questions packed behind one image prefix (~{metrics.get('qa_pairs_seen_approx')} QA "
                  "pairs); loss on answer tokens plus the auxiliary losses; scenes capped at "
                  f"[until step, objects] {h.get('scene_curriculum')}; the decoder sees {h.get('focus_keep')} patches "
                  f"per image for {h.get('focus_steps')} steps, then {h.get('keep_visual')}, object patches first and the "
                  f"rest random, and all 576 in the last {h.get('full_visual_steps')} steps"
                  + ("; each image's questions are shared equally among the question types its scene admits"
                     if h.get("balanced_questions") else ""),
                  ]
        if h.get("ground_from") is not None and h.get("ground_weight", 0) > 0:
            lines.append(
                f"- grounding loss (weight {h['ground_weight']}), from decoder layer {h['ground_from']} on: head 0 "
                "learns to attend from each answer position to the patches of the object(s) the question names"
                + (", head 1 to a relation's first object" if h.get("ground_heads", 2) > 1 else "")
                + (", head 2 to spread its attention over the counted objects and `<s>`" if h.get("ground_heads", 2) > 2 else "")
                + (", head 3 to the second object of a relation" if h.get("ground_heads", 2) > 3 else "")
                + " (training only: the shipped weights are a plain LLaVA)")
        if h.get("position_regression"):
            lines.append("- each patch's column and row are also regressed linearly from its projected feature")
        lines += [f"- hyper-parameters: `{json.dumps(h)}`",
                  "- reproduce (seeded; re-running a command resumes it):", "", "```bash",
                  *reproduce_commands(metrics), "```"]
    for key, title in (("test", "all 576 visual tokens"), ("test_blank_image", "blank (grey) image control")):
        if key in metrics:
            r = metrics[key]
            lines += ["", f"## Test accuracy, {title} (n={r['n']})", "", "| type | accuracy | chance |", "|---|---|---|",
                      f"| **overall** | **{r['accuracy']:.3f}** | |"]
            lines += [f"| {q} | {a:.3f} | {r['chance'][q]:.3f} |" for q, a in r["per_type"].items()]
    if "patch_word_probe" in metrics:
        probe = metrics["patch_word_probe"]
        lines += ["", "## Perception probe (`patch_word_probe`)",
                  "Share of object patches of fresh scenes that, read through the decoder's final norm and "
                  "`lm_head`, name their object's colour / shape / character: "
                  + ", ".join(f"{k} {v:.3f}" for k, v in probe.items())]
    path = export_dir / "README.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Train the duet-vlm demo LLaVA model on synthetic visual QA.")
    p.add_argument("--output-dir", required=True)
    p.add_argument("--export-dir", default=None)
    p.add_argument("--steps", type=int, default=2400)
    p.add_argument("--vision-steps", type=int, default=300)
    p.add_argument("--keep-visual", type=int, default=224,
                   help="patches per image (object patches first) the decoder sees after the focus steps, "
                        "before the final full-token steps")
    p.add_argument("--full-visual-steps", type=int, default=200)
    p.add_argument("--focus-steps", type=int, default=1400,
                   help="first steps whose decoder input is focus-keep patches, object patches first")
    p.add_argument("--focus-keep", type=int, default=96)
    p.add_argument("--scene-curriculum", type=json.loads, default=[[300, 1], [700, 2], [1100, 3]],
                   help='JSON [[until_step, max_objects], ...], e.g. [[300, 1], [800, 2]]')
    p.add_argument("--vision-batch-size", type=int, default=16)
    p.add_argument("--no-align-words", action="store_true", help="drop the word-alignment auxiliary loss")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--n-questions", type=int, default=16)
    p.add_argument("--lr", type=float, default=1.5e-3)
    p.add_argument("--warmup-steps", type=int, default=150)
    p.add_argument("--aux-weight", type=float, default=0.5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", default="auto",
                   help="torch threads: an integer, or 'auto' (2, dropping to 1 while the machine is busy)")
    p.add_argument("--save-every", type=int, default=100)
    p.add_argument("--eval-every", type=int, default=600)
    p.add_argument("--eval-n", type=int, default=140)
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--final-eval-n", type=int, default=700)
    p.add_argument("--model-overrides", type=json.loads, default=None, help="JSON dict for demo_config")
    p.add_argument("--init-from", default=None, help="exported model dir to continue training from")
    p.add_argument("--data-offset", type=int, default=0,
                   help="start the visual-QA data at this step (continuing a model trained on the first ones)")
    p.add_argument("--no-balanced-questions", action="store_true",
                   help="distinct questions only (reading then gets ~5%% of the turns instead of ~1/7)")
    p.add_argument("--ground-from", type=int, default=4,
                   help="first decoder layer whose heads 0/1 get the grounding loss (-1: none)")
    p.add_argument("--ground-weight", type=float, default=0.25)
    p.add_argument("--ground-heads", type=int, default=2,
                   help="grounding heads per layer (1-4: named objects, relation's first object, counted "
                        "objects, relation's second object)")
    p.add_argument("--position-regression", action="store_true",
                   help="also regress each patch's column and row (linear) from its projected feature")
    p.add_argument("--no-resume", action="store_true")
    return p


def main(argv=None) -> None:
    a = build_parser().parse_args(argv)

    def log(msg):
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)

    train_demo(a.output_dir, steps=a.steps, batch_size=a.batch_size, n_questions=a.n_questions,
               seed=a.seed, lr=a.lr, warmup_steps=a.warmup_steps, aux_weight=a.aux_weight,
               vision_steps=a.vision_steps, vision_batch_size=a.vision_batch_size, keep_visual=a.keep_visual,
               full_visual_steps=a.full_visual_steps, focus_steps=a.focus_steps, focus_keep=a.focus_keep,
               scene_curriculum=tuple(tuple(c) for c in a.scene_curriculum), align_words=not a.no_align_words,
               num_threads=a.threads if a.threads == "auto" else int(a.threads), save_every=a.save_every, eval_every=a.eval_every, eval_n=a.eval_n, log_every=a.log_every,
               resume=not a.no_resume, export_dir=a.export_dir, final_eval_n=a.final_eval_n,
               model_overrides=a.model_overrides, init_from=a.init_from, data_offset=a.data_offset,
               balanced_questions=not a.no_balanced_questions,
               ground_from=None if a.ground_from < 0 else a.ground_from, ground_weight=a.ground_weight,
               ground_heads=a.ground_heads, position_regression=a.position_regression, log=log)


if __name__ == "__main__":
    main()
