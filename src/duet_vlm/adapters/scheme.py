"""A family's language side as one object: each decoder layer's kind, and the mask and RoPE it gets.

transformers builds a language model's masks from one table (``masking_utils``: a layer type ->
its mask function). duet-vlm runs the same layers on shorter sequences (a segment between two
boundaries, or a decoding step over a segment's shorter cache), so it must build the same masks
for them. A ``LayerScheme`` answers the four questions the runtime asks, for every kind of layer
the language model has:

1. **At the entry** (``enter``, ``entry_masks``): which masks the entry segment's layers get once
   slots were dropped before the language model.
2. **After a boundary** (``segment_masks``): the masks of the next segment's (shorter) sequence.
3. **At a decoding entry** (``step_mask``, ``step_masks``): a decoding step's masks at the entry
   segment, over its (shorter) cache.
4. **For a decoding segment** (``segment_step_mask``): a later segment's mask in a decoding step,
   sized against that segment's cache (built at the segment's first layer of each kind: ``maps``).

Besides, for a whole sequence (``sequence_masks``), the masks the language model builds before its
first layer: what an unpatched run of layers on a shorter sequence receives (the benchmarks' ideal,
``bench.ideal.IdealModel``, and ``duet-vlm check``'s replay).

One scheme per mask source: ``CausalLayers`` for a language model that builds its masks from the
2-D mask it receives (LLaVA, Qwen-VL, InternVL, and Qwen3.5, whose linear-attention layers get the
2-D padding mask itself), and a family's own subclass of ``FamilyMasks`` where its base model builds
the masks before calling the language model (Gemma: image blocks that attend both ways, sliding
windows). Each layer kind has one mask maker (``MASK_MAKERS``), so a new kind of layer is a new
entry there, not a branch in the runtime.
"""

from __future__ import annotations

import sys
from typing import Callable

import torch
from torch import nn
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, causal_mask_function

#: layer kinds that compute softmax attention: they can score, and their cache holds tokens.
SCORING_KINDS = ("attention", "sliding_attention")


def gather_mask(mask, q_index: torch.Tensor | None, kv_index: torch.Tensor):
    """Select query rows and key columns of a 2-D (flash) or 4-D (sdpa/eager) mask; ``None`` stays."""
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"duet-vlm cannot reduce tokens under a {type(mask).__name__} mask (use sdpa, eager or FA2)")
    if mask.dim() == 2:
        return mask.gather(1, kv_index)
    if mask.dim() != 4:
        raise ValueError(f"unexpected attention mask of shape {tuple(mask.shape)}")
    batch = kv_index.shape[0]
    mask = mask.expand(batch, -1, -1, -1)
    if q_index is not None:
        mask = mask.gather(2, q_index[:, None, :, None].expand(-1, mask.shape[1], -1, mask.shape[3]))
    return mask.gather(3, kv_index[:, None, None, :].expand(-1, mask.shape[1], mask.shape[2], -1))


def causal_mask(text_config, hidden: torch.Tensor, key_valid: torch.Tensor, query_length: int, skip: bool = False,
                q_offset=None):
    """The causal mask transformers would build for the model's attention backend, over
    ``key_valid`` keys of which the last ``query_length`` are the queries (a segment's own sequence in
    a prefill, the new tokens in a decoding step). ``skip``: ``None`` where the backend's causal path
    serves (no key padded), as transformers skips building it before a model's first layer.
    ``q_offset``: where the queries start among the keys, where the keys run on past them (a static
    cache's buffer, its slots not yet written)."""
    builder = ALL_MASK_ATTENTION_FUNCTIONS[text_config._attn_implementation]
    kv_length = key_valid.shape[1]
    return builder(
        batch_size=key_valid.shape[0],
        q_length=query_length,
        kv_length=kv_length,
        q_offset=kv_length - query_length if q_offset is None else q_offset,
        kv_offset=0,
        mask_function=causal_mask_function,
        attention_mask=key_valid,
        allow_is_causal_skip=skip,
        dtype=hidden.dtype,
        device=hidden.device,
    )


def last_row(mask) -> torch.Tensor | None:
    """The 2-D mask ``(B, L)`` a prefill's causal mask ``(B, 1, L, keys)`` was built from: its last
    query row over the first ``L`` keys, which that query sees unless they are padding (the prefill
    starts the cache). A 2-D mask is its own; ``None`` (no key padded) stays."""
    if not isinstance(mask, torch.Tensor) or mask.dim() != 4:
        return mask if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None
    row = mask[:, 0, -1, : mask.shape[-2]]
    return (row if row.dtype == torch.bool else row == 0).long()


def rotate_like(layer: nn.Module, states: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``(B, H, L, d)`` states with the RoPE function of ``layer``'s own modeling module,
    as ``layer.self_attn`` does (``cos``/``sin``: ``(B, L, d)``)."""
    module = sys.modules[type(layer.self_attn).__module__]
    # The function rotates a query and a key tensor alike, element by element: the states as the
    # query, and one head of them as the key (what it returns for that is discarded).
    rotated, _ = module.apply_rotary_pos_emb(states, states[:, :1], cos, sin)
    return rotated


def rope_of(rope: dict, kind: str):
    """The ``(cos, sin)`` layers of ``kind`` get from ``{kind: (cos, sin)}`` (``LayerScheme.rope``):
    their kind's own, else the attention layers' (a kind that rotates as they do, or does not rotate:
    linear attention), else any kept one; ``None`` where there is none."""
    found = rope.get(kind)
    if found is None:
        found = rope.get("attention", next(iter(rope.values()), None))
    return found


def kinds_of(types, kind_of: dict, family: str) -> tuple[str, ...]:
    """Each decoder layer's kind from its type as the model names it (``text_config.layer_types``);
    a type ``kind_of`` does not know is refused at attach."""
    unknown = sorted(set(types) - set(kind_of))
    if unknown:
        raise TypeError(f"duet-vlm's {family} adapter does not know decoder layers of type {unknown}")
    return tuple(kind_of[t] for t in types)


class CausalMask:
    """Softmax attention under the causal mask the language model builds from its 2-D mask: a
    segment's is the entry's rows and columns where no row is padded, else built anew; a decoding
    step's is mapped onto each segment's cache at the segment's first layer of the kind."""

    maps = True

    def sequence(self, text_config, hidden: torch.Tensor, valid: torch.Tensor):
        return causal_mask(text_config, hidden, valid, query_length=hidden.shape[1], skip=True)

    def segment(self, text_config, hidden: torch.Tensor, valid: torch.Tensor, entry, index):
        if index is not None:
            return gather_mask(entry, index, index)
        return causal_mask(text_config, hidden, valid, query_length=hidden.shape[1])

    def step(self, text_config, hidden: torch.Tensor, mask, kv_index, keys: Callable[[], torch.Tensor], cache=None,
             layer_index: int | None = None):
        if kv_index is not None:  # no row padded: the step's mask at the segment's cache slots
            return None if mask is None else gather_mask(mask, None, kv_index(mask))
        # a static cache's keys run to the end of its buffer: the queries start at the layer's count
        offset = cache.get_seq_length(layer_index) if getattr(cache, "is_compileable", False) else None
        return causal_mask(text_config, hidden, keys(), query_length=hidden.shape[1], q_offset=offset)


class PaddingMask:
    """A recurrence (linear attention, Qwen3.5's Gated DeltaNet): the segment's 2-D padding mask
    (padded states are zeroed before the recurrence; ``None``: no padding). Its state already holds
    the prompt's kept tokens and new tokens are never dropped, so a decoding step keeps the model's
    own mask: never mapped."""

    maps = False

    def sequence(self, text_config, hidden: torch.Tensor, valid: torch.Tensor):
        return None if bool(valid.all()) else valid.long()

    def segment(self, text_config, hidden: torch.Tensor, valid: torch.Tensor, entry, index):
        return self.sequence(text_config, hidden, valid)


#: each layer kind of a language model that builds its masks from a 2-D mask -> its mask maker.
MASK_MAKERS = {"attention": CausalMask(), "linear_attention": PaddingMask()}


class LayerScheme:
    """The language side of a family: every decoder layer's kind, each kind's mask and RoPE, and the
    per-token arguments its layers take besides the hidden states.

    Args:
        text_config: the language model's config (its attention backend builds the masks).
        rotary_emb: the language model's rotary module.
        kinds: each decoder layer's kind: ``"attention"`` (softmax attention: it can score, and its KV
            cache holds one entry per token), ``"sliding_attention"`` (the same within a window), or
            ``"linear_attention"`` (a recurrence with a fixed-size state: no scores, a cache that does
            not shrink with the tokens).
    """

    #: keyword arguments of the language model, besides ``inputs_embeds``, that hold one entry per
    #: token along their second axis (Gemma 4's ``per_layer_inputs``): cut to the entry sequence.
    token_arguments: tuple[str, ...] = ()
    #: ``(name, position)`` of a decoder layer's argument that holds one entry per token (Gemma 4's
    #: ``per_layer_input``, a slice of ``per_layer_inputs``): the model passes it at the entry
    #: sequence's length, and the runtime cuts it to each later segment's tokens; ``None``: none.
    layer_token_argument: tuple[str, int] | None = None
    #: the first decoder layer to which the model may pass only the last ``logits_to_keep`` queries
    #: of the prefill (Gemma 4's KV-shared layers read every key from an earlier layer, so the model
    #: cuts their queries); ``None``: every layer gets the whole sequence.
    queries_cut_from: int | None = None

    def __init__(self, text_config, rotary_emb: nn.Module, kinds: tuple[str, ...]):
        self.text_config = text_config
        self.rotary_emb = rotary_emb
        self.kinds = tuple(kinds)
        #: a decoder layer that attends another layer's keys and values -> that layer (Gemma 4's
        #: KV sharing): its attention sees the other layer's cache (a static one's buffer)
        self.kv_sources: dict[int, int] = {}
        #: the first layer of each kind: where the model's own mask and RoPE for that kind are kept.
        self.first_of_kind = {kind: self.kinds.index(kind) for kind in dict.fromkeys(self.kinds)}

    def attention_layers(self) -> tuple[int, ...] | None:
        """The layers that compute softmax attention (and so can score) when the language model mixes
        in layers that do not (``None``: all), for ``Geometry.attention_layers``."""
        scoring = tuple(i for i, kind in enumerate(self.kinds) if kind in SCORING_KINDS)
        return None if len(scoring) == len(self.kinds) else scoring

    def maps(self, kind: str) -> bool:
        """Whether a decoding step maps the mask of layers of ``kind`` onto a later segment's cache."""
        return MASK_MAKERS[kind].maps

    def heads(self, start: int, end: int) -> dict[str, int]:
        """``{kind: layer}``: the first layer of each mapped kind (``maps``) among layers ``start`` to
        ``end - 1``, where a decoding step's mask for that kind is sized against (or mapped onto) that
        run of layers' cache."""
        heads: dict[str, int] = {}
        for layer in range(start, end):
            if self.maps(self.kinds[layer]):
                heads.setdefault(self.kinds[layer], layer)
        return heads

    def rope(self, hidden: torch.Tensor, positions: torch.Tensor) -> dict:
        """``{kind: (cos, sin)}`` for ``positions`` (the rotary's input): one RoPE for every layer
        here; a scheme whose layer kinds rotate differently returns each kind's."""
        return {"attention": self.rotary_emb(hidden, positions)}

    def token_types(self, input_ids: torch.Tensor, kwargs: dict, items: list) -> torch.Tensor | None:
        """``(B, L)`` what the masks read besides padding (Gemma's ``token_type_ids``), from a
        prefill's base-model ``kwargs``, checked against its ``items``; ``None``: nothing."""
        return None

    def layer_call_kwargs(self) -> dict:
        """Keyword arguments a decoder layer needs when a stage runs it outside the model's forward
        besides its mask, positions and RoPE (Gemma 4: a store for the keys and values it shares)."""
        return {}

    def layer_token_inputs(self, language_model: nn.Module, hidden: torch.Tensor, input_ids: torch.Tensor,
                           visual: torch.Tensor):
        """``(B, L, layers, d)`` the per-token input of every decoder layer (``layer_token_argument``)
        of a sequence of ``input_ids`` (``visual``: True on its placeholders) whose input states are
        ``hidden``, as the model makes it; ``None``: its layers take none."""
        return None

    # ----------------------------------------------------------------- a whole sequence
    def sequence_masks(self, hidden: torch.Tensor, valid: torch.Tensor, types) -> dict:
        """``{kind: mask}`` of a sequence of ``hidden`` states whose tokens are ``valid``, as the
        language model builds them before its first layer (``None`` where the attention backend's
        causal path serves): what an unpatched run of layers on that sequence receives (the ideal's)."""
        return {kind: MASK_MAKERS[kind].sequence(self.text_config, hidden, valid) for kind in self.first_of_kind}

    # ----------------------------------------------------------------- 1. at the entry
    def enter(self, kwargs: dict, user_mask):
        """Before the entry is compacted: put the 2-D mask to compact in ``kwargs`` and return what
        the model built instead (``None``: nothing; it builds its masks from the 2-D mask)."""
        return None

    def entry_masks(self, built, kwargs: dict, identity: bool, valid: torch.Tensor, types) -> None:
        """After the entry is compacted: the masks the entry segment's layers get, put in ``kwargs``
        (``built``: what ``enter`` returned; ``identity``: nothing was dropped at the entry)."""

    # ----------------------------------------------------------------- 2. after a boundary
    def segment_masks(self, hidden: torch.Tensor, valid: torch.Tensor, types, entry: dict,
                      index: torch.Tensor | None) -> dict:
        """``{kind: mask}`` of a segment's sequence of ``hidden`` states whose tokens are ``valid``.
        ``entry``: the entry segment's masks by kind; ``index``: the segment's slots in the entry
        sequence where no row of either is padded (their masks' rows and columns), else ``None``."""
        return {kind: MASK_MAKERS[kind].segment(self.text_config, hidden, valid, entry.get(kind), index)
                for kind in self.first_of_kind}

    # ----------------------------------------------------------------- 3. at a decoding entry
    def step_mask(self, kwargs: dict, user_mask, length: int):
        """The 2-D mask of a decoding step that the runtime maps onto the entry sequence (``length``:
        the unreduced sequence's, new tokens included)."""
        return kwargs.get("attention_mask")

    def step_masks(self, built, mask, hidden: torch.Tensor, cache, identity: bool, first_boundary: int):
        """What the language model receives as a decoding step's masks once ``mask`` (``step_mask``'s)
        is mapped onto the entry sequence (``built``: what the model built, as ``enter`` took it)."""
        return mask

    def flat_mask(self, built) -> torch.Tensor | None:
        """The 2-D mask a prefill's masks were built from (``generate`` builds them for a static cache:
        4-D, or one per layer type where the config names its layers' types), for the runtime to map;
        ``None``: no key padded."""
        if isinstance(built, dict):
            built = built.get("full_attention")
        return last_row(built)

    # ----------------------------------------------------------------- 4. for a decoding segment
    def segment_step_mask(self, kind: str, layer_index: int, hidden: torch.Tensor, mask, cache,
                          kv_index: Callable[[torch.Tensor], torch.Tensor] | None, keys: Callable[[], torch.Tensor]):
        """A later segment's mask for layers of ``kind`` in a decoding step (``layer_index``: its first
        such layer): ``mask`` (the step's, at the entry) cut to the segment's cache slots
        (``kv_index(mask)``; ``None`` where rows are padded), or built over its valid keys (``keys()``)."""
        return MASK_MAKERS[kind].step(self.text_config, hidden, mask, kv_index, keys, cache, layer_index)

    # ----------------------------------------------------------------- scores from a decoder layer
    # The language side is Llama-like for every supported family: pre-norm decoder layers with
    # ``input_layernorm`` and ``self_attn.{q_proj,k_proj}`` (optionally ``q_norm``/``k_norm``) and
    # rotate-half RoPE.
    def rotate(self, layer: nn.Module, states: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Apply the model's own RoPE function (from its modeling module) to ``(B, H, L, d)`` states.

        The callers below hand it contiguous states: the RoPE functions slice, concatenate and
        multiply element by element, the same values in any memory layout, and on the transposed
        view a projection leaves, ``(B, L, H, d)`` read as ``(B, H, L, d)``, they ran 4x slower on
        this machine's CPU (2.3 ms against 0.6 ms for 575 keys of width 1024, the copy included)."""
        return rotate_like(layer, states, cos, sin)

    def layer_keys(
        self,
        layer: nn.Module,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        valid: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``(B, L, H_kv * d)`` the keys ``layer`` computes from its input ``hidden_states``: input
        norm, ``k_proj``, per-head ``k_norm`` where the layer has one, RoPE; heads concatenated (no
        grouped-query repetition), in the model's dtype, without gradient.

        With ``valid`` (``(B, L)``, False on padding) the rotation counts from each row's first valid
        token, as the row alone numbers its positions, so that a quantity of single keys (a norm) is
        the same in a left-padded batch, whose rows the model may number from the padding: each
        token's angle minus that token's (RoPE composes: R(a - b) = R(a) R(b)^-1)."""
        attn = layer.self_attn
        batch, length = hidden_states.shape[:2]
        cos, sin = (t.expand(batch, -1, -1) for t in position_embeddings)
        if valid is not None:
            first = valid.long().argmax(dim=-1)
            rows = torch.arange(batch, device=first.device)
            c0, s0 = cos[rows, first][:, None], sin[rows, first][:, None]
            scale = (c0.square() + s0.square()).sqrt()  # RoPE's attention scaling, applied once
            c0, s0 = c0 / scale, s0 / scale
            cos, sin = cos * c0 + sin * s0, sin * c0 - cos * s0
        with torch.no_grad():
            keys = attn.k_proj(layer.input_layernorm(hidden_states.detach())).view(batch, length, -1, attn.head_dim)
            k_norm = getattr(attn, "k_norm", None)
            if k_norm is not None:
                keys = k_norm(keys)
            keys = self.rotate(layer, keys.transpose(1, 2).contiguous(), cos, sin)
        return keys.transpose(1, 2).reshape(batch, length, -1)

    def cached_layer_keys(self, layer: nn.Module, layer_index: int, cache, hidden: torch.Tensor) -> torch.Tensor | None:
        """``(1, H_kv, L, d)`` the keys decoder layer ``layer_index`` wrote to ``cache`` in its forward
        on ``hidden`` (``(1, L, D)``): its input norm, ``k_proj``, ``k_norm`` and RoPE, the computation
        ``text_to_visual_attention`` does for one row, on the same tensor. ``None`` where the cache
        holds anything else (other rows or lengths: a batch, an earlier turn's tokens, a window, a
        quantized or preallocated layer, another device or dtype)."""
        attn = getattr(layer, "self_attn", None)
        layers = getattr(cache, "layers", None)
        if attn is None or layers is None or hidden.shape[0] != 1:
            return None
        index = getattr(attn, "layer_idx", layer_index)
        keys = getattr(layers[index], "keys", None) if 0 <= index < len(layers) else None
        if not isinstance(keys, torch.Tensor) or keys.dim() != 4:
            return None
        if (keys.shape[0], keys.shape[2], keys.shape[3]) != (1, hidden.shape[1], attn.head_dim):
            return None
        if keys.dtype != hidden.dtype or keys.device != hidden.device:
            return None
        return keys

    def layer_queries(self, attn: nn.Module, normed: torch.Tensor) -> torch.Tensor:
        """``(B, L, H, d)`` the queries ``attn`` projects from normed states ``(B, L, D)``, before any
        per-head norm and RoPE."""
        return attn.q_proj(normed).view(*normed.shape[:2], -1, attn.head_dim)

    def text_to_visual_attention(
        self,
        layer: nn.Module,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        queries: list[torch.Tensor],
        key_valid: torch.Tensor,
        visual_index: torch.Tensor,
        layer_keys: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Attention from each row's query tokens to its visual tokens, as ``layer`` would compute it.

        Only the ``|queries| x L`` block is formed: the layer's input norm, q/k projections (and
        per-head q/k norms where the layer has them) and RoPE on the (detached) hidden states, a
        full-row softmax in float32 over all causally visible, non-pad keys (within the layer's
        sliding window, counted in tokens of this sequence, where it has one; soft-capped logits
        where it caps them), then the mean over heads and over queries.

        Args:
            hidden_states: ``(B, L, D)`` input of ``layer``.
            position_embeddings: ``(cos, sin)`` for those ``L`` positions.
            queries: per row, a 1-D tensor of query positions.
            key_valid: ``(B, L)`` bool, False on padding.
            visual_index: ``(B, n_items, n)`` positions of the visual tokens.
            layer_keys: ``(1, H_kv, L, d)``, with one row: the keys ``layer``'s own forward computed
                on ``hidden_states`` and wrote to the cache (``cached_layer_keys``), the very
                computation this would repeat; ``None``: computed here.

        Returns:
            ``(B, n_items, n)`` float32 scores.
        """
        attn = layer.self_attn
        head_dim = attn.head_dim
        groups = attn.num_key_value_groups
        q_norm, k_norm = getattr(attn, "q_norm", None), getattr(attn, "k_norm", None)
        window, cap = getattr(attn, "sliding_window", None), getattr(attn, "attn_logit_softcapping", None)
        cos, sin = position_embeddings
        batch = hidden_states.shape[0]
        if layer_keys is not None and batch != 1:
            raise ValueError(f"layer_keys are one row's keys; these hidden states have {batch} rows")
        cos, sin = cos.expand(batch, -1, -1), sin.expand(batch, -1, -1)
        scores = []
        with torch.no_grad():
            for row in range(batch):
                x = layer.input_layernorm(hidden_states[row : row + 1].detach())
                q_pos = queries[row]
                query = self.layer_queries(attn, x[:, q_pos])
                if q_norm is not None:
                    query = q_norm(query)
                keys = layer_keys
                if keys is None:
                    keys = attn.k_proj(x).view(1, x.shape[1], -1, head_dim)
                    if k_norm is not None:
                        keys = k_norm(keys)
                    keys = self.rotate(layer, keys.transpose(1, 2).contiguous(), cos[row : row + 1], sin[row : row + 1])
                query = self.rotate(layer, query.transpose(1, 2).contiguous(), cos[row : row + 1, q_pos], sin[row : row + 1, q_pos])
                scores.append(visual_attention(query, keys, q_pos, key_valid[row], visual_index[row], attn.scaling, groups,
                                               window, cap))
        return torch.stack(scores)


def visual_attention(query: torch.Tensor, keys: torch.Tensor, q_pos: torch.Tensor, key_valid: torch.Tensor,
                     visual_index: torch.Tensor, scaling: float, groups: int = 1, window: int | None = None,
                     cap: float | None = None) -> torch.Tensor:
    """``(n_items, n)`` attention from one row's query tokens to its visual tokens: the arithmetic of
    ``LayerScheme.text_to_visual_attention``, shared with the engines that hand over the queries and
    keys their layer computed (vLLM's language stages).

    A full-row softmax in float32 of ``query`` ``(1, H, q, d)`` over ``keys`` ``(1, H_kv, L, d)``
    (both rotated; ``groups`` query heads per key head) at the causally visible, ``key_valid`` keys
    (within the last ``window`` tokens where the layer slides; logits soft-capped at ``cap`` where
    it caps them), the mean over heads and over the queries, read at ``visual_index``
    ``(n_items, n)``.

    >>> q, k = torch.zeros(1, 2, 1, 4), torch.zeros(1, 2, 4, 4)  # uniform over the 4 keys
    >>> visual_attention(q, k, torch.tensor([3]), torch.ones(4, dtype=torch.bool), torch.tensor([[1, 2]]), 0.5).tolist()
    [[0.25, 0.25]]
    """
    if groups > 1:
        keys = keys.repeat_interleave(groups, dim=1)
    logits = (query.float() @ keys.float().transpose(-1, -2)) * scaling  # (1, H, q, L)
    if cap is not None:  # Gemma-2-style logit soft-capping, as the layer applies it
        logits = torch.tanh(logits / cap) * cap
    key_pos = torch.arange(keys.shape[2], device=keys.device)
    allowed = (key_pos[None, :] <= q_pos[:, None]) & key_valid[None, :]
    if window is not None:  # a sliding layer sees the last ``window`` tokens of the sequence
        allowed &= key_pos[None, :] > q_pos[:, None] - window
    logits = logits.masked_fill(~allowed, torch.finfo(logits.dtype).min)
    probs = logits.softmax(dim=-1).mean(dim=1)[0]  # (q, L)
    per_token = probs[:, visual_index.reshape(-1)].mean(dim=0)
    return per_token.view(visual_index.shape)


class CausalLayers(LayerScheme):
    """A language model that builds its causal masks (and any padding mask) from the 2-D mask it
    receives: every family but Gemma."""


class FamilyMasks(LayerScheme):
    """A family whose base model builds the language model's masks itself (one per layer type) before
    calling it: the runtime builds them the same way over the shorter sequences (``build``).

    Args:
        types: each decoder layer's type as the model names it (``text_config.layer_types``).
        kind_of: a layer type -> its kind.
    """

    def __init__(self, text_config, rotary_emb: nn.Module, types: tuple[str, ...], kind_of: dict, family: str):
        super().__init__(text_config, rotary_emb, kinds_of(types, kind_of, family))
        self.types, self.kind_of = tuple(types), dict(kind_of)

    def maps(self, kind: str) -> bool:
        return True

    def build(self, hidden: torch.Tensor, key_valid: torch.Tensor, types: torch.Tensor | None,
              cache=None, layers: dict | None = None) -> dict:
        """``{kind: mask}`` for a sequence of ``hidden`` states whose keys are ``key_valid`` (``(B, kv)``,
        False on padding), built as the model builds them. With ``cache``, sized against its layer
        ``layers[kind]`` (a decoding step)."""
        raise NotImplementedError

    def by_layer_type(self, masks: dict) -> dict:
        """``build``'s masks keyed as the language model looks them up (its layer types)."""
        return {t: masks.get(self.kind_of[t]) for t in dict.fromkeys(self.types)}

    def enter(self, kwargs: dict, user_mask):
        built = kwargs.get("attention_mask")
        if not isinstance(built, dict):
            return None
        kwargs["attention_mask"] = user_mask  # the entry compacts the base model's 2-D mask
        return built

    def entry_masks(self, built, kwargs: dict, identity: bool, valid: torch.Tensor, types) -> None:
        if built is not None:
            kwargs["attention_mask"] = built if identity else self.by_layer_type(
                self.build(kwargs["inputs_embeds"], valid, types)
            )

    def segment_masks(self, hidden, valid, types, entry, index) -> dict:
        return self.build(hidden, valid, types)

    def sequence_masks(self, hidden, valid, types) -> dict:
        return self.build(hidden, valid, types)

    def step_mask(self, kwargs: dict, user_mask, length: int):
        # The caller's 2-D mask; ``None`` where it gave none, every key valid (``continue_prompt``
        # makes one where alignment pads need it), so that the masks are built from no mask, as the
        # model builds them, with no check of the mask's values on the host.
        return user_mask

    def flat_mask(self, built) -> torch.Tensor | None:
        if not isinstance(built, dict):
            return last_row(built)
        # a full-attention layer's mask (a sliding one's last row sees only its window), else a
        # recurrence's 2-D padding mask
        full = [built[t] for t in built if self.kind_of.get(t) == "attention"]
        if full:
            return last_row(full[0])
        flat = [m for m in built.values() if isinstance(m, torch.Tensor) and m.dim() == 2]
        return flat[0] if flat else None

    def step_masks(self, built, mask, hidden, cache, identity: bool, first_boundary: int):
        if identity:
            return built  # the entry segment's masks are the model's own
        # The entry segment's first layer of each kind: where each mask is sized against the cache.
        valid = None if mask is None else mask.bool()
        return self.by_layer_type(self.build(hidden, valid, None, cache, self.heads(0, first_boundary)))

    def segment_step_mask(self, kind, layer_index, hidden, mask, cache, kv_index, keys):
        return self.build(hidden, keys(), None, cache, {kind: layer_index})[kind]
