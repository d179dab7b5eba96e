"""HoliTom as the official code runs it (cokeshao/HoliTom e9b2972): the recorded outputs of its outer-LLM
functions and inner-LLM merge replayed, the segmentation, counts, clustering and merge rules against
naive references, the budget solver, and runs through the runtime (LLaVA-1.5 images, Video-LLaVA and
LLaVA-OneVision videos, the inner merge against the eager model's own attention)."""

import itertools
import json
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

import duet_vlm
from duet_vlm import Compose, Geometry, make
from duet_vlm.methods.holitom import (
    HoliTom,
    HoliTomMerge,
    SimilarityMerge,
    assemble,
    cluster_weights,
    exact_counts,
    frame_similarity,
    holitom_merge,
    merge_into_kept,
    official_counts,
    runtime_takes_counts,
    segment_frames,
    static_masks,
    static_runs,
    temporal_segments,
    token_counts,
    window_savings,
)
from duet_vlm.plan import VisionView
from duet_vlm.video_merge import split_counts

from models import FAMILIES, LAYERS, make_inputs, make_llava

LLAVA15 = Geometry(num_layers=32, visual_tokens=576, grid=(24, 24), has_cls=True)
VIDEO_LLAVA = Geometry(num_layers=32, visual_tokens=8 * 257, grid=(16, 16), has_cls=True, units=8, modality="video")
OV_VIDEO = Geometry(28, 32 * 196 + 1, (14, 14), False, units=32, modality="video", trailing=1)
VIDEO_MODE = runtime_takes_counts()


def _video(seed, frames, n, c, scenes=(0,), moving=2, noise=0.05):
    """Frames of ``n`` tokens: one base per scene, ``moving`` positions redrawn every frame, noise."""
    g = torch.Generator().manual_seed(seed)
    x = torch.empty(frames, n, c)
    bounds = [*scenes, frames]
    for s in range(len(scenes)):
        base = torch.randn(n, c, generator=g)
        moving_at = torch.randperm(n, generator=g)[:moving]
        for f in range(bounds[s], bounds[s + 1]):
            x[f] = base + noise * torch.randn(n, c, generator=g)
            x[f, moving_at] = torch.randn(len(moving_at), c, generator=g)
    return x, torch.rand(frames, n, generator=g)


# ----------------------------------------------------------------------------- official outputs
def _official(reference_dir, name):
    return json.loads((reference_dir / f"holitom-official-{name}.json").read_text()), load_file(
        reference_dir / f"holitom-official-{name}.safetensors"
    )


@pytest.mark.parametrize("case", ["a", "b", "c", "d", "e"])
def test_outer_merge_replays_the_official_functions(reference_dir, case):
    """Segments, tokens saved, the raised retain ratio, static positions, per-group counts, every
    output token (features within 1e-5, in the official order) and the position it stands for."""
    record, tensors = _official(reference_dir, f"outer-{case}")
    settings_ = record["settings"]
    features, attention = tensors["features"], tensors["attention"]
    frames, n = attention.shape
    if frames > 1:
        torch.testing.assert_close(frame_similarity(features), tensors["feature_sim"], atol=1e-6, rtol=0)
    segments, runs, savings = temporal_segments(features, settings_["tau"], settings_["max_window"])
    assert [list(s) for s in segments] == record["selected_frames"]
    reduced = sum(savings[s][e] for s, e in segments)
    assert reduced == record["total_reduced"]
    whole = frames * n
    ratio = min(settings_["retain_ratio"] / ((whole - reduced) / whole), 1)
    assert ratio == record["raised_retain_ratio"]
    masks = static_masks(segments, runs)
    official = record["segments"]
    assert [m.nonzero()[:, 0].tolist() for m in masks] == [s["static_positions_in_window"] for s in official]
    counts, _, _ = official_counts(segments, [int(m.sum()) for m in masks], n, ratio)
    static_count, dynamic = split_counts(segments, counts)
    assert static_count == [s["static_count"] for s in official]
    assert dynamic == [d for s in official for d in s["dynamic_counts"]]
    plan = assemble(features, attention, segments, masks, static_count, dynamic, settings_["beta"], settings_["K"])
    out = plan.apply(features)
    flat = torch.cat([out[f, : int(plan.counts[f])] for f in range(frames)])
    torch.testing.assert_close(flat, tensors["output"], atol=1e-5, rtol=0)
    for (s, e), seg in zip(segments, official):
        first = plan.kept[s, : int(plan.counts[s])].tolist()
        assert first[: seg["static_count"]] == seg["static_output_positions"]
        later = [plan.kept[f, : int(plan.counts[f])].tolist() for f in range(s + 1, e + 1)]
        assert [first[seg["static_count"] :]] + later == seg["dynamic_output_positions"]


@pytest.mark.parametrize("case", ["a", "b", "c"])
def test_inner_merge_replays_the_official_block(reference_dir, case):
    """The kept tokens and every merged state of the official in-LLM block (exact in float32)."""
    record, tensors = _official(reference_dir, f"inner-{case}")
    start, tokens = record["settings"]["image_start"], record["settings"]["image_tokens"]
    index, merged = merge_into_kept(tensors["hidden"][0, start : start + tokens], tensors["attention"], record["kept"])
    assert index.tolist() == record["kept_visual"]
    torch.testing.assert_close(merged, tensors["merged_visual"], atol=1e-6, rtol=0)


def test_official_counts_overshoot_and_are_made_exact(reference_dir):
    """The official per-group rounding hands the LLM more than its retain ratio (38 tokens for 0.25
    of 8 x 16 here); the exact counts differ from it on the fewest groups, one token each."""
    record, tensors = _official(reference_dir, "outer-a")
    features = tensors["features"]
    segments, runs, savings = temporal_segments(features, 0.8)
    masks = static_masks(segments, runs)
    n_static = [int(m.sum()) for m in masks]
    static_count, dynamic = token_counts(segments, n_static, 16, 32, savings)
    assert record["output_tokens"] == 38 and sum(static_count) + sum(dynamic) == 32
    segments_ = record["segments"]
    official = [s["static_count"] for s in segments_] + [d for s in segments_ for d in s["dynamic_counts"]]
    ours = static_count + dynamic
    assert sum(a != b for a, b in zip(official, ours)) == 38 - 32
    assert all(0 <= a - b <= 1 for a, b in zip(official, ours))


# ----------------------------------------------------------------------------- naive references
def _naive_gain(similarity, tau):
    """pruned_static_count by its definition: positions similar (> tau) through every transition of
    the window, times the frames the window saves."""
    frames, n = similarity.shape[0] + 1, similarity.shape[1]
    gain = [[0] * frames for _ in range(frames)]
    for s in range(frames):
        for e in range(s + 1, frames):
            static = sum(all(float(similarity[f, p]) > tau for f in range(s, e)) for p in range(n))
            gain[s][e] = static * (e - s)
    return gain


def _naive_segments(gain, max_window):
    """The official dynamic program, one candidate at a time."""
    frames = len(gain)
    dp, prev = [0] * frames, [0] * frames
    for i in range(frames):
        best, first = (dp[i - 1] if i > 0 else 0), i
        for size in range(2, min(i + 1, max_window) + 1):
            j = i - size
            value = (dp[j] if j >= 0 else 0) + gain[j + 1][i]
            if value > best:
                best, first = value, j + 1
        dp[i], prev[i] = best, first
    out, i = [], frames - 1
    while i >= 0:
        out.append((prev[i], i))
        i = prev[i] - 1
    return out[::-1], dp[-1]


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 2**16), st.integers(2, 7), st.integers(1, 9), st.sampled_from([0.5, 0.8, 0.95]),
       st.integers(2, 8))
def test_segmentation_matches_the_definition_and_is_optimal(seed, frames, n, tau, max_window):
    g = torch.Generator().manual_seed(seed)
    similarity = torch.rand(frames - 1, n, generator=g) * 0.6 + 0.4
    gain = _naive_gain(similarity, tau)
    static, savings = window_savings(static_runs(similarity, tau))
    assert savings.tolist() == gain
    segments = segment_frames(savings, max_window)
    naive, value = _naive_segments(gain, max_window)
    assert segments == naive
    # Optimal over every way of cutting the frames into windows of at most max_window.
    best = 0
    for cuts in itertools.product([False, True], repeat=frames - 1):
        bounds = [0] + [i + 1 for i, c in enumerate(cuts) if c] + [frames]
        windows = list(zip(bounds[:-1], [b - 1 for b in bounds[1:]]))
        if all(e - s + 1 <= max_window for s, e in windows):
            best = max(best, sum(gain[s][e] for s, e in windows))
    assert sum(gain[s][e] for s, e in segments) == value == best


def _naive_merge_into_kept(hidden, scores, keep):
    """The official loop: top-keep by score, each other token (ascending) averaged into its most
    cosine-similar kept token, the similarities taken before any merge."""
    order = sorted(range(len(scores)), key=lambda i: (-float(scores[i]), i))
    kept = sorted(order[:keep])
    rest = sorted(order[keep:])
    states = hidden.clone().double()
    original = hidden.double()
    if not kept:  # nothing to merge into: every token is dropped
        return kept, hidden[:0]
    for r in rest:
        sims = [float(F.cosine_similarity(original[r], original[k], dim=0)) for k in kept]
        target = kept[max(range(len(kept)), key=lambda j: (sims[j], -j))]
        states[target] = (states[target] + original[r]) / 2
    return kept, states[kept].float()


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 2**16), st.integers(1, 24), st.integers(1, 6), st.floats(0, 1))
def test_inner_merge_matches_the_official_loop(seed, n, width, fraction):
    g = torch.Generator().manual_seed(seed)
    hidden, scores = torch.randn(n, width, generator=g), torch.rand(n, generator=g)
    keep = round(n * fraction)
    index, merged = merge_into_kept(hidden, scores, keep)
    kept, expected = _naive_merge_into_kept(hidden, scores, keep)
    assert index.tolist() == kept
    torch.testing.assert_close(merged, expected, atol=1e-5, rtol=1e-5)
    # Batched rows give each row's own answer.
    batch_index, batch_merged = merge_into_kept(
        torch.stack([hidden, hidden.flip(0)]), torch.stack([scores, scores.flip(0)]), keep
    )
    assert torch.equal(batch_index[0], index) and torch.equal(batch_merged[0], merged)


def _naive_dpc(x, clusters, k, beta):
    """DPC-kNN and the beta merge written out: density exp(-mean of the k smallest squared distances,
    itself included), delta the distance to the nearest denser token (ties: the lower index is
    denser; the densest: the largest distance), the largest density * delta are centres, every other
    token joins its nearest centre, an output is beta * centre + (1 - beta) * mean(members)."""
    m, c = x.shape
    x = x.double()
    d = [[float((x[i] - x[j]).norm()) / math.sqrt(c) for j in range(m)] for i in range(m)]
    density = [math.exp(-sum(v * v for v in sorted(row)[:k]) / k) for row in d]
    denser = lambda j, i: density[j] > density[i] or (density[j] == density[i] and j < i)
    far = max(max(row) for row in d)
    delta = [min([d[i][j] for j in range(m) if denser(j, i)] or [far]) for i in range(m)]
    score = [density[i] * delta[i] for i in range(m)]
    centres = sorted(sorted(range(m), key=lambda i: (-score[i], i))[:clusters])
    out = []
    for ci, centre in enumerate(centres):
        nearest = {i: min(range(clusters), key=lambda j: (d[i][centres[j]], j)) for i in range(m)}
        members = [i for i in range(m) if i not in centres and nearest[i] == ci]
        if members:
            out.append(beta * x[centre] + (1 - beta) * x[members].mean(0))
        else:
            out.append(x[centre])
    return centres, torch.stack(out).float()


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 2**16), st.integers(1, 14), st.integers(1, 5), st.integers(1, 9),
       st.sampled_from([0.0, 0.6, 1.0]))
def test_cluster_merge_matches_dpc_knn_written_out(seed, m, channels, knn, beta):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, channels, generator=g)
    clusters = 1 + seed % m
    centres, assignment, weight = cluster_weights(x, clusters, knn, beta)
    naive_centres, expected = _naive_dpc(x, clusters, min(knn, clusters), beta)
    assert centres.tolist() == naive_centres
    merged = torch.zeros(clusters, channels).index_add(0, assignment, x * weight[:, None])
    torch.testing.assert_close(merged, expected, atol=1e-5, rtol=1e-5)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 30), st.floats(0, 1)), min_size=1, max_size=12), st.integers(0, 400))
def test_exact_counts_meet_the_total_with_the_fewest_changes(groups, total):
    sizes = [size for size, _ in groups]
    total = total % (sum(sizes) + 1)
    ratio = total / sum(sizes) if sum(sizes) else 0.0
    quotas = [size * ratio for size in sizes]
    official = [min(size, math.ceil(q)) for size, q in zip(sizes, quotas)]
    counts = exact_counts(official, quotas, sizes, total)
    assert sum(counts) == total
    assert all(0 <= c <= size for c, size in zip(counts, sizes))
    assert all(abs(c - o) <= 1 for c, o in zip(counts, official))
    assert sum(c != o for c, o in zip(counts, official)) == abs(total - sum(official))
    if sum(official) == total:
        assert counts == official


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 2**16), st.integers(1, 7), st.integers(2, 14), st.floats(0.05, 1.0), st.booleans(),
       st.sampled_from([0.5, 0.8]))
def test_merge_plan_is_a_partition_with_the_budget(seed, frames, n, fraction, per_frame, tau):
    """Every token feeds at most one output, each output's weights sum to 1, the item gets exactly
    its budget (the same count in every frame with ``per_frame``), and a segment's static tokens go
    to its first frame otherwise."""
    scenes = tuple(sorted({0, *[(seed >> i) % frames for i in range(2)]}))
    directions, scores = _video(seed, frames, n, 6, scenes, moving=seed % 3, noise=0.05 * (seed % 4))
    keep = max(1, round(fraction * n))
    total = keep * frames if per_frame else max(1, round(fraction * frames * n))
    plan = holitom_merge(directions, scores, total, tau=tau, per_frame=per_frame)
    counts = plan.counts.tolist()
    assert sum(counts) == total and (not per_frame or counts == [keep] * frames)
    sources = plan.frame * n + plan.position
    assert len(sources.unique()) == len(sources)
    width = plan.kept.shape[1]
    sums = torch.zeros(frames * width).index_add(0, plan.row * width + plan.column, plan.weight)
    filled = torch.arange(width)[None, :] < plan.counts[:, None]
    torch.testing.assert_close(sums.view(frames, width)[filled], torch.ones(int(filled.sum())))
    assert int(sums.view(frames, width)[~filled].abs().sum()) == 0
    for s, e in plan.segments:  # every source lies in its output's segment
        inside = (plan.row >= s) & (plan.row <= e)
        assert bool(((plan.frame[inside] >= s) & (plan.frame[inside] <= e)).all())
        if not per_frame:  # averaged over frames: only the segment's first frame holds such outputs
            merged_rows = plan.row[inside & (plan.frame != plan.row)]
            assert bool((merged_rows == s).all())


def test_static_video_merges_into_its_first_frame_or_spreads_per_frame():
    """Eight nearly identical frames: one segment. HoliTom's own counts put every token in frame 0
    (one temporal token per position, then clusters); per frame, each frame gets the same count."""
    directions, scores = _video(3, 8, 16, 8, moving=0, noise=0.01)
    plan = holitom_merge(directions, scores, 16)
    assert plan.segments == [(0, 7)] and plan.counts.tolist() == [16] + [0] * 7
    assert plan.kept[0].tolist() == list(range(16))
    torch.testing.assert_close(plan.apply(directions)[0], directions.mean(0), atol=1e-6, rtol=0)
    even = holitom_merge(directions, scores, 16, per_frame=True)
    assert even.counts.tolist() == [2] * 8 and even.segments == [(0, 7)]
    assert sorted(even.kept.flatten().tolist()) == sorted(set(even.kept.flatten().tolist()))  # 16 distinct centres
    # A budget the merged video cannot fill undoes the least useful segments (here: all of it).
    assert holitom_merge(directions, scores, 8 * 12).segments == [(f, f) for f in range(8)]


def test_lone_frame_is_the_attention_ranking():
    scores = torch.tensor([[0.1, 0.9, 0.3, 0.7, 0.5]])
    plan = holitom_merge(torch.randn(1, 5, 3), scores, 3)
    assert plan.kept.tolist() == [[1, 3, 4]] and torch.equal(plan.weight, torch.ones(3))


# ----------------------------------------------------------------------------- the stage
def _view(frames, tokens, channels, has_cls, seed=0, project=True):
    directions, scores = _video(seed, frames, tokens, channels, moving=2, noise=0.02)
    weight = torch.randn(channels, 5, generator=torch.Generator().manual_seed(seed))
    return VisionView(
        features=directions, cls_attention=scores[:, int(has_cls) :], keys=directions, grid=(1, tokens - int(has_cls)),
        has_cls=has_cls, project=(lambda f: torch.tanh(f @ weight)) if project else None,
    )


@pytest.mark.parametrize("per_frame", [True, False])
def test_stage_merges_in_the_projected_space_and_keeps_cls_where_it_is_a_token(per_frame):
    view = _view(4, 10, 6, has_cls=True)
    stage = HoliTomMerge(frames=4, cls_token=True, per_frame=per_frame)
    reduction = stage.reduce(view, keep=3)
    scores = torch.cat([torch.full((4, 1), float("inf")), view.cls_attention], 1)
    plan = holitom_merge(view.project(view.features), scores, 12, per_frame=per_frame)
    width = reduction.features.shape[1]
    torch.testing.assert_close(reduction.projected, plan.apply(view.project(view.features), width))
    torch.testing.assert_close(reduction.features, plan.apply(view.features, width))
    assert torch.equal(reduction.kept, plan.kept[:, :width])
    if per_frame:
        assert getattr(reduction, "counts", None) is None and width == 3
    else:
        assert torch.equal(reduction.counts, plan.counts)
    # A lone frame with CLS among its slots (a Video-LLaVA frame): CLS (index 0) ranks first.
    frame = _view(1, 10, 6, has_cls=True, seed=2)
    assert 0 in HoliTomMerge(frames=1, cls_token=True).reduce(frame, keep=2).kept.tolist()[0]
    # Without CLS among the slots (LLaVA-1.5 images): CLS is never an output, indices skip it.
    image = _view(1, 10, 6, has_cls=True, seed=1)
    kept = HoliTomMerge(frames=1, cls_token=False).reduce(image, keep=4).kept
    expected = image.cls_attention[0].argsort(descending=True)[:4].sort().values + 1
    assert kept.tolist() == [expected.tolist()]


def test_stage_handles_items_stacked_item_major():
    """Two items of three frames in one stack: each is merged on its own."""
    a, b = _view(3, 8, 6, has_cls=False, seed=4), _view(3, 8, 6, has_cls=False, seed=5)
    both = VisionView(torch.cat([a.features, b.features]), torch.cat([a.cls_attention, b.cls_attention]),
                      torch.cat([a.keys, b.keys]), a.grid, False, project=a.project)
    b.project = a.project
    stage = HoliTomMerge(frames=3)
    together = stage.reduce(both, 2)
    alone = [stage.reduce(a, 2), stage.reduce(b, 2)]
    assert torch.equal(together.features, torch.cat([r.features for r in alone]))
    assert torch.equal(together.kept, torch.cat([r.kept for r in alone]))
    with pytest.raises(RuntimeError, match="not items of 3 frames"):
        stage.reduce(VisionView(a.features[:2], a.cls_attention[:2], a.keys[:2], a.grid, False), 2)


# ----------------------------------------------------------------------------- budget and options
def test_llava15_budgets():
    """192 / 128 / 64 on LLaVA-1.5: LLM input, tokens after the merge at layer 21, layer average."""
    found = {}
    for budget in (192, 128, 64):
        schedule = HoliTom(budget=budget).resolve(LLAVA15).schedule
        found[budget] = (schedule.llm_input, schedule.boundaries, round(schedule.average, 3))
        assert abs(schedule.average - budget) <= 1
    assert found == {192: (232, ((21, 116),), 192.125), 128: (154, ((21, 77),), 127.531), 64: (77, ((21, 38),), 63.594)}


def test_defaults_scale_with_depth_and_ratio():
    assert HoliTom().merge_layer(Geometry(28, 196, (14, 14), False)) == 18  # the official 18 of 28
    assert HoliTom().merge_layer(LLAVA15) == 21 and HoliTom().merge_layer(Geometry(LAYERS, 64, (8, 8), True)) == 4
    assert HoliTom(layer=2).merge_layer(LLAVA15) == 2
    # Videos in whole frames; tau 0.65 at a tenth of the tokens (the official 0.10 script), else 0.80.
    plan = HoliTom(budget=128).resolve(VIDEO_LLAVA)
    assert plan.schedule.llm_input % 8 == 0 and abs(plan.schedule.average - 128) <= 8
    assert plan.vision.frames == 8 and plan.vision.cls_token and plan.vision.tau == 0.65
    ov = HoliTom(retain_ratio=0.15).resolve(OV_VIDEO)  # the official LLaVA-OneVision-7B setting
    assert ov.schedule.llm_input == 29 * 32 and ov.schedule.boundaries == ((18, 464),) and ov.vision.tau == 0.80
    assert not ov.vision.cls_token and HoliTom(retain_ratio=0.1).resolve(OV_VIDEO).vision.tau == 0.65
    assert HoliTom(retain_ratio=0.1, tau=0.9).resolve(OV_VIDEO).vision.tau == 0.9
    assert not HoliTom(budget=64).resolve(LLAVA15).vision.cls_token
    # w/o M: the outer merge alone, budget = LLM input.
    alone = HoliTom(budget=100, merge_ratio=0).resolve(LLAVA15)
    assert alone.language is None and alone.schedule.llm_input == 100 and not alone.schedule.boundaries
    assert HoliTom(budget=64).resolve(VIDEO_LLAVA).vision.per_frame is not VIDEO_MODE


def test_composes_on_either_side():
    inner = Compose(make("visionzip"), make("holitom"), budget=128).resolve(LLAVA15)
    assert isinstance(inner.language, SimilarityMerge) and inner.schedule.boundaries[0][0] == 21
    outer = Compose(make("holitom"), make("fastv"), budget=128).resolve(LLAVA15)
    assert isinstance(outer.vision, HoliTomMerge) and abs(outer.schedule.average - 128) <= 1


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(budget=0), "budget must be a positive int"),
        (dict(budget=64, beta=1.5), "beta must be a number in"),
        (dict(budget=64, knn=0), "knn must be an int"),
        (dict(budget=64, max_window=0), "max_window must be an int"),
        (dict(budget=64, merge_ratio=1.0), "merge_ratio must be < 1"),
        (dict(budget=64, tau=2), "tau must be a number in"),
        (dict(retain_ratio=0), "retain_ratio must be > 0"),
        (dict(budget=64, layer=0), "layer must be an int"),
        (dict(budget=64, allocation="segment"), "allocation must be 'video', 'frame' or None"),
    ],
)
def test_bad_options_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        HoliTom(**kwargs)


def test_plans_that_cannot_exist_are_refused_clearly():
    with pytest.raises(ValueError, match="needs a budget"):
        HoliTom().resolve(LLAVA15)
    with pytest.raises(ValueError, match="layer=40 but the language model has 32 layers"):
        HoliTom(budget=64, layer=40).resolve(LLAVA15)
    with pytest.raises(ValueError, match="merge_ratio=0 \\(HoliTom w/o M\\)"):
        HoliTom(budget=560).resolve(LLAVA15)
    if not VIDEO_MODE:
        with pytest.raises(ValueError, match="does not accept"):
            HoliTom(budget=64, allocation="video")


# ----------------------------------------------------------------------------- through the runtime
class LayerInputs:
    """The hidden states entering each decoder layer (hooks registered after the reducer's)."""

    def __init__(self, model):
        self.seen = {}
        self.handles = [
            layer.register_forward_pre_hook(self._hook(i), with_kwargs=True)
            for i, layer in enumerate(model.model.language_model.layers)
        ]

    def _hook(self, index):
        def hook(module, args, kwargs):
            self.seen.setdefault(index, (args[0] if args else kwargs["hidden_states"]).detach().clone())
        return hook

    def remove(self):
        for handle in self.handles:
            handle.remove()


@pytest.mark.parametrize("budget", [192, 128, 64])
def test_llava15_end_to_end_counts_equal_the_schedule(llava15, budget):
    inputs = make_inputs(llava15, seed=3)
    text = int((inputs["input_ids"] != llava15.config.image_token_id).sum())
    reducer = HoliTom(budget=budget)
    with torch.no_grad(), reducer(llava15):
        probe = LayerInputs(llava15)  # after the reducer's hooks: sees what they hand the layers
        try:
            llava15.generate(**inputs, max_new_tokens=2, do_sample=False)
        finally:
            probe.remove()
    schedule = reducer.resolve(LLAVA15).schedule
    assert reducer.stats.tokens_per_layer == schedule.tokens_per_layer
    assert [probe.seen[layer].shape[1] - text for layer in range(32)] == schedule.tokens_per_layer


def test_inner_merge_through_the_runtime_equals_the_eager_models_own_attention():
    """With every token entering the LLM (retain_ratio=1), the states entering layer 4 of 6 are the
    unreduced model's, except that the tokens the last prompt token attended to least in layer 3
    (the eager model's own attention weights) are merged into their most similar kept token."""
    model = FAMILIES["llava"].model()
    eager = make_llava(layers=LAYERS, image_size=112, vision_layers=3, attn="eager")
    inputs = FAMILIES["llava"].one(model)
    visual = (inputs["input_ids"][0] == model.config.image_token_id).nonzero()[:, 0]
    with torch.no_grad():
        out = eager(**inputs, output_attentions=True, output_hidden_states=True)
    scores = out.attentions[3][0, :, -1, visual].mean(0)
    kept, merged = _naive_merge_into_kept(out.hidden_states[4][0, visual], scores, 32)
    with torch.no_grad(), HoliTom(retain_ratio=1.0)(model):
        probe = LayerInputs(model)
        try:
            model(**inputs)
        finally:
            probe.remove()
    start = int(visual[0])
    entering = probe.seen[4][0]
    assert entering.shape[0] == inputs["input_ids"].shape[1] - 32
    torch.testing.assert_close(entering[start : start + 32], merged, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(entering[:start], out.hidden_states[4][0, :start], atol=1e-4, rtol=1e-4)


def _still_video(family_name):
    """The family's one-video prompt with every frame a copy of the first."""
    family = FAMILIES[family_name]
    model = family.model()
    inputs = dict(family.one(model))
    pixels = inputs["pixel_values_videos"]
    inputs["pixel_values_videos"] = pixels[:, :1].expand_as(pixels).contiguous()
    return model, inputs


@pytest.mark.parametrize("family_name", ["video_llava", "llava_onevision"])
def test_a_still_video_is_merged_across_its_frames(family_name):
    """Identical frames make one segment: with HoliTom's own counts (a runtime that takes per-frame
    counts) every token entering the LLM comes from the first frame; with the same count per frame
    each frame holds a share of the segment's temporal tokens. Either way the counts are the schedule's."""
    model, inputs = _still_video(family_name)
    reducer = make("holitom", ratio=0.1)
    with torch.no_grad(), reducer(model):
        model(**inputs)
    (item,) = reducer.stats.items
    frames = item.units
    entering = item.tokens_per_layer[0]
    assert entering % frames == 0 and len(item.entry_units) == entering
    if VIDEO_MODE:
        assert set(item.entry_units.tolist()) == {0}
    else:
        assert item.entry_units.tolist() == [f for f in range(frames) for _ in range(entering // frames)]
    (found,) = duet_vlm.adapter_for(model).find_items(inputs["input_ids"], {})
    plan = reducer.resolve(found.geometry)
    assert item.tokens_per_layer == plan.schedule.tokens_per_layer


def test_stats_and_overlays_show_where_the_tokens_came_from(tmp_path):
    """Every token entering the LLM stands for one slot of its frame (a temporal token: its cluster
    centre's, in the frame it is written to); both overlays draw."""
    from PIL import Image

    from duet_vlm.compare import draw_item_overlay, draw_overlay

    model = FAMILIES["video_llava"].model()
    reducer = make("holitom", ratio=0.3)
    with torch.no_grad(), reducer(model):
        model(**FAMILIES["video_llava"].one(model))
    (video,) = reducer.stats.items
    assert len(video.entry_slots) == len(video.entry_units) == video.tokens_per_layer[0]
    assert len(video.entry_slots.unique()) == len(video.entry_slots)
    grid = video.cells[video.entry_slots][:, 0]  # the frame each slot is drawn in
    on_cell = grid >= 0  # a frame's CLS slot is drawn nowhere
    assert torch.equal(grid[on_cell], video.entry_units[on_cell])
    frames = [Image.new("RGB", (112, 112), (60 * u, 90, 120)) for u in range(video.units)]
    assert draw_item_overlay(frames, video, tmp_path / "video.png").stat().st_size > 0
    llava = FAMILIES["llava"].model()
    reducer = make("holitom", ratio=0.3)
    with torch.no_grad(), reducer(llava):
        llava(**FAMILIES["llava"].one(llava))
    assert reducer.stats.vision_kept.shape == (1, reducer.stats.llm_input_tokens)
    assert draw_overlay(Image.new("RGB", (112, 112)), reducer.stats, (8, 8), tmp_path / "image.png").stat().st_size > 0
