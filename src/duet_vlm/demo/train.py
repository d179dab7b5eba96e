"""Train and evaluate the shipped demo LLaVA model on the synthetic visual-QA benchmark.

Public functions (plain Python; CLI wiring lives elsewhere):

``train_demo(output_dir, steps=5000, batch_size=4, n_questions=8, seed=0, lr=1.5e-3,
             warmup_steps=200, min_lr_ratio=0.05, weight_decay=0.05, projector_lr_mult=2.0,
             aux_weight=0.5, aux_until=None, grad_clip=1.0, num_threads="auto", save_every=100,
             eval_every=500, eval_n=140, log_every=10, resume=True, export_dir=None,
             final_eval_n=700, model_overrides=None, init_from=None, log=print) -> pathlib.Path``
    Trains from scratch (seeded; the data of step ``s`` is a pure function of ``s``), writes a
    resumable ``checkpoint.pt`` to ``output_dir`` every ``save_every`` steps (re-running the same
    call resumes from it), and finally saves model + processor with ``save_pretrained`` to
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
from collections import defaultdict
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

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


def make_batch(tokenizer, image_token_id: int, step: int, batch_size: int, n_questions: int,
               split: str = "train", packed: bool = True):
    images, seqs, aux = [], [], defaultdict(list)
    for b in range(batch_size):
        image, turns, scene = data.conversation(split, step * batch_size + b, n_questions)
        images.append(image)
        if packed:
            seqs.append(encode_packed(tokenizer, turns, image_token_id))
        else:
            ids, lab = encode_conversation(tokenizer, turns, image_token_id)
            seqs.append((ids, lab, [0] * len(ids), list(range(len(ids)))))
        for k, v in data.patch_labels(scene).items():
            aux[k].append(torch.from_numpy(v))
    length = max(len(s[0]) for s in seqs)
    pad = tokenizer.pad_token_id
    input_ids = torch.full((batch_size, length), pad, dtype=torch.long)
    labels = torch.full((batch_size, length), -100, dtype=torch.long)
    mask = torch.zeros((batch_size, length), dtype=torch.long)
    segments = torch.full((batch_size, length), -1, dtype=torch.long)
    positions = torch.zeros((batch_size, length), dtype=torch.long)
    for b, (ids, lab, seg, pos) in enumerate(seqs):
        n = len(ids)
        input_ids[b, :n] = torch.tensor(ids)
        labels[b, :n] = torch.tensor(lab)
        mask[b, :n] = 1
        segments[b, :n] = torch.tensor(seg)
        positions[b, :n] = torch.tensor(pos)
    batch = {"input_ids": input_ids, "labels": labels, "pixel_values": pixel_values(images)}
    if packed:
        batch["attention_mask"] = packed_attention_mask(segments)
        batch["position_ids"] = positions
    else:
        batch["attention_mask"] = mask
    return batch, {k: torch.stack(v) for k, v in aux.items()}


class AuxHeads(nn.Module):
    """Training-only per-patch classifiers on the projector output (never shipped).

    Dense supervision (colour / shape / character under each patch) makes the tiny vision
    tower learn in a CPU budget; the shipped model is a plain LLaVA.
    """

    def __init__(self, hidden: int):
        super().__init__()
        self.color = nn.Linear(hidden, len(data.COLOR_NAMES) + 1)
        self.shape = nn.Linear(hidden, len(data.SHAPES) + 1)
        self.char = nn.Linear(hidden, len(data.CHARACTERS) + 1)

    def loss(self, feats: torch.Tensor, labels: dict[str, torch.Tensor]) -> torch.Tensor:
        total = 0.0
        for name in ("color", "shape", "char"):
            logits = getattr(self, name)(feats)
            total = total + F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[name].reshape(-1))
        return total / 3


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
    }
    if return_predictions:
        result["predictions"] = preds
    return result


def load_demo(path: str | os.PathLike | None = None):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    path = Path(path) if path is not None else DEMO_MODEL_DIR
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"no demo model at {path} (train one with duet_vlm.demo.train.train_demo)")
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


def train_demo(output_dir, steps: int = 5000, batch_size: int = 4, n_questions: int = 8, seed: int = 0,
               lr: float = 1.5e-3, warmup_steps: int = 200, min_lr_ratio: float = 0.05,
               weight_decay: float = 0.05, projector_lr_mult: float = 2.0, aux_weight: float = 0.5,
               aux_until: int | None = None, grad_clip: float = 1.0, num_threads: int | str = "auto",
               save_every: int = 100, eval_every: int = 500, eval_n: int = 140, log_every: int = 10,
               resume: bool = True, export_dir=None, final_eval_n: int = 700,
               model_overrides: dict | None = None, init_from=None, packed: bool = True,
               log: Callable[[str], None] = print) -> Path:
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
                   grad_clip=grad_clip, model_overrides=model_overrides or {})
    if packed:
        hparams["packed"] = True
    if init_from is not None:
        hparams["init_from"] = str(init_from)

    processor = build_processor()
    tok = processor.tokenizer
    config = demo_config(tok, **(model_overrides or {}))
    model = build_model(config, seed=seed)
    if init_from is not None:  # continue training an exported model with a fresh schedule
        from transformers import LlavaForConditionalGeneration

        src = LlavaForConditionalGeneration.from_pretrained(init_from)
        model.load_state_dict(src.state_dict())
        del src
    torch.manual_seed(seed + 1)
    aux = AuxHeads(config.text_config.hidden_size)
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

    step = 0
    history: list[dict] = []
    if resume and ckpt_path.exists():
        ck = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        if ck.get("hparams") != hparams:
            raise ValueError(f"{ckpt_path} was written with different hyper-parameters:\n"
                             f"  checkpoint: {ck.get('hparams')}\n  now:        {hparams}\n"
                             "use the same arguments, another output_dir, or resume=False")
        model.load_state_dict(ck["model"])
        aux.load_state_dict(ck["aux"])
        opt.load_state_dict(ck["optimizer"])
        step = ck["step"]
        history = ck.get("history", [])
        log(f"resumed from {ckpt_path} at step {step}/{steps}")
    else:
        params = count_parameters(model)
        log(f"training from scratch: {params['total'] / 1e6:.2f}M parameters {params}")
        log(f"hparams: {json.dumps(hparams)}")

    feats_box: dict[str, torch.Tensor] = {}
    hook = model.model.multi_modal_projector.register_forward_hook(
        lambda _m, _i, out: feats_box.__setitem__("feats", out))

    def save_checkpoint():
        tmp = ckpt_path.with_suffix(".tmp")
        torch.save({"model": model.state_dict(), "aux": aux.state_dict(), "optimizer": opt.state_dict(),
                    "step": step, "hparams": hparams, "history": history}, tmp)
        os.replace(tmp, ckpt_path)

    model.train()
    t0 = time.time()
    start_step = step
    window = defaultdict(float)
    while step < steps:
        if tuner is not None:
            new = tuner.threads(step)
            if new != threads:
                threads = new
                torch.set_num_threads(threads)
        t_step = time.time()
        factor = _lr_factor(step, steps, warmup_steps, min_lr_ratio)
        for g in opt.param_groups:
            g["lr"] = lr * factor * g["lr_mult"]
        batch, aux_labels = make_batch(tok, image_token_id, step, batch_size, n_questions, packed=packed)
        out = model(**batch)
        loss = out.loss
        use_aux = aux_weight > 0 and (aux_until is None or step < aux_until)
        aux_loss = aux.loss(feats_box["feats"], aux_labels) if use_aux else torch.zeros(())
        total = loss + aux_weight * aux_loss if use_aux else loss
        opt.zero_grad(set_to_none=True)
        total.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(list(model.parameters()) + list(aux.parameters()), grad_clip)
        opt.step()
        with torch.no_grad():
            lab = batch["labels"][:, 1:]
            pred = out.logits[:, :-1].argmax(-1)
            m = lab != -100
            window["acc"] += ((pred == lab) & m).sum().item() / max(1, m.sum().item())
        window["loss"] += loss.item()
        window["aux"] += float(aux_loss.detach())
        window["gnorm"] += float(gnorm)
        window["n"] += 1
        if tuner is not None:
            tuner.record(time.time() - t_step)
        step += 1
        if step % log_every == 0 or step == steps:
            k = window["n"]
            elapsed = time.time() - t0
            rate = elapsed / max(1, step - start_step)
            log(f"step {step}/{steps} | loss {window['loss'] / k:.4f} | aux {window['aux'] / k:.4f} "
                f"| tok-acc {window['acc'] / k:.3f} | gnorm {window['gnorm'] / k:.2f} "
                f"| lr {lr * factor:.2e} | thr {threads} | {rate:.2f} s/step ({rate / batch_size:.3f} s/img) "
                f"| elapsed {_fmt_time(elapsed)} | eta {_fmt_time(rate * (steps - step))}")
            history.append({"step": step, "loss": window["loss"] / k, "aux": window["aux"] / k,
                            "tok_acc": window["acc"] / k})
            window.clear()
        if eval_every and step % eval_every == 0 and step < steps:
            res = evaluate_accuracy(model, processor, split="validation", n=eval_n)
            log(f"val step {step}: acc {res['accuracy']:.3f} " +
                " ".join(f"{t}={a:.2f}" for t, a in res["per_type"].items()))
            history.append({"step": step, "val_acc": res["accuracy"], "val_per_type": res["per_type"]})
        if step % save_every == 0 or step == steps:
            save_checkpoint()
    hook.remove()

    # ---- export + final evaluation
    model.eval()
    export_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(export_dir, safe_serialization=True)
    processor.save_pretrained(export_dir)
    log(f"saved model + processor to {export_dir}")
    metrics = {"hparams": hparams, "parameters": count_parameters(model), "steps": step,
               "images_seen": step * batch_size, "qa_pairs_seen_approx": step * batch_size * n_questions}
    if final_eval_n:
        prog = lambda s: None  # noqa: E731
        metrics["test"] = evaluate_accuracy(model, processor, split="test", n=final_eval_n, progress=prog)
        metrics["test_blank_image"] = evaluate_accuracy(model, processor, split="test", n=final_eval_n,
                                                        blank_image=True, progress=prog)
        for key in ("test", "test_blank_image"):
            r = metrics[key]
            log(f"{key}: acc {r['accuracy']:.3f} " + " ".join(f"{t}={a:.2f}" for t, a in r["per_type"].items()))
    (export_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    write_model_card(export_dir)
    (output_dir / "metrics.json").write_text(json.dumps({**metrics, "history": history}, indent=2))
    return export_dir


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
    if metrics.get("hparams"):
        lines += ["", "## Training", f"- {metrics.get('steps')} steps, {metrics.get('images_seen')} images, "
                  f"~{metrics.get('qa_pairs_seen_approx')} QA pairs (multi-turn conversations)",
                  f"- hyper-parameters: `{json.dumps(metrics['hparams'])}`",
                  "- loss on answer tokens only, plus a training-only per-patch auxiliary loss (not shipped)"]
    for key, title in (("test", "all 576 visual tokens"), ("test_blank_image", "blank (grey) image control")):
        if key in metrics:
            r = metrics[key]
            lines += ["", f"## Test accuracy, {title} (n={r['n']})", "", "| type | accuracy | chance |", "|---|---|---|",
                      f"| **overall** | **{r['accuracy']:.3f}** | |"]
            lines += [f"| {q} | {a:.3f} | {r['chance'][q]:.3f} |" for q, a in r["per_type"].items()]
    path = export_dir / "README.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description="Train the duet-vlm demo LLaVA model on synthetic visual QA.")
    p.add_argument("--output-dir", required=True)
    p.add_argument("--export-dir", default=None)
    p.add_argument("--steps", type=int, default=5000)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--n-questions", type=int, default=8)
    p.add_argument("--lr", type=float, default=1.5e-3)
    p.add_argument("--warmup-steps", type=int, default=200)
    p.add_argument("--aux-weight", type=float, default=0.5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", default="auto",
                   help="torch threads: an integer, or 'auto' (2, dropping to 1 while the machine is busy)")
    p.add_argument("--save-every", type=int, default=100)
    p.add_argument("--eval-every", type=int, default=500)
    p.add_argument("--eval-n", type=int, default=140)
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--final-eval-n", type=int, default=700)
    p.add_argument("--model-overrides", type=json.loads, default=None, help="JSON dict for demo_config")
    p.add_argument("--init-from", default=None, help="exported model dir to continue training from")
    p.add_argument("--no-resume", action="store_true")
    a = p.parse_args(argv)

    def log(msg):
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)

    train_demo(a.output_dir, steps=a.steps, batch_size=a.batch_size, n_questions=a.n_questions,
               seed=a.seed, lr=a.lr, warmup_steps=a.warmup_steps, aux_weight=a.aux_weight,
               num_threads=a.threads if a.threads == "auto" else int(a.threads), save_every=a.save_every, eval_every=a.eval_every, eval_n=a.eval_n, log_every=a.log_every,
               resume=not a.no_resume, export_dir=a.export_dir, final_eval_n=a.final_eval_n,
               model_overrides=a.model_overrides, init_from=a.init_from, log=log)


if __name__ == "__main__":
    main()
