"""Integrations with evaluation frameworks; each lives in its own module and is imported on demand.

The ``lmms-eval`` extra (README) registers lmms-eval models through the entry point that
``lmms_eval_manifest`` declares: ``duet_llava_hf`` (also ``duet_llava_next_hf`` and
``duet_llava_onevision_hf``) and ``duet_video_llava`` in ``lmms_eval_models``, which also holds the
``ReducerMixin`` they share, and ``duet_qwen2_vl``, ``duet_qwen2_5_vl``, ``duet_qwen3_vl`` in
``lmms_eval_qwen``.
"""
