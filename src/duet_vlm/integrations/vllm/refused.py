"""vLLM's own classes for what duet-vlm's plugin does not serve (today vLLM's Transformers modeling
backend for mixture-of-experts models; every family the Hugging Face path supports is served),
refusing duet-vlm's options.

Without this, a server started with ``--mm-processor-kwargs '{"duet_method": ...}'`` on, say,
Qwen2-VL ran vLLM's own class, never read the method, and served every image unreduced without a
word. Each class here is vLLM's class for one such architecture with one check at construction:
when the server's options name a duet-vlm method or budget, the engine does not start, and the error
says which families the plugin serves and what to do. Without duet-vlm's options it *is* vLLM's
class. A class is built on first access (``__getattr__``), so serving one architecture imports
only its vLLM module.
"""

from __future__ import annotations

from .registry import named
from .options import KEYS

#: what vLLM's Transformers modeling backend is called in the refusal (it serves any family).
BACKEND = "vLLM's Transformers modeling backend (--model-impl transformers)"

#: architecture -> (vLLM's module, vLLM's class, the family's name) for the classes the plugin does not
#: serve (vLLM 0.32's registry).
NOT_SERVED = {
    # vLLM's Transformers modeling backend for mixture-of-experts models (``--model-impl transformers``);
    # the dense backend class is ``backend``'s prototype, which refuses every family but LLaVA-1.5
    "TransformersMultiModalMoEForCausalLM": ("transformers", "TransformersMultiModalMoEForCausalLM", BACKEND),
}

#: what the plugin serves (``registry.FAMILIES``, the classes of ``plugin.MODELS``), for the message.
SERVED = named()


def refuse_options(vllm_config, family: str) -> None:
    """Raise when the server asks for a duet-vlm reduction on ``family``, which the plugin does not serve."""
    from .processor import server_options

    asked = sorted(key for key in server_options(vllm_config.model_config) if key in KEYS)
    if asked:
        raise NotImplementedError(
            f"duet-vlm's vLLM plugin serves {SERVED}; {family} runs as vLLM's own class, which would ignore "
            f"{', '.join(asked)} and serve every image unreduced. Start the server without duet-vlm's options to "
            "serve it unreduced, or reduce it on the Hugging Face path (duet-vlm run, the lmms-eval models)"
            + (" or with vLLM's own model implementation (--model-impl auto or vllm)" if family == BACKEND else "")
        )


def _refusing(architecture: str) -> type:
    import importlib

    module, name, family = NOT_SERVED[architecture]
    base = getattr(importlib.import_module(f"vllm.model_executor.models.{module}"), name)

    def __init__(self, *, vllm_config, prefix: str = "", **kwargs):
        refuse_options(vllm_config, family)
        base.__init__(self, vllm_config=vllm_config, prefix=prefix, **kwargs)

    return type(f"Refusing{name}", (base,), {"__init__": __init__, "__module__": __name__,
                                            "__doc__": f"vLLM's {name}, refusing duet-vlm's options ({family})."})


_built: dict[str, type] = {}


def __getattr__(name: str) -> type:
    architecture = name.removeprefix("Refusing")
    if architecture not in NOT_SERVED:
        raise AttributeError(name)
    if architecture not in _built:
        _built[architecture] = _refusing(architecture)
    return _built[architecture]
