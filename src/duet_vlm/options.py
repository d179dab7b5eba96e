"""The checks of a method's numeric options: one ``ValueError`` per rule, naming the option, the
accepted range and the value given, as PEFT's config dataclasses refuse a setting in ``__post_init__``.

A method declares each option's range once, in its ``__post_init__``, and the message follows from
it. ``bool`` is not a number here (``True`` is refused where an int or a number is asked), nor is NaN.

>>> check_number("keep", -1, integer=True, low=0)
Traceback (most recent call last):
ValueError: keep must be an int >= 0, got -1
>>> check_number("ratio", 1.5, low=0, high=1)
Traceback (most recent call last):
ValueError: ratio must lie in [0, 1], got 1.5
>>> check_numbers("layers", [8, 16], integer=True, low=1)
(8, 16)
"""

from __future__ import annotations

import math
from typing import Any

#: how ``check_numbers`` words a required length
COUNTS = {1: "one", 2: "two", 3: "three", 4: "four"}


def is_number(value: Any, integer: bool = False) -> bool:
    """Whether ``value`` is an ``int`` (``integer``) or an ``int``/``float`` that is not NaN; never a ``bool``.

    >>> is_number(3), is_number(3.0, integer=True), is_number(True), is_number(float("nan"))
    (True, False, False, False)
    """
    if isinstance(value, bool) or not isinstance(value, int if integer else (int, float)):
        return False
    return integer or not math.isnan(value)


def in_range(value: float, low=None, high=None, low_open: bool = False, high_open: bool = False) -> bool:
    """Whether ``value`` lies within the bounds (``None``: unbounded on that side; ``*_open``: excluded).

    >>> in_range(0, low=0), in_range(0, low=0, low_open=True), in_range(1, 0, 1, high_open=True)
    (True, False, False)
    """
    if low is not None and not (value > low if low_open else value >= low):
        return False
    return high is None or (value < high if high_open else value <= high)


def describe_range(low=None, high=None, low_open: bool = False, high_open: bool = False) -> str:
    """The bounds as a message writes them: ``"in [0, 1)"``, ``">= 1"``, ``"< 1"``, ``""`` (unbounded).

    >>> describe_range(0, 1, high_open=True), describe_range(low=1), describe_range(high=1, high_open=True)
    ('in [0, 1)', '>= 1', '< 1')
    """
    if low is not None and high is not None:
        return f"in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
    if low is not None:
        return f"{'>' if low_open else '>='} {low}"
    if high is not None:
        return f"{'<' if high_open else '<='} {high}"
    return ""


def _kind(integer: bool, positive: bool, plural: bool) -> str:
    if integer:
        if positive:
            return "positive ints" if plural else "a positive int"
        return "ints" if plural else "an int"
    return "numbers" if plural else "a number"


def _join(*parts: str) -> str:
    return " ".join(part for part in parts if part)


def check_number(
    name: str,
    value: Any,
    *,
    integer: bool = False,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
    optional: bool = False,
    kind: str | None = None,
    note: str | None = None,
) -> Any:
    """``value`` if it is a number of the range, else a ``ValueError`` naming ``name``, the range and
    ``value``; ``None`` passes when ``optional``.

    Two rules, one message each. The type: an int (``integer``) or a number (int or float; never a
    bool, never NaN). The range: ``low``/``high`` inclusive unless ``low_open``/``high_open``. An int
    ``> 0`` reads "a positive int"; a number out of its range reads "must lie in [low, high]" (or
    "must be > low" with one bound) and a non-number "must be a number in [low, high]". ``kind``
    names what the value is instead ("a cosine similarity"): then every refusal reads "must be {kind}
    {range}". ``note`` (what the option means) follows the range in brackets.

    >>> check_number("budget", 0, integer=True, low=0, low_open=True, note="visual tokens per layer")
    Traceback (most recent call last):
    ValueError: budget must be a positive int (visual tokens per layer), got 0
    >>> check_number("threshold", "high", low=-1, high=1, kind="a cosine similarity")
    Traceback (most recent call last):
    ValueError: threshold must be a cosine similarity in [-1, 1], got 'high'
    >>> check_number("seed", True, integer=True)
    Traceback (most recent call last):
    ValueError: seed must be an int, got True
    >>> check_number("tau", None, low=-1, high=1, optional=True) is None
    True
    """
    if value is None and optional:
        return value
    positive = integer and low == 0 and low_open and high is None
    span = "" if positive else describe_range(low, high, low_open, high_open)
    suffix = f" ({note})" if note else ""
    wanted = _join(kind or _kind(integer, positive, plural=False), span)
    if not is_number(value, integer):
        raise ValueError(f"{name} must be {wanted}{suffix}, got {value!r}")
    if not in_range(value, low, high, low_open, high_open):
        if not (integer or kind):  # a number: where it must lie
            wanted = f"lie {span}" if span.startswith("in ") else f"be {span}"
            raise ValueError(f"{name} must {wanted}{suffix}, got {value!r}")
        raise ValueError(f"{name} must be {wanted}{suffix}, got {value!r}")
    return value


def check_numbers(
    name: str,
    values: Any,
    *,
    integer: bool = False,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
    optional: bool = False,
    length: int | None = None,
    note: str | None = None,
) -> tuple | None:
    """``values`` as a tuple if every one is a number of the range (``check_number``'s rules), else a
    ``ValueError`` naming ``name``, the range and ``values``; a lone number is a tuple of one,
    ``None`` passes when ``optional``. ``length``: the count the tuple must have.

    >>> check_numbers("ratios", 0.5, low=0, high=1)
    (0.5,)
    >>> check_numbers("layers", "16", integer=True, low=1)
    Traceback (most recent call last):
    ValueError: layers must be a sequence of ints >= 1, got '16'
    >>> check_numbers("shape", (0, 4), integer=True, low=0, low_open=True, length=2, note="rows, cols")
    Traceback (most recent call last):
    ValueError: shape must be two positive ints (rows, cols), got (0, 4)
    >>> check_numbers("ratios", (0.5, 1.5), low=0, high=1)
    Traceback (most recent call last):
    ValueError: ratios must lie in [0, 1], got (0.5, 1.5)
    """
    if values is None and optional:
        return values
    positive = integer and low == 0 and low_open and high is None
    span = "" if positive else describe_range(low, high, low_open, high_open)
    suffix = f" ({note})" if note else ""
    wanted = _join(COUNTS.get(length, str(length)) if length is not None else "", _kind(integer, positive, True), span)
    given = values
    if isinstance(values, (int, float)):  # bools too: refused as elements
        values = (values,)
    if isinstance(values, (str, bytes)) or not hasattr(values, "__iter__"):
        raise ValueError(f"{name} must be a sequence of {wanted}{suffix}, got {given!r}")
    values = tuple(values)
    if (length is not None and len(values) != length) or not all(is_number(v, integer) for v in values):
        raise ValueError(f"{name} must be {wanted}{suffix}, got {given!r}")
    if not all(in_range(v, low, high, low_open, high_open) for v in values):
        if not integer and length is None:  # numbers: where they must lie
            wanted = f"lie {span}" if span.startswith("in ") else f"be {span}"
            raise ValueError(f"{name} must {wanted}{suffix}, got {given!r}")
        raise ValueError(f"{name} must be {wanted}{suffix}, got {given!r}")
    return values
