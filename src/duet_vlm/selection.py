"""Pure selection functions: tensors in, indices and merged features out.

These are what the docs point to when someone asks "what exactly does DUET keep?". They know
nothing about models or hooks, so they can be tested in isolation (see tests/test_selection.py).

Conventions: token index 0 is the CLS token and patch ``(r, c)`` of a ``g x g`` grid is index
``1 + g*r + c`` (the "577-space" of the reference implementation on LLaVA-1.5).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class MergeResult:
    """Output of a dominant + contextual merge for a batch of images.

    Attributes:
        features: ``(I, dominant + contextual, C)``: dominant tokens (CLS first, then patches in
            raster order) followed by the contextual tokens (in anchor-rank order).
        dominant: ``(I, dominant)`` indices of the dominant tokens (CLS = 0).
        anchors: ``(I, contextual)`` indices of the contextual anchors.
        members: ``(I, m)`` indices of the tokens merged into an anchor (``m`` may be 0).
        assignment: ``(I, m)`` position in ``anchors`` each member was merged into.
    """

    features: torch.Tensor
    dominant: torch.Tensor
    anchors: torch.Tensor
    members: torch.Tensor
    assignment: torch.Tensor

    @property
    def kept(self) -> torch.Tensor:
        """``(I, dominant + contextual)`` representative index of every output token."""
        return torch.cat([self.dominant, self.anchors], dim=1)


def top_k_in_order(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the ``k`` highest scores along the last axis, returned in ascending order.

    >>> top_k_in_order(torch.tensor([0.1, 0.9, 0.5, 0.7]), 2)
    tensor([1, 3])
    """
    if not 0 <= k <= scores.shape[-1]:
        raise ValueError(f"cannot keep {k} of {scores.shape[-1]} tokens")
    return scores.topk(k, dim=-1).indices.sort(dim=-1).values


def gather_tokens(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Rows of ``x`` (``(B, L, D)``) at ``index`` (``(B, ...)`` positions): ``(B, ..., D)``.

    >>> gather_tokens(torch.arange(6.).view(1, 3, 2), torch.tensor([[2, 0]])).tolist()
    [[[4.0, 5.0], [0.0, 1.0]]]
    """
    flat = index.reshape(index.shape[0], -1, 1).expand(-1, -1, x.shape[-1])
    return x.gather(1, flat).view(*index.shape, x.shape[-1])


def merge_dominant_contextual(
    features: torch.Tensor,
    cls_attention: torch.Tensor,
    keys: torch.Tensor,
    dominant: int,
    contextual: int,
    cluster_width: int | None = 4,
    has_cls: bool = True,
) -> MergeResult:
    """DUET Stage A (V2V): keep dominant tokens, merge a pool of the next-best into contextual ones.

    Args:
        features: ``(I, 1 + P, C)`` features of the vision feature layer, CLS first (``(I, P, C)``
            without ``has_cls``).
        cls_attention: ``(I, P)`` CLS-to-patch attention of that layer (summed or averaged over heads;
            only the ranking matters), or any per-patch importance (attention received, for towers
            without a CLS token).
        keys: ``(I, 1 + P, d)`` keys of that layer averaged over heads (the similarity metric).
        dominant: tokens kept as they are, CLS included (so ``dominant - 1`` patches; all
            ``dominant`` are patches without ``has_cls``).
        contextual: merged tokens appended after the dominant ones.
        cluster_width: DUET's pre-selection width ``w``: only the ``w * contextual`` best-scoring
            residual patches form the pool; anchors sit at every ``w``-th rank of it and the rest of
            the residual patches are dropped. ``None`` gives VisionZip's rule instead: anchors
            spatially uniform (every ``M // contextual``-th residual patch in raster order) and every
            other residual patch merged.
        has_cls: token 0 is a CLS token, always kept as the first dominant token.

    Each contextual token is ``anchor + mean(members assigned to it)`` (members chosen by the
    highest cosine similarity of keys), the reference formula; an anchor without members is itself.

    >>> out = merge_dominant_contextual(torch.randn(1, 17, 8), torch.rand(1, 16), torch.randn(1, 17, 4), 5, 2)
    >>> out.features.shape
    torch.Size([1, 7, 8])
    """
    images, tokens, _ = features.shape
    offset = int(has_cls)
    patches = tokens - offset
    if cls_attention.shape != (images, patches):
        raise ValueError(f"cls_attention must be {(images, patches)}, got {tuple(cls_attention.shape)}")
    if dominant < offset or contextual < 0 or dominant + contextual > tokens:
        raise ValueError(
            f"dominant={dominant} (CLS included) + contextual={contextual} must fit in {tokens} tokens"
        )
    if cluster_width is not None and cluster_width < 1:
        raise ValueError(f"cluster_width must be >= 1, got {cluster_width}")
    device = features.device
    with torch.no_grad():
        scores = cls_attention.float()
        top_patches = scores.topk(dominant - offset, dim=-1).indices + offset
        cls = torch.zeros(images, offset, dtype=torch.long, device=device)
        dominant_idx = torch.cat([cls, top_patches], dim=1).sort(dim=1).values

        is_dominant = torch.zeros(images, tokens, dtype=torch.bool, device=device)
        is_dominant.scatter_(1, dominant_idx, True)
        # Residual patches in raster order; every image has the same number of them.
        residual = (~is_dominant[:, offset:]).nonzero()[:, 1].view(images, -1) + offset
        n_residual = residual.shape[1]

        if contextual == 0 or n_residual == 0:
            empty = torch.empty(images, 0, dtype=torch.long, device=device)
            anchors, members, assignment = empty, empty, empty
        else:
            if cluster_width is None:
                step = max(1, n_residual // contextual)
                anchor_rank = torch.arange(0, n_residual, step, device=device)[:contextual]
                pool = residual
            else:
                pool_size = min(max(1, cluster_width * contextual), n_residual)
                residual_scores = scores.gather(1, residual - offset)
                pool = residual.gather(1, residual_scores.topk(pool_size, dim=-1).indices)
                step = max(1, pool_size // contextual)
                anchor_rank = torch.arange(0, pool_size, step, device=device)[:contextual]
            is_anchor = torch.zeros(pool.shape[1], dtype=torch.bool, device=device)
            is_anchor[anchor_rank] = True
            anchors = pool[:, is_anchor]
            members = pool[:, ~is_anchor]
            unit_keys = F.normalize(keys.float(), dim=-1)
            similarity = gather_tokens(unit_keys, members) @ gather_tokens(unit_keys, anchors).transpose(1, 2)
            assignment = similarity.argmax(dim=-1)

    dominant_features = gather_tokens(features, dominant_idx)
    if anchors.shape[1] == 0:
        return MergeResult(dominant_features, dominant_idx, anchors, members, assignment)
    anchor_features = gather_tokens(features, anchors)
    one_hot = F.one_hot(assignment, anchors.shape[1]).to(features.dtype)  # (I, m, contextual)
    sums = one_hot.transpose(1, 2) @ gather_tokens(features, members)
    counts = one_hot.sum(dim=1).clamp(min=1).unsqueeze(-1)
    contextual_features = anchor_features + sums / counts
    return MergeResult(
        torch.cat([dominant_features, contextual_features], dim=1), dominant_idx, anchors, members, assignment
    )


def density_peaks_clusters(x: torch.Tensor, clusters: int, neighbours: int | None = None):
    """DPC-kNN (as in TCFormer and SparseVLM's recycling): centres and each token's cluster.

    Distances are L2 / sqrt(C); density = exp(-mean squared distance to the ``neighbours`` nearest
    tokens, itself included; default ``clusters`` as in the reference); delta = distance to the
    nearest denser token (the densest gets the largest distance of the group); the ``clusters``
    tokens with the largest density * delta are centres and every token joins its nearest centre.
    Ties are broken by token index instead of the reference's random noise, so results do not
    depend on the batch.

    Args:
        x: ``(G, m, C)`` tokens of ``G`` independent groups.
        clusters: centres per group, ``1 <= clusters <= m``.

    Returns:
        ``centres`` ``(G, clusters)`` ascending token indices and ``assignment`` ``(G, m)``: the
        position in ``centres`` of each token's cluster (a centre is in its own cluster).

    >>> x = torch.tensor([[[0.0], [0.1], [5.0], [5.2]]])
    >>> density_peaks_clusters(x, 2)[1]
    tensor([[0, 0, 1, 1]])
    """
    groups, tokens, channels = x.shape
    if not 1 <= clusters <= tokens:
        raise ValueError(f"cannot form {clusters} clusters from {tokens} tokens")
    neighbours = clusters if neighbours is None else neighbours
    if not 1 <= neighbours <= tokens:
        raise ValueError(f"neighbours must lie in [1, {tokens}], got {neighbours}")
    x = x.detach().float()
    # Direct pairwise differences, not the matmul expansion: exact zeros on the diagonal and values
    # that do not depend on which other rows share the batch.
    distance = torch.cdist(x, x, compute_mode="donot_use_mm_for_euclid_dist") / math.sqrt(channels)
    nearest = distance.topk(neighbours, dim=-1, largest=False).values
    density = (-(nearest**2).mean(dim=-1)).exp()
    order = density.argsort(dim=-1, descending=True, stable=True)
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(tokens, device=x.device).expand(groups, -1))
    denser = rank[:, None, :] < rank[:, :, None]  # [g, i, j]: token j is denser than token i
    farthest = distance.flatten(1).max(dim=-1).values[:, None, None]
    delta = torch.where(denser, distance, farthest).min(dim=-1).values
    score = density * delta
    centres = score.argsort(dim=-1, descending=True, stable=True)[:, :clusters].sort(dim=-1).values
    to_centre = distance.gather(2, centres[:, None, :].expand(-1, tokens, -1))  # (G, m, clusters)
    assignment = to_centre.argmin(dim=-1)
    own = torch.arange(clusters, device=x.device).expand(groups, -1)
    return centres, assignment.scatter(1, centres, own)


def merge_clusters(x: torch.Tensor, assignment: torch.Tensor, clusters: int) -> torch.Tensor:
    """``(G, clusters, C)`` mean of each cluster's members (differentiable in ``x``)."""
    one_hot = torch.nn.functional.one_hot(assignment, clusters).to(x.dtype).transpose(1, 2)  # (G, c, m)
    return (one_hot @ x) / one_hot.sum(dim=-1, keepdim=True).clamp(min=1)

