"""What lmms-eval reads from the ``lmms_eval.models`` entry point: model names and class paths.

Kept apart from the model class on purpose: lmms-eval loads entry points while ``lmms_eval.models``
is being imported, and importing the chat model classes at that moment is circular.
"""

from __future__ import annotations


def manifests():
    """The ``lmms_eval.models`` entry point (a callable, so that nothing is imported at discovery)."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return [
        ModelManifest(
            model_id="duet_llava_hf",
            chat_class_path="duet_vlm.integrations.lmms_eval_models.DuetLlavaHf",
        )
    ]
