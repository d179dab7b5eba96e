"""vLLM's ``vllm.general_plugins`` entry point: duet-vlm's model classes for the supported families.

vLLM calls ``register`` in every process it starts. The model registry then builds duet-vlm's
subclasses of vLLM's own classes for these architectures (lazily: nothing of vLLM's models is
imported here). Without ``duet_method`` in the server's ``--mm-processor-kwargs`` the subclasses
behave exactly as vLLM's.
"""

from __future__ import annotations

#: architecture -> duet-vlm's class (``module:Class``, imported by vLLM when a model needs it).
MODELS = {
    "LlavaForConditionalGeneration": "duet_vlm.integrations.vllm.llava:DuetLlavaForConditionalGeneration",
    "LlavaNextForConditionalGeneration": "duet_vlm.integrations.vllm.llava_next:DuetLlavaNextForConditionalGeneration",
    "Qwen2_5_VLForConditionalGeneration": "duet_vlm.integrations.vllm.qwen2_5_vl:DuetQwen2_5_VLForConditionalGeneration",
}


def register() -> None:
    """Register duet-vlm's classes with vLLM's model registry (safe to call more than once)."""
    from vllm import ModelRegistry

    supported = set(ModelRegistry.get_supported_archs())
    for architecture, target in MODELS.items():
        if architecture in supported:
            ModelRegistry.register_model(architecture, target)
