"""Properties of HoliTom's merge algebra (``duet_vlm.video_merge``), each one a promise of the algebra
that a plausible slip would break: segments partition the frames and respect the windows allowed,
undoing temporal merges stops as soon as the budget fits, counts meet the budget within each group's
tokens, every output is a weighted mean of its sources (a constant video stays constant), the
dynamic tokens kept are the best-scored ones, and the inner merge keeps the mean. The replay of the
official code's outputs and the naive references are in tests/test_holitom.py."""

from __future__ import annotations

import doctest
import itertools

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from duet_vlm import video_merge
from duet_vlm.video_merge import (
    cluster_weights,
    exact_counts,
    frame_similarity,
    holitom_merge,
    merge_into_kept,
    segment_frames,
    split_until,
    static_masks,
    static_runs,
    temporal_segments,
    token_counts,
    window_savings,
)


@st.composite
def videos(draw, max_frames=7, max_tokens=10):
    """``(F, N, C)`` frames in scenes: a base per scene, some positions redrawn every frame, noise."""
    frames, n, channels = draw(st.integers(1, max_frames)), draw(st.integers(1, max_tokens)), draw(st.integers(2, 5))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    cuts = sorted(draw(st.sets(st.integers(1, max(1, frames - 1)), max_size=2)) - {frames})
    moving, noise = draw(st.integers(0, n)), draw(st.sampled_from([0.0, 0.02, 0.2]))
    x = torch.empty(frames, n, channels)
    for start, end in zip([0, *cuts], [*cuts, frames]):
        base = torch.randn(n, channels, generator=g)
        for f in range(start, end):
            x[f] = base + noise * torch.randn(n, channels, generator=g)
            x[f, :moving] = torch.randn(moving, channels, generator=g)
    return x[:, torch.randperm(n, generator=g)], torch.rand(frames, n, generator=g)


def _is_partition(segments, frames):
    return [s for s, _ in segments] == [0] + [e + 1 for _, e in segments[:-1]] and segments[-1][1] == frames - 1 and all(
        s <= e for s, e in segments)


# ----------------------------------------------------------------------------- temporal segmentation
@settings(max_examples=80, deadline=None)
@given(st.integers(0, 2**16), st.integers(1, 6), st.integers(1, 5), st.sampled_from([0.25, 0.5, 0.75]))
def test_static_runs_count_the_similar_transitions_that_follow(seed, transitions, n, tau):
    """``runs[f, p]``: the transitions from frame ``f`` on that stay above ``tau`` without a break
    (ties with ``tau`` are not above it); the last frame has none."""
    g = torch.Generator().manual_seed(seed)
    similarity = torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0])[torch.randint(0, 5, (transitions, n), generator=g)]
    runs = static_runs(similarity, tau)
    assert runs.shape == (transitions + 1, n)
    for f, p in itertools.product(range(transitions + 1), range(n)):
        length = 0
        while f + length < transitions and similarity[f + length, p] > tau:
            length += 1
        assert runs[f, p] == length


@settings(max_examples=60, deadline=None)
@given(videos())
def test_frame_similarity_is_a_cosine_per_position(video):
    x, _ = video
    similarity = frame_similarity(x)
    assert similarity.shape == (x.shape[0] - 1, x.shape[1])
    lengths = torch.rand(x.shape[0], x.shape[1], 1, generator=torch.Generator().manual_seed(0)) + 0.5
    scaled = x * lengths  # a positive length per token changes no angle
    torch.testing.assert_close(frame_similarity(scaled), similarity, atol=1e-5, rtol=0)
    assert bool((similarity.abs() <= 1 + 1e-6).all())


@settings(max_examples=80, deadline=None)
@given(st.integers(0, 2**16), st.integers(1, 7), st.integers(1, 6), st.integers(1, 8))
def test_segments_partition_the_frames_within_the_allowed_windows(seed, frames, n, max_window):
    """Consecutive segments covering every frame once, none longer than ``max_window``, none of
    several frames where ``allowed`` excludes it, and none better: the best summed saving over every
    partition into allowed windows."""
    g = torch.Generator().manual_seed(seed)
    savings = torch.randint(0, 3 * n, (frames, frames), generator=g).triu(1)
    allowed = torch.rand(frames, frames, generator=g) < 0.6
    segments = segment_frames(savings, max_window, allowed)
    assert _is_partition(segments, frames)
    assert all(e - s + 1 <= max_window and (e == s or bool(allowed[s, e])) for s, e in segments)
    best = 0
    for cuts in itertools.product([False, True], repeat=frames - 1):
        bounds = [0] + [i + 1 for i, c in enumerate(cuts) if c] + [frames]
        windows = list(zip(bounds[:-1], [b - 1 for b in bounds[1:]]))
        if all(e - s + 1 <= max_window and (e == s or bool(allowed[s, e])) for s, e in windows):
            best = max(best, sum(int(savings[s, e]) for s, e in windows))
    assert sum(int(savings[s, e]) for s, e in segments) == best


@settings(max_examples=60, deadline=None)
@given(videos(), st.sampled_from([0.5, 0.8, 0.95]), st.floats(0.05, 1.0))
def test_window_savings_and_static_masks_follow_the_runs(video, tau, fraction):
    """A window keeps static what stays static in each of its frames; a segment's static positions
    are those similar through every transition of it; with ``keep``, each segment's remaining tokens
    fill its frames (``static * (w - 1) <= w * (N - keep)``)."""
    x, _ = video
    frames, n = x.shape[:2]
    keep = max(1, round(fraction * n))
    segments, runs, savings = temporal_segments(x, tau, keep=keep)
    assert _is_partition(segments, frames)
    static, saved = window_savings(runs)
    for s in range(frames):
        assert static[s, s] == n and all(static[s, e] >= static[s, e + 1] for e in range(s, frames - 1))
        assert [int(saved[s, e]) for e in range(frames)] == [int(static[s, e]) * max(0, e - s) for e in range(frames)]
    similar = frame_similarity(x) > tau if frames > 1 else None
    for (s, e), mask in zip(segments, static_masks(segments, runs)):
        expected = similar[s:e].all(dim=0) if e > s else torch.zeros(n, dtype=torch.bool)
        assert torch.equal(mask, expected)
        w = e - s + 1
        assert int(mask.sum()) * (w - 1) <= w * (n - keep)
        assert savings[s][e] == (int(mask.sum()) * (w - 1) if e > s else 0)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 4), st.integers(0, 9)), min_size=1, max_size=6), st.integers(0, 40))
def test_splitting_undoes_the_least_useful_merges_and_stops_once_the_budget_fits(groups, extra):
    """Segments split into lone frames, smallest saving first, until ``total`` tokens remain: the
    result refines the segments, keeps at least ``total`` tokens, splits nothing it did not need to
    (undoing the last split would leave fewer than ``total``) and no segment it kept saves less than
    one it split."""
    segments, savings, start = [], {}, 0
    for width, saving in groups:
        segments.append((start, start + width - 1))
        savings[segments[-1]] = saving * (width > 1)
        start += width
    frames, n = start, 10
    matrix = [[savings.get((s, e), 0) for e in range(frames)] for s in range(frames)]
    tokens = frames * n
    total = min(tokens - sum(savings.values()) + extra, tokens)  # around what the merges leave
    out = split_until(segments, matrix, tokens, total)
    assert _is_partition(out, frames)
    kept = [seg for seg in segments if seg in out]
    split = [seg for seg in segments if seg not in out]
    assert all((f, f) in out for s, e in split for f in range(s, e + 1))  # split whole, into lone frames
    remaining = tokens - sum(matrix[s][e] for s, e in out)
    assert remaining >= total
    if split:
        largest = max(savings[seg] for seg in split)
        assert remaining - largest < total
        assert all(savings[seg] >= largest for seg in kept if seg[1] > seg[0])


# ----------------------------------------------------------------------------- counts
@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 20), st.floats(0, 1)), min_size=1, max_size=10), st.integers(0, 200))
def test_exact_counts_move_the_groups_rounded_furthest_the_wrong_way(groups, total):
    """Raising a sum: the groups raised lay furthest below their quota; lowering: furthest above."""
    sizes = [size for size, _ in groups]
    total %= sum(sizes) + 1
    quotas = [size * share for size, share in groups]
    official = [round(q) for q in quotas]
    counts = exact_counts(official, quotas, sizes, total)
    assert sum(counts) == total and all(0 <= c <= size for c, size in zip(counts, sizes))
    moved = [g for g in range(len(sizes)) if counts[g] != official[g]]
    step = 1 if total > sum(official) else -1
    stayed = [g for g in range(len(sizes)) if counts[g] == official[g]
              and (official[g] < sizes[g] if step > 0 else official[g] > 0)]
    if sum(abs(c - o) for c, o in zip(counts, official)) == len(moved) and moved:  # one pass, one token each
        worst = max(step * (official[g] - quotas[g]) for g in moved)
        assert all(step * (official[g] - quotas[g]) >= worst for g in stayed)


@settings(max_examples=80, deadline=None)
@given(videos(), st.sampled_from([0.5, 0.8]), st.floats(0.05, 1.0), st.booleans())
def test_counts_meet_the_budget_within_each_groups_tokens(video, tau, fraction, per_frame):
    """Static tokens per segment and dynamic tokens per frame sum to ``total``; a segment keeps at most
    its static positions (none for a lone frame), a frame at most its dynamic ones; ``per_frame``:
    each segment's static tokens and its frames' dynamic ones make ``keep`` per frame."""
    x, _ = video
    frames, n = x.shape[:2]
    keep = max(1, round(fraction * n))
    total = keep * frames if per_frame else max(1, round(fraction * frames * n))
    segments, runs, savings = temporal_segments(x, tau, keep=keep if per_frame else None)
    if not per_frame:
        segments = split_until(segments, savings, frames * n, total)
    n_static = [int(m.sum()) for m in static_masks(segments, runs)]
    static, dynamic = token_counts(segments, n_static, n, total, savings, per_frame)
    assert sum(static) + sum(dynamic) == total and len(dynamic) == frames
    for (s, e), c, count in zip(segments, n_static, static):
        assert 0 <= count <= c and (e > s or count == 0)
        assert all(0 <= d <= n - c for d in dynamic[s : e + 1])
        if per_frame:
            assert count + sum(dynamic[s : e + 1]) == keep * (e - s + 1)
            assert all(d <= keep for d in dynamic[s : e + 1])


# ----------------------------------------------------------------------------- spatial merging
@settings(max_examples=60, deadline=None)
@given(st.integers(0, 2**16), st.integers(1, 12), st.integers(1, 9), st.sampled_from([0.0, 0.6, 1.0]))
def test_a_cluster_is_a_weighted_mean_around_its_centre(seed, m, knn, beta):
    """Each cluster's weights sum to 1; its centre belongs to it and weighs ``beta`` (1 alone), its
    other members share the rest equally."""
    x = torch.randn(m, 3, generator=torch.Generator().manual_seed(seed))
    clusters = 1 + seed % m
    centres, assignment, weight = cluster_weights(x, clusters, knn, beta)
    assert centres.tolist() == sorted(set(centres.tolist())) and len(centres) == clusters
    assert assignment[centres].tolist() == list(range(clusters))
    torch.testing.assert_close(torch.zeros(clusters).index_add(0, assignment, weight), torch.ones(clusters))
    for k in range(clusters):
        members = (assignment == k).nonzero()[:, 0]
        others = [i for i in members.tolist() if i != int(centres[k])]
        assert float(weight[centres[k]]) == float(torch.tensor(beta if others else 1.0))
        assert len({float(weight[i]) for i in others}) <= 1


@settings(max_examples=60, deadline=None)
@given(videos(), st.sampled_from([0.5, 0.8]), st.floats(0.05, 1.0), st.booleans())
def test_every_output_is_a_weighted_mean_standing_for_one_of_its_sources(video, tau, fraction, per_frame):
    """A constant video merges to that constant in every output (weights sum to 1) and to zeros past
    each frame's count; the plan is linear in the values it is applied to; each output's position
    (``kept``) is one of its own sources in its segment; a frame's own tokens are its best-scored
    dynamic ones."""
    x, scores = video
    frames, n, channels = x.shape
    keep = max(1, round(fraction * n))
    total = keep * frames if per_frame else max(1, round(fraction * frames * n))
    plan = holitom_merge(x, scores, total, tau=tau, per_frame=per_frame)
    width = plan.kept.shape[1] + 1
    constant = torch.tensor([0.5, -2.0]).repeat(channels // 2 + 1)[:channels]
    merged = plan.apply(constant.expand(frames, n, channels), width)
    filled = torch.arange(width)[None, :] < plan.counts[:, None]
    torch.testing.assert_close(merged[filled], constant.expand(int(filled.sum()), -1), atol=1e-5, rtol=0)
    assert not merged[~filled].any()
    y = torch.randn(frames, n, channels, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(plan.apply(2 * x - y), 2 * plan.apply(x) - plan.apply(y), atol=1e-4, rtol=1e-4)
    masks = dict(zip(plan.segments, static_masks(plan.segments, temporal_segments(x, tau)[1])))
    for f in range(frames):
        for j in range(int(plan.counts[f])):
            mine = (plan.row == f) & (plan.column == j)
            assert int(plan.kept[f, j]) in plan.position[mine].tolist()
            segment = next((s, e) for s, e in plan.segments if s <= f <= e)
            assert bool(((plan.frame[mine] >= segment[0]) & (plan.frame[mine] <= segment[1])).all())
    # A frame's own tokens: single sources of weight 1 in their frame, the best of its dynamic positions.
    single = torch.bincount(plan.row * width + plan.column, minlength=frames * width)[plan.row * width + plan.column] == 1
    own = single & (plan.frame == plan.row) & (plan.weight == 1)
    for f in range(frames):
        segment = next((s, e) for s, e in plan.segments if s <= f <= e)
        dynamic = ~masks[segment]
        chosen = plan.position[own & (plan.row == f)]
        rest = dynamic.clone()
        rest[chosen] = False
        if len(chosen) and rest.any():
            assert float(scores[f, chosen].min()) >= float(scores[f, rest].max())


# ----------------------------------------------------------------------------- inner-LLM merging
@settings(max_examples=80, deadline=None)
@given(st.integers(0, 2**16), st.integers(1, 20), st.integers(1, 5), st.floats(0, 1))
def test_the_inner_merge_keeps_the_best_and_their_mean(seed, n, width, fraction):
    """The ``keep`` best-scored tokens stay (ascending; ties: the lower index); a kept token's output weighs it and the tokens
    merged into it by weights summing to 1, so identical states stay as they are, and scaling the
    states scales the output."""
    g = torch.Generator().manual_seed(seed)
    hidden, scores = torch.randn(2, n, width, generator=g), torch.randint(0, 4, (2, n), generator=g).float()  # ties
    keep = round(n * fraction)
    index, merged = merge_into_kept(hidden, scores, keep)
    for row in range(2):
        best = sorted(range(n), key=lambda i: (-float(scores[row, i]), i))[:keep]
        assert index[row].tolist() == sorted(best)
    constant = torch.randn(width, generator=g).expand(2, n, width)
    _, same = merge_into_kept(constant, scores, keep)
    torch.testing.assert_close(same, constant[:, :keep], atol=1e-6, rtol=0)
    _, scaled = merge_into_kept(3 * hidden, scores, keep)
    torch.testing.assert_close(scaled, 3 * merged, atol=1e-5, rtol=1e-5)
    if keep == n:
        assert torch.equal(merged, hidden)


def test_doctests():
    result = doctest.testmod(video_merge)
    assert result.failed == 0 and result.attempted > 10
