"""Shipped demo: a small, genuinely trained LLaVA-architecture model, trained on the offline
synthetic visual-QA benchmark (``duet_vlm.synthetic``, below both this package and ``training``).

``processor`` / ``model`` the model family, ``evaluate`` accuracy and probes,
``config`` / ``batching`` / ``objectives`` / ``train`` the training recipe, ``card`` the model card.
Names are imported lazily so that ``python -m duet_vlm.demo.train`` runs cleanly."""

from importlib import import_module

_EXPORTS = {
    "QUESTION_TYPES": ".synthetic", "Sample": ".synthetic", "conversation": ".synthetic", "sample": ".synthetic",
    "build_model": "model", "count_parameters": "model", "demo_config": "model",
    "build_processor": "processor", "build_tokenizer": "processor", "prompt": "processor",
    "DEMO_MODEL_DIR": "evaluate", "evaluate_accuracy": "evaluate", "load_demo": "evaluate",
    "patch_word_probe": "evaluate", "DemoConfig": "config", "train_demo": "train", "write_model_card": "card",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
