"""PIO-FVLM / TRIO as the official code runs it: saliency-ordered NMS (cos >= 0.8), the schedules of the
official scripts and the solver around them, the proxy-loss saliency at S-5..S-2, runs on a tiny LLaVA-1.5."""

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRMSNorm, LlamaRotaryEmbedding

import duet_vlm
from duet_vlm import PIO, Geometry, compat, make
from duet_vlm.compat import enable_checkpointing
from duet_vlm.methods.pio import SaliencyNMSPrune, proxy_positions, saliency_nms
from duet_vlm.methods.trio_scan import GlobalLocalScan

from checks import cosine, reference_nms
from models import make_inputs, make_llava, row

LLAVA15 = Geometry(num_layers=32, visual_tokens=576, grid=(24, 24), has_cls=True)
QWEN = Geometry(num_layers=28, visual_tokens=1024, grid=(32, 32), has_cls=False, rope="mrope")


# ----------------------------------------------------------------------------- NMS
def test_nms_hand_example():
    saliency = torch.tensor([0.9, 0.8, 0.7, 0.6, 0.5])
    e1, e2, e3 = torch.eye(3)
    features = torch.stack([e1, e1 + 0.1 * e2, e2, e2 + 0.1 * e3, e3])  # 1 duplicates 0, 3 duplicates 2
    assert saliency_nms(saliency, features, 3).tolist() == [0, 2, 4]  # the official threshold, 0.8
    # Only three tokens survive suppression: the most salient suppressed one (1) fills the fourth place.
    assert saliency_nms(saliency, features, 4, 0.9).tolist() == [0, 1, 2, 4]
    assert saliency_nms(saliency, features, 3, 1.01).tolist() == [0, 1, 2]  # no suppression: top-k
    assert saliency_nms(saliency, features, 0, 0.9).shape == (0,)
    # At exactly the threshold a token is suppressed (cos >= tau, the official rule).
    at = torch.tensor([[1.0, 0.0], [0.8, 0.6]])
    assert saliency_nms(torch.tensor([2.0, 1.0]), at, 1, 0.8).tolist() == [0]
    assert saliency_nms(torch.tensor([2.0, 1.0, 0.5]), torch.cat([at, torch.tensor([[0.0, 1.0]])]), 2, 0.8).tolist() == [0, 2]
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
    threshold = draw(st.sampled_from([-1.0, -0.3, 0.0, 0.5, 0.8, 0.9, 0.95, 1.01]))
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
    if threshold > 1:
        top = sorted(range(len(saliency)), key=lambda i: (-float(saliency[i]), i))[:keep]
        assert kept.tolist() == sorted(top)
    similarity = cosine(features)
    # A threshold exactly at a similarity value would make the comparison ill-conditioned.
    assume(((similarity - threshold).abs() > 1e-4).all())
    expected, survivors = reference_nms(saliency, features, keep, threshold)
    assert kept.tolist() == expected
    if survivors == keep:  # enough dissimilar candidates: no kept pair is a duplicate
        pairs = similarity[kept][:, kept][~torch.eye(keep, dtype=torch.bool)]
        assert (pairs < threshold).all()  # suppression is at cos >= threshold


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


# ----------------------------------------------------------------------------- schedules
@pytest.mark.parametrize("budget, llm_input, keep", [(192, 288, 96), (128, 192, 64), (64, 96, 32)])
def test_solver_numbers_with_the_vision_scan(budget, llm_input, keep):
    """64 is the official README default (96 -> 32 after layer 16); 128 and 192 keep its shape."""
    plan = PIO(budget=budget).plan(LLAVA15)
    assert plan.schedule.llm_input == llm_input and plan.schedule.boundaries == ((16, keep),)
    assert plan.schedule.average == budget
    assert PIO(budget=budget).resolve(LLAVA15).positions == "contiguous"
    assert plan.vision == GlobalLocalScan(window=6, local_share=0.5, local_layer=5, global_layer=-2)
    assert plan.language == SaliencyNMSPrune(threshold=0.8, proxy_tokens=4, probe="next")
    assert make("pio", budget=budget).plan(LLAVA15).schedule == plan.schedule


@pytest.mark.parametrize("budget, keeps", [(128, (218, 128, 54)), (64, (92, 54, 22))])
def test_the_official_schedules_without_the_scan(budget, keeps):
    """The eval scripts' (128) and textvqa_set scripts' (64) "w/o VE" schedules: after layers 1, 10, 15."""
    schedule = PIO(budget=budget, vision=False).plan(LLAVA15).schedule
    assert schedule.llm_input == 576 and schedule.boundaries == tuple(zip((1, 10, 15), keeps))
    assert schedule.average == budget


def test_every_reachable_budget_is_met_within_one_token():
    for budget in range(1, 385):
        assert abs(PIO(budget=budget).plan(LLAVA15).schedule.average - budget) <= 1, budget
    with pytest.raises(ValueError, match="at most 384 .*vision=False"):
        PIO(budget=386).plan(LLAVA15)  # a third of all 576 tokens after layer 16 is the ceiling
    for budget in range(19, 310):  # the official proportions (218 : 128 : 54) reach 308.8 with all 576 after layer 1
        schedule = PIO(budget=budget, vision=False).plan(LLAVA15).schedule
        assert schedule.llm_input == 576 and abs(schedule.average - budget) <= 1, budget
        assert [layer for layer, _ in schedule.boundaries] == [1, 10, 15]
    with pytest.raises(ValueError, match="averages at most 308.78"):
        PIO(budget=311, vision=False).plan(LLAVA15)


def test_llm_only_mode_names_the_minimum():
    with pytest.raises(ValueError, match=r"cannot average fewer than 18 .*vision=True"):
        PIO(budget=16, vision=False).plan(LLAVA15)
    # Later boundaries raise the floor: 16 layers at 576 tokens, then nothing.
    with pytest.raises(ValueError, match=r"cannot average fewer than 288"):
        PIO(budget=128, vision=False, layers=(16,)).plan(LLAVA15)
    assert PIO(budget=300, vision=False, layers=(16,)).plan(LLAVA15).schedule.boundaries == ((16, 24),)


def test_explicit_parameters_override_the_solver():
    assert PIO(llm_input=96).plan(LLAVA15).schedule.boundaries == ((16, 32),)
    assert PIO(llm_input=120, keep=(40,), layers=(8,)).plan(LLAVA15).schedule.boundaries == ((8, 40),)
    solved = PIO(budget=64, layers=(16,), keep=(16,)).plan(LLAVA15).schedule  # the LLM input solved around the keep
    assert solved.boundaries == ((16, 16),) and solved.llm_input == 112
    assert PIO(vision=False, layers=(16,), keep=(100,)).plan(LLAVA15).schedule.tokens_per_layer[15:17] == [576, 100]
    two = PIO(budget=128, layers=(8, 16)).plan(LLAVA15).schedule
    assert [k for _, k in two.boundaries] == [round(two.llm_input / 3), round(round(two.llm_input / 3) / 3)]
    fractions = PIO(llm_input=300, layers=(8, 16), ratios=(0.5, 0.333)).plan(LLAVA15).schedule
    assert fractions.boundaries == ((8, 150), (16, 49))  # int(r * n) of the current count, as the Qwen code
    assert PIO(llm_input=96, layers=()).plan(LLAVA15).language is None
    # As the official code: an explicit count is capped by what is there (min(image_token_list[s], n)).
    assert PIO(llm_input=50, layers=(16,), keep=(60,)).plan(LLAVA15).schedule.boundaries == ((16, 50),)
    whole = PIO(llm_input=600).plan(LLAVA15)  # N >= 576: every token enters, no scan (visual_token_num 576)
    assert whole.schedule.llm_input == 576 and whole.vision is None
    assert PIO(budget=64).schedule_for(LLAVA15, 300).boundaries == ((16, 100),)  # as a Compose half


def test_the_qwen_path_follows_the_official_qwen_code():
    """Under M-RoPE: the probe re-runs the boundary layer, original positions, the scan on the first
    full-attention block and the last block with windows of 4, int(0.333 * n) after the boundary."""
    plan = PIO(budget=64).resolve(QWEN)
    assert plan.positions == "original" and plan.language.probe == "boundary"
    assert plan.vision == GlobalLocalScan(window=4, local_layer="first_full_attention", global_layer="last")
    n = plan.schedule.llm_input
    assert plan.schedule.boundaries == ((14, int(0.333 * n)),) and abs(plan.schedule.average - 64) <= 1
    reference = PIO.qwen_reference().resolve(QWEN).schedule
    assert reference.llm_input == int(0.167 * 1024) and reference.boundaries == ((14, int(0.333 * 170)),)


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(budget=0), "budget must be a positive int"),
        (dict(budget=64.0), "budget must be a positive int"),
        (dict(budget=64, threshold=1.5), r"threshold must be a cosine similarity in \[-1, 1\]"),
        (dict(budget=64, threshold="high"), "threshold must be a cosine similarity"),
        (dict(budget=64, proxy_tokens=0), "proxy_tokens must be a positive int"),
        (dict(budget=64, probe="first"), "probe must be one of"),
        (dict(budget=300, vision=False, llm_input=300), r"need vision=True"),
        (dict(budget=64, layers=(16, 8)), "layers must be strictly increasing"),
        (dict(budget=64, layers=(8, 16), keep=(32,)), r"2 boundary layer\(s\) but 1 keep counts"),
        (dict(budget=64, keep=(40, 20)), "give layers with more than one"),
        (dict(budget=64, layers=(8,), keep=(2,), ratios=(0.5,)), "give keep or ratios, not both"),
        (dict(budget=64, layers=(8,), ratios=(1.5,)), r"ratios must lie in \[0, 1\]"),
        (dict(budget=64, llm_input=-1), "llm_input must be a positive int"),
        (dict(budget=64, vision_ratio=1.5), r"vision_ratio must lie in \(0, 1\]"),
        (dict(budget=64, llm_input=96, vision_ratio=0.2), "give llm_input or vision_ratio, not both"),
        (dict(budget=64, window=0), "window must be a positive int"),
        (dict(budget=64, local_share=2), r"local_share must lie in \[0, 1\]"),
        (dict(budget=64, positions="shifted"), "positions must be 'contiguous' or 'original'"),
    ],
)
def test_bad_options_are_refused(options, message):
    with pytest.raises(ValueError, match=message):
        PIO(**options)


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(), "PIO needs a budget"),
        (dict(vision=False), "PIO needs a budget"),
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
    layer, previous, norm = LlamaDecoderLayer(config, layer_idx=1), LlamaDecoderLayer(config, layer_idx=0), LlamaRMSNorm(16)
    head = torch.nn.Linear(16, 50, bias=False)
    hidden = torch.randn(batch, length, 16)
    position_ids = torch.arange(length)[None]
    cos_sin = LlamaRotaryEmbedding(config)(hidden, position_ids)
    causal = torch.full((length, length), float("-inf")).triu(1)[None, None]

    def run(x, previous_layer=False):
        block = previous if previous_layer else layer
        out = block(x, attention_mask=causal, position_ids=position_ids, position_embeddings=cos_sin)
        return out[0] if isinstance(out, tuple) else out

    valid = torch.ones(batch, length, dtype=torch.bool)
    valid[1, :3] = False  # row 1 is left-padded
    view = SimpleNamespace(
        hidden_states=hidden,
        visual_index=torch.arange(3, 8).expand(batch, 1, -1),
        valid=valid,
        run_layer=lambda x, previous=False: run(x, previous),
        output_head=lambda y: head(norm(y)),
    )
    return view, [layer, previous, norm, head]


def test_proxy_positions_are_the_four_before_the_last_token():
    valid = torch.tensor([[True] * 10, [False] * 3 + [True] * 7, [True] * 6 + [False] * 4])
    assert proxy_positions(valid, 4).tolist() == [[5, 6, 7, 8], [5, 6, 7, 8], [1, 2, 3, 4]]


@pytest.mark.parametrize("probe", ["next", "boundary"])
def test_saliency_equals_a_direct_autograd_computation(probe):
    """S-5..S-2 of each row, argmax pseudo-labels, the mean cross-entropy over the batch's positions,
    the L2 norm of the gradient at each visual token; the probe is the next layer or the same one."""
    view, modules = _tiny_block_view()
    scores = SaliencyNMSPrune(probe=probe).score(view)
    x = view.hidden_states.clone().requires_grad_()
    y = view.run_layer(x, previous=probe == "boundary")
    logits = view.output_head(y[:, 5:9]).reshape(-1, 50)  # S = 10 in both rows: positions 5..8
    F.cross_entropy(logits, logits.argmax(-1)).backward()
    torch.testing.assert_close(scores[:, 0], x.grad[:, 3:8].norm(dim=-1), atol=1e-7, rtol=1e-5)
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
@pytest.mark.parametrize("options", [dict(budget=192), dict(budget=128, vision=False)], ids=["ve-192", "llm-128"])
def test_layers_see_the_scheduled_counts_and_kv_lengths(llava15, options):
    inputs = make_inputs(llava15, batch=2, suffix=(12, 9))
    text = inputs["input_ids"].shape[1] - 576
    reducer = PIO(**options)
    calls = []  # (layer, visual tokens, grad enabled): the scoring pass is the only call with grad on

    def counting(index, forward):
        # around each layer's forward (not a module hook): the scoring pass calls forward itself, so
        # that transformers' output recorders do not take it for one of the model's layer calls
        def wrapper(hidden, *args, **kwargs):
            calls.append((index, hidden.shape[1] - text, torch.is_grad_enabled()))
            return forward(hidden, *args, **kwargs)

        return wrapper

    layers = llava15.model.language_model.layers
    with torch.no_grad(), reducer(llava15):
        for i, layer in enumerate(layers):
            layer.forward = counting(i, layer.forward)
        try:
            out = llava15.generate(**inputs, max_new_tokens=1, do_sample=False, return_dict_in_generate=True)
        finally:
            for layer in layers:
                del layer.forward
    schedule = PIO(**options).plan(LLAVA15).schedule
    assert [n for _, n, grad in calls if not grad] == reducer.stats.tokens_per_layer == schedule.tokens_per_layer
    # One extra run of the block after each boundary, on the tokens that reached the boundary.
    boundaries = [layer for layer, _ in schedule.boundaries]
    assert [(i, n) for i, n, grad in calls if grad] == [(b, schedule.tokens_per_layer[b - 1]) for b in boundaries]
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
    enable_checkpointing(model)
    if not compat.HOOKS_OUTSIDE_CHECKPOINT:  # refused by name before transformers 5.23
        with pytest.raises(NotImplementedError, match="checkpointing under a duet-vlm reducer needs transformers 5.23"):
            with reducer(model):
                model(**inputs, labels=labels)
        return
    with reducer(model):
        model(**inputs, labels=labels).loss.backward()
    assert model.model.multi_modal_projector.linear_2.weight.grad.abs().sum() > 0


def test_registered_and_exported():
    assert duet_vlm.METHODS["pio"] is PIO and isinstance(make("pio", budget=64), PIO)
    assert duet_vlm.saliency_nms is saliency_nms and duet_vlm.SaliencyNMSPrune is SaliencyNMSPrune
    assert duet_vlm.METHODS["trio_scan"] is duet_vlm.TrioScan
