"""What duet-vlm's runners ask of the model they run (``DroppingModel``), declared once: the runners
(``runners``, ``kv``) reach the model through these members only, and every family's model has them
(``common.DuetModelMixin``), so no family module is imported here and the runner calls no
undeclared member of a model."""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol, runtime_checkable

if TYPE_CHECKING:
    from .hooks import LanguageStages
    from .steps import RequestPlan


@runtime_checkable
class DroppingModel(Protocol):
    """A vLLM model duet-vlm's runner gives the compacted layers' metadata and slots."""

    def duet_language_stages(self) -> LanguageStages | None:
        """The hooks that drop in the decoder layers, to which the runner hands each step's plan
        (``LanguageStages.next_step``); ``None`` on a server that drops nothing there."""

    def duet_boundaries(self) -> tuple[int, ...]:
        """The decoder layers before which a method the server runs drops: where the KV-cache groups
        that hold the kept tokens only begin (``kv.dropped_specs``)."""

    def duet_attention_layer_names(self) -> tuple[str, ...]:
        """Each decoder layer's attention as vLLM's per-layer metadata and slots name it."""

    def duet_request_plan(self, mm_features, prompt: int) -> RequestPlan | None:
        """A request's drops from vLLM's ``MultiModalFeatureSpec`` of its items and its prompt's
        length (``None``: none of its items drops inside the language model)."""


def dropping(model) -> DroppingModel | None:
    """``model`` where it is one of duet-vlm's and drops inside its language model on this server,
    else ``None`` (vLLM's own class, or a server that drops nothing there)."""
    if not isinstance(model, DroppingModel) or model.duet_language_stages() is None:
        return None
    return model
