"""VScan as the official code runs it (``Tencent/SelfEvolvingAgent`` ``VScan/``, ``a82450e``).

- Replay of the official LLaVA code's recorded outputs (tests/data/vectors/vscan-official-*; README
  there): the schedules reached from a budget, the scan's local/global picks and merged block, the
  boundary's scores and kept tokens, lengths and positions per layer in the prefill and at every
  decoding step, every step's logits (atol 1e-4) and the greedy tokens.
- The scan against a deliberately naive transcription of the official rule (per-window loops, a
  token-by-token merge) on random inputs (hypothesis).
- The budget solver, the options' errors, Compose in both halves, a run on the LLaVA-1.5 geometry.
"""

import doctest
import json

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

import duet_vlm
from duet_vlm import Compose, Geometry, make
from duet_vlm.methods import vscan as vscan_module
from duet_vlm.methods.duet import DominantContextualMerge
from duet_vlm.methods.fastv import LastTokenAttention
from duet_vlm.methods.pyramiddrop import LastInstructionAttention
from duet_vlm.methods.trio_scan import GlobalLocalScan
from duet_vlm.methods.trio_scan import third_keeps as vscan_keeps
from duet_vlm.methods.vscan import VScan
from duet_vlm.plan import PositionsError, VisionView

from checks import RecordedVisualBlock
from models import make_inputs

LLAVA15 = Geometry(num_layers=32, visual_tokens=576, grid=(24, 24), has_cls=True, encoder_depth=24)
QWEN = Geometry(num_layers=28, visual_tokens=1024, grid=(32, 32), has_cls=False, rope="mrope", encoder_depth=32)
VIDEO = Geometry(num_layers=32, visual_tokens=8 * 257, grid=(16, 16), has_cls=True, units=8, modality="video")
BUDGETS = {"64": 64, "128": 128, "192": 192}
NEW_TOKENS = 8


def test_doctests():
    assert doctest.testmod(vscan_module).failed == 0


# ----------------------------------------------------------------------------- schedules and options
def test_llava15_budgets_give_the_official_shape():
    """A third of N after layer 16 of 32: 64 -> 96/32 (the official README default), 128 -> 192/64,
    192 -> 288/96; the averages are exact, and the stages are the scan and PyramidDrop's score."""
    expected = {192: (288, 96), 128: (192, 64), 64: (96, 32)}
    for budget, (n, keep) in expected.items():
        plan = make("vscan", budget=budget).resolve(LLAVA15)
        assert (plan.schedule.llm_input, plan.schedule.boundaries) == (n, ((16, keep),))
        assert plan.schedule.average == budget
        assert plan.positions == "contiguous"
        assert isinstance(plan.language, LastInstructionAttention)
        assert plan.vision == GlobalLocalScan(window=6, local_share=0.5, local_layer=5, global_layer=-2)
    assert make("vscan", budget=64).encoder_layers(LLAVA15) == (5, -2)


def test_qwen_path_and_reference_setting():
    plan = make("vscan", budget=64).resolve(QWEN)
    assert (plan.schedule.llm_input, plan.schedule.boundaries) == (96, ((14, 31),))  # int(0.333 * 96)
    assert plan.positions == "original"
    assert plan.vision == GlobalLocalScan(window=4, local_share=0.5, local_layer="first_full_attention", global_layer="last")
    reference = VScan.qwen_reference().resolve(QWEN).schedule
    assert (reference.llm_input, reference.boundaries) == (int(0.167 * 1024), ((14, int(0.333 * 171)),))
    with pytest.raises(PositionsError):
        make("vscan", budget=64, positions="contiguous").resolve(QWEN)


@settings(max_examples=60, deadline=None)
@given(
    layers=st.integers(4, 40), tokens=st.integers(8, 3000), units=st.sampled_from([1, 1, 4, 8]),
    fraction=st.floats(0.01, 1.0), mrope=st.booleans(),
)
def test_budget_solved_within_one_token_or_one_frame(layers, tokens, units, fraction, mrope):
    """Any budget up to what the shape averages with every token entering is met (within one token,
    or one frame count for a video); more is refused."""
    tokens -= tokens % units
    geometry = Geometry(layers, tokens, (4, 4), False, units=units, rope="mrope" if mrope else "1d")
    maximum = VScan().schedule_for(geometry, tokens).average
    with pytest.raises(ValueError, match="averages at most"):
        make("vscan", budget=int(maximum) + 2).resolve(geometry)
    budget = max(1, int(fraction * maximum))
    plan = make("vscan", budget=budget).resolve(geometry)
    assert abs(plan.schedule.average - budget) <= max(1, units)
    assert plan.schedule.llm_input % units == 0
    assert plan.schedule.boundaries[0][0] == min(layers - 1, max(1, round(layers / 2)))
    assert (plan.vision is None) == (plan.schedule.llm_input == tokens)


def test_video_budget_in_whole_frames():
    plan = make("vscan", budget=500).resolve(VIDEO)
    assert plan.schedule.llm_input % 8 == 0 and abs(plan.schedule.average - 500) <= 8
    assert plan.schedule.boundaries == ((16, round(plan.schedule.llm_input / 3)),)


def test_explicit_settings_override_the_solver():
    official = make("vscan", llm_input=96, layers=(16,), keep=(32,)).resolve(LLAVA15).schedule
    assert (official.llm_input, official.boundaries) == (96, ((16, 32),))
    pyramid = make("vscan", llm_input=288, layers=(8, 16), keep=(188, 96)).resolve(LLAVA15).schedule
    assert pyramid.boundaries == ((8, 188), (16, 96))  # the README's multi-boundary example
    assert make("vscan", llm_input=96, keep=500).resolve(LLAVA15).schedule.boundaries == ((16, 96),)  # official min()
    assert make("vscan", llm_input=100, ratios=0.5).resolve(LLAVA15).schedule.boundaries == ((16, 50),)
    assert make("vscan", llm_input=96, layers=8, keep=32).resolve(LLAVA15).schedule.boundaries == ((8, 32),)
    scan_only = make("vscan", budget=100, layers=()).resolve(LLAVA15)
    assert (scan_only.schedule.llm_input, scan_only.language) == (100, None)
    video = make("vscan", llm_input=1001, layers=()).resolve(VIDEO).schedule
    assert video.llm_input == 1000  # whole frames
    assert vscan_keeps(97, 3, ratios=(0.5, 0.5, 0.5)) == (48, 24, 12)


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(budget=0), "budget must be a positive int"),
        (dict(budget=64, llm_input=0), "llm_input must be a positive int"),
        (dict(vision_ratio=1.5), r"vision_ratio must lie in \(0, 1\]"),
        (dict(llm_input=96, vision_ratio=0.2), "give llm_input or vision_ratio"),
        (dict(budget=64, layers=(16, 8), ratios=(0.5, 0.5)), "strictly increasing"),
        (dict(budget=64, layers=(0,)), "layers must be ints >= 1"),
        (dict(budget=64, layers="16"), "layers must be a sequence of ints"),
        (dict(budget=64, keep=(32,), ratios=(0.5,)), "give keep or ratios"),
        (dict(budget=64, ratios=(1.5,)), r"ratios must lie in \[0, 1\]"),
        (dict(budget=64, ratios=(0.5, 0.25)), "give layers with more than one"),
        (dict(budget=64, layers=(8, 16), keep=(32,)), "2 boundary layer"),
        (dict(budget=64, window=0), "window must be a positive int"),
        (dict(budget=64, local_share=2), r"local_share must lie in \[0, 1\]"),
    ],
)
def test_bad_options_are_refused_clearly(options, message):
    with pytest.raises(ValueError, match=message):
        VScan(**options)


def test_impossible_budgets_are_refused_clearly():
    with pytest.raises(ValueError, match="averages at most 384 visual tokens"):
        make("vscan", budget=400).resolve(LLAVA15)  # the default shape's ceiling: two thirds
    assert make("vscan", budget=400, ratios=(0.5,)).resolve(LLAVA15).schedule.average == pytest.approx(400, abs=1)
    with pytest.raises(ValueError, match="needs a budget"):
        VScan().plan(LLAVA15)
    with pytest.raises(ValueError, match="boundary layers must lie inside"):
        make("vscan", budget=64, layers=(40,)).resolve(LLAVA15)


def test_each_half_composes():
    """As the vision half, VScan's scan reads its encoder layers; as the language half, its
    boundary prunes what another vision method passed on; the budget is solved for the pair."""
    plan = Compose(VScan(), make("fastv"), budget=64).resolve(LLAVA15)
    assert isinstance(plan.vision, GlobalLocalScan) and isinstance(plan.language, LastTokenAttention)
    assert Compose(VScan(), make("fastv"), budget=64).encoder_layers(LLAVA15) == (5, -2)
    assert abs(plan.schedule.average - 64) <= 1
    plan = Compose(make("visionzip"), VScan(), budget=64).resolve(LLAVA15)
    assert isinstance(plan.vision, DominantContextualMerge) and isinstance(plan.language, LastInstructionAttention)
    assert plan.schedule.boundaries == ((16, round(plan.schedule.llm_input / 3)),) and plan.schedule.average == 64


def test_records_round_trip():
    for reducer in (make("vscan", budget=64, layers=(8, 16), keep=(188, 96)), VScan.qwen_reference()):
        record = json.loads(json.dumps(reducer.to_dict()))
        assert duet_vlm.from_dict(record) == reducer


# ----------------------------------------------------------------------------- the scan vs a naive transcription
def _naive_official_scan(shallow, deep, grid, window, count):
    """``encode_images`` literally: top ``(count // 2) // windows`` of each window (row-major windows),
    the deep map with those zeroed, its top ``count - count // 2``; a Python loop per window."""
    rows, cols = grid
    local_total = int(count * 0.5)
    per_window = local_total // ((rows // window) * (cols // window))
    local = []
    for i in range(rows // window):
        for j in range(cols // window):
            cells = [(i * window + dy) * cols + j * window + dx for dy in range(window) for dx in range(window)]
            ranked = sorted(cells, key=lambda c: -float(shallow[c]))
            local += ranked[:per_window]
    rest = deep.clone()
    rest[local] = 0
    global_ = sorted(range(len(rest)), key=lambda c: -float(rest[c]))[: count - local_total]
    return local, global_


def _naive_merge(values, kept):
    """``token_merging``, one dropped token at a time: added to its most cosine-similar kept token,
    then every kept token divided by 1 + what it received."""
    kept = sorted(kept)
    sums = {k: values[k].clone() for k in kept}
    counts = {k: 1 for k in kept}
    for t in range(len(values)):
        if t in sums:
            continue
        similarity = [float(F.cosine_similarity(values[t], values[k], dim=0)) for k in kept]
        target = kept[max(range(len(kept)), key=lambda i: similarity[i])]
        sums[target] += values[t]
        counts[target] += 1
    return torch.stack([sums[k] / counts[k] for k in kept])


def _view(shallow, deep, features, grid, project, layers=(5, -2)):
    cls = torch.zeros(1, 1, features.shape[-1])
    return VisionView(
        features=torch.cat([cls, features[None]], dim=1), cls_attention=deep[None], keys=features[None], grid=grid,
        has_cls=True, attention={layers[0]: shallow[None], layers[1]: deep[None]}, project=project,
    )


@settings(max_examples=40, deadline=None)
@given(
    window=st.integers(2, 4), windows_r=st.integers(1, 3), windows_c=st.integers(1, 3),
    per_window=st.integers(0, 3), extra=st.integers(0, 12), seed=st.integers(0, 2**16),
)
def test_scan_equals_the_naive_official_rule(window, windows_r, windows_c, per_window, extra, seed):
    """When the local count is a multiple of the windows (every official configuration), the local
    and global picks, the kept set and the merged, projected block equal the official rule's."""
    rows, cols = window * windows_r, window * windows_c
    per_window = min(per_window, (window * window - 1) // 2)  # local + global picks fit in the grid
    local_total = per_window * windows_r * windows_c
    count = max(1, 2 * local_total + extra % 2)  # int(count * 0.5) == local_total
    generator = torch.Generator().manual_seed(seed)
    patches = rows * cols
    shallow = torch.randperm(patches, generator=generator).float() + 1  # distinct scores: no ties
    deep = torch.randperm(patches, generator=generator).float() + 1
    features = torch.randn(patches, 6, generator=generator)
    weight = torch.randn(6, 5, generator=generator)
    project = lambda x: x @ weight  # noqa: E731
    stage = VScan(llm_input=count, window=window, local_layer=5, global_layer=-2).vision_stage_for(LLAVA15, count)
    reduction = stage.reduce(_view(shallow, deep, features, (rows, cols), project), count)

    local, global_ = _naive_official_scan(shallow, deep, (rows, cols), window, count)
    kept = sorted(local + global_)
    assert (reduction.kept[0] - 1).tolist() == kept
    assert sorted((reduction.roles["local"][0] - 1).tolist()) == sorted(local)
    torch.testing.assert_close(reduction.projected[0], _naive_merge(project(features), kept), atol=1e-5, rtol=1e-5)


@settings(max_examples=30, deadline=None)
@given(count=st.integers(2, 60), seed=st.integers(0, 2**16))
def test_scan_keeps_exactly_the_count_where_the_official_code_keeps_fewer(count, seed):
    """A local count that is not a multiple of the windows: the official code keeps
    ``floor(local / windows)`` per window and passes fewer tokens on; here exactly ``count`` tokens
    pass, no window gives more than ``ceil(local / windows)`` local picks, and the global scan fills
    the rest from what the local scan left."""
    rows = cols = 12
    generator = torch.Generator().manual_seed(seed)
    shallow = torch.randperm(144, generator=generator).float() + 1
    deep = torch.randperm(144, generator=generator).float() + 1
    features = torch.randn(144, 4, generator=generator)
    stage = VScan(llm_input=count, window=6, local_layer=5, global_layer=-2).vision_stage_for(LLAVA15, count)
    reduction = stage.reduce(_view(shallow, deep, features, (rows, cols), lambda x: x * 2), count)
    kept = reduction.kept[0] - 1
    local = reduction.roles["local"][0] - 1
    assert len(kept) == count and len(set(kept.tolist())) == count and len(local) == int(count * 0.5)
    window_of = (local // cols // 6) * 2 + local % cols // 6
    assert torch.bincount(window_of, minlength=4).max() <= -(-int(count * 0.5) // 4)
    rest = deep.clone()
    rest[local] = 0
    global_ = sorted(set(kept.tolist()) - set(local.tolist()))
    assert sorted(global_) == sorted(rest.topk(count - len(local)).indices.tolist())


# ----------------------------------------------------------------------------- the official code's outputs
# ``official``: (model, input_ids, pixel_values, reference_dir) of the recorded runs (tests/conftest.py).


def _expected(reference_dir, name):
    expected = json.loads((reference_dir / f"vscan-official-{name}.json").read_text())
    return expected["samples"]["0"], load_file(reference_dir / f"vscan-official-{name}.safetensors")


class RecordingPrune(LastInstructionAttention):
    """The language stage, keeping the scores it ranks by."""

    def __init__(self):
        self.scores = []

    def score(self, view):
        scores = super().score(view)
        self.scores.append(scores.detach().clone())
        return scores


def _run(model, input_ids, pixel_values, reducer, vision=None):
    """Prefill logits and reduced LLM input, per-layer inputs of the prefill and of each decoding
    step, the greedy output, the boundary's scores."""
    recorder = RecordingPrune()
    reducer.language_stage = lambda: recorder  # this instance only
    if vision is not None:
        reducer.vision_stage_for = lambda geometry, keep: vision
    seen, captured = [], {}

    def layer_input(module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        seen.append((hidden.shape[1], kwargs["position_ids"].reshape(-1).tolist()))

    def llm_input(module, args, kwargs):
        captured.setdefault("embeds", kwargs["inputs_embeds"].detach().clone())

    handle = reducer.attach(model)
    language_model = model.model.language_model
    hooks = [layer.register_forward_pre_hook(layer_input, with_kwargs=True) for layer in language_model.layers]
    hooks.append(language_model.register_forward_pre_hook(llm_input, with_kwargs=True))
    try:
        with torch.no_grad():
            logits = model(input_ids=input_ids, pixel_values=pixel_values).logits[0, -1]
            stats = reducer.stats
            prefill = list(seen)
            seen.clear()
            generated = model.generate(
                input_ids=input_ids, pixel_values=pixel_values, max_new_tokens=NEW_TOKENS, do_sample=False,
                output_scores=True, return_dict_in_generate=True,
            )
    finally:
        for hook in hooks:
            hook.remove()
        handle.remove()
        del reducer.language_stage
        reducer.__dict__.pop("vision_stage_for", None)
    layers = len(language_model.layers)
    decode = [seen[i * layers : (i + 1) * layers] for i in range(1, NEW_TOKENS)]  # step 0 is the prefill
    return dict(logits=logits, prefill=prefill, decode=decode, generated=generated, stats=stats,
                embeds=captured["embeds"], scores=recorder.scores[0])


def _check_llm(expected, tensors, input_ids, run):
    """Lengths and positions per layer (prefill and decoding), the boundary's scores and kept
    tokens, every step's logits and the greedy tokens."""
    assert [length for length, _ in run["prefill"]] == expected["per_layer_seq_len"]
    assert [positions for _, positions in run["prefill"]] == expected["per_layer_position_ids"]
    (stage,) = expected["llm_stages"]
    torch.testing.assert_close(run["scores"][0, 0], tensors["s0_llm0_scores"], atol=1e-7, rtol=1e-4)
    (layer, kept), = run["stats"].stage_kept
    assert layer == stage["after_layer_1based"] and kept[0, 0].tolist() == stage["kept_rel_sorted"]
    torch.testing.assert_close(run["logits"], tensors["s0_prefill_last_logits"], atol=1e-4, rtol=0)
    generated = run["generated"]
    assert generated.sequences[0, input_ids.shape[1] :].tolist() == expected["greedy_new_tokens"]
    for step, scores in enumerate(generated.scores):
        torch.testing.assert_close(scores[0], tensors[f"s0_gen_step{step}_logits"], atol=1e-4, rtol=0)
    recorded = expected["decode_step_position_ids_per_layer"]
    assert [[p[0] for _, p in step] for step in run["decode"][: len(recorded)]] == recorded


@pytest.mark.parametrize("name", list(BUDGETS))
def test_the_official_schedules_come_from_a_budget(official, name):
    model, _, _, reference_dir = official
    expected, _ = _expected(reference_dir, name)
    geometry = duet_vlm.adapter_for(model).geometry
    assert geometry == LLAVA15
    schedule = make("vscan", budget=BUDGETS[name]).resolve(geometry).schedule
    assert schedule.tokens_per_layer == [n - 17 for n in expected["per_layer_seq_len"]]  # 5 + 12 text tokens


@pytest.mark.parametrize("name", list(BUDGETS))
def test_whole_method_matches_the_official_code(official, name):
    """``make("vscan", budget=b)`` on the official inputs: the scan's picks are exact, the merged
    block equals the official one (a near-tie the recording lists, below 1e-4 in cosine, may flip in
    another summation order: those tokens are left out), and everything after it replays."""
    model, input_ids, pixel_values, reference_dir = official
    expected, tensors = _expected(reference_dir, name)
    run = _run(model, input_ids, pixel_values, make("vscan", budget=BUDGETS[name]))
    ve, stats = expected["ve"], run["stats"]
    kept = stats.vision_kept[0] - 1  # the tower's index space has CLS first; the official one does not
    assert kept.tolist() == ve["kept_patch_indices_ascending"]
    assert sorted((stats.vision_roles["local"][0] - 1).tolist()) == sorted(ve["local_patch_indices_in_window_order"])
    ties = expected["selection_margins"]["ve_merge_near_ties_below_1e-4"]
    touched = {tie["assigned_patch"] for tie in ties} | {tie["runner_up_patch"] for tie in ties}
    exact = torch.tensor([patch not in touched for patch in ve["kept_patch_indices_ascending"]])
    block = run["embeds"][0, 5 : 5 + len(kept)]
    torch.testing.assert_close(block[exact], tensors["s0_ve_output_features"][exact], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(block, tensors["s0_ve_output_features"], atol=1e-4, rtol=0)
    _check_llm(expected, tensors, input_ids, run)


@pytest.mark.parametrize("name", ["64", "192"])
def test_language_stage_fed_the_official_visual_block_matches(official, name):
    """The language-model half alone, fed the recorded output of the official scan: scores, kept
    tokens, lengths, positions, logits at every step and greedy tokens."""
    model, input_ids, pixel_values, reference_dir = official
    expected, tensors = _expected(reference_dir, name)
    vision = RecordedVisualBlock(tensors["s0_ve_output_features"])
    run = _run(model, input_ids, pixel_values, make("vscan", budget=BUDGETS[name]), vision=vision)
    _check_llm(expected, tensors, input_ids, run)


# ----------------------------------------------------------------------------- end to end, LLaVA-1.5 geometry
def test_llava15_counts_follow_the_schedule(llava15):
    """On the LLaVA-1.5 geometry (a 4-layer test tower: the shallow map at layer round(5 * 4 / 24) = 1),
    a padded batch generates; each row's visual tokens per layer are the schedule's."""
    reducer = make("vscan", budget=64)
    plan = reducer.resolve(duet_vlm.adapter_for(llava15).geometry)
    assert plan.vision.encoder_layers() == (1, -2)
    inputs = make_inputs(llava15, batch=2, suffix=(12, 8))
    with torch.no_grad(), reducer(llava15):
        llava15.generate(**inputs, max_new_tokens=3, do_sample=False)
        stats = reducer.stats
    assert [item.tokens_per_layer for item in stats.items] == [plan.schedule.tokens_per_layer] * 2
    assert plan.schedule.tokens_per_layer == [96] * 16 + [32] * 16
    assert stats.vision_kept.shape == (2, 96) and stats.vision_roles["local"].shape == (2, 48)
