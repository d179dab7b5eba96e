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
from .methods.registry import default_budget, load_reducer
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


def to_rgb(image, name: str = "the image"):
    """``image`` (a PIL image of any mode) as the 8-bit RGB picture it shows.

    ``convert("RGB")`` alone clips a 16-bit greyscale image (mode ``I;16``, or ``I`` as Pillow reads
    16-bit PNGs and PGMs) to white and shows a transparent pixel's hidden colour; here 16-bit values
    are scaled to 8 bits, transparency is composited over white (as transformers' ``convert_rgb``
    does), and CMYK, palette and greyscale images are converted. A floating-point image, or a 32-bit
    one with values beyond 16 bits, has no range to scale from: it is refused, naming ``name``.

    >>> from PIL import Image
    >>> to_rgb(Image.new("I;16", (2, 2), 32896)).getpixel((0, 0))
    (128, 128, 128)
    >>> to_rgb(Image.new("RGBA", (2, 2), (255, 0, 0, 0))).getpixel((0, 0))
    (255, 255, 255)
    """
    from PIL import Image

    if image.mode.startswith("I;16") or image.mode == "I":
        values = np.asarray(image, dtype=np.int64)
        if values.size and (values.min() < 0 or values.max() > 65535):
            raise ValueError(f"{name}: a 32-bit integer image with values from {values.min()} to {values.max()}; "
                             "save it as an 8- or 16-bit image")
        return Image.fromarray(np.round(values / 257).astype(np.uint8)).convert("RGB")
    if image.mode == "F":
        raise ValueError(f"{name}: a floating-point image has no range to read colours from; save it as an 8- or 16-bit image")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info:
        picture = Image.new("RGBA", image.size, (255, 255, 255, 255))
        picture.alpha_composite(image.convert("RGBA"))
        return picture.convert("RGB")
    return image.convert("RGB")


def read_image(path: Path):
    """The image file at ``path`` as an 8-bit RGB picture (``to_rgb``)."""
    from PIL import Image

    with Image.open(path) as image:
        return to_rgb(image, str(path))


def read_frames(path: Path) -> list:
    """Frames of an animated image (GIF, WebP) or of the images in a folder (sorted by name), as 8-bit
    RGB pictures (``to_rgb``)."""
    from PIL import Image, ImageSequence

    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp", ".bmp"))
        frames = [read_image(p) for p in files]
    else:
        with Image.open(path) as video:
            frames = [to_rgb(frame, str(path)) for frame in ImageSequence.Iterator(video)]
    if not frames:
        raise ValueError(f"no video frames in {path}")
    return frames


def seen_box(processor, size: tuple[int, int]) -> tuple[int, int, int, int]:
    """The box (left, top, right, bottom), in the pixels of a picture of ``size`` (width, height), that
    ``processor`` (a checkpoint's image or video processor) hands the model as one grid.

    A CLIP-style processor resizes the shortest edge and centre-crops (LLaVA-1.5, Video-LLaVA): a wide
    photo loses its sides. One that pads to a square first (LLaVA's ``do_pad``) shows the model more
    than the photo: the box reaches beyond its edges. Any other resizes the whole picture (Qwen-VL,
    LLaVA-OneVision's videos). The arithmetic is transformers' (``get_resize_output_image_size``, then
    ``center_crop``).

    >>> from types import SimpleNamespace as Processor
    >>> clip = Processor(do_center_crop=True, size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336})
    >>> seen_box(clip, (600, 300)), seen_box(clip, (300, 600)), seen_box(clip, (400, 400))
    ((150, 0, 450, 300), (0, 150, 300, 450), (0, 0, 400, 400))
    """
    width, height = size
    left = top = 0
    if _pads_to_square(processor):
        side = max(width, height)
        left, top = -((side - width) // 2), -((side - height) // 2)
        width = height = side
    resize, crop = getattr(processor, "size", None) or {}, getattr(processor, "crop_size", None) or {}
    short = resize.get("shortest_edge") if getattr(processor, "do_resize", True) else None
    if not (getattr(processor, "do_center_crop", False) and crop.get("height") and crop.get("width")):
        return left, top, left + width, top + height
    resized = (width, height)
    if short:  # the short edge to ``short``, the long one in proportion, truncated
        resized = (short, int(short * height / width)) if width <= height else (int(short * width / height), short)
    crop_left, crop_top = int((resized[0] - crop["width"]) / 2), int((resized[1] - crop["height"]) / 2)
    x, y = width / resized[0], height / resized[1]
    return (left + round(crop_left * x), top + round(crop_top * y),
            left + round((crop_left + crop["width"]) * x), top + round((crop_top + crop["height"]) * y))


def _pads_to_square(processor) -> bool:
    """LLaVA's image processor with ``do_pad``: the photo is padded to a square before it is resized."""
    return bool(getattr(processor, "do_pad", False)) and hasattr(processor, "pad_to_square")


def seen_part(picture, processor):
    """The part of ``picture`` the model sees through ``processor`` (``seen_box``): cropped, or padded
    as the processor pads (a square in its mean colour; black beyond a crop larger than the image)."""
    from PIL import Image

    left, top, right, bottom = seen_box(processor, picture.size)
    if (left, top, right, bottom) == (0, 0, *picture.size):
        return picture
    fill = tuple(int(255 * mean) for mean in processor.image_mean) if _pads_to_square(processor) else (0, 0, 0)
    part = Image.new("RGB", (right - left, bottom - top), fill)
    part.paste(picture, (-left, -top))
    return part


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


def one_image_per_row(images: list) -> list[list]:
    """``images`` as the processors take a batch whose row ``b`` holds ``images[b]``: one list per row.
    Every family's processor reads this form; Gemma 3's reads nothing else (a flat list is one
    row's images, and the second row's image is then counted against the first row's prompt)."""
    return [[image] for image in images]


def compare_rows(model, processor, images: list, question: str, reducer: Reducer, budgets=None, ratios=None,
                 max_new_tokens: int = 8) -> tuple[list[RowAnswer], ReductionStats]:
    """Answer ``question`` about each of ``images`` in one left-padded batch, with all tokens and
    under ``reducer`` with a budget (or ratio) per row (``reducer.per_row``; ``None``: the
    reducer's own for every row). Returns each row's answers and the reduced batch's stats."""
    processor.tokenizer.padding_side = "left"
    inputs = processor(images=one_image_per_row(images), text=[chat_prompt(processor, question)] * len(images),
                       padding=True, return_tensors="pt")
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
                   saved_reducer: bool = True, budgets: Optional[list[int]] = None,
                   ratios: Optional[list[float]] = None) -> tuple[Reducer, str]:
    """The reducer ``duet-vlm run`` attaches, and its label: the one a fine-tuned checkpoint carries
    (``duet_vlm.load_reducer``) unless a method, budget or ratio is given or ``saved_reducer`` is
    off; else ``make(method or "duet", budget=... or 64, or ratio=...)``.

    With a budget (or a ratio) per row, ``budgets`` (``ratios``), and neither ``budget`` nor
    ``ratio``, the reducer is made at the first of the rows' and labelled by its method alone: each
    row runs at its own, and no default the user never gave is solved for (a budget of 64 that the
    method cannot reach on the model would fail the run)."""
    if saved_reducer and method is None and budget is None and ratio is None and Path(model).is_dir():
        saved = load_reducer(model)
        if saved is not None:
            return saved, f"{saved.method_name} (saved with the checkpoint)"
    method = method or "duet"
    if budget is None and ratio is None and (budgets or ratios):
        if budgets:
            return make(method, budget=budgets[0]), method
        return make(method, ratio=ratios[0]), method
    budget = default_budget(method, budget, ratio)  # None for a method whose count follows the content
    reducer = make(method, budget=None if ratio is not None else budget, ratio=ratio)
    if ratio is not None:
        return reducer, f"{method} ratio {ratio}"
    return reducer, method if budget is None else f"{method} {budget}"


#: What each family that takes no video is called in ``duet-vlm run``'s refusal.
IMAGE_ONLY = {"llava": "LLaVA-1.5", "llava_next": "LLaVA-NeXT"}


def check_video(config, model: str) -> None:
    """Refuse a video for a checkpoint whose family takes none (its config has no ``video_token_id``):
    its processor would drop the frames and the model answer from the text alone."""
    if getattr(config, "video_token_id", None) is None:
        model_type = getattr(config, "model_type", None)
        family = IMAGE_ONLY.get(model_type, f"model_type {model_type!r}")
        raise ValueError(f"--video: {model} is a {family} checkpoint, which takes no video (it would answer from the text "
                         "alone); the families that take a video are LLaVA-OneVision, Video-LLaVA and Qwen2/2.5/3-VL")


INSTALL_TORCHVISION = "install the torchvision build that matches your torch (the README's CPU torch has none; a GPU install does)"
#: A video without torchvision: what ``load_processor`` says (``{}``: the processor class).
NO_TORCHVISION = ("a video needs {}'s video processor, and transformers' video processors need torchvision, which is "
                  "not installed (images run without it): " + INSTALL_TORCHVISION)


class _WithoutVideoProcessor:
    """Mixed in before a family's processor class: it takes ``video_processor=None`` (transformers
    checks that argument's class, and every video processor class needs torchvision) and refuses a
    video in one line."""

    def check_argument_for_proper_class(self, argument_name, argument):
        if argument_name == "video_processor" and argument is None:
            return None
        return super().check_argument_for_proper_class(argument_name, argument)

    def __call__(self, *args, videos=None, **kwargs):
        if videos is not None:
            raise ValueError(NO_TORCHVISION.format(type(self).__name__))
        return super().__call__(*args, **kwargs)


def load_processor(model: str, videos: bool = False):
    """The processor of the checkpoint ``model`` (a path or a Hub id): ``AutoProcessor``'s.

    Where the family's processor builds a video processor (LLaVA-OneVision, Qwen2/2.5/3-VL,
    Qwen3.5, InternVL, Gemma 4) and torchvision is not installed (the README's CPU install),
    transformers cannot build it at all: then the same processor class without a video processor,
    its images through transformers' PIL image processor (``AutoImageProcessor`` picks it without
    torchvision), and a video refused in one line. With ``videos`` (a video is asked for) that
    one-line refusal comes at once instead.

    >>> processor = load_processor("Qwen/Qwen2.5-VL-3B-Instruct")   # doctest: +SKIP
    >>> inputs = processor(images=[[image]], text=[prompt], return_tensors="pt")   # doctest: +SKIP
    """
    import importlib.util

    from transformers import AutoProcessor

    try:
        return AutoProcessor.from_pretrained(model)
    except ImportError as error:
        if "torchvision" not in str(error).lower() or importlib.util.find_spec("torchvision") is not None:
            raise
        family = _processor_class(model)
        parts = set(family.get_attributes()) if family is not None else set()
        if "video_processor" not in parts or not parts - {"video_processor"} <= set(PARTS):  # nothing to leave out
            said = " ".join(str(error).split()).split(". ")[0].rstrip(".")
            raise ValueError(f"cannot build the processor of {model}: {said}; {INSTALL_TORCHVISION}") from error
        if videos:
            raise ValueError(NO_TORCHVISION.format(family.__name__)) from error
        return _images_only(model, family)


def _processor_class(model: str):
    """The processor class ``AutoProcessor`` builds for ``model``: the one its processor config
    names, else its family's (``model_type``); ``None`` for a class transformers does not know."""
    from transformers import AutoConfig
    from transformers.models.auto.processing_auto import PROCESSOR_MAPPING, processor_class_from_name
    from transformers.processing_utils import ProcessorMixin

    named = ProcessorMixin.get_processor_dict(model)[0].get("processor_class")
    return processor_class_from_name(named) if named else PROCESSOR_MAPPING.get(type(AutoConfig.from_pretrained(model)))


#: The parts of a processor built without its video processor, and the transformers class that loads each.
PARTS = {"image_processor": "AutoImageProcessor", "tokenizer": "AutoTokenizer", "feature_extractor": "AutoFeatureExtractor"}


def _images_only(model: str, family):
    """``family``'s processor loaded from ``model`` with every part but its video processor."""
    import transformers

    processor_dict, kwargs = family.get_processor_dict(model)
    parts = [None if part == "video_processor" else getattr(transformers, PARTS[part]).from_pretrained(model)
             for part in family.get_attributes()]
    images_only = type(family.__name__, (_WithoutVideoProcessor, family), {"__doc__": family.__doc__})
    return images_only.from_args_and_dict(parts, processor_dict, **kwargs)


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
    from transformers import AutoConfig, AutoModelForImageTextToText

    # The cheap checks first: a bad method, budget or image fails before the weights load.
    reducer, label = saved_or_asked(model, method, budget, ratio, saved_reducer, budgets, ratios)
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
    opened = [read_image(p) for p in pictures] if pictures else None
    picture = opened[0] if opened else read_frames(video)
    if dtype not in DTYPES:
        raise ValueError(f"--dtype must be auto, float32, bfloat16 or float16, got {dtype!r}")
    if overlay is not None and not Path(overlay).parent.is_dir():  # before the model loads, not after the run
        raise ValueError(f"--overlay {overlay}: the folder {Path(overlay).parent} does not exist")
    torch_dtype = "auto" if dtype == "auto" else getattr(torch, dtype)
    try:
        if video is not None:  # before the weights load
            check_video(AutoConfig.from_pretrained(model), model)
        processor = load_processor(model, videos=video is not None)  # before the weights load too
        loaded = AutoModelForImageTextToText.from_pretrained(model, dtype=torch_dtype).eval()
    except OSError as error:  # transformers' message does not say which argument was wrong
        raise OSError(f"cannot load a checkpoint from --model {model!r}: {error}") from error
    if batched:
        rows, stats = compare_rows(loaded, processor, opened, prompt, reducer, budgets, ratios, max_new_tokens)
        path = None
        if overlay:
            seen = list(opened)  # each item on what the model saw of its image
            for item in stats.items:
                seen[item.row] = _seen(opened[item.row], processor, item)
            path = draw_rows_overlay(seen, stats, overlay, [f"{r.label}: asked {r.asked or label}" for r in rows], prompt)
        return Asked([], path, rows, label)
    answers = compare(loaded, processor, picture, prompt, {"all tokens": None, label: reducer}, max_new_tokens, rounds)
    if not overlay:
        return Asked(answers, label=label)
    stats = answers[1].stats
    (item,) = stats.items
    title = f"{prompt}\n{label}: {item.average_tokens:.1f} visual tokens per layer (of {item.tokens})"
    seen = _seen(picture, processor, item)
    if len(item.views) == 1 and stats.vision_roles:  # one grid: Stage A's roles can be drawn too
        # The item's own token grid (Qwen-VL images come in any size), CLS or not.
        (_, rows, cols), = item.views
        has_cls = adapter_for(loaded).geometry.has_cls
        path = draw_overlay(seen, stats, (rows, cols), overlay, title=title, has_cls=has_cls)
    else:  # tiles of an anyres image, or frames of a video
        path = draw_item_overlay(seen, item, overlay, title=title)
    return Asked(answers, path, label=label)


def _seen(picture, processor, item):
    """What the overlay draws ``item``'s grids on: the part of the picture (each frame of a video) the
    model saw through its processor (``seen_part``); an anyres image's grids cover the whole picture."""
    if isinstance(picture, (list, tuple)):
        frames = getattr(processor, "video_processor", None)
        return [seen_part(frame, frames) for frame in picture] if frames is not None else picture
    return seen_part(picture, getattr(processor, "image_processor", None)) if len(item.views) == 1 else picture


def paint_never_encoded(layer: np.ndarray, item, grid: int) -> None:
    """Paint red, on ``layer`` (``(rows, cols, 4)`` of grid ``grid``), the item's tokens whose patches
    never entered the vision encoder (``ItemStats.never_encoded``: PixelPrune), if any."""
    never = getattr(item, "never_encoded", None)
    if never is None or item.cells is None:
        return
    cells = item.cells[never]
    cells = cells[cells[:, 0] == grid]
    layer[cells[:, 1].numpy(), cells[:, 2].numpy()] = (0.9, 0.1, 0.1, 0.45)


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
            paint_never_encoded(layer, item, 0)
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
    Tokens whose patches never entered the vision encoder (PixelPrune) are red in the first column.

    ``pictures``: one picture per grid of a video (its frames), or one picture for an image.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stages = [(f"LLM input: {len(item.entry_slots)} tokens", item.entry_slots)]
    never = getattr(item, "never_encoded", None)  # red: tokens whose patches never entered the encoder
    if never is not None:
        stages[0] = (f"LLM input: {len(item.entry_slots)} tokens\n(red: {len(never)} never encoded)", item.entry_slots)
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
            if column == 0:
                paint_never_encoded(layer, item, row)
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
