"""Shipped demo: a small, genuinely trained LLaVA-architecture model and the offline synthetic
visual-QA benchmark it was trained on (see ``data``, ``processor``, ``model``, ``train``)."""

from .data import QUESTION_TYPES, Sample, conversation, sample
from .model import build_model, count_parameters, demo_config
from .processor import build_processor, build_tokenizer, prompt
from .train import DEMO_MODEL_DIR, evaluate_accuracy, load_demo, train_demo, write_model_card

__all__ = [
    "DEMO_MODEL_DIR", "QUESTION_TYPES", "Sample", "build_model", "build_processor", "build_tokenizer",
    "conversation", "count_parameters", "demo_config", "evaluate_accuracy", "load_demo", "prompt",
    "sample", "train_demo", "write_model_card",
]
