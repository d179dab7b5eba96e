"""Offline, deterministic synthetic visual-question-answering generator.

Every sample is a 336x336 RGB scene (LLaVA-1.5 geometry: 24x24 patches of 14 px) with a few
saturated shapes on a low-contrast textured background, plus one question with a one-word
answer.  The answer depends on a small part of the image, so most visual tokens are redundant,
which is exactly the regime token-reduction methods target.

Everything is a pure function of ``(split, index)``: a sample's random generator is seeded
with ``(SPLIT_SEEDS[split], index)``, so the same call always returns identical pixels and
text, splits never share a generator stream, and no data set is ever downloaded.

Public API
----------
``sample(split, index) -> Sample``
    One evaluation/training sample; question types cycle with ``index % len(QUESTION_TYPES)``.
``make_scene(rng) -> list[dict]`` / ``render_scene(scene, rng) -> PIL.Image``
``make_question(scene, qtype, rng) -> (question, answer) | None``
``answer_from_scene(scene, qtype, params) -> str``
    Recomputes an answer from the scene description (used by the tests).
``conversation(split, index, n_questions, max_objects=None, balanced=False, with_params=False)``
    ``-> (image, [(qtype, question, answer), ...], scene)``: several questions about one image,
    used for training (``max_objects``: curriculum cap; ``balanced``: equal turns per type).
``patch_labels(scene)`` / ``scene_labels(scene)``
    Per-patch and per-image (multi-hot over ``SCENE_LABELS``) targets of the training-only
    auxiliary losses.
``object_patches(scene)`` / ``char_patches(obj)`` / ``question_objects(scene, qtype, params)``
    Which patches each object covers, and which objects a question is about (the targets of
    the training-only grounding loss).
``vocabulary() -> list[str]``  every word/punctuation token the generator can emit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

IMAGE_SIZE = 336
PATCH_SIZE = 14
GRID = IMAGE_SIZE // PATCH_SIZE  # 24

SPLIT_SEEDS = {"train": 1_000_003, "validation": 2_000_029, "test": 3_000_017}

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 175, 45),
    "blue": (35, 70, 225),
    "yellow": (240, 220, 25),
    "purple": (145, 45, 195),
    "orange": (250, 135, 10),
}
COLOR_NAMES = list(COLORS)
SHAPES = ["circle", "square", "triangle", "star", "diamond"]
PLURALS = {s: s + "s" for s in SHAPES}
# Shapes whose centre patch is filled, so a character drawn there has a solid background.
GLYPH_SHAPES = ("circle", "square")

# Characters are drawn as thick strokes (no font files: identical pixels on every platform).
# Coordinates are in a unit box, x to the right, y downwards.
GLYPHS: dict[str, list[list[tuple[float, float]]]] = {
    "e": [[(1, 0), (0, 0), (0, 1), (1, 1)], [(0, 0.5), (0.75, 0.5)]],
    "h": [[(0, 0), (0, 1)], [(1, 0), (1, 1)], [(0, 0.5), (1, 0.5)]],
    "k": [[(0, 0), (0, 1)], [(1, 0), (0, 0.55)], [(0.35, 0.38), (1, 1)]],
    "t": [[(0, 0), (1, 0)], [(0.5, 0), (0.5, 1)]],
    "x": [[(0, 0), (1, 1)], [(1, 0), (0, 1)]],
    "z": [[(0, 0), (1, 0), (0, 1), (1, 1)]],
    "4": [[(0.75, 1), (0.75, 0), (0, 0.65), (1, 0.65)]],
    "7": [[(0, 0), (1, 0), (0.35, 1)]],
}
CHARACTERS = list(GLYPHS)
# Ink that contrasts with each fill colour.
GLYPH_INK = {"red": (255, 255, 255), "green": (255, 255, 255), "blue": (255, 255, 255),
             "yellow": (0, 0, 0), "purple": (255, 255, 255), "orange": (0, 0, 0)}

NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five", "six"]
QUADRANTS = ["topleft", "topright", "bottomleft", "bottomright"]

QUESTION_TYPES = ["color", "shape", "count", "exists", "relation", "quadrant", "read"]

# Answer sets per question type (chance level = 1 / len, except where noted).
ANSWERS = {
    "color": COLOR_NAMES,
    "shape": SHAPES,
    "count": NUMBER_WORDS[1:5],
    "exists": ["yes", "no"],
    "relation": ["left", "right", "above", "below"],  # each question is binary
    "quadrant": QUADRANTS,
    "read": CHARACTERS,
}
CHANCE = {"color": 1 / 6, "shape": 1 / 5, "count": 1 / 4, "exists": 1 / 2, "relation": 1 / 2,
          "quadrant": 1 / 4, "read": 1 / len(CHARACTERS)}

# Objects sit on the patch grid: centred on a patch centre with a "radius" (half the bounding
# box) of 17-20 px, each object lies inside its own 3x3 block of patches, and a character is
# drawn inside the centre patch.  Why: a 4-layer CLIP tower trained from scratch on CPU did not
# learn shape or characters from objects placed anywhere (per-patch probes stayed at chance
# after 400 vision-only steps, for objects of radius 16-52 and for a 6-layer, 128-wide tower),
# because every object then needs its patches combined by attention the tower has not yet
# learned.  With objects on the grid, each patch sees a fixed part of its object, and the same
# tower learns shape and characters in about 150 steps.  The answer still depends on a few
# patches out of 576, the regime token reduction is about.
MIN_R, MAX_R = 17, 20
GLYPH_HALF = 5.5  # the character's box is 11x11 px, inside the object's centre patch
GAP = 6  # minimum distance in pixels between two objects' bounding circles


@dataclass
class Sample:
    """One visual-QA item.  ``scene`` is the list of objects (dicts) drawn in ``image``."""

    image: Image.Image
    question: str
    answer: str
    qtype: str
    scene: list[dict[str, Any]]
    params: dict[str, Any] = field(default_factory=dict)
    split: str = ""
    index: int = -1


def rng_for(split: str, index: int, stream: int = 0) -> np.random.Generator:
    if split not in SPLIT_SEEDS:
        raise ValueError(f"unknown split {split!r}; expected one of {sorted(SPLIT_SEEDS)}")
    if index < 0:
        raise ValueError("index must be >= 0")
    return np.random.default_rng([SPLIT_SEEDS[split], int(index), int(stream)])


# ----------------------------------------------------------------------------- scenes

def _name(obj: dict) -> str:
    return f"{obj['color']} {obj['shape']}"


def make_scene(rng: np.random.Generator, max_objects: int | None = None) -> list[dict[str, Any]]:
    """Random scene: 2-6 non-overlapping objects with pairwise distinct (colour, shape), each
    centred on a patch centre (see ``MIN_R``).

    Each scene contains a "count group": 1-4 objects sharing a colour or a shape, so that count
    questions have balanced answers.  About a third of glyph-capable objects carry a character.
    ``max_objects`` caps the number of objects (a training curriculum; evaluation never sets it).
    """
    if max_objects is None:
        count = int(rng.integers(1, 5))
        n_extra = None
    else:
        if max_objects < 1:
            raise ValueError("max_objects must be >= 1")
        count = int(rng.integers(1, min(4, max_objects) + 1))
        n_extra = int(rng.integers(1 if count == 1 and max_objects > 1 else 0, min(2, max_objects - count) + 1))
    by = "shape" if rng.random() < 0.5 else "color"
    value = str(rng.choice(SHAPES if by == "shape" else COLOR_NAMES))
    if n_extra is None:
        n_extra = int(rng.integers(1 if count == 1 else 0, 3))
    n = count + n_extra
    combos: list[tuple[str, str]] = []
    others_pool = [(c, s) for c in COLOR_NAMES for s in SHAPES]
    if by == "shape":
        group = [(str(c), value) for c in rng.permutation(COLOR_NAMES)[:count]]
        pool = [cs for cs in others_pool if cs[1] != value]
    else:
        group = [(value, str(s)) for s in rng.permutation(SHAPES)[:count]]
        pool = [cs for cs in others_pool if cs[0] != value]
    extra_idx = rng.permutation(len(pool))[:n_extra]
    combos = group + [pool[i] for i in extra_idx]
    order = rng.permutation(len(combos))
    combos = [combos[i] for i in order]

    objects: list[dict[str, Any]] = []
    for color, shape in combos:
        for _attempt in range(200):
            r = int(rng.integers(MIN_R, MAX_R + 1))
            # centre on a patch centre, away from the border so the 3x3 block is in the image
            x, y = (int(g) * PATCH_SIZE + PATCH_SIZE // 2 for g in rng.integers(1, GRID - 1, size=2))
            if all(math.hypot(x - o["x"], y - o["y"]) > r + o["r"] + GAP for o in objects):
                break
        else:  # crowded: restart the whole scene (still deterministic)
            return make_scene(rng, max_objects)
        objects.append({"color": color, "shape": shape, "x": x, "y": y, "r": r, "char": None})
    for o in objects:
        if o["shape"] in GLYPH_SHAPES and rng.random() < 0.6:
            o["char"] = str(rng.choice(CHARACTERS))
    return objects


def _shape_polygon(shape: str, x: float, y: float, r: float) -> list[tuple[float, float]] | None:
    if shape == "square":
        s = r * 0.88
        return [(x - s, y - s), (x + s, y - s), (x + s, y + s), (x - s, y + s)]
    if shape == "diamond":
        return [(x, y - r), (x + r, y), (x, y + r), (x - r, y)]
    if shape == "triangle":
        return [(x + r * math.cos(a), y + r * math.sin(a))
                for a in (-math.pi / 2, -math.pi / 2 + 2 * math.pi / 3, -math.pi / 2 + 4 * math.pi / 3)]
    if shape == "star":
        pts = []
        for k in range(10):
            rad = r if k % 2 == 0 else r * 0.45
            a = -math.pi / 2 + k * math.pi / 5
            pts.append((x + rad * math.cos(a), y + rad * math.sin(a)))
        return pts
    return None


def draw_object(draw: ImageDraw.ImageDraw, obj: dict, fill) -> None:
    x, y, r = obj["x"], obj["y"], obj["r"]
    if obj["shape"] == "circle":
        draw.ellipse([x - r, y - r, x + r, y + r], fill=fill)
    else:
        draw.polygon(_shape_polygon(obj["shape"], x, y, r), fill=fill)


def glyph_box(obj: dict) -> tuple[float, float, float]:
    """(centre x, centre y, half size) of the square the character is drawn in."""
    return obj["x"], obj["y"], GLYPH_HALF


def draw_glyph(draw: ImageDraw.ImageDraw, obj: dict, ink) -> None:
    cx, cy, h = glyph_box(obj)
    width = 2
    for stroke in GLYPHS[obj["char"]]:
        pts = [(cx - h + 2 * h * u, cy - h + 2 * h * v) for u, v in stroke]
        draw.line(pts, fill=ink, width=width, joint="curve")


def _background(rng: np.random.Generator) -> np.ndarray:
    base = rng.integers(95, 165) + rng.integers(-18, 19, size=3)
    img = np.broadcast_to(base.astype(np.float32), (IMAGE_SIZE, IMAGE_SIZE, 3)).copy()
    yy, xx = np.mgrid[0:IMAGE_SIZE, 0:IMAGE_SIZE].astype(np.float32)
    theta = rng.uniform(0, math.pi)
    period = rng.uniform(10, 40)
    amp = rng.uniform(2, 7)
    stripes = amp * np.sin(2 * math.pi * (xx * math.cos(theta) + yy * math.sin(theta)) / period)
    img += stripes[..., None]
    img += rng.normal(0, rng.uniform(3, 8), size=img.shape).astype(np.float32)
    return np.clip(img, 0, 255).astype(np.uint8)


def render_scene(scene: list[dict], rng: np.random.Generator) -> Image.Image:
    img = Image.fromarray(_background(rng), "RGB")
    draw = ImageDraw.Draw(img)
    for obj in scene:
        jitter = rng.integers(-12, 13, size=3)
        fill = tuple(int(np.clip(c + j, 0, 255)) for c, j in zip(COLORS[obj["color"]], jitter))
        draw_object(draw, obj, fill)
        if obj["char"] is not None:
            draw_glyph(draw, obj, GLYPH_INK[obj["color"]])
    return img


def _coverage(mask: np.ndarray) -> np.ndarray:
    """Share of each of the 24x24 patches that ``mask`` (336x336 bool) covers, flattened."""
    return mask.reshape(GRID, PATCH_SIZE, GRID, PATCH_SIZE).mean(axis=(1, 3)).reshape(-1)


def object_patches(scene: list[dict], min_coverage: float = 0.15) -> np.ndarray:
    """``(len(scene), 576)`` bool: the patches each object covers by more than ``min_coverage``
    (the boundary patches are the ones that show the shape, so they count)."""
    masks = []
    for obj in scene:
        mask = Image.new("L", (IMAGE_SIZE, IMAGE_SIZE), 0)
        draw_object(ImageDraw.Draw(mask), obj, 255)
        masks.append(_coverage(np.asarray(mask) > 0) > min_coverage)
    return np.stack(masks) if masks else np.zeros((0, GRID * GRID), bool)


def char_patches(obj: dict) -> np.ndarray:
    """``(576,)`` bool: the patch(es) ``obj``'s character is drawn in (none if it has none)."""
    if obj["char"] is None:
        return np.zeros(GRID * GRID, bool)
    cx, cy, h = glyph_box(obj)
    box = np.zeros((IMAGE_SIZE, IMAGE_SIZE), bool)
    box[int(cy - h):int(cy + h) + 1, int(cx - h):int(cx + h) + 1] = True
    return _coverage(box) > 0.2


def patch_labels(scene: list[dict], min_coverage: float = 0.15) -> dict[str, np.ndarray]:
    """Per-patch (24x24) labels: colour id / shape id / character id (0 = none) of the object
    covering the patch (see :func:`object_patches`), and the character of the patch its glyph
    is drawn in.  Used only as an auxiliary training signal."""
    color = np.zeros(GRID * GRID, np.int64)
    shape = np.zeros_like(color)
    char = np.zeros_like(color)
    # objects never share a patch (they are 3x3 blocks apart)
    for obj, on in zip(scene, object_patches(scene, min_coverage)):
        color[on] = COLOR_NAMES.index(obj["color"]) + 1
        shape[on] = SHAPES.index(obj["shape"]) + 1
        if obj["char"] is not None:
            char[on & char_patches(obj)] = CHARACTERS.index(obj["char"]) + 1
    return {"color": color, "shape": shape, "char": char}


def question_objects(scene: list[dict], qtype: str, params: dict) -> list[int]:
    """Indices (into ``scene``) of the objects a question is about, in the order it names them:
    the one object whose attribute it asks for, the objects counted, the present object of an
    existence question (none when the answer is no), or both objects of a relation."""
    def named(name):
        return [i for i, o in enumerate(scene) if _name(o) == name]

    if qtype == "color":
        return [i for i, o in enumerate(scene) if o["shape"] == params["shape"]]
    if qtype == "shape":
        return [i for i, o in enumerate(scene) if o["color"] == params["color"]]
    if qtype == "count":
        return [i for i, o in enumerate(scene) if o[params["by"]] == params["value"]]
    if qtype == "exists":
        return named(f"{params['color']} {params['shape']}")
    if qtype == "relation":
        return named(params["a"]) + named(params["b"])
    if qtype in ("quadrant", "read"):
        return named(params["a"])
    raise ValueError(f"unknown question type {qtype!r}")


SCENE_LABELS = (COLOR_NAMES + SHAPES + [f"{c} {s}" for c in COLOR_NAMES for s in SHAPES]
                + [f"char {ch}" for ch in CHARACTERS])


def scene_labels(scene: list[dict]) -> np.ndarray:
    """Multi-hot summary of a scene over :data:`SCENE_LABELS` (colours, shapes, colour-shape
    pairs and characters present).  An auxiliary training target for the vision tower's CLS
    token: like CLIP's image-level objective, it makes CLS attention gather the objects."""
    present = set()
    for o in scene:
        present.update((o["color"], o["shape"], _name(o)))
        if o["char"] is not None:
            present.add(f"char {o['char']}")
    return np.asarray([name in present for name in SCENE_LABELS], np.float32)


# ----------------------------------------------------------------------------- questions

def _quadrant(obj: dict) -> str | None:
    """Quadrant if the whole object lies inside one, else None."""
    half = IMAGE_SIZE / 2
    x, y, r = obj["x"], obj["y"], obj["r"]
    if abs(x - half) < r + 2 or abs(y - half) < r + 2:
        return None
    return ("top" if y < half else "bottom") + ("left" if x < half else "right")


def answer_from_scene(scene: list[dict], qtype: str, params: dict) -> str:
    """Ground-truth answer recomputed from the scene description and question parameters."""
    def find(name):
        hits = [o for o in scene if _name(o) == name]
        assert len(hits) == 1, f"{name!r} is not unique in the scene"
        return hits[0]

    if qtype == "color":
        hits = [o for o in scene if o["shape"] == params["shape"]]
        assert len(hits) == 1
        return hits[0]["color"]
    if qtype == "shape":
        hits = [o for o in scene if o["color"] == params["color"]]
        assert len(hits) == 1
        return hits[0]["shape"]
    if qtype == "count":
        return NUMBER_WORDS[sum(o[params["by"]] == params["value"] for o in scene)]
    if qtype == "exists":
        ok = any(o["color"] == params["color"] and o["shape"] == params["shape"] for o in scene)
        return "yes" if ok else "no"
    if qtype == "relation":
        a, b = find(params["a"]), find(params["b"])
        if params["axis"] == "horizontal":
            return "left" if a["x"] < b["x"] else "right"
        return "above" if a["y"] < b["y"] else "below"
    if qtype == "quadrant":
        q = _quadrant(find(params["a"]))
        assert q is not None
        return q
    if qtype == "read":
        o = find(params["a"])
        assert o["char"] is not None
        return o["char"]
    raise ValueError(f"unknown question type {qtype!r}")


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _color_word(rng) -> str:
    return "color" if rng.random() < 0.5 else "colour"


def make_question(scene: list[dict], qtype: str, rng: np.random.Generator):
    """Return ``(question, answer, params)`` for ``qtype`` about ``scene``, or None if the scene
    admits no unambiguous question of that type."""
    if qtype == "color":
        cands = [o for o in scene if sum(p["shape"] == o["shape"] for p in scene) == 1]
        if not cands:
            return None
        o = cands[int(rng.integers(len(cands)))]
        params = {"shape": o["shape"]}
        q = f"What {_color_word(rng)} is the {o['shape']}?"
    elif qtype == "shape":
        cands = [o for o in scene if sum(p["color"] == o["color"] for p in scene) == 1]
        if not cands:
            return None
        o = cands[int(rng.integers(len(cands)))]
        params = {"color": o["color"]}
        q = f"What shape is the {o['color']} object?"
    elif qtype == "count":
        # Ask about the scene's count group (its largest group: 1-4 objects sharing a colour or
        # a shape), or, now and then, about an attribute only one object has, since a count
        # group of one is often outgrown by a chance pair among the other objects.
        counts = [(sum(o[by] == v for o in scene), by, v)
                  for by, values in (("shape", SHAPES), ("color", COLOR_NAMES)) for v in values]
        singles = [c for c in counts if c[0] == 1]
        if singles and rng.random() < 0.15:
            _c, by, v = singles[int(rng.integers(len(singles)))]
        else:
            best = max(c[0] for c in counts)
            tops = [c for c in counts if c[0] == best]
            _c, by, v = tops[int(rng.integers(len(tops)))]
        params = {"by": by, "value": v}
        q = f"How many {PLURALS[v]} are there?" if by == "shape" else f"How many {v} objects are there?"
    elif qtype == "exists":
        present = {(o["color"], o["shape"]) for o in scene}
        if rng.random() < 0.5:
            color, shape = sorted(present)[int(rng.integers(len(present)))]
        else:
            absent = [(c, s) for c in COLOR_NAMES for s in SHAPES if (c, s) not in present]
            # hard negatives: colour and shape each appear in the scene, just not together
            hard = [(c, s) for c, s in absent
                    if any(o["color"] == c for o in scene) and any(o["shape"] == s for o in scene)]
            pool = hard if hard and rng.random() < 0.7 else absent
            color, shape = pool[int(rng.integers(len(pool)))]
        params = {"color": color, "shape": shape}
        q = f"Is there {_article(color)} {color} {shape}?"
    elif qtype == "relation":
        pairs = []
        for a in scene:
            for b in scene:
                if a is b:
                    continue
                if abs(a["x"] - b["x"]) >= 40:
                    pairs.append((a, b, "horizontal"))
                if abs(a["y"] - b["y"]) >= 40:
                    pairs.append((a, b, "vertical"))
        if not pairs:
            return None
        a, b, axis = pairs[int(rng.integers(len(pairs)))]
        params = {"a": _name(a), "b": _name(b), "axis": axis}
        if axis == "horizontal":
            q = f"Is the {_name(a)} left or right of the {_name(b)}?"
        else:
            q = f"Is the {_name(a)} above or below the {_name(b)}?"
    elif qtype == "quadrant":
        cands = [o for o in scene if _quadrant(o) is not None]
        if not cands:
            return None
        o = cands[int(rng.integers(len(cands)))]
        params = {"a": _name(o)}
        q = f"Which quadrant is the {_name(o)} in?"
    elif qtype == "read":
        cands = [o for o in scene if o["char"] is not None]
        if not cands:
            return None
        o = cands[int(rng.integers(len(cands)))]
        params = {"a": _name(o)}
        q = f"Which character is on the {_name(o)}?"
    else:
        raise ValueError(f"unknown question type {qtype!r}")
    return q, answer_from_scene(scene, qtype, params), params


def sample(split: str, index: int) -> Sample:
    """Deterministic sample ``index`` of ``split``; question type = QUESTION_TYPES[index % 7]."""
    rng = rng_for(split, index)
    qtype = QUESTION_TYPES[index % len(QUESTION_TYPES)]
    while True:
        scene = make_scene(rng)
        qa = make_question(scene, qtype, rng)
        if qa is not None:
            break
    image = render_scene(scene, rng)
    q, a, params = qa
    return Sample(image=image, question=q, answer=a, qtype=qtype, scene=scene, params=params,
                  split=split, index=index)


def conversation(split: str, index: int, n_questions: int = 6, max_objects: int | None = None,
                 balanced: bool = False, with_params: bool = False):
    """Several questions about one image (for multi-turn or packed training).

    Returns ``(image, turns, scene)`` with ``turns = [(qtype, question, answer), ...]``
    (``(qtype, question, answer, params)`` with ``with_params``).  Question types are taken in
    turn, starting at ``index % 7`` so every type leads equally often.  Questions are distinct,
    so a type with few possible questions in a scene (reading: one per object with a character)
    gets fewer turns; ``balanced=True`` repeats such a type's questions instead, so that every
    type the scene admits gets an equal share of the turns.
    """
    rng = rng_for(split, index, stream=1)
    scene = make_scene(rng, max_objects)
    image = render_scene(scene, rng)
    turns: list[tuple] = []
    seen = set()
    start = index % len(QUESTION_TYPES)
    order = [QUESTION_TYPES[(start + k) % len(QUESTION_TYPES)] for k in range(len(QUESTION_TYPES))]
    attempts = 0
    while len(turns) < n_questions and attempts < 4 * n_questions:
        qtype = order[attempts % len(order)]
        attempts += 1
        for _try in range(3 if balanced else 1):
            qa = make_question(scene, qtype, rng)
            if qa is None or qa[0] not in seen:
                break
        if qa is None or (qa[0] in seen and not balanced):
            continue
        seen.add(qa[0])
        turns.append((qtype, *qa) if with_params else (qtype, qa[0], qa[1]))
    return image, turns, scene


def blank_image(color: tuple[int, int, int] = (128, 128, 128)) -> Image.Image:
    """Uniform image used for the "image-blanked" control."""
    return Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), color)


def vocabulary() -> list[str]:
    """Every (lower-cased) word and punctuation token the generator and chat format can emit."""
    words = set()
    templates = [
        "what color colour is the ? shape object objects how many are there is there a an "
        "left or right of above below which quadrant in character on",
        "user : assistant :",
    ]
    for t in templates:
        words.update(t.split())
    words.update(COLOR_NAMES)
    words.update(SHAPES)
    words.update(PLURALS.values())
    words.update(NUMBER_WORDS)
    words.update(QUADRANTS)
    words.update(CHARACTERS)
    words.update(["yes", "no", "left", "right", "above", "below"])
    return sorted(words)
