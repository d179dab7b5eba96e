"""What a method's own selection computes, counted where it can be counted exactly: the matrix
products of its scoring and choosing, from the shapes the last prefill had. Optional: a method
without a declared count gets ``None``, never an estimate.

Only matrix products are counted (a multiply-add is 2 FLOPs, as ``duet_vlm.flops`` counts the
decoder); normalisations, masks, sorts and the greedy loops' elementwise updates are left out. They
are ``O(n d)`` or ``O(n k)`` against the ``O(n^2 d)`` products, but they run as ``k`` sequential
small steps, so the measured time (``prefill``: the forward against the ideal) can be far above
what the count suggests. The count says how much arithmetic the selection needs; the time says what
it costs here.

Declared (each method's own docstring gives the same terms):

- ``cdpruner``, per unit of ``n`` candidate patches, ``m`` text tokens, width ``D`` (the language
  model's input space), keeping ``k``: the cosine kernel ``2 n^2 D``, the relevance to the text
  ``2 n m D``, the greedy MAP's incremental Cholesky rows ``sum_t 2 t n = n k (k - 1)``;
- ``divprune``: the cosine-distance matrix ``2 n^2 D``;
- ``vispruner``: the cosine-similarity matrix of the pre-projector features ``2 n^2 C`` (``C``: the
  tower's width), formed when duplicates must go (``k < n``);
- ``dart``: the keys of layer ``K - 1`` recomputed for the row's ``L`` tokens ``2 L D (H_kv d)``,
  and the cosine of the ``v`` visual tokens to its ``P`` pivots ``2 P v D``.
- ``hiprune``, per unit of ``n`` tokens (the patches, and a CLIP tower's CLS token), on CLIP and
  SigLIP towers (elsewhere a tower's tokens are not one per candidate: not counted): in each of its
  two encoder layers (the object layer and the feature layer), the queries and keys recomputed from
  the layer's normed input ``2 * 2 n C^2`` and every query's logits over every key ``2 n^2 C``
  (``C``: the tower's width).

Every method also runs the projector on whatever rows its path projects; ``prefill`` counts those
rows with a hook and reports the rows beyond the ideal's (the ideal projects the kept tokens only)
as ``projector_extra_flops``, for every method.

>>> shape = ItemShape(units=1, candidates=576, kept=64, text=60, visual_per_layer=[64] * 32, text_after=55)
>>> dims = Widths(hidden=4096, vision=1024, kv=4096)
>>> declared_flops("divprune", None, [shape], dims)[0] == 2 * 576 ** 2 * 4096
True
>>> declared_flops("fastv", None, [shape], dims)
(None, {})
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from ..flops import DecoderDims


@dataclass(frozen=True)
class ItemShape:
    """One visual item of the last prefill as a selection saw it.

    Attributes:
        units: frames (1 for an image; an anyres image is one unit of all its tiles).
        candidates: patch slots per unit (CLS and newline slots excluded).
        kept: tokens per unit entering the language model.
        text: the row's text tokens (neither visual nor padding).
        visual_per_layer: the item's visual tokens entering each decoder layer.
        text_after: the row's tokens after its last visual slot (DART's text pivots come from there).
    """

    units: int
    candidates: int
    kept: int
    text: int
    visual_per_layer: list[int]
    text_after: int


@dataclass(frozen=True)
class Widths:
    """``hidden``: the language model's width (the projector's output); ``vision``: the tower's;
    ``kv``: key heads x head dim of a decoder layer (the first's, where layers differ: Gemma 4);
    ``tower``: the tower's ``model_type``."""

    hidden: int
    vision: int
    kv: int
    tower: str = ""

    @classmethod
    def of(cls, model) -> "Widths":
        text, vision = model.config.text_config, model.config.vision_config
        first = DecoderDims.from_config(text).layer(0)
        return cls(text.hidden_size, vision.hidden_size, first.kv_heads * first.head_dim, vision.model_type)


def _cdpruner(reducer, item: ItemShape, dims: Widths) -> dict[str, int]:
    n, k, D = item.candidates, item.kept, dims.hidden
    return {"kernel": 2 * n * n * D, "relevance": 2 * n * item.text * D, "greedy MAP": n * k * (k - 1)}


def _divprune(reducer, item: ItemShape, dims: Widths) -> dict[str, int]:
    return {"distances": 2 * item.candidates**2 * dims.hidden}


def _vispruner(reducer, item: ItemShape, dims: Widths) -> dict[str, int]:
    return {"similarity": 2 * item.candidates**2 * dims.vision if item.kept < item.candidates else 0}


def _dart(reducer, item: ItemShape, dims: Widths) -> dict[str, int]:
    layer = reducer.layer  # pruned after layer K - 1, reading that layer's keys on its own input
    visual = item.visual_per_layer[layer - 1]
    keep = item.visual_per_layer[layer]
    pivots = min(reducer.image_pivots, keep) + min(reducer.text_pivots, item.text_after)
    return {"keys": 2 * (item.text + visual) * dims.hidden * dims.kv, "pivot cosines": 2 * pivots * visual * dims.hidden}


def _hiprune(reducer, item: ItemShape, dims: Widths) -> dict[str, int] | None:
    if dims.tower not in ("clip_vision_model", "siglip_vision_model"):
        return None  # a tower whose tokens are not one per candidate (Qwen's merge, Gemma's pooling): not counted
    n, C = item.candidates + int(dims.tower == "clip_vision_model"), dims.vision  # every token is a query
    per_layer = 2 * 2 * n * C * C + 2 * n * n * C  # queries and keys recomputed, then every query's logits
    return {"object layer": per_layer, "feature layer": per_layer}


# Per unit (``_dart``: per item, its units are one pool), summed over units and items by ``declared_flops``.
DECLARED: dict[str, tuple[Callable[..., dict[str, int] | None], bool]] = {
    "cdpruner": (_cdpruner, True), "divprune": (_divprune, True), "vispruner": (_vispruner, True), "dart": (_dart, False),
    "hiprune": (_hiprune, True),
}


def declared_flops(method: str, reducer, items: list[ItemShape], dims: Widths) -> tuple[int | None, dict[str, int]]:
    """The selection's counted FLOPs over ``items`` and the terms they sum (``(None, {})`` when the
    method declares none)."""
    if method not in DECLARED:
        return None, {}
    count, per_unit = DECLARED[method]
    terms: dict[str, int] = {}
    for item in items:
        counted = count(reducer, item, dims)
        if counted is None:
            return None, {}
        for name, flops in counted.items():
            terms[name] = terms.get(name, 0) + flops * (item.units if per_unit else 1)
    return sum(terms.values()), terms


def item_shapes(stats, inputs: dict[str, torch.Tensor], visual_ids: set[int]) -> list[ItemShape]:
    """Each visual item of ``stats`` (a ``ReductionStats``), with its row's tokens after its last
    visual slot read from ``inputs`` (``visual_ids``: the placeholder token ids)."""
    ids, mask = inputs["input_ids"], inputs.get("attention_mask")
    shapes = []
    for item in stats.items:
        slots = int((item.cells[:, 0] >= 0).sum()) if item.cells is not None else item.tokens
        row = ids[item.row] if mask is None else ids[item.row][mask[item.row].bool()]
        visual = torch.isin(row, torch.tensor(sorted(visual_ids))).nonzero()
        after = len(row) - 1 - int(visual.max()) if len(visual) else 0
        shapes.append(ItemShape(item.units, slots // item.units, item.tokens_per_layer[0] // item.units,
                                stats.text_tokens[item.row], list(item.tokens_per_layer), after))
    return shapes


def projector_flops_per_row(projector: torch.nn.Module) -> int:
    """Matrix-product FLOPs of the projector per token (its linear layers, 2 per multiply-add)."""
    return sum(2 * m.in_features * m.out_features for m in projector.modules() if isinstance(m, torch.nn.Linear))


class ProjectorRows:
    """Counts the rows (tokens) the model's projector maps inside the block.

    >>> with ProjectorRows(model) as rows:                   # doctest: +SKIP
    ...     model(**inputs)
    >>> rows.count                                           # doctest: +SKIP
    1152
    """

    def __init__(self, model):
        self.projector = model.model.multi_modal_projector
        self.count = 0

    def _add(self, module, args, output):
        self.count += output.numel() // output.shape[-1]

    def __enter__(self):
        self._handle = self.projector.register_forward_hook(self._add)
        return self

    def __exit__(self, *exc):
        self._handle.remove()
