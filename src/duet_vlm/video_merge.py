"""HoliTom's merge algebra (Shao et al., NeurIPS 2025; official code ``cokeshao/HoliTom`` ``e9b2972``):
pure functions of tensors and counts that know nothing of models, hooks or plans.

Outside the language model a video's frames are cut into temporal segments by a dynamic program
that maximises the tokens temporal merging saves (``frame_similarity`` -> ``static_runs`` ->
``window_savings`` -> ``segment_frames``), each segment's static tokens are averaged over its frames
and clustered (``cluster_weights``), each frame keeps its best dynamic tokens, and the counts meet
the budget exactly (``token_counts``, ``exact_counts``, ``split_until``); ``holitom_merge`` composes
them into a ``MergePlan``: every output a weighted sum of the item's tokens. Inside the language model
``merge_into_kept`` averages each dropped token into its most similar kept one.

>>> video = torch.ones(4, 3, 2)                      # 4 identical frames of 3 tokens
>>> plan = holitom_merge(video, torch.rand(4, 3), 3)
>>> plan.segments, plan.counts.tolist(), plan.apply(video)[0].tolist()
([(0, 3)], [3, 0, 0, 0], [[1.0, 1.0], [1.0, 1.0], [1.0, 1.0]])

The methods layer (``duet_vlm.methods.holitom``) turns them into HoliTom's stages; they are tested
against the official code's recorded outputs (tests/test_holitom.py) and by their properties
(tests/test_video_merge.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .selection import density_peaks_clusters

# The official defaults (scripts/eval_ov-7b_holitom.sh, holitom/llava_arch.py environment defaults).
TAU = 0.80  # T: the similarity above which a token is static (RETAIN_RATIO 0.15, 0.20, 0.25)
BETA = 0.6  # BETA: a cluster centre's weight against the mean of its members
KNN = 7  # K: neighbours of the DPC-kNN density (at most the cluster count)
MAX_WINDOW = 1024  # MAX_WINDOW_SIZE: longest segment in frames


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
    its budget, so the least useful temporal merges are undone instead.

    >>> savings = [[0, 2, 0, 0], [0, 0, 0, 0], [0, 0, 0, 3], [0, 0, 0, 0]]   # 8 tokens, 5 saved
    >>> split_until([(0, 1), (2, 3)], savings, 8, 5)                          # 3 left: undo the 2
    [(0, 0), (1, 1), (2, 3)]
    """
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

    >>> centres, assignment, weight = cluster_weights(torch.tensor([[0.0], [0.1], [5.0], [5.2], [5.1]]), 2, 7, 0.6)
    >>> centres.tolist(), assignment.tolist(), [round(w, 2) for w in weight.tolist()]
    ([0, 2], [0, 0, 1, 1, 1], [0.6, 0.4, 0.6, 0.2, 0.2])
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
        then cast back; rows past a frame's count are zero.

        >>> one, two = torch.tensor([0, 0]), torch.tensor([0, 1])   # both frames' token 0, averaged
        >>> MergePlan([(0, 1)], torch.tensor([1, 0]), torch.zeros(2, 1, dtype=torch.long), one, one, two, one,
        ...           torch.tensor([0.5, 0.5])).apply(torch.tensor([[[2.0]], [[4.0]]])).tolist()
        [[[3.0]], [[0.0]]]
        """
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
    the tokens it leaves can fill its frames: ``static * (w - 1) <= w * (N - keep)``.

    >>> video = torch.tensor([[[1.0, 0.0], [0.0, 1.0]], [[1.0, 0.0], [1.0, 1.0]], [[1.0, 0.0], [-1.0, 0.0]]])
    >>> temporal_segments(video)       # token 0 stays, token 1 turns: one segment saving 2 tokens
    ([(0, 2)], tensor([[2, 0],
            [1, 0],
            [0, 0]]), [[0, 1, 2], [0, 0, 1], [0, 0, 0]])
    """
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
    """``(N,)`` per segment: the positions static through all its frames (none for a lone frame).

    >>> static_masks([(0, 2)], torch.tensor([[2, 0], [1, 0], [0, 0]]))[0].tolist()
    [True, False]
    """
    return [runs[s] >= e - s if e > s else torch.zeros_like(runs[s], dtype=torch.bool) for s, e in segments]


def official_counts(segments: list[tuple[int, int]], n_static: list[int], n: int, ratio: float):
    """The official counts at retain ratio ``ratio`` (already raised to what temporal merging left):
    ``round(n_static * ratio)`` static tokens per segment of several frames, ``ceil(n_dynamic *
    ratio)`` per frame. Returns ``(counts, quotas, sizes)`` per group, in order: each segment's static
    group (segments of several frames), then its frames.

    >>> official_counts([(0, 2)], [1], 2, 0.75)    # 1 static token, 1 dynamic in each of 3 frames
    ([1, 1, 1, 1], [0.75, 0.75, 0.75, 0.75], [1, 1, 1, 1])
    """
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
    frame, ``w * (keep - d)`` static tokens per segment).

    >>> token_counts([(0, 2)], [1], 2, 3, [[0, 1, 2], [0, 0, 1], [0, 0, 0]])   # the official 4, made 3
    ([0], [1, 1, 1])
    """
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
    return split_counts(segments, exact_counts(counts, quotas, sizes, total))


def split_counts(segments: list[tuple[int, int]], counts: list[int]) -> tuple[list[int], list[int]]:
    """``official_counts``' flat list (per segment: its static group when it spans several frames,
    then one group per frame) as ``(static tokens per segment, dynamic tokens per frame)``.

    >>> split_counts([(0, 1), (2, 2)], [5, 2, 3, 4])
    ([5, 0], [2, 3, 4])
    """
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

    >>> video = torch.tensor([[[1.0, 0.0], [0.0, 1.0]], [[1.0, 0.0], [1.0, 1.0]], [[1.0, 0.0], [-1.0, 0.0]]])
    >>> plan = holitom_merge(video, torch.rand(3, 2), 4)   # token 0 merged into frame 0, token 1 kept
    >>> plan.segments, plan.counts.tolist(), plan.kept.tolist()
    ([(0, 2)], [2, 1, 1], [[0, 1], [1, 0], [1, 0]])
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

    >>> video = torch.ones(3, 2, 1)
    >>> masks = [torch.tensor([True, False])]                 # token 0 static through frames 0..2
    >>> assemble(video, torch.rand(3, 2), [(0, 2)], masks, [1], [1, 1, 1]).kept.tolist()
    [[0, 1], [1, 0], [1, 0]]
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

