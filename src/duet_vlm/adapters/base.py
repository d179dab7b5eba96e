"""What the runtime needs to know about a model family, and nothing about methods.

A family adapter answers four questions for the runtime:

1. **Where are the visual items?** ``find_items`` turns a batch's ``input_ids`` (and the forward's
   keyword arguments, e.g. ``image_sizes``) into ``VisualItem``s: one image (all its tiles and
   newline tokens) or one video (all its frames) in one row, its placeholder slots, and the
   ``Geometry`` a method's budget solver needs for it.
2. **Which vision layers carry the signals?** ``towers`` names the encoder layer whose input and
   output are captured for every tower (Video-LLaVA has two); ``vision_scores`` turns a captured
   input into per-token importance and keys from that layer's own projections, so the tower keeps
   its attention backend.
3. **How do vision tokens map to slots?** ``unit_features`` hands a vision stage the pre-projector
   features of an item's units (a frame, or an image) and ``project`` maps the stage's output into
   the language model's space; the runtime writes it into the item's first slots at the language
   model's entry (the *feature site*), so transformers' placeholder checks and packing run unchanged.
4. **How does the decoder number positions?** ``split_positions`` separates what decoder layers
   receive as ``position_ids`` from what ``rotary_emb`` turns into RoPE: the same ``(B, L)`` tensor
   for 1-D RoPE, the text row and the ``(3, B, L)`` M-RoPE rows for Qwen-VL. The runtime gathers
   both along their last (sequence) axis.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

import torch
from torch import nn

from ..geometry import Geometry
from ..scoring import clip_layer_scores
from .scheme import CausalLayers, LayerScheme


class UnreducibleInput(NotImplementedError):
    """Visual input an adapter cannot reduce (Gemma 4's videos): refused while the reducer would
    reduce, passed to the unpatched model when it reduces nothing (``full``)."""


@dataclass
class VisualItem:
    """One image or video in one row of a batch.

    Attributes:
        row: batch row.
        start: first placeholder slot in the row (full input coordinates).
        geometry: the item's shape facts (its ``visual_tokens`` slots follow ``start``).
        tower: name of the tower that encoded it (a key of ``ModelAdapter.towers``).
    """

    row: int
    start: int
    geometry: Geometry
    tower: str = "image"
    layout: object = None  # adapter-private facts (LLaVA-NeXT: its tiles and slot map)

    @property
    def length(self) -> int:
        return self.geometry.visual_tokens

    def unit_start(self, unit: int) -> int:
        """First slot (full input coordinates) of ``unit``."""
        return self.start + unit * self.geometry.unit_tokens


@dataclass
class Capture:
    """Input and output of a tower's feature layer, for every unit it encoded (one row per unit).

    ``calls`` holds the rows of each call of the tower, in order (LLaVA-OneVision encodes images,
    then videos, with the same tower); ``contexts`` holds, per call, the feature layer's keyword
    arguments (``layer_kwargs``) and the arguments of the tower's entry module, if the adapter names
    one (``entry_args``, ``entry_kwargs``: Qwen-VL's ``grid_thw``)."""

    layer_input: torch.Tensor
    output: torch.Tensor
    calls: tuple[int, ...] = ()
    contexts: tuple[dict, ...] = ()
    source: object = None  # a weak reference to the tower call's output object, once it returned


@dataclass
class UnitFeatures:
    """What a vision stage needs for a stack of units of the same shape (see ``VisionView``)."""

    features: torch.Tensor
    scores: torch.Tensor
    keys: torch.Tensor
    attention: dict = field(default_factory=dict)  # {encoder layer: scores like ``scores``}
    entered: torch.Tensor | None = None  # like ``scores``, True where the patches were encoded (``VisionView``)


@dataclass
class Signals:
    """Scores and keys of every unit a tower encoded, in whatever layout the adapter's
    ``unit_features`` reads them: ``(units, P)`` rows here, one flat row of merged tokens for Qwen-VL
    (``starts``: each unit's first token). ``maps`` holds the scores of other encoder layers
    (``{layer: like scores}``) that a vision stage asked for."""

    scores: torch.Tensor
    keys: torch.Tensor
    maps: dict = field(default_factory=dict)
    starts: list[int] | None = None
    entered: torch.Tensor | None = None  # like ``scores``: True where an input stage let the patches in


class ModelAdapter:
    """Module paths and tensor conventions of one model family.

    Subclasses set the module attributes in ``__init__``. The attributes the runtime uses:

    - ``top``: the module receiving ``labels`` (or ``None`` for a bare base model),
    - ``base``: the module receiving ``input_ids`` and running vision + language,
    - ``language_model``: the text decoder (``LlamaModel``-like), ``layers`` its decoder layers,
      ``rotary_emb`` its RoPE module,
    - ``final_norm`` and ``lm_head`` (``None`` without a head): the output head,
    - ``towers``: ``{name: feature layer}`` of every vision tower, ``projector``,
    - ``placeholder_ids``: ``{token id: tower name}``,
    - ``geometry``: the geometry of a default image (what ``duet-vlm plan`` and attach-time checks
      use), and ``text_config``.

    Adapters are matched on the model's config (``model_type`` and the vision tower's model type),
    never on class names alone: a LLaVA class with a tower the adapter does not know is refused at
    attach, not mid-forward.
    """

    family: str = ""
    #: ``config.model_type`` values this adapter handles.
    model_types: tuple[str, ...] = ()
    #: vision ``model_type`` values its towers may have.
    vision_model_types: tuple[str, ...] = ()
    supported_classes: tuple[str, ...] = ()

    top: nn.Module | None
    base: nn.Module
    language_model: nn.Module
    layers: nn.ModuleList
    rotary_emb: nn.Module
    final_norm: nn.Module
    lm_head: nn.Module | None
    towers: dict[str, nn.Module]
    projector: nn.Module
    placeholder_ids: dict[int, str]
    geometry: Geometry
    #: ``geometry`` is only a nominal size (items come in any size): attach-time checks are lenient.
    nominal_geometry: bool = False
    #: ``{tower name: the tower's entry module}``: a call of the tower begins and ends there (a
    #: tower call that raised voids its encoding), and its arguments are kept with the captures.
    tower_entries: dict[str, nn.Module] = {}
    #: The tower takes a subset of its patches with their own positions (``enter_patch_subset``):
    #: a method's ``InputStage`` can keep patches out of the encoder.
    takes_patch_subsets: bool = False

    @classmethod
    def config_of(cls, model: nn.Module):
        return getattr(model, "config", None)

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        config = cls.config_of(model)
        return getattr(config, "model_type", None) in cls.model_types and hasattr(model, "get_input_embeddings")

    @classmethod
    def check_vision(cls, model: nn.Module) -> None:
        """Refuse, at attach time, a vision tower this adapter was not written for."""
        config = cls.config_of(model)
        for key in ("vision_config",):
            vision = getattr(config, key, None)
            kind = getattr(vision, "model_type", None)
            if vision is not None and kind not in cls.vision_model_types:
                raise TypeError(
                    f"duet-vlm's {cls.family} adapter supports vision towers of type "
                    f"{', '.join(cls.vision_model_types)}; this model's is {kind!r}"
                )

    def bind_modules(self, model: nn.Module) -> None:
        """The module paths every LLaVA-like family shares (``model.model.language_model`` ...)."""
        self.top = model if hasattr(model, "lm_head") else None
        self.base = model.model if self.top is not None else model
        self.language_model = self.base.language_model
        self.layers = self.language_model.layers
        self.rotary_emb = self.language_model.rotary_emb
        self.projector = getattr(self.base, "multi_modal_projector", None)  # Qwen-VL: its merger, set by the adapter
        self.final_norm = self.language_model.norm
        self.lm_head = self.top.lm_head if self.top is not None else None

    @property
    def text_config(self):
        return self.language_model.config

    def num_layers(self) -> int:
        return len(self.layers)

    @cached_property
    def scheme(self) -> LayerScheme:
        """The language side (``adapters.scheme``): each decoder layer's kind, the mask and RoPE it
        gets. Every layer attends causally under a mask built from the 2-D mask in the LLaVA and
        Qwen-VL families."""
        return CausalLayers(self.text_config, self.rotary_emb, ("attention",) * self.num_layers())

    # ----------------------------------------------------------------- visual items
    def find_items(self, input_ids: torch.Tensor, kwargs: dict, captures: dict | None = None) -> list[VisualItem]:
        """Every visual item of the batch, in row-major order. ``captures``: the towers' captures of
        this forward (``generate`` encodes the images before the forward, so their sizes may only be
        known from the towers' calls)."""
        raise NotImplementedError

    def items_from_runs(self, input_ids: torch.Tensor, token_id: int, tower: str, geometry_of_run) -> list[VisualItem]:
        """Items from the runs of ``token_id`` placeholders: ``geometry_of_run(length)`` returns the
        geometry of one item; a run longer than one item holds several consecutive items."""
        items = []
        is_token = input_ids == token_id
        if not is_token.any():
            return items
        for row in range(input_ids.shape[0]):
            positions = is_token[row].nonzero()[:, 0].tolist()
            runs: list[list[int]] = []
            for position in positions:
                if runs and position == runs[-1][1]:
                    runs[-1][1] += 1
                else:
                    runs.append([position, position + 1])
            for start, end in runs:
                geometry = geometry_of_run(end - start)
                if (end - start) % geometry.visual_tokens:
                    raise ValueError(
                        f"a run of {end - start} {tower} placeholder tokens in row {row} is not a whole number of "
                        f"items of {geometry.visual_tokens} tokens (mismatched placeholders?)"
                    )
                for item_start in range(start, end, geometry.visual_tokens):
                    items.append(VisualItem(row, item_start, geometry, tower))
        return items

    # ----------------------------------------------------------------- vision side
    #: each unit's tokens start with a CLS token (CLIP); SigLIP towers have none.
    has_cls: bool = True

    def vision_scores(
        self, layer_input: torch.Tensor, tower: str = "image", received: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Importance of each patch ``(U, P)`` and head-averaged keys ``(U, T, d)`` of ``tower``'s
        feature layer, from the layer's own norm and projections on its captured input."""
        return self.layer_scores(self.towers[tower], layer_input, received)

    def layer_scores(
        self, layer: nn.Module, layer_input: torch.Tensor, received: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(scores, keys)`` of an encoder ``layer``: CLS-to-patch attention with a CLS token, the
        attention each patch receives without one (SigLIP), or with ``received`` on either
        (``VisionStage.received``)."""
        return clip_layer_scores(layer, layer_input, self.has_cls, received=received)

    def encoder_layer(self, tower: str, layer) -> nn.Module:
        """The encoder layer a vision stage names: an index into the tower's layers (negative from
        the end, as ``output_attentions`` numbers them), ``"first_full_attention"`` (every layer of a
        CLIP or SigLIP tower attends globally: the first) or ``"last"``."""
        layers = getattr(self.tower_entries[tower], "vision_model", self.tower_entries[tower]).encoder.layers
        return layers[check_layer({"first_full_attention": 0, "last": -1}.get(layer, layer), len(layers))]

    def trace(self, items: list[VisualItem], captures: dict[str, Capture], inputs_embeds: torch.Tensor) -> None:
        """Complete items whose layout is only known once their features sit in ``inputs_embeds``
        (at the language model's entry); most families know everything from ``input_ids``."""

    def units_needed(self, item: VisualItem) -> int:
        """Rows of its tower's captured features that ``item`` uses (frames, or tiles)."""
        return item.geometry.units

    def captured_units(self, capture: Capture) -> int:
        """How many units a tower's captures hold (one row per unit here)."""
        return capture.output.shape[0]

    def enter_patch_subset(self, stage, args: tuple, kwargs: dict) -> tuple[tuple, dict, torch.Tensor]:
        """A tower call's arguments ``(args, kwargs)`` with only the patches ``stage`` (an
        ``InputStage``) lets in, and ``(tokens,)`` True on the language-model tokens whose patches
        entered, over every item of the call (``takes_patch_subsets`` families)."""
        raise ValueError(self.no_patch_subsets())

    def no_patch_subsets(self) -> str:
        """Why this family's tower cannot encode a subset of its patches (the refusal's message)."""
        return (
            f"{self.family}'s vision tower encodes whole images (attention over the full patch grid, and nothing in "
            "its arguments or its layout of items takes a subset): it cannot leave patches out. Methods that choose "
            "patches before the encoder run on Qwen2-VL, Qwen2.5-VL, Qwen3-VL, Qwen3.5 and LLaVA-1.5"
        )

    def subset_inner_hooks(self, tower: str) -> dict:
        """``{module inside the tower: reshape(output, entered) -> output}``: forward hooks a
        patch-subset call of ``tower`` needs inside it, besides the entry's (CLIP's embeddings leave
        out the rows of the patches that do not enter); none where the entry's arguments suffice."""
        return {}

    def subset_after_tower(self, tower: str) -> dict:
        """``{module: (compact(input, entered) -> rows or None, put_back(output, entered) -> output)}``:
        a module the model runs on the whole output of a patch-subset call of ``tower`` right after
        it, which should see only the entered rows (``None``: the input is not that output)."""
        return {}

    def expand_tower_output(self, output, entered: torch.Tensor) -> None:
        """Put a patch-subset tower call's outputs back at their tokens' places, in place (zeros
        where no patch entered), so that the model sees a whole encoding."""
        raise NotImplementedError

    def expand_capture(self, capture: Capture, entered: torch.Tensor) -> None:
        """Put a patch-subset tower call's captured layer inputs and outputs back at their tokens'
        places, in place (zeros elsewhere), where the adapter reads captures one row per unit; the
        ``entered`` tokens are kept with the capture (``context["entered"]``) either way."""

    def captured_entered(self, capture: Capture) -> torch.Tensor | None:
        """``(units, T)`` True on the captured tokens whose patches entered the tower (a CLS token
        always does), ``None`` where no input stage chose patches; one row per unit."""
        if not any(context.get("entered") is not None for context in capture.contexts):
            return None
        rows = []
        for count, context in zip(capture.calls or (capture.output.shape[0],), capture.contexts):
            entered = context.get("entered")
            rows.append(torch.ones(count, capture.output.shape[1], dtype=torch.bool) if entered is None
                        else self.tower_layout(entered).cpu())
        return torch.cat(rows).to(capture.output.device)

    def tower_layout(self, entered: torch.Tensor) -> torch.Tensor:
        """``(units, T)`` True on the tower's rows each unit keeps, from ``entered`` (its patches, flat
        over the call's units): its CLS row, if it has one, and its entered patches."""
        patches = entered.view(-1, self.geometry.patches)
        return torch.cat([patches.new_ones(patches.shape[0], int(self.geometry.has_cls)), patches], dim=1)

    def vision_signals(self, capture: Capture, tower: str, layers: tuple = (), received: bool = False) -> Signals:
        """The scores and keys of every captured unit of ``tower``, and the scores of ``layers``
        (other encoder layers, from their captured inputs); with ``received``, attention received
        on a tower with a CLS token too (``VisionStage.received``)."""
        entered = self.captured_entered(capture)
        scores, keys = self.subset_scores(
            lambda layer_input: self.vision_scores(layer_input, tower, received), capture.layer_input, entered
        )
        maps = {}
        for layer in layers:
            layer_input = torch.cat([context["layers"][layer][0] for context in capture.contexts])
            encoder_layer = self.encoder_layer(tower, layer)
            maps[layer] = self.subset_scores(
                lambda layer_input: self.layer_scores(encoder_layer, layer_input, received), layer_input, entered
            )[0]
        return Signals(scores, keys, maps, entered=entered)

    def subset_scores(
        self, score, layer_input: torch.Tensor, entered: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``score(layer_input) -> (scores, keys)`` of each unit over the tokens that ``entered`` the
        tower (``(units, T)``; ``None``: all), as the tower saw them; zeros at the others."""
        if entered is None or bool(entered.all()):
            return score(layer_input)
        cls = int(self.geometry.has_cls)
        scores = keys = None
        for unit, (tokens, mine) in enumerate(zip(layer_input, entered)):
            unit_scores, unit_keys = score(tokens[mine][None])
            if scores is None:
                scores = unit_scores.new_zeros(len(entered), entered.shape[1] - cls)
                keys = unit_keys.new_zeros(len(entered), entered.shape[1], unit_keys.shape[-1])
            scores[unit, mine[cls:]] = unit_scores[0]
            keys[unit, mine] = unit_keys[0]
        return scores, keys

    def unit_features(
        self,
        items: list[VisualItem],
        capture: Capture,
        signals: Signals,
        first_row,
        inputs_embeds: torch.Tensor | None = None,
    ) -> UnitFeatures:
        """A vision stage's input for ``items`` (same geometry), stacked unit by unit: the
        pre-projector features, patch scores and keys of each unit. ``first_row(item)`` is the first
        captured row of the item (items repeated by ``generate`` share rows); ``inputs_embeds`` is
        the language model's input, for families that reduce after the projector (Qwen-VL)."""
        units = items[0].geometry.units
        rows = torch.cat([torch.arange(units) + first_row(item) for item in items]).to(signals.scores.device)
        return UnitFeatures(
            capture.output[rows], signals.scores[rows], signals.keys[rows],
            {layer: scores[rows] for layer, scores in signals.maps.items()},
            None if signals.entered is None else signals.entered[rows],
        )

    def slot_units(self, item: VisualItem) -> torch.Tensor:
        """``(slots,)`` the unit (frame) each of ``item``'s slots belongs to; -1 on structural slots."""
        geometry = item.geometry
        units = torch.arange(geometry.units).repeat_interleave(geometry.unit_tokens)
        return torch.cat([units, torch.full((geometry.trailing,), -1)])

    def cell_views(self, item: VisualItem) -> tuple[list[tuple[str, int, int]], torch.Tensor]:
        """Where ``item``'s slots sit in a picture: the grids to draw (``(name, rows, cols)``: the
        image, or each frame) and ``(slots, 3)`` cells ``(grid, row, col)``, -1 on CLS slots."""
        geometry = item.geometry
        rows, cols = geometry.grid
        # Slots of a unit hold its CLS first when there is one more slot than patches.
        cls_slot = int(geometry.unit_tokens == geometry.patches + 1)
        within = torch.arange(geometry.unit_tokens) - cls_slot
        unit = torch.arange(geometry.units).repeat_interleave(geometry.unit_tokens)
        within = within.repeat(geometry.units)
        cells = torch.stack([unit, within // cols, within % cols], dim=1)
        cells[within.lt(0)] = -1
        cells = torch.cat([cells, torch.full((geometry.trailing, 3), -1)])
        names = [f"frame {u}" for u in range(geometry.units)] if geometry.units > 1 else [geometry.modality]
        return [(name, rows, cols) for name in names], cells

    def vision_slots(self, item: VisualItem, vision_kept: torch.Tensor) -> torch.Tensor:
        """The slot each output of a vision stage stands for (``vision_kept``: ``(units, k)`` vision
        token indices per unit); -1 for a CLS token that has no slot."""
        geometry = item.geometry
        offset = geometry.unit_tokens - geometry.patches - int(geometry.has_cls)  # -1 when slots skip CLS
        slots = vision_kept.cpu() + offset
        slots = slots + (torch.arange(geometry.units) * geometry.unit_tokens)[:, None]
        return torch.where(vision_kept.cpu() + offset < 0, -1, slots).reshape(-1)

    def view_units(self, item: VisualItem, view_index: torch.Tensor) -> torch.Tensor:
        """The tile each token of a one-unit vision view stands for (0: an image is its own unit)."""
        return torch.zeros_like(view_index)

    def project(self, item: VisualItem, features: torch.Tensor) -> torch.Tensor:
        """Map a vision stage's output ``(U, k, C)`` into the language model's embedding space."""
        return self.projector(features)

    def reduced_slots(self, item: VisualItem, kept: torch.Tensor) -> torch.Tensor:
        """Where a vision stage's ``(U, k)`` outputs go (full-input slots, in output order): each
        unit's first ``k`` slots. With 1-D RoPE positions are renumbered or taken from these slots;
        families that keep original positions put each output in the slot of the token it stands
        for instead."""
        units, keep = kept.shape
        return torch.cat([item.unit_start(u) + torch.arange(keep) for u in range(units)])

    def ideal_visual(self, inputs: dict, visual: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
        """``(kept slots, width)`` what the language model receives at the ``kept`` placeholder slots
        (``(B, L)``, a subset of the ``visual`` ones, the first of each row's) when nothing chooses
        them: the family's tower on every tile, frame or patch of ``inputs`` as the model runs it,
        its projector on the kept tokens only, in slot order (row by row, item by item). What the
        benchmarks' ideal (``bench.ideal.IdealModel``) feeds the unpatched layers."""
        raise NotImplementedError(f"the benchmarks' ideal does not build {self.family}'s visual tokens")

    def split_positions(self, lm_position_ids, layer_kwargs: dict, batch: int):
        """``(layer position_ids, rotary input)`` of a prefill, from the ``position_ids`` the language
        model received and the first decoder layer's keyword arguments. 1-D RoPE: the same tensor."""
        ids = layer_kwargs["position_ids"].expand(batch, -1)
        return ids, ids

    def text_positions(self, position_ids: torch.Tensor) -> torch.Tensor | None:
        """A chunk's text positions as ``generate`` numbers them (indices into the unreduced
        conversation), from the ``position_ids`` the language model received: a 2-D tensor, or the
        text row of ``(4, B, L)`` M-RoPE positions; ``None`` where they cannot be read as indices."""
        if position_ids.dim() == 2:
            return position_ids
        if position_ids.dim() == 3 and position_ids.shape[0] == 4:
            return position_ids[0]  # generate's text row first under M-RoPE
        return None

    def decode_position_ids(self, start: int, new: int, batch: int, device) -> torch.Tensor | None:
        """Positions of ``new`` decoded tokens after ``start`` tokens of the unreduced sequence, for
        a decoding step called without positions or mask; ``None``: the runtime's 1-D handling
        (``_continue_prompt``) covers it."""
        return None

    def take_layer_additions(self, kwargs: dict):
        """Visual features the language model adds to the visual positions after its first layers
        (Qwen3-VL's DeepStack), taken out of its keyword arguments so the runtime adds them to the
        kept tokens itself: ``(visual_pos_masks (B, L), [per layer (visual tokens, D)])`` or ``None``."""
        return None


def check_layer(index: int, depth: int) -> int:
    """An encoder layer index of a tower of ``depth`` layers (negative from the end).

    >>> check_layer(5, 24), check_layer(-2, 4)
    (5, -2)
    """
    if isinstance(index, bool) or not isinstance(index, int):
        raise ValueError(f"an encoder layer is an int index or 'first_full_attention' / 'last', got {index!r}")
    if not -depth <= index < depth:
        raise ValueError(f"encoder layer {index} does not exist in a vision tower of {depth} layers")
    return index


def feature_layer(tower: nn.Module, feature_layer_index: int) -> nn.Module:
    """The encoder layer whose output is ``hidden_states[feature_layer_index]`` of ``tower``."""
    if not isinstance(feature_layer_index, int):
        raise ValueError(
            f"vision_feature_layer={feature_layer_index}: duet-vlm supports a single vision feature layer"
        )
    encoder = getattr(tower, "vision_model", tower).encoder
    layers = encoder.layers
    n = len(layers)
    # hidden_states[0] is the embedding output and hidden_states[k] the output of layer k - 1.
    layer_index = feature_layer_index % (n + 1) - 1
    if layer_index < 0:
        raise ValueError("vision_feature_layer selects the patch embeddings; no attention layer to score with")
    return layers[layer_index]
