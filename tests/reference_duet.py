"""A deliberately simple DUET written from the algorithm description, for differential tests.

Batch 1, no padding, loops and full attention matrices: slow and obvious, sharing no code with the
library. It builds the shorter prompt explicitly (fewer placeholders, contiguous positions) and runs
the decoder layers one by one, dropping tokens at the boundaries.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb


def eager_copy(model):
    clone = copy.deepcopy(model)
    clone.set_attn_implementation("eager")
    return clone


def stage_a(eager_model, pixel_values, dominant, contextual, width):
    """CLS attention from the tower's own eager attention maps; returns (features incl. CLS, indices)."""
    tower = eager_model.model.vision_tower
    out = tower(pixel_values, output_hidden_states=True, output_attentions=True)
    hidden = out.hidden_states[-2][0]
    scores = out.attentions[-2][0, :, 0, 1:].sum(0)
    layer = getattr(tower, "vision_model", tower).encoder.layers[-2]
    x = layer.layer_norm1(out.hidden_states[-3][0])
    heads = layer.self_attn.num_heads
    keys = layer.self_attn.k_proj(x).view(x.shape[0], heads, -1).mean(1)
    keys = F.normalize(keys, dim=-1)

    patches = scores.shape[0]
    top = (scores.topk(dominant - 1).indices + 1).tolist()
    kept = [0] + sorted(top)
    residual = [p for p in range(1, patches + 1) if p not in set(top)]
    pool = sorted(residual, key=lambda p: -scores[p - 1].item())[: min(width * contextual, len(residual))]
    step = max(1, len(pool) // contextual) if contextual else 1
    anchors = pool[::step][:contextual]
    members = [p for p in pool if p not in anchors]
    groups = {a: [] for a in anchors}
    for m in members:
        similarity = torch.stack([keys[m] @ keys[a] for a in anchors])
        groups[anchors[int(similarity.argmax())]].append(m)
    contextual_features = [hidden[a] + (hidden[groups[a]].mean(0) if groups[a] else 0) for a in anchors]
    features = torch.cat([hidden[kept]] + ([torch.stack(contextual_features)] if anchors else []))
    return features, kept + anchors


def _causal(length, dtype):
    mask = torch.full((length, length), torch.finfo(dtype).min, dtype=dtype).triu(1)
    return mask[None, None]


def text_scores(layer, hidden, position_embeddings, queries, visual):
    """Full attention matrix of ``layer`` on ``hidden``; mean over heads and query rows, visual columns."""
    attn = layer.self_attn
    x = layer.input_layernorm(hidden)
    length = x.shape[1]
    q = attn.q_proj(x).view(1, length, -1, attn.head_dim).transpose(1, 2)
    k = attn.k_proj(x).view(1, length, -1, attn.head_dim).transpose(1, 2)
    q, k = apply_rotary_pos_emb(q, k, *position_embeddings)
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    logits = (q.float() @ k.float().transpose(-1, -2)) * attn.scaling + _causal(length, torch.float32)
    probs = logits.softmax(-1).mean(1)[0]  # (L, L)
    return probs[queries][:, visual].mean(0)


def reference_duet(
    model,
    eager_model,
    input_ids,
    pixel_values,
    *,
    dominant,
    contextual,
    width=4,
    boundaries=(),
    labels=None,
    query="text",
    keep_override=None,
):
    """Returns logits of the reduced sequence, its labels, the kept indices and per-layer lengths.

    ``boundaries``: ``(layer, keep)`` pairs. ``keep_override``: per boundary, the visual indices (into
    the current visual block) to keep instead of scoring (to replay a given selection).
    """
    image_token = model.config.image_token_id
    ids = input_ids[0].tolist()
    start = ids.index(image_token)
    end = start + ids.count(image_token)
    features, vision_kept = stage_a(eager_model, pixel_values, dominant, contextual, width)
    projected = model.model.multi_modal_projector(features.to(model.dtype))
    n = projected.shape[0]
    text = model.model.language_model.embed_tokens(torch.tensor(ids))
    hidden = torch.cat([text[:start], projected, text[end:]])[None]
    if labels is not None:
        labels = torch.cat([labels[0, :start], torch.full((n,), -100), labels[0, end:]])
    visual = list(range(start, start + n))
    lm = model.model.language_model
    positions = torch.arange(hidden.shape[1])[None]
    lengths, stage_kept = [], []
    stages = dict(boundaries)
    for index, layer in enumerate(lm.layers):
        position_embeddings = lm.rotary_emb(hidden, positions)
        if index in stages:
            after = visual[-1] + 1 if visual else start
            if query == "last":
                queries = [hidden.shape[1] - 1]
            else:
                queries = [
                    p for p in range(after, hidden.shape[1]) if labels is None or labels[p] == -100
                ] or [hidden.shape[1] - 1]
            if keep_override is not None:
                keep = keep_override[len(stage_kept)]
            else:
                scores = text_scores(layer, hidden, position_embeddings, queries, visual)
                keep = sorted(scores.topk(stages[index]).indices.tolist())
            stage_kept.append(keep)
            survivors = list(range(start)) + [visual[k] for k in keep] + list(range(visual[-1] + 1 if visual else start, hidden.shape[1]))
            hidden = hidden[:, survivors]
            if labels is not None:
                labels = labels[survivors]
            visual = list(range(start, start + len(keep)))
            positions = torch.arange(hidden.shape[1])[None]
            position_embeddings = lm.rotary_emb(hidden, positions)
        lengths.append(hidden.shape[1])
        hidden = layer(
            hidden,
            attention_mask=_causal(hidden.shape[1], hidden.dtype),
            position_ids=positions,
            position_embeddings=position_embeddings,
        )
    logits = model.lm_head(lm.norm(hidden))[0]
    return dict(logits=logits, labels=labels, vision_kept=vision_kept, stage_kept=stage_kept, lengths=lengths, start=start, n=n)
