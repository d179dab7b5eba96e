"""What lmms-eval reads from the ``lmms_eval.models`` entry point: model names and class paths.

Kept apart from the model classes on purpose: lmms-eval loads entry points while
``lmms_eval.models`` is being imported, and importing the model classes at that moment is circular.
lmms-eval imports a class's module only when its model is requested.
"""

from __future__ import annotations

PACKAGE = "duet_vlm.integrations"

#: model id -> (class path, "chat" or "simple", aliases); lmms-eval's class decides which.
MODELS = {
    # lmms-eval's llava_hf picks LlavaForConditionalGeneration, LlavaNext... or LlavaOnevision...
    # from the checkpoint's config: one model, a name per family.
    "duet_llava_hf": (f"{PACKAGE}.lmms_eval_models.DuetLlavaHf", "chat",
                      ("duet_llava_next_hf", "duet_llava_onevision_hf")),
    "duet_video_llava": (f"{PACKAGE}.lmms_eval_models.DuetVideoLlava", "simple", ()),
    "duet_internvl_hf": (f"{PACKAGE}.lmms_eval_models.DuetInternVLHf", "chat", ()),
    "duet_gemma3": (f"{PACKAGE}.lmms_eval_models.DuetGemma3", "simple", ()),
    "duet_gemma4": (f"{PACKAGE}.lmms_eval_models.DuetGemma4", "simple", ()),
    "duet_qwen2_vl": (f"{PACKAGE}.lmms_eval_qwen.DuetQwen2VL", "simple", ()),
    "duet_qwen2_5_vl": (f"{PACKAGE}.lmms_eval_qwen.DuetQwen2_5_VL", "chat", ()),
    "duet_qwen3_vl": (f"{PACKAGE}.lmms_eval_qwen.DuetQwen3VL", "chat", ()),
    "duet_qwen3_5": (f"{PACKAGE}.lmms_eval_qwen.DuetQwen3_5", "chat", ()),
}


def manifests():
    """The ``lmms_eval.models`` entry point (a callable, so that nothing is imported at discovery).

    >>> sorted(m.model_id for m in manifests())                    # doctest: +SKIP
    ['duet_gemma3', 'duet_gemma4', 'duet_internvl_hf', 'duet_llava_hf', 'duet_qwen2_5_vl', 'duet_qwen2_vl', 'duet_qwen3_5', 'duet_qwen3_vl', ...]
    """
    from lmms_eval.models.registry_v2 import ModelManifest

    return [
        ModelManifest(model_id=name, aliases=aliases, **{f"{kind}_class_path": path})
        for name, (path, kind, aliases) in MODELS.items()
    ]
