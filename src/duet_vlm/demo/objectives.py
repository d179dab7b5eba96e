"""What the demo recipe optimises: the visual subsets the decoder sees, the answer loss on them,
and the training-only auxiliary and grounding objectives (their heads are never shipped).

Visual subsets are method-neutral by construction (``SubsetMix``): all patches, uniformly random
patches, or the patch grid average-pooled in 2x2 or 3x3 windows (pre-projector features, as the
library's ``pool`` method and DUET's merges do), each row with its tokens' original position ids,
with contiguous renumbered positions, or renumbered in a random order. None is chosen by CLS
attention or text attention, so no method under test is favoured.

>>> mix = SubsetMix()
>>> subset, orders = mix.draw(torch.Generator().manual_seed(0), rows=4)
>>> subset.kind in ("full", "random", "pool") and len(orders) == 4
True
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ..adapters.scheme import rotate_like
from ..methods.pool import pooled_centres
from .. import synthetic
from .batching import N_IMAGE_TOKENS, packed_attention_mask
from .geometry import LLAVA, geometry_of

ORDERS = ("original", "contiguous", "shuffled")


# ----------------------------------------------------------------------------- visual subsets

@dataclass(frozen=True)
class VisualSubset:
    """The visual tokens of one training step: ``kind`` "full", "random" (``size`` = patches kept, of
    576: a model with fewer tokens keeps the same share of them) or "pool" (``size`` = window side;
    ``grid / size`` cells per side)."""

    kind: str = "full"
    size: int = N_IMAGE_TOKENS

    @property
    def tokens(self) -> int:
        """Visual tokens on the first demo model's 24x24 grid."""
        return self.count(synthetic.GRID)

    def count(self, grid: int) -> int:
        """Visual tokens this subset keeps of a ``grid x grid`` image."""
        if self.kind == "random":
            return max(1, round(self.size * grid * grid / N_IMAGE_TOKENS))
        if self.kind == "pool":
            return (grid // self.size) ** 2
        return grid * grid


FULL = VisualSubset()


@dataclass
class SubsetMix:
    """How often each visual subset is drawn (shares are normalised), and how rows number them.

    Args:
        full / random / pool2 / pool3: relative frequency of steps with all 576 patches, a uniformly
            random subset of ``random_min .. random_max`` patches, or the 12x12 / 8x8 average-pooled grid.
        renumber: share of rows of a reduced step whose visual tokens get contiguous positions
            (the rest keep their original position ids; a pooled cell has its centre patch's).
        shuffle: share of the renumbered rows whose tokens also come in a random order, so that
            no answer can depend on where RoPE puts a token.
    """

    full: float = 0.2
    random: float = 0.35
    pool2: float = 0.2
    pool3: float = 0.25
    random_min: int = 64
    random_max: int = 256
    renumber: float = 0.5
    shuffle: float = 0.5

    def draw(self, generator: torch.Generator, rows: int) -> tuple[VisualSubset, list[str]]:
        shares = torch.tensor([self.full, self.random, self.pool2, self.pool3], dtype=torch.float64)
        kind = int(torch.multinomial(shares / shares.sum(), 1, generator=generator))
        size = int(torch.randint(self.random_min, self.random_max + 1, (1,), generator=generator))
        subset = [FULL, VisualSubset("random", size), VisualSubset("pool", 2), VisualSubset("pool", 3)][kind]
        u = torch.rand(rows, 2, generator=generator)
        if subset.kind == "full":
            return subset, ["original"] * rows
        orders = ["original" if a >= self.renumber else "shuffled" if b < self.shuffle else "contiguous"
                  for a, b in u.tolist()]
        return subset, orders


def select_visual(patch_features: torch.Tensor, projector: nn.Module, subset: VisualSubset,
                  orders: list[str], generator: torch.Generator | None = None):
    """``(tokens (B, k, H), slot_patch (B, k), assign (B, n, k))``: the projected visual tokens
    of ``subset``, the patch whose position id each token keeps in "original" order, and which
    patches each token stands for (one for a kept patch, the window's for a pooled cell).

    ``patch_features`` are pre-projector (B, n, Hv), ``n`` a square (576 patches, or Qwen's 144 merged
    tokens, whose projector is the identity): pooled cells average them before projecting.
    """
    B, n, _ = patch_features.shape
    side = int(round(n ** 0.5))
    device = patch_features.device
    if subset.kind == "pool":
        g = side // subset.size
        grid = patch_features.transpose(1, 2).reshape(B, -1, side, side)
        pooled = F.avg_pool2d(grid, subset.size).flatten(2).transpose(1, 2)
        tokens = projector(pooled)
        slot = pooled_centres((side, side), (g, g)).to(device).expand(B, -1)
        rc = torch.arange(n, device=device)
        cell = (rc // side // subset.size) * g + (rc % side) // subset.size
        assign = F.one_hot(cell, g * g).bool().expand(B, -1, -1)
    else:
        projected = projector(patch_features)
        if subset.kind == "random":
            slot = torch.stack([torch.randperm(n, generator=generator)[:subset.count(side)].sort().values
                                for _ in range(B)]).to(device)
        else:
            slot = torch.arange(n, device=device).expand(B, -1)
        tokens = torch.gather(projected, 1, slot[..., None].expand(-1, -1, projected.shape[-1]))
        assign = F.one_hot(slot, n).bool().transpose(1, 2)
    if "shuffled" in orders:
        perms = torch.stack([torch.randperm(slot.shape[1], generator=generator) if o == "shuffled"
                             else torch.arange(slot.shape[1]) for o in orders]).to(device)
        tokens = torch.gather(tokens, 1, perms[..., None].expand(-1, -1, tokens.shape[-1]))
        slot = torch.gather(slot, 1, perms)
        assign = torch.gather(assign, 2, perms[:, None].expand(-1, n, -1))
    return tokens, slot, assign


def unanswerable(required: torch.Tensor, kept_patches: torch.Tensor) -> torch.Tensor:
    """(B, Q) bool: questions some of whose patch groups (``required``, (B, Q, 576) group ids) lost
    every patch in ``kept_patches`` (B, 576)."""
    bad = torch.zeros(required.shape[:2], dtype=torch.bool, device=required.device)
    for g in range(1, int(required.max()) + 1 if required.numel() else 1):
        member = required == g
        bad |= member.any(-1) & ~(member & kept_patches[:, None]).any(-1)
    return bad


# ----------------------------------------------------------------------------- features and the decoder

def vision_features(model, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(patch features before the projector (B, 576, Hv), CLS state (B, Hv))`` of the feature layer (LLaVA;
    ``Geometry.features`` for either architecture)."""
    return LLAVA.features(model, {"pixel_values": pixel_values})


def image_features(model, pixel_values) -> tuple[torch.Tensor, torch.Tensor]:
    """``(projected visual tokens (B, n, H), the scene objective's input)``, as the model's own
    ``get_image_features`` computes the tokens: LLaVA's projected patches and the CLS state of the
    feature layer (``pixel_values`` a tensor), or Qwen's merged tokens and their mean (``pixel_values``
    the ``Geometry.image_inputs`` dict)."""
    geometry = geometry_of(model)
    batch = pixel_values if isinstance(pixel_values, dict) else {"pixel_values": pixel_values}
    patches, scene = geometry.features(model, batch)
    return geometry.projector(model)(patches), scene


class LanguageResult(NamedTuple):
    output: object  # the model's CausalLMOutput (loss on the answers that stayed answerable)
    grounding: torch.Tensor | None
    dropped_questions: int


def language_forward(model, batch: dict, patch_features: torch.Tensor, subset: VisualSubset = FULL,
                     orders: list[str] | None = None, generator: torch.Generator | None = None,
                     targets: dict | None = None, ground_layers: tuple[int, ...] = ()) -> LanguageResult:
    """Run the language model on ``batch`` with ``subset`` of each image's visual tokens spliced in.

    ``patch_features``: pre-projector (B, n, Hv). ``orders`` (per row, see ``ORDERS``): "original"
    keeps each token's position id (the text after the image too), "contiguous" renumbers the
    visual tokens and shifts the text after them, as if the image had fewer tokens; "shuffled"
    also permutes them. On Qwen2.5-VL (M-RoPE positions, ``Geometry.positions``) every row keeps
    its tokens' positions, as every method there does. With ``targets`` (``required``, ``ground_query``, ``ground_target`` of a
    batch), questions a random subset made unanswerable leave the loss, and from each layer of
    ``ground_layers`` the grounding loss is computed on the kept tokens (pooled cells inherit
    their window's targets).
    """
    ids = batch["input_ids"]
    B = ids.shape[0]
    orders = orders or ["original"] * B
    geometry = geometry_of(model)
    if geometry is not LLAVA and set(orders) != {"original"}:
        raise ValueError(f"{geometry.architecture}'s visual tokens keep their M-RoPE positions: renumbering "
                         f"({sorted(set(orders) - {'original'})}) is not done there")
    image_mask = ids == model.config.image_token_id
    first = int(image_mask[0].nonzero()[0])
    n_image = patch_features.shape[1]
    last = first + n_image
    tokens, slot, assign = select_visual(patch_features, geometry.projector(model), subset, orders, generator)
    k = tokens.shape[1]
    text = model.get_input_embeddings()(ids.masked_fill(image_mask, 0))
    embeds = torch.cat([text[:, :first], tokens.to(text.dtype), text[:, last:]], 1)
    labels = torch.cat([batch["labels"][:, :first], batch["labels"].new_full((B, k), -100), batch["labels"][:, last:]], 1)
    seg = batch["segments"]
    segments = torch.cat([seg[:, :first], seg.new_zeros(B, k), seg[:, last:]], 1)
    pos = batch["position_ids"]
    renumber = torch.tensor([o != "original" for o in orders], device=ids.device)
    visual_pos = torch.where(renumber[:, None], first + torch.arange(k, device=ids.device), first + slot)
    after = (pos[:, last:] - renumber[:, None].long() * (n_image - k)).clamp(min=0)
    positions = geometry.positions(torch.cat([pos[:, :first], visual_pos, after], 1), first)

    dropped = 0
    queries = None
    if targets is not None:
        queries = targets["ground_query"]
        if subset.kind == "random" and "required" in targets:
            bad = unanswerable(targets["required"], assign.any(-1))
            dropped = int(bad.sum())
            if dropped:
                bad_token = torch.gather(torch.cat([bad.new_zeros(B, 1), bad], 1), 1, segments.clamp(min=0)) & (segments > 0)
                labels = labels.masked_fill(bad_token, -100)
                queries = queries.masked_fill(bad, -1)
    mask = packed_attention_mask(segments)
    if not (labels != -100).any():
        labels = None  # every question lost its object: no answer loss this step (the model returns none)

    layers = model.model.language_model.layers
    inputs: dict[int, tuple] = {}

    def capture(layer_index):
        def hook(_module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            inputs[layer_index] = (hidden, kwargs["position_embeddings"])
        return hook

    use_grounding = targets is not None and bool(ground_layers)
    handles = [layers[i].register_forward_pre_hook(capture(i), with_kwargs=True) for i in ground_layers] if use_grounding else []
    try:
        out = model(inputs_embeds=embeds, attention_mask=mask, position_ids=positions, labels=labels)
    finally:
        for h in handles:
            h.remove()
    if out.loss is None:
        out.loss = out.logits.sum() * 0.0
    if not use_grounding:
        return LanguageResult(out, None, dropped)
    shifted = torch.where(queries >= 0, queries - (n_image - k), queries)
    kept_targets = torch.einsum("bqhp,bpk->bqhk", targets["ground_target"].float(), assign.float()) > 0
    loss = sum(grounding_loss(layers[i], *inputs[i], mask, shifted, first, kept_targets) for i in ground_layers)
    return LanguageResult(out, loss / len(ground_layers), dropped)


def grounding_loss(layer, hidden: torch.Tensor, position_embeddings, mask: torch.Tensor,
                   queries: torch.Tensor, first: int, targets: torch.Tensor) -> torch.Tensor:
    """Grounding loss of ``layer``, averaged over the (question, head) pairs that have targets.

    Heads 0, 1 and 3: ``-log`` of the attention mass the head puts, from each answer position,
    on the visual tokens of ``targets[:, :, h]``. Head 2 (when ``targets`` has a third row): the
    cross-entropy of its attention against the uniform distribution over ``<s>`` (position 0)
    and the tokens of ``targets[:, :, 2]``. ``targets`` may hold the first 1-4 rows: the heads
    beyond them stay free.

    A training-only objective that teaches the tiny decoder where to look: finding "the red
    circle" among ~10 objects is the step it does not discover on its own within a CPU budget.
    The logits are the layer's own (input norm, q/k projections, RoPE), for the ``Q`` answer rows only.
    """
    attn = layer.self_attn
    n_heads, d = targets.shape[2], attn.head_dim
    x = layer.input_layernorm(hidden)
    rows = queries.clamp(min=0)
    xq = torch.gather(x, 1, rows[..., None].expand(-1, -1, x.shape[-1]))
    q = attn.q_proj(xq).view(*rows.shape, -1, d)[:, :, :n_heads].transpose(1, 2)  # (B, h, Q, d)
    kv_heads = [h // attn.num_key_value_groups for h in range(n_heads)]
    k = attn.k_proj(x).view(*x.shape[:2], -1, d)[:, :, kv_heads].transpose(1, 2)  # (B, h, L, d)
    cos, sin = position_embeddings
    cos_q, sin_q = (torch.gather(t, 1, rows[..., None].expand(-1, -1, d)) for t in (cos, sin))
    q = rotate_like(layer, q, cos_q, sin_q)
    k = rotate_like(layer, k, cos, sin)
    logits = (q @ k.transpose(-1, -2)) * attn.scaling  # (B, h, Q, L)
    allowed = torch.gather(mask[:, 0], 1, rows[..., None].expand(-1, -1, mask.shape[-1]))  # (B, Q, L)
    logp = logits.masked_fill(~allowed[:, None], float("-inf")).log_softmax(-1)
    n_visual = targets.shape[-1]
    visual_logp = logp[..., first:first + n_visual]  # (B, h, Q, n)
    # A question left out of the loss (queries < 0: a random subset lost an object it is about) has
    # no target: its row 0 stand-in sees no visual token, and a target there would make logsumexp
    # of nothing but -inf, whose gradient is NaN even though the loss leaves the row out.
    on_target = targets.permute(0, 2, 1, 3) & (queries >= 0)[:, None, :, None]  # (B, h, Q, n)
    losses = -visual_logp.masked_fill(~on_target, float("-inf")).logsumexp(-1)  # (B, h, Q)
    if n_heads > 2:
        spread = on_target[:, 2]
        n = spread.sum(-1)
        losses[:, 2] = -(logp[:, 2, :, 0] + visual_logp[:, 2].masked_fill(~spread, 0.0).sum(-1)) / (n + 1)
    valid = on_target.any(-1)
    if not valid.any():
        return logits.sum() * 0.0
    return losses[valid].mean()


# ----------------------------------------------------------------------------- auxiliary objectives

def answer_words(tokenizer) -> dict[str, list[int]]:
    """Token ids of the colour, shape, character and quadrant words, in the generator's order."""
    def ids(words):
        return [tokenizer.convert_tokens_to_ids(w) for w in words]

    return {"color": ids(synthetic.COLOR_NAMES), "shape": ids(synthetic.SHAPES), "char": ids(synthetic.CHARACTERS),
            "quadrant": ids(synthetic.QUADRANTS)}


class AuxHeads(nn.Module):
    """Training-only auxiliary objectives (the heads are never shipped; the shipped model is a
    plain LLaVA).

    Per patch, on the projector output: colour / shape / character of the object under the
    patch, and the patch's row and column, as classes and (``position_regression``) as two numbers
    in [-1, 1]: the position of every patch is in its feature, not only in its RoPE position, so
    reduced and renumbered tokens still say where they are.
    Per image, on the CLS token of the feature layer: which colours, shapes, pairs and
    characters the scene contains (multi-label), so that CLS attention lands on the objects as a
    real CLIP's does (a tower without a CLS token, Qwen2.5-VL's: on the mean of the image's tokens).
    ``grid``: visual tokens per side (24, or Qwen's 12), for the row, column and quadrant targets.
    Word alignment (with ``words=``, the decoder's own final norm and ``lm_head``): each object
    patch, read as if it were a last-layer state, names its colour, shape, character and
    quadrant among the words of that kind (LLaVA stage-1 style feature alignment).
    """

    def __init__(self, hidden: int, vision_hidden: int, words: dict[str, list[int]] | None = None,
                 position_regression: bool = False, grid: int = synthetic.GRID):
        super().__init__()
        self.color = nn.Linear(hidden, len(synthetic.COLOR_NAMES) + 1)
        self.shape = nn.Linear(hidden, len(synthetic.SHAPES) + 1)
        self.char = nn.Linear(hidden, len(synthetic.CHARACTERS) + 1)
        self.scene = nn.Linear(vision_hidden, len(synthetic.SCENE_LABELS))
        self.row = nn.Linear(hidden, grid)
        self.column = nn.Linear(hidden, grid)
        self.words = words
        cells = torch.arange(grid * grid)
        self.register_buffer("row_id", cells // grid, persistent=False)
        self.register_buffer("column_id", cells % grid, persistent=False)
        self.xy = nn.Linear(hidden, 2) if position_regression else None
        centred = torch.stack([self.column_id, self.row_id], -1).float() / (grid - 1) * 2 - 1
        self.register_buffer("xy_target", centred, persistent=False)
        cell = synthetic.IMAGE_SIZE // grid
        centres = (torch.arange(grid) * cell + cell // 2) >= synthetic.IMAGE_SIZE / 2
        # QUADRANTS order: topleft, topright, bottomleft, bottomright
        self.register_buffer("quadrant", (2 * centres[:, None] + centres[None, :]).reshape(-1), persistent=False)

    def loss(self, feats: torch.Tensor, cls: torch.Tensor, labels: dict[str, torch.Tensor],
             model=None, frozen_decoder: bool = False) -> torch.Tensor:
        """Mean of the auxiliary terms. ``frozen_decoder``: word alignment reads through the
        decoder's norm and ``lm_head`` without training them (the vision-only phase)."""
        # Colour (with "none") on every patch; shape on object patches and the character on the
        # patch it is drawn in only: averaged over all 576 patches, the few informative ones
        # would be drowned by the background and the tower would not learn them.
        on_object = labels["color"] > 0
        on_char = labels["char"] > 0
        terms = [F.cross_entropy(self.color(feats).flatten(0, 1), labels["color"].flatten())]
        if on_object.any():
            terms.append(F.cross_entropy(self.shape(feats)[on_object], labels["shape"][on_object]))
        if on_char.any():
            terms.append(F.cross_entropy(self.char(feats)[on_char], labels["char"][on_char]))
        terms.append(F.binary_cross_entropy_with_logits(self.scene(cls), labels["scene"]))
        for head, target in ((self.row, self.row_id), (self.column, self.column_id)):
            terms.append(F.cross_entropy(head(feats).flatten(0, 1), target.repeat(feats.shape[0])))
        if self.xy is not None:
            terms.append(F.mse_loss(self.xy(feats), self.xy_target.expand(feats.shape[0], -1, -1)))
        if self.words is not None and model is not None:
            norm, head = model.model.language_model.norm, model.lm_head
            if frozen_decoder:
                normed = F.rms_norm(feats, norm.weight.shape, norm.weight.detach(), norm.variance_epsilon)
                vocab_logits = F.linear(normed, head.weight.detach())
            else:
                vocab_logits = head(norm(feats))
            targets = {"color": labels["color"] - 1, "shape": labels["shape"] - 1, "char": labels["char"] - 1,
                       "quadrant": self.quadrant.expand_as(labels["color"])}
            for name, target in targets.items():
                ids = torch.tensor(self.words[name], device=feats.device)
                keep = on_object & (target >= 0)
                if keep.any():
                    terms.append(F.cross_entropy(vocab_logits[keep][:, ids], target[keep]))
        return sum(terms) / len(terms)
