"""CDPruner: the official code's recorded relevance, kernel and greedy picks replayed
(tests/data/vectors/cdpruner-official.*), the relevance, kernel and fast greedy MAP against
deliberately naive references (hypothesis; the naive greedy takes log-determinants of growing
submatrices), the budget solver, bad options, and runs on a tiny LLaVA-1.5 checked against the
model's own pieces."""

import json
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

import duet_vlm
from duet_vlm import Geometry, make
from duet_vlm.methods.cdpruner import (
    EXHAUSTED,
    CDPruner,
    ConditionalDPPSelect,
    cdpruner_select,
    conditional_kernel,
    greedy_dpp_map,
    instruction_relevance,
)
from duet_vlm.plan import VisionView

from models import make_inputs, make_llava, row

LLAVA15 = Geometry(num_layers=32, visual_tokens=576, grid=(24, 24), has_cls=True)
VIDEO = Geometry(num_layers=16, visual_tokens=4 * 65, grid=(8, 8), has_cls=True, units=4, modality="video")
QWEN = Geometry(num_layers=28, visual_tokens=1024, grid=(32, 32), has_cls=False, rope="mrope")


# ----------------------------------------------------------------------------- the official code, replayed
@pytest.fixture(scope="module")
def cdpruner_official(reference_dir):
    record = json.loads((reference_dir / "cdpruner-official.json").read_text())
    return record, load_file(reference_dir / "cdpruner-official.safetensors")


@pytest.mark.parametrize("config", ["192", "128", "64", "128-long"])
def test_official_relevance_kernel_and_picks_replay(cdpruner_official, config):
    """The official ``encode_images`` (CLIP relevance, negated; min-max; ``q_i S_ij q_j``; fast greedy
    MAP) on the tiny tower: our relevance of its CLIP embeddings (``negate=True``), our kernel of its
    projected features and our greedy give its numbers and its picks, in its order."""
    record, tensors = cdpruner_official
    entry = record["configs"][config]
    question, keep = entry["question"], entry["visual_token_num"]
    features, relevance = tensors["features"], tensors[f"relevance_{question}"]
    ours = instruction_relevance(tensors["image_embeds"][None], [tensors[f"text_embeds_{question}"]], negate=True)[0]
    torch.testing.assert_close(ours, relevance, rtol=1e-5, atol=1e-6)
    kernel = conditional_kernel(features, relevance)
    if question == "short":
        torch.testing.assert_close(kernel, tensors["kernel_short"], rtol=1e-5, atol=1e-6)
        assert greedy_dpp_map(tensors["kernel_short"], keep).tolist() == entry["pick_order"]
    assert greedy_dpp_map(kernel, keep).tolist() == entry["pick_order"]
    assert cdpruner_select(features, ours, keep).tolist() == entry["kept_ascending"]
    assert entry["text_segments"] == tensors[f"text_embeds_{question}"].shape[0]  # "long": a mean over 2


def test_official_code_breaks_where_the_kernel_rank_runs_out(cdpruner_official):
    """Recorded: with the tiny LLaVA's own 64-wide projector the official greedy meets NaN gains after
    64 steps and returns 73 distinct tokens for 192; the exhaustion rule keeps exactly 192."""
    record, _ = cdpruner_official
    assert record["narrow_projector_192"] == {"kept": 73, "distinct_picks": 73, "nan_in_gains": True, "cis_nan": True}


# ----------------------------------------------------------------------------- naive references
def naive_relevance(visual, text, negate=False):
    """Token by token, in float64 Python arithmetic: the mean cosine to the text, min-max normalised."""
    rows = []
    for unit, words in zip(visual.tolist(), text):
        words = words.tolist()
        if not words:
            rows.append([1.0] * len(unit))
            continue
        def cos(a, b):
            na, nb = math.sqrt(sum(x * x for x in a)), math.sqrt(sum(x * x for x in b))
            return sum(x * y for x, y in zip(a, b)) / (max(na, 1e-12) * max(nb, 1e-12))
        score = [sum(cos(v, w) for w in words) / len(words) for v in unit]
        score = [-s for s in score] if negate else score
        low, high = min(score), max(score)
        rows.append([(s - low + 1e-6) / (high - low) for s in score] if high > low else [1.0] * len(unit))
    return torch.tensor(rows, dtype=torch.float64)


def naive_kernel(features, relevance, theta=None):
    """``L_ij = q_i cos(f_i, f_j) q_j`` entry by entry."""
    n = features.shape[0]
    q = relevance.double()
    if theta is not None:
        q = torch.exp(theta / (2 * (1 - theta)) * q)
    kernel = torch.empty(n, n, dtype=torch.float64)
    for i in range(n):
        for j in range(n):
            a, b = features[i].double(), features[j].double()
            kernel[i, j] = q[i] * (a @ b) / (max(a.norm(), 1e-12) * max(b.norm(), 1e-12)) * q[j]
    return kernel


def naive_greedy(kernel, keep):
    """Greedy MAP of a DPP computed literally: at each step the candidate whose addition gives the
    largest ``log det`` of the chosen set's submatrix (``torch.linalg.slogdet``); the marginal gain is
    ``det(L[S+j]) / det(L[S])``. Once the best gain is at most ``EXHAUSTED`` times the largest diagonal
    entry, every remaining place goes to the largest diagonal entries. Ties to the lower index."""
    n = kernel.shape[0]
    chosen, exhausted = [], False
    top = float(kernel.diagonal().max()) if n else 0.0
    for _ in range(keep):
        rest = [j for j in range(n) if j not in chosen]
        if not exhausted:
            empty = torch.tensor(0.0, dtype=kernel.dtype)
            base = torch.linalg.slogdet(kernel[chosen][:, chosen])[1] if chosen else empty
            gains = []
            for j in rest:
                sign, logdet = torch.linalg.slogdet(kernel[chosen + [j]][:, chosen + [j]])
                gains.append(float(torch.exp(logdet - base)) if sign > 0 else 0.0)
            best = max(gains)
            if best <= EXHAUSTED * top:
                exhausted = True
            else:
                chosen.append(rest[gains.index(best)])
                continue
        diagonal = [float(kernel[j, j]) for j in rest]
        chosen.append(rest[diagonal.index(max(diagonal))])
    return chosen


# ----------------------------------------------------------------------------- hypothesis
@st.composite
def dpp_problems(draw):
    n = draw(st.integers(1, 16))
    width = draw(st.integers(1, 20))  # narrower than n: the kernel's rank runs out (exhaustion)
    keep = draw(st.integers(0, n))
    seed = draw(st.integers(0, 2**31 - 1))
    generator = torch.Generator().manual_seed(seed)
    features = torch.randn(n, width, generator=generator, dtype=torch.float64)
    relevance = 0.05 + 0.95 * torch.rand(n, generator=generator, dtype=torch.float64)
    theta = draw(st.sampled_from([None, 0.0, 0.5, 0.8]))
    return features, relevance, keep, theta


@settings(max_examples=150, deadline=None)
@given(dpp_problems())
def test_fast_greedy_equals_literal_log_det_greedy(problem):
    features, relevance, keep, theta = problem
    kernel = conditional_kernel(features, relevance, theta)
    torch.testing.assert_close(kernel, naive_kernel(features, relevance, theta), rtol=1e-12, atol=1e-12)
    fast = greedy_dpp_map(kernel, keep)
    assert fast.tolist() == naive_greedy(kernel, keep)
    assert cdpruner_select(features, relevance, keep, theta).tolist() == sorted(fast.tolist())


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 4), st.integers(2, 12), st.integers(1, 6), st.integers(0, 2**31 - 1), st.booleans())
def test_relevance_equals_naive(units, n, width, seed, negate):
    generator = torch.Generator().manual_seed(seed)
    visual = torch.randn(units, n, width, generator=generator, dtype=torch.float64)
    text = [torch.randn(int(m), width, generator=generator, dtype=torch.float64)
            for m in torch.randint(0, 4, (units,), generator=generator)]
    torch.testing.assert_close(instruction_relevance(visual, text, negate), naive_relevance(visual, text, negate),
                               rtol=1e-9, atol=1e-9)


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 3), st.integers(4, 24), st.integers(0, 2**31 - 1))
def test_float32_batched_rows_equal_each_row_alone(units, n, seed):
    """Units are independent: a stack of units selects what each does alone (float32, the runtime's dtype)."""
    generator = torch.Generator().manual_seed(seed)
    features = torch.randn(units, n, 64, generator=generator)
    relevance = instruction_relevance(features, [torch.randn(5, 64, generator=generator) for _ in range(units)])
    keep = n // 3
    batched = cdpruner_select(features, relevance, keep)
    for u in range(units):
        assert batched[u].tolist() == cdpruner_select(features[u], relevance[u], keep).tolist()


# ----------------------------------------------------------------------------- worked examples
def test_greedy_hand_example_and_exhaustion():
    # Two near duplicates and a less relevant distinct token: diversity beats the duplicate.
    kernel = torch.tensor([[1.0, 0.9, 0.0], [0.9, 1.0, 0.0], [0.0, 0.0, 0.5]])
    assert greedy_dpp_map(kernel, 3).tolist() == [0, 2, 1]
    # Rank 2 (features of width 2), 5 tokens: two DPP picks, then the most relevant of the rest.
    features = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [1.0, -1.0], [2.0, 0.5]])
    relevance = torch.tensor([0.5, 0.6, 1.0, 0.9, 0.7])
    kernel = conditional_kernel(features, relevance)
    order = greedy_dpp_map(kernel, 5)
    assert order.tolist()[:2] == [2, 3]  # the two most relevant are orthogonal: both taken
    assert order.tolist()[2:] == [4, 1, 0]  # exhausted: by relevance
    assert order.tolist() == naive_greedy(kernel.double(), 5)
    # Zero features (zero similarity rows) and a float32 kernel of rank 64 < 192: no NaN, distinct picks.
    big = torch.randn(2, 576, 64, generator=torch.Generator().manual_seed(0))
    big[0, :10] = 0
    picks = cdpruner_select(big, instruction_relevance(big, [torch.randn(7, 64)] * 2), 192)
    assert all(len(set(p.tolist())) == 192 for p in picks)
    assert greedy_dpp_map(torch.zeros(0, 0), 0).shape == (0,)


def test_relevance_degenerate_and_sign():
    visual = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]])
    text = [torch.tensor([[1.0, 0.0]])]
    positive, negative = instruction_relevance(visual, text), instruction_relevance(visual, text, negate=True)
    assert positive.argmax().item() == 0 and negative.argmax().item() == 1  # the sign flips the order
    assert positive.min() > 0  # the official offset: the least relevant token keeps a positive weight
    assert torch.equal(instruction_relevance(visual, [torch.zeros(0, 2)]), torch.ones(1, 3))  # no text
    assert torch.equal(instruction_relevance(visual, None), torch.ones(1, 3))
    same = torch.ones(1, 3, 2)
    assert torch.equal(instruction_relevance(same, text), torch.ones(1, 3))  # all equal: pure diversity
    with pytest.raises(ValueError, match="2 text entries for 1 units"):
        instruction_relevance(visual, text * 2)


def test_stage_on_a_view_reads_the_projected_space_and_skips_cls():
    generator = torch.Generator().manual_seed(3)
    features = torch.randn(2, 1 + 16, 8, generator=generator)
    weight = torch.randn(8, 12, generator=generator)
    text = [torch.randn(4, 12, generator=generator), torch.randn(6, 12, generator=generator)]
    view = VisionView(features, torch.rand(2, 16), torch.randn(2, 17, 4), (4, 4), True,
                      project=lambda f: f @ weight, text=text)
    reduction = ConditionalDPPSelect().reduce(view, 5)
    space = features[:, 1:] @ weight
    expected = cdpruner_select(space, instruction_relevance(space, text), 5)
    assert torch.equal(reduction.kept, expected + 1)  # CLS is index 0 and never a candidate
    assert torch.equal(reduction.features, torch.stack([features[u, 1:][expected[u]] for u in range(2)]))
    assert torch.equal(reduction.projected, torch.stack([space[u][expected[u]] for u in range(2)]))
    # Another instruction, another selection (relevance conditions the kernel).
    other = ConditionalDPPSelect().reduce(VisionView(features, view.cls_attention, view.keys, (4, 4), True,
                                                     project=view.project, text=text[::-1]), 5)
    assert not torch.equal(other.kept, reduction.kept)
    assert ConditionalDPPSelect.needs_text


# ----------------------------------------------------------------------------- budget and options
@pytest.mark.parametrize("budget", [192, 128, 64])
def test_budget_is_the_llm_input_in_every_layer(budget):
    plan = CDPruner(budget=budget).resolve(LLAVA15)
    assert plan.schedule.llm_input == budget and plan.schedule.boundaries == ()
    assert plan.schedule.tokens_per_layer == [budget] * 32 and plan.schedule.average == budget
    assert isinstance(plan.vision, ConditionalDPPSelect) and plan.language is None


def test_budget_solver_videos_ratio_and_no_op():
    plan = CDPruner(budget=130).plan(VIDEO)  # 4 frames: 32 per frame, within a frame count of 130
    assert plan.schedule.llm_input == 128 and abs(plan.schedule.average - 130) <= VIDEO.units
    assert make("cdpruner", ratio=0.25).resolve(LLAVA15).schedule.llm_input == 144
    assert CDPruner(budget=300, theta=0.5).plan(QWEN).vision == ConditionalDPPSelect(theta=0.5)
    with pytest.warns(UserWarning, match="nothing is reduced"):
        assert CDPruner(budget=576).resolve(LLAVA15).vision is None
    plan = duet_vlm.Compose(make("cdpruner"), make("fastv"), budget=64).plan(LLAVA15)
    assert isinstance(plan.vision, ConditionalDPPSelect) and abs(plan.schedule.average - 64) <= 1


@pytest.mark.parametrize("options, message", [
    (dict(budget=0), "budget must be a positive int"),
    (dict(budget=64.0), "budget must be a positive int"),
    (dict(budget=64, theta=1.0), r"theta must be None or a number in \[0, 1\)"),
    (dict(budget=64, theta=-0.1), r"theta must be None or a number in \[0, 1\)"),
    (dict(budget=64, theta="0.5"), r"theta must be None or a number in \[0, 1\)"),
    (dict(budget=64, theta=True), r"theta must be None or a number in \[0, 1\)"),
    (dict(budget=64, negate_relevance="yes"), "negate_relevance must be a bool"),
])
def test_bad_options_are_refused(options, message):
    with pytest.raises(ValueError, match=message):
        CDPruner(**options)


def test_impossible_counts_are_refused():
    with pytest.raises(ValueError, match="CDPruner needs a budget"):
        CDPruner().plan(LLAVA15)
    with pytest.raises(ValueError, match=r"0 visual tokens cannot be split over 4 frames.*at least one token per frame"):
        CDPruner(budget=3).plan(VIDEO)
    with pytest.raises(ValueError, match="between 1 and the 576 patch tokens per unit, got 600"):
        CDPruner().vision_stage_for(LLAVA15, 600)
    with pytest.raises(ValueError, match="cannot keep 5 of 4 tokens"):
        greedy_dpp_map(torch.eye(4), 5)


def test_records_round_trip():
    reducer = CDPruner(budget=64, theta=0.5, negate_relevance=True)
    assert reducer.to_dict() == {"method": "cdpruner", "positions": None, "budget": 64, "theta": 0.5,
                                 "negate_relevance": True}
    assert duet_vlm.from_dict(reducer.to_dict()) == reducer


# ----------------------------------------------------------------------------- end to end, LLaVA-1.5
@pytest.fixture(scope="module")
def llava():
    return make_llava()


def _expected_selection(model, inputs, keep, **options):
    """What CDPruner keeps, from the model's own pieces: the tower's penultimate patches, the
    projector, and the input embeddings of each row's non-image, non-padding tokens."""
    with torch.no_grad():
        hidden = model.model.vision_tower(inputs["pixel_values"], output_hidden_states=True).hidden_states[-2]
        space = model.model.multi_modal_projector(hidden[:, 1:])
        embed = model.get_input_embeddings()
        text = [embed(ids[(ids != model.config.image_token_id) & mask.bool()])
                for ids, mask in zip(inputs["input_ids"], inputs["attention_mask"])]
        relevance = instruction_relevance(space, text, options.get("negate_relevance", False))
        return cdpruner_select(space, relevance, keep, options.get("theta")), space


@pytest.mark.parametrize("options", [{}, dict(theta=0.5, negate_relevance=True)])
def test_llava_end_to_end_matches_the_models_own_pieces(llava, options):
    """Two rows of different instructions, left-padded: each row keeps what the rule computed from the
    model's own tower, projector and embeddings chooses, every decoder layer sees the budget, and the
    logits are the plain language model's on the prompt with only the kept projected patches."""
    model, budget = llava, 64
    inputs = make_inputs(model, batch=2, suffix=(12, 7), seed=1)
    kept, space = _expected_selection(model, inputs, budget, **options)
    reducer = make("cdpruner", budget=budget, **options)
    with torch.no_grad(), reducer(model):
        logits = model(**inputs).logits
    stats = reducer.stats
    assert torch.equal(stats.vision_kept.cpu(), kept + 1)
    for item in stats.items:
        assert item.tokens_per_layer == [budget] * 32
    language, embed = model.model.language_model, model.get_input_embeddings()
    with torch.no_grad():
        for b in range(2):
            alone = row(inputs, b)
            ids = alone["input_ids"][0]
            at = int((ids == model.config.image_token_id).nonzero()[0])
            sequence = torch.cat([embed(ids[:at]), space[b, kept[b]], embed(ids[at + 576 :])])[None]
            plain = model.lm_head(language(inputs_embeds=sequence).last_hidden_state)
            torch.testing.assert_close(logits[b, -1], plain[0, -1], atol=1e-5, rtol=1e-5)
    # The row's instruction conditions its selection: a row alone keeps what it kept in the batch.
    with torch.no_grad(), reducer(model):
        model(**row(inputs, 1))
    assert torch.equal(reducer.stats.vision_kept.cpu(), kept[1:] + 1)


def test_llava_generate_and_compose(llava):
    inputs = make_inputs(llava, seed=2)
    reducer = duet_vlm.Compose(make("cdpruner"), make("fastv"), budget=64)
    with torch.no_grad(), reducer(llava):
        out = llava.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert out.shape[1] == inputs["input_ids"].shape[1] + 3
    (item,) = reducer.stats.items
    assert abs(item.average_tokens - 64) <= 1 and item.tokens_per_layer[0] == reducer.plan(LLAVA15).schedule.llm_input
