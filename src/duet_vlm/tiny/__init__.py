"""Tiny random-weight models of every family, and checkpoints of them: what the tests, the
benchmarks and the vLLM plugin's tests build, in one place; nothing a user of duet-vlm needs.

- ``duet_vlm.tiny.models``: a builder a family (the real transformers classes, configs written
  once: ``decoder``, ``clip_tower``, ``siglip_tower``), the test suite's models at their defaults;
- ``duet_vlm.tiny.checkpoints``: folders of those models that vLLM 0.32 and transformers load
  (weights, config, tokenizer, processor config, chat template), and ``load_hf``.
"""
