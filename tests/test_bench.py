"""The timing helpers of the benchmark (the benchmark itself is run by hand: `duet-vlm bench`)."""

import os
import subprocess
import sys

import pytest

from duet_vlm.bench import interleaved, median_ratio
from duet_vlm.bench.timing import pairs_swapped, processor, round_pairs
from duet_vlm.cli import expand_list_options


def test_interleaved_times_every_variant_each_round():
    calls = []
    times = interleaved({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, rounds=3, warmup=1)
    assert calls == ["a", "b"] + ["a", "b"] * 3
    assert all(len(v) == 3 for v in times.values())


def test_swapped_pairs_reverse_each_group_every_other_round_and_pairs_average_them():
    calls = []
    variants = {name: (lambda name=name: calls.append(name)) for name in "fvi"}
    times = interleaved(variants, rounds=4, warmup=0, order=pairs_swapped([["f"], ["v", "i"]]))
    assert "".join(calls) == "fvi" "fiv" "fvi" "fiv"
    assert all(len(v) == 4 for v in times.values())
    assert round_pairs([1.0, 2.0, 5.0, 7.0]) == [1.5, 6.0]
    assert round_pairs([{"x": 1.0, "y": 0.0}, {"x": 3.0, "y": 2.0}, {"x": 9.0, "y": 9.0}]) == [{"x": 2.0, "y": 1.0}]


def test_the_forward_timed_after_a_longer_one_pays_alike_on_both_sides(monkeypatch):
    """What ran just before can change a forward's time (measured once: LLaVA-1.5's DUET at 0.11 read
    1.028 of its ideal timed first and 0.994 timed second, docs/bench/order_effect). Planted here: a reduced forward timed right after an unreduced one takes 100 ms more (the tiny
    forwards take 10-20 ms). In a fixed order a variant would pay it every round and its ideal never
    (a ratio over 5); ``measure`` swaps the two every other round and reads pairs of rounds, so each
    pays it once a pair (read per round instead, the median would swing between about 10 and 0.15)."""
    import time

    import duet_vlm.bench.prefill as prefill
    from duet_vlm.bench import ModelSize, family_benchmark

    real, last = prefill.interleaved, []
    longer = {prefill.FULL, "ideal: 576 x4"}  # the unreduced forward and its ideal: 576 visual tokens in 4 layers

    def after_the_unreduced_one_pays(variants, rounds, **options):
        def wrapped(name, fn):
            def run():
                if last and last[-1] in longer and name not in longer:
                    time.sleep(0.1)
                last.append(name)
                fn()
            return run
        return real({name: wrapped(name, fn) for name, fn in variants.items()}, rounds, **options)

    monkeypatch.setattr(prefill, "interleaved", after_the_unreduced_one_pays)
    size = ModelSize(vision_hidden=32, vision_layers=2, vision_heads=4, hidden=64, layers=4, heads=4, kv_heads=4,
                     intermediate=128)
    results = family_benchmark("llava", size, ["duet"], [0.25], rounds=3)
    assert results["rounds"] == 4 and results["order"].startswith("pairs swapped")
    row = results["variants"]["duet ratio 0.25"]
    assert len(row["forward_rounds_s"]) == 4
    assert 0.8 < row["forward_vs_ideal"] < 1.5, row["forward_vs_ideal"]
    assert results["processor"] == processor()  # what the timings ran on, for comparing runs


def test_the_processor_is_named_by_the_first_processors_block(tmp_path):
    import torch

    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\ncpu family\t: 25\nmodel\t\t: 1\nmodel name\t: AMD EPYC\n\n"
                    "processor\t: 1\ncpu family\t: 6\nmodel\t\t: 85\nmodel name\t: Other\n")
    found = processor(str(info))
    assert found["model"] == "AMD EPYC, cpu family 25, model 1"
    assert found["capability"] == torch.backends.cpu.get_cpu_capability() and found["cpus"] == os.cpu_count()
    assert processor(str(tmp_path / "absent"))["model"]  # no cpuinfo: the platform's name


def test_the_operation_clock_counts_what_is_not_a_view_and_serves_the_timers():
    import torch

    from duet_vlm.bench import ModelSize, build_family
    from duet_vlm.bench.timing import LanguageModelTimer, LayerKindTimer, OperationClock

    x = torch.zeros(2, 3)
    with OperationClock() as clock:
        x.view(3, 2), x.t(), x[:, 1:]  # views: no kernel, nothing copied
        assert clock.read() == 0
        x + 1, x.sum()
        assert clock.read() == 2
    model, inputs = build_family("llava", ModelSize(vision_hidden=32, vision_layers=1, vision_heads=4, hidden=64,
                                                    layers=2, heads=4, kv_heads=4, intermediate=128))
    found = []
    for _ in range(2):  # the same count every forward
        with torch.no_grad(), OperationClock() as clock, LanguageModelTimer(model, clock.read) as lm, \
                LayerKindTimer(model, ("attention", "attention"), clock.read) as layers:
            model(**inputs)
        found.append((lm.seconds[0], layers.seconds["attention"]))
    assert found[0] == found[1] and found[0][0] > found[0][1] > 0 and isinstance(found[0][0], int)


def test_median_ratio_pairs_rounds():
    times = {"base": [1.0, 2.0, 4.0], "x": [0.5, 1.0, 4.0]}
    assert median_ratio(times, "base") == {"base": 1.0, "x": 0.5}


def test_list_options_take_several_values():
    argv = ["eval", "--methods", "duet", "fastv", "--budgets", "192", "64", "--n", "5"]
    assert expand_list_options(argv) == [
        "eval", "--methods", "duet", "--methods", "fastv", "--budgets", "192", "--budgets", "64", "--n", "5",
    ]


@pytest.mark.parametrize("family", ["llava_next", "video_llava", "qwen3_5", "internvl", "gemma3", "gemma4"])
def test_family_benchmark_times_each_variant_against_the_ideal(family):
    from duet_vlm.bench import ModelSize, family_benchmark

    # Qwen3.5 attends in every 4th layer: 8 layers give DUET a boundary where it can score (layer 7);
    # on 4 it has none and is refused (tests/test_qwen3_5.py). Gemma 3 has a global layer in every 6th;
    # Gemma 4's last 5 of 12 reuse the keys and values of layers 5 and 6 (a global and a sliding one).
    layers = {"qwen3_5": 8, "gemma3": 6, "gemma4": 12}.get(family, 4)
    size = ModelSize(vision_hidden=32, vision_layers=2, vision_heads=4, hidden=64, layers=layers, heads=4, kv_heads=4,
                     intermediate=128)
    results = family_benchmark(family, size, ["duet"], [0.25], rounds=1)
    row = results["variants"]["duet ratio 0.25"]
    assert "error" not in row, row
    tokens = {"llava_next": 576 + 48 * 49, "video_llava": 8 * 257, "qwen3_5": 21 * 21, "internvl": 5 * 256, "gemma3": 256,
              "gemma4": 256}[family]
    assert abs(row["avg_visual_tokens"] - 0.25 * tokens) <= 8
    assert row["ideal_s"] > 0 and row["lm_vs_ideal"] > 0 and row["flops_ratio"] < 0.5
    if family == "qwen3_5":  # a hybrid decoder: each kind of layer timed, its FLOPs and cache counted apart
        kinds = {"attention", "linear_attention"}
        assert set(row["layer_kind_s"]) == set(row["layer_kind_vs_full"]) == set(row["layer_kind_vs_ideal"]) == kinds
        assert row["layer_kind_cache_ratio"]["linear_attention"] == 1.0  # its states do not shrink
        assert row["layer_kind_cache_ratio"]["attention"] < 0.6 and row["layer_kind_flops_ratio"]["linear_attention"] < 0.6
        assert set(results["variants"]["no reduction"]["layer_kind_s"]) == kinds
    elif family in ("gemma3", "gemma4"):  # sliding and global layers timed apart; the cost of building Gemma's masks
        assert set(row["layer_kind_s"]) == {"attention", "sliding_attention"}
        assert results["mask_rebuild_s"] > 0
    else:
        assert "layer_kind_s" not in row and results["mask_rebuild_s"] is None
    for timed in (row, results["variants"]["no reduction"], *results["ideals"].values()):  # one round: the parts add up
        assert timed["layers_s"] > 0 and timed["outside_layers_s"] >= 0
        assert timed["layers_s"] + timed["outside_layers_s"] == pytest.approx(timed["language_model_s"], abs=1e-9)
    assert row["layers_vs_ideal"] > 0 and "runtime_work_vs_ideal" in row


def test_layer_time_terms_read_each_round_against_its_own_ideal():
    from duet_vlm.bench.prefill import layer_time_terms

    # Round 1: the variant's layers 0.9 s of 1.0 (0.1 outside), the ideal's 0.95 of 1.0 (0.05 outside);
    # round 2, twice as slow all round. Per round: layers 0.9/0.95, extra work 0.05/1.0 and 0.1/2.0.
    terms = layer_time_terms([1.0, 2.0], [{"attention": 0.9}, {"attention": 1.8}],
                             [1.0, 2.0], [{"attention": 0.6, "linear_attention": 0.35}, {"attention": 1.9}])
    assert terms["layers_vs_ideal"] == pytest.approx((0.9 / 0.95 + 1.8 / 1.9) / 2)
    assert terms["runtime_work_vs_ideal"] == pytest.approx(0.05)


def test_a_boundarys_work_is_timed_outside_the_layers(monkeypatch):
    """The layers are timed from after a boundary's hook: a stage's scoring is the runtime's work
    (``outside_layers_s``), not the next layer's. Planted: a scorer that takes 50 ms more."""
    import time

    from duet_vlm.bench import ModelSize, family_benchmark
    from duet_vlm.methods.duet import TextGuidedPrune

    score = TextGuidedPrune.score
    monkeypatch.setattr(TextGuidedPrune, "score", lambda self, view: (time.sleep(0.05), score(self, view))[1])
    size = ModelSize(vision_hidden=32, vision_layers=2, vision_heads=4, hidden=64, layers=4, heads=4, kv_heads=4,
                     intermediate=128)
    results = family_benchmark("llava", size, ["duet"], [0.25], rounds=1)
    row = results["variants"]["duet ratio 0.25"]
    ideal = results["ideals"][row["ideal"]]
    assert row["outside_layers_s"] >= 0.05 > row["layers_s"] and row["runtime_work_vs_ideal"] > 0.5
    assert ideal["outside_layers_s"] < 0.05


@pytest.mark.parametrize("family", ["qwen3_5", "gemma3"])
def test_the_ideal_prefill_writes_the_cache_the_reduced_forward_writes(family, monkeypatch):
    """The benchmark's reduced forward (``model(**inputs)``) writes a cache, as a ``generate`` prefill
    must; its ideal's timed prefill writes one too, holding per layer what the reduced forward's
    holds (the attention layers' keys and values at each layer's kept length; a recurrence's states),
    so that the ratio compares the same work (an ideal without a cache ran Qwen3.5's Gated DeltaNet
    layers 1.4% faster)."""
    import torch

    from duet_vlm.bench import ModelSize
    from duet_vlm.bench.ideal import IdealModel
    from duet_vlm.bench.models import build_family
    from duet_vlm.bench.prefill import ideal_prefill
    from duet_vlm.methods import make

    layers = {"qwen3_5": 8, "gemma3": 6}[family]
    model, inputs = build_family(family, ModelSize(vision_hidden=32, vision_layers=2, vision_heads=4, hidden=64,
                                                   layers=layers, heads=4, kv_heads=4, intermediate=128))
    reducer = make("duet", ratio=0.25)
    with torch.no_grad(), reducer(model):
        reduced = model(**inputs, logits_to_keep=1).past_key_values  # `cache` from 5.24, readable on every release
    ideal = IdealModel(model, inputs, [int(n) for n in reducer.stats.tokens_per_layer])
    written = []
    decode = IdealModel.decode
    monkeypatch.setattr(IdealModel, "decode", lambda self, hidden, cache=None, last=None:
                        written.append(cache) or decode(self, hidden, cache, last))
    ideal_prefill(model, ideal, [])()
    (cache,) = written
    assert cache is not None and len(cache.layers) == len(reduced.layers) == layers
    for mine, theirs in zip(cache.layers, reduced.layers):
        assert type(mine) is type(theirs)
        keys = getattr(theirs, "keys", None)
        if keys is not None and keys.numel():  # an attention layer: its kept keys, as many as the reduced run's
            assert mine.keys.shape == keys.shape
        else:  # a recurrence: its states were written
            assert any(getattr(mine, name, None) is not None for name in ("recurrent_states", "conv_states"))


# ----------------------------------------------------------------------------- end to end (tiny sizes; no timing asserted)
TINY = dict(vision_hidden=32, vision_layers=2, vision_heads=4, hidden=64, layers=8, heads=4, kv_heads=4, intermediate=128)


def _schedule(method, budget, layers=8):
    from duet_vlm.adapters import Geometry
    from duet_vlm.methods import make

    return make(method, budget=budget).resolve(Geometry(layers, 576, (24, 24), True)).schedule.tokens_per_layer


@pytest.mark.parametrize("batch", [1, 3])
def test_ideal_model_on_all_tokens_is_the_model_itself(batch):
    import torch

    from duet_vlm.bench import IdealModel, ModelSize, build_model, padded_inputs
    from duet_vlm.bench.generate import cache_bytes

    model = build_model(ModelSize(**TINY))
    inputs = padded_inputs(model, batch, text_tokens=20)
    ideal = IdealModel(model, inputs, [576] * 8)
    reference = model.generate(**inputs, max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=0,
                               return_dict_in_generate=True)
    tokens, cache = ideal.generate(4)
    assert torch.equal(tokens, reference.sequences[:, -4:])
    assert cache_bytes(cache) == cache_bytes(reference.past_key_values)
    length = inputs["input_ids"].shape[1]
    labels = inputs["input_ids"].masked_fill(torch.arange(length) < length - 8, -100)
    torch.testing.assert_close(ideal.loss(labels), model(**inputs, labels=labels).loss)


def test_gemma4_ideal_on_all_tokens_is_the_model():
    """Gemma 4's ideal of no reduction (per-layer inputs projected from the entry's embeddings, the
    keys and values the storing layers share, Gemma 4's masks) gives the model's logits at every
    position, its loss, and, cut to the last token from the first KV-shared layer on as the model
    cuts under ``generate`` (transformers 5.23 and later), its last logits."""
    import torch

    from duet_vlm import compat
    from duet_vlm.bench import IdealModel, ModelSize, build_family

    model, inputs = build_family("gemma4", ModelSize(**{**TINY, "layers": 12}))
    visual = int((inputs["input_ids"] == model.config.image_token_id).sum())
    ideal = IdealModel(model, inputs, [visual] * 12)
    with torch.no_grad():
        reference = model(**inputs)
        torch.testing.assert_close(model.lm_head(ideal.forward()), reference.logits, rtol=1e-5, atol=1e-5)
        labels = inputs["input_ids"].masked_fill(inputs["input_ids"] == model.config.image_token_id, -100)
        torch.testing.assert_close(ideal.loss(labels), model(**inputs, labels=labels).loss)
        # generate's prefill: the model passes its KV-shared layers only the last token, and so does the ideal
        # (transformers 5.23 and later; before, every layer runs on every token and the head reads the last)
        decoded = ideal.decode(ideal.embeddings(), last=1)
        assert decoded.shape[1] == (1 if compat.GEMMA4_CUTS_SHARED_QUERIES else inputs["input_ids"].shape[1])
        last = model.lm_head(decoded[:, -1:])
        torch.testing.assert_close(last, model(**inputs, logits_to_keep=1).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_5", "internvl", "gemma3"])
def test_ideal_model_on_all_tokens_generates_as_the_model(family):
    """Qwen2.5-VL and Qwen3.5 (M-RoPE positions continued after the prompt's largest one; Qwen3.5's
    hybrid cache of keys and values and of linear-attention states), InternVL and Gemma 3 (its own
    masks, local and global RoPE): the ideal of no reduction's greedy loop is the model's ``generate``."""
    import torch

    from duet_vlm.bench import IdealModel, ModelSize, build_family

    model, inputs = build_family(family, ModelSize(**TINY))
    visual = int((inputs["input_ids"] == model.config.image_token_id).sum())
    reference = model.generate(**inputs, max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=0)
    tokens, _ = IdealModel(model, inputs, [visual] * TINY["layers"]).generate(4)
    assert torch.equal(tokens, reference[:, -4:])


@pytest.mark.parametrize("family", ["llava", "internvl", "gemma3"])
def test_ideal_model_on_a_left_padded_batch_generates_as_the_model(family):
    """A left-padded batch of two rows (tests/models.py's): each decoding step's mask comes from the
    family's layer scheme over each layer's cache, Gemma 3's sliding and global layers included (the
    ideal refused padded Gemma rows before it read the scheme); its tokens are ``generate``'s."""
    import torch

    from duet_vlm.bench import IdealModel
    from models import FAMILIES

    model = FAMILIES[family].model()
    batch = FAMILIES[family].batch(model)
    assert bool((batch["attention_mask"] == 0).any())
    visual = int((batch["input_ids"] == model.config.image_token_id).sum(dim=1).max())
    reference = model.generate(**batch, max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=0)
    tokens, _ = IdealModel(model, batch, [visual] * len(model.model.language_model.layers)).generate(4)
    assert torch.equal(tokens, reference[:, -4:])


def test_ideal_model_refuses_what_it_cannot_build():
    """Images and videos in one Qwen3.5 or Qwen2.5-VL batch, and Qwen3-VL's visual features added
    inside the language model (DeepStack), are refused by name, not run wrong."""
    from duet_vlm.bench import IdealModel
    from models import FAMILIES

    for name in ("qwen3_5", "qwen2_5_vl"):
        model = FAMILIES[name].model()
        batch = FAMILIES[name].batch(model)
        with pytest.raises(NotImplementedError, match="images or videos"):
            IdealModel(model, batch, [8] * len(model.model.language_model.layers)).embeddings()
    model = FAMILIES["qwen3_vl"].model()
    with pytest.raises(NotImplementedError, match="DeepStack"):
        IdealModel(model, FAMILIES["qwen3_vl"].one(model), [8] * len(model.model.language_model.layers))


@pytest.mark.parametrize("batch", [1, 2])
def test_generate_benchmark_counts_tokens_and_kv_bytes_exactly(batch):
    from duet_vlm.bench import ModelSize
    from duet_vlm.bench.generate import generate_benchmark, markdown_table

    results = generate_benchmark(ModelSize(**TINY), [("duet", 192), ("fastv", 192)], batch=batch, new_tokens=(2, 3),
                                 rounds=1, text_tokens=20)
    rows = results["variants"]
    assert list(rows) == ["no reduction", "duet 192", "fastv 192", "ideal: no reduction", "ideal: duet 192",
                          "ideal: fastv 192"]
    texts = [20] if batch == 1 else [10, 30]
    assert results["row_text_tokens"] == texts
    per_token = 2 * 4 * 16 * 4  # keys and values, 4 heads of 16, float32
    for name, method in [("no reduction", None), ("duet 192", "duet"), ("fastv 192", "fastv")]:
        counts = [576] * 8 if method is None else _schedule(method, 192)
        row, ideal = rows[name], rows[f"ideal: {name}"]
        assert row["visual_tokens_per_layer"] == ideal["visual_tokens_per_layer"] == counts
        exact = sum(per_token * (text + 2 + visual) for text in texts for visual in counts) // batch
        assert row["kv_schedule"] == ideal["kv_schedule"] == exact
        assert row["kv_cache"] == ideal["kv_cache"]  # the ideal's cache has the library's per-layer lengths
        if batch == 1:
            assert row["kv_cache"] == exact
        assert row["ideal"] == f"ideal: {name}" and set(row["vs_ideal"]) >= {"latency_2_s", "latency_3_s", "tokens_per_s"}
        assert row["first_token_s"] <= row["latency_2_s"] <= row["latency_3_s"]
    assert rows["duet 192"]["vs_full"]["kv"] == rows["duet 192"]["kv_schedule"] / rows["no reduction"]["kv_schedule"]
    assert markdown_table(results).count("\n") == 1 + len(rows)


def test_train_benchmark_times_each_part_against_the_ideal():
    """Both modes where the installed transformers checkpoints under a reducer (5.23 and newer); below
    it the checkpointing mode is the library's refusal naming 5.23, and the plain mode runs alone."""
    import math

    import pytest

    from duet_vlm import compat
    from duet_vlm.bench import ModelSize
    from duet_vlm.bench.train import markdown_table, train_benchmark

    modes = (False, True) if compat.HOOKS_OUTSIDE_CHECKPOINT else (False,)
    if not compat.HOOKS_OUTSIDE_CHECKPOINT:
        with pytest.raises(NotImplementedError, match="checkpointing under a duet-vlm reducer needs transformers 5.23"):
            train_benchmark(ModelSize(**TINY), [("duet", 192)], checkpointing=(True,), rounds=1, text_tokens=20,
                            answer_tokens=5)
    results = train_benchmark(ModelSize(**TINY), [("duet", 192)], checkpointing=modes, rounds=1, text_tokens=20,
                              answer_tokens=5)
    assert list(results["modes"]) == ["plain", "checkpointing"][: len(modes)]
    for table in results["modes"].values():
        assert list(table) == ["no reduction", "duet 192", "ideal: duet 192"]
        assert table["duet 192"]["visual_tokens_per_layer"] == table["ideal: duet 192"]["visual_tokens_per_layer"]
        assert table["duet 192"]["visual_tokens_per_layer"] == _schedule("duet", 192)
        for row in table.values():
            assert math.isclose(row["step_s"], row["forward_s"] + row["backward_s"] + row["optimizer_s"], rel_tol=1e-9)
            assert math.isfinite(row["loss"])
        assert table["duet 192"]["ideal"] == "ideal: duet 192" and table["duet 192"]["vs_ideal"] > 0
    assert ("**checkpointing**" in markdown_table(results)) == compat.HOOKS_OUTSIDE_CHECKPOINT


def test_live_tensors_find_the_peak_and_the_frame_that_holds_each_tensor():
    """The trace's peak is the bytes alive together (not the sum of all allocations), found again on
    the second run, and each tensor alive there is named with the outermost frame that holds it."""
    import torch

    from duet_vlm.bench.live import _traced

    def inner(kept):
        scratch = torch.ones(1000)  # 4,000 bytes, freed when inner returns
        return torch.zeros(250) + scratch.sum() + kept.sum()  # peak: kept, scratch, the sum's parts

    def outer():
        kept = torch.ones(2000)  # 8,000 bytes, held by outer throughout
        for _ in range(3):
            inner(kept)  # the same peak three times: the first one counts

    report = _traced(outer)
    groups = {(g["held_by"], g["bytes"]) for g in report["live"]}
    assert 12_000 <= report["peak_bytes"] < 12_000 + 2_100  # kept + scratch + the few small results
    assert ("test_bench.py test_live_tensors_find_the_peak_and_the_frame_that_holds_each_tensor.<locals>.outer", 8_000) in groups
    assert ("test_bench.py test_live_tensors_find_the_peak_and_the_frame_that_holds_each_tensor.<locals>.inner", 4_000) in groups
    assert sum(g["bytes"] for g in report["live"]) == report["peak_bytes"]


def test_train_step_per_process_count_runs_a_ddp_group_beside_one_process():
    """``bench --train --processes 2``: one process on the batch and two DDP (gloo) processes on a row
    each, for no reduction and DUET, in one run: every time measured, the ratios are those of the
    medians' rounds, and a batch the processes cannot split is refused before anything is spawned."""
    from duet_vlm.bench import ModelSize
    from duet_vlm.bench.processes import process_benchmark

    size = ModelSize(**{**TINY, "layers": 32})
    results = process_benchmark(size, [("duet", 64)], processes=2, rounds=1, batch=2, threads=2)
    assert (results["processes"], results["threads_per_process"]) == (2, 1)
    for name in ("no reduction", "duet 64"):
        row = results["variants"][name]
        assert row["one_process_s"] > 0 and row["2_processes_s"] > 0
        assert row["speedup"] == row["one_process_s"] / row["2_processes_s"]
    assert results["variants"]["no reduction"]["one_process_vs_full"] == 1.0
    with pytest.raises(ValueError, match="a batch it divides"):
        process_benchmark(size, [], processes=2, batch=3)


_ALLOCATION = """
import ctypes, sys, torch
from duet_vlm.bench.timing import keep_freed_memory
if sys.argv[1] == "keep":
    assert keep_freed_memory() is not None
class Info(ctypes.Structure):  # glibc's struct mallinfo2
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]
libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = Info
mapped = libc.mallinfo2().hblkhd
blocks = [torch.empty(6 << 20).fill_(1.0) for _ in range(2)]  # 24 MiB each, written
info = libc.mallinfo2()
del blocks
print(info.hblkhd - mapped, info.arena - libc.mallinfo2().arena)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallinfo2 and mallopt")
def test_keep_freed_memory_serves_blocks_from_the_heap_and_keeps_them():
    """``duet-vlm bench --allocator keep``: two 24 MiB tensors come from the heap, not mappings of
    their own, and freeing them gives nothing back to the system, so the next ones reuse their pages;
    glibc's defaults map them afresh (and unmap them when freed). Each in its own process: the setting is
    process-wide."""
    measured = {}
    for mode in ("keep", "system"):
        out = subprocess.run([sys.executable, "-c", _ALLOCATION, mode], capture_output=True, text=True, check=True)
        measured[mode] = [int(value) for value in out.stdout.split()]
    (keep_mapped, keep_returned), (system_mapped, _) = measured["keep"], measured["system"]
    assert keep_mapped == 0 and keep_returned == 0, measured
    assert system_mapped >= 48 << 20, measured


def test_bench_refuses_an_allocator_it_cannot_apply():
    """A misspelt allocator, and ``keep`` with ``--generate``/``--train`` (whose worker processes it
    would not reach): one line each, nothing run."""
    from typer.testing import CliRunner

    from duet_vlm.cli import app

    runner = CliRunner()
    for argv, says in ((["bench", "--allocator", "jemalloc"], "must be system or keep"),
                       (["bench", "--allocator", "keep", "--train"], "not --generate or --train")):
        result = runner.invoke(app, argv)
        assert result.exit_code != 0
        assert says in " ".join(result.output.split()), result.output
