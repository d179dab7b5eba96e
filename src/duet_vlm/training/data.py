"""LLaVA conversation data for training: loading with validation, encoding, collation.

The format is LLaVA's instruction-tuning JSON::

    [{"image": "rel/path.png",
      "conversations": [{"from": "human", "value": "<image>\\nWhat is this?"},
                        {"from": "gpt", "value": "A cat."}, ...]}, ...]

``load_conversations`` checks every item before anything trains (the image file exists, exactly one
``<image>`` in a human turn, at least one answer) and turns it into chat messages.
``encode`` applies the checkpoint's processor and chat template and labels the answers only (-100
elsewhere, multi-turn included). ``VisionLanguageCollator`` pads a batch.

>>> records = load_conversations("train.json", image_folder="images")          # doctest: +SKIP
>>> dataset = ConversationDataset(records, processor)                          # doctest: +SKIP
>>> batch = VisionLanguageCollator(processor.tokenizer.pad_token_id)([dataset[0], dataset[1]])  # doctest: +SKIP
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from .. import synthetic

IMAGE_TAG = "<image>"
IGNORE_INDEX = -100
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


class DataError(ValueError):
    """A training item that cannot be used; the message names the file and the item."""


@dataclass
class Record:
    """One conversation about one image, as chat messages (the image slot is ``{"type": "image"}``).

    ``image`` is a path (opened when the item is encoded) or an in-memory PIL image.
    """

    image: Any
    messages: list[dict]


def _messages(conversations, where: str) -> list[dict]:
    if not isinstance(conversations, list) or not conversations:
        raise DataError(f"{where}: 'conversations' must be a non-empty list of {{'from', 'value'}} turns")
    messages, tags = [], 0
    for turn_index, turn in enumerate(conversations):
        if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
            raise DataError(f"{where}, turn {turn_index}: each turn needs 'from' and 'value', got {turn!r}"[:300])
        role = ROLES.get(str(turn["from"]).lower())
        if role is None:
            raise DataError(f"{where}, turn {turn_index}: unknown speaker {turn['from']!r} (expected human or gpt)")
        text = str(turn["value"])
        count = text.count(IMAGE_TAG)
        tags += count
        content = []
        if count:
            if role != "user":
                raise DataError(f"{where}, turn {turn_index}: {IMAGE_TAG} must be in a human turn, not a {turn['from']} turn")
            text = text.replace(IMAGE_TAG, "").strip()
            content.append({"type": "image"})
        content.append({"type": "text", "text": text})
        messages.append({"role": role, "content": content})
    if tags != 1:
        problem = "has no" if tags == 0 else f"has {tags}"
        raise DataError(
            f"{where}: the conversation {problem} {IMAGE_TAG} tag; exactly one human turn must contain {IMAGE_TAG} "
            "(one image per conversation)"
        )
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError(f"{where}: the conversation has no gpt turn, so nothing to train on")
    return messages


def load_conversations(path: str | Path, image_folder: str | Path | None = None) -> list[Record]:
    """Read and check a LLaVA-format JSON file; raises ``DataError`` naming the first bad item."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file {path} does not exist")
    try:
        items = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise DataError(f"{path} is not valid JSON: {error}") from error
    if not isinstance(items, list):
        raise DataError(f"{path}: expected a JSON list of conversations, got {type(items).__name__}")
    if not items:
        raise DataError(f"{path}: the dataset is empty")
    folder = Path(image_folder) if image_folder is not None else path.parent
    records = []
    for index, item in enumerate(items):
        where = f"{path}, item {index}" + (f" (id {item['id']})" if isinstance(item, dict) and "id" in item else "")
        if not isinstance(item, dict):
            raise DataError(f"{where}: expected an object with 'image' and 'conversations'")
        image = item.get("image")
        if not isinstance(image, str):
            raise DataError(
                f"{where}: 'image' must be one relative path (text-only and multi-image items are not supported), got {image!r}"
            )
        messages = _messages(item.get("conversations"), where)
        file = folder / image
        if not file.is_file():
            raise DataError(f"{where}: image file {file} not found (images are relative to --image-folder {folder})")
        records.append(Record(file, messages))
    return records


def synthetic_records(n: int, split: str = "train", questions: int = 4, offset: int = 0) -> list[Record]:
    """``n`` conversations of the built-in synthetic visual-QA benchmark (``duet_vlm.synthetic``), images in memory."""
    if n <= 0:
        raise DataError(f"--synthetic-items must be positive, got {n}")
    records = []
    for index in range(offset, offset + n):
        image, turns, _scene = synthetic.conversation(split, index, n_questions=questions)
        conversations = []
        for k, (_qtype, question, answer) in enumerate(turns):
            conversations.append({"from": "human", "value": (IMAGE_TAG + "\n" if k == 0 else "") + question})
            conversations.append({"from": "gpt", "value": answer})
        records.append(Record(image, _messages(conversations, f"synthetic {split} item {index}")))
    return records


#: Processor outputs with one entry per token (padded and extended like ``input_ids``, fill 0):
#: Gemma 3's ``token_type_ids`` (1 on image tokens), Gemma 4's and Qwen3.5's ``mm_token_type_ids``.
PER_TOKEN_KEYS = ("token_type_ids", "mm_token_type_ids")
#: Processor outputs whose rows are the images' (or Qwen's patches'): a batch concatenates them.
IMAGE_KEYS = ("pixel_values", "image_grid_thw", "image_sizes", "image_position_ids")


def encode(processor, record: Record, eos_after_answer: bool = True) -> dict[str, torch.Tensor]:
    """``input_ids``, ``attention_mask``, ``labels`` (1-D) and every other input the processor gives
    the model for one conversation: ``pixel_values`` and, per family, ``image_grid_thw`` (Qwen),
    ``token_type_ids`` (Gemma 3) or ``mm_token_type_ids`` (Gemma 4), per-token ones 1-D.

    The prompt comes from ``processor.apply_chat_template``. The answers are labelled, everything else
    is -100: the assistant tokens the template reports (its ``{% generation %}`` spans), or, for a
    template without them (most checkpoints' own), what each assistant message adds to the prompt
    that ends before it with the generation prompt (``answer_spans``).
    """
    image = record.image
    if not isinstance(image, Image.Image):
        try:
            with Image.open(image) as opened:
                image = opened.convert("RGB")
        except OSError as error:
            raise DataError(f"cannot read image {image}: {error}") from error
    messages = [
        {**m, "content": [{"type": "image", "image": image} if c["type"] == "image" else c for c in m["content"]]}
        for m in record.messages
    ]
    marks = _marks_answers(processor)
    out = processor.apply_chat_template(
        messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=marks, return_tensors="pt"
    )
    ids, mask = out["input_ids"][0], out["attention_mask"][0]
    answer = out["assistant_masks"][0].bool() if "assistant_masks" in out else torch.zeros_like(ids, dtype=torch.bool)
    if not answer.any():
        answer = answer_spans(processor, messages, ids)
    labels = torch.where(answer, ids, IGNORE_INDEX)
    tokens = {key: out[key][0] for key in PER_TOKEN_KEYS if key in out}
    eos = processor.tokenizer.eos_token_id
    if eos_after_answer and eos is not None:
        ids, mask, labels, tokens = _append_eos(ids, mask, labels, answer, eos, tokens)
    rest = {key: value for key, value in out.items()
            if key not in ("input_ids", "attention_mask", "assistant_masks", *PER_TOKEN_KEYS)}
    return {"input_ids": ids, "attention_mask": mask, "labels": labels, **tokens, **rest}


def _marks_answers(processor) -> bool:
    """Whether the processor's chat template has ``{% generation %}`` spans (then transformers reports
    the assistant tokens itself)."""
    template = getattr(processor, "chat_template", None) or getattr(processor.tokenizer, "chat_template", None) or ""
    templates = template.values() if isinstance(template, dict) else [template]
    return any(re.search(r"{%-?\s*generation\s*-?%}", t) for t in templates)


def answer_spans(processor, messages: list[dict], ids: torch.Tensor) -> torch.Tensor:
    """``(L,)`` True on the tokens each assistant message adds: the conversation up to and including
    it, less the conversation before it with the generation prompt. Both must be prefixes of the
    whole conversation's ``ids`` (true of the templates of LLaVA, Gemma and Qwen); a template whose
    earlier turns change with later ones is refused, as is one that marks no answer."""
    answer = torch.zeros_like(ids, dtype=torch.bool)

    def prefix(upto: list[dict], prompt: bool) -> int:
        part = processor.apply_chat_template(
            upto, tokenize=True, return_dict=True, add_generation_prompt=prompt, return_tensors="pt"
        )["input_ids"][0]
        if len(part) > len(ids) or not torch.equal(part, ids[: len(part)]):
            raise DataError(
                "the processor's chat template renders a conversation's first turns differently once later turns follow, "
                "and marks no assistant tokens ({% generation %}): give it a template with {% generation %} ... "
                "{% endgeneration %} around assistant messages so that only answers are trained on"
            )
        return len(part)

    for index, message in enumerate(messages):
        if message["role"] == "assistant":
            answer[prefix(messages[:index], True) : prefix(messages[: index + 1], False)] = True
    if not answer.any():
        raise DataError(
            "the processor's chat template marks no assistant tokens: it needs {% generation %} ... {% endgeneration %} "
            "around assistant messages (as the llava-hf templates have) so that only answers are trained on"
        )
    return answer


def _append_eos(ids, mask, labels, answer, eos: int, tokens: dict | None = None):
    """Insert a labelled EOS after each answer span that the template does not already end with one;
    per-token inputs (``tokens``) get 0 there (a text token)."""
    tokens = tokens or {}
    columns = [ids, mask, labels, *tokens.values()]
    ends = torch.nonzero(answer & ~torch.cat([answer[1:], answer.new_zeros(1)])).flatten().tolist()
    pieces, start = [], 0
    for end in ends:
        pieces.append([column[start : end + 1] for column in columns])
        following = ids[end + 1] if end + 1 < len(ids) else None
        if following == eos:
            labels[end + 1] = eos
        else:
            one = torch.tensor([eos])
            pieces.append([one, torch.ones(1, dtype=mask.dtype), one.clone(),
                           *(column.new_zeros(1) for column in tokens.values())])
        start = end + 1
    pieces.append([column[start:] for column in columns])
    joined = [torch.cat([piece[i] for piece in pieces]) for i in range(len(columns))]
    return joined[0], joined[1], joined[2], dict(zip(tokens, joined[3:]))


class ConversationDataset(torch.utils.data.Dataset):
    """Encodes ``Record``s on access (images are opened lazily)."""

    def __init__(self, records: list[Record], processor, eos_after_answer: bool = True):
        if not records:
            raise DataError("the dataset is empty")
        self.records, self.processor, self.eos_after_answer = records, processor, eos_after_answer

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return encode(self.processor, self.records[index], self.eos_after_answer)


@dataclass
class VisionLanguageCollator:
    """Pads ``encode`` outputs into a batch: ``pad_token_id`` / attention 0 / label -100 on ``padding_side``.

    Any other key is passed through: keys in ``sequence_keys`` (``{key: fill}``) are per-token
    sequences padded like ``input_ids``; the rest are stacked, padded up to the largest item in every
    dimension with ``pad_values.get(key, 0)`` (e.g. a recipe's per-question targets).

    >>> batch = VisionLanguageCollator(pad_token_id=0)([dataset[0], dataset[1]])   # doctest: +SKIP
    >>> batch["input_ids"].shape, batch["pixel_values"].shape                       # doctest: +SKIP
    """

    pad_token_id: int
    padding_side: str = "right"
    sequence_keys: dict[str, int] = field(default_factory=dict)
    pad_values: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.padding_side not in ("right", "left"):
            raise ValueError(f"padding_side must be 'right' or 'left', got {self.padding_side!r}")

    def __call__(self, features: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        width = max(len(f["input_ids"]) for f in features)
        fills = {"input_ids": self.pad_token_id, "attention_mask": 0, "labels": IGNORE_INDEX,
                 **{key: 0 for key in PER_TOKEN_KEYS}, **self.sequence_keys}
        batch = {}
        for key, fill in fills.items():
            if key not in features[0]:
                continue
            rows = []
            for f in features:
                pad = f[key].new_full((width - len(f[key]),), fill)
                rows.append(torch.cat([f[key], pad] if self.padding_side == "right" else [pad, f[key]]))
            batch[key] = torch.stack(rows)
        for key in IMAGE_KEYS:  # one row per image (or per patch, Qwen's): the rows of the batch's images
            if key in features[0]:
                batch[key] = torch.cat([f[key] for f in features])
        for key in features[0]:
            if key not in batch:
                batch[key] = _stack_padded([f[key] for f in features], self.pad_values.get(key, 0))
        return batch


def _stack_padded(tensors: list[torch.Tensor], fill) -> torch.Tensor:
    shape = [max(sizes) for sizes in zip(*(t.shape for t in tensors))]
    out = tensors[0].new_full((len(tensors), *shape), fill)
    for row, tensor in zip(out, tensors):
        row[tuple(slice(0, size) for size in tensor.shape)] = tensor
    return out
