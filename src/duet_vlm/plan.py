"""The interface between methods and the runtime: the plan a method produces and the views its stages see.

A method's ``Reducer.plan`` returns a ``Plan``: an optional ``VisionStage`` (fewer tokens enter the
language model), an optional ``LanguageStage`` (visual tokens are dropped at layer boundaries inside
it) and the ``Schedule`` of counts both must meet. Stages override one method each:
``VisionStage.reduce`` and ``LanguageStage.score`` (or ``select`` when top-k is not enough). The
runtime (``duet_vlm.runtime``) applies plans and imports this module, never a method.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Callable, ClassVar

import torch
from torch import nn

from .geometry import Geometry
from .schedule import Schedule
from .selection import top_k_in_order


@dataclass
class VisionView:
    """What a vision-side stage sees for a stack of ``I`` units of the same shape (images, or frames).

    Attributes:
        features: ``(I, T, C)`` output of the vision feature layer, CLS first when ``has_cls``.
        cls_attention: ``(I, P)`` CLS-to-patch attention of that layer, summed over heads; for a
            tower without a CLS token (SigLIP) the substitute the adapter documents: the attention
            each patch receives, averaged over heads and summed over queries.
        keys: ``(I, T, d)`` that layer's keys averaged over heads.
        grid: patch grid ``(rows, cols)``; patch ``(r, c)`` is token ``has_cls + r * cols + c``.
        has_cls: whether token 0 is a CLS token.
        attention: ``{layer: (I, P)}`` the same score as ``cls_attention`` at the other encoder layers
            the stage asked for (``VisionStage.encoder_layers``).
        project: maps ``(I, n, C)`` features into the language model's space, as the model's projector
            does, for a stage that decides or merges after the projector.
        text: for a stage that sets ``needs_text``: per unit, ``(n_text, D)`` the language model's
            input embeddings of the text of the unit's prompt (its row's non-visual, non-padding
            tokens; in training those not labelled, i.e. the instruction), for instruction-conditioned
            selection.
        entered: ``(I, T)`` True on the tokens whose patches entered the vision encoder, where a
            method's ``InputStage`` chose them before it (``None``: every token did). The others
            were never encoded: their features, scores and keys are zeros.
    """

    features: torch.Tensor
    cls_attention: torch.Tensor
    keys: torch.Tensor
    grid: tuple[int, int]
    has_cls: bool
    attention: dict = field(default_factory=dict)
    project: Callable[[torch.Tensor], torch.Tensor] | None = None
    text: list[torch.Tensor] | None = None
    entered: torch.Tensor | None = None


@dataclass
class VisionReduction:
    """Output of a vision-side stage.

    Attributes:
        features: ``(I, n, C)`` what the projector consumes instead of the image's tokens.
        kept: ``(I, n)`` for each output token, the index (in ``VisionView.features``) of the token it
            stands for; used for statistics and figures.
        roles: optional named index tensors (e.g. ``"dominant"``, ``"anchors"``) for figures.
        projected: ``(I, n, D)`` the output already in the language model's space (a stage that
            merges after the projector); the runtime then writes it as it is.
        counts: ``(I,)`` for a stage whose units keep different numbers of tokens (a video stage
            that merges across frames): unit ``i``'s tokens are its first ``counts[i]`` outputs, the
            rest of its ``n`` are ignored; each item's counts sum to ``keep`` times its units.
            ``None``: every unit's ``n == keep`` outputs.
    """

    features: torch.Tensor
    kept: torch.Tensor
    roles: dict[str, torch.Tensor] = field(default_factory=dict)
    projected: torch.Tensor | None = None
    counts: torch.Tensor | None = None


class VisionStage(ABC):
    """Reduces each unit's vision-encoder tokens (an image, or one frame of a video) before the projector.

    ``needs_text``: the stage reads ``VisionView.text`` (the prompt's text embeddings).
    ``received``: the stage ranks by the attention each patch *receives* from every token, on every
    tower: ``VisionView.cls_attention`` and ``VisionView.attention`` then hold that score (the CLS
    token among the queries, its own column left out) where the tower has a CLS token too.
    """

    needs_text: ClassVar[bool] = False
    received: ClassVar[bool] = False

    @abstractmethod
    def reduce(self, view: VisionView, keep: int) -> VisionReduction:
        """Return ``keep`` tokens per unit (``keep`` counts the CLS token if it is kept), or per-unit
        ``VisionReduction.counts`` summing to ``keep`` times the units of each item (the units of
        an item are stacked consecutively)."""

    def encoder_layers(self) -> tuple:
        """Encoder layers besides the feature layer whose scores the stage reads (``VisionView.attention``):
        indices into the tower's layers (negative from the end), or the names ``"first_full_attention"``
        and ``"last"`` that each family resolves (``ModelAdapter.encoder_layer``)."""
        return ()


class InputStage(ABC):
    """Chooses, from the pixels alone, which of a unit's language-model tokens enter the vision
    encoder at all: the patches of the others are never encoded (PixelPrune). It runs in the
    tower's entry hook, before any encoder layer, on families whose tower takes a subset of its
    patches with their own positions (``ModelAdapter.takes_patch_subsets``); the runtime refuses it
    elsewhere. What the language model then receives is chosen by the method's vision stage from
    ``VisionView.entered``.
    """

    @abstractmethod
    def select(self, pixels: torch.Tensor) -> torch.Tensor:
        """``pixels``: ``(rows, cols, D)`` one unit's pixels in ``[0, 1]``, one row of ``D`` values per
        language-model token (the patches it merges, in the tower's order). Returns ``(rows, cols)``
        bool: True where the token's patches enter the encoder (at least one per unit)."""


@dataclass
class AppliedStage:
    """A vision stage's reduction of a stack of units, checked and projected (``apply_vision_stage``).

    Attributes:
        reduction: what the stage returned.
        counts: ``(I,)`` tokens of each unit (``keep`` each, or the stage's own ``counts``).
        valid: ``(I, n)`` True on the outputs that are tokens (a unit's first ``counts[i]``).
        projected: ``(I, n, D)`` the outputs in the language model's space: the stage's own
            ``projected`` where it merged after the projector, else ``view.project`` on its features.
    """

    reduction: VisionReduction
    counts: torch.Tensor
    valid: torch.Tensor
    projected: torch.Tensor


def apply_vision_stage(stage: VisionStage, view: VisionView, keep: int, units: int) -> AppliedStage:
    """Run ``stage`` on ``view`` (a stack of items of ``units`` units each), check what it returned
    against ``keep`` tokens per unit, and project it: the one application of a vision stage that the
    Hugging Face runtime and the vLLM plugin both run, so their selections are equal by construction.
    """
    reduction = stage.reduce(view, keep)
    counts = unit_counts(type(stage).__name__, reduction, view.features.shape, units, keep)
    n = reduction.features.shape[1]
    valid = torch.arange(n)[None, :] < counts[:, None]
    projected = reduction.projected if reduction.projected is not None else view.project(reduction.features)
    return AppliedStage(reduction, counts, valid, projected)


def unit_counts(stage: str, reduction: VisionReduction, shape, units: int, keep: int) -> torch.Tensor:
    """``(units stacked,)`` tokens of each unit in ``reduction``: ``keep`` each, or the stage's own
    ``counts`` (checked: each item's sum is ``units * keep``)."""
    stacked, width = shape[0], shape[-1]
    got = tuple(reduction.features.shape)
    if reduction.counts is None:
        if got != (stacked, keep, width):
            raise RuntimeError(f"{stage} returned {got}, expected {(stacked, keep, width)}")
        return torch.full((stacked,), keep)
    counts = reduction.counts.detach().cpu().long()
    if (
        len(got) != 3 or (got[0], got[2]) != (stacked, width) or counts.shape != (stacked,)
        or bool((counts < 0).any()) or bool((counts > got[1]).any())
        or bool((counts.view(-1, units).sum(dim=1) != units * keep).any())
    ):
        raise RuntimeError(
            f"{stage} returned {got} with counts {counts.tolist()}, expected ({stacked}, n, {width}) with counts "
            f"of at most n summing to {units * keep} over each item's {units} units"
        )
    return counts


@dataclass
class LayerView:
    """What a language-side stage sees at a pruning boundary (the input of decoder layer ``layer_index``).

    Sequence positions below are positions in the current (already reduced) sequence.

    Attributes:
        layer_index: 0-based index of the decoder layer about to run (the first after the boundary).
        layer: that decoder layer.
        hidden_states: ``(B, L, D)`` its input.
        position_embeddings: ``(cos, sin)`` for those positions, as ``layer`` rotates them.
        previous_position_embeddings: the same as ``previous_layer`` rotates them (Gemma's local
            and global layers rotate differently; the same tensors elsewhere).
        visual_index: ``(B, n_images, n)`` positions of the visual tokens.
        visual_ids: ``(B, n_images, n)`` the same tokens as indices into the visual block that entered
            the language model (stable across boundaries).
        valid: ``(B, L)`` False on padding.
        input_ids: ``(B, L)`` token ids (the image placeholder id on visual tokens).
        input_embeddings: ``(B, L, D)`` the language model's input embeddings of these tokens
            (``None`` unless the stage sets ``needs_input_embeddings``).
        text_after_image: per row, positions of the prompt tokens after the last image; during
            training (labels given) only those with label -100, i.e. instructions, not answers.
        previous_layer, previous_hidden_states: decoder layer ``layer_index - 1`` and its input.
        previous_layer_keys: ``(1, H_kv, L, d)`` the keys that layer computed from that input in its
            own forward and wrote to the cache, where they are exactly what scoring with it would
            compute (one row, no earlier tokens cached); ``None``: computed again when read.
        scratch: a dict that lives for one prefill, for what a stage computes once and reuses at
            later boundaries.
        final_norm_fn: the model's final norm (the one before the LM head).
        keys_fn: ``(layer, hidden_states, position_embeddings, valid) -> (B, L, H_kv * d)`` the keys
            ``layer`` computes for these tokens (``LayerScheme.layer_keys``).
    """

    layer_index: int
    layer: nn.Module
    hidden_states: torch.Tensor
    position_embeddings: tuple[torch.Tensor, torch.Tensor]
    visual_index: torch.Tensor
    visual_ids: torch.Tensor
    valid: torch.Tensor
    input_ids: torch.Tensor
    input_embeddings: torch.Tensor | None
    text_after_image: list[torch.Tensor]
    previous_layer: nn.Module | None
    previous_hidden_states: torch.Tensor | None
    scratch: dict
    attention_fn: Callable[..., torch.Tensor]
    run_layer_fn: Callable[[nn.Module, torch.Tensor, int], torch.Tensor]
    output_head_fn: Callable[[torch.Tensor], torch.Tensor]
    final_norm_fn: Callable[[torch.Tensor], torch.Tensor] | None = None
    keys_fn: Callable[..., torch.Tensor] | None = None
    previous_position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None
    previous_layer_keys: torch.Tensor | None = None

    def rope(self, previous_layer: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """``(cos, sin)`` of the layer a stage reads: ``previous_layer`` or ``layer``."""
        if previous_layer and self.previous_position_embeddings is not None:
            return self.previous_position_embeddings
        return self.position_embeddings

    @property
    def last_index(self) -> torch.Tensor:
        """``(B,)`` position of the last token of each row (the last prompt token in a prefill)."""
        batch, length = self.hidden_states.shape[:2]
        return torch.full((batch,), length - 1, dtype=torch.long, device=self.hidden_states.device)

    def text_to_visual_attention(self, queries: list[torch.Tensor], previous_layer: bool = False) -> torch.Tensor:
        """``(B, n_images, n)`` attention from each row's ``queries`` to its visual tokens (float32).

        Computes only the query-rows x keys block with the layer's own norm, projections and RoPE
        (full-row causal softmax, mean over heads and queries), so the model keeps its fast attention
        backend. ``previous_layer=True`` scores with layer ``layer_index - 1`` on its own input, the
        attention that layer actually computed (FastV, SparseVLM); the default uses the next layer's
        projections on the current states (PyramidDrop, DUET).
        """
        if previous_layer:
            if self.previous_hidden_states is None:
                raise RuntimeError(f"layer {self.layer_index - 1} saw a different token set; cannot score with it")
            layer, hidden, keys = self.previous_layer, self.previous_hidden_states, self.previous_layer_keys
        else:
            layer, hidden, keys = self.layer, self.hidden_states, None
        arguments = (layer, hidden, self.rope(previous_layer), queries, self.valid, self.visual_index)
        return self.attention_fn(*arguments) if keys is None else self.attention_fn(*arguments, layer_keys=keys)

    def run_layer(self, hidden_states: torch.Tensor, previous: bool = False) -> torch.Tensor:
        """Run ``layer`` (``previous_layer`` with ``previous=True``) on ``hidden_states`` (these tokens,
        their mask and positions) without touching the KV cache or the hooks."""
        index = self.layer_index - 1 if previous else self.layer_index
        return self.run_layer_fn(self.previous_layer if previous else self.layer, hidden_states, index)

    def output_head(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """The model's own final norm and LM head applied to intermediate states (logits)."""
        return self.output_head_fn(hidden_states)

    def final_norm(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """The model's own final norm (the one before the LM head) applied to intermediate states."""
        return self.final_norm_fn(hidden_states)

    def keys(self, previous_layer: bool = False) -> torch.Tensor:
        """``(B, L, H_kv * d)`` the keys of the current tokens as the layer computes them (its input
        norm, ``k_proj``, per-head ``k_norm`` where it has one, RoPE), heads concatenated, before any
        grouped-query repetition; no gradient. Rotated as the row alone would rotate them (positions
        counted from each row's first valid token), so a padded batch gives each row its own keys.
        ``previous_layer=True``: the keys of layer ``layer_index - 1`` on its own input (DART's pivots)."""
        if previous_layer:
            if self.previous_hidden_states is None:
                raise RuntimeError(f"layer {self.layer_index - 1} saw a different token set; cannot take its keys")
            layer, hidden = self.previous_layer, self.previous_hidden_states
        else:
            layer, hidden = self.layer, self.hidden_states
        return self.keys_fn(layer, hidden, self.rope(previous_layer), self.valid)


@dataclass
class Selection:
    """What ``LanguageStage.select`` may return instead of bare indices.

    Attributes:
        index: ``(B, n_images, keep)`` indices into the visual block, ascending.
        hidden_states: optional ``(B, n_images, keep, D)`` states to put in those slots instead of the
            tokens' own (token recycling: a merged token takes the slot of one it stands for).
    """

    index: torch.Tensor
    hidden_states: torch.Tensor | None = None


class LanguageStage(ABC):
    """Drops visual tokens inside the language model at the schedule's boundaries.

    ``needs_input_embeddings``: the stage reads ``LayerView.input_embeddings`` (the language model's
    input embeddings of the current tokens); the runtime keeps them through the prefill only then.
    """

    needs_input_embeddings: ClassVar[bool] = False
    #: whose attention the stage reads at a boundary: ``"layer"`` (the layer after it, ``LayerView.layer``),
    #: ``"previous"`` (the layer before it) or ``None`` (no layer's attention). In a language model
    #: that mixes layer kinds, a boundary sits only where that layer is an attention layer
    #: (``Geometry.boundary_layers``); ``check_boundaries`` refuses the others.
    reads: ClassVar[str | None] = "layer"
    #: ``select`` may return a ``Selection`` with states of its own (merged tokens): the survivors of a
    #: boundary are then not only a subset of the tokens before it (``duet-vlm check``'s ideal reads it).
    merges: ClassVar[bool] = False
    #: what ``select`` reads of a ``LayerView`` besides the residual streams, the visual tokens' places,
    #: the attention and keys of the layer ``reads`` names, the input embeddings
    #: (``needs_input_embeddings``) and its scratch: ``"input_ids"`` (the prompt's token ids),
    #: ``"run_layer"`` (a decoder layer or the output head run on states of its own:
    #: ``LayerView.run_layer``, ``output_head``), ``"position_embeddings"``. An engine serves a stage
    #: whose needs it meets and refuses the others by what they need (vLLM's plugin:
    #: ``integrations.vllm.language.checks``).
    view_needs: ClassVar[frozenset[str]] = frozenset()

    @abstractmethod
    def score(self, view: LayerView) -> torch.Tensor:
        """``(B, n_images, n)`` importance of each visual token; the highest ``keep`` survive."""

    def select(self, view: LayerView, keep: int) -> torch.Tensor | Selection:
        """``(B, n_images, keep)`` indices into the visual block to keep (or a ``Selection``). The
        runtime asks only for ``keep`` > 0: where it is 0 every token goes, whatever a stage would
        say (``runtime.boundary.drops_all``)."""
        return top_k_in_order(self.score(view), keep)


@dataclass
class Plan:
    """A method's concrete stages for one model geometry."""

    schedule: Schedule
    vision: VisionStage | None = None
    language: LanguageStage | None = None
    positions: str | None = None  # None: the model's default (``resolve_positions``)

    def __post_init__(self) -> None:
        check_positions(self.positions)
        if self.vision is None and self.schedule.llm_input != self.schedule.visual_tokens:
            raise ValueError("a schedule that reduces the LLM input needs a vision stage")
        if self.language is None and self.schedule.boundaries:
            raise ValueError("a schedule with pruning boundaries needs a language stage")


class LayerKindError(ValueError):
    """A pruning boundary where the language stage's scoring layer computes no attention."""


def check_boundaries(plan: Plan, geometry: Geometry) -> None:
    """Refuse a plan whose language stage would score with a layer that computes no attention
    scores (a linear-attention layer of a hybrid language model), or that prunes past the deepest
    boundary the model allows (layers that reuse an earlier layer's keys and values), naming the
    boundaries that work."""
    if plan.language is None:
        return
    check_boundary_layers(type(plan.language), [layer for layer, _ in plan.schedule.boundaries], geometry)


def check_boundary_layers(stage: type, layers, geometry: Geometry) -> None:
    """``check_boundaries`` for boundary ``layers`` of a language stage of class ``stage``, before a
    plan exists (an explicit boundary is refused before its budget is solved)."""
    if geometry.attention_layers is None and geometry.last_boundary is None:
        return
    reads = stage.reads
    allowed = geometry.boundary_layers(reads)
    wrong = [layer for layer in layers if layer not in allowed]
    if not wrong:
        return
    reasons = []
    if geometry.attention_layers is not None:
        whose = {"layer": "the layer after it", "previous": "the layer before it"}.get(reads, "")
        reasons.append(
            f"on this model only layers {list(geometry.attention_layers)} compute attention (the others are linear "
            "attention)" + (f", and the stage scores with {whose}" if whose else "")
            + ", and the first of them keeps the whole prompt"
        )
    if geometry.last_boundary is not None:
        reasons.append(
            f"from layer {geometry.last_boundary} on, this model's layers store or reuse keys and values that later "
            f"layers share (KV sharing), so every boundary must be at layer {geometry.last_boundary} or before"
        )
    raise LayerKindError(
        f"{stage.__name__} cannot prune after layer(s) {wrong}: " + "; ".join(reasons)
        + f"; boundaries that work: {list(allowed)}"
    )


def check_positions(positions: str | None) -> None:
    if positions not in (None, "contiguous", "original"):
        raise ValueError(f"positions must be 'contiguous' or 'original' (or None for the model's default), got {positions!r}")


class BudgetWarning(UserWarning):
    """A budget that reduces nothing (at or above an item's token count)."""


class ReducedHiddenStatesWarning(UserWarning):
    """``output_hidden_states`` under a reducer: per-layer hidden states at reduced lengths."""


class PositionsError(ValueError):
    """A position mode the model cannot use (renumbering under M-RoPE)."""


def resolve_positions(positions: str | None, geometry: Geometry) -> str:
    """The position mode of a plan for ``geometry``: ``None`` means the model's default.

    1-D RoPE models default to ``"contiguous"`` (the references of DUET, PyramidDrop, SparseVLM and
    PIO renumber after every drop). Under M-RoPE (Qwen-VL) a visual token's position is a 3-D
    (time, row, column) coordinate and text after an image continues from ``rope_deltas``: the
    reference keeps every kept token's original position, and renumbering has no sound meaning.
    """
    if geometry.rope == "mrope":
        if positions == "contiguous":
            raise PositionsError(
                "positions='contiguous' renumbers the kept visual tokens, which has no sound meaning under M-RoPE "
                "(3-D time/row/column positions; text continues from rope_deltas). Use positions='original' (the "
                "default on this model): kept tokens keep their 3-D positions, merged tokens take their anchor's"
            )
        return "original"
    return positions or "contiguous"
