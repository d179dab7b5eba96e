"""Benchmarks, measured side by side in one process: every variant of a run is timed in interleaved
rounds against the unreduced model and against the ideal (the model's own layers on the same
per-layer token counts, with nothing choosing tokens).

They share one model builder (``models``), one timer (``timing``) and one ideal model (``ideal``):

- ``prefill``: Stage A's vision-side cost and the prefill per method (``duet-vlm bench``), and a
  family's typical prompt (``duet-vlm bench --family``), each method against its ideal: what its
  choosing costs, that cost's share of what its tokens save, and whether it pays on the geometry
  (``selection_costs``); ``selection``: the selection FLOPs a method's count declares;
- ``generate``: ``generate`` end to end, latency, throughput, memory (``duet-vlm bench --generate``);
- ``train``: a training step and its parts (``duet-vlm bench --train``); ``end_to_end`` runs either
  per batch size;
- ``vision``: Stage A's cost on Qwen2.5-VL's tower; ``compiled``: ``model.compile()`` against eager.
- ``live``: what is alive at a ``generate`` call's memory peak, and which frame holds it, for a method
  and its ideal (``python -m duet_vlm.bench.live``).

>>> from duet_vlm.bench import ModelSize, prefill_benchmark
>>> prefill_benchmark(ModelSize(), ["duet"], [64], rounds=3)["prefill"]["duet 64"]    # doctest: +SKIP
"""

from .ideal import IdealModel
from .models import FAMILIES, ModelSize, build_family, build_model, example_inputs, padded_inputs
from .prefill import family_benchmark, prefill_benchmark, selection_costs, vision_variants
from .timing import LanguageModelTimer, PeakRSS, interleaved, median_ratio

__all__ = [
    "FAMILIES", "IdealModel", "LanguageModelTimer", "ModelSize", "PeakRSS", "build_family", "build_model",
    "example_inputs", "family_benchmark", "interleaved", "median_ratio", "padded_inputs", "prefill_benchmark",
    "selection_costs", "vision_variants",
]
