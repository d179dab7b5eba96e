"""One prompt answered with and without token reduction: answers, counts, costs, timing, figure.

``compare`` runs a loaded model; ``ask`` loads any supported checkpoint first (``duet-vlm run``).

>>> asked = ask("llava-hf/llava-1.5-7b-hf", "What is shown?", image="scene.png", budget=64)   # doctest: +SKIP
>>> [(answer.label, answer.text) for answer in asked.answers]                                # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from .adapters import adapter_for
from .bench.timing import interleaved
from .evaluation import chat_prompt  # noqa: F401 - also imported from here
from .methods import Reducer, make
from .methods.registry import load_reducer
from .stats import ReductionStats


@dataclass
class Answer:
    """What one configuration produced for a prompt."""

    label: str
    text: str
    stats: ReductionStats
    prefill_seconds: float


def compare(
    model,
    processor,
    image,
    question: str,
    reducers: dict[str, Reducer | None],
    max_new_tokens: int = 8,
    rounds: int = 5,
) -> list[Answer]:
    """Answer ``question`` about ``image`` (a list of frames: a video) under each reducer (``None`` =
    all tokens) and time their prefills side by side."""
    if isinstance(image, (list, tuple)):
        inputs = processor(videos=[list(image)], text=chat_prompt(processor, question, "video"), return_tensors="pt")
    else:
        inputs = processor(images=image, text=chat_prompt(processor, question), return_tensors="pt")
    inputs = {k: v.to(model.device) for k, v in inputs.items()}
    resolved = {label: reducer if reducer is not None else make("full") for label, reducer in reducers.items()}
    tokenizer = processor.tokenizer
    texts = {}
    for label, reducer in resolved.items():
        with torch.inference_mode(), reducer(model):
            out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        texts[label] = tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True).strip()
    stats = {label: reducer.stats for label, reducer in resolved.items()}

    def prefill(reducer):
        def run():
            with torch.inference_mode(), reducer(model):
                model(**inputs, logits_to_keep=1)

        return run

    times = interleaved({label: prefill(r) for label, r in resolved.items()}, rounds=rounds)
    return [Answer(label, texts[label], stats[label], statistics.median(times[label])) for label in resolved]


def read_frames(path: Path) -> list:
    """Frames of an animated image (GIF, WebP) or of the images in a folder (sorted by name)."""
    from PIL import Image, ImageSequence

    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp", ".bmp"))
        frames = [Image.open(p).convert("RGB") for p in files]
    else:
        frames = [frame.convert("RGB") for frame in ImageSequence.Iterator(Image.open(path))]
    if not frames:
        raise ValueError(f"no video frames in {path}")
    return frames


DTYPES = ("auto", "float32", "bfloat16", "float16")


@dataclass
class Asked:
    """``ask``'s answers (all tokens, then the reducer) and the overlay it drew, if asked to; for a
    batch with per-row budgets, ``rows`` instead of ``answers``; ``label``: the reducer that ran."""

    answers: list[Answer]
    overlay: Optional[Path] = None
    rows: list[RowAnswer] = field(default_factory=list)
    label: str = ""


@dataclass
class RowAnswer:
    """One row of a batch run with per-row budgets: its answer with all tokens and under the
    reducer at its own budget, the budget asked and the visual tokens per layer it kept."""

    label: str
    asked: str
    tokens: float
    text: str
    text_all_tokens: str


def compare_rows(model, processor, images: list, question: str, reducer: Reducer, budgets=None, ratios=None,
                 max_new_tokens: int = 8) -> tuple[list[RowAnswer], ReductionStats]:
    """Answer ``question`` about each of ``images`` in one left-padded batch, with all tokens and
    under ``reducer`` with a budget (or ratio) per row (``reducer.per_row``; ``None``: the
    reducer's own for every row). Returns each row's answers and the reduced batch's stats."""
    processor.tokenizer.padding_side = "left"
    inputs = processor(images=list(images), text=[chat_prompt(processor, question)] * len(images), padding=True,
                       return_tensors="pt")
    inputs = {k: v.to(model.device) for k, v in inputs.items()}
    start = inputs["input_ids"].shape[1]
    tokenizer = processor.tokenizer
    decode = lambda out: [tokenizer.decode(row[start:], skip_special_tokens=True).strip() for row in out]  # noqa: E731
    with torch.inference_mode():
        plain = decode(model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False))
        rows = {} if budgets is None and ratios is None else {"budget": budgets, "ratio": ratios}
        with reducer(model), (reducer.per_row(**rows) if rows else contextlib.nullcontext()):
            reduced = decode(model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False))
        stats = reducer.stats
    kept = [0.0] * len(images)
    for item in stats.items:
        kept[item.row] += item.average_tokens
    asked = [str(v) for v in (budgets or ratios)] if rows else [""] * len(images)
    answers = [RowAnswer(f"row {b}", asked[b], kept[b], reduced[b], plain[b]) for b in range(len(images))]
    return answers, stats


def saved_or_asked(model: str, method: Optional[str], budget: Optional[int], ratio: Optional[float],
                   saved_reducer: bool = True) -> tuple[Reducer, str]:
    """The reducer ``duet-vlm run`` attaches, and its label: the one a fine-tuned checkpoint carries
    (``duet_vlm.load_reducer``) unless a method, budget or ratio is given or ``saved_reducer`` is
    off; else ``make(method or "duet", budget=... or 64, or ratio=...)``."""
    if saved_reducer and method is None and budget is None and ratio is None and Path(model).is_dir():
        saved = load_reducer(model)
        if saved is not None:
            return saved, f"{saved.method_name} (saved with the checkpoint)"
    method = method or "duet"
    if ratio is None and budget is None:
        budget = 64
    reducer = make(method, budget=None if ratio is not None else budget, ratio=ratio)
    return reducer, f"{method} {budget}" if ratio is None else f"{method} ratio {ratio}"


def ask(model: str, prompt: str, image: Optional[Path] = None, video: Optional[Path] = None, method: Optional[str] = None,
        budget: Optional[int] = None, ratio: Optional[float] = None, max_new_tokens: int = 32,
        overlay: Optional[Path] = None, dtype: str = "auto", rounds: int = 3, images: Optional[list[Path]] = None,
        budgets: Optional[list[int]] = None, ratios: Optional[list[float]] = None, saved_reducer: bool = True) -> Asked:
    """Answer ``prompt`` about an image (or a video: an animated image or a folder of frames) with all
    tokens and under ``make(method, budget=... or ratio=...)`` on the checkpoint ``model`` (a local
    path or a Hub id; a checkpoint fine-tuned under a reducer brings its own: ``saved_or_asked``);
    ``overlay``: where to draw the kept tokens, with each item's count.

    Several ``images`` (or ``budgets``/``ratios``, one per image) run as one left-padded batch, each
    row under its own budget (``reducer.per_row``): ``Asked.rows``."""
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor

    # The cheap checks first: a bad method, budget or image fails before the weights load.
    reducer, label = saved_or_asked(model, method, budget, ratio, saved_reducer)
    pictures = [image] if image is not None else []
    pictures += list(images or [])
    if (not pictures) == (video is None):
        raise ValueError("give --image (one or more) or --video")
    batched = len(pictures) > 1 or budgets is not None or ratios is not None
    if batched:
        if video is not None:
            raise ValueError("per-row budgets run a batch of images: give --image for each row, not --video")
        if budgets is not None and ratios is not None:
            raise ValueError("give --budgets or --ratios, not both")
        given = budgets if budgets is not None else ratios
        if given is not None and len(given) != len(pictures):
            raise ValueError(f"per-row budgets: {len(given)} given for {len(pictures)} images (give one per --image)")
        with reducer.per_row(budget=budgets, ratio=ratios) if given is not None else contextlib.nullcontext():
            pass  # the values are checked now, before the model loads
    opened = [Image.open(p).convert("RGB") for p in pictures] if pictures else None
    picture = opened[0] if opened else read_frames(video)
    if dtype not in DTYPES:
        raise ValueError(f"--dtype must be auto, float32, bfloat16 or float16, got {dtype!r}")
    if overlay is not None and not Path(overlay).parent.is_dir():  # before the model loads, not after the run
        raise ValueError(f"--overlay {overlay}: the folder {Path(overlay).parent} does not exist")
    torch_dtype = "auto" if dtype == "auto" else getattr(torch, dtype)
    try:
        loaded = AutoModelForImageTextToText.from_pretrained(model, dtype=torch_dtype).eval()
        processor = AutoProcessor.from_pretrained(model)
    except OSError as error:  # transformers' message does not say which argument was wrong
        raise OSError(f"cannot load a checkpoint from --model {model!r}: {error}") from error
    if batched:
        rows, stats = compare_rows(loaded, processor, opened, prompt, reducer, budgets, ratios, max_new_tokens)
        path = None
        if overlay:
            path = draw_rows_overlay(opened, stats, overlay, [f"{r.label}: asked {r.asked or label}" for r in rows], prompt)
        return Asked([], path, rows, label)
    answers = compare(loaded, processor, picture, prompt, {"all tokens": None, label: reducer}, max_new_tokens, rounds)
    if not overlay:
        return Asked(answers, label=label)
    stats = answers[1].stats
    (item,) = stats.items
    title = f"{prompt}\n{label}: {item.average_tokens:.1f} visual tokens per layer (of {item.tokens})"
    if len(item.views) == 1 and stats.vision_roles:  # one grid: Stage A's roles can be drawn too
        # The item's own token grid (Qwen-VL images come in any size), CLS or not.
        (_, rows, cols), = item.views
        has_cls = adapter_for(loaded).geometry.has_cls
        path = draw_overlay(picture, stats, (rows, cols), overlay, title=title, has_cls=has_cls)
    else:  # tiles of an anyres image, or frames of a video
        path = draw_item_overlay(picture, item, overlay, title=title)
    return Asked(answers, path, label=label)


def draw_rows_overlay(pictures: list, stats: ReductionStats, path: str | Path, labels: list[str], title: str = "") -> Path:
    """One panel per item of a batch (``stats.items``): the tokens entering the language model on the
    item's first grid, titled with the item's visual tokens per layer."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    items = stats.items
    figure, axes = plt.subplots(1, len(items), figsize=(3.2 * len(items), 3.6), squeeze=False)
    for axis, item in zip(axes[0], items):
        picture = np.asarray(pictures[item.row].convert("RGB"))
        extent = (0, picture.shape[1], picture.shape[0], 0)
        axis.imshow(picture, extent=extent)
        if item.cells is not None and item.views and item.entry_slots is not None:
            _, rows, cols = item.views[0]
            slots = item.entry_slots[item.entry_slots >= 0]
            cells = item.cells[slots]
            chosen = cells[cells[:, 0] == 0]
            layer = np.zeros((rows, cols, 4))
            layer[chosen[:, 1].numpy(), chosen[:, 2].numpy()] = (1.0, 1.0, 0.0, 0.6)
            axis.imshow(np.full(picture.shape[:2], 0.0), cmap="gray", alpha=0.45, extent=extent, vmin=0, vmax=1)
            axis.imshow(layer, extent=extent, interpolation="nearest")
        axis.set_title(f"{labels[item.row]}\n{item.average_tokens:.1f} visual tokens per layer "
                       f"({len(item.entry_slots) if item.entry_slots is not None else item.tokens} enter)", fontsize=8)
        axis.axis("off")
    if title:
        figure.suptitle(title, fontsize=9)
    figure.tight_layout(rect=(0, 0, 1, 0.9 if title else 1))
    path = Path(path)
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def patch_mask(indices, grid: tuple[int, int], has_cls: bool = True) -> np.ndarray:
    """A boolean ``grid`` mask of the patches named by vision-encoder ``indices`` (CLS ignored)."""
    mask = np.zeros(grid, dtype=bool)
    for index in np.asarray(indices).reshape(-1).tolist():
        patch = index - 1 if has_cls else index
        if patch >= 0:
            mask[divmod(patch, grid[1])] = True
    return mask


def draw_overlay(
    image, stats: ReductionStats, grid: tuple[int, int], path: str | Path, title: str = "", has_cls: bool = True
) -> Path:
    """Kept patches of the first image: Stage A roles, then the survivors of each Stage-B boundary.
    ``grid``: the image's token grid; ``has_cls``: vision-token index 0 is a CLS token (CLIP)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    picture = np.asarray(image.convert("RGB"))
    height, width = picture.shape[:2]
    extent = (0, width, height, 0)
    panels = [("input", None)]
    roles = {name: indices[0] for name, indices in stats.vision_roles.items()}
    if "dominant" in roles:
        layers = np.zeros((*grid, 4))
        layers[patch_mask(roles.get("members", []), grid, has_cls)] = (1.0, 0.0, 1.0, 0.3)
        layers[patch_mask(roles["dominant"], grid, has_cls)] = (0.0, 1.0, 1.0, 0.55)
        layers[patch_mask(roles.get("anchors", []), grid, has_cls)] = (1.0, 0.0, 1.0, 0.95)
        n_anchors = len(roles.get("anchors", []))
        cls = ", CLS incl." if has_cls else ""
        label = f"Stage A: {len(roles['dominant'])} dominant (cyan{cls})\n{n_anchors} contextual anchors (magenta), merged (pale)"
        panels.append((label, layers))
    elif stats.vision_kept is not None:
        layers = np.zeros((*grid, 4))
        layers[patch_mask(stats.vision_kept[0], grid, has_cls)] = (0.0, 1.0, 1.0, 0.55)
        panels.append((f"LLM input: {stats.llm_input_tokens} tokens", layers))
    entry = stats.vision_kept[0] if stats.vision_kept is not None else None
    for layer, kept in stats.stage_kept:
        ids = kept[0].reshape(-1)
        indices = entry[ids] if entry is not None else ids + int(has_cls)
        layers = np.zeros((*grid, 4))
        layers[patch_mask(indices, grid, has_cls)] = (1.0, 1.0, 0.0, 0.6)
        panels.append((f"after layer {layer}: {ids.numel()} kept", layers))

    figure, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.6))
    axes = np.atleast_1d(axes)
    for axis, (label, layers) in zip(axes, panels):
        axis.imshow(picture, extent=extent)
        if layers is not None:
            axis.imshow(np.full(picture.shape[:2], 0.0), cmap="gray", alpha=0.45, extent=extent, vmin=0, vmax=1)
            axis.imshow(layers, extent=extent, interpolation="nearest")
        axis.set_title(label, fontsize=8)
        axis.axis("off")
    if title:
        figure.suptitle(title, fontsize=9)
    figure.tight_layout(rect=(0, 0, 1, 0.9 if title else 1))
    path = Path(path)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def draw_item_overlay(pictures, item, path: str | Path, title: str = "") -> Path:
    """Kept tokens of one visual item (``ReductionStats.items[i]``) on its grids: a row per grid
    (each frame of a video; an anyres image's base tile and its high-resolution grid, both over the
    whole picture), a column per stage (the tokens entering the LLM, then each boundary's survivors).

    ``pictures``: one picture per grid of a video (its frames), or one picture for an image.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stages = [(f"LLM input: {len(item.entry_slots)} tokens", item.entry_slots)]
    stages += [(f"after layer {layer}: {len(ids)} kept", item.entry_slots[ids.cpu()]) for layer, ids in item.stage_ids]
    pictures = list(pictures) if isinstance(pictures, (list, tuple)) else [pictures] * len(item.views)
    figure, axes = plt.subplots(len(item.views), len(stages), figsize=(3.0 * len(stages), 3.0 * len(item.views)), squeeze=False)
    for column, (label, slots) in enumerate(stages):
        cells = item.cells[slots[slots >= 0]]
        for row, (name, rows, cols) in enumerate(item.views):
            picture = np.asarray(pictures[row].convert("RGB"))
            extent = (0, picture.shape[1], picture.shape[0], 0)
            layer = np.zeros((rows, cols, 4))
            chosen = cells[cells[:, 0] == row]
            layer[chosen[:, 1].numpy(), chosen[:, 2].numpy()] = (1.0, 1.0, 0.0, 0.6)
            axis = axes[row, column]
            axis.imshow(picture, extent=extent)
            axis.imshow(np.full(picture.shape[:2], 0.0), cmap="gray", alpha=0.45, extent=extent, vmin=0, vmax=1)
            axis.imshow(layer, extent=extent, interpolation="nearest")
            axis.set_title(f"{name}: {len(chosen)} of {rows * cols}\n{label}" if row == 0 else f"{name}: {len(chosen)}", fontsize=7)
            axis.axis("off")
    if title:
        figure.suptitle(title, fontsize=9)
    figure.tight_layout(rect=(0, 0, 1, 0.95 if title else 1))
    path = Path(path)
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path
