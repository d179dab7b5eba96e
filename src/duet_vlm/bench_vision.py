"""The old path of ``duet_vlm.bench.vision`` (kept while a test still imports it from here)."""

from .bench.vision import QWEN25_7B_VISION, qwen25_tower, stage_a_cost  # noqa: F401
