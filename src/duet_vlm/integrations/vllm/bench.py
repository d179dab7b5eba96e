"""Serving benchmark: vLLM's OpenAI-compatible server with and without a reducer, on one machine.

    python -m duet_vlm.integrations.vllm.bench --out docs/bench/vllm_serving.json

One random-weight checkpoint of the benchmark model's geometry (``--family llava``: LLaVA-1.5's, a
CLIP tower on 336 px images, 576 visual tokens per image, a 32-layer decoder; ``--family qwen2_5_vl``:
Qwen2.5-VL-7B's, a 32-block windowed tower on 672 px images merged 2x2 into 576 visual tokens, a
28-layer decoder of grouped-query attention; widths scaled down to fit a small CPU, as
``duet_vlm.bench.models.ModelSize`` scales them) is served twice: by plain vLLM (the plugin
installed, no method: vLLM's own code path), and with the plugin running a method, where each
request asks for its budget (``mm_processor_kwargs``). A client sends ``requests`` image requests at
each concurrency and output length (``--requests clients``: as many as the concurrency; streaming,
``max_tokens`` tokens each, end-of-sequence ignored: a short answer, where the prefill dominates, and
a longer one, where decoding does), each row and the warm-up request before it on images that server
has not been sent before (vLLM keeps an image's encoding in its encoder cache, keyed by the image and
its processor options: an image sent again skips the vision tower, and a row of repeated images
measured the cache), and measures
requests/s, output tokens/s, time to first token (median and 90th percentile), the peak resident
memory of the server's processes, and, from the server's own metrics (``/metrics``, sampled about
four times a second), the most requests running at once (admitted) and the KV cache a running
request holds (the pool's used fraction of its bytes over the running requests, the most sampled).
Rows record the machine's load average before and after: on a shared machine the numbers are noisy,
and the load says how noisy.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import platform
import re
import shlex
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ...tiny.checkpoints import TinySize, write_llava, write_qwen_vl

#: the benchmark model: LLaVA-1.5's token geometry (336 px, patch 14, feature layer -2, 32 decoder
#: layers), widths a 2-core CPU can serve.
BENCH_SIZE = TinySize(
    hidden=512, heads=8, layers=32, intermediate=1408, vision_hidden=256, vision_heads=4, vision_layers=24,
    image_size=336, patch_size=14,
)

#: Qwen2.5-VL-7B's token geometry scaled as BENCH_SIZE scales LLaVA-1.5's: 28 decoder layers of width
#: 512 (8 query heads, 2 key/value heads: the 7B groups 28 into 4), a 32-block tower of width 256
#: (window 112 px, full attention in blocks 7, 15, 23 and 31, as the 7B's), 672 px images: 48x48
#: patches, merged 2x2 into 576 visual tokens.
QWEN_BENCH = dict(layers=28, hidden=512, heads=8, kv_heads=2, intermediate=1408, max_pixels=672 * 672, vision_fields=dict(
    depth=32, hidden_size=256, intermediate_size=512, num_heads=4, window_size=112, fullatt_block_indexes=[7, 15, 23, 31]))


#: the most requests a served row runs at once
MAX_NUM_SEQS = 16


@dataclass(frozen=True)
class Family:
    name: str
    image: tuple[int, int]  # pixels
    visual_tokens: int
    model: dict  # the record's description
    prompt: str  # --memory's prompt, the image's placeholder where the processor expands it


FAMILIES = {
    "llava": Family("LLaVA-1.5", (336, 336), 576, {
        **asdict(BENCH_SIZE), "tower": "CLIP", "note": "random weights; LLaVA-1.5 token geometry"},
        "USER: <image>\nwhat colour is the shape on the left? ASSISTANT:"),
    "qwen2_5_vl": Family("Qwen2.5-VL", (672, 672), 576, {
        **{key: QWEN_BENCH[key] for key in ("hidden", "heads", "kv_heads", "layers", "intermediate")},
        "vision_hidden": QWEN_BENCH["vision_fields"]["hidden_size"], "vision_layers": QWEN_BENCH["vision_fields"]["depth"],
        "image_size": 672, "patch_size": 14, "tower": "windowed Qwen2.5-VL",
        "note": "random weights; Qwen2.5-VL-7B token geometry"},
        "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>what colour is the shape on the left?<|im_end|>\n"
        "<|im_start|>assistant\n"),
}


def write_model(family: str, folder: Path) -> Path:
    """The benchmark's random-weight checkpoint of ``family``'s geometry in ``folder``."""
    if family == "llava":
        return write_llava(folder, BENCH_SIZE, sharpness=1.0)
    return write_qwen_vl(folder, sharpness=1.0, kind=family, **QWEN_BENCH)


@dataclass
class Row:
    setting: str
    method: str | None
    budget: int | None
    visual_tokens: int
    concurrency: int
    max_tokens: int
    requests: int
    output_tokens: int
    seconds: float
    requests_per_s: float
    output_tokens_per_s: float
    ttft_median_s: float
    ttft_p90_s: float
    peak_rss_gib: float
    load_before: float
    load_after: float
    admitted: int = 0  # the most requests running at once (the server's vllm:num_requests_running)
    kv_mib_per_request: float = 0.0  # the most of the KV pool in use per running request
    pool_mib: float = 0.0  # the KV pool (--kv-cache-memory-bytes)
    pool_blocks: int = 0  # its blocks, as vLLM counts them (a dropping server's groups hold smaller pages)
    step_ms_median: float = 0.0  # a request's decoding step: (its time less its first token's) / (tokens - 1)
    startup_s: float = 0.0  # the server's start, to its first healthy answer
    warmup_s: float = 0.0  # vLLM's engine start (profile, KV cache, warm-up), as its log reports it
    compile_s: float | None = None  # of which compiling the language model, where vLLM's log says (``engine_start``)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def picture(seed: int, size: tuple[int, int] = (336, 336)):
    """A ``(width, height)`` picture with structure (6x6 blocks of colour and noise), so that attention
    and diversity rank its patches."""
    from PIL import Image

    rng = np.random.RandomState(seed)
    width, height = size
    blocks = np.kron(rng.rand(6, 6, 3), np.ones((height // 6 + 1, width // 6 + 1, 1)))[:height, :width]
    return Image.fromarray(((0.7 * blocks + 0.3 * rng.rand(height, width, 3)) * 255).astype("uint8"))


def data_url(image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def wait_until_healthy(process: subprocess.Popen, port: int, startup_s: float, log) -> None:
    """Return once the server ``process`` answers ``/health`` on 127.0.0.1:``port``; a ``RuntimeError``
    (its log's tail) if it exits first, a ``TimeoutError`` if it has not answered in ``startup_s``."""
    deadline = time.monotonic() + startup_s
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited ({process.returncode}); see {log}:\n{Path(log).read_text()[-4000:]}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"the server did not start in {startup_s:.0f} s; see {log}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as reply:
                if reply.status == 200:
                    return
        except OSError:
            time.sleep(2)


class Server:
    """``python -m duet_vlm.integrations.vllm.serve folder *options`` on 127.0.0.1 (float32, 2,048
    tokens a sequence, ``kv_cache_bytes`` of KV cache, ``limits`` items a prompt, one image unless
    told, the model named ``name``, requests' processor options trusted), stopped by ``stop`` or on
    leaving a ``with`` block, or when it fails to start; its processes' resident memory sampled while
    it runs (``peak``, bytes)."""

    def __init__(self, folder: Path, options: list[str], log: Path, startup_s: float, *, name: str = "bench",
                 kv_cache_bytes: int = 1 << 30, limits: dict | None = None, env: dict | None = None):
        self.port = free_port()
        command = [
            sys.executable, "-m", "duet_vlm.integrations.vllm.serve", str(folder), *options, "--host", "127.0.0.1",
            "--port", str(self.port), "--dtype", "float32", "--max-model-len", "2048",
            "--kv-cache-memory-bytes", str(kv_cache_bytes),
            "--limit-mm-per-prompt", json.dumps(limits or {"image": 1, "video": 0}),
            "--served-model-name", name, "--trust-request-mm-kwargs",
        ]
        self.log = open(log, "w")
        started = time.monotonic()
        self.process = subprocess.Popen(command, stdout=self.log, stderr=subprocess.STDOUT, env=env)
        self.peak = 0
        self.pool_blocks = 0
        self.pool_bytes = kv_cache_bytes
        self.samples: list[tuple[int, float]] = []  # (requests running, fraction of the KV pool used)
        self._sampling = True
        self._sampler = threading.Thread(target=self._sample, daemon=True)
        self._sampler.start()
        try:
            wait_until_healthy(self.process, self.port, startup_s, log)
        except BaseException:
            self.stop()
            raise
        self.peak = 0  # what serving takes, not loading
        self.startup_s = time.monotonic() - started
        self.warmup_s, self.compile_s = engine_start(Path(log).read_text())
        self.pool_blocks = int(float(self.metric("vllm:cache_config_info", "num_gpu_blocks") or 0))

    def metrics(self) -> str:
        """The server's ``/metrics`` (Prometheus' text format)."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=5) as reply:
            return reply.read().decode()

    def metric(self, name: str, label: str | None = None, text: str | None = None) -> str | None:
        """The first sample of metric ``name`` in ``text`` (``metrics()`` unless given): its value, or
        its ``label``'s."""
        for line in (self.metrics() if text is None else text).splitlines():
            if line.startswith(name + "{") or line.startswith(name + " "):
                if label is None:
                    return line.rsplit(" ", 1)[1]
                found = line.partition(f'{label}="')[2]
                return found.partition('"')[0] if found else None
        return None

    def admitted(self) -> tuple[int, float]:
        """Since the samples were last cleared: the most requests running at once, and the most bytes
        of the KV pool in use per running request (vLLM reports the fraction of its blocks in use;
        its blocks are of one size within a server, not across servers, so bytes compare)."""
        running = max((count for count, _ in self.samples), default=0)
        per_request = max((used * self.pool_bytes / count for count, used in self.samples if count), default=0.0)
        return running, per_request

    def __enter__(self) -> "Server":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def _sample(self) -> None:
        import psutil

        root = psutil.Process(self.process.pid)
        tick = 0
        while self._sampling:
            try:
                total = sum(p.memory_info().rss for p in [root, *root.children(recursive=True)])
                self.peak = max(self.peak, total)
            except psutil.Error:
                pass
            tick += 1
            if self.pool_blocks and tick % 3 == 0:
                try:
                    text = self.metrics()
                    self.samples.append((int(float(self.metric("vllm:num_requests_running", text=text))),
                                         float(self.metric("vllm:kv_cache_usage_perc", text=text))))
                except (OSError, TypeError, ValueError):
                    pass
            time.sleep(0.08)

    def stop(self) -> None:
        self._sampling = False
        self.process.terminate()
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=30)
        self.log.close()


def engine_start(log: str) -> tuple[float, float | None]:
    """vLLM's engine start in a server's ``log``: its seconds, and those it spent compiling the
    language model as vLLM's engine core reports them (``None`` where it does not: an eager server,
    and on vLLM's CPU backend a compiled one too, whose worker process compiles without telling the
    engine core; its engine start holds the compiling then).

    >>> engine_start("init engine (profile, create kv cache, warmup model) took 41.27 s (compilation: 30.02 s)")
    (41.27, 30.02)
    >>> engine_start("init engine (profile, create kv cache, warmup model) took 9.50 s")
    (9.5, None)
    """
    found = re.search(r"init engine \(profile, create kv cache, warmup model\) took ([\d.]+) s"
                      r"(?: \(compilation: ([\d.]+) s)?", log)
    if found is None:
        raise RuntimeError("the server's log does not say how long its engine took to start")
    return float(found.group(1)), None if found.group(2) is None else float(found.group(2))


async def _one(client, url: str, budget: int | None, max_tokens: int) -> tuple[float, int, float]:
    """One streaming chat request: (time to first token, output tokens, its whole time)."""
    extra = {"min_tokens": max_tokens, "ignore_eos": True}
    if budget is not None:
        extra["mm_processor_kwargs"] = {"duet_budget": budget}
    start = time.perf_counter()
    first = None
    tokens = 0
    stream = await client.chat.completions.create(
        model="bench", max_tokens=max_tokens, temperature=0, stream=True, stream_options={"include_usage": True},
        messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                               {"type": "text", "text": "what colour is the shape on the left?"}]}],
        extra_body=extra,
    )
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content is not None and first is None:
            first = time.perf_counter() - start
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
    total = time.perf_counter() - start
    return (first if first is not None else total), tokens, total


async def _run(port: int, urls: list[str], budget: int | None, concurrency: int, max_tokens: int, timeout: float):
    import openai

    client = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", timeout=timeout, max_retries=0)
    gate = asyncio.Semaphore(concurrency)

    async def limited(url):
        async with gate:
            return await _one(client, url, budget, max_tokens)

    try:
        start = time.perf_counter()
        results = await asyncio.gather(*(limited(url) for url in urls))
        return time.perf_counter() - start, results
    finally:
        await client.close()


def measure(server: Server, setting: str, method, budget, visual_tokens, concurrency, requests, max_tokens, seed,
            image: tuple[int, int] = (336, 336)) -> Row:
    """One row: a warm-up request, then ``requests`` at ``concurrency``, on the images of seeds
    ``seed .. seed + requests`` (the warm-up's the last; ``image`` pixels): give each row of a server
    seeds of its own."""
    urls = [data_url(picture(seed + i, image)) for i in range(requests + 1)]
    warm = urls.pop()
    asyncio.run(_run(server.port, [warm], budget, 1, max_tokens, 600))  # warm-up, not counted
    server.peak = 0
    server.samples.clear()
    load_before = os.getloadavg()[0]
    seconds, results = asyncio.run(_run(server.port, urls, budget, concurrency, max_tokens, 600))
    load_after = os.getloadavg()[0]
    admitted, per_request = server.admitted()
    ttfts = sorted(r[0] for r in results)
    steps = [(total - first) / (tokens - 1) for first, tokens, total in results if tokens > 1]
    tokens = sum(r[1] for r in results)
    return Row(
        setting, method, budget, visual_tokens, concurrency, max_tokens, requests, tokens, round(seconds, 3),
        round(requests / seconds, 4), round(tokens / seconds, 3), round(statistics.median(ttfts), 3),
        round(ttfts[min(len(ttfts) - 1, int(0.9 * len(ttfts)))], 3), round(server.peak / 2**30, 3),
        round(load_before, 2), round(load_after, 2), admitted, round(per_request / 2**20, 2),
        round(server.pool_bytes / 2**20, 1), server.pool_blocks,
        round(1000 * statistics.median(steps), 2) if steps else 0.0, round(server.startup_s, 1), server.warmup_s,
        server.compile_s,
    )


def method_spec(text: str) -> tuple[str, dict]:
    """A ``--methods`` entry: ``name`` or ``name:{json options}``.

    >>> method_spec('duet:{"layers": []}')
    ('duet', {'layers': []})
    """
    name, _, options = text.partition(":")
    return name, json.loads(options) if options else {}


def method_label(name: str, options: dict) -> str:
    return name + (" (" + ", ".join(f"{key}={json.dumps(value)}" for key, value in options.items()) + ")" if options else "")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="docs/bench/vllm_serving.json")
    parser.add_argument("--family", choices=sorted(FAMILIES), default="llava", help="the benchmark model's geometry")
    parser.add_argument("--method", default="visionzip")
    parser.add_argument("--methods", nargs="*", help="methods served one after another instead of --method, each "
                        "'name' or 'name:{json options}' (DUET's Stage A alone: 'duet:{\"layers\": []}')")
    parser.add_argument("--memory", action="store_true",
                        help="instead of serving: blocks per request per KV-cache group and requests admitted at "
                             "--kv-cache-bytes, all --requests at once, in this process")
    parser.add_argument("--kv-cache-bytes", type=int, default=240 << 20, help="--memory: the KV cache's size")
    parser.add_argument("--block-size", type=int, default=32, help="--memory: tokens per block")
    parser.add_argument("--budgets", default="192,64", help="per-request budgets, comma-separated")
    parser.add_argument("--concurrency", default="1,4")
    parser.add_argument("--requests", default="6", help="requests per measurement, or 'clients': as many as the concurrency")
    parser.add_argument("--max-tokens", default="16,96", help="output tokens per request, comma-separated")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="the server's OMP_NUM_THREADS")
    parser.add_argument("--startup-s", type=float, default=600)
    parser.add_argument("--eager", nargs="*", metavar="METHOD",
                        help="also serve these of --methods, named as there (none named: every one), with --enforce-eager (every step "
                             "eager: how a server that drops inside the language model ran before its decoding was "
                             "compiled)")
    parser.add_argument("--transformers-backend", action="store_true",
                        help="also serve the model through vLLM's Transformers modeling backend "
                             "(--model-impl transformers), the other route to every family: unreduced, and reduced "
                             "by the plugin's prototype on it (integrations/vllm/backend.py)")
    args = parser.parse_args(argv)
    if args.requests != "clients":
        args.requests = int(args.requests)
    elif args.memory:
        parser.error("--memory sends --requests at once: give a number")
    budgets = [int(b) for b in args.budgets.split(",") if b]
    levels = [int(c) for c in args.concurrency.split(",") if c]
    lengths = [int(t) for t in args.max_tokens.split(",") if t]
    work = Path(tempfile.mkdtemp(prefix="duet-vllm-bench-"))
    family = FAMILIES[args.family]
    folder = write_model(args.family, work / "model")
    texts = args.methods or [args.method]
    methods = [method_spec(text) for text in texts]
    if args.memory:
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the scheduler's records are read in this process
    import vllm

    from .bench_memory import measure_memory

    if args.memory:
        prompts = [{"prompt": family.prompt, "multi_modal_data": {"image": picture(200 + i, family.image)}}
                   for i in range(args.requests)]
        rows = [measure_memory(folder, "unreduced", None, {}, None, prompts, args.kv_cache_bytes, lengths[0],
                               args.block_size)]
        print(json.dumps(asdict(rows[0])), flush=True)
        for method, options in methods:
            for budget in budgets:
                rows.append(measure_memory(folder, method_label(method, options), method, options, budget, prompts,
                                           args.kv_cache_bytes, lengths[0], args.block_size))
                print(json.dumps(asdict(rows[-1])), flush=True)
        write_record(args, argv, rows, lengths, vllm.__version__, family,
                     {"kv_cache_bytes": args.kv_cache_bytes, "block_size": args.block_size, "max_model_len": 1024})
        return

    rows: list[Row] = []
    settings = [("vLLM, unreduced", None, {}, [None], ())]
    if args.transformers_backend:
        settings.append(("vLLM Transformers backend, unreduced", None, {}, [None], ("--model-impl", "transformers")))
    for text, (method, options) in zip(texts, methods):
        settings.append((f"plugin, {method_label(method, options)}", method, options, budgets, ()))
        if args.eager is not None and (not args.eager or text in args.eager):
            settings.append((f"plugin, {method_label(method, options)}, eager", method, options, budgets, ("--enforce-eager",)))
    if args.transformers_backend:
        settings.append((f"Transformers backend prototype, {args.method}", args.method, {}, budgets,
                         ("--model-impl", "transformers")))
    for number, (setting, method, method_options, setting_budgets, extra) in enumerate(settings):
        options = ["--method", method, "--budget", str(setting_budgets[0])] if method is not None else []
        if method_options:
            options += ["--options", json.dumps(method_options)]
        server = Server(folder, [*options, "--no-enable-prefix-caching", "--max-num-seqs", str(MAX_NUM_SEQS), *extra],
                        work / f"server-{number}-{method}.log", args.startup_s,
                        env={**os.environ, "OMP_NUM_THREADS": str(args.threads)})
        seed = 100  # each server the same images, in the same order; each row of it images of its own
        try:
            for budget in setting_budgets:
                for max_tokens in lengths:
                    for concurrency in levels:
                        requests = concurrency if args.requests == "clients" else args.requests
                        row = measure(server, setting, method, budget, budget or family.visual_tokens, concurrency,
                                      requests, max_tokens, seed=seed, image=family.image)
                        seed += requests + 1
                        print(json.dumps(asdict(row)), flush=True)
                        rows.append(row)
        finally:
            server.stop()
    write_record(args, argv, rows, lengths, vllm.__version__, family, {"max_num_seqs": MAX_NUM_SEQS})


def write_record(args, argv, rows: list, lengths: list[int], version: str, family: Family,
                 settings: dict | None = None) -> None:
    record = {
        "command": "python -m duet_vlm.integrations.vllm.bench " + shlex.join(argv if argv is not None else sys.argv[1:]),
        "model": {**family.model, "family": family.name, "visual_tokens": family.visual_tokens},
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "server_threads": args.threads,
                    "vllm": version, "python": platform.python_version()},
        "settings": {"requests": args.requests, "max_tokens": lengths, "prefix_caching": False, "dtype": "float32",
                     **({} if args.memory else {"images": "new to the server in every row"}), **(settings or {})},
        "rows": [asdict(row) for row in rows],
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
