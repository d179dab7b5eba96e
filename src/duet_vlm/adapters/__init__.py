"""Model-family adapters: where the vision span is, which modules to hook, RoPE conventions."""

from __future__ import annotations

from torch import nn

from .base import Geometry, ModelAdapter
from .llava import LlavaAdapter

ADAPTERS: tuple[type[ModelAdapter], ...] = (LlavaAdapter,)


def adapter_for(model: nn.Module) -> ModelAdapter:
    """The adapter for ``model``, or a ``TypeError`` naming the supported model classes."""
    for adapter in ADAPTERS:
        if adapter.matches(model):
            return adapter(model)
    supported = ", ".join(name for adapter in ADAPTERS for name in adapter.supported_classes)
    raise TypeError(
        f"duet-vlm does not support {type(model).__name__}; supported model classes: {supported}"
    )


__all__ = ["ADAPTERS", "Geometry", "ModelAdapter", "adapter_for"]
