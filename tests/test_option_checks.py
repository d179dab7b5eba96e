"""Every numeric option of every registered method is checked once, when the reducer is built, by
``duet_vlm.options`` (``check_number`` / ``check_numbers``): a string, a bool, a float where an int
is asked, ``None`` where the option is required, or a value outside the option's range raises one
``ValueError`` that names the option and the value given; the range's own bounds are accepted.
Plus the helper itself: its wording, and its rules against an independent statement of them."""

from __future__ import annotations

import dataclasses
import doctest
import math
import re
from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import duet_vlm
from duet_vlm import Geometry
from duet_vlm.options import check_number, check_numbers, describe_range

LLAVA15 = Geometry(num_layers=32, visual_tokens=576, grid=(24, 24), has_cls=True)


@dataclass(frozen=True)
class Range:
    """An option's accepted values (for a tuple option: each element's; ``length``: the count)."""

    integer: bool = False
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    optional: bool = False
    length: int | None = None

    def inside(self) -> list:
        """Values the range accepts: its closed bounds and a value between them."""
        step = 1 if self.integer else 0.5
        values = [bound for bound, is_open in ((self.low, self.low_open), (self.high, self.high_open))
                  if bound is not None and not is_open]
        if self.low is not None and self.high is not None:
            middle = (self.low + self.high) / 2
            values.append(math.floor(middle) if self.integer else middle)
        elif self.low is not None:
            values.append(self.low + 2 * step)
        elif self.high is not None:
            values.append(self.high - 2 * step)
        else:
            values += [0, -7]
        return values

    def outside(self) -> list:
        """Values just past each bound (the bound itself where it is open)."""
        step = 1 if self.integer else 0.5
        values = []
        if self.low is not None:
            values.append(self.low if self.low_open else self.low - step)
        if self.high is not None:
            values.append(self.high if self.high_open else self.high + step)
        return values


INT_1 = Range(integer=True, low=1)
UNIT = Range(low=0, high=1)
# The range of every numeric option of the registered methods, as their __post_init__ declares it;
# ``(method, option)`` where a method's option differs from the others of that name.
RANGES: dict = {
    "budget": Range(integer=True, low=1, optional=True),
    ("duet", "budget"): Range(integer=True, low=1),  # needed unless dominant and contextual are given
    ("sparsevlm", "budget"): Range(integer=True, low=1),  # needed unless keep is given
    "layer": INT_1,
    ("holitom", "layer"): Range(integer=True, low=1, optional=True),
    ("hiprune", "alpha"): Range(low=0, high=1),
    ("pixelprune", "threshold"): UNIT,
    ("random_horizon", "layer"): Range(integer=True, low=1, optional=True),
    ("apet", "layer"): Range(integer=True, low=1, optional=True),
    "basis": INT_1,
    "inner_ratio": Range(low=0, high=1, low_open=True),
    "keep": Range(integer=True, low=0, optional=True),
    "ratio": Range(low=0, high=1, optional=True),
    "image_pivots": INT_1,
    "text_pivots": Range(integer=True, low=0),
    "theta": Range(low=0, high=1, high_open=True, optional=True),
    "dominant": Range(integer=True, low=1, optional=True),  # it counts the CLS token
    "contextual": Range(integer=True, low=0, optional=True),
    "cluster_width": Range(integer=True, low=1, optional=True),
    "layers": Range(integer=True, low=1, optional=True),
    "ratios": Range(low=0, high=1, optional=True),
    "retain_ratio": Range(low=0, high=1, low_open=True, optional=True),
    "tau": Range(low=-1, high=1, optional=True),
    "beta": UNIT,
    "knn": INT_1,
    "max_window": INT_1,
    "merge_ratio": Range(low=0, high=1, high_open=True),
    "llm_input": Range(integer=True, low=1, optional=True),
    "vision_ratio": Range(low=0, high=1, low_open=True, optional=True),
    "window": Range(integer=True, low=1, optional=True),
    "local_share": UNIT,
    "threshold": Range(low=-1, high=1),
    "proxy_tokens": INT_1,
    "shape": Range(integer=True, low=1, optional=True, length=2),
    "decay": Range(low=0, high=1, optional=True),
    "seed": Range(integer=True),
    "important_ratio": UNIT,
    "step": INT_1,
}
# Checked when planning, not when building: DUET's ratios lie in [0, 1] by the schedule's check.
PLAN_TIME = {("duet", "ratios")}


def numeric(annotation: str) -> bool:
    """Options holding numbers only (``int | str`` layer options take names too; bools are flags)."""
    words = set(re.findall(r"\w+", annotation))
    return bool(words & {"int", "float"}) and not words & {"str", "bool", "Any"}


def is_tuple(method: str, option: str) -> bool:
    spec = next(spec for spec in dataclasses.fields(duet_vlm.METHODS[method]) if spec.name == option)
    return spec.type.startswith("tuple")


OPTIONS = sorted(
    (name, spec.name) for name, cls in duet_vlm.METHODS.items() for spec in dataclasses.fields(cls)
    if numeric(spec.type)
)


def range_of(method: str, option: str) -> Range:
    return RANGES.get((method, option), RANGES.get(option))


def companions(method: str, option: str, value) -> dict:
    """The other options that make ``value`` a complete setting (boundaries for ratios and back)."""
    budget = {} if option == "budget" or not duet_vlm.METHODS[method].takes_budget else {"budget": 64}
    if value is None:
        return budget
    count = len(value) if isinstance(value, tuple) else 1
    if (method, option) == ("duet", "layers"):
        return {**budget, "ratios": (0.5,) * count}
    if (method, option) in {("duet", "ratios"), ("pyramiddrop", "ratios"), ("pio", "keep"), ("pio", "ratios"),
                            ("vscan", "keep"), ("vscan", "ratios"), ("v2drop", "ratios")}:
        return {**budget, "layers": tuple(8 * (i + 1) for i in range(count))}
    return budget


def values_for(method: str, option: str, scalars: list, lengths=(1, 2)) -> list:
    """``scalars`` as the option takes them: for a tuple option each one last after accepted elements
    (tuples of ``lengths``, or of the option's own length)."""
    if not is_tuple(method, option):
        return scalars
    spec = range_of(method, option)
    good = spec.inside()[0]
    return [(good,) * (n - 1) + (value,) for value in scalars for n in ([spec.length] if spec.length else lengths)]


def refusals(method: str, option: str) -> list:
    spec = range_of(method, option)
    wrong = ["8", True] + ([2.0] if spec.integer else [float("nan")]) + ([] if spec.optional else [None])
    if is_tuple(method, option):
        wrong = ["8", True, ("8",), (True,)] + ([(2.0,)] if spec.integer else [(float("nan"),)])
        if spec.length:
            wrong.append((spec.inside()[0],) * (spec.length + 1))
    return wrong + values_for(method, option, spec.outside())


def accepted(method: str, option: str) -> list:
    spec = range_of(method, option)
    return values_for(method, option, spec.inside(), lengths=(1,)) + ([None] if spec.optional else [])


def _cases(kind):
    for method, option in OPTIONS:
        if range_of(method, option) is None:
            continue  # test_every_numeric_option_has_a_range reports it
        for value in (refusals if kind == "refused" else accepted)(method, option):
            yield pytest.param(method, option, value, id=f"{method}-{option}-{value!r}")


def test_every_numeric_option_has_a_range():
    """A new numeric option joins RANGES (with the range its __post_init__ checks); no stale entries."""
    missing = [(method, option) for method, option in OPTIONS if range_of(method, option) is None]
    assert not missing, f"numeric options without a range here: {missing}"
    names = {option for _, option in OPTIONS} | set(OPTIONS)
    assert not set(RANGES) - names, sorted(map(str, set(RANGES) - names))
    assert len(OPTIONS) > 50 and {"budget", "ratios", "retain_ratio", "shape"} <= {option for _, option in OPTIONS}


@pytest.mark.parametrize("method, option, value", list(_cases("refused")))
def test_a_wrong_value_is_refused_naming_the_option(method, option, value):
    options = {**companions(method, option, value), option: value}
    cls = duet_vlm.METHODS[method]
    with pytest.raises(ValueError) as error:
        reducer = cls(**options)
        if (method, option) not in PLAN_TIME:
            pytest.fail(f"{method}({options}) was built")
        reducer.plan(LLAVA15)
    message = str(error.value)
    if (method, option) in PLAN_TIME:
        assert re.search(rf"\b{option} must", message), message
    else:
        assert message.startswith(f"{option} "), message
    assert message.endswith(f"got {value!r}"), message


@pytest.mark.parametrize("method, option, value", list(_cases("accepted")))
def test_a_value_in_range_is_accepted(method, option, value):
    options = {**companions(method, option, value), option: value}
    reducer = duet_vlm.METHODS[method](**options)
    assert getattr(reducer, option) == value


def test_the_wrappers_check_their_numbers_too():
    """Adaptive (its threshold's range depends on the signal), a ratio of each item, per-row ratios."""
    duet = duet_vlm.make("duet", budget=64)
    for options, message in [
        (dict(threshold=True), "threshold of the rank signal must be a number in [0.0, 64.0], got True"),
        (dict(signal="coverage", threshold=1.5), "threshold of the coverage signal must lie in [0.0, 1.0], got 1.5"),
        (dict(floor="0.5"), "floor must be a number in (0, 1] (a fraction of the average budget), got '0.5'"),
        (dict(ceiling=0.5), "ceiling must be >= 1 (a multiple of the average budget), got 0.5"),
    ]:
        with pytest.raises(ValueError) as error:
            duet_vlm.Adaptive(duet, **options)
        assert str(error.value) == message
    with pytest.raises(ValueError, match=re.escape("ratio must lie in (0, 1] (the kept fraction of each item's "
                                                   "tokens), got 0")):
        duet_vlm.make("duet", ratio=0)
    with pytest.raises(ValueError, match=re.escape("per-row ratios must be a number in (0, 1], got 'x'")):
        with duet.per_row(ratio=[0.5, "x"]):
            pass


# ----------------------------------------------------------------------------- the helper
@pytest.mark.parametrize("value, options, message", [
    (-1, dict(integer=True, low=0), "keep must be an int >= 0, got -1"),
    (2.5, dict(integer=True, low=0), "keep must be an int >= 0, got 2.5"),
    (True, dict(integer=True, low=0), "keep must be an int >= 0, got True"),
    (0, dict(integer=True, low=0, low_open=True), "keep must be a positive int, got 0"),
    (1.5, dict(low=0, high=1), "keep must lie in [0, 1], got 1.5"),
    ("1", dict(low=0, high=1), "keep must be a number in [0, 1], got '1'"),
    (float("nan"), dict(low=0, high=1), "keep must be a number in [0, 1], got nan"),
    (0, dict(low=0, low_open=True, note="why"), "keep must be > 0 (why), got 0"),
    (1, dict(high=1, high_open=True), "keep must be < 1, got 1"),
    (1, dict(low=0, high=1, high_open=True, kind="a share"), "keep must be a share in [0, 1), got 1"),
    (None, dict(integer=True), "keep must be an int, got None"),
])
def test_the_messages(value, options, message):
    with pytest.raises(ValueError) as error:
        check_number("keep", value, **options)
    assert str(error.value) == message


@pytest.mark.parametrize("values, options, message", [
    ("8", dict(integer=True, low=1), "layers must be a sequence of ints >= 1, got '8'"),
    ((8, 0), dict(integer=True, low=1), "layers must be ints >= 1, got (8, 0)"),
    ([8, True], dict(integer=True, low=1), "layers must be ints >= 1, got [8, True]"),
    ((0.5, 1.5), dict(low=0, high=1), "layers must lie in [0, 1], got (0.5, 1.5)"),
    ((1, 2, 3), dict(integer=True, low=0, low_open=True, length=2), "layers must be two positive ints, got (1, 2, 3)"),
    (None, dict(integer=True), "layers must be a sequence of ints, got None"),
])
def test_the_messages_of_tuples(values, options, message):
    with pytest.raises(ValueError) as error:
        check_numbers("layers", values, **options)
    assert str(error.value) == message


def test_what_passes_comes_back():
    assert check_number("x", 3, integer=True, low=1) == 3 and check_number("x", None, optional=True) is None
    assert check_number("x", math.inf, low=0) == math.inf and check_number("x", -7, integer=True) == -7
    assert check_numbers("x", [1, 2], integer=True) == (1, 2) and check_numbers("x", 0.5, low=0) == (0.5,)
    assert check_numbers("x", (), integer=True) == () and check_numbers("x", None, optional=True) is None
    assert describe_range(0, 1, low_open=True) == "in (0, 1]" and describe_range() == ""


bounds = st.one_of(st.none(), st.integers(-5, 5))


@settings(max_examples=300, deadline=None)
@given(bounds, bounds, st.booleans(), st.booleans(), st.one_of(st.integers(-8, 8), st.floats(-8, 8), st.booleans()),
       st.booleans())
def test_the_rules_against_their_statement(low, high, low_open, high_open, value, integer):
    """Accepted exactly when the value is an int (or, without ``integer``, a float) that is not a
    bool, at or beyond each closed bound and strictly beyond each open one; a refusal names the
    option, the bound it broke and the value."""
    kind_ok = type(value) is int or (not integer and type(value) is float)
    above = low is None or value > low or (value == low and not low_open)
    below = high is None or value < high or (value == high and not high_open)
    if kind_ok and above and below:
        assert check_number("x", value, integer=integer, low=low, high=high, low_open=low_open,
                            high_open=high_open) == value
        return
    with pytest.raises(ValueError) as error:
        check_number("x", value, integer=integer, low=low, high=high, low_open=low_open, high_open=high_open)
    message = str(error.value)
    assert message.startswith("x must ") and message.endswith(f", got {value!r}")
    positive = integer and low == 0 and low_open and high is None
    assert ("positive" if positive else describe_range(low, high, low_open, high_open)) in message


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(1, 9), max_size=6), st.integers(0, 6), st.sampled_from([0, -3, 2.0, True, "1"]))
def test_every_element_is_checked(values, where, bad):
    """One bad element anywhere in the tuple is refused; a tuple of good ones comes back as a tuple."""
    assert check_numbers("layers", values, integer=True, low=1) == tuple(values)
    broken = values[:where] + [bad] + values[where:]
    with pytest.raises(ValueError, match=r"^layers must be ints >= 1, got "):
        check_numbers("layers", broken, integer=True, low=1)


def test_doctests():
    result = doctest.testmod(duet_vlm.options)
    assert result.failed == 0 and result.attempted > 5
