"""Name -> method class, filled by the methods themselves (``register_method``); ``make`` and
``from_dict`` build reducers by name with the same budget meaning for every method."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, TypeVar

from .base import Compose, PerItemRatio, Reducer

METHODS: dict[str, type[Reducer]] = {}

R = TypeVar("R", bound=type[Reducer])


def register_method(name: str) -> Callable[[R], R]:
    """Class decorator: register a ``Reducer`` under ``name`` (``make(name)``, the CLI, lmms-eval,
    and every test of the method matrix pick it up).

    >>> @register_method("mine")                                     # doctest: +SKIP
    ... @dataclass
    ... class Mine(Reducer): ...
    """

    def register(cls: R) -> R:
        if name in METHODS and METHODS[name] is not cls:
            raise ValueError(f"a method named {name!r} is already registered ({METHODS[name].__name__})")
        cls.method_name = name
        METHODS[name] = cls
        return cls

    return register


def method_class(name: str) -> type[Reducer]:
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; registered: {', '.join(sorted(METHODS))}") from None


def make(name: str, budget: int | None = None, ratio: float | None = None, **options) -> Reducer:
    """Build a registered method by name, with an absolute ``budget`` (average visual tokens per
    decoder layer, per visual item) or a ``ratio`` of each item's own tokens.

    >>> reducer = make("duet", budget=128)
    >>> with reducer(model): model.generate(**inputs)      # doctest: +SKIP
    >>> make("visionzip", ratio=0.25)                       # doctest: +SKIP
    """
    method = method_class(name)
    if not method.takes_budget and (budget is not None or ratio is not None):
        raise ValueError(
            f"{name} takes no budget or ratio: each item's count follows its content (see its options, e.g. a threshold)"
        )
    if ratio is not None:
        if budget is not None:
            raise ValueError("give a budget or a ratio, not both")
        positions = options.pop("positions", None)
        return PerItemRatio(method, ratio, options, positions=positions)
    return method(budget=budget, **options) if budget is not None else method(**options)


def default_budget(name: str, budget: int | None, ratio: float | None, default: int = 64) -> int | None:
    """The budget a command runs ``name`` at when the user gave neither a budget nor a ratio:
    ``default`` for a method that takes one, ``None`` for one whose count follows the content
    (PixelPrune); the budget given otherwise.

    >>> default_budget("duet", None, None), default_budget("pixelprune", None, None), default_budget("duet", 32, None)
    (64, None, 32)
    """
    if budget is None and ratio is None and method_class(name).takes_budget:
        return default
    return budget


def from_dict(record: dict[str, Any], **objects) -> Reducer:
    """Rebuild the reducer that ``reducer.to_dict()`` recorded; ``objects`` supplies what a record
    leaves out (e.g. ``tokenizer=`` for DUET's ``query="salient"``), to the methods that take it.

    >>> from_dict(make("duet", budget=64).to_dict()) == make("duet", budget=64)
    True
    """
    record = dict(record)
    try:
        name = record.pop("method")
    except KeyError:
        raise ValueError(f"a reducer record names its method ('method': ...), got keys {sorted(record)}") from None
    if name == Compose.method_name:
        vision, language = (from_dict(record.pop(part), **objects) for part in ("vision", "language"))
        return Compose(vision, language, **record)
    if name == "adaptive":
        from .adaptive import Adaptive

        return Adaptive(from_dict(record.pop("reducer"), **objects), **record)
    method = method_class(name)
    options = {key: _tuples(value) for key, value in record.items()}
    # ``to_dict`` writes a default of a type of its own (``shapes.DefaultLayer``, which snaps where a
    # given layer does not) as its number: a recorded value equal to such a default is that default.
    marked = {spec.name: spec.default for spec in dataclasses.fields(method)
              if spec.default is not dataclasses.MISSING and type(spec.default) not in (int, float, bool, str, type(None))}
    options = {key: value for key, value in options.items() if not (key in marked and marked[key] == value)}
    options.update({key: value for key, value in objects.items() if key in method.runtime_fields})
    return make(name, **options)


def _tuples(value: Any) -> Any:
    """Lists in a record were tuples (JSON has no tuples)."""
    return tuple(_tuples(v) for v in value) if isinstance(value, list) else value


#: The file a model directory fine-tuned under a reducer carries beside its weights (``save_reducer``).
REDUCER_FILE = "duet_vlm_reducer.json"


def save_reducer(reducer: Reducer, directory) -> "Path":
    """Write ``reducer.to_dict()`` beside a model's weights (``directory/duet_vlm_reducer.json``), so
    that loading the model (``load_reducer``, ``duet-vlm run``, the lmms-eval models) attaches it again.

    >>> save_reducer(make("duet", budget=64), "runs/duet64")           # doctest: +SKIP
    """
    import json
    from pathlib import Path

    path = Path(directory) / REDUCER_FILE
    path.write_text(json.dumps(reducer.to_dict(), indent=2) + "\n")
    reducer.save_objects(directory)  # e.g. a trained scorer
    return path


def load_reducer(directory, **objects) -> Reducer | None:
    """The reducer a model directory was fine-tuned under (``save_reducer``), or ``None`` when it
    carries none (a Hub id or a plain checkpoint). ``objects`` as for ``from_dict``.

    >>> reducer = load_reducer("runs/duet64")                          # doctest: +SKIP
    >>> with reducer(model): model.generate(**inputs)                  # doctest: +SKIP
    """
    import json
    from pathlib import Path

    path = Path(directory) / REDUCER_FILE
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not a reducer record (JSON): {error}") from error
    name = record.get("method") if isinstance(record, dict) else None
    if name in METHODS:  # what the method saved beside the record (a trained scorer)
        objects = {**METHODS[name].load_objects(directory), **objects}
    return from_dict(record, **objects)
