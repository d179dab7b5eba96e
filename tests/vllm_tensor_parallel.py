"""Runs vLLM's offline engine with ``--tensor-parallel-size 2`` on a tiny checkpoint and writes each
picture's greedy tokens, log-probabilities and prompt length as JSON: what ``tests/test_vllm.py``
compares with the Hugging Face path. A script, started by the test in its own process: vLLM's
tensor-parallel workers are processes of their own (spawned, so this module's main guard matters),
and the test's process runs engines in-process.

    python tests/vllm_tensor_parallel.py FOLDER OPTIONS_JSON ENCODER_TP_MODE PICTURES_JSON OUT_JSON
"""

import json
import os
import sys

if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import test_vllm as helpers  # the prompt and picture helpers of the test

    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "1"  # the test module turns it off for its own engines
    from transformers import AutoProcessor
    from vllm import LLM

    folder, options, mode, pictures, out = sys.argv[1:6]
    processor = AutoProcessor.from_pretrained(folder)
    pictures = [helpers.image(seed, tuple(size)) for seed, size in json.loads(pictures)]
    llm = LLM(
        model=folder, dtype="float32", enforce_eager=True, max_model_len=2048, seed=0, tensor_parallel_size=2,
        mm_encoder_tp_mode=mode, limit_mm_per_prompt={"image": 1, "video": 0},
        mm_processor_kwargs=json.loads(options) or None, max_num_seqs=4, kv_cache_memory_bytes=1 << 28,
        enable_prefix_caching=False,
    )
    results, _ = helpers.vllm_run(llm, processor, pictures)
    with open(out, "w") as handle:
        json.dump(results, handle)
