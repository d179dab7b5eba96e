"""Reach the model a reducer attaches to through what training wraps it in.

``unwrap_model(model)`` peels peft (``PeftModel``, ``LoraModel``), DDP / DataParallel / FSDP /
DeepSpeed (``.module``) and ``torch.compile`` (``._orig_mod``), in any order, until it reaches a
model a duet-vlm adapter supports (``LlavaForConditionalGeneration``, ``Qwen2_5_VLForConditionalGeneration``, ...). Hooks
installed on that inner model fire whichever wrapper calls it, so ``reducer.attach(ddp_model)``
and ``reducer.attach(peft_model)`` work as ``reducer.attach(model)`` does.

>>> inner = unwrap_model(torch.nn.parallel.DistributedDataParallel(model))   # doctest: +SKIP
>>> inner is model                                                           # doctest: +SKIP
True
"""

from __future__ import annotations

from torch import nn

from .adapters import ADAPTERS

WRAPPERS = "peft PeftModel, DistributedDataParallel, DataParallel, FSDP, DeepSpeed engine or torch.compile"


def _supported(model: nn.Module) -> bool:
    return any(adapter.matches(model) for adapter in ADAPTERS)


def _peel(model: nn.Module) -> nn.Module | None:
    """The module one wrapper down, or ``None`` when ``model`` is no known wrapper."""
    from accelerate.utils import extract_model_from_parallel

    # DDP, DataParallel, FSDP, DeepSpeed and torch.compile, as accelerate's Trainer integration unwraps them.
    inner = extract_model_from_parallel(model, keep_torch_compile=False)
    if inner is not model:
        return inner
    # peft (optional dependency, so recognised by module): PeftModel -> LoraModel (a BaseTuner) -> model.
    if type(model).__module__.split(".")[0] == "peft":
        if callable(getattr(model, "get_base_model", None)):
            return model.get_base_model()
        if isinstance(getattr(model, "model", None), nn.Module):
            return model.model
    return None


def unwrap_model(model: nn.Module) -> nn.Module:
    """The supported model inside ``model`` (``model`` itself if it is one), or a ``TypeError`` saying what to pass."""
    seen = [type(model).__name__]
    current = model
    # Peel first: wrappers forward attribute access (peft forwards `.config`), so they can look supported.
    while isinstance(current, nn.Module) and (inner := _peel(current)) is not None and inner is not current:
        current = inner
        seen.append(type(current).__name__)
    if not isinstance(current, nn.Module) or not _supported(current):
        supported = ", ".join(name for adapter in ADAPTERS for name in adapter.supported_classes)
        if len(seen) == 1 and getattr(getattr(current, "config", None), "vision_config", None) is not None:
            # A whole vision-language model of a family no adapter knows (not a piece of a supported one).
            model_type = getattr(current.config, "model_type", None)
            raise TypeError(
                f"duet-vlm does not support {seen[0]} (model_type {model_type!r}); supported model classes: {supported}"
            )
        raise TypeError(
            f"duet-vlm cannot attach to {' -> '.join(seen)}: pass the {supported} itself, or one wrapped by a "
            f"{WRAPPERS} (e.g. `reducer.attach(model)` with `model = LlavaForConditionalGeneration.from_pretrained(...)`, "
            "not its `.language_model` or `.vision_tower`)"
        )
    return current


__all__ = ["unwrap_model"]
