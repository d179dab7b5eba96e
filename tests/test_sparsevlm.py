"""SparseVLM v1.5: schedule solver, rater choice, DPC-kNN recycling, and runs on a tiny LLaVA-1.5."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import duet_vlm
from duet_vlm.adapters import Geometry
from duet_vlm.methods.base import LayerView, Selection
from duet_vlm.methods.sparsevlm import (
    V15_KEEP,
    SparseVLM,
    TextRaterPrune,
    density_peaks_clusters,
    kept_with_recycling,
    merge_clusters,
    recycle_candidates,
    recycled_clusters,
    recycling_schedule,
    split_keep,
    text_raters,
)

from models import IMAGE_TOKEN, make_inputs, make_llava, row

LLAVA15 = Geometry(num_layers=32, visual_tokens=576, grid=(24, 24), has_cls=True)

# (visual tokens after the boundaries at 3, 7 and 16 layers, as top-k + recycled clusters, average)
SOLVED = {
    192: (((3, 281), (7, 185), (16, 102)), ((271, 10), (181, 4), (99, 3)), 192.15625),
    128: (((3, 157), (7, 97), (16, 54)), ((143, 14), (95, 2), (52, 2)), 127.90625),
    64: (((3, 31), (7, 10), (16, 6)), ((14, 17), (9, 1), (5, 1)), 63.6875),
}


# ----------------------------------------------------------------------------- schedule
@pytest.mark.parametrize("budget", sorted(SOLVED))
def test_solver_numbers(budget):
    boundaries, splits, average = SOLVED[budget]
    schedule = SparseVLM(budget=budget).plan(LLAVA15).schedule
    assert schedule.llm_input == 576 and schedule.boundaries == boundaries
    assert schedule.average == average and abs(average - budget) <= 1
    tokens = 576
    for (_, keep), split in zip(boundaries, splits):
        assert split_keep(tokens, keep) == split
        assert kept_with_recycling(tokens, split[0]) == keep
        tokens = keep


def test_official_v15_schedules_and_their_input_count_averages():
    # The published top-k plus recycled clusters (309/204/113 ...); by input count they overshoot.
    expected = {
        192: (((3, 309), (7, 204), (16, 113)), 206.5),
        128: (((3, 312), (7, 117), (16, 39)), 145.40625),
        64: (((3, 82), (7, 32), (16, 18)), 82.25),
    }
    for target, (boundaries, average) in expected.items():
        schedule = SparseVLM(keep=V15_KEEP[target]).plan(LLAVA15).schedule
        assert schedule.boundaries == boundaries and schedule.average == average
        tokens = 576
        for (_, keep), top in zip(boundaries, V15_KEEP[target]):
            assert split_keep(tokens, keep) == (top, keep - top)
            tokens = keep


def test_every_reachable_budget_is_met_within_one_token():
    low, high = 57, 575
    for budget in range(low, high + 1):
        assert abs(SparseVLM(budget=budget).plan(LLAVA15).schedule.average - budget) <= 1, budget
    with pytest.raises(ValueError, match=r"57\.03 to 576\.00"):
        SparseVLM(budget=56).plan(LLAVA15)


def test_recycling_counts_match_the_reference_rule():
    assert [recycle_candidates(d) for d in (0, 1, 3, 4, 276, 562)] == [0, 1, 1, 2, 83, 169]
    assert [recycled_clusters(d) for d in (0, 1, 29, 30, 276, 562)] == [0, 1, 1, 2, 9, 17]
    for tokens in range(0, 80):
        reached = {kept_with_recycling(tokens, top) for top in range(tokens + 1)}
        lowest = kept_with_recycling(tokens, 0)
        assert reached == set(range(lowest, tokens + 1))  # steps of 0 or 1: every count reachable
        for keep in range(tokens + 1):
            top, clusters = split_keep(tokens, keep)
            assert top + clusters == keep
            if keep >= lowest:
                assert kept_with_recycling(tokens, top) == keep
                assert kept_with_recycling(tokens, top + 1) > keep or top == tokens
            else:
                assert clusters == 0
    assert split_keep(576, 309, recycle=False) == (309, 0)


@pytest.mark.parametrize("budget", [0, -5, 1.5, True, "64", None])
def test_bad_budgets_are_refused(budget):
    with pytest.raises(ValueError, match="positive int"):
        SparseVLM(budget=budget)


def test_explicit_options_and_registry():
    assert isinstance(duet_vlm.make("sparsevlm", budget=128), SparseVLM)
    assert duet_vlm.METHODS["sparsevlm"] is SparseVLM
    no_recycling = SparseVLM(keep=(300, 200, 110), recycle=False).plan(LLAVA15).schedule
    assert no_recycling.boundaries == ((3, 300), (7, 200), (16, 110))
    with pytest.raises(ValueError, match=r"keep must be ints >= 0 .*got \(300, -1, 3\)"):
        SparseVLM(keep=(300, -1, 3))
    with pytest.raises(ValueError, match="2 boundary layers but 3"):
        SparseVLM(keep=(300, 200, 110), layers=(3, 7))
    assert recycling_schedule(32, 576, 205, (3, 7, 16), (300, 200, 110)).boundaries[0] == (3, 205)
    # Under Compose the language half keeps v1.5's "192" proportions of the entry count.
    composed = duet_vlm.Compose(duet_vlm.Duet(budget=64), SparseVLM(budget=64), budget=128).plan(LLAVA15)
    assert abs(composed.schedule.average - 128) <= 1 and composed.vision is not None


# ----------------------------------------------------------------------------- raters
def test_text_raters_by_hand():
    # One image token, parallel to text token 0: softmax rows [e^2, 1, 1] / (e^2 + 2), mean 1/3.
    assert text_raters(torch.tensor([[1.0, 0.0], [1.0, 0.0]]), torch.tensor([[2.0, 0], [0, 0], [0, 2.0]])).tolist() == [0]
    # Two image tokens, each matching one text token; the third text token matches neither.
    visual, text = torch.eye(2), torch.tensor([[3.0, 0], [0, 3.0], [0, 0]])
    assert text_raters(visual, text).tolist() == [0, 1]
    # No text token stands out: the last one rates.
    assert text_raters(torch.zeros(4, 2), torch.randn(5, 2)).tolist() == [4]


# ----------------------------------------------------------------------------- clustering
def test_density_peaks_by_hand():
    # k=3 densities exp(-[1.08, .42, .83, .35, .23, .55]); token 4 (densest) gets delta 11, token 1
    # delta 9 (to token 3): they are the centres; everything else joins the nearer one.
    x = torch.tensor([0.0, 1.0, 1.5, 10.0, 10.2, 11.0]).view(1, 6, 1)
    centres, assignment = density_peaks_clusters(x, 2, neighbours=3)
    assert centres.tolist() == [[1, 4]] and assignment.tolist() == [[0, 0, 0, 1, 1, 1]]
    # Equal densities (k=2: every token's nearest other token is 0.1 away) are ranked by index.
    x = torch.tensor([0.0, 0.1, 0.2, 5.0, 5.1]).view(1, 5, 1)
    centres, assignment = density_peaks_clusters(x, 2)
    assert centres.tolist() == [[0, 3]] and assignment.tolist() == [[0, 0, 0, 1, 1]]
    merged = merge_clusters(x, assignment, 2)
    torch.testing.assert_close(merged.view(-1), torch.tensor([0.1, 5.05]))


@st.composite
def cluster_problems(draw):
    groups = draw(st.integers(1, 3))
    tokens = draw(st.integers(1, 40))
    channels = draw(st.integers(1, 6))
    clusters = draw(st.integers(1, tokens))
    duplicates = draw(st.booleans())
    seed = draw(st.integers(0, 2**16))
    return groups, tokens, channels, clusters, duplicates, seed


@settings(max_examples=60, deadline=None)
@given(cluster_problems())
def test_density_peaks_properties(problem):
    groups, tokens, channels, clusters, duplicates, seed = problem
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(groups, tokens, channels, generator=g)
    if duplicates:  # ties in distance and density
        x = torch.randint(0, 3, (groups, tokens, channels), generator=g).float()
    centres, assignment = density_peaks_clusters(x, clusters)
    assert centres.shape == (groups, clusters) and assignment.shape == (groups, tokens)
    for i in range(groups):
        c = centres[i].tolist()
        assert c == sorted(set(c)) and all(0 <= j < tokens for j in c)
        assert assignment[i, centres[i]].tolist() == list(range(clusters))  # centres in their own cluster
        assert set(assignment[i].tolist()) == set(range(clusters))  # every token assigned, no empty cluster
        distance = torch.cdist(x[i], x[i][centres[i]])
        chosen = distance.gather(1, assignment[i][:, None])[:, 0]
        others = torch.ones(tokens, dtype=torch.bool)
        others[centres[i]] = False
        assert torch.allclose(chosen[others], distance[others].min(dim=1).values)  # nearest centre
        # Each group is clustered on its own: the batch does not change the result.
        alone = density_peaks_clusters(x[i : i + 1], clusters)
        assert alone[0].tolist() == centres[i : i + 1].tolist() and alone[1].tolist() == assignment[i : i + 1].tolist()
    merged = merge_clusters(x, assignment, clusters)
    sizes = torch.stack([torch.bincount(a, minlength=clusters) for a in assignment]).float()
    torch.testing.assert_close((merged * sizes[..., None]).sum(1), x.sum(1), atol=1e-4, rtol=1e-4)


# ----------------------------------------------------------------------------- the stage on a hand-made view
def _view(hidden, relevance, visual_index, text_after_image, embeddings):
    batch, length, _ = hidden.shape
    return LayerView(
        layer_index=3,
        layer=None,
        hidden_states=hidden,
        position_embeddings=(None, None),
        visual_index=visual_index,
        visual_ids=torch.arange(visual_index.shape[-1]).expand_as(visual_index),
        valid=torch.ones(batch, length, dtype=torch.bool),
        input_ids=torch.zeros(batch, length, dtype=torch.long),
        input_embeddings=embeddings,
        text_after_image=text_after_image,
        previous_layer=None,
        previous_hidden_states=hidden,
        scratch={},
        attention_fn=lambda layer, states, pe, queries, valid, index: relevance,
        run_layer_fn=None,
        output_head_fn=None,
    )


def test_select_keeps_top_tokens_and_recycles_into_centre_slots():
    g = torch.Generator().manual_seed(3)
    n, prefix, suffix, width = 100, 2, 5, 8
    length = prefix + n + suffix
    hidden = torch.randn(1, length, width, generator=g)
    relevance = torch.randperm(n, generator=g).float().view(1, 1, n)
    visual_index = torch.arange(prefix, prefix + n).view(1, 1, n)
    text = [torch.arange(prefix + n, length)]
    view = _view(hidden, relevance, visual_index, text, torch.randn(1, length, width, generator=g))
    keep = kept_with_recycling(n, 50)  # 50 deleted -> 16 candidates -> 2 clusters
    assert keep == 52
    selection = TextRaterPrune().select(view, keep)
    assert isinstance(selection, Selection) and selection.index.shape == (1, 1, keep)
    index = selection.index[0, 0]
    assert (index.diff() > 0).all()
    order = relevance[0, 0].argsort(descending=True)
    top, candidates = order[:50], order[50:66].sort().values
    centres, assignment = density_peaks_clusters(hidden[:, prefix + candidates], 2)
    assert set(index.tolist()) == set(top.tolist()) | set(candidates[centres[0]].tolist())
    states = selection.hidden_states[0, 0]
    for slot, token in enumerate(index.tolist()):
        if token in top.tolist():
            torch.testing.assert_close(states[slot], hidden[0, prefix + token])
        else:
            cluster = centres[0].tolist().index(candidates.tolist().index(token))
            members = candidates[assignment[0] == cluster]
            torch.testing.assert_close(states[slot], hidden[0, prefix + members].mean(0))
    # Raters are cached by rank in text_after_image, so shifted positions still name the same tokens.
    ranks = view.scratch[TextRaterPrune.SCRATCH_KEY][0]
    assert TextRaterPrune().raters(view)[0].tolist() == (prefix + n + ranks).tolist()
    view.text_after_image = [torch.arange(prefix + keep, prefix + keep + suffix)]
    assert TextRaterPrune().raters(view)[0].tolist() == (prefix + keep + ranks).tolist()


def test_select_without_recycling_is_plain_top_k():
    relevance = torch.tensor([[[0.1, 0.9, 0.5, 0.7, 0.2]]])
    hidden = torch.randn(1, 8, 4)
    view = _view(hidden, relevance, torch.arange(1, 6).view(1, 1, 5), [torch.arange(6, 8)], hidden)
    assert TextRaterPrune(recycle=False).select(view, 2).tolist() == [[[1, 3]]]
    # A count below what recycling can produce (a foreign schedule) is met without recycling too.
    assert TextRaterPrune().select(view, 0).shape == (1, 1, 0)


# ----------------------------------------------------------------------------- on the tiny LLaVA-1.5
def _visual_counts_seen(model, reducer, inputs, images_per_row=1):
    """Visual tokens entering each decoder layer, measured by hooks registered after the reducer's."""
    seen = []

    def hook(module, args, kwargs):
        seen.append((args[0] if args else kwargs["hidden_states"]).shape[1])

    with torch.no_grad(), reducer(model):
        handles = [l.register_forward_pre_hook(hook, with_kwargs=True) for l in model.model.language_model.layers]
        try:
            out = model(**inputs, use_cache=True)
        finally:
            for h in handles:
                h.remove()
    text = int(inputs["input_ids"].shape[1] - (inputs["input_ids"] == IMAGE_TOKEN).sum(1)[0])
    kv = [layer.keys.shape[2] - text for layer in out.past_key_values.layers]
    return [(length - text) // images_per_row for length in seen], [n // images_per_row for n in kv]


@pytest.mark.parametrize("budget", [192, 128, 64])
def test_layers_see_the_schedule(llava15, budget):
    inputs = make_inputs(llava15, batch=2, suffix=(12, 9))
    reducer = SparseVLM(budget=budget)
    seen, kv = _visual_counts_seen(llava15, reducer, inputs)
    assert seen == kv == reducer.stats.tokens_per_layer
    assert reducer.stats.tokens_per_layer == reducer.plan(LLAVA15).schedule.tokens_per_layer
    assert abs(reducer.stats.average_tokens - budget) <= 1


def test_two_images_per_row(llava15):
    inputs = make_inputs(llava15, images_per_row=2, suffix=8)
    reducer = SparseVLM(budget=128)
    seen, _ = _visual_counts_seen(llava15, reducer, inputs, images_per_row=2)
    assert seen == reducer.stats.tokens_per_layer and reducer.stats.stage_kept[0][1].shape == (1, 2, 157)


class _RecordingStage(TextRaterPrune):
    def raters(self, view):
        positions = super().raters(view)
        self.log.append([(view.input_ids[b, p].clone(), view.input_embeddings[b, p].clone()) for b, p in enumerate(positions)])
        return positions


class _Recording(SparseVLM):
    def language_stage(self):
        stage = _RecordingStage(recycle=self.recycle)
        stage.log = self.log
        return stage


def test_raters_are_the_same_tokens_at_every_boundary(llava15):
    inputs = make_inputs(llava15, batch=2, suffix=(12, 7), seed=5)
    reducer = _Recording(budget=128)
    reducer.log = []
    captured = {}

    def keep_input(module, args, kwargs):
        captured["embeddings"] = (args[0] if args else kwargs["hidden_states"]).clone()

    handle = llava15.model.language_model.layers[0].register_forward_pre_hook(keep_input, with_kwargs=True)
    try:
        with torch.no_grad(), reducer(llava15):
            llava15(**inputs)
    finally:
        handle.remove()
    assert len(reducer.log) == 3
    embeddings, ids = captured["embeddings"], inputs["input_ids"]
    for b in range(2):
        visual = (ids[b] == IMAGE_TOKEN).nonzero()[:, 0]
        text = torch.arange(visual[-1] + 1, ids.shape[1])
        expected = text[text_raters(embeddings[b, visual], embeddings[b, text])]
        assert 0 < len(expected) < len(text)
        for boundary in reducer.log:
            rater_ids, rater_embeddings = boundary[b]
            assert rater_ids.tolist() == ids[b, expected].tolist()
            torch.testing.assert_close(rater_embeddings, embeddings[b, expected])


def test_generate_and_padded_batch_equal_single_rows(llava15):
    inputs = make_inputs(llava15, batch=2, suffix=(12, 7), seed=2)
    reducer = SparseVLM(budget=128)
    new = 3
    with torch.no_grad(), reducer(llava15):
        batch_out = llava15.generate(**inputs, max_new_tokens=new, do_sample=False)
        batch_kept = [k for _, k in reducer.stats.stage_kept]
        for b in range(2):
            single = llava15.generate(**row(inputs, b), max_new_tokens=new, do_sample=False)
            assert single[0, -new:].tolist() == batch_out[b, -new:].tolist()
            assert [k[0].tolist() for _, k in reducer.stats.stage_kept] == [k[b].tolist() for k in batch_kept]
    assert batch_out.shape[1] == inputs["input_ids"].shape[1] + new


def test_training_backward_reaches_the_projector():
    model = make_llava(seed=4)
    model.train()
    inputs = make_inputs(model, batch=2, suffix=(12, 8), seed=9)
    labels = torch.full_like(inputs["input_ids"], -100)
    labels[:, -4:] = inputs["input_ids"][:, -4:]
    reducer = SparseVLM(budget=64)
    with reducer(model):
        loss = model(**inputs, labels=labels).loss
    loss.backward()
    assert torch.isfinite(loss) and abs(reducer.stats.average_tokens - 64) <= 1
    layers = model.model.language_model.layers
    for name, param in [
        ("projector", model.model.multi_modal_projector.linear_1.weight),
        ("layer 20", layers[20].self_attn.q_proj.weight),
    ]:
        assert param.grad is not None and param.grad.abs().sum() > 0, name


def test_original_positions_keep_each_token_its_position(llava15):
    """SparseVLM(positions="original"): after its drops, every kept token keeps its original position."""
    inputs = make_inputs(llava15, seed=3)
    seen = []

    def hook(module, args, kwargs):
        seen.append(kwargs["position_ids"].reshape(-1).tolist())

    reducer = duet_vlm.SparseVLM(budget=128, positions="original")
    handle = reducer.attach(llava15)
    probe = llava15.model.language_model.layers[-1].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            llava15(**inputs)
    finally:
        probe.remove()
        handle.remove()
    last = seen[-1]
    assert len(last) < inputs["input_ids"].shape[1] and last == sorted(set(last))
    assert last[-1] == inputs["input_ids"].shape[1] - 1  # the last prompt token keeps its position
    with pytest.raises(ValueError, match="positions must be 'contiguous' or 'original'"):
        duet_vlm.SparseVLM(budget=128, positions="renumbered")
