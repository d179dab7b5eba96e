"""Properties of the Stage-A selection (``merge_dominant_contextual``) and ``top_k_in_order``."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from duet_vlm.selection import merge_dominant_contextual, top_k_in_order


@st.composite
def merge_problems(draw):
    patches = draw(st.integers(4, 60))
    tokens = patches + 1
    dominant = draw(st.integers(1, tokens))
    contextual = draw(st.integers(0, tokens - dominant))
    width = draw(st.one_of(st.none(), st.integers(1, 6)))
    images = draw(st.integers(1, 3))
    seed = draw(st.integers(0, 2**16))
    return images, patches, dominant, contextual, width, seed


def _tensors(images, patches, seed, channels=6):
    g = torch.Generator().manual_seed(seed)
    # Distinct scores so that rankings are unambiguous.
    scores = torch.stack([torch.randperm(patches, generator=g).float() for _ in range(images)])
    return torch.randn(images, patches + 1, channels, generator=g), scores, torch.randn(images, patches + 1, 4, generator=g)


@settings(max_examples=150, deadline=None)
@given(merge_problems())
def test_merge_properties(problem):
    images, patches, dominant, contextual, width, seed = problem
    features, scores, keys = _tensors(images, patches, seed)
    out = merge_dominant_contextual(features, scores, keys, dominant, contextual, width)
    n_residual = patches - (dominant - 1)
    n_context = contextual if n_residual else 0
    # Count: exactly dominant + contextual tokens (no contextual token when nothing is left).
    assert out.features.shape == (images, dominant + n_context, features.shape[-1])
    for i in range(images):
        dom = out.dominant[i]
        # CLS kept, first; dominant block in ascending (raster) order; the top-scoring patches.
        assert dom[0] == 0 and bool((dom.diff() > 0).all())
        top = set((scores[i].topk(dominant - 1).indices + 1).tolist())
        assert set(dom[1:].tolist()) == top
        assert torch.equal(out.features[i, :dominant], features[i, dom])
        # Anchors and members are residual patches, disjoint from each other and from the dominant set.
        anchors, members = out.anchors[i].tolist(), out.members[i].tolist()
        assert not (set(anchors) & set(members)) and not (set(anchors + members) & set(dom.tolist()))
        # Each contextual token is anchor + mean of the members assigned to it (argmax cosine on keys).
        unit = F.normalize(keys[i], dim=-1)
        for k, anchor in enumerate(anchors):
            assigned = [m for m, a in zip(members, out.assignment[i].tolist()) if a == k]
            expected = features[i, anchor] + (features[i, assigned].mean(0) if assigned else 0)
            torch.testing.assert_close(out.features[i, dominant + k], expected)
        for m, a in zip(members, out.assignment[i].tolist()):
            similarity = unit[out.anchors[i]] @ unit[m]
            assert similarity[a] >= similarity.max() - 1e-6


@settings(max_examples=100, deadline=None)
@given(st.integers(4, 60), st.integers(1, 12), st.integers(1, 6), st.integers(0, 2**16))
def test_duet_pool_and_anchor_ranks(patches, contextual, width, seed):
    """DUET's pre-selection: pool = top w*c residual patches; anchors at every w-th rank; rest dropped."""
    dominant = max(1, patches // 2)
    contextual = min(contextual, patches - dominant + 1)
    features, scores, keys = _tensors(1, patches, seed)
    out = merge_dominant_contextual(features, scores, keys, dominant, contextual, width)
    residual = [p for p in range(1, patches + 1) if p not in set(out.dominant[0].tolist())]
    ranked = sorted(residual, key=lambda p: -scores[0, p - 1].item())
    pool = ranked[: min(width * contextual, len(residual))]
    step = max(1, len(pool) // contextual)
    assert out.anchors[0].tolist() == pool[::step][:contextual]
    assert sorted(out.members[0].tolist() + out.anchors[0].tolist()) == sorted(pool)


def test_visionzip_anchors_are_uniform_over_residuals():
    features, scores, keys = _tensors(1, 16, 3)
    out = merge_dominant_contextual(features, scores, keys, 5, 3, cluster_width=None)
    residual = [p for p in range(1, 17) if p not in set(out.dominant[0].tolist())]
    assert out.anchors[0].tolist() == residual[:: len(residual) // 3][:3]
    assert len(out.members[0]) == len(residual) - 3  # every other residual token is merged


def test_merge_passes_gradient_to_features_only():
    features, scores, keys = _tensors(1, 16, 0)
    features.requires_grad_(True)
    out = merge_dominant_contextual(features, scores, keys, 5, 3)
    out.features.sum().backward()
    assert features.grad is not None and features.grad.abs().sum() > 0


@pytest.mark.parametrize("bad", [dict(dominant=0, contextual=1), dict(dominant=10, contextual=10), dict(dominant=2, contextual=-1)])
def test_merge_rejects_counts_that_do_not_fit(bad):
    features, scores, keys = _tensors(1, 16, 0)
    with pytest.raises(ValueError, match=r"\(CLS included\) \+ contextual=-?\d+ must fit in 17 tokens"):
        merge_dominant_contextual(features, scores, keys, bad["dominant"], bad["contextual"])


@settings(max_examples=100, deadline=None)
@given(st.lists(st.floats(-1e3, 1e3, allow_nan=False), min_size=1, max_size=50, unique=True), st.data())
def test_top_k_in_order(values, data):
    k = data.draw(st.integers(0, len(values)))
    chosen = top_k_in_order(torch.tensor(values, dtype=torch.float64), k).tolist()
    assert chosen == sorted(chosen) and len(chosen) == k
    assert sorted(chosen) == sorted(sorted(range(len(values)), key=lambda i: -values[i])[:k])


def test_engines_may_choose_differently_only_where_their_scores_are_near_tied():
    """``checks.near_tied_differences``, the cross-engine contract of tests/test_vllm.py: two
    engines whose scores differ by float32 rounding may choose differently only at a near-tie of
    the cut (named), and a choice away from the cut, or scores further apart than float32
    accumulation, fail."""
    from checks import near_tied_differences

    torch.manual_seed(0)
    own = torch.rand(1, 40) + 0.5
    order = own[0].argsort(descending=True)
    k = 10
    at, below = int(order[k - 1]), int(order[k])
    own[0, below] = torch.nextafter(own[0, at], torch.tensor(0.0))  # one ulp below the cut under one engine
    theirs = own.clone()
    theirs[0, below] = torch.nextafter(own[0, at], torch.tensor(2.0))  # one ulp above under the other

    def top(scores):
        return {"dominant": scores.argsort(dim=-1, descending=True, stable=True)[:, :k] + 1}  # CLS first

    assert near_tied_differences((own, top(own)), (theirs, top(theirs)), has_cls=True) == {"dominant": sorted([at + 1, below + 1])}
    assert near_tied_differences((own, top(own)), (own, top(own)), has_cls=True) == {}
    far = top(theirs)["dominant"].clone()
    far[0, 0] = int(order[-1]) + 1  # the lowest-scored patch instead of the best
    with pytest.raises(AssertionError, match="chosen by one engine only"):
        near_tied_differences((own, top(own)), (theirs, {"dominant": far}), has_cls=True)
    with pytest.raises(AssertionError, match="beyond float32 accumulation"):
        near_tied_differences((own, top(own)), (own * 1.001, top(own)), has_cls=True)
