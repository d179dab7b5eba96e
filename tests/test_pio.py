"""PIO-FVLM: saliency-ordered NMS, budget solver, proxy-loss saliency, and runs on a tiny LLaVA-1.5."""

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRMSNorm, LlamaRotaryEmbedding

import duet_vlm
from duet_vlm import PIO, Geometry, make
from duet_vlm.methods.pio import SaliencyNMSPrune, saliency_nms

from conftest import make_inputs, make_llava, row

LLAVA15 = Geometry(num_layers=32, visual_tokens=576, grid=(24, 24), has_cls=True)


# ----------------------------------------------------------------------------- NMS
def _cosine(features):
    unit = F.normalize(features.float(), dim=-1)
    return (unit @ unit.transpose(-1, -2)).clamp(-1, 1)


def _reference_nms(saliency, features, keep, threshold):
    """Textbook greedy NMS, one token at a time, then fill with the most salient suppressed tokens."""
    similarity = _cosine(features)
    order = sorted(range(len(saliency)), key=lambda i: (-float(saliency[i]), i))
    kept, suppressed = [], set()
    for i in order:
        if len(kept) == keep:
            break
        if i in suppressed:
            continue
        kept.append(i)
        suppressed |= {j for j in order if j not in kept and similarity[i, j] > threshold}
    fill = [i for i in order if i not in kept][: keep - len(kept)]
    return sorted(kept + fill), len(kept)


def test_nms_hand_example():
    saliency = torch.tensor([0.9, 0.8, 0.7, 0.6, 0.5])
    e1, e2, e3 = torch.eye(3)
    features = torch.stack([e1, e1 + 0.1 * e2, e2, e2 + 0.1 * e3, e3])  # 1 duplicates 0, 3 duplicates 2
    assert saliency_nms(saliency, features, 3, 0.9).tolist() == [0, 2, 4]
    # Only three tokens survive suppression: the most salient suppressed one (1) fills the fourth place.
    assert saliency_nms(saliency, features, 4, 0.9).tolist() == [0, 1, 2, 4]
    assert saliency_nms(saliency, features, 3, 1.0).tolist() == [0, 1, 2]  # no suppression: top-k
    assert saliency_nms(saliency, features, 0, 0.9).shape == (0,)
    two = torch.stack([saliency, saliency.flip(0)])[:, None]
    batched = saliency_nms(two, torch.stack([features] * 2)[:, None], 3, 0.9)
    assert batched.tolist() == [[[0, 2, 4]], [[1, 3, 4]]]  # reversed: 4, then 3 (suppresses 2), then 1


@st.composite
def nms_problems(draw):
    n = draw(st.integers(1, 12))
    # Few distinct directions, so that duplicates and exact ties occur.
    grid = st.integers(-2, 2)
    features = torch.tensor(draw(st.lists(st.lists(grid, min_size=3, max_size=3).filter(any), min_size=n, max_size=n)))
    saliency = torch.tensor(draw(st.lists(st.integers(0, 6), min_size=n, max_size=n)), dtype=torch.float32)
    keep = draw(st.integers(0, n))
    threshold = draw(st.sampled_from([-1.0, -0.3, 0.0, 0.5, 0.8, 0.9, 0.95, 1.0]))
    return saliency, features.float(), keep, threshold


@settings(max_examples=200, deadline=None)
@given(nms_problems())
def test_nms_properties(problem):
    saliency, features, keep, threshold = problem
    kept = saliency_nms(saliency, features, keep, threshold)
    assert kept.shape == (keep,) and kept.dtype == torch.long
    assert len(set(kept.tolist())) == keep and (kept.diff() > 0).all() and ((0 <= kept) & (kept < len(saliency))).all()
    if keep:
        assert int(saliency.argmax()) in kept.tolist()  # the most salient token (lowest index on ties)
    if threshold == 1.0:
        top = sorted(range(len(saliency)), key=lambda i: (-float(saliency[i]), i))[:keep]
        assert kept.tolist() == sorted(top)
    similarity = _cosine(features)
    # A threshold exactly at a similarity value would make the comparison ill-conditioned.
    assume(((similarity - threshold).abs() > 1e-4).all())
    expected, survivors = _reference_nms(saliency, features, keep, threshold)
    assert kept.tolist() == expected
    if survivors == keep:  # enough dissimilar candidates: no kept pair is a duplicate
        pairs = similarity[kept][:, kept] - 2 * torch.eye(keep)
        assert (pairs <= threshold).all()


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 2**16), st.integers(1, 40), st.sampled_from([0.0, 0.3, 0.9]))
def test_nms_batched_equals_row_by_row(seed, n, threshold):
    generator = torch.Generator().manual_seed(seed)
    saliency = torch.rand(2, 3, n, generator=generator)
    features = torch.randn(2, 3, n, 4, generator=generator)
    keep = n // 2
    batched = saliency_nms(saliency, features, keep, threshold)
    for b in range(2):
        for i in range(3):
            assert batched[b, i].tolist() == saliency_nms(saliency[b, i], features[b, i], keep, threshold).tolist()


# ----------------------------------------------------------------------------- budget solver
@pytest.mark.parametrize("budget, llm_input, keep", [(192, 288, 96), (128, 192, 64), (64, 96, 32)])
def test_solver_numbers(budget, llm_input, keep):
    plan = PIO(budget=budget).plan(LLAVA15)
    assert plan.schedule.llm_input == llm_input and plan.schedule.boundaries == ((16, keep),)
    assert plan.schedule.average == budget
    assert PIO(budget=budget).resolve(LLAVA15).positions == "contiguous" and plan.vision.cluster_width is None
    assert plan.vision.contextual == round(llm_input * 10 / 64)
    assert make("pio", budget=budget).plan(LLAVA15).schedule == plan.schedule


def test_every_reachable_budget_is_met_within_one_token():
    for budget in range(1, 386):
        assert abs(PIO(budget=budget).plan(LLAVA15).schedule.average - budget) <= 1, budget
    with pytest.raises(ValueError, match="at most 384 .*vision=False"):
        PIO(budget=386).plan(LLAVA15)  # a third of all 576 tokens after layer 16 is the ceiling
    for budget in range(288, 576):
        schedule = PIO(budget=budget, vision=False).plan(LLAVA15).schedule
        assert schedule.llm_input == 576 and abs(schedule.average - budget) <= 1, budget


def test_llm_only_mode_names_the_minimum():
    schedule = PIO(budget=300, vision=False).plan(LLAVA15).schedule
    assert schedule.boundaries == ((16, 24),) and schedule.average == 300
    for budget in (192, 128, 64):
        with pytest.raises(ValueError, match=r"cannot average fewer than 288 .*vision=True"):
            PIO(budget=budget, vision=False).plan(LLAVA15)
    # Earlier boundaries reach lower budgets: 4 layers at 576, then 64.
    assert PIO(budget=128, vision=False, layers=(4,)).plan(LLAVA15).schedule.boundaries == ((4, 64),)


def test_explicit_parameters_override_the_solver():
    assert PIO(llm_input=96).plan(LLAVA15).schedule.boundaries == ((16, 32),)
    assert PIO(llm_input=120, keep=(40,), layers=(8,)).plan(LLAVA15).schedule.boundaries == ((8, 40),)
    solved = PIO(budget=64, keep=(16,)).plan(LLAVA15).schedule  # the LLM input is solved around the keep
    assert solved.boundaries == ((16, 16),) and solved.llm_input == 112
    assert PIO(vision=False, keep=(100,)).plan(LLAVA15).schedule.tokens_per_layer[15:17] == [576, 100]
    two = PIO(budget=128, layers=(8, 16)).plan(LLAVA15).schedule
    assert [k for _, k in two.boundaries] == [round(two.llm_input / 3), round(two.llm_input / 9)]
    assert PIO(budget=64, contextual=0).plan(LLAVA15).vision.contextual == 0  # plain CLS-attention top-k
    assert PIO(llm_input=96, layers=()).plan(LLAVA15).language is None
    assert PIO(budget=64).schedule_for(LLAVA15, 300).boundaries == ((16, 100),)  # as a Compose half


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(), "budget must be a positive int"),
        (dict(budget=0), "budget must be a positive int"),
        (dict(budget=64.0), "budget must be a positive int"),
        (dict(budget=64, saliency="attention"), "saliency must be one of"),
        (dict(budget=64, threshold=1.5), r"threshold must be a cosine similarity in \[-1, 1\]"),
        (dict(budget=64, threshold="high"), "threshold must be a number"),
        (dict(budget=64, prediction_tokens=0), "prediction_tokens must be a positive int"),
        (dict(budget=300, vision=False, llm_input=300), r"llm_input needs the vision-side pre-filter \(vision=True\)"),
        (dict(budget=64, layers=(16, 8)), "layers must be strictly increasing"),
        (dict(budget=64, layers=(8, 16), keep=(32,)), "2 boundary layers but 1 keep counts"),
        (dict(budget=64, keep=(40, 20)), "give layers with more than one keep count"),
        (dict(budget=64, ratios=(0.0,)), r"ratios must lie in \(0, 1\]"),
        (dict(budget=64, llm_input=-1), "llm_input must be a non-negative int"),
        (dict(budget=64, positions="shifted"), "positions must be 'contiguous' or 'original'"),
    ],
)
def test_bad_options_are_refused(options, message):
    with pytest.raises(ValueError, match=message):
        PIO(**options)


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(llm_input=600), "llm_input=600 exceeds the 576 visual tokens"),
        (dict(llm_input=50, keep=(60,)), r"keep=\(60,\) exceeds the 50 tokens entering the LLM"),
        (dict(budget=20, keep=(60,)), r"keep=\(60,\) exceeds the 20 tokens entering the LLM"),
        (dict(budget=64, layers=(32,)), r"boundary layers must lie inside \(0, 32\)"),
    ],
)
def test_impossible_schedules_are_refused_at_plan_time(options, message):
    with pytest.raises(ValueError, match=message):
        PIO(**options).plan(LLAVA15)


# ----------------------------------------------------------------------------- saliency
def _tiny_block_view(batch=2, length=10):
    config = LlamaConfig(
        vocab_size=50, hidden_size=16, intermediate_size=32, num_attention_heads=2, num_key_value_heads=2, head_dim=8
    )
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    layer, norm = LlamaDecoderLayer(config, layer_idx=0), LlamaRMSNorm(16)
    head = torch.nn.Linear(16, 50, bias=False)
    hidden = torch.randn(batch, length, 16)
    position_ids = torch.arange(length)[None]
    cos_sin = LlamaRotaryEmbedding(config)(hidden, position_ids)
    causal = torch.full((length, length), float("-inf")).triu(1)[None, None]

    def run(x):
        out = layer(x, attention_mask=causal, position_ids=position_ids, position_embeddings=cos_sin)
        return out[0] if isinstance(out, tuple) else out

    view = SimpleNamespace(
        hidden_states=hidden,
        visual_index=torch.arange(2, 8).expand(batch, 1, -1),
        text_after_image=[torch.tensor([8, 9]), torch.tensor([9])][:batch],
        run_layer=run,
        output_head=lambda y: head(norm(y)),
    )
    return view, [layer, norm, head]


@pytest.mark.parametrize("kind", ["grad_norm", "grad_x_input"])
def test_saliency_equals_a_direct_autograd_computation(kind):
    view, modules = _tiny_block_view()
    scores = SaliencyNMSPrune(saliency=kind).score(view)
    for b, positions in enumerate(view.text_after_image):
        x = view.hidden_states[b : b + 1].clone().requires_grad_()
        logits = view.output_head(view.run_layer(x)[0, positions[-2:]])
        F.cross_entropy(logits, logits.argmax(-1)).backward()  # mean over the (up to) two last tokens
        grad, value = x.grad[0, 2:8], view.hidden_states[b, 2:8]
        expected = grad.norm(dim=-1) if kind == "grad_norm" else (grad * value).sum(-1).abs()
        torch.testing.assert_close(scores[b, 0], expected, atol=1e-6, rtol=1e-5)
    for module in modules:
        for param in module.parameters():
            param.grad = None


def test_scoring_leaves_parameter_gradients_alone():
    view, modules = _tiny_block_view()
    params = [p for m in modules for p in m.parameters()]
    SaliencyNMSPrune().score(view)
    assert all(p.grad is None for p in params)
    for p in params:
        p.grad = torch.ones_like(p)
    SaliencyNMSPrune().select(view, 3)
    assert all(torch.equal(p.grad, torch.ones_like(p)) for p in params)


def test_select_keeps_k_per_image_and_inference_mode_is_refused():
    view, _ = _tiny_block_view()
    kept = SaliencyNMSPrune(threshold=0.5).select(view, 4)
    assert kept.shape == (2, 1, 4) and (kept.diff(dim=-1) > 0).all()
    with torch.inference_mode(), pytest.raises(RuntimeError, match="inference_mode"):
        SaliencyNMSPrune().score(view)


# ----------------------------------------------------------------------------- end to end on LLaVA-1.5 geometry
@pytest.mark.parametrize("options", [dict(budget=192), dict(budget=300, vision=False)], ids=["ve-192", "llm-300"])
def test_layers_see_the_scheduled_counts_and_kv_lengths(llava15, options):
    inputs = make_inputs(llava15, batch=2, suffix=(12, 9))
    text = inputs["input_ids"].shape[1] - 576
    reducer = PIO(**options)
    calls = []  # (layer, visual tokens, grad enabled): the scoring pass is the only call with grad on

    def count(index):
        def hook(module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            calls.append((index, hidden.shape[1] - text, torch.is_grad_enabled()))

        return hook

    layers = llava15.model.language_model.layers
    with torch.no_grad(), reducer(llava15):
        handles = [layer.register_forward_pre_hook(count(i), with_kwargs=True) for i, layer in enumerate(layers)]
        try:
            out = llava15.generate(**inputs, max_new_tokens=1, do_sample=False, return_dict_in_generate=True)
        finally:
            for handle in handles:
                handle.remove()
    schedule = PIO(**options).plan(LLAVA15).schedule
    assert [n for _, n, grad in calls if not grad] == reducer.stats.tokens_per_layer == schedule.tokens_per_layer
    # One extra run of the block after the boundary, on the tokens that reached the boundary.
    assert [(i, n) for i, n, grad in calls if grad] == [(16, schedule.tokens_per_layer[15])]
    assert abs(reducer.stats.average_tokens - options["budget"]) <= 1
    lengths = [layer.keys.shape[2] for layer in out.past_key_values.layers]
    assert lengths == [text + n for n in reducer.stats.tokens_per_layer]  # the scoring pass wrote no cache


def test_padded_batch_equals_single_runs(llava15):
    inputs = make_inputs(llava15, batch=2, suffix=(12, 7), seed=7)  # row 1 is left-padded
    reducer = PIO(budget=64)
    with torch.no_grad(), reducer(llava15):
        batch = llava15.generate(**inputs, max_new_tokens=3, do_sample=False)
        batch_kept = reducer.stats.stage_kept[0][1]
        single = llava15.generate(**row(inputs, 1), max_new_tokens=3, do_sample=False)
    assert batch_kept.shape == (2, 1, 32)
    assert reducer.stats.stage_kept[0][1][0].tolist() == batch_kept[1].tolist()
    assert single[0, -3:].tolist() == batch[1, -3:].tolist()


def test_training_backward_leaves_the_scoring_out_of_the_gradients():
    model = make_llava(layers=4, image_size=112, seed=5).train()  # 64 patches
    inputs = make_inputs(model, batch=2, suffix=(10, 7), seed=3)
    labels = torch.full_like(inputs["input_ids"], -100)
    labels[:, -3:] = inputs["input_ids"][:, -3:]
    reducer = PIO(llm_input=24, layers=(2,), keep=(8,))
    with reducer(model):
        loss = model(**inputs, labels=labels).loss
        assert all(p.grad is None for p in model.parameters())  # the one-block backward stayed local
        loss.backward()
        grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
        model(**inputs, labels=labels)  # scoring again must not add to existing gradients
    assert all(torch.equal(p.grad, grads[name]) for name, p in model.named_parameters() if p.grad is not None)
    assert torch.isfinite(loss) and reducer.stats.tokens_per_layer == [24, 24, 8, 8]
    layers = model.model.language_model.layers
    projector = model.model.multi_modal_projector.linear_1.weight
    for param in (projector, layers[0].mlp.down_proj.weight, layers[3].self_attn.q_proj.weight):
        assert param.grad is not None and param.grad.abs().sum() > 0
    model.zero_grad(set_to_none=True)
    model.activation_checkpointing_enable()
    with reducer(model):
        model(**inputs, labels=labels).loss.backward()
    assert model.model.multi_modal_projector.linear_2.weight.grad.abs().sum() > 0


def test_registered_and_exported():
    assert duet_vlm.METHODS["pio"] is PIO and isinstance(make("pio", budget=64), PIO)
    assert duet_vlm.saliency_nms is saliency_nms and duet_vlm.SaliencyNMSPrune is SaliencyNMSPrune
