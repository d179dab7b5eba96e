"""A vLLM language model's decoder layers as duet-vlm's hooks use them (``DecoderScheme``), one scheme
per kind of layer, matched on the language model's config (``scheme_for``) as the Hugging Face
path's ``adapters.scheme.LayerScheme`` is per family.

A scheme answers what the hooks ask of a layer, so that no hook probes a layer's modules:

- what a decoder layer takes (``arguments``: its positions, hidden states and residual stream, by
  the names its forward has; a per-layer input, ``per_layer_input``) and returns (vLLM's
  ``(hidden_states, residual)``, the residual stream handed apart: ``stream``);
- which layers score (``attention``: a layer's softmax attention; a linear-attention layer has
  none), slide (``window``), and share an earlier layer's keys and values (``shares_kv``);
- how a scoring layer computes its rotated queries and keys from its input (``queries_and_keys``,
  each kind's own: ``PlainLayers``, ``NormedLayers``, ``GatedLayers``);

A scheme checks at construction that the layers are the kind it says (``check``), so a model whose
layers compute their queries differently is refused by name, not scored wrongly.
"""

from __future__ import annotations

import torch

from .checks import StageNotServed


def missing(module, *names: str) -> list[str]:
    """Of ``names``, those ``module`` has no module or value for: what a scheme's ``check`` reads of a
    layer, in one place."""
    return [name for name in names if getattr(module, name, None) is None]


class DecoderScheme:
    """A vLLM language model's decoder layers (``text_model.layers``, its final ``norm``), whose
    attention projects queries, keys and values with one ``qkv_proj`` and rotates them with
    ``rotary_emb``; a kind of layer that computes them otherwise is a subclass."""

    #: the names a layer's forward takes its positions, hidden states and residual stream by (a
    #: decoder's loop may pass them in order, most families, or by keyword, Qwen3.5's)
    arguments = ("positions", "hidden_states", "residual")
    #: the name a layer takes an input of its own by (Gemma 4's ``per_layer_input``), ``None``: none
    per_layer_input: str | None = None

    def __init__(self, text_model, model_type: str = "") -> None:
        self.layers = list(text_model.layers)
        self.norm = text_model.norm
        self.model_type = model_type
        self.check()

    def __len__(self) -> int:
        return len(self.layers)

    # which layers score, slide, share KV
    def attention(self, index: int):
        """Layer ``index``'s softmax attention (vLLM's ``Attention``, ``self_attn.attn``): its scores
        can be read and its cache holds tokens; ``None`` where the layer has none."""
        return getattr(getattr(self.layers[index], "self_attn", None), "attn", None)

    def window(self, index: int) -> int | None:
        """Layer ``index``'s sliding window (``None``: it attends to every token it holds)."""
        return self.attention(index).sliding_window

    def shares_kv(self) -> dict[int, str]:
        """Layers that read an earlier layer's keys and values (vLLM's
        ``kv_sharing_target_layer_name``): layer -> the layer it reads."""
        return {index: attention.kv_sharing_target_layer_name for index in range(len(self))
                if (attention := self.attention(index)) is not None and attention.kv_sharing_target_layer_name}

    def layer_name(self, index: int) -> str:
        """Layer ``index``'s attention as vLLM's per-layer metadata and slots name it."""
        return self.attention(index).layer_name

    # how a scoring layer computes what a stage scores with
    def queries_and_keys(self, index: int, positions: torch.Tensor, hidden: torch.Tensor,
                         residual: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer ``index``'s rotated queries and keys ``(rows, heads * d)`` of its input, by its own
        modules, on copies: vLLM's fused norms may write into their inputs."""
        layer = self.layers[index]
        attn = layer.self_attn
        with torch.no_grad():
            x = self.normed_input(layer, hidden, residual)
            qkv, _ = attn.qkv_proj(x)
            q, k = self.project(attn, qkv, positions)
        return q, k

    @staticmethod
    def normed_input(layer, hidden: torch.Tensor, residual: torch.Tensor | None) -> torch.Tensor:
        if residual is None:
            return layer.input_layernorm(hidden.clone())
        return layer.input_layernorm(hidden.clone(), residual.clone())[0]

    def project(self, attn, qkv: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        q, k, _ = qkv.split([attn.q_size, attn.kv_size, attn.kv_size], dim=-1)
        return attn.rotary_emb(positions, q, k)

    def check(self) -> None:
        """Refuse layers of another kind than the scheme's."""
        for index in range(len(self)):
            attention = self.attention(index)
            if attention is None:
                raise StageNotServed(self.unknown(index, "has no softmax attention (self_attn.attn)"))
            attn = self.layers[index].self_attn
            if absent := missing(attn, "qkv_proj", "rotary_emb"):
                raise StageNotServed(self.unknown(index, f"has no {absent[0]}"))
            if not missing(attn, "q_norm"):
                raise StageNotServed(self.unknown(index, "norms its queries and keys per head (q_norm)"))

    def unknown(self, index: int, what: str) -> str:
        return (f"decoder layer {index} of this {self.model_type or 'language'} model {what}, which duet-vlm's "
                f"{type(self).__name__} does not compute; its vLLM language model is not one the plugin drops in")


class PlainLayers(DecoderScheme):
    """Llama-like layers (LLaVA's, Qwen2's): ``qkv_proj``, then the rotation."""


class NormedLayers(DecoderScheme):
    """Layers that norm each head's queries and keys before rotating them (Qwen3's, Gemma 3's, whose
    layers slide or attend globally by the config's ``layer_types``)."""

    def project(self, attn, qkv, positions):
        q, k, _ = qkv.split([attn.q_size, attn.kv_size, attn.kv_size], dim=-1)
        q = attn.q_norm(q.reshape(*q.shape[:-1], -1, attn.head_dim)).reshape(q.shape)
        k = attn.k_norm(k.reshape(*k.shape[:-1], -1, attn.head_dim)).reshape(k.shape)
        return attn.rotary_emb(positions, q, k)

    def check(self) -> None:
        for index in range(len(self)):
            layer = self.layers[index]
            if missing(layer, "self_attn") or missing(layer.self_attn, "q_norm", "k_norm"):
                raise StageNotServed(self.unknown(index, "has no per-head norms (q_norm, k_norm)"))


class GatedLayers(DecoderScheme):
    """Qwen3.5's hybrid layers: Gated-DeltaNet layers (``linear_attn``, which do not score and whose
    state is one per request) between attention layers with a query and an output gate per head
    (``_project_qkv_gate``: normed, rotated)."""

    def layer_name(self, index: int) -> str:
        attention = self.attention(index)
        return attention.layer_name if attention is not None else self.layers[index].linear_attn.prefix

    def project(self, attn, qkv, positions):
        q, k, _, _ = attn._project_qkv_gate(qkv, positions)
        return q, k

    def check(self) -> None:
        for index in range(len(self)):
            layer = self.layers[index]
            if self.attention(index) is None:
                if missing(layer, "linear_attn"):
                    raise StageNotServed(self.unknown(index, "has neither softmax nor linear attention"))
            elif missing(layer.self_attn, "_project_qkv_gate"):
                raise StageNotServed(self.unknown(index, "has no gated query projection (_project_qkv_gate)"))


class PerLayerInputLayers(NormedLayers):
    """Gemma 4's layers: each takes an input of its own per token (``per_layer_input``, read for the
    rows held after a boundary), and the last ones read an earlier layer's keys and values
    (``shares_kv``: only a query projection, ``q_proj``; every boundary lies at or before the layer
    they read, so they never score and hold what it holds)."""

    per_layer_input = "per_layer_input"

    def check(self) -> None:
        shared = self.shares_kv()
        for index in range(len(self)):
            layer = self.layers[index]
            if missing(layer, "self_attn") or missing(layer.self_attn, "q_norm"):
                raise StageNotServed(self.unknown(index, "has no per-head query norm (q_norm)"))
            if absent := missing(layer.self_attn, *(("q_proj",) if index in shared else ("qkv_proj", "k_norm"))):
                raise StageNotServed(self.unknown(index, f"has no {absent[0]}"))


#: the language model's ``model_type`` -> its layers' scheme (``PlainLayers`` for any other).
SCHEMES: dict[str, type[DecoderScheme]] = {
    "qwen3": NormedLayers, "qwen3_moe": NormedLayers, "qwen3_vl_text": NormedLayers, "qwen3_vl_moe_text": NormedLayers,
    "gemma3_text": NormedLayers,
    "qwen3_5_text": GatedLayers, "qwen3_5_moe_text": GatedLayers,
    "gemma4_text": PerLayerInputLayers,
}


def scheme_for(text_config, text_model) -> DecoderScheme:
    """The scheme of a language model's decoder layers (``text_model``), chosen by its config's
    ``model_type`` (``SCHEMES``); layers that are not the kind it names are refused (``check``)."""
    model_type = text_config.model_type
    return SCHEMES.get(model_type, PlainLayers)(text_model, model_type)
