"""Evaluation of demo models on the synthetic visual-QA benchmark (no training code here).

``duet-vlm eval``, ``duet-vlm demo``, the model card and the training recipe's validation all call
these functions.

>>> model, processor = load_demo()                                                    # doctest: +SKIP
>>> evaluate_accuracy(model, processor, n=70)["accuracy"]                             # doctest: +SKIP
>>> evaluate_accuracy(model, processor, n=70, wrap=lambda: duet_vlm.Duet(budget=64)(model))  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import os
from collections import Counter, defaultdict
from pathlib import Path
from typing import Callable

import torch

from .. import synthetic
from .processor import IMAGE, prompt

DEMO_MODEL_DIR = Path(__file__).resolve().parent.parent / "assets" / "demo_model"
#: The second demo model (Qwen2.5-VL's architecture: no CLS token, a 2x2 merger, M-RoPE).
QWEN_DEMO_MODEL_DIR = Path(__file__).resolve().parent.parent / "assets" / "demo_model_qwen2_5_vl"
#: The shipped demo models by name (``duet-vlm demo --model``, ``duet-vlm eval --model``).
DEMO_MODELS = {"llava": DEMO_MODEL_DIR, "qwen2_5_vl": QWEN_DEMO_MODEL_DIR}


def normalise_answer(text: str) -> str:
    """The first word of a generated answer, lower-case, without surrounding punctuation.

    >>> normalise_answer(" Red. ")
    'red'
    """
    return text.strip().lower().strip(" .!?,").split(" ")[0] if text.strip() else ""


_normalise = normalise_answer  # the name test_lmms_eval and older notebooks import


def demo_model_dir(name_or_path: str | os.PathLike | None = None) -> Path:
    """The folder of a shipped demo model by name (``DEMO_MODELS``: ``"llava"``, the default, or
    ``"qwen2_5_vl"``), or ``name_or_path`` itself."""
    if name_or_path is None:
        return DEMO_MODEL_DIR
    return DEMO_MODELS.get(str(name_or_path), Path(name_or_path))


def shipped_or_given(demo: str, model_path: str | os.PathLike | None) -> Path:
    """The folder ``duet-vlm demo`` / ``eval`` run: ``model_path`` when given, else the shipped model named
    ``demo`` (``DEMO_MODELS``); a name not shipped, or both given, is refused."""
    if demo not in DEMO_MODELS:
        raise ValueError(f"--model must be one of the shipped demo models {', '.join(DEMO_MODELS)}, got {demo!r}")
    if model_path is not None and demo != "llava":
        raise ValueError("give --model-path (a demo model directory) or --model (a shipped one), not both")
    return Path(model_path) if model_path is not None else DEMO_MODELS[demo]


def load_demo(path: str | os.PathLike | None = None):
    """``(model, processor)`` of a shipped demo model (``None``: the first; or a name of ``DEMO_MODELS``),
    or of the exported model at ``path``.

    >>> model, processor = load_demo()                                  # doctest: +SKIP
    >>> model, processor = load_demo("qwen2_5_vl")                      # doctest: +SKIP
    """
    from transformers import AutoModelForImageTextToText

    from ..compare import load_processor

    path = demo_model_dir(path)
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"no demo model at {path}: train one with `duet-vlm train-demo`")
    model = AutoModelForImageTextToText.from_pretrained(path, attn_implementation="sdpa")
    processor = load_processor(str(path))
    model.eval()
    return model, processor


def question_prompt(processor, question: str) -> str:
    """The single-turn prompt a demo model was trained on, for its processor: ``USER: <image>\n{question}
    ASSISTANT:`` (Qwen's ``<|vision_start|><|image_pad|><|vision_end|>`` for ``<image>``)."""
    image_token = getattr(processor, "image_token", IMAGE)
    if image_token == IMAGE:
        return prompt(question)
    from .qwen import qwen_prompt

    return qwen_prompt(question)


def row_tokens(reducer, rows: int) -> list[float]:
    """The visual tokens per layer (averaged over layers) each of ``rows`` rows kept in the
    reducer's last prefill: the sum over the row's items of ``ItemStats.average_tokens``."""
    kept = [0.0] * rows
    for item in reducer.stats.items:
        kept[item.row] += item.average_tokens
    return kept


@torch.no_grad()
def evaluate_accuracy(model, processor, split: str = "test", n: int = 700, blank_image: bool = False,
                      wrap: Callable[[], contextlib.AbstractContextManager] | None = None,
                      batch_size: int = 8, max_new_tokens: int = 3, start: int = 0,
                      return_predictions: bool = False, progress: Callable[[str], None] | None = None,
                      reducer=None) -> dict:
    """Greedy-generation exact-match accuracy on samples ``start .. start + n`` of ``split``.

    Question types are balanced when ``n`` is a multiple of 7. ``wrap`` is a zero-argument callable
    returning a context manager entered around all generation, e.g. ``wrap=lambda: reducer(model)``.
    ``blank_image=True`` replaces every image by a uniform grey one (the "no vision" control).
    Returns ``{"accuracy", "n", "per_type", "per_type_n", "per_objects", "per_objects_n", "chance",
    "top_answer", "blank_image", "split"}`` (+ ``"predictions"`` if asked: each question's index,
    type, objects in its scene, answer, prediction and correctness). ``per_objects``: accuracy by
    the number of objects in the scene. ``reducer``: the reducer ``wrap`` attaches; each prediction
    then records the visual tokens per layer its image kept (``visual_tokens``, from
    ``reducer.stats.items``).

    >>> evaluate_accuracy(model, processor, n=14)["per_type"]["color"]    # doctest: +SKIP
    """
    wrap = wrap or contextlib.nullcontext
    was_training = model.training
    model.eval()
    tok = processor.tokenizer
    correct, total = defaultdict(int), defaultdict(int)
    by_objects, by_objects_n = defaultdict(int), defaultdict(int)
    answered = defaultdict(Counter)
    preds = []
    blank = synthetic.blank_image() if blank_image else None
    with wrap():
        for lo in range(start, start + n, batch_size):
            samples = [synthetic.sample(split, i) for i in range(lo, min(lo + batch_size, start + n))]
            images = [blank if blank is not None else s.image for s in samples]
            inputs = processor(images=images, text=[question_prompt(processor, s.question) for s in samples],
                               padding=True, return_tensors="pt")
            out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
            new = out[:, inputs["input_ids"].shape[1]:]
            tokens = row_tokens(reducer, len(samples)) if reducer is not None else [None] * len(samples)
            for s, row, kept in zip(samples, new, tokens):
                pred = normalise_answer(tok.decode(row, skip_special_tokens=True))
                ok = pred == s.answer
                correct[s.qtype] += ok
                total[s.qtype] += 1
                by_objects[len(s.scene)] += ok
                by_objects_n[len(s.scene)] += 1
                answered[s.qtype][pred] += 1
                if return_predictions:
                    preds.append({"index": s.index, "qtype": s.qtype, "objects": len(s.scene), "question": s.question,
                                  "answer": s.answer, "prediction": pred, "correct": bool(ok)})
                    if kept is not None:
                        preds[-1]["visual_tokens"] = kept
            if progress is not None:
                done = sum(total.values())
                progress(f"eval {split}{' (blank)' if blank_image else ''}: {done}/{n} "
                         f"acc={sum(correct.values()) / done:.3f}")
    if was_training:
        model.train()
    n_done = sum(total.values())
    types = [t for t in synthetic.QUESTION_TYPES if total[t]]
    result = {
        "split": split,
        "blank_image": blank_image,
        "n": n_done,
        "accuracy": sum(correct.values()) / max(n_done, 1),
        "per_type": {t: correct[t] / total[t] for t in types},
        "per_type_n": {t: total[t] for t in types},
        "per_objects": {str(k): by_objects[k] / by_objects_n[k] for k in sorted(by_objects_n)},
        "per_objects_n": {str(k): by_objects_n[k] for k in sorted(by_objects_n)},
        "chance": {t: synthetic.CHANCE[t] for t in types},
        # a model that answers one word to every question of a type has not learned that type
        "top_answer": {t: [word, count / total[t]] for t in types for word, count in answered[t].most_common(1)},
    }
    if return_predictions:
        result["predictions"] = preds
    return result


@torch.no_grad()
def patch_word_probe(model, tokenizer, n_images: int = 64, seed_offset: int = 60_000_000) -> dict[str, float]:
    """Share of object patches of ``n_images`` fresh scenes that, read through the decoder's own
    final norm and ``lm_head``, name their object's colour and shape, and (on the patch a character
    is drawn in) the character. Near 1 means the vision tower perceives what the questions ask.

    >>> patch_word_probe(model, processor.tokenizer, n_images=16)        # doctest: +SKIP
    {'color': 0.99, 'shape': 0.97, 'char': 1.0}
    """
    from .batching import vision_batch
    from .geometry import geometry_of
    from .objectives import answer_words, image_features

    words = answer_words(tokenizer)
    hits, counts = defaultdict(int), defaultdict(int)
    for chunk in range(0, n_images, 16):
        labels, pixels = vision_batch(chunk // 16, min(16, n_images - chunk), seed_offset, geometry_of(model))
        feats, _ = image_features(model, pixels)
        logits = model.lm_head(model.model.language_model.norm(feats))
        for name in ("color", "shape", "char"):
            target = labels[name] - 1
            keep = target >= 0
            pred = logits[..., torch.tensor(words[name])].argmax(-1)
            hits[name] += int((pred[keep] == target[keep]).sum())
            counts[name] += int(keep.sum())
    return {name: hits[name] / max(1, counts[name]) for name in ("color", "shape", "char")}


def model_card_metrics(model, processor, n: int = 700, batch_size: int = 8,
                       progress: Callable[[str], None] | None = None) -> dict:
    """The numbers a demo model card reports: test accuracy with all tokens and with the image
    blanked (``n`` questions each) and the perception probe.

    >>> model_card_metrics(model, processor, n=70)["test"]["accuracy"]   # doctest: +SKIP
    """
    return {
        "test": evaluate_accuracy(model, processor, split="test", n=n, batch_size=batch_size, progress=progress),
        "test_blank_image": evaluate_accuracy(model, processor, split="test", n=n, batch_size=batch_size,
                                              blank_image=True, progress=progress),
        "patch_word_probe": patch_word_probe(model, processor.tokenizer),
    }
