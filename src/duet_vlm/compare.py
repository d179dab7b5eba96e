"""One prompt answered with and without token reduction: answers, counts, costs, timing, figure.

``compare`` runs a loaded model; ``ask`` loads any supported checkpoint first (``duet-vlm run``).

>>> asked = ask("llava-hf/llava-1.5-7b-hf", "What is shown?", image="scene.png", budget=64)   # doctest: +SKIP
>>> [(answer.label, answer.text) for answer in asked.answers]                                # doctest: +SKIP
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from .adapters import adapter_for
from .bench.timing import interleaved
from .methods import Reducer, make
from .stats import ReductionStats


@dataclass
class Answer:
    """What one configuration produced for a prompt."""

    label: str
    text: str
    stats: ReductionStats
    prefill_seconds: float


def chat_prompt(processor, question: str, kind: str = "image") -> str:
    """The model's own chat template around an image (or a video) and ``question`` (LLaVA-1.5 style
    if it has none)."""
    if f"<{kind}>" in question:
        return question
    if getattr(processor, "chat_template", None):
        conversation = [{"role": "user", "content": [{"type": kind}, {"type": "text", "text": question}]}]
        return processor.apply_chat_template(conversation, add_generation_prompt=True)
    return f"USER: <{kind}>\n{question} ASSISTANT:"


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
    """``ask``'s answers (all tokens, then the reducer) and the overlay it drew, if asked to."""

    answers: list[Answer]
    overlay: Optional[Path] = None


def ask(model: str, prompt: str, image: Optional[Path] = None, video: Optional[Path] = None, method: str = "duet",
        budget: Optional[int] = 64, ratio: Optional[float] = None, max_new_tokens: int = 32,
        overlay: Optional[Path] = None, dtype: str = "auto", rounds: int = 3) -> Asked:
    """Answer ``prompt`` about an image (or a video: an animated image or a folder of frames) with all
    tokens and under ``make(method, budget=... or ratio=...)`` on the checkpoint ``model`` (a local
    path or a Hub id); ``overlay``: where to draw the kept tokens."""
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor

    # The cheap checks first: a bad method, budget or image fails before the weights load.
    reducer = make(method, budget=None if ratio is not None else budget, ratio=ratio)
    if (image is None) == (video is None):
        raise ValueError("give --image or --video")
    picture = Image.open(image).convert("RGB") if image is not None else read_frames(video)
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
    label = f"{method} {budget}" if ratio is None else f"{method} ratio {ratio}"
    answers = compare(loaded, processor, picture, prompt, {"all tokens": None, label: reducer}, max_new_tokens, rounds)
    if not overlay:
        return Asked(answers)
    stats = answers[1].stats
    (item,) = stats.items
    if len(item.views) == 1 and stats.vision_roles:  # one grid: Stage A's roles can be drawn too
        # The item's own token grid (Qwen-VL images come in any size), CLS or not.
        (_, rows, cols), = item.views
        has_cls = adapter_for(loaded).geometry.has_cls
        path = draw_overlay(picture, stats, (rows, cols), overlay, title=prompt, has_cls=has_cls)
    else:  # tiles of an anyres image, or frames of a video
        path = draw_item_overlay(picture, item, overlay, title=prompt)
    return Asked(answers, path)


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
