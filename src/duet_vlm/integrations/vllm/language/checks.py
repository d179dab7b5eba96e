"""What a server that drops inside the language model refuses, at start: engine settings under
which dropping cannot be exact (``check_engine``), and stages that need of a decoder layer what the
plugin does not give them (``check_stage``, read from the stage's own ``LanguageStage.view_needs``)."""

from __future__ import annotations

from ....plan import Plan
from ..options import REFUSALS, SCHEDULER, WORKER, WORKERS, RefusedMethod
from ..served import SERVED_NEEDS, language_methods


class StageNotServed(RefusedMethod):
    """A language-side stage, or an engine setting, that this plugin cannot serve exactly."""


#: why each need is not met yet.
UNMET = {
    "input_ids": "the prompt's token ids (the plugin's boundary reads the step's rows, not its tokens)",
    "run_layer": "a decoder layer or the output head run on states of its own, beside the layers vLLM runs on "
                 "its paged cache",
    "position_embeddings": "the layer's rotary embeddings as the Hugging Face path passes them",
}


def check_stage(plan: Plan, method: str | None = None) -> None:
    """Refuse a plan whose language stage needs what this plugin does not give it yet (the stage's
    own ``view_needs``), naming the ``method`` the server was asked for (where known) and why."""
    stage = plan.language
    if stage is None:
        return
    unmet = sorted(stage.view_needs - SERVED_NEEDS)
    if unmet:
        asked = f"duet_method {method!r} drops inside the language model by its {type(stage).__name__}, which" if method else \
            f"{type(stage).__name__} (a stage that drops inside the language model)"
        raise StageNotServed(
            f"{asked} is not served under vLLM yet: it reads " + "; ".join(UNMET.get(need, need) for need in unmet)
            + ". The plugin serves stages that read a decoder layer's queries and keys, its states or nothing "
            f"({', '.join(language_methods())} at their defaults; DUET with query 'text' or 'last')"
        )


def check_engine(vllm_config) -> None:
    """Refuse, at start, engine settings under which dropping inside the language model cannot be exact."""
    problems = []
    parallel = vllm_config.parallel_config
    if parallel.worker_cls not in WORKERS:
        problems.append(f"start the server with --worker-cls {WORKER} (the runner that gives later layers their kept tokens' slots)")
    chosen = vllm_config.scheduler_config.scheduler_cls
    if (chosen if isinstance(chosen, str) or chosen is None else f"{chosen.__module__}.{chosen.__qualname__}") != SCHEDULER:
        problems.append(f"start the server with --scheduler-cls {SCHEDULER} (the scheduler that holds blocks for the kept tokens only)")
    if vllm_config.cache_config.enable_prefix_caching:
        problems.append("prefix caching is on (--no-enable-prefix-caching): a dropped block depends on the text after it")
    if vllm_config.scheduler_config.enable_chunked_prefill:
        problems.append("chunked prefill is on (--no-enable-chunked-prefill): a prompt that drops must run in one step")
    graphs = vllm_config.compilation_config.cudagraph_mode  # vLLM's CUDAGraphMode (None before the platform sets it)
    if not vllm_config.model_config.enforce_eager and graphs is not None and graphs.name != "NONE":
        # (a compiled model is served: its graph runs the drops through the plugin's operators, ``ops``)
        problems.append("CUDA graphs are on (--compilation-config '{\"cudagraph_mode\": \"NONE\"}', or --enforce-eager): "
                        "a step that drops changes its row count inside the forward, which a captured graph "
                        "cannot, and a captured step is padded to its capture size, which the plugin's hooks refuse")
    if getattr(vllm_config.cache_config, "kv_sharing_fast_prefill", False):
        # Gemma 3n's and Gemma 4's layers that reuse keys and values then run on the logits' rows only,
        # a second forward of their own which the boundary's gather and scatter do not see
        problems.append("KV-sharing fast prefill is on (--kv-sharing-fast-prefill: the layers that reuse keys and values "
                        "run on the logits' rows only)")
    if vllm_config.speculative_config is not None:
        problems.append("speculative decoding is on")
    if parallel.pipeline_parallel_size > 1:
        # a boundary gathers the rows of every request and scatters them back at the model's end,
        # which a stage holding part of the layers (and handing intermediate tensors on) does not see
        problems.append("pipeline parallelism is on (--pipeline-parallel-size 1; tensor parallelism is served)")
    if getattr(parallel, "decode_context_parallel_size", 1) > 1 or getattr(parallel, "prefill_context_parallel_size", 1) > 1:
        problems.append("context parallelism is on (its own block tables and slots)")
    if getattr(parallel, "enable_dbo", False):
        problems.append("dual-batch overlap is on (--enable-dbo: the runner builds its metadata per micro-batch)")
    named = [p if isinstance(p, str) else f"{p.__module__}:{p.__qualname__}"
             for p in (getattr(vllm_config.model_config, "logits_processors", None) or ())]
    if REFUSALS not in named:
        problems.append(f"start the server with --logits-processors {REFUSALS} (it refuses prompt_logprobs, which a "
                        "dropped token cannot answer, with a 400)")
    if vllm_config.lora_config is not None:
        problems.append("LoRA is on")
    if vllm_config.kv_transfer_config is not None:
        problems.append("a KV connector is on")
    if problems:
        raise StageNotServed("dropping inside the language model under vLLM needs: " + "; ".join(problems))
