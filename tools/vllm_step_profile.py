"""Where a vLLM decoding step of a server that drops inside the language model goes, against Stage A
alone's: the serving benchmark's model (LLaVA-1.5's geometry, ``bench.BENCH_SIZE``), the engine in
this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``), compiled as a server starts it.

    python tools/vllm_step_profile.py duet        # DUET whole at budget 64
    python tools/vllm_step_profile.py stage-a     # DUET's Stage A alone (layers=[])
    python tools/vllm_step_profile.py fastv
    python tools/vllm_step_profile.py v2drop      # scores without attention: nothing computed at a boundary
    python tools/vllm_step_profile.py duet --hidden 2048   # a wider decoder (LLaVA-1.5-7B's is 4096)

Prints the median decoding step (one request, or ``--batch N`` together: a 65-token answer less a
1-token one, over 64 steps, the median of three of each, on images new to the server), then a
cProfile of one 65-token request: the functions that took longest in themselves, then the plugin's
and vLLM's runner's, by their cumulative time (cProfile's own overhead inflates short Python calls:
read them side by side, not as absolute costs). ``--regions`` in place of cProfile: torch's profiler
over one 65-token request, per decoding step, the runner's regions (the model's forward, the step's
attention metadata) and the operators of the plugin and of vLLM, each one's median call times its
calls a step. ``--out FILE`` writes the command, the machine and what it printed (not the cProfile).
A profiling tool, not part of the library; run it on a quiet machine.
"""

from __future__ import annotations

import argparse
import dataclasses
import cProfile
import io
import os
import pstats
import statistics
import sys
import tempfile
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("method", choices=["duet", "stage-a", "fastv", "v2drop"])
    parser.add_argument("--budget", type=int, default=64)
    parser.add_argument("--folder", type=Path, help="the benchmark model's folder (written there if absent)")
    parser.add_argument("--hidden", type=int, help="the decoder's width (heads of 64, an MLP 43/16 as wide, as "
                        "LLaVA-1.5-7B's 4096 and 11008); the benchmark's 512 if not given")
    parser.add_argument("--batch", type=int, default=1, help="requests decoded together (each on its own image)")
    parser.add_argument("--no-profile", action="store_true", help="time the steps only")
    parser.add_argument("--out", type=Path, help="also write the command and what it printed (not the cProfile) here")
    parser.add_argument("--regions", action="store_true",
                        help="in place of cProfile, torch's profiler: per decoding step, the runner's regions and "
                        "the operators of the plugin and of vLLM (medians over a 65-token request's calls)")
    args = parser.parse_args()
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    if args.regions:  # vLLM's runner names its regions to torch's profiler
        os.environ["VLLM_CUSTOM_SCOPES_FOR_PROFILING"] = "1"

    import numpy as np
    from PIL import Image
    from vllm import LLM, SamplingParams

    from duet_vlm.integrations.vllm.bench import BENCH_SIZE
    from duet_vlm.integrations.vllm.serve import engine_args
    from duet_vlm.tiny.checkpoints import write_llava

    size = BENCH_SIZE
    if args.hidden:
        size = dataclasses.replace(size, hidden=args.hidden, heads=args.hidden // 64, intermediate=args.hidden * 43 // 16)
    folder = args.folder or Path(tempfile.gettempdir()) / f"duet-vllm-step-profile-{size.hidden}"
    if not (folder / "config.json").exists():
        write_llava(folder, size, sharpness=1.0)
    method, options = ("duet", {"layers": []}) if args.method == "stage-a" else (args.method, None)
    settings = engine_args(method, budget=args.budget, options=options, max_model_len=2048)
    settings.pop("max_model_len", None)
    llm = LLM(str(folder), max_model_len=2048, max_num_seqs=max(4, args.batch), kv_cache_memory_bytes=1 << 30, **settings)

    def request(seed: int) -> dict:
        pixels = np.random.default_rng(seed).integers(0, 255, (336, 336, 3), dtype=np.uint8)
        return {"prompt": "USER: <image>\nDescribe. ASSISTANT:", "multi_modal_data": {"image": Image.fromarray(pixels)}}

    def run(tokens: int, seed: int) -> float:
        start = time.perf_counter()
        params = SamplingParams(max_tokens=tokens, ignore_eos=True, temperature=0)
        llm.generate([request(1000 * seed + i) for i in range(args.batch)], params, use_tqdm=False)
        return time.perf_counter() - start

    run(1, 0)  # warm
    one = statistics.median(run(1, 10 + i) for i in range(3))
    many = statistics.median(run(65, 20 + i) for i in range(3))
    import torch
    import vllm

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), "unknown CPU")
    report = [f"python tools/vllm_step_profile.py {' '.join(sys.argv[1:])}",
              f"{cpu}, {os.cpu_count()} cores; vLLM {vllm.__version__}, torch {torch.__version__}; "
              f"{str(llm.llm_engine.model_config.dtype).removeprefix('torch.')}",
              f"{args.method}: decoding step {1000 * (many - one) / 64:.2f} ms (1-token requests {one:.3f} s; "
              f"decoder width {size.hidden}, {args.batch} requests a step)"]
    print(report[-1])
    if args.no_profile:
        return write(args.out, report)
    if args.regions:
        runner = llm.llm_engine.engine_core.engine_core.model_executor.driver_worker.worker.model_runner
        build = runner._build_attention_metadata

        def named(*positional, **keywords):  # the step's attention metadata: vLLM's, and the plugin's where it drops
            with torch.profiler.record_function("gpu_model_runner: attention metadata"):
                return build(*positional, **keywords)

        runner._build_attention_metadata = named
        report.append(regions(lambda tokens: run(tokens, 99)))
        print(report[-1])
        return write(args.out, report)
    profile = cProfile.Profile()
    profile.enable()
    run(65, 99)
    profile.disable()
    out = io.StringIO()
    stats = pstats.Stats(profile, stream=out)
    stats.sort_stats("tottime").print_stats(20)
    stats.sort_stats("cumulative").print_stats("duet_vlm|gpu_model_runner", 30)
    print(out.getvalue())
    write(args.out, report)


def write(out: Path | None, report: list[str]) -> None:
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text("\n".join(report) + "\n")


def regions(run) -> str:
    """Per decoding step, the CPU time of vLLM's runner's regions (``gpu_model_runner: ...``) and of
    the operators named ``duet_vlm::`` and ``vllm::``, by torch's profiler over one 65-token request
    (its prefill and 64 decoding steps): each one's median call times its calls a step, so that the
    prefill's one long call does not count."""
    import statistics

    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        run(65)
    durations: dict[str, list[float]] = {}
    for event in prof.events():
        if event.name.startswith(("gpu_model_runner:", "duet_vlm::", "vllm::")):
            durations.setdefault(event.name, []).append(event.cpu_time_total)
    lines = ["per decoding step: region or operator, CPU ms (its median call, with what it calls, x its calls a step)"]
    rows = [(statistics.median(times) * round(len(times) / 65) / 1000, name, len(times) / 65)
            for name, times in durations.items()]
    for total, name, calls in sorted(rows, reverse=True):
        lines.append(f"  {name}: {total:.3f} ms ({calls:.1f} calls a step)")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
