"""What each mode of ``generate`` does under each kind of method: the README's "Generation modes"
table (``docs/render.py``) and the list that ``tests/test_generation_modes_table.py`` checks cell by
cell, so the table cannot say what the tests do not show.

A method's kind comes from the plan it solves (``kind_of``), not from a list: which stages it has,
and whether its vision stage reads the prompt's text (``VisionStage.needs_text``). A cell is an
outcome (``equal``: equals the mode's reference; ``refused``: ``NotImplementedError`` at the prefill,
whose message contains ``says``; ``warns``: runs, equals the reference, and warns) and the short
text the table shows.

>>> kind_of("visionzip"), kind_of("fastv"), kind_of("cdpruner")
('vision', 'language', 'vision_text')
>>> cell("static_cache", "language").outcome, cell("prompt_lookup", "language").outcome
('equal', 'refused')
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .geometry import Geometry
from .methods import METHODS, Reducer, make
from .plan import Plan

#: The geometry a method is classified on: a LLaVA-1.5 image (576 tokens, 32 decoder layers).
LLAVA15 = Geometry(32, 576, (24, 24), True, encoder_depth=24)


@dataclass(frozen=True)
class Kind:
    """A kind of method, as its plan shows it."""

    key: str
    label: str  # the table's column header


KINDS: tuple[Kind, ...] = (
    Kind("full", "`full`"),
    Kind("vision", "vision"),
    Kind("vision_text", "vision, reads the prompt"),
    Kind("language", "language"),
    Kind("vision_language", "vision + language"),
)


def kind_of_plan(plan: Plan) -> str:
    """The kind of a solved plan: a language stage (alone or after a vision stage) decides first,
    then a vision stage that reads the prompt's text, then any vision stage; none is ``full``.

    >>> kind_of_plan(make("duet", budget=64).resolve(LLAVA15, quiet=True))
    'vision_language'
    """
    if plan.language is not None:
        return "vision_language" if plan.vision is not None else "language"
    if plan.vision is not None:
        return "vision_text" if plan.vision.needs_text else "vision"
    return "full"


def kind_of(method: str | Reducer, geometry: Geometry = LLAVA15) -> str:
    """The kind of a registered method (by name, at a quarter of the tokens) or of a reducer, from
    the plan it solves for ``geometry``.

    >>> kind_of("pyramiddrop"), kind_of(make("pool", budget=64))
    ('language', 'vision')
    """
    if isinstance(method, str):  # a method whose count follows the content takes no ratio
        reducer = make(method, ratio=0.25) if METHODS[method].takes_budget else make(method)
    else:
        reducer = method
    return kind_of_plan(reducer.resolve(geometry, quiet=True))


def methods_by_kind() -> dict[str, list[str]]:
    """Every registered method under its kind, in the registry's order.

    >>> methods_by_kind()["full"]
    ['full']
    """
    found: dict[str, list[str]] = {kind.key: [] for kind in KINDS}
    for name in METHODS:
        found[kind_of(name)].append(name)
    return found


@dataclass(frozen=True)
class Cell:
    """One mode under one kind of method: ``outcome`` is ``equal``, ``refused`` or ``warns``."""

    outcome: str
    text: str = ""  # the table's note: why it is refused and what to do instead, what a warning means
    says: str = ""  # refused: a fragment of the refusal's message (a regular expression)

    def __post_init__(self) -> None:
        if self.outcome not in ("equal", "refused", "warns"):
            raise ValueError(f"a cell's outcome is 'equal', 'refused' or 'warns', got {self.outcome!r}")
        if self.outcome == "refused" and not self.says:
            raise ValueError("a refused cell names a fragment of the refusal's message (says=)")


@dataclass(frozen=True)
class Mode:
    """A generation mode: how it is asked for, what ``equal`` compares it to, and a cell per kind."""

    key: str
    label: str  # how it is asked for (markdown)
    reference: str  # what an ``equal`` cell equals
    cells: dict[str, Cell] = field(default_factory=dict)


EQUAL = Cell("equal")


def _every(cell: Cell) -> dict[str, Cell]:
    return {kind.key: cell for kind in KINDS}


_DRAFTS = Cell(
    "refused", "refused at the prefill, before any token: the drafts would steer what is kept",
    says="prompt-lookup decoding put drafted tokens into the prefill",
)
_DRAFT_CELLS = {"full": EQUAL, "vision": EQUAL, "vision_text": _DRAFTS, "language": _DRAFTS, "vision_language": _DRAFTS}
_STATIC = Cell("equal", "each layer's buffer holds the tokens it keeps; needs transformers 5.24 (refused by name "
               "before)")
_SHORTER = Cell("refused", "refused: a reduced input leaves the cache shorter than the prompt; pass the whole "
                "conversation again without the cache",
                says="pass the whole conversation again without past_key_values")
_NEW_IMAGE = Cell("refused", "refused: the new image would be reduced on top of a cache; pass the whole "
                  "conversation again without it",
                  says="new images or videos on top of a cache")
_HIDDEN = Cell("warns", "warns (`ReducedHiddenStatesWarning`): each layer's hidden states at its reduced length")

MODES: tuple[Mode, ...] = (
    Mode("greedy", "greedy, a padded batch (`do_sample=False`)", "each row alone: tokens, logits", _every(EQUAL)),
    Mode("sampling", "sampling, several sequences (`do_sample=True`, `num_return_sequences`)",
         "the prompt repeated in a batch, same seed", _every(EQUAL)),
    Mode("beam_search", "beam search (`num_beams`)", "each prompt of a batch alone", _every(EQUAL)),
    Mode("no_cache", "`use_cache=False`", "cached decoding (the first prefill's selection is kept)", _every(EQUAL)),
    Mode("prompt_lookup", "prompt lookup (`prompt_lookup_num_tokens`), drafts in the prefill", "greedy decoding",
         _DRAFT_CELLS),
    Mode("assisted", "assisted decoding (`assistant_model`)", "greedy decoding", _DRAFT_CELLS),
    # Each layer's static buffer holds its own kept tokens and the new ones (``runtime.static``).
    Mode("static_cache", "`cache_implementation=\"static\"`", "the dynamic cache (logits within 1e-5)",
         {**_every(_STATIC), "full": EQUAL}),
    # A vision stage leaves the cache shorter than the prompt, so generate() resends part of it; a
    # language stage alone keeps the entry whole, and the turn's tokens run like decoding steps.
    Mode("second_turn", "a second turn on `past_key_values`, text only", "the same tokens forced in one call",
         {"full": EQUAL, "vision": _SHORTER, "vision_text": _SHORTER, "language": EQUAL, "vision_language": _SHORTER}),
    Mode("second_turn_image", "a second turn on `past_key_values` with a new image", "the unpatched model",
         {**_every(_NEW_IMAGE), "full": EQUAL}),
    Mode("compile", "`model.compile()`", "eager generation", _every(EQUAL)),
    Mode("threads", "threads sharing one attached model", "the same calls one after another", _every(EQUAL)),
    # Warned where a prefill reduces something; under ``full`` every length is the input's.
    Mode("hidden_states", "`output_hidden_states=True`", "greedy decoding without them",
         {**_every(_HIDDEN), "full": EQUAL}),
)


def mode(key: str) -> Mode:
    """The mode named ``key``."""
    for found in MODES:
        if found.key == key:
            return found
    raise KeyError(f"no generation mode {key!r}; known: {', '.join(m.key for m in MODES)}")


def cell(mode_key: str, kind: str) -> Cell:
    """What mode ``mode_key`` does under methods of kind ``kind``.

    >>> cell("prompt_lookup", kind_of("duet")).outcome
    'refused'
    """
    return mode(mode_key).cells[kind]


def markdown() -> str:
    """The table (a column per kind; a row's notes say why a cell refuses or warns), and which
    registered method is of which kind."""
    head = ["mode", "`equal` to", *(kind.label for kind in KINDS), "notes"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for found in MODES:
        cells = [found.cells[kind.key] for kind in KINDS]
        notes = "; ".join(dict.fromkeys(c.text for c in cells if c.text))
        lines.append("| " + " | ".join([found.label, found.reference, *(c.outcome for c in cells), notes]) + " |")
    members = methods_by_kind()
    lines += ["", "Kinds, from each method's plan (`duet_vlm.generation_modes.kind_of`): " + "; ".join(
        f"{kind.label}: {', '.join(f'`{name}`' for name in members[kind.key]) or 'none'}" for kind in KINDS) + "."]
    return "\n".join(lines) + "\n"
