"""Model-family adapters: where the visual items are, which modules to hook, RoPE conventions."""

from __future__ import annotations

from torch import nn

from ..compat import check_family
from .base import Capture, Geometry, ModelAdapter, Signals, UnreducibleInput, VisualItem
from .gemma3 import Gemma3Adapter
from .gemma4 import Gemma4Adapter
from .internvl import InternVLAdapter
from .llava import LlavaAdapter
from .llava_next import LlavaNextAdapter
from .llava_onevision import LlavaOnevisionAdapter
from .qwen3_5 import Qwen3_5Adapter
from .qwen_vl import Qwen2_5_VLAdapter, Qwen2VLAdapter, Qwen3VLAdapter
from .video_llava import VideoLlavaAdapter

ADAPTERS: tuple[type[ModelAdapter], ...] = (
    LlavaAdapter,
    LlavaNextAdapter,
    LlavaOnevisionAdapter,
    VideoLlavaAdapter,
    Qwen2VLAdapter,
    Qwen2_5_VLAdapter,
    Qwen3VLAdapter,
    InternVLAdapter,
    Qwen3_5Adapter,
    Gemma3Adapter,
    Gemma4Adapter,
)


def adapter_for(model: nn.Module) -> ModelAdapter:
    """The adapter whose config types match ``model``, or a ``TypeError`` naming the supported classes."""
    for adapter in ADAPTERS:
        if adapter.matches(model):
            check_family(adapter.family, type(model).__name__)
            return adapter(model)
    supported = ", ".join(name for adapter in ADAPTERS for name in adapter.supported_classes)
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    raise TypeError(
        f"duet-vlm does not support {type(model).__name__} (model_type {model_type!r}); "
        f"supported model classes: {supported}"
    )


__all__ = ["ADAPTERS", "Capture", "Gemma3Adapter", "Gemma4Adapter", "Geometry", "InternVLAdapter", "ModelAdapter", "Signals", "UnreducibleInput", "VisualItem", "adapter_for"]
