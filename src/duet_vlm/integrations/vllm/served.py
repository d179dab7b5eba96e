"""Which registered methods the plugin serves, made from the method registry: those that select
before the language model (``supported_methods``, with the vision-side halves that run alone,
``vision_half``) and those that drop inside it by a stage the plugin serves (``language_methods``,
``SERVED_NEEDS``). The refusals name them (``options.check_supported``, ``language.check_stage``).
"""

from __future__ import annotations

import dataclasses
import warnings

from ...generation_modes import LLAVA15
from ...methods import METHODS, make
from ...methods.base import Reducer


def vision_half(name: str) -> bool:
    """Whether method ``name`` without its boundaries (``layers=()``) selects before the language
    model only (DUET's Stage A, VScan's scan)."""
    cls = METHODS.get(name)
    if cls is None or "layers" not in {spec.name for spec in dataclasses.fields(cls)}:
        return False
    try:
        plan = make(name, budget=64, layers=()).resolve(LLAVA15, quiet=True)
    except Exception:
        return False
    return plan.language is None and not plan.schedule.boundaries and plan.vision is not None


def loads_learned_state(cls: type[Reducer]) -> bool:
    """Whether the method needs what it saved beside a fine-tuned model (``Reducer.load_objects``:
    VisionSelector's trained scorer), which this plugin does not load."""
    return cls.load_objects.__func__ is not Reducer.load_objects.__func__


def _default_plans():
    """``(name, plan)`` of each registered method that takes a budget, at its defaults and 64 tokens
    of LLaVA-1.5's 576 (what the lists of served methods are made from)."""
    for name, cls in sorted(METHODS.items()):
        if name in ("full", "compose", "adaptive") or cls.adapts_to_content:
            continue
        if loads_learned_state(cls):
            continue
        if "budget" not in {spec.name for spec in dataclasses.fields(cls)}:
            continue
        try:
            with warnings.catch_warnings():  # (what a budget of 64 means for it is not the list's to say)
                warnings.simplefilter("ignore")
                plan = make(name, budget=64).resolve(LLAVA15, quiet=True)
        except Exception:  # a method that needs more than a budget (or is not implemented yet)
            continue
        yield name, plan


def supported_methods() -> list[str]:
    """Registered methods that select before the language model at their defaults, then those whose
    vision-side half runs alone (``name (layers=[])``)."""
    names = [name for name, plan in _default_plans()
             if plan.language is None and not plan.schedule.boundaries and plan.vision is not None]
    return names + [f"{name} (layers=[])" for name in sorted(METHODS) if name not in names and vision_half(name)]


#: what the plugin's ``LayerView`` gives a language stage beyond its residual streams, the visual
#: tokens' places, a layer's attention and keys (``reads``: the layer after the boundary, the one before
#: it, or none), the input embeddings and a scratch per request: none of ``LanguageStage.view_needs``
#: (``language.checks`` says why each is not met yet).
SERVED_NEEDS: frozenset[str] = frozenset()


def language_methods() -> list[str]:
    """Registered methods that drop inside the language model at their defaults by a stage the plugin
    serves (one that needs nothing beyond ``SERVED_NEEDS``)."""
    return [name for name, plan in _default_plans()
            if plan.schedule.boundaries and plan.language is not None and not plan.language.view_needs - SERVED_NEEDS]
