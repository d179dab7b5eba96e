"""The families duet-vlm's vLLM plugin serves (``FAMILIES``: each a module of ``families``, with
vLLM's model class and what the family says differently, its processor), the registry every list of
them is made from: the classes the plugin registers with vLLM (``plugin.MODELS``), the families
named where a reduction is refused (``refused``, ``options``), and whether each drops inside the
language model (its model's ``serves_language``).

Importing this module imports no vLLM module.
"""

from __future__ import annotations

import dataclasses

#: where the families' modules are
PACKAGE = __name__.rpartition(".")[0] + ".families"


@dataclasses.dataclass(frozen=True)
class Family:
    """One served architecture: its family's name, vLLM's architecture, duet-vlm's class for it (a
    module of this package, a class there), and whether methods that drop inside the language model
    are served on it (with duet-vlm's worker; where not, the family's model says why at start)."""

    name: str
    architecture: str
    module: str
    cls: str
    language: bool = True

    @property
    def target(self) -> str:
        """``module:Class``, as vLLM's model registry imports it."""
        return f"{PACKAGE}.{self.module}:{self.cls}"


FAMILIES = (
    Family("LLaVA-1.5", "LlavaForConditionalGeneration", "llava", "DuetLlavaForConditionalGeneration"),
    Family("LLaVA-NeXT", "LlavaNextForConditionalGeneration", "llava_next", "DuetLlavaNextForConditionalGeneration"),
    Family("LLaVA-OneVision", "LlavaOnevisionForConditionalGeneration", "llava_onevision",
           "DuetLlavaOnevisionForConditionalGeneration"),
    Family("Qwen2-VL", "Qwen2VLForConditionalGeneration", "qwen_vl", "DuetQwen2VLForConditionalGeneration"),
    Family("Qwen2.5-VL", "Qwen2_5_VLForConditionalGeneration", "qwen_vl", "DuetQwen2_5_VLForConditionalGeneration"),
    Family("Qwen3-VL", "Qwen3VLForConditionalGeneration", "qwen3_vl", "DuetQwen3VLForConditionalGeneration"),
    Family("Qwen3.5", "Qwen3_5ForConditionalGeneration", "qwen3_vl", "DuetQwen3_5ForConditionalGeneration"),
    Family("Qwen3.5-MoE", "Qwen3_5MoeForConditionalGeneration", "qwen3_vl", "DuetQwen3_5MoeForConditionalGeneration"),
    Family("InternVL", "InternVLForConditionalGeneration", "internvl", "DuetInternVLForConditionalGeneration"),
    Family("Gemma 3", "Gemma3ForConditionalGeneration", "gemma3", "DuetGemma3ForConditionalGeneration"),
    Family("Gemma 4", "Gemma4ForConditionalGeneration", "gemma4", "DuetGemma4ForConditionalGeneration"),
)


def named(language: bool = False) -> str:
    """The served families' names as a sentence lists them (``language``: those that drop inside the
    language model only).

    >>> named(language=True).endswith("InternVL, Gemma 3 and Gemma 4")
    True
    """
    names = [family.name for family in FAMILIES if family.language or not language]
    return ", ".join(names[:-1]) + " and " + names[-1]


def of(cls: type) -> Family | None:
    """The registered family of duet-vlm's class ``cls`` (or of the nearest registered class it
    derives from); ``None`` for a class of none."""
    for klass in cls.__mro__:
        for family in FAMILIES:
            if klass.__module__ == f"{PACKAGE}.{family.module}" and klass.__qualname__ == family.cls:
                return family
    return None
