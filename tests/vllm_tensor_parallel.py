"""Runs vLLM's offline engine with ``--tensor-parallel-size 2`` on a tiny checkpoint, or with
``--model-impl transformers`` (``ENCODER_TP_MODE`` ``backend``: one process), and writes each
request's greedy tokens, log-probabilities, prompt length and the indices its vision stage kept
(``backend`` only; ``None`` elsewhere) as JSON: what ``tests/test_vllm.py`` compares with the
Hugging Face path. A script, started by the test in its own process: vLLM's tensor-parallel workers
are processes of their own (spawned, so the main guard matters), the test's process runs engines
in-process, and vLLM's Transformers backend compiles transformers' model classes for the whole
process it runs in.

    python tests/vllm_tensor_parallel.py FOLDER OPTIONS_JSON ENCODER_TP_MODE REQUESTS_JSON NEW_TOKENS OUT_JSON [SETTINGS_JSON]

``REQUESTS_JSON``: a list of ``{"prompt_token_ids": [...], "image": "picture.png"}``. ``SETTINGS_JSON``:
more of ``LLM``'s settings (the language side's worker and scheduler; ``enforce_eager``, true unless
given); with them, each request's
entry ends with each rank's ``(layer, kept ids)`` at every boundary its language stage dropped at
(``language.hooks.TRACE``, read from the workers by ``collective_rpc``).
"""

import json
import os
import sys

if __name__ == "__main__":
    folder, options, mode, requests, new_tokens, out = sys.argv[1:7]
    settings = json.loads(sys.argv[7]) if len(sys.argv) > 7 else {}
    backend = mode == "backend"
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0" if backend else "1"
    os.environ["VLLM_ALLOW_INSECURE_SERIALIZATION"] = "1"  # collective_rpc sends the functions below
    from PIL import Image
    from vllm import LLM, SamplingParams

    from duet_vlm.integrations.vllm import select

    select.TRACE = [] if backend else None
    parallel = {"model_impl": "transformers"} if backend else {"tensor_parallel_size": 2, "mm_encoder_tp_mode": mode}
    llm = LLM(
        model=folder, dtype="float32", enforce_eager=settings.pop("enforce_eager", True), max_model_len=2048, seed=0, limit_mm_per_prompt={"image": 1, "video": 0},
        mm_processor_kwargs=json.loads(options) or None, max_num_seqs=4, kv_cache_memory_bytes=1 << 28,
        enable_prefix_caching=False, **parallel, **settings,
    )

    def start_trace(worker):
        from duet_vlm.integrations.vllm.language import hooks

        hooks.TRACE = []

    def read_trace(worker):
        from duet_vlm.integrations.vllm.language import hooks

        return [(req_id, layer, ids.tolist()) for req_id, layer, _, ids in hooks.TRACE]

    if settings:
        llm.collective_rpc(start_trace)
    prompts = [
        {"prompt_token_ids": request["prompt_token_ids"], "multi_modal_data": {"image": Image.open(request["image"]).convert("RGB")}}
        for request in json.loads(requests)
    ]
    count = int(new_tokens)
    params = SamplingParams(temperature=0, max_tokens=count, min_tokens=count, logprobs=1)
    outputs = llm.generate(prompts, params, use_tqdm=False)
    traces = llm.collective_rpc(read_trace) if settings else []
    results = []
    for index, output in enumerate(outputs):
        completion = output.outputs[0]
        tokens = list(completion.token_ids)
        kept = select.TRACE[index].kept.reshape(-1).tolist() if select.TRACE else None
        results.append([tokens, [step[t].logprob for step, t in zip(completion.logprobs, tokens)], len(output.prompt_token_ids), kept])
        if settings:  # offline request ids count from 0 in submission order
            results[-1].append([[(layer, ids) for req_id, layer, ids in trace if int(req_id.split("-")[0]) == index]
                                for trace in traces])
    with open(out, "w") as handle:
        json.dump(results, handle)
