"""Fine-tuning LLaVA checkpoints with a reducer attached (``duet-vlm train``).

``config`` holds ``TrainConfig`` (options, saved hyper-parameters and the model card's command all
come from it), ``data`` the LLaVA-format dataset, its checks and the collator, ``trainer`` the run
on ``transformers.Trainer``.

>>> from duet_vlm.training import TrainConfig, train
>>> train(TrainConfig(model="path/to/llava", data="synthetic", output_dir="runs/x", budget=64, max_steps=10))  # doctest: +SKIP
"""

from .config import TrainConfig
from .data import ConversationDataset, DataError, Record, VisionLanguageCollator, encode, load_conversations, synthetic_records
from .trainer import TrainOutcome, train

__all__ = [
    "ConversationDataset", "DataError", "Record", "TrainConfig", "TrainOutcome", "VisionLanguageCollator",
    "encode", "load_conversations", "synthetic_records", "train",
]
