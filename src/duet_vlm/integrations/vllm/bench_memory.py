"""The serving benchmark's ``--memory``: blocks per request per KV-cache group and requests admitted
at a KV cache's size, as the plugin's scheduler records them, in the benchmark's process."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path


@dataclass
class MemoryRow:
    setting: str
    budget: int | None
    groups: int  # KV-cache groups
    layers_per_group: int
    blocks_per_request: list[int]  # per group, the most a request held
    kv_bytes_per_request: int
    pool_blocks: int  # the pool's blocks (vLLM's null block not counted)
    block_size: int
    requests: int
    admitted: int  # the most requests running at once


def measure_memory(folder: Path, label: str, method: str | None, options: dict, budget: int | None, prompts: list,
                   kv_cache_bytes: int, max_tokens: int, block_size: int) -> MemoryRow:
    """``prompts`` (vLLM's prompts, each an image request) at once to an engine in this process at
    ``kv_cache_bytes`` of KV cache in blocks of ``block_size`` tokens (1,024 tokens a sequence): each
    KV-cache group's blocks per request and the most requests running at once, as the plugin's
    scheduler records them (``memory.STATS``), in a row named ``label``."""
    from vllm import LLM, SamplingParams

    from . import memory
    from .options import LANGUAGE_SETTINGS

    server = {} if method is None else {"duet_method": method, "duet_budget": budget,
                                        **({"duet_options": json.dumps(options)} if options else {})}
    # every row with duet-vlm's scheduler (vLLM's own where nothing drops: it records what each group holds)
    # and every prompt in one step
    settings = {**LANGUAGE_SETTINGS} if method is not None else {
        key: LANGUAGE_SETTINGS[key] for key in ("scheduler_cls", "enable_chunked_prefill", "enable_prefix_caching",
                                                "compilation_config")}
    requests = len(prompts)
    memory.STATS = {}
    llm = None
    try:
        llm = LLM(model=str(folder), dtype="float32", seed=0, mm_processor_kwargs=server or None,
                  kv_cache_memory_bytes=kv_cache_bytes, block_size=block_size, max_model_len=1024,
                  max_num_seqs=requests, max_num_batched_tokens=requests * 1024, limit_mm_per_prompt={"image": 1, "video": 0}, **settings)
        params = SamplingParams(temperature=0, max_tokens=max_tokens, min_tokens=max_tokens, ignore_eos=True)
        llm.generate(prompts, params, use_tqdm=False)
        stats = dict(memory.STATS)
    finally:
        memory.STATS = None
        llm = None
    held = [max(blocks[group] for blocks in stats["blocks"].values()) for group in range(len(stats["groups"]))]
    layers = len(stats["groups"][0])
    return MemoryRow(
        label, budget, len(stats["groups"]), layers, held,
        sum(held) * layers * stats["page_bytes"], stats["pool"], stats["block_size"], requests, stats["running"],
    )
