"""Random at the information horizon: where it drops, that its draw is uniform and its own (seed,
layer, token) alone, and its composition with a vision-side method (the paper's "DivPrune + random").

The invariant matrix (``test_methods_matrix.py``, ``test_invariants.py``: every family, the ideal,
padded batches against single rows) covers it as a registered method; this file holds what is
particular to it. The paper's code is unreleased, so there is nothing official to replay.
"""

import warnings

import pytest
import torch

import duet_vlm
from duet_vlm.geometry import Geometry
from duet_vlm.methods.random_horizon import HorizonWarning

from models import make_inputs, make_llava

LLAVA = Geometry(32, 576, (24, 24), True)


@pytest.fixture(scope="module")
def tiny():
    model = make_llava(layers=8, image_size=112, seed=0)  # 64 visual tokens; the horizon at layer 5
    return model, make_inputs(model, batch=1, seed=1)


def _kept(model, inputs, reducer) -> list[list[int]]:
    with torch.no_grad(), reducer(model):
        model(**inputs)
    (layer, kept), = reducer.stats.stage_kept
    return layer, kept.reshape(kept.shape[0], -1).tolist()


def test_the_horizon_sits_at_twenty_of_thirty_two_layers_and_scales_with_depth():
    assert duet_vlm.make("random_horizon", budget=400).plan(LLAVA).schedule.boundaries == ((20, 107),)
    assert duet_vlm.make("random_horizon", keep=100).plan(Geometry(28, 576, (24, 24), True)).schedule.boundaries == ((18, 100),)
    assert duet_vlm.make("random_horizon", budget=400, layer=8).plan(LLAVA).schedule.boundaries[0][0] == 8


def test_a_budget_below_the_horizons_floor_drops_earlier_and_says_so():
    """Alone, the first 20 of 32 layers see all 576 tokens: 360 per layer at least. Below that the
    default layer moves to the deepest that meets the budget (192: after layer 10), with a warning;
    an explicit layer is refused instead, naming its floor."""
    with pytest.warns(HorizonWarning, match="below the 360.0 visual tokens .* drops after layer 10 instead"):
        plan = duet_vlm.make("random_horizon", budget=192).plan(LLAVA)
    (layer, keep), = plan.schedule.boundaries
    assert layer == 10 and abs(plan.schedule.average - 192) <= 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        duet_vlm.make("random_horizon", budget=400).plan(LLAVA)  # above the floor: silent
    with pytest.raises(ValueError, match="the first 20 layers alone give 360.0"):
        duet_vlm.make("random_horizon", budget=192, layer=20).plan(LLAVA)
    with pytest.raises(ValueError, match="the first 1 layers alone give 18.0"):
        duet_vlm.make("random_horizon", budget=8).plan(LLAVA)


@pytest.mark.parametrize("budget", [192, 128, 64])
def test_composed_after_divprune_it_meets_the_papers_budgets(budget):
    """``Compose(divprune, random_horizon)``: DivPrune picks what enters, half of it is dropped at random
    at the horizon, and the layer average is the budget (within one token)."""
    plan = duet_vlm.Compose(duet_vlm.make("divprune"), duet_vlm.make("random_horizon"), budget=budget).resolve(LLAVA)
    (layer, keep), = plan.schedule.boundaries
    assert layer == 20 and keep == plan.schedule.llm_input // 2
    assert abs(plan.schedule.average - budget) <= 1


def test_the_draw_is_the_seeds_alone(tiny):
    """The same seed keeps the same tokens call after call; another seed others. The stage reads no
    attention (``reads = None``), so nothing of the model's state could steer it."""
    model, inputs = tiny
    layer, first = _kept(model, inputs, duet_vlm.make("random_horizon", keep=16, seed=3))
    assert layer == 5 and len(first[0]) == 16
    assert _kept(model, inputs, duet_vlm.make("random_horizon", keep=16, seed=3))[1] == first
    assert _kept(model, inputs, duet_vlm.make("random_horizon", keep=16, seed=4))[1] != first
    assert duet_vlm.RandomHorizon.language_stage(duet_vlm.make("random_horizon", keep=16)).reads is None


def test_the_draw_depends_on_the_seed_and_the_boundary_layer(tiny):
    """The tokens kept at layer L under seed s are the top 16 of 64 uniform draws from a generator
    seeded ``s * 1_000_003 + L``, one draw per token in the order of the visual block: the same seed
    keeps other tokens at another boundary (a draw that ignored the layer would keep the same)."""
    model, inputs = tiny
    kept = {}
    for layer in (3, 5):
        at, (kept[layer],) = _kept(model, inputs, duet_vlm.make("random_horizon", keep=16, seed=3, layer=layer))
        assert at == layer
        draws = torch.rand(64, generator=torch.Generator().manual_seed(3 * 1_000_003 + layer))
        assert kept[layer] == draws.topk(16).indices.sort().values.tolist()
    assert kept[3] != kept[5]


def test_every_token_is_as_likely_to_be_kept(tiny):
    """Over 60 seeds keeping 16 of 64, each token is kept 15 times on average; none is kept in every
    draw or never (a top-k of a fixed score, or a draw that ignores the seed, would), and the counts
    spread as a binomial's (a bias toward early or late tokens would move the halves apart)."""
    model, inputs = tiny
    counts = torch.zeros(64)
    for seed in range(60):
        _, (kept,) = _kept(model, inputs, duet_vlm.make("random_horizon", keep=16, seed=seed))
        counts[kept] += 1
    assert counts.sum() == 60 * 16
    assert 0 < counts.min() and counts.max() < 60
    assert abs(counts[:32].sum() - counts[32:].sum()) < 0.15 * counts.sum()
    assert counts.std() < 2 * (60 * 0.25 * 0.75) ** 0.5  # binomial s.d. ~3.4


def test_bad_options_are_refused_when_built():
    with pytest.raises(ValueError, match="seed must be"):
        duet_vlm.make("random_horizon", keep=8, seed=1.5)
    with pytest.raises(ValueError, match="layer must be an int >= 1"):
        duet_vlm.make("random_horizon", budget=400, layer=0)
    with pytest.raises(ValueError, match="give keep or ratio, not both"):
        duet_vlm.RandomHorizon(keep=8, ratio=0.5)
