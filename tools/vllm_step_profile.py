"""Where a vLLM decoding step of a server that drops inside the language model goes, against Stage A
alone's: the serving benchmark's model (LLaVA-1.5's geometry, ``bench.BENCH_SIZE``), the engine in
this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``), compiled as a server starts it.

    python tools/vllm_step_profile.py duet        # DUET whole at budget 64
    python tools/vllm_step_profile.py stage-a     # DUET's Stage A alone (layers=[])
    python tools/vllm_step_profile.py fastv
    python tools/vllm_step_profile.py v2drop      # scores without attention: nothing computed at a boundary

Prints the median decoding step (one request: a 65-token answer less a 1-token one, over 64 steps,
the median of three of each, on images new to the server) and a cProfile of one 65-token request:
the functions that took longest in themselves, then the plugin's and vLLM's runner's, by their
cumulative time (cProfile's own overhead inflates short Python calls: read them side by side, not
as absolute costs). A profiling tool, not part of the library; run it on a quiet machine.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import statistics
import tempfile
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("method", choices=["duet", "stage-a", "fastv", "v2drop"])
    parser.add_argument("--budget", type=int, default=64)
    parser.add_argument("--folder", type=Path, help="the benchmark model's folder (written there if absent)")
    args = parser.parse_args()
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"

    import numpy as np
    from PIL import Image
    from vllm import LLM, SamplingParams

    from duet_vlm.integrations.vllm.bench import BENCH_SIZE
    from duet_vlm.integrations.vllm.serve import engine_args
    from duet_vlm.tiny.checkpoints import write_llava

    folder = args.folder or Path(tempfile.gettempdir()) / "duet-vllm-step-profile"
    if not (folder / "config.json").exists():
        write_llava(folder, BENCH_SIZE, sharpness=1.0)
    method, options = ("duet", {"layers": []}) if args.method == "stage-a" else (args.method, None)
    settings = engine_args(method, budget=args.budget, options=options, max_model_len=2048)
    settings.pop("max_model_len", None)
    llm = LLM(str(folder), max_model_len=2048, max_num_seqs=4, kv_cache_memory_bytes=1 << 30, **settings)

    def request(seed: int) -> dict:
        pixels = np.random.default_rng(seed).integers(0, 255, (336, 336, 3), dtype=np.uint8)
        return {"prompt": "USER: <image>\nDescribe. ASSISTANT:", "multi_modal_data": {"image": Image.fromarray(pixels)}}

    def run(tokens: int, seed: int) -> float:
        start = time.perf_counter()
        llm.generate([request(seed)], SamplingParams(max_tokens=tokens, ignore_eos=True, temperature=0), use_tqdm=False)
        return time.perf_counter() - start

    run(1, 0)  # warm
    one = statistics.median(run(1, 10 + i) for i in range(3))
    many = statistics.median(run(65, 20 + i) for i in range(3))
    print(f"{args.method}: decoding step {1000 * (many - one) / 64:.2f} ms (a 1-token request {one:.3f} s)")
    profile = cProfile.Profile()
    profile.enable()
    run(65, 99)
    profile.disable()
    out = io.StringIO()
    stats = pstats.Stats(profile, stream=out)
    stats.sort_stats("tottime").print_stats(20)
    stats.sort_stats("cumulative").print_stats("duet_vlm|gpu_model_runner", 30)
    print(out.getvalue())


if __name__ == "__main__":
    main()
