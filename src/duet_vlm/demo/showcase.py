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
from .evaluate import load_demo, shipped_or_given


@dataclass
class Shown:
    """The question asked, the answers (all tokens, then DUET) and the figure written."""

    sample: synthetic.Sample
    answers: list[Answer]
    overlay: Path


#: ``duet-vlm demo``'s DUET budget on each shipped demo model: 64 of LLaVA's 576 tokens, the same
#: share (a quarter of 64) of Qwen2.5-VL's 144.
DEMO_BUDGETS = {"llava": 64, "qwen2_5_vl": 16}


def showcase(index: int = 3, budget: int | None = None, output: str | Path = "duet_demo.png", model_path: Optional[Path] = None,
             rounds: int = 5, demo: str = "llava") -> Shown:
    """Test-split sample ``index`` asked of the demo model (``model_path``, default the shipped one named
    ``demo``: ``"llava"`` or ``"qwen2_5_vl"``) with all tokens and with ``Duet(budget=budget)`` (default:
    ``DEMO_BUDGETS``), prefills timed in ``rounds`` interleaved rounds; the kept patches drawn to ``output``."""
    model, processor = load_demo(shipped_or_given(demo, model_path))
    budget = budget if budget is not None else DEMO_BUDGETS[demo]
    sample = synthetic.sample("test", index)
    answers = compare(model, processor, sample.image, sample.question,
                      {"all tokens": None, f"DUET {budget}": Duet(budget=budget)}, rounds=rounds)
    stats = answers[1].stats
    (_, rows, cols), = stats.items[0].views  # the image's own token grid (24x24 patches, or Qwen's 12x12 tokens)
    path = draw_overlay(sample.image, stats, (rows, cols), output, title=f"{sample.question}  ->  {answers[1].text!r}",
                        has_cls=adapter_for(model).geometry.has_cls)
    return Shown(sample, answers, path)
