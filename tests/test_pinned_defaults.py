"""Documented defaults, pinned as literals and observed through the runtime on LLaVA-1.5 geometry.

The solvers have their own unit tests; these check what a model actually receives when a method is
attached with only a budget, so that a changed rounding, share or default (in a solver, a method or
the runtime) shows up as a changed number here. The numbers are the README's and the docstrings'.
"""

import pytest
import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

import duet_vlm
from duet_vlm.methods.duet import TextGuidedPrune

from models import IMAGE_TOKEN, make_inputs


@pytest.fixture(scope="module")
def short_prompt(llava15):
    """One image between a short prefix and a short suffix: the prefills here stay cheap."""
    return make_inputs(llava15, prefix=3, suffix=8, seed=13)


def _stats(model, reducer, inputs):
    with torch.no_grad(), reducer(model):
        model(**inputs)
    return reducer.stats


def _groups(*counts_and_layers):
    """``_groups((102, 16), (51, 8), (0, 8))`` -> per-layer list."""
    return [count for count, layers in counts_and_layers for _ in range(layers)]


# ----------------------------------------------------------------------------- DUET and VisionZip splits
@pytest.mark.parametrize(
    "budget, dominant, contextual, per_layer",
    [
        (192, 300, 7, _groups((307, 16), (153, 8), (0, 8))),
        (128, 170, 35, _groups((205, 16), (102, 8), (0, 8))),
        (64, 86, 16, _groups((102, 16), (51, 8), (0, 8))),
    ],
)
def test_duet_stage_a_split_and_schedule(llava15, short_prompt, budget, dominant, contextual, per_layer):
    """README's DUET table: published splits at 192 / 128, VisionZip's 10-of-64 share elsewhere.

    Catches a changed contextual share or rounding (e.g. 64 -> 87 + 15), a lost published split, or
    boundaries / keep ratios drifting from 1/2, 3/4 of depth and 0.5, 0.0.
    """
    stats = _stats(llava15, duet_vlm.Duet(budget=budget), short_prompt)
    assert stats.vision_roles["dominant"].shape == (1, dominant)  # CLS included
    assert stats.vision_roles["dominant"][0, 0] == 0  # ... as the first dominant token
    assert stats.vision_roles["anchors"].shape == (1, contextual)
    assert stats.llm_input_tokens == dominant + contextual
    assert stats.tokens_per_layer == per_layer
    assert [(layer, kept.shape[-1]) for layer, kept in stats.stage_kept] == [(16, per_layer[16]), (24, 0)]


@pytest.mark.parametrize("budget, dominant, contextual", [(192, 162, 30), (128, 108, 20), (64, 54, 10)])
def test_visionzip_split(llava15, short_prompt, budget, dominant, contextual):
    """VisionZip's 54:10 split (dominant counts CLS), in every layer: catches a changed share or rounding."""
    stats = _stats(llava15, duet_vlm.VisionZip(budget=budget), short_prompt)
    assert stats.vision_roles["dominant"].shape == (1, dominant)
    assert stats.vision_roles["anchors"].shape == (1, contextual)
    assert stats.tokens_per_layer == [budget] * 32 and stats.stage_kept == []


# ----------------------------------------------------------------------------- other schedules
SCHEDULES = {
    # README's methods table (and the methods' docstrings), one row per (method, budget).
    ("fastv", 192): _groups((576, 2), (166, 30)),
    ("fastv", 128): _groups((576, 2), (98, 30)),
    ("fastv", 64): _groups((576, 2), (30, 30)),
    ("pyramiddrop", 192): _groups((576, 2), (322, 6), (180, 8), (101, 16)),
    ("pyramiddrop", 128): _groups((576, 2), (242, 6), (102, 8), (42, 16)),
    ("pyramiddrop", 64): _groups((576, 2), (111, 6), (21, 8), (4, 16)),
    ("pio", 192): _groups((288, 16), (96, 16)),
    ("pio", 128): _groups((192, 16), (64, 16)),
    ("pio", 64): _groups((96, 16), (32, 16)),
    ("sparsevlm", 64): _groups((576, 3), (31, 4), (10, 9), (6, 16)),
    ("pool", 192): [192] * 32,
    ("pool", 128): [128] * 32,
    ("pool", 64): [64] * 32,
    ("random", 64): [64] * 32,
}


@pytest.mark.parametrize("name, budget", list(SCHEDULES))
def test_documented_schedule_through_the_runtime(llava15, short_prompt, name, budget):
    """Tokens entering each decoder layer under ``make(name, budget=...)``, as documented.

    Catches a changed default boundary (FastV's K, PyramidDrop's [2, 8, 16] rule, PIO's layer 16,
    SparseVLM's 3 / 7 / 16), a changed solver rounding or ratio, and a pooled grid choice.
    """
    stats = _stats(llava15, duet_vlm.make(name, budget=budget), short_prompt)
    assert stats.tokens_per_layer == SCHEDULES[name, budget]


# ----------------------------------------------------------------------------- FastV keeps original positions
def test_fastv_default_positions_are_original():
    """FastV's in-place code keeps the original RoPE positions; the README's finding depends on it."""
    assert duet_vlm.FastV().positions == "original"
    assert duet_vlm.FastV(budget=64).positions == "original"
    assert duet_vlm.make("fastv", budget=64).positions == "original"


def test_fastv_layers_after_the_boundary_see_gapped_original_positions(llava15, short_prompt):
    """Through the runtime: after layer 2 the kept visual tokens and the text keep their original
    position ids (gaps where tokens were dropped), in the prefill and in decoding.

    Catches FastV's default switched to renumbered positions, or the runtime renumbering anyway.
    """
    inputs = short_prompt
    reducer = duet_vlm.make("fastv", budget=64)
    layers = llava15.model.language_model.layers
    seen = {0: [], 2: [], 20: []}
    handle = reducer.attach(llava15)
    probes = [
        layers[i].register_forward_pre_hook(  # after the reducer's: sees what the layer receives
            lambda m, a, kw, i=i: seen[i].append(kw["position_ids"].reshape(-1).tolist()), with_kwargs=True
        )
        for i in seen
    ]
    try:
        with torch.no_grad():
            out = llava15.generate(**inputs, max_new_tokens=3, do_sample=False)
    finally:
        for probe in probes:
            probe.remove()
        handle.remove()
    assert out.shape[1] == inputs["input_ids"].shape[1] + 3
    ids = inputs["input_ids"][0].tolist()
    length, start = len(ids), ids.index(IMAGE_TOKEN)
    kept = reducer.stats.stage_kept[0][1][0, 0].tolist()
    assert len(kept) == 30
    expected = list(range(start)) + [start + k for k in sorted(kept)] + list(range(start + 576, length))
    assert seen[0][0] == list(range(length))
    assert seen[2][0] == expected and seen[20][0] == expected
    assert any(b - a > 1 for a, b in zip(expected, expected[1:]))  # there are gaps
    # Decoding steps continue from the full prompt length in every layer.
    for layer in seen:
        assert [step for step in seen[layer][1:]] == [[length], [length + 1]], f"layer {layer}"


# ----------------------------------------------------------------------------- query="last"
def _manual_last_token_scores(view) -> torch.Tensor:
    """Attention of the last position on the visual tokens, computed from scratch for row 0
    (next layer's norm, q/k projections, RoPE, causal softmax over all keys, mean over heads)."""
    layer, hidden = view.layer, view.hidden_states[:1]
    attn = layer.self_attn
    x = layer.input_layernorm(hidden)
    length, head_dim = x.shape[1], attn.head_dim
    q = attn.q_proj(x).view(1, length, -1, head_dim).transpose(1, 2)
    k = attn.k_proj(x).view(1, length, -1, head_dim).transpose(1, 2)
    cos, sin = view.position_embeddings
    q, k = apply_rotary_pos_emb(q, k, cos[:1], sin[:1])
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    logits = (q[:, :, -1:] @ k.transpose(-1, -2)).float() * head_dim**-0.5  # the last row sees every key
    probs = logits.softmax(dim=-1).mean(dim=1)[0, 0]
    return probs[view.visual_index[0, 0]]


def test_query_last_is_the_last_prompt_token(llava15, short_prompt):
    """``query="last"`` queries exactly the last prompt token: its positions are ``[L - 1]``, and the
    Stage-B survivors are the top-k of that token's attention computed by hand.

    Catches "last" reading the second-to-last token (or the last image token, or the first text one).
    """
    views = []

    def spy(view):
        views.append(view)
        return TextGuidedPrune(query="last").queries(view)

    with torch.no_grad():
        spied = _stats(llava15, duet_vlm.Duet(budget=128, query=spy), short_prompt)
        last = _stats(llava15, duet_vlm.Duet(budget=128, query="last"), short_prompt)
        view = views[0]
        length = view.hidden_states.shape[1]
        assert [q.tolist() for q in TextGuidedPrune(query="last").queries(view)] == [[length - 1]]
        assert view.text_after_image[0][-1] == length - 1
        manual = _manual_last_token_scores(view)
    keep = spied.stage_kept[0][1].shape[-1]
    expected = sorted(manual.topk(keep).indices.tolist())
    first_ids = view.visual_ids[0, 0]
    assert spied.stage_kept[0][1][0, 0].tolist() == first_ids[expected].tolist()
    assert last.stage_kept[0][1].tolist() == spied.stage_kept[0][1].tolist()


def test_query_last_follows_the_last_token(llava15, short_prompt):
    """Changing only the last prompt token changes the survivors under ``query="last"``.

    A "last" that reads position ``L - 2`` cannot see that change (causal attention), so it catches
    the off-by-one that the scores alone would hide.
    """
    def kept(inputs):
        return _stats(llava15, duet_vlm.Duet(budget=128, query="last"), inputs).stage_kept[0][1].tolist()

    changed = dict(short_prompt, input_ids=short_prompt["input_ids"].clone())
    changed["input_ids"][0, -1] = 7 if changed["input_ids"][0, -1] != 7 else 8
    assert kept(changed) != kept(short_prompt)
