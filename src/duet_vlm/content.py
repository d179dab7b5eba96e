"""How much an image holds, from its vision encoder's view: the signals a content-adaptive budget
reads. Each turns one item's units (an image, or a video's frames) into a ``Curve``: a token count
as a non-decreasing function of a threshold, so that one threshold, calibrated over sample data,
gives every item its own count and the data the average asked for.

- ``coverage``: the tokens needed to cover a share ``p`` of each unit's attention mass (CLS
  attention, or attention received without CLS). A plain wall concentrates its attention on a few
  patches; a crowded scene spreads it.
- ``distinct``: the tokens that are not near-duplicates (cosine of keys at least ``tau``) of a more
  attended token: how many different things the image shows.
- ``rank``: ``alpha`` times the effective rank of the unit's features (the exponential of the
  entropy of their normalised singular values).

>>> curve = coverage_curve(torch.tensor([[0.7, 0.1, 0.1, 0.1]]))
>>> curve.count(0.5), curve.count(0.75), curve.count(1.0)
(1, 2, 4)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

SIGNALS = ("coverage", "distinct", "rank")
# The range each signal's threshold lives in (bisection bounds for calibration).
THRESHOLD_RANGES = {"coverage": (0.0, 1.0), "distinct": (-1.0, 1.0), "rank": (0.0, 64.0)}


@dataclass(frozen=True)
class Curve:
    """A token count as a function of a threshold, for one item: ``count(t)`` is the sum over the
    item's units of how many sorted ``steps`` lie at or below ``t`` (or ``scale * t`` for ``rank``)."""

    steps: tuple[torch.Tensor, ...] = ()
    scale: float = 0.0

    def count(self, threshold: float) -> int:
        if not self.steps:
            return int(round(self.scale * threshold))
        value = torch.tensor(threshold, dtype=torch.float32)
        return int(sum(int(torch.searchsorted(steps, value, right=True)) for steps in self.steps))


def coverage_curve(scores: torch.Tensor) -> Curve:
    """``scores``: ``(units, P)`` non-negative attention of each patch. The k-th step is the share of
    the unit's mass its k most attended patches hold, so ``count(p)`` patches cover at least ``p``
    (the first patch always counts)."""
    mass = scores.float().clamp(min=0)
    share = mass.sort(dim=-1, descending=True).values.cumsum(dim=-1) / mass.sum(dim=-1, keepdim=True).clamp(min=1e-12)
    # Patch k+1 is needed while the first k cover less than p: its step is the share of the first k.
    steps = torch.cat([torch.full_like(share[:, :1], -1.0), share[:, :-1]], dim=-1)
    return Curve(tuple(unit.contiguous() for unit in steps))


def distinct_curve(scores: torch.Tensor, keys: torch.Tensor) -> Curve:
    """``keys``: ``(units, T, d)`` (patches last ``P``, a CLS first when ``T > P``). A patch counts at
    ``tau`` when no more attended patch is at least ``tau`` cosine-similar to it; its step is its
    highest similarity to a more attended patch (-1 for the most attended)."""
    patches = F.normalize(keys[:, keys.shape[1] - scores.shape[1] :].float(), dim=-1)
    similarity = patches @ patches.transpose(1, 2)
    higher = scores[:, None, :] > scores[:, :, None]  # [i, j]: patch j is more attended than i
    nearest = similarity.masked_fill(~higher, -1.0).max(dim=-1).values
    return Curve(tuple(unit.sort().values.contiguous() for unit in nearest))


def rank_curve(features: torch.Tensor) -> Curve:
    """``features``: ``(units, T, C)``; the effective rank summed over units."""
    total = 0.0
    for unit in features.float():
        singular = torch.linalg.svdvals(unit - unit.mean(dim=0))
        weights = singular / singular.sum().clamp(min=1e-12)
        total += float(torch.exp(-(weights * weights.clamp(min=1e-12).log()).sum()))
    return Curve(scale=total)


def curve(signal: str, scores: torch.Tensor, keys: torch.Tensor, features: torch.Tensor) -> Curve:
    if signal == "coverage":
        return coverage_curve(scores)
    if signal == "distinct":
        return distinct_curve(scores, keys)
    if signal == "rank":
        return rank_curve(features)
    raise ValueError(f"signal must be one of {SIGNALS}, got {signal!r}")


def calibrate_threshold(curves: list[Curve], targets: list[float], floors: list[float], ceilings: list[float],
                        low: float, high: float, steps: int = 40, snap=None) -> float:
    """The threshold at which the items' clamped counts average the targets' average (bisection on
    a non-decreasing function; the closest of the last two candidates wins). ``snap(i, count)``:
    item ``i``'s final count for a clamped ``count`` (non-decreasing in it), when not the count itself.

    >>> curves = [coverage_curve(torch.tensor([[0.7, 0.1, 0.1, 0.1]])), coverage_curve(torch.tensor([[0.25] * 4]))]
    >>> threshold = calibrate_threshold(curves, [2, 2], [1, 1], [4, 4], 0.0, 1.0)
    >>> [c.count(threshold) for c in curves]
    [1, 3]
    """
    goal = sum(targets) / len(targets)

    def average(threshold: float) -> float:
        counts = [min(max(c.count(threshold), f), g) for c, f, g in zip(curves, floors, ceilings)]
        if snap is not None:
            counts = [snap(i, count) for i, count in enumerate(counts)]
        return sum(counts) / len(counts)

    for _ in range(steps):
        middle = (low + high) / 2
        if average(middle) < goal:
            low = middle
        else:
            high = middle
    return min((low, high), key=lambda t: abs(average(t) - goal))
