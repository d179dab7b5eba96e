"""What the runtime needs to know about a model family, and nothing about methods."""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch
from torch import nn


def rotate_like(layer: nn.Module, states: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``(B, H, L, d)`` states with the RoPE function of ``layer``'s own modeling module,
    as ``layer.self_attn`` does (``cos``/``sin``: ``(B, L, d)``)."""
    module = sys.modules[type(layer.self_attn).__module__]
    rotated, _ = module.apply_rotary_pos_emb(states, states, cos, sin)
    return rotated


@dataclass(frozen=True)
class Geometry:
    """Shape facts a budget solver needs.

    Attributes:
        num_layers: decoder layers of the language model.
        visual_tokens: placeholder tokens per image in the LLM input (576 on LLaVA-1.5).
        grid: patch grid of the vision encoder (24, 24 on LLaVA-1.5).
        has_cls: the vision encoder has a CLS token at index 0.
    """

    num_layers: int
    visual_tokens: int
    grid: tuple[int, int]
    has_cls: bool


class ModelAdapter:
    """Module paths and tensor conventions of one model family.

    Subclasses set the module attributes in ``__init__`` and implement the vision-side scoring.
    The attributes the runtime uses:

    - ``top``: the module receiving ``labels`` (or ``None`` for a bare base model),
    - ``base``: the module receiving ``input_ids`` and running vision + language,
    - ``language_model``: the text decoder (``LlamaModel``-like), ``layers`` its decoder layers,
      ``rotary_emb`` its RoPE module,
    - ``final_norm`` and ``lm_head`` (``None`` without a head): the output head,
    - ``vision_layer``: the encoder layer whose output feeds the projector, ``projector``,
    - ``image_token_id``, ``geometry`` and ``text_config``.
    """

    family: str = ""
    supported_classes: tuple[str, ...] = ()

    top: nn.Module | None
    base: nn.Module
    language_model: nn.Module
    layers: nn.ModuleList
    rotary_emb: nn.Module
    final_norm: nn.Module
    lm_head: nn.Module | None
    vision_layer: nn.Module
    projector: nn.Module
    image_token_id: int
    geometry: Geometry

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        return type(model).__name__ in cls.supported_classes

    @property
    def text_config(self):
        return self.language_model.config

    @property
    def slots_have_cls(self) -> bool:
        """Whether the image's placeholder slots hold the CLS feature too (LLaVA "full" strategy)."""
        raise NotImplementedError

    def vision_scores(self, layer_input: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """CLS-to-patch attention ``(I, P)`` summed over heads and head-averaged keys ``(I, T, d)``.

        Computed from the vision layer's own norm and projections on its input, so the tower keeps
        its fast attention and nothing beyond the CLS query row is materialised.
        """
        raise NotImplementedError

    # The language side is Llama-like for every supported family: pre-norm decoder layers with
    # ``input_layernorm`` and ``self_attn.{q_proj,k_proj}`` and rotate-half RoPE.
    def rotate(self, layer: nn.Module, states: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Apply the model's own RoPE function (from its modeling module) to ``(B, H, L, d)`` states."""
        return rotate_like(layer, states, cos, sin)

    def text_to_visual_attention(
        self,
        layer: nn.Module,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        queries: list[torch.Tensor],
        key_valid: torch.Tensor,
        visual_index: torch.Tensor,
    ) -> torch.Tensor:
        """Attention from each row's query tokens to its visual tokens, as ``layer`` would compute it.

        Only the ``|queries| x L`` block is formed: the layer's input norm, q/k projections and RoPE on
        the (detached) hidden states, a full-row softmax in float32 over all causally visible, non-pad
        keys, then the mean over heads and over queries.

        Args:
            hidden_states: ``(B, L, D)`` input of ``layer``.
            position_embeddings: ``(cos, sin)`` for those ``L`` positions.
            queries: per row, a 1-D tensor of query positions.
            key_valid: ``(B, L)`` bool, False on padding.
            visual_index: ``(B, n_images, n)`` positions of the visual tokens.

        Returns:
            ``(B, n_images, n)`` float32 scores.
        """
        attn = layer.self_attn
        head_dim = attn.head_dim
        groups = attn.num_key_value_groups
        cos, sin = position_embeddings
        batch = hidden_states.shape[0]
        cos, sin = cos.expand(batch, -1, -1), sin.expand(batch, -1, -1)
        scores = []
        with torch.no_grad():
            for row in range(batch):
                x = layer.input_layernorm(hidden_states[row : row + 1].detach())
                q_pos = queries[row]
                keys = attn.k_proj(x).view(1, x.shape[1], -1, head_dim).transpose(1, 2)
                keys = self.rotate(layer, keys, cos[row : row + 1], sin[row : row + 1])
                query = attn.q_proj(x[:, q_pos]).view(1, len(q_pos), -1, head_dim).transpose(1, 2)
                query = self.rotate(layer, query, cos[row : row + 1, q_pos], sin[row : row + 1, q_pos])
                keys = keys.repeat_interleave(groups, dim=1)
                logits = (query.float() @ keys.float().transpose(-1, -2)) * attn.scaling  # (1, H, q, L)
                key_pos = torch.arange(x.shape[1], device=x.device)
                allowed = (key_pos[None, :] <= q_pos[:, None]) & key_valid[row][None, :]
                logits = logits.masked_fill(~allowed, torch.finfo(logits.dtype).min)
                probs = logits.softmax(dim=-1).mean(dim=1)[0]  # (q, L)
                per_token = probs[:, visual_index[row].reshape(-1)].mean(dim=0)
                scores.append(per_token.view(visual_index.shape[1:]))
        return torch.stack(scores)
