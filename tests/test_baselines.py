"""Selection rules and budget solvers of the simple baselines (FastV, PyramidDrop, VisionZip, random, pool, full)."""

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from duet_vlm import Compose, FastV, Geometry, Pool, PyramidDrop, RandomDrop, VisionZip, make
from duet_vlm.methods.base import VisionView
from duet_vlm.methods.fastv import LastTokenAttention, fastv_keep
from duet_vlm.methods.pool import GridPool, pool_grid, pooled_centres
from duet_vlm.methods.pyramiddrop import LastInstructionAttention, pyramid_schedule
from duet_vlm.methods.random_drop import random_patches
from duet_vlm.methods.visionzip import visionzip_split

from models import IMAGE_TOKEN, make_inputs, make_llava

LLAVA15 = Geometry(num_layers=32, visual_tokens=576, grid=(24, 24), has_cls=True)
MINE = ("fastv", "pyramiddrop", "visionzip", "random", "pool", "full")


@pytest.fixture(scope="module")
def eager6():
    """Six decoder layers, 8x8 patches and eager attention, so ``output_attentions`` gives the maps."""
    return make_llava(layers=6, image_size=112, attn="eager", seed=3)


def _attention_to_image(model, inputs, layer):
    """Head-mean attention of the last token to the image tokens in decoder layer ``layer`` (unreduced)."""
    with torch.no_grad():
        attentions = model(**inputs, output_attentions=True).attentions
    image = (inputs["input_ids"][0] == IMAGE_TOKEN).nonzero()[:, 0]
    return attentions[layer][0, :, -1, image].float().mean(0)


def _kept_after_first_boundary(reducer, model, inputs):
    with torch.no_grad(), reducer(model):
        model(**inputs)
    return reducer.stats.stage_kept[0][1][0, 0]


def _stub_view(scores, valid, text_after_image):
    calls = []

    def attention(queries, previous_layer=False):
        calls.append(([q.tolist() for q in queries], previous_layer))
        return scores

    return SimpleNamespace(valid=valid, text_after_image=text_after_image, text_to_visual_attention=attention), calls


# ----------------------------------------------------------------------------- FastV
def test_fastv_budget_solver_matches_the_layer_average_convention():
    assert [fastv_keep(b, 32, 576, 2) for b in (192, 128, 64)] == [166, 98, 30]
    for budget, keep in ((192, 166), (128, 98), (64, 30)):
        schedule = FastV(budget=budget).plan(LLAVA15).schedule
        assert schedule.boundaries == ((2, keep),) and schedule.llm_input == 576
        assert abs(schedule.average - budget) <= 1
    assert fastv_keep(128, 32, 576, 3) == round((128 * 32 - 3 * 576) / 29)
    with pytest.raises(ValueError, match="first 2 layers"):
        fastv_keep(20, 32, 576, 2)  # two full layers alone average 36


def test_fastv_explicit_keep_and_ratio_override_the_solver():
    assert FastV(budget=64, keep=144).plan(LLAVA15).schedule.boundaries == ((2, 144),)
    assert FastV(layer=3, ratio=0.5).plan(LLAVA15).schedule.boundaries == ((3, 288),)
    assert FastV().schedule_for(LLAVA15, 200).boundaries == ((2, 100),)  # the paper's R = 50% in a Compose
    assert FastV(keep=150).schedule_for(LLAVA15, 100).boundaries == ((2, 100),)


def test_fastv_keeps_the_top_k_of_the_last_tokens_row():
    scores = torch.tensor([[[0.1, 0.9, 0.3, 0.8, 0.05, 0.7]]])
    valid = torch.tensor([[False, True, True, True, True]])
    view, calls = _stub_view(scores, valid, [torch.tensor([2])])
    assert LastTokenAttention().select(view, 3).tolist() == [[[1, 3, 5]]]
    assert calls == [([[4]], True)]  # the last valid token, scored by the previous layer


def test_fastv_selection_equals_top_k_of_eager_attention_in_layer_k_minus_1(eager6):
    inputs = make_inputs(eager6, seed=1)
    row = _attention_to_image(eager6, inputs, layer=1)
    kept = _kept_after_first_boundary(FastV(layer=2, keep=20), eager6, inputs)
    assert kept.tolist() == row.topk(20).indices.sort().values.tolist()


# ----------------------------------------------------------------------------- PyramidDrop
@pytest.mark.parametrize(
    "budget, layers, keeps",
    [(300, (8, 16, 24), (329, 188, 107)), (192, (2, 8, 16), (322, 180, 101)), (128, (2, 8, 16), (242, 102, 42)), (64, (2, 8, 16), (111, 21, 4))],
)
def test_pyramiddrop_budget_rule(budget, layers, keeps):
    schedule, decay = pyramid_schedule(budget, 32, 576)
    assert schedule.boundaries == tuple(zip(layers, keeps))
    assert abs(schedule.average - budget) <= 1
    assert keeps == tuple(int(576 * decay**s) for s in (1, 2, 3))  # lambda^s of the LLM-input count
    assert PyramidDrop(budget=budget).plan(LLAVA15).schedule == schedule


def test_pyramiddrop_never_starves_the_later_layers():
    # Solving lambda on [8, 16, 24] just above its floor of 144 would give 576/4/0/0.
    for budget in range(100, 300, 7):
        schedule, decay = pyramid_schedule(budget, 32, 576)
        assert decay > 0.15 and schedule.boundaries[-1][1] > 0


def test_pyramiddrop_defaults_and_overrides():
    assert PyramidDrop(decay=0.5).plan(LLAVA15).schedule.tokens_per_layer[::8] == [576, 288, 144, 72]
    explicit = PyramidDrop(budget=64, layers=(4, 12), ratios=(0.5, 0.1)).plan(LLAVA15).schedule
    assert explicit.boundaries == ((4, 288), (12, 57))
    assert PyramidDrop(budget=100, layers=(2, 8, 16)).plan(LLAVA15).schedule.boundaries[0][0] == 2
    with pytest.raises(ValueError, match="no lambda"):
        pyramid_schedule(20, 32, 576)
    with pytest.raises(ValueError, match="explicit ratios need layers"):
        PyramidDrop(ratios=(0.5,))


def test_pyramiddrop_queries_the_last_instruction_token():
    scores = torch.rand(2, 1, 6)
    view, calls = _stub_view(scores, None, [torch.tensor([7, 8, 9]), torch.tensor([4, 5])])
    assert torch.equal(LastInstructionAttention().score(view), scores)
    assert calls == [([[9], [5]], False)]  # next layer's projections


def test_pyramiddrop_selection_equals_top_k_of_the_next_layers_eager_attention(eager6):
    inputs = make_inputs(eager6, seed=2)
    row = _attention_to_image(eager6, inputs, layer=2)  # scored with layer 2 after boundary 2
    kept = _kept_after_first_boundary(PyramidDrop(layers=(2, 4), ratios=(0.25, 0.1)), eager6, inputs)
    assert kept.tolist() == row.topk(16).indices.sort().values.tolist()


# ----------------------------------------------------------------------------- VisionZip
def test_visionzip_split():
    assert [visionzip_split(k) for k in (192, 128, 64)] == [(162, 30), (108, 20), (54, 10)]
    for budget in (192, 128, 64):
        plan = VisionZip(budget=budget).plan(LLAVA15)
        assert plan.schedule.llm_input == budget and plan.schedule.average == budget
        assert plan.vision.cluster_width is None and plan.vision.contextual == visionzip_split(budget)[1]
    assert VisionZip(dominant=40, contextual=8).plan(LLAVA15).schedule.llm_input == 48


def _view_4x4(channels=3):
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(1, 17, channels, generator=generator)
    keys = torch.randn(1, 17, 5, generator=generator)
    cls_attention = torch.zeros(1, 16)
    cls_attention[0, [0, 5, 10, 15]] = torch.tensor([4.0, 3.0, 2.0, 1.0])  # the diagonal dominates
    return VisionView(features, cls_attention, keys, (4, 4), True)


def test_visionzip_anchors_are_spatially_uniform_over_the_residual_tokens():
    view = _view_4x4()
    out = VisionZip(dominant=5, contextual=3).vision_stage_for(None, 8).reduce(view, 8)
    assert out.roles["dominant"].tolist() == [[0, 1, 6, 11, 16]]  # CLS + the diagonal patches
    residual = [t for t in range(1, 17) if t not in (1, 6, 11, 16)]  # 12 tokens, step 12 // 3 = 4
    assert out.roles["anchors"].tolist() == [residual[0::4][:3]]
    assert sorted(out.roles["members"][0].tolist()) == sorted(set(residual) - set(residual[0::4]))
    # each contextual token is its anchor plus the mean of the members nearest to it (cosine of keys)
    keys = F.normalize(view.keys[0], dim=-1)
    anchors, members = out.roles["anchors"][0], out.roles["members"][0]
    nearest = (keys[members] @ keys[anchors].T).argmax(1)
    for j, anchor in enumerate(anchors):
        group = members[nearest == j]
        expected = view.features[0, anchor] + (view.features[0, group].mean(0) if len(group) else 0)
        torch.testing.assert_close(out.features[0, 5 + j], expected)


# ----------------------------------------------------------------------------- random
def test_random_is_deterministic_per_seed_and_keeps_the_count():
    first = random_patches(576, 128, seed=3)
    assert torch.equal(first, random_patches(576, 128, seed=3))
    assert not torch.equal(first, random_patches(576, 128, seed=4))
    assert len(first) == 128 and len(set(first.tolist())) == 128
    assert torch.equal(first, first.sort().values) and 0 <= first.min() and first.max() < 576
    with pytest.raises(ValueError, match="cannot keep 17 of 16 patches"):
        random_patches(16, 17, seed=0)


def test_random_stage_takes_the_same_patches_for_every_image_and_never_the_cls():
    view = _view_4x4()
    view = VisionView(view.features.repeat(3, 1, 1), view.cls_attention.repeat(3, 1), view.keys, (4, 4), True)
    out = RandomDrop(budget=5, seed=7).vision_stage_for(Geometry(1, 16, (4, 4), True), 5).reduce(view, 5)
    expected = random_patches(16, 5, seed=7) + 1
    assert out.kept.tolist() == [expected.tolist()] * 3
    assert torch.equal(out.features, view.features[:, expected])


# ----------------------------------------------------------------------------- pool
def test_pool_grid_choice():
    assert [pool_grid(n, (24, 24), tolerance=1) for n in (192, 128, 64)] == [(12, 16), (8, 16), (8, 8)]
    assert pool_grid(143, (24, 24), tolerance=1) == (11, 13)  # an exact count beats a squarer 12 x 12
    assert pool_grid(8, (4, 8)) == (2, 4) and pool_grid(8, (8, 4)) == (4, 2)  # the grid's aspect ratio
    with pytest.raises(ValueError, match="no pooled grid"):
        pool_grid(557, (24, 24), tolerance=1)  # 556, 557 and 558 have no factors that both fit in 24
    for budget in (192, 128, 64):
        assert abs(Pool(budget=budget).plan(LLAVA15).schedule.average - budget) <= 1


def test_pool_output_equals_avg_pool2d_of_the_patch_grid():
    view = _view_4x4(channels=2)
    out = GridPool((2, 2)).reduce(view, 4)
    grid = view.features[0, 1:].T.reshape(1, 2, 4, 4)
    expected = F.avg_pool2d(grid, kernel_size=2).flatten(2).transpose(1, 2)
    torch.testing.assert_close(out.features, expected, rtol=0, atol=1e-6)
    # hand check of the first cell: patches (0,0), (0,1), (1,0), (1,1) = tokens 1, 2, 5, 6
    torch.testing.assert_close(out.features[0, 0], view.features[0, [1, 2, 5, 6]].mean(0))
    assert out.kept.tolist() == [[1, 3, 9, 11]]  # a patch inside each cell, CLS excluded

    features = torch.randn(2, 577, 4)
    view = VisionView(features, torch.rand(2, 576), torch.randn(2, 577, 3), (24, 24), True)
    out = Pool(budget=64).plan(LLAVA15).vision.reduce(view, 64)
    expected = F.avg_pool2d(features[:, 1:].transpose(1, 2).reshape(2, 4, 24, 24), 3).flatten(2).transpose(1, 2)
    torch.testing.assert_close(out.features, expected, rtol=0, atol=1e-6)
    assert pooled_centres((24, 24), (8, 8))[:2].tolist() == [1 * 24 + 1, 1 * 24 + 4]


# ----------------------------------------------------------------------------- all of mine
@pytest.mark.parametrize("name", MINE)
@pytest.mark.parametrize("budget", [0, -1, 1.5, True, "64"])
def test_bad_budgets_are_refused(name, budget):
    with pytest.raises(ValueError, match="budget"):
        make(name, budget=budget)


def test_other_bad_options_are_refused():
    for bad, message in (
        (dict(layer=0), "layer must be an int >= 1"),
        (dict(keep=-1), "keep must be an int >= 0"),
        (dict(ratio=1.5), r"ratio must lie in \[0, 1\]"),
        (dict(keep=10, ratio=0.5), "give keep or ratio, not both"),
        (dict(positions="x"), "positions must be 'contiguous' or 'original'"),
    ):
        with pytest.raises(ValueError, match=message):
            FastV(budget=64, **bad)
    for bad, message in (
        (dict(decay=2.0), r"decay must lie in \[0, 1\]"),
        (dict(layers=()), "needs at least one boundary layer"),
        (dict(ratios=(0.5,), decay=0.5), "give ratios or decay, not both"),
        (dict(positions="x"), "positions must be 'contiguous' or 'original'"),
    ):
        with pytest.raises(ValueError, match=message):
            PyramidDrop(budget=64, **bad)
    with pytest.raises(ValueError, match="dominant counts the CLS token"):
        VisionZip(dominant=0, contextual=4)
    with pytest.raises(ValueError, match="shape must be two positive ints"):
        Pool(shape=(0, 4))
    with pytest.raises(ValueError, match="larger than"):
        Pool(shape=(30, 2)).plan(LLAVA15)
    with pytest.raises(ValueError, match="layers"):
        FastV(budget=64, layer=32).plan(LLAVA15)
    for name in ("fastv", "pyramiddrop", "visionzip", "random", "pool"):
        with pytest.raises(ValueError, match="needs a budget"):
            make(name).plan(LLAVA15)


def test_full_is_bit_identical_to_no_reducer(llava15):
    inputs = make_inputs(llava15, batch=2, suffix=(12, 7))
    with torch.no_grad():
        plain = llava15(**inputs).logits
        plain_tokens = llava15.generate(**inputs, max_new_tokens=3, do_sample=False)
        reducer = make("full", budget=64)
        with reducer(llava15):
            assert torch.equal(llava15(**inputs).logits, plain)
            assert reducer.stats.tokens_per_layer == [576] * 32
            assert torch.equal(llava15.generate(**inputs, max_new_tokens=3, do_sample=False), plain_tokens)
    assert reducer.stats.flops_exact == reducer.stats.flops_exact_full


# ----------------------------------------------------------------------------- composition
@pytest.mark.parametrize("vision", ["visionzip", "random", "pool"])
@pytest.mark.parametrize("language", ["pyramiddrop", "fastv"])
def test_compose_plans_split_one_budget(vision, language):
    for budget in (192, 128, 64):
        try:
            plan = Compose(make(vision), make(language), budget=budget).plan(LLAVA15)
        except ValueError as error:  # a pooled grid needs a factorable token count
            assert vision == "pool" and "no pooled grid" in str(error)
            continue
        assert abs(plan.schedule.average - budget) <= 1
        assert plan.vision is not None and plan.language is not None
    plan = Compose(make("visionzip"), make("pyramiddrop"), budget=128).plan(LLAVA15)
    assert plan.schedule.llm_input == 273 and plan.vision.contextual == visionzip_split(273)[1]


def test_compose_visionzip_then_pyramiddrop_runs(llava15):
    reducer = Compose(make("visionzip"), make("pyramiddrop"), budget=128)
    inputs = make_inputs(llava15)
    with torch.no_grad(), reducer(llava15):
        llava15.generate(**inputs, max_new_tokens=2, do_sample=False)
    stats = reducer.stats
    assert abs(stats.average_tokens - 128) <= 1 and stats.llm_input_tokens == 273
    assert sorted(set(stats.tokens_per_layer), reverse=True) == [273, 136, 68, 34]
    assert stats.vision_roles["anchors"].shape == (1, visionzip_split(273)[1])

