"""What a reducer reports after each prefill (``reducer.stats``)."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .flops import DecoderDims, exact_flops, fastv_flops, kv_cache_bytes
from .geometry import Geometry


@dataclass
class ItemStats:
    """One visual item (an image or a video) of the last prefill.

    Attributes:
        row: its batch row.
        modality: ``"image"`` or ``"video"``.
        tokens: its placeholder slots (what the unreduced model processes).
        units: frames of a video (1 for an image).
        tokens_per_layer: its visual tokens entering each decoder layer.
        kept_ids: indices, into the item's block at the LLM entry, of the tokens that reach the last
            layer group.
        vision_kept: ``(units, n)`` for each token entering the LLM, the vision-encoder index (within
            its frame or image, CLS = 0 where there is one) it stands for; -1 past a frame's count
            where frames keep different numbers of tokens; ``None`` without a vision stage.
        entry_units: ``(tokens entering the LLM,)`` the frame (video) or tile (anyres image, 0 = the
            base tile) each token comes from; -1 for newline tokens. ``entry_units[kept_ids]``
            names where the tokens reaching the last layers came from.
        stage_ids: per pruning boundary ``(layer, ids)``, the entry tokens that survive it.
        entry_slots: the item's slot each entry token stands for (-1: a CLS token).
        views, cells: the grids a picture of the item shows (``(name, rows, cols)``) and each
            slot's ``(grid, row, col)`` (-1 where a slot has no cell); see ``compare.draw_item_overlay``.
        geometry: the shape its plan was solved for (``reducer.resolve(geometry)`` gives that plan).
        never_encoded: the item's slots whose patches never entered the vision encoder (an input
            stage left them out: PixelPrune), ``None`` where every patch did.
        budget: the budget of its own its plan was solved for (a row's, ``per_row``; or the one its
            content gave it: ``Adaptive``, PixelPrune's count), ``None``: the reducer's.
            ``reducer.with_budget(budget).resolve(geometry)`` gives that plan.
    """

    row: int
    modality: str
    tokens: int
    units: int
    tokens_per_layer: list[int]
    kept_ids: torch.Tensor | None = None
    vision_kept: torch.Tensor | None = None
    entry_units: torch.Tensor | None = None
    stage_ids: list[tuple[int, torch.Tensor]] = field(default_factory=list)
    entry_slots: torch.Tensor | None = None
    views: list[tuple[str, int, int]] = field(default_factory=list)
    cells: torch.Tensor | None = None
    geometry: Geometry | None = None
    budget: int | None = None
    never_encoded: torch.Tensor | None = None

    @property
    def average_tokens(self) -> float:
        return sum(self.tokens_per_layer) / len(self.tokens_per_layer)


@dataclass
class ReductionStats:
    """Counts and costs of the last prefill (or training forward) run under a reducer.

    When every item of the batch has the same shape the per-item fields below are exact; otherwise
    they are averages over the items, and ``items`` holds each one.

    Attributes:
        tokens_per_layer: visual tokens per item entering each decoder layer.
        visual_tokens: visual tokens per item without reduction.
        llm_input_tokens: visual tokens per item entering decoder layer 0.
        text_tokens: non-visual, non-padding tokens of each row.
        vision_kept: ``(images, n)`` for each token entering the LLM, the vision-encoder index it
            stands for (0 = CLS; ``None`` without a vision stage).
        vision_roles: the vision stage's named index tensors (e.g. dominant, anchors).
        stage_kept: per pruning boundary ``(layer, (B, n_images, keep))`` indices, into the visual
            block entering the LLM, of the tokens that survive it.
        flops_fastv / flops_fastv_full: the papers' formula, summed over rows, reduced vs unreduced.
        flops_exact / flops_exact_full: exact decoder FLOPs (GQA, gated MLP, causal), same rows.
        kv_bytes / kv_bytes_full: KV-cache bytes after the prefill, all rows.
        items: per visual item, its counts (``ItemStats``).
    """

    tokens_per_layer: list[int]
    visual_tokens: int
    llm_input_tokens: int
    text_tokens: list[int]
    vision_kept: torch.Tensor | None = None
    vision_roles: dict[str, torch.Tensor] = field(default_factory=dict)
    stage_kept: list[tuple[int, torch.Tensor]] = field(default_factory=list)
    flops_fastv: int = 0
    flops_fastv_full: int = 0
    flops_exact: int = 0
    flops_exact_full: int = 0
    kv_bytes: int = 0
    kv_bytes_full: int = 0
    items: list[ItemStats] = field(default_factory=list)

    @property
    def average_tokens(self) -> float:
        return sum(self.tokens_per_layer) / len(self.tokens_per_layer)

    @property
    def flops_ratio(self) -> float:
        """Reduced / unreduced exact decoder FLOPs."""
        return self.flops_exact / self.flops_exact_full if self.flops_exact_full else 1.0

    def fill_costs(self, dims: DecoderDims, bytes_per_element: int) -> None:
        """Decoder FLOPs and KV bytes of every row: its text tokens plus its items' visual tokens."""
        layers = len(self.items[0].tokens_per_layer) if self.items else len(self.tokens_per_layer)
        for row, text in enumerate(self.text_tokens):
            row_items = [item for item in self.items if item.row == row]
            reduced_row = [text + sum(item.tokens_per_layer[l] for item in row_items) for l in range(layers)]
            full_row = [text + sum(item.tokens for item in row_items)] * layers
            self.flops_fastv += fastv_flops(dims, reduced_row)
            self.flops_fastv_full += fastv_flops(dims, full_row)
            blocks = [[item.tokens_per_layer[l] for item in row_items] for l in range(layers)]
            self.flops_exact += exact_flops(dims, reduced_row, blocks)
            self.flops_exact_full += exact_flops(dims, full_row, [[item.tokens for item in row_items]] * layers)
            self.kv_bytes += kv_cache_bytes(dims, reduced_row, bytes_per_element)
            self.kv_bytes_full += kv_cache_bytes(dims, full_row, bytes_per_element)


class DeferredStats:
    """A prefill's ``ReductionStats``, computed the first time they are read.

    The runtime records at the language model's exit what a prefill decided (references to its
    index tensors) and leaves the counting, the costs and the items' grids to whoever reads
    ``reducer.stats``: a forward nobody asks about (training, serving, a timed prefill) pays for
    none of it, and on a GPU it makes no host-device copy for it. ``resolve`` computes them once
    (under a lock: threads reading one record get the same object).
    """

    __slots__ = ("_compute", "_value", "_lock", "__weakref__")

    def __init__(self, compute: Callable[[], ReductionStats]):
        self._compute: Callable[[], ReductionStats] | None = compute
        self._value: ReductionStats | None = None
        self._lock = threading.Lock()

    def resolve(self) -> ReductionStats:
        with self._lock:
            if self._compute is not None:
                self._value = self._compute()
                self._compute = None  # what the computation read is let go
        return self._value
