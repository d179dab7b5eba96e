"""DivPrune: the official code's outputs replayed (tests/data/vectors/divprune-official-*; README
there), the greedy max-min selection against a literal reference on random inputs, the budget
solver, option errors and composition."""

import json
import math
from dataclasses import dataclass

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

import duet_vlm
from duet_vlm.geometry import Geometry
from duet_vlm.methods.divprune import DivPrune, MaxMinDiversity, cosine_distance, divprune_select, max_min_greedy
from duet_vlm.plan import VisionView

# Official SUBSET_RATIO per recording, and the reducer that should reproduce it.
CONFIGS = {
    "none": lambda: None,
    "ratio0098": lambda: duet_vlm.make("divprune", ratio=0.098),  # run_Divprune.sh's default: 56 of 576
    "64": lambda: duet_vlm.make("divprune", budget=64),
    "128": lambda: duet_vlm.make("divprune", budget=128),
    "192": lambda: duet_vlm.make("divprune", budget=192),
}
NEW_TOKENS = 8


# ----------------------------------------------------------------------------- official outputs
def _expected(reference_dir, name):
    expected = json.loads((reference_dir / f"divprune-official-{name}.json").read_text())
    return expected, load_file(reference_dir / f"divprune-official-{name}.safetensors")


@pytest.fixture(scope="module")
def divprune_official(official_model, reference_dir):
    """The tiny LLaVA-1.5 (tests/conftest.py's ``official_model``) and the recorded input: the
    official code needs the image at token 35, so the recording's prompt is 35 ids, the image, then
    the shared sample's 12 suffix ids (not ``official``'s prompt)."""
    model = official_model
    settings_ = _expected(reference_dir, "none")[0]["settings"]
    input_ids = torch.tensor([settings_["prefix_ids"] + [999] * 576 + settings_["suffix_ids"]])
    pixel_values = load_file(reference_dir / "inputs.safetensors")["pixel_values_0"]
    return model, input_ids, pixel_values, reference_dir


def _run(model, input_ids, pixel_values, reducer):
    """Prefill logits and per-layer (length, positions); each decoding step's per-layer positions;
    the greedy output."""
    seen = []

    def hook(module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        seen.append((hidden.shape[1], kwargs["position_ids"].reshape(-1).tolist()))

    handle = reducer.attach(model) if reducer is not None else None
    hooks = [layer.register_forward_pre_hook(hook, with_kwargs=True) for layer in model.model.language_model.layers]
    try:
        with torch.no_grad():
            logits = model(input_ids=input_ids, pixel_values=pixel_values).logits[0, -1]
            prefill = list(seen)
            stats = reducer.stats if reducer is not None else None
            seen.clear()
            generated = model.generate(
                input_ids=input_ids, pixel_values=pixel_values, max_new_tokens=NEW_TOKENS, do_sample=False,
                output_scores=True, return_dict_in_generate=True,
            )
    finally:
        for h in hooks:
            h.remove()
        if handle:
            handle.remove()
    layers = len(model.model.language_model.layers)
    decode = [seen[i * layers : (i + 1) * layers] for i in range(1, NEW_TOKENS)]
    return logits, prefill, decode, generated, stats


@pytest.mark.parametrize("name", list(CONFIGS))
def test_whole_run_matches_the_official_code(divprune_official, name):
    """Lengths and positions every decoder layer receives in the prefill and at each decoding step,
    the kept patches (exact), the prefill's and every greedy step's logits (atol 1e-4), the tokens."""
    model, input_ids, pixel_values, reference_dir = divprune_official
    expected, tensors = _expected(reference_dir, name)
    sample = expected["samples"]["0"]
    logits, prefill, decode, generated, stats = _run(model, input_ids, pixel_values, CONFIGS[name]())
    assert [n for n, _ in prefill] == sample["per_layer_seq_len"]
    assert [p for _, p in prefill] == sample["per_layer_position_ids"]
    torch.testing.assert_close(logits, tensors["s0_prefill_last_logits"], atol=1e-4, rtol=0)
    assert generated.sequences[0, input_ids.shape[1] :].tolist() == sample["greedy_new_tokens"]
    for step, scores in enumerate(generated.scores):
        torch.testing.assert_close(scores[0], tensors[f"s0_gen_step{step}_logits"], atol=1e-4, rtol=0)
    assert [[p[0] for _, p in step] for step in decode] == sample["decode_step_position_ids_per_layer"]
    if name == "none":
        return
    kept = sample["divprune"]["kept_patch_indices_ascending"]
    assert (stats.vision_kept[0] - 1).tolist() == kept  # the tower's index space has CLS first
    assert stats.tokens_per_layer == [len(kept)] * 32
    assert (stats.vision_roles["first"][0] - 1).tolist() == sample["divprune"]["selected_in_pick_order"][:1]


@pytest.mark.parametrize("name", ["ratio0098", "64", "128", "192"])
def test_selection_order_replays_on_the_official_features(reference_dir, name):
    """On the official code's own input (the projected visual block), the pure function picks the
    same tokens in the same order; the first step's scores are its nearest-other distances."""
    expected, tensors = _expected(reference_dir, name)
    recorded = expected["samples"]["0"]["divprune"]
    features = tensors["s0_visual_tokens_llm_space"]
    assert divprune_select(features, recorded["keep"]).tolist() == recorded["selected_in_pick_order"]
    nearest = cosine_distance(features).fill_diagonal_(float("inf")).amin(dim=0)
    torch.testing.assert_close(nearest, tensors["s0_first_step_scores"], atol=1e-6, rtol=0)


@dataclass
class _Spy(DivPrune):
    """DivPrune whose stage keeps what it measured distances on."""

    def vision_stage_for(self, geometry, keep):
        spy = self.__dict__.setdefault("_spy", _SpyStage())
        return spy


class _SpyStage(MaxMinDiversity):
    def reduce(self, view, keep):
        self.space = view.project(view.features[:, 1:])
        return super().reduce(view, keep)


def test_distances_are_taken_in_the_language_models_input_space(divprune_official):
    """The stage measures the projector's output of the 576 patches (CLS excluded): the official
    code's visual block, to fp32 accuracy."""
    model, input_ids, pixel_values, reference_dir = divprune_official
    reducer = _Spy(budget=64)
    with torch.no_grad(), reducer(model):
        model(input_ids=input_ids, pixel_values=pixel_values)
    official_block = _expected(reference_dir, "64")[1]["s0_visual_tokens_llm_space"]
    torch.testing.assert_close(reducer._spy.space[0], official_block, atol=1e-4, rtol=1e-5)


# ----------------------------------------------------------------------------- naive reference
def _naive_cosine(a, b):
    dot = math.fsum(x * y for x, y in zip(a, b))
    return 1.0 - dot / (math.sqrt(math.fsum(x * x for x in a)) * math.sqrt(math.fsum(y * y for y in b)))


def _naive_greedy(distance, keep):
    """The paper's greedy, literally: a list of chosen indices grown one at a time."""
    n = len(distance)
    if keep == 0:
        return []
    nearest = [min((distance[j][i] for j in range(n) if j != i), default=0.0) for i in range(n)]
    chosen = [max(range(n), key=lambda i: (nearest[i], -i))]
    while len(chosen) < keep:
        rest = [i for i in range(n) if i not in chosen]
        chosen.append(max(rest, key=lambda i: (min(distance[s][i] for s in chosen), -i)))
    return chosen


@st.composite
def distance_matrices(draw):
    """Small non-negative matrices of few distinct values (many exact ties), zero diagonal, not
    necessarily symmetric (the greedy reads columns, as the official code does)."""
    n = draw(st.integers(1, 12))
    values = draw(st.lists(st.lists(st.integers(0, 4).map(float), min_size=n, max_size=n), min_size=n, max_size=n))
    for i in range(n):
        values[i][i] = 0.0
    return torch.tensor(values), draw(st.integers(0, n))


@settings(max_examples=300, deadline=None)
@given(distance_matrices())
def test_greedy_equals_a_literal_max_min_greedy(problem):
    """Same picks in the same order, ties to the lower index, distinct tokens whatever the ties."""
    distance, keep = problem
    chosen = max_min_greedy(distance, keep).tolist()
    assert chosen == _naive_greedy(distance.tolist(), keep)
    assert len(set(chosen)) == keep


@st.composite
def token_sets(draw):
    """Small rows of tokens with repeated and scaled copies (exact and directional duplicates)."""
    n = draw(st.integers(1, 14))
    d = draw(st.integers(1, 5))
    values = st.integers(-3, 3).map(float)
    base = [draw(st.lists(values, min_size=d, max_size=d).filter(any)) for _ in range(n)]
    for i in range(n):
        if i and draw(st.booleans()):
            base[i] = [v * draw(st.sampled_from([1.0, 2.0])) for v in base[draw(st.integers(0, i - 1))]]
    return torch.tensor(base), draw(st.integers(0, n))


@settings(max_examples=200, deadline=None)
@given(token_sets())
def test_divprune_is_the_greedy_on_cosine_distances(problem):
    """The distances agree with a direct float64 ``1 - cos``; the choice is the literal greedy on
    them, distinct even among duplicates."""
    features, keep = problem
    rows = features.tolist()
    direct = torch.tensor([[_naive_cosine(a, b) for b in rows] for a in rows], dtype=torch.float64)
    distance = cosine_distance(features[None])[0]  # the call divprune_select makes (ties break alike)
    torch.testing.assert_close(distance.double(), direct, atol=1e-6, rtol=0)
    chosen = divprune_select(features, keep).tolist()
    assert chosen == _naive_greedy(distance.tolist(), keep)
    assert len(set(chosen)) == keep


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 2**16), st.integers(1, 40), st.integers(1, 5))
def test_rows_choose_as_they_would_alone(seed, n, units):
    """Leading dimensions are independent rows: a batch chooses what each row chooses alone."""
    features = torch.randn(units, 2, n, 6, generator=torch.Generator().manual_seed(seed))
    keep = (seed % n) + 1
    together = divprune_select(features, keep)
    assert together.shape == (units, 2, keep)
    for u in range(units):
        for r in range(2):
            assert torch.equal(together[u, r], divprune_select(features[u, r], keep))


def test_the_most_diverse_tokens_of_clusters():
    """Three tight clusters, one far token: the far token first, then one token per cluster."""
    centres = torch.tensor([[1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0]])
    noise = torch.randn(3, 5, 3, generator=torch.Generator().manual_seed(0)) * 0.01
    tokens = torch.cat([(centres[:, None] + noise).reshape(15, 3), torch.tensor([[-1.0, -1.0, -1.0]])])
    chosen = divprune_select(tokens, 4).tolist()
    assert chosen[0] == 15
    assert sorted(c // 5 for c in chosen[1:]) == [0, 1, 2]


def test_the_stage_keeps_patches_in_order_and_passes_their_projection_on():
    features = torch.randn(2, 1 + 16, 8, generator=torch.Generator().manual_seed(1))
    projection = torch.randn(8, 12, generator=torch.Generator().manual_seed(2))
    view = VisionView(features, torch.zeros(2, 16), features, (4, 4), True, project=lambda f: f @ projection)
    reduction = MaxMinDiversity().reduce(view, 5)
    assert reduction.kept.shape == (2, 5) and bool((reduction.kept >= 1).all())  # CLS is never a candidate
    assert torch.equal(reduction.kept, reduction.kept.sort(dim=-1).values)
    expected = divprune_select(features[:, 1:] @ projection, 5).sort(dim=-1).values + 1
    assert torch.equal(reduction.kept, expected)
    torch.testing.assert_close(reduction.features, features.gather(1, expected[..., None].expand(-1, -1, 8)))
    torch.testing.assert_close(reduction.projected, reduction.features @ projection)
    assert reduction.roles["first"].shape == (2, 1)
    # Without a projector (a view in the language model's space already) the features are measured.
    plain = MaxMinDiversity().reduce(VisionView(features, torch.zeros(2, 16), features, (4, 4), True), 5)
    assert plain.projected is None
    assert torch.equal(plain.kept, divprune_select(features[:, 1:], 5).sort(dim=-1).values + 1)


# ----------------------------------------------------------------------------- budgets and options
LLAVA15 = Geometry(32, 576, (24, 24), True)


@pytest.mark.parametrize("budget", [192, 128, 64])
def test_every_layer_sees_the_budget(budget):
    plan = DivPrune(budget=budget).resolve(LLAVA15)
    assert plan.schedule.llm_input == budget and not plan.schedule.boundaries
    assert plan.schedule.tokens_per_layer == [budget] * 32 and plan.schedule.average == budget
    assert isinstance(plan.vision, MaxMinDiversity) and plan.positions == "contiguous"


def test_the_official_ratio_keeps_the_official_count():
    """``int(round(0.098 * 576))`` = 56, as the official SUBSET_RATIO gives."""
    assert duet_vlm.make("divprune", ratio=0.098).resolve(LLAVA15).schedule.llm_input == 56


def test_videos_keep_the_same_count_in_every_frame():
    video = Geometry(32, 8 * 576, (24, 24), True, units=8, modality="video")
    schedule = DivPrune(budget=100).resolve(video).schedule
    assert schedule.llm_input == 96  # 12 per frame: within a frame count of the budget
    assert 100 - 8 < schedule.average <= 100


def test_composes_with_a_language_side_method():
    plan = duet_vlm.Compose(duet_vlm.make("divprune"), duet_vlm.make("fastv"), budget=64).resolve(LLAVA15)
    assert isinstance(plan.vision, MaxMinDiversity) and plan.language is not None
    assert abs(plan.schedule.average - 64) <= 1


def test_budget_at_or_above_the_tokens_is_a_no_op():
    with pytest.warns(UserWarning, match="nothing is reduced"):
        plan = DivPrune(budget=576).resolve(LLAVA15)
    assert plan.vision is None and plan.schedule.is_identity


@pytest.mark.parametrize("budget", [0, -3, 1.5, True, "64"])
def test_bad_budgets_are_refused(budget):
    with pytest.raises(ValueError, match="budget must be a positive int"):
        DivPrune(budget=budget)


def test_clear_errors():
    with pytest.raises(ValueError, match="needs a budget"):
        DivPrune().resolve(LLAVA15)
    with pytest.raises(ValueError, match="cannot keep 600 of the 576 patch tokens"):
        DivPrune().vision_stage_for(LLAVA15, 600)
    with pytest.raises(ValueError, match="cannot keep 5 of 4 tokens"):
        divprune_select(torch.randn(4, 3), 5)
    with pytest.raises(ValueError, match="positions must be"):
        DivPrune(budget=64, positions="shuffled")


def test_records_round_trip():
    for reducer in (DivPrune(budget=64), duet_vlm.make("divprune", ratio=0.25)):
        assert duet_vlm.from_dict(json.loads(json.dumps(reducer.to_dict()))) == reducer


def test_a_video_budget_below_one_token_per_frame_is_refused():
    video = Geometry(32, 8 * 576, (24, 24), True, units=8, modality="video")
    with pytest.raises(ValueError, match="a budget of 7 is less than one token for each of the 8 frames"):
        DivPrune(budget=7).resolve(video)
    with pytest.raises(ValueError, match=r"4 visual tokens cannot be split over 8 frames.*at least one token per frame"):
        DivPrune().vision_stage_for(video, 4)


def test_the_overlay_draws_the_kept_patches(divprune_official, tmp_path):
    from PIL import Image

    from duet_vlm.compare import draw_overlay

    model, input_ids, pixel_values, _ = divprune_official
    reducer = duet_vlm.make("divprune", budget=64)
    with torch.no_grad(), reducer(model):
        model(input_ids=input_ids, pixel_values=pixel_values)
    picture = Image.new("RGB", (336, 336))
    assert draw_overlay(picture, reducer.stats, (24, 24), tmp_path / "kept.png").stat().st_size > 0
