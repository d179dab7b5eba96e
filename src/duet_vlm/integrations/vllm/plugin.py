"""vLLM's ``vllm.general_plugins`` entry point: duet-vlm's model classes for the supported families.

vLLM calls ``register`` in every process it starts. The model registry then builds duet-vlm's
subclasses of vLLM's own classes for these architectures (lazily: nothing of vLLM's models is
imported here). Without ``duet_method`` in the server's ``--mm-processor-kwargs`` the subclasses
behave exactly as vLLM's.
"""

from __future__ import annotations

from .registry import FAMILIES

#: architecture -> duet-vlm's class (``module:Class``, imported by vLLM when a model needs it): the
#: served families' (``registry.FAMILIES``), and vLLM's Transformers modeling backend
#: (``--model-impl transformers``): a prototype reducing LLaVA-1.5, refusing duet-vlm's options on any
#: other family (``backend``).
MODELS = {
    **{family.architecture: family.target for family in FAMILIES},
    "TransformersMultiModalForCausalLM": "duet_vlm.integrations.vllm.backend:DuetTransformersMultiModalForCausalLM",
}


def register() -> None:
    """Register duet-vlm's classes with vLLM's model registry (safe to call more than once): the
    served families' (``MODELS``), and for the families the plugin does not serve yet vLLM's own
    classes refusing duet-vlm's options at start (``refused``), so that asking for a reduction there
    is an error, not an unreduced server."""
    from vllm import ModelRegistry

    from .refused import NOT_SERVED

    supported = set(ModelRegistry.get_supported_archs())
    targets = {**{arch: f"duet_vlm.integrations.vllm.refused:Refusing{arch}" for arch in NOT_SERVED}, **MODELS}
    for architecture, target in targets.items():
        if architecture in supported:
            ModelRegistry.register_model(architecture, target)
