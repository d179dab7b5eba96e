"""The benchmark's cost honesty (#24): each method's forward against its ideal (the same per-layer counts
with nothing choosing them), the selection's cost and whether it pays, on tiny models (no timing asserted)."""

import pytest
import torch

from models import BUDGETED
from duet_vlm.bench.timing import round_pairs

TINY = dict(vision_hidden=32, vision_layers=2, vision_heads=4, hidden=64, layers=8, heads=4, kv_heads=4, intermediate=128)


def _size():
    from duet_vlm.bench import ModelSize

    return ModelSize(**TINY)


@pytest.mark.parametrize("family", ["llava", "llava_next", "video_llava", "qwen3_5", "internvl"])
def test_ideal_of_no_reduction_is_the_model_itself(family):
    from duet_vlm.bench import IdealModel, build_family

    model, inputs = build_family(family, _size())
    visual = int(torch.isin(inputs["input_ids"], torch.tensor([32000, 32001])).sum())
    with torch.no_grad():
        reference = model.model(**inputs).last_hidden_state
        logits = model(**inputs, logits_to_keep=1).logits
        hidden = IdealModel(model, inputs, [visual] * TINY["layers"]).forward()
    torch.testing.assert_close(hidden, reference, rtol=0, atol=1e-6)
    torch.testing.assert_close(model.lm_head(hidden[:, -1:]), logits, rtol=0, atol=1e-6)


def _layer_lengths(model, run):
    lengths = []
    handles = [layer.register_forward_pre_hook(lambda m, args, kwargs: lengths.append(
        (kwargs.get("hidden_states", args[0] if args else None)).shape[1]), with_kwargs=True)
        for layer in model.model.language_model.layers]
    try:
        with torch.no_grad():
            run()
    finally:
        for handle in handles:
            handle.remove()
    return lengths


@pytest.mark.parametrize("family,method", [("llava", "pyramiddrop"), ("llava", "cdpruner"), ("llava_next", "divprune"),
                                           ("video_llava", "holitom"), ("qwen3_5", "duet"), ("qwen3_5", "visionzip"),
                                           ("internvl", "pyramiddrop"), ("internvl", "fastv")])
def test_the_ideal_runs_each_layer_on_the_methods_counts(family, method):
    from duet_vlm.bench import IdealModel, build_family
    from duet_vlm.methods import make

    model, inputs = build_family(family, _size())
    reducer = make(method, ratio=0.33)
    with torch.no_grad(), reducer(model):
        model(**inputs, logits_to_keep=1)
    counts = [sum(item.tokens_per_layer[layer] for item in reducer.stats.items) for layer in range(TINY["layers"])]
    visual = int(torch.isin(inputs["input_ids"], torch.tensor([32000, 32001])).sum())
    text = inputs["input_ids"].shape[1] - visual
    ideal = IdealModel(model, inputs, counts)
    assert [length - text for length in _layer_lengths(model, ideal.forward)] == counts
    # and the schedule the method's plan solves for this geometry is what its layers received
    assert counts == reducer.stats.items[0].tokens_per_layer


def test_the_qwen3_5_ideal_keeps_the_kept_tokens_positions():
    """Under M-RoPE the ideal's kept tokens keep their (time, row, column) positions: with 100 of the
    441 image tokens kept, it is the unpatched language model fed the kept slots' embeddings at their
    original positions (and not at renumbered ones); linear-attention layers included."""
    from duet_vlm.bench import IdealModel, build_family

    model, inputs = build_family("qwen3_5", _size())
    visual = inputs["input_ids"] == model.config.image_token_id
    keep = ~visual | (visual.long().cumsum(dim=1) <= 100)
    captured = {}
    handle = model.model.language_model.register_forward_pre_hook(lambda m, a, kwargs: captured.update(kwargs),
                                                                  with_kwargs=True)
    try:
        with torch.no_grad():
            model.model(**inputs)
    finally:
        handle.remove()
    embeds, positions = captured["inputs_embeds"][keep][None], captured["position_ids"][:, keep][:, None]
    language_model = model.model.language_model
    with torch.no_grad():
        hidden = IdealModel(model, inputs, [100] * TINY["layers"]).forward()
        reference = language_model(inputs_embeds=embeds, position_ids=positions).last_hidden_state
        renumbered = language_model(inputs_embeds=embeds).last_hidden_state
    torch.testing.assert_close(hidden, reference, rtol=0, atol=1e-5)
    assert not torch.allclose(hidden, renumbered, atol=1e-3)
    kinds = set(model.config.text_config.layer_types)
    assert kinds == {"linear_attention", "full_attention"}


def test_selection_costs_follow_their_definitions():
    from duet_vlm.bench.prefill import selection_costs

    row = selection_costs([6.0, 9.0, 7.0], [5.0, 5.0, 5.0], [10.0, 8.0, 12.0])
    assert row["selection_cost_s"] == 2.0 and row["saving_s"] == 5.0  # medians of per-round differences
    assert row["cost_share_of_saving"] == 2.0 / 5.0
    assert row["forward_vs_unreduced"] == pytest.approx(0.6) and row["forward_vs_ideal"] == pytest.approx(1.4)
    assert row["pays"] and row["rounds_paid"] == 2  # 9 > 8 in the second round
    slow = selection_costs([12.0, 11.0], [5.0, 5.0], [10.0, 11.0])
    assert not slow["pays"] and slow["rounds_paid"] == 0 and slow["cost_share_of_saving"] > 1
    nothing_saved = selection_costs([5.0], [5.0], [4.0])
    assert nothing_saved["cost_share_of_saving"] is None and not nothing_saved["pays"]
    with pytest.raises(ValueError, match="same rounds"):
        selection_costs([1.0, 2.0], [1.0], [1.0, 2.0])


def test_measure_pairs_each_variant_with_its_ideal_in_the_same_rounds(monkeypatch):
    """Fixed fake round times (each variant still runs, so its language-model part is recorded):
    the rows are computed from them as ``selection_costs`` documents."""
    from duet_vlm.bench import build_model, example_inputs
    from duet_vlm.bench import prefill as bench
    from duet_vlm.methods import make

    fake = {"no reduction": [10.0, 12.0, 11.0, 13.0], "visionzip 192": [7.0, 8.0, 6.0, 7.0],
            "random 192": [13.0, 12.0, 11.5, 12.5], "ideal: 576 x8": [9.0, 9.0, 9.0, 9.0], "ideal: 192 x8": [5.0, 6.0, 5.0, 6.0]}
    orders = []

    def interleaved(variants, rounds, warmup=0, progress=None, order=None):
        assert set(variants) == set(fake) and rounds == 4  # 3 asked: the rounds run in pairs
        for number in range(rounds):
            orders.append(order(number))
            for name in order(number):
                variants[name]()
        return {name: list(fake[name]) for name in variants}

    monkeypatch.setattr(bench, "interleaved", interleaved)
    model = build_model(_size())
    inputs = example_inputs(model, text_tokens=20)
    reducers = {"visionzip 192": make("visionzip", budget=192), "random 192": make("random", budget=192),
                "fastv 64": make("fastv", budget=64)}  # after layer 2 of 8 it cannot average 64
    out = bench.measure(model, inputs, reducers, rounds=3)
    rows = out["variants"]
    # each ideal right after the first variant it serves, the two swapped every other round
    assert orders[0] == ["no reduction", "ideal: 576 x8", "visionzip 192", "ideal: 192 x8", "random 192"]
    assert orders[1] == ["ideal: 576 x8", "no reduction", "ideal: 192 x8", "visionzip 192", "random 192"]
    assert orders[2:] == orders[:2] and out["rounds"] == 4
    assert rows["visionzip 192"]["ideal"] == rows["random 192"]["ideal"] == "ideal: 192 x8"
    pairs = {name: round_pairs(times) for name, times in fake.items()}  # each pair of rounds: both orders
    for name in ("visionzip 192", "random 192"):
        expected = bench.selection_costs(pairs[name], pairs["ideal: 192 x8"], pairs["no reduction"])
        expected["rounds_paid"] = sum(f < u for f, u in zip(fake[name], fake["no reduction"]))  # round by round
        assert {key: rows[name][key] for key in expected} == expected
        assert rows[name]["forward_rounds_s"] == fake[name]
    assert rows["visionzip 192"]["pays"] and not rows["random 192"]["pays"]
    assert rows["fastv 64"] == {"error": rows["fastv 64"]["error"]} and "FastV after layer 2" in rows["fastv 64"]["error"]
    assert out["ideals"]["ideal: 576 x8"]["forward_vs_unreduced"] == pytest.approx((9 / 11 + 9 / 12) / 2)
    assert rows["no reduction"]["decoder_flops"] == rows["visionzip 192"]["decoder_flops_full"]
    # the projector: the ideal maps the 192 kept tokens, visionzip's forward every token once more
    assert out["ideals"]["ideal: 192 x8"]["projector_rows"] == 192
    assert rows["visionzip 192"]["projector_extra_rows"] == rows["visionzip 192"]["projector_rows"] - 192 > 0
    table = bench.costs_markdown(rows, out["ideals"], 4).splitlines()
    assert len(table) == 2 + len(rows) + 1  # header, rule, the variants and the ideal of no reduction
    assert "**no** (1/4)" in table[-2] and "cannot run: ValueError" in table[-1]


def test_every_registered_method_runs_through_the_prefill_benchmark():
    from duet_vlm.bench import prefill_benchmark

    methods = [name for name in BUDGETED if name != "full"]  # pixelprune: Qwen only (its own bench test)
    results = prefill_benchmark(_size(), methods, [192], rounds=1, text_tokens=20)
    for method in methods:
        row = results["prefill"][f"{method} 192"]
        assert "error" not in row, (method, row.get("error"))
        assert row["visual_tokens_per_layer"] == results["ideals"][row["ideal"]]["visual_tokens_per_layer"]
        assert row["forward_s"] > 0 and row["ideal_forward_s"] > 0 and isinstance(row["pays"], bool)
        assert (row["selection_flops"] is None) == (method not in ("cdpruner", "divprune", "vispruner", "dart", "hiprune"))
    # the fields the renderers have always read are still there
    assert {"forward_median_s", "forward_ratio", "language_model_median_s", "language_model_ratio", "flops_ratio",
            "kv_ratio", "avg_visual_tokens"} <= set(results["prefill"]["cdpruner 192"])


def test_video_geometry_and_methods_that_cannot_run_there():
    from duet_vlm.bench import family_benchmark

    results = family_benchmark("video_llava", _size(), ["holitom", "cdpruner", "dart", "vispruner"], [0.33, 0.001], rounds=1)
    rows = results["variants"]
    for method in ("holitom", "cdpruner", "dart", "vispruner"):
        row = rows[f"{method} ratio 0.33"]
        assert "error" not in row and row["ideal_s"] > 0 and "selection_cost_s" in row
    # 0.001 of 2,056 tokens is 2: fewer than one per frame for the vision-side methods
    assert "frame" in rows["cdpruner ratio 0.001"]["error"]


def test_costs_by_kind_of_layer():
    """``kind_costs``: per kind of layer, exact FLOPs and cache bytes against no reduction; an
    attention layer's cache falls with its tokens, a linear-attention layer's state does not."""
    from duet_vlm.bench.prefill import kind_costs
    from duet_vlm.flops import DecoderDims, LinearAttentionDims, exact_flops

    dims = DecoderDims(64, 128, 4, 2, 16, layer_kinds=("linear_attention", "attention") * 2,
                       linear=LinearAttentionDims(2, 4, 8, 8, 4), gated_query=True)
    costs = kind_costs(dims, [100, 100, 40, 40], [100] * 4, text=20)
    assert costs["layer_kind_cache_ratio"] == {"linear_attention": 1.0, "attention": (120 + 60) / 240}
    attention_only = DecoderDims(64, 128, 4, 2, 16, gated_query=True)
    reduced, full = (exact_flops(attention_only, [0, n, 0, m]) for n, m in ((120, 60), (120, 120)))
    assert costs["layer_kind_flops_ratio"]["attention"] == reduced / full


def test_hipruns_declared_count_is_what_its_scoring_multiplies():
    """HiPrune's declared FLOPs per layer equal what torch's flop counter counts in the scoring it runs
    (``clip_layer_scores(received=True)`` on a CLIP layer: the recomputed queries and keys, every
    query's logits); a tower whose tokens are not one per candidate declares none."""
    from torch.utils.flop_counter import FlopCounterMode

    from duet_vlm.bench.selection import ItemShape, Widths, declared_flops
    from duet_vlm.scoring import clip_layer_scores

    import duet_vlm

    from models import make_llava

    model = make_llava(layers=2, image_size=112, seed=0)  # 64 patches + CLS
    layer = duet_vlm.adapter_for(model).encoder_layer("image", 0)
    width = model.config.vision_config.hidden_size
    x = torch.randn(1, 65, width)
    with FlopCounterMode(display=False) as counter:
        clip_layer_scores(layer, x, has_cls=True, received=True)
    shape = ItemShape(units=1, candidates=64, kept=16, text=10, visual_per_layer=[16, 16], text_after=5)
    total, terms = declared_flops("hiprune", None, [shape], Widths(64, width, 64, "clip_vision_model"))
    assert terms["object layer"] == terms["feature layer"] == counter.get_total_flops() and total == 2 * terms["feature layer"]
    assert declared_flops("hiprune", None, [shape], Widths(64, width, 64, "qwen2_5_vl")) == (None, {})
