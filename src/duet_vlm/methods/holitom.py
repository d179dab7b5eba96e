"""HoliTom (Shao et al., NeurIPS 2025): holistic token merging for video LLMs, as the official code runs it
(``cokeshao/HoliTom`` ``e9b2972``: ``holitom/llava_arch.py`` and ``holitom/modeling_qwen2.py``).

Outside the language model a video's frames are cut into segments by a dynamic program that
maximises the tokens saved by temporal merging, each token that stays similar through its segment
is averaged over the segment's frames, and the tokens are then merged spatially; inside the language
model the less-attended visual tokens are merged into their most similar kept token once.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..geometry import Geometry
from ..schedule import Schedule
from ..selection import density_peaks_clusters, gather_tokens
from .base import (
    LanguageStage,
    LayerView,
    Plan,
    Reducer,
    Selection,
    VisionReduction,
    VisionStage,
    VisionView,
    check_budget,
    compose_plan,
)
from .stages import LastTokenAttention
from .registry import register_method

# The official settings (scripts/eval_ov-7b_holitom.sh, holitom/llava_arch.py environment defaults).
REFERENCE_LAYER = (18, 28)  # HOLITOM_k=18 on Qwen2-7B's 28 decoder layers (LLaVA-OneVision-7B, LLaVA-Video-7B)
MERGE_RATIO = 0.5  # HOLITOM_r: half of the visual tokens merged at that layer
TAU = 0.80  # T at RETAIN_RATIO 0.15, 0.20, 0.25 (and the README's example)
TAU_LOW, LOW_RETAIN = 0.65, 0.125  # T=0.65 at RETAIN_RATIO=0.10: below the midpoint of 0.10 and 0.15
BETA = 0.6  # BETA: a cluster centre's weight against the mean of its members
KNN = 7  # K: neighbours of the DPC-kNN density (at most the cluster count)
MAX_WINDOW = 1024  # MAX_WINDOW_SIZE: longest segment in frames
ALLOCATIONS = ("video", "frame")


def runtime_takes_counts() -> bool:
    """Whether this duet-vlm's vision stages may give frames different token counts
    (``VisionReduction.counts``); HoliTom's own allocation needs it."""
    return "counts" in {spec.name for spec in dataclasses.fields(VisionReduction)}


# ----------------------------------------------------------------------------- temporal segmentation
def frame_similarity(x: torch.Tensor) -> torch.Tensor:
    """``(F - 1, N)`` cosine similarity of each token of ``x`` (``(F, N, C)``) with the token at the
    same position of the next frame (the official ``feature_sim``).

    >>> frame_similarity(torch.tensor([[[1.0, 0.0]], [[2.0, 0.0]], [[0.0, 1.0]]])).tolist()
    [[1.0], [0.0]]
    """
    x = x.detach().float()
    return F.cosine_similarity(x[:-1], x[1:], dim=-1)


def static_runs(similarity: torch.Tensor, tau: float) -> torch.Tensor:
    """``(F, N)``: for each frame ``f`` and position ``p``, how many of the following frames the token
    at ``p`` stays in without a break, each similar (``> tau``) to the one before it.

    A window of frames ``s..e`` leaves the token at ``p`` static exactly when ``runs[s, p] >= e - s``.

    >>> static_runs(torch.tensor([[0.9, 0.1], [0.9, 0.9]]), 0.8).tolist()
    [[2, 0], [1, 1], [0, 0]]
    """
    above = similarity > tau
    transitions, n = above.shape
    step = torch.arange(transitions, device=above.device)[:, None].expand(-1, n)
    # First transition at or after f that is not similar (``transitions``: none).
    breaks = torch.where(above, torch.full_like(step, transitions), step)
    next_break = breaks.flip(0).cummin(dim=0).values.flip(0)
    return torch.cat([next_break - step, torch.zeros(1, n, dtype=torch.long, device=above.device)])


def window_savings(runs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(static, savings)``, both ``(F, F)``: ``static[s, e]`` positions static through frames
    ``s..e`` (``e >= s``), and ``savings[s, e] = static[s, e] * (e - s)``, the tokens that merging
    them into one saves (0 for ``e <= s``): the official ``pruned_static_count``, from run lengths
    in ``O(F N + F^2)`` instead of a cumulative product per start frame.

    >>> window_savings(torch.tensor([[2, 0], [1, 1], [0, 0]]))[1].tolist()
    [[0, 1, 2], [0, 0, 2], [0, 0, 0]]
    """
    frames, n = runs.shape
    device = runs.device
    histogram = torch.zeros(frames, frames + 1, dtype=torch.long, device=device)
    histogram.scatter_add_(1, runs, torch.ones_like(runs))
    at_least = histogram.flip(1).cumsum(1).flip(1)  # [s, L]: positions with runs[s] >= L
    index = torch.arange(frames, device=device)
    length = (index[None, :] - index[:, None]).clamp(min=0)
    static = at_least.gather(1, length)
    return static, static * length


def segment_frames(
    savings: torch.Tensor, max_window: int = MAX_WINDOW, allowed: torch.Tensor | None = None
) -> list[tuple[int, int]]:
    """The official ``select_static_windows``: frames cut into consecutive segments ``(start, end)``
    (inclusive) maximising the summed ``savings`` of the segments, by dynamic programming over the
    last frame. Ties go to the shorter last segment, a lone frame first (the official strict ``>``
    over increasing window sizes). ``allowed[s, e]`` (optional) excludes windows ``s..e``.

    ``O(F * max_window)`` steps over frames (never over tokens).

    >>> segment_frames(torch.tensor([[0, 1, 2], [0, 0, 2], [0, 0, 0]]))
    [(0, 0), (1, 2)]
    """
    frames = savings.shape[0]
    gain = savings.tolist()
    ok = allowed.tolist() if allowed is not None else None
    best = [0] * frames
    start = [0] * frames
    for end in range(frames):
        value, first = (best[end - 1] if end else 0), end
        for size in range(2, min(end + 1, max_window) + 1):
            s = end - size + 1
            if ok is not None and not ok[s][end]:
                continue
            candidate = (best[s - 1] if s else 0) + gain[s][end]
            if candidate > value:
                value, first = candidate, s
        best[end], start[end] = value, first
    segments, end = [], frames - 1
    while end >= 0:
        segments.append((start[end], end))
        end = start[end] - 1
    return segments[::-1]


def split_until(segments: list[tuple[int, int]], savings: list[list[int]], tokens: int, total: int):
    """Segments after splitting into lone frames, smallest saving first (ties: the earlier), until at
    least ``total`` of the ``tokens`` remain: HoliTom keeps every remaining token when temporal
    merging left fewer than the budget (its retain ratio is capped at 1); here the item gets exactly
    its budget, so the least useful temporal merges are undone instead."""
    segments = list(segments)
    remaining = tokens - sum(savings[s][e] for s, e in segments)
    while remaining < total:
        multi = [i for i, (s, e) in enumerate(segments) if e > s]
        i = min(multi, key=lambda j: (savings[segments[j][0]][segments[j][1]], j))
        s, e = segments[i]
        remaining += savings[s][e]
        segments[i : i + 1] = [(f, f) for f in range(s, e + 1)]
    return segments


def exact_counts(counts: list[int], quotas: list[float], sizes: list[int], total: int) -> list[int]:
    """``counts`` changed by one token on the fewest groups so that they sum to ``total``: the groups
    rounded furthest from their ``quotas`` the wrong way first (ties: the earlier), within
    ``0..sizes``. The official per-group rounding (``ceil`` for a frame, ``round`` for a segment's
    static tokens) lands a few tokens off the budget; counts that already sum to it are unchanged.

    >>> exact_counts([3, 3, 2], [2.5, 2.5, 2.0], [5, 5, 5], 7)
    [2, 3, 2]
    """
    counts = list(counts)
    while (missing := total - sum(counts)) != 0:
        step = 1 if missing > 0 else -1
        room = [g for g in range(len(counts)) if (counts[g] < sizes[g] if step > 0 else counts[g] > 0)]
        if not room:
            raise ValueError(f"cannot spread {total} tokens over groups of {sizes}")
        room.sort(key=lambda g: step * (counts[g] - quotas[g]))
        for g in room[: abs(missing)]:
            counts[g] += step
    return counts


# ----------------------------------------------------------------------------- spatial merging
def cluster_weights(x: torch.Tensor, clusters: int, knn: int, beta: float):
    """DPC-kNN clusters of the tokens ``x`` (``(m, C)``) and each token's weight in its cluster's
    output (the official ``cluster_dpc_knn`` + ``merge_tokens_by_clustering``): a centre counts
    ``beta`` and its ``k`` members ``(1 - beta) / k`` each (a centre alone counts 1). Density over the
    ``min(knn, clusters)`` nearest tokens; ties go to the lower index instead of the official noise.

    Returns ``(centres (clusters,) ascending, assignment (m,) into centres, weight (m,))``.
    """
    centres, assignment = density_peaks_clusters(x[None], clusters, min(knn, clusters))
    centres, assignment = centres[0], assignment[0]
    members = torch.bincount(assignment, minlength=clusters) - 1
    own = members[assignment]
    is_centre = torch.zeros(len(x), dtype=torch.bool, device=x.device)
    is_centre[centres] = True
    centre_weight = torch.where(own > 0, beta, 1.0).float()
    weight = torch.where(is_centre, centre_weight, (1 - beta) / own.clamp(min=1).float())
    return centres, assignment, weight


@dataclass
class MergePlan:
    """What HoliTom makes of one video (or image): per output token its sources and weights.

    Every output is a weighted sum of the item's tokens, and every token feeds at most one output.

    Attributes:
        segments: ``(start, end)`` frames of each temporal segment.
        counts: ``(F,)`` outputs of each frame (their sum is the budget).
        kept: ``(F, width)`` per frame, the position of the token each output stands for (a
            temporally merged token: its cluster centre's position in the frame it is written to);
            0 past ``counts``.
        row, column: ``(M,)`` the output (frame, index within the frame) each source feeds.
        frame, position: ``(M,)`` the source token.
        weight: ``(M,)`` its weight.
    """

    segments: list[tuple[int, int]]
    counts: torch.Tensor
    kept: torch.Tensor
    row: torch.Tensor
    column: torch.Tensor
    frame: torch.Tensor
    position: torch.Tensor
    weight: torch.Tensor

    def apply(self, values: torch.Tensor, width: int | None = None) -> torch.Tensor:
        """``(F, width, C)`` outputs from the item's tokens ``values`` (``(F, N, C)``), in float32
        then cast back; rows past a frame's count are zero."""
        frames = values.shape[0]
        width = self.kept.shape[1] if width is None else width
        sources = values[self.frame, self.position].float() * self.weight[:, None]
        out = torch.zeros(frames * width, values.shape[-1], dtype=torch.float32, device=values.device)
        out = out.index_add(0, self.row * width + self.column, sources)
        return out.view(frames, width, -1).to(values.dtype)


def temporal_segments(
    directions: torch.Tensor, tau: float = TAU, max_window: int = MAX_WINDOW, keep: int | None = None
) -> tuple[list[tuple[int, int]], torch.Tensor, list[list[int]]]:
    """Step 1 of ``holitom_merge``: ``(segments, runs, savings)`` of the frames ``directions``
    (``(F, N, C)``): the official segmentation (``segment_frames`` on ``window_savings`` of
    ``static_runs``). With ``keep`` (the same count in every frame), a window is a segment only if
    the tokens it leaves can fill its frames: ``static * (w - 1) <= w * (N - keep)``."""
    frames, n = directions.shape[:2]
    if frames == 1:
        return [(0, 0)], torch.zeros(1, n, dtype=torch.long, device=directions.device), [[0]]
    runs = static_runs(frame_similarity(directions), tau)
    static, savings = window_savings(runs)
    allowed = None
    if keep is not None:
        size = torch.arange(frames, device=runs.device)
        size = (size[None, :] - size[:, None]).clamp(min=0) + 1
        allowed = static * (size - 1) <= size * (n - keep)
    return segment_frames(savings, max_window, allowed), runs, savings.tolist()


def static_masks(segments: list[tuple[int, int]], runs: torch.Tensor) -> list[torch.Tensor]:
    """``(N,)`` per segment: the positions static through all its frames (none for a lone frame)."""
    return [runs[s] >= e - s if e > s else torch.zeros_like(runs[s], dtype=torch.bool) for s, e in segments]


def official_counts(segments: list[tuple[int, int]], n_static: list[int], n: int, ratio: float):
    """The official counts at retain ratio ``ratio`` (already raised to what temporal merging left):
    ``round(n_static * ratio)`` static tokens per segment of several frames, ``ceil(n_dynamic *
    ratio)`` per frame. Returns ``(counts, quotas, sizes)`` per group, in order: each segment's static
    group (segments of several frames), then its frames."""
    counts, quotas, sizes = [], [], []
    for (s, e), c in zip(segments, n_static):
        groups = [(c, round(c * ratio))] if e > s else []
        groups += [(n - c, math.ceil((n - c) * ratio))] * (e - s + 1)
        for size, count in groups:
            counts.append(count)
            quotas.append(size * ratio)
            sizes.append(size)
    return counts, quotas, sizes


def token_counts(
    segments: list[tuple[int, int]], n_static: list[int], n: int, total: int, savings: list[list[int]],
    per_frame: bool = False,
) -> tuple[list[int], list[int]]:
    """Step 3 of ``holitom_merge``: ``(static tokens per segment, dynamic tokens per frame)`` summing
    to ``total``: the official counts made exact (``exact_counts``), or with ``per_frame`` the same
    count ``keep = total / F`` in every frame (``d = ceil(n_dynamic * r_segment)`` dynamic tokens per
    frame, ``w * (keep - d)`` static tokens per segment)."""
    frames = segments[-1][1] + 1
    keep = total // frames
    if per_frame:
        static_count, dynamic = [], []
        for (s, e), c in zip(segments, n_static):
            w, nd = e - s + 1, n - c
            remaining = c + w * nd
            d = min(keep, -(-nd * w * keep // remaining)) if remaining else 0
            static_count.append(w * (keep - d))
            dynamic += [d] * w
        return static_count, dynamic
    whole = frames * n
    reduced = sum(savings[s][e] for s, e in segments)
    ratio = min(total / whole / ((whole - reduced) / whole), 1.0)  # as the official code computes it
    counts, quotas, sizes = official_counts(segments, n_static, n, ratio)
    counts = exact_counts(counts, quotas, sizes, total)
    static_count, dynamic, g = [], [], 0
    for s, e in segments:
        static_count.append(counts[g] if e > s else 0)
        g += e > s
        dynamic += counts[g : g + e - s + 1]
        g += e - s + 1
    return static_count, dynamic


def holitom_merge(
    directions: torch.Tensor,
    scores: torch.Tensor,
    total: int,
    tau: float = TAU,
    beta: float = BETA,
    knn: int = KNN,
    max_window: int = MAX_WINDOW,
    per_frame: bool = False,
) -> MergePlan:
    """HoliTom's outer-LLM merge of one item: ``total`` output tokens from its ``F`` frames of ``N``.

    1. Temporal segmentation (``temporal_segments``): ``segment_frames`` on the savings of the cosine
       similarity of each token with the same position of the next frame (``> tau``).
    2. In a segment of ``w > 1`` frames, the positions static through all of it are averaged over
       its frames (one token per position, written to the segment's first frame); the rest are
       dynamic, every frame keeping its own.
    3. Counts (``token_counts``): with ``r = total / remaining tokens``, a segment keeps
       ``round(n_static * r)`` static tokens and a frame ``ceil(n_dynamic * r)`` (the official rule),
       then ``exact_counts`` meets ``total`` exactly (segments are split first, ``split_until``, if
       fewer than ``total`` tokens remain).
    4. Spatial merging (``assemble``): static tokens by DPC-kNN clusters (``cluster_weights``); a
       frame's dynamic tokens by attention (``scores``, highest first; the official ``D = 0``).

    ``per_frame=True`` meets a runtime that needs the same count ``keep = total / F`` in every frame:
    a window is a segment only if its remaining tokens can fill its frames, each of its frames keeps
    ``d = ceil(n_dynamic * r_segment)`` dynamic tokens (``r_segment = w * keep / remaining``) and the
    segment's ``w * (keep - d)`` static tokens are dealt to its frames in position order, ``keep - d``
    each: the budget is spread per segment, not over the whole video.

    Args:
        directions: ``(F, N, C)`` tokens in the space similarities and clusters are measured in.
        scores: ``(F, N)`` attention each token receives (higher is kept first).
        total: output tokens, ``0 <= total <= F * N`` (a multiple of ``F`` with ``per_frame``).

    Cost: ``O(F N C)`` similarities, ``O(F N + F^2)`` savings, ``O(F * max_window)`` dynamic program,
    ``O(n^2 C)`` DPC-kNN per segment on its ``n`` static positions; no loop over tokens.
    """
    frames, n = scores.shape
    if not 0 <= total <= frames * n:
        raise ValueError(f"cannot keep {total} of {frames * n} tokens")
    if per_frame and total % frames:
        raise ValueError(f"per_frame needs a multiple of the {frames} frames, got {total} tokens")
    segments, runs, savings = temporal_segments(directions, tau, max_window, total // frames if per_frame else None)
    if not per_frame:
        segments = split_until(segments, savings, frames * n, total)
    masks = static_masks(segments, runs)
    static_count, dynamic = token_counts(segments, [int(m.sum()) for m in masks], n, total, savings, per_frame)
    plan = assemble(directions, scores, segments, masks, static_count, dynamic, beta, knn, per_frame)
    filled = plan.counts.tolist()
    if sum(filled) != total or (per_frame and set(filled) - {total // frames}):
        raise RuntimeError(f"HoliTom's merge filled {filled}, expected {total} tokens")
    return plan


def assemble(
    directions: torch.Tensor,
    scores: torch.Tensor,
    segments: list[tuple[int, int]],
    masks: list[torch.Tensor],
    static_count: list[int],
    dynamic: list[int],
    beta: float = BETA,
    knn: int = KNN,
    per_frame: bool = False,
) -> MergePlan:
    """Step 4 of ``holitom_merge``: the outputs of given segments, static masks and counts.

    Each segment's static tokens (its frames' mean at each static position) become
    ``static_count[segment]`` DPC-kNN clusters, written to its first frame (``per_frame``: dealt to its
    frames in centre order, ``keep - dynamic[f]`` each); each frame keeps the ``dynamic[f]`` dynamic
    tokens of highest score. A frame's outputs: static (by centre position), then its own (by
    position): the official LLaVA-OneVision order.
    """
    frames, n = scores.shape
    device = scores.device
    keep = (sum(static_count) + sum(dynamic)) // frames
    dynamic_mask = torch.ones(frames, n, dtype=torch.bool, device=device)
    for (s, e), mask in zip(segments, masks):
        dynamic_mask[s : e + 1] = ~mask
    # Attention-chosen tokens of every frame at once: the best ``dynamic[f]`` of its dynamic positions.
    chosen_count = torch.tensor(dynamic, dtype=torch.long, device=device)
    masked = torch.where(dynamic_mask, scores.float(), torch.tensor(float("-inf"), device=device))
    order = masked.argsort(dim=-1, descending=True, stable=True)
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(n, device=device).expand(frames, -1))
    chosen = (rank < chosen_count[:, None]) & dynamic_mask

    parts: dict[str, list[torch.Tensor]] = {key: [] for key in ("row", "column", "frame", "position", "weight")}
    kept_rows: list[list[torch.Tensor]] = [[] for _ in range(frames)]
    filled = [0] * frames

    def emit(row: int, representatives, output, frame, position, weight):
        parts["row"].append(torch.full_like(output, row))
        parts["column"].append(output + filled[row])
        parts["frame"].append(frame)
        parts["position"].append(position)
        parts["weight"].append(weight.float())
        kept_rows[row].append(representatives)
        filled[row] += len(representatives)

    for (s, e), mask, count in zip(segments, masks, static_count):
        w = e - s + 1
        if count:
            positions = mask.nonzero()[:, 0]
            means = directions[s : e + 1, positions].detach().float().mean(dim=0)
            centres, assignment, weight = cluster_weights(means, count, knn, beta)
            representatives = positions[centres]
            frame = torch.arange(s, e + 1, device=device).repeat_interleave(len(positions))
            position, output = positions.repeat(w), assignment.repeat(w)
            weight = (weight / w).repeat(w)
            shares = [(s, count)] if not per_frame else [(f, keep - dynamic[f]) for f in range(s, e + 1)]
            begin = 0
            for row, share in shares:
                if share:
                    take = (output >= begin) & (output < begin + share)
                    emit(row, representatives[begin : begin + share], output[take] - begin,
                         frame[take], position[take], weight[take])
                    begin += share
        for f in range(s, e + 1):
            picked = chosen[f].nonzero()[:, 0]
            if len(picked):
                emit(f, picked, torch.arange(len(picked), device=device), torch.full_like(picked, f), picked,
                     torch.ones(len(picked), device=device))

    kept = torch.zeros(frames, max(filled), dtype=torch.long, device=device)
    for f, pieces in enumerate(kept_rows):
        if pieces:
            row = torch.cat(pieces)
            kept[f, : len(row)] = row
    flat = {
        key: torch.cat(values) if values else torch.zeros(0, dtype=torch.float if key == "weight" else torch.long,
                                                          device=device)
        for key, values in parts.items()
    }
    return MergePlan(
        segments, torch.tensor(filled, dtype=torch.long, device=device), kept,
        flat["row"], flat["column"], flat["frame"], flat["position"], flat["weight"],
    )


@dataclass
class HoliTomMerge(VisionStage):
    """HoliTom's outer-LLM stage on each item's frames (``holitom_merge``): temporal segments, static
    tokens averaged over their segment, then attention and DPC-kNN spatial merging.

    The runtime stacks the views of an item's ``frames`` frames (item-major), so the stage looks
    across them. Similarities and merges are measured in the language model's space (``view.project``,
    as the official code merges the pooled projector outputs); the merged tokens are returned there
    (``VisionReduction.projected``) and, with the same weights, before the projector (``features``).
    Scores are ``view.cls_attention`` (attention received, the official SigLIP score; CLS attention
    on CLIP towers). Where the item's slots hold each frame's CLS token (Video-LLaVA) CLS is one of
    the frame's tokens and ranks first among its dynamic tokens; elsewhere it is not a token.

    ``per_frame``: every frame gets the same count (the runtime's rule without
    ``VisionReduction.counts``); otherwise frames get HoliTom's own counts (``counts``).
    """

    frames: int = 1
    cls_token: bool = False
    tau: float = TAU
    beta: float = BETA
    knn: int = KNN
    max_window: int = MAX_WINDOW
    per_frame: bool = True

    def reduce(self, view: VisionView, keep: int) -> VisionReduction:
        stacked = view.features.shape[0]
        if stacked % self.frames:
            raise RuntimeError(f"{stacked} stacked units are not items of {self.frames} frames")
        offset = int(view.has_cls and not self.cls_token)
        tokens = view.features[:, offset:]
        scores = view.cls_attention.float()
        if view.has_cls and self.cls_token:
            scores = torch.cat([torch.full_like(scores[:, :1], float("inf")), scores], dim=1)
        if scores.shape != tokens.shape[:2]:
            raise RuntimeError(f"scores {tuple(scores.shape)} do not match the tokens {tuple(tokens.shape[:2])}")
        merging = self.frames > 1  # a lone frame (an image) is only ranked, never merged
        directions = view.project(tokens) if merging and view.project is not None else tokens
        plans = []
        for first in range(0, stacked, self.frames):
            rows = slice(first, first + self.frames)
            plans.append(holitom_merge(
                directions[rows], scores[rows], keep * self.frames, self.tau, self.beta, self.knn, self.max_window,
                self.per_frame,
            ))
        width = keep if self.per_frame else max(int(plan.counts.max()) for plan in plans)
        features = torch.cat([plan.apply(tokens[i * self.frames : (i + 1) * self.frames], width)
                              for i, plan in enumerate(plans)])
        kept = torch.zeros(stacked, width, dtype=torch.long, device=tokens.device)
        for i, plan in enumerate(plans):
            kept[i * self.frames : (i + 1) * self.frames, : plan.kept.shape[1]] = plan.kept
        reduction = VisionReduction(features, kept + offset)
        if merging and view.project is not None:
            reduction.projected = torch.cat([plan.apply(directions[i * self.frames : (i + 1) * self.frames], width)
                                             for i, plan in enumerate(plans)])
        if not self.per_frame:
            reduction.counts = torch.cat([plan.counts for plan in plans])
        return reduction


# ----------------------------------------------------------------------------- inner-LLM merging
def merge_into_kept(hidden: torch.Tensor, scores: torch.Tensor, keep: int) -> tuple[torch.Tensor, torch.Tensor]:
    """HoliTom's inner-LLM merge: the ``keep`` highest-scoring tokens stay; every other token is merged
    into the kept token whose state is most cosine-similar, as the official loop does it: visiting the
    merged tokens in ascending order, ``kept = (kept + token) / 2`` each time (so a kept token with
    members ``a_1 < ... < a_m`` ends as ``kept / 2^m + sum_j a_j / 2^(m - j + 1)``). Similarities are
    taken before any merge, as in the official code. Ties in score go to the lower index.

    Args:
        hidden: ``(..., n, D)`` states; scores: ``(..., n)``.

    Returns:
        ``(index (..., keep) ascending, merged (..., keep, D))``; vectorised (a sort and one
        ``index_add``), ``O(n keep D)`` for the similarities.

    >>> states = torch.tensor([[1.0, 0.0], [1.0, 0.2], [0.0, 1.0]])
    >>> index, merged = merge_into_kept(states, torch.tensor([3.0, 1.0, 2.0]), 2)
    >>> index.tolist(), merged.tolist()
    ([0, 2], [[1.0, 0.10000000149011612], [0.0, 1.0]])
    """
    *lead, n, width = hidden.shape
    if not 0 <= keep <= n:
        raise ValueError(f"cannot keep {keep} of {n} tokens")
    states = hidden.reshape(-1, n, width).float()
    groups = states.shape[0]
    order = scores.reshape(-1, n).float().argsort(dim=-1, descending=True, stable=True)
    kept = order[:, :keep].sort(dim=-1).values
    rest = order[:, keep:].sort(dim=-1).values
    kept_states = states.gather(1, kept[..., None].expand(-1, -1, width))
    if keep == 0 or keep == n:
        return kept.view(*lead, keep), kept_states.view(*lead, keep, width).to(hidden.dtype)
    rest_states = states.gather(1, rest[..., None].expand(-1, -1, width))
    similarity = F.normalize(rest_states.detach(), dim=-1) @ F.normalize(kept_states.detach(), dim=-1).transpose(1, 2)
    target = (similarity.argmax(dim=-1) + torch.arange(groups, device=hidden.device)[:, None] * keep).reshape(-1)
    sizes = torch.bincount(target, minlength=groups * keep)
    # Members of a kept token after this one (rest is ascending, the stable sort keeps that order).
    by_target = target.argsort(stable=True)
    place = torch.empty_like(target)
    place[by_target] = torch.arange(len(target), device=target.device) - (sizes.cumsum(0) - sizes)[target[by_target]]
    later = sizes[target] - 1 - place
    merged = kept_states.reshape(-1, width) * torch.pow(0.5, sizes.float())[:, None]
    merged = merged.index_add(0, target, rest_states.reshape(-1, width) * torch.pow(0.5, later.float() + 1)[:, None])
    return kept.view(*lead, keep), merged.view(*lead, keep, width).to(hidden.dtype)


@dataclass
class SimilarityMerge(LanguageStage):
    """HoliTom's inner-LLM stage: FastV's score (the last prompt token's attention in the layer
    before the boundary, mean over heads, on that layer's own input), the best ``keep`` stay and
    every other visual token of the item is merged into its most similar kept token
    (``merge_into_kept``) on the states entering the boundary layer; only the ``query x keys`` block
    of attention is formed, so the model keeps its attention backend."""

    def score(self, view: LayerView) -> torch.Tensor:
        return LastTokenAttention().score(view)

    def select(self, view: LayerView, keep: int) -> Selection:
        index, merged = merge_into_kept(gather_tokens(view.hidden_states, view.visual_index), self.score(view), keep)
        return Selection(index, merged)


# ----------------------------------------------------------------------------- the method
def _number(name: str, value, low: float, high: float, integer: bool = False) -> None:
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds) or not low <= value <= high:
        kind = "an int" if integer else "a number"
        raise ValueError(f"{name} must be {kind} in [{low}, {high}], got {value!r}")


@register_method("holitom")
@dataclass
class HoliTom(Reducer):
    """HoliTom (Shao et al., NeurIPS 2025, arXiv 2505.21334): "Holistic Token Merging for Fast Video
    Large Language Models". Official code ``cokeshao/HoliTom`` at ``e9b2972`` (``holitom/llava_arch.py``:
    the outer-LLM merge; ``holitom/modeling_qwen2.py``: the inner-LLM merge; ``scripts/``: settings).

    **Outer LLM** (``HoliTomMerge``, ``holitom_merge``): each video's frames are segmented by a dynamic
    program maximising the tokens temporal merging saves (a token is static in a segment when its
    cosine similarity to the same position of the previous frame stays above ``tau`` through it);
    static tokens are averaged over their segment (the merged token goes to the segment's first
    frame, "its first occurrence"); the ratio of tokens kept is then raised to what remains, and
    static tokens are merged by DPC-kNN clustering (a centre weighs ``beta`` against its members'
    mean), each frame's dynamic tokens chosen by the attention they receive. **Inner LLM**
    (``SimilarityMerge``): after ``layer`` decoder layers, half (``merge_ratio``) of each item's
    visual tokens, the ones the last prompt token attended to least in the layer before, are merged
    into their most similar kept token (pairwise averaging, in token order).

    Budget: ``budget`` is the layer average per item. The LLM-input count ``n`` (a whole number of
    frames) is solved so that ``(layer * n + (L - layer) * round(n * (1 - merge_ratio))) / L`` is
    closest to it; on LLaVA-1.5 (576 tokens, 32 layers, layer 21): 192 -> 232 tokens then 116
    (average 192.1), 128 -> 154 then 77 (127.5), 64 -> 77 then 38 (63.6).

    Args:
        budget: average visual tokens per decoder layer per image or video.
        retain_ratio: the official ``RETAIN_RATIO``: the fraction of each item's tokens entering the
            language model (per frame, rounded); overrides the solver.
        tau: the official ``T``, the similarity above which a token is static; ``None``: 0.80 (the
            scripts at ``RETAIN_RATIO`` 0.15-0.25), 0.65 when less than 12.5% of the tokens enter the
            language model (the scripts use 0.65 at 0.10; the switch is halfway to 0.15).
        beta: the official ``BETA`` (0.6): a cluster centre's weight against its members' mean.
        knn: the official ``K`` (7): DPC-kNN density neighbours (at most the cluster count).
        max_window: the official ``MAX_WINDOW_SIZE`` (1024): longest segment, in frames.
        layer: the official ``HOLITOM_k``: decoder layers before the inner merge; ``None``: 18 of 28
            (LLaVA-OneVision-7B) scaled to the depth, ``round(18 L / 28)`` (21 of 32, 4 of 6).
        merge_ratio: the official ``HOLITOM_r`` (0.5): the share of the visual tokens merged there;
            0 is "HoliTom (w/o M)", the outer merge alone.
        allocation: ``"video"``: HoliTom's own counts, which differ between frames (the budget is
            spread over the whole video, what makes the method holistic); it needs a runtime whose
            vision stages may return per-frame counts (``VisionReduction.counts``). ``"frame"``: the
            same count in every frame (the budget is spread per segment; a window is a segment only
            if its remaining tokens fill its frames, and its static tokens are dealt to its frames).
            ``None``: ``"video"`` where the runtime supports it, else ``"frame"``.
        positions: ``None``: contiguous on 1-D RoPE (the official LLaVA code renumbers the shortened
            input; after the inner merge it keeps the gaps, which the runtime does not offer next to
            renumbering), original under M-RoPE.

    Choices where paper and code are silent or disagree:

    - Families: the official code runs LLaVA-OneVision and LLaVA-Video (SigLIP, pooled frames). Here
      every family: Video-LLaVA frames (CLIP, CLS attention as the score, each frame's CLS one of its
      tokens, ranked first), Qwen2/2.5-VL videos (one frame per temporal slice of merged tokens,
      attention received; merged tokens take their centre's slot and so its M-RoPE position: the
      first frame of their segment, "first occurrence"). Qwen3-VL makes every temporal slice an item
      of its own, so there HoliTom cannot look across frames: each slice gets the one-frame rule.
    - Images: an image is a one-frame video, the official code's lone-frame path (the attention
      ranking, no temporal merge) followed by the inner merge; the official code leaves images to
      the inner merge alone, which the shared budget meaning cannot express for a vision method.
    - Exact counts: the official per-group rounding (``ceil`` per frame) overshoots its retain ratio
      (by 19-25% in the recorded cases) and is corrected by ``exact_counts``; when temporal merging
      leaves fewer tokens than the budget the least useful segments are split (``split_until``)
      where the official code would hand the LLM fewer tokens.
    - Merging space: similarities, DPC-kNN and averages in the language model's space (after the
      projector), as the official code computes on the pooled projector outputs; Video-LLaVA's
      merged tokens are projected first, then averaged.
    - Not offered: the official ``D`` (a share of each frame's dynamic tokens merged by DPC-kNN
      instead of chosen by attention) is 0 in every script, and any ``D > 0`` raises at ``e9b2972``
      (``merge_tokens_by_attention_density`` broadcasts the position mask); ``NO_BETA`` (plain
      cluster means) is off by default and not offered either.
    - Ties: DPC-kNN and attention ties go to the lower index (official: random noise / ``topk``).
    - Batches: every item (row) is merged on its own; the official inner merge reads the first
      row's first image only (batch size 1).
    - Inner merge in float32 (official: the model dtype, one pair at a time).
    """

    budget: int | None = None
    retain_ratio: float | None = None
    tau: float | None = None
    beta: float = BETA
    knn: int = KNN
    max_window: int = MAX_WINDOW
    layer: int | None = None
    merge_ratio: float = MERGE_RATIO
    allocation: str | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        check_budget(self.budget, required=False)
        if self.retain_ratio is not None:
            _number("retain_ratio", self.retain_ratio, 0, 1)
            if self.retain_ratio == 0:
                raise ValueError("retain_ratio must be > 0 (the fraction of each item's tokens entering the LLM)")
        if self.tau is not None:
            _number("tau", self.tau, -1, 1)
        _number("beta", self.beta, 0, 1)
        _number("knn", self.knn, 1, math.inf, integer=True)
        _number("max_window", self.max_window, 1, math.inf, integer=True)
        _number("merge_ratio", self.merge_ratio, 0, 1)
        if self.merge_ratio == 1:
            raise ValueError("merge_ratio must be < 1 (the share of the visual tokens merged inside the LLM)")
        if self.layer is not None:
            _number("layer", self.layer, 1, math.inf, integer=True)
        if self.allocation not in (None, *ALLOCATIONS):
            raise ValueError(f"allocation must be 'video', 'frame' or None, got {self.allocation!r}")
        if self.allocation == "video" and not runtime_takes_counts():
            raise ValueError(
                "allocation='video' gives frames different token counts, which this duet-vlm's runtime does not "
                "accept (no VisionReduction.counts); use allocation='frame' (the same count in every frame)"
            )

    def resolved_allocation(self) -> str:
        return self.allocation or ("video" if runtime_takes_counts() else "frame")

    def merge_layer(self, geometry: Geometry) -> int:
        layers = geometry.num_layers
        layer = self.layer
        if layer is None:
            layer = min(layers - 1, max(1, round(REFERENCE_LAYER[0] * layers / REFERENCE_LAYER[1])))
        if not 0 < layer < layers:
            raise ValueError(f"layer={layer} but the language model has {layers} layers (merge after 1..{layers - 1})")
        return layer

    def schedule_for(self, geometry: Geometry, llm_input: int) -> Schedule:
        if not self.merge_ratio:
            return Schedule(geometry.num_layers, geometry.visual_tokens, llm_input)
        kept = round(llm_input * (1 - self.merge_ratio))  # the official round(n * (1 - r))
        return Schedule(geometry.num_layers, geometry.visual_tokens, llm_input, ((self.merge_layer(geometry), kept),))

    def language_stage(self) -> SimilarityMerge:
        return SimilarityMerge()

    def vision_stage_for(self, geometry: Geometry, keep: int) -> HoliTomMerge:
        tau = self.tau
        if tau is None:  # by the share of the frames' tokens entering the LLM, the official RETAIN_RATIO
            tau = TAU_LOW if keep < LOW_RETAIN * geometry.units * geometry.unit_tokens else TAU
        return HoliTomMerge(
            frames=geometry.units,
            cls_token=geometry.has_cls and geometry.unit_tokens == geometry.patches + 1,
            tau=tau, beta=self.beta, knn=self.knn,
            max_window=self.max_window, per_frame=self.resolved_allocation() == "frame",
        )

    def plan(self, geometry: Geometry) -> Plan:
        units = geometry.units
        if self.retain_ratio is not None:
            llm_input = min(round(self.retain_ratio * geometry.unit_tokens), geometry.unit_tokens) * units
            schedule = self.schedule_for(geometry, llm_input)
            language = self.language_stage() if schedule.boundaries else None
            return Plan(schedule, self.vision_stage_for(geometry, llm_input), language)
        if self.budget is None:
            raise ValueError("HoliTom needs a budget (or retain_ratio)")
        if not self.merge_ratio:
            keep = self.budget // units * units
            schedule = Schedule(geometry.num_layers, geometry.visual_tokens, keep)
            return Plan(schedule, self.vision_stage_for(geometry, keep))
        layer = self.merge_layer(geometry)
        try:
            return compose_plan(self, self, self.budget, geometry)
        except ValueError as error:
            raise ValueError(
                f"HoliTom cannot average {self.budget} visual tokens per layer on this item: merging "
                f"{self.merge_ratio:g} of them after layer {layer} of {geometry.num_layers} caps the average below "
                f"{self.schedule_for(geometry, geometry.visual_tokens).average:.1f} of its {geometry.visual_tokens}; "
                "use a smaller budget, merge_ratio=0 (HoliTom w/o M) or a later layer"
            ) from error
