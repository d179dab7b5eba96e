"""``duet-vlm demo``: the shipped demo model asked about one synthetic scene with all tokens and with
DUET, and a figure of the patches DUET kept.

>>> shown = showcase(index=3, budget=64, output="duet_demo.png")                   # doctest: +SKIP
>>> [answer.text for answer in shown.answers], shown.sample.answer                  # doctest: +SKIP
(['red', 'red'], 'red')
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from .. import synthetic
from ..adapters import adapter_for
from ..compare import Answer, compare, draw_overlay
from ..methods import Duet
from .evaluate import load_demo


@dataclass
class Shown:
    """The question asked, the answers (all tokens, then DUET) and the figure written."""

    sample: synthetic.Sample
    answers: list[Answer]
    overlay: Path


def showcase(index: int = 3, budget: int = 64, output: str | Path = "duet_demo.png", model_path: Optional[Path] = None,
             rounds: int = 5) -> Shown:
    """Test-split sample ``index`` asked of the demo model (``model_path``, default the shipped one)
    with all tokens and with ``Duet(budget=budget)``, prefills timed in ``rounds`` interleaved rounds;
    the kept patches drawn to ``output``."""
    model, processor = load_demo(model_path)
    sample = synthetic.sample("test", index)
    answers = compare(model, processor, sample.image, sample.question,
                      {"all tokens": None, f"DUET {budget}": Duet(budget=budget)}, rounds=rounds)
    grid = adapter_for(model).geometry.grid
    path = draw_overlay(sample.image, answers[1].stats, grid, output, title=f"{sample.question}  ->  {answers[1].text!r}")
    return Shown(sample, answers, path)
