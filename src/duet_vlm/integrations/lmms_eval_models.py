"""The lmms-eval models of duet-vlm: lmms-eval's own model classes with a reducer attached.

    lmms-eval --model duet_llava_hf \\
        --model_args pretrained=llava-hf/llava-1.5-7b-hf,method=duet,budget=192 --tasks pope

=============================  ===============================  ==========================================
model                          lmms-eval class it extends       checkpoints
=============================  ===============================  ==========================================
``duet_llava_hf``              chat ``llava_hf``                llava-hf LLaVA-1.5, LLaVA-NeXT and
(aliases ``duet_llava_next_hf``,                                LLaVA-OneVision (lmms-eval's ``llava_hf``
``duet_llava_onevision_hf``)                                    picks the class from the config)
``duet_video_llava``           simple ``video_llava``           ``LanguageBind/Video-LLaVA-7B-hf``
``duet_qwen2_vl``              simple ``qwen2_vl``              Qwen2-VL (``lmms_eval_qwen``)
``duet_qwen2_5_vl``            chat ``qwen2_5_vl``              Qwen2.5-VL (``lmms_eval_qwen``)
``duet_qwen3_vl``              chat ``qwen3_vl``                Qwen3-VL (``lmms_eval_qwen``)
``duet_qwen3_5``               chat ``qwen3_5``                 Qwen3.5, Qwen3.5-MoE (``lmms_eval_qwen``)
``duet_internvl_hf``           chat ``internvl_hf``             InternVL3, InternVL3.5 (``...-hf``)
``duet_gemma3``                simple ``gemma3``                Gemma 3 (``google/gemma-3-*-it``)
``duet_gemma4``                simple ``gemma4``                Gemma 4 (``google/gemma-4-*-it``)
=============================  ===============================  ==========================================

Every model takes the same ``model_args`` on top of its lmms-eval class's own: ``method=`` (any
name in ``duet_vlm.METHODS``, default ``duet``), ``budget=`` (average visual tokens per decoder
layer, per visual item) or ``ratio=`` (the kept fraction of each item's tokens; suits anyres images
and videos, whose token counts differ), and any option of that method. Options whose field is a
tuple take ``;``-separated values (``layers=16;24,ratios=0.5;0.0``; an empty value, ``layers=``, is
the empty tuple) and ``none`` means ``None`` (``cluster_width=none``). With ``query=salient`` the
model's tokenizer is passed to the method.

A checkpoint fine-tuned under a reducer (``duet-vlm train`` writes ``duet_vlm_reducer.json`` beside
the weights) brings it: with none of ``method``, ``budget``, ``ratio`` or a method option given, a
local ``pretrained`` directory that carries one attaches it (``duet_vlm.load_reducer``);
``saved_reducer=false`` opts out (then ``method`` defaults to ``duet``).

Budgets per request: a task's ``generation_kwargs`` (or lmms-eval's ``--gen_kwargs``) may hold
``duet_budget=N`` or ``duet_ratio=R``; those requests run with that budget (``reducer.per_row``, one
value for every row of their batches) and the keys are taken out before lmms-eval's class sees the
generation arguments. Requests without them run with the model's own budget. Several tasks with
different budgets can so run in one call.

The reducer is logged when it attaches as its ``to_dict()`` (``duet_vlm: attached {"method": ...}``,
also ``model.reducer_record``), which ``duet_vlm.from_dict`` rebuilds. Over the run the reducer's
statistics are summed (every prefill, all processes) and handed to
lmms-eval's metric log, which reports them in the results' ``throughput`` section with an
``avg_`` prefix: ``avg_duet_vlm_visual_tokens_per_layer``, ``avg_duet_vlm_llm_input_tokens``,
``avg_duet_vlm_flops_ratio`` (exact decoder prefill FLOPs, reduced / unreduced),
``avg_duet_vlm_flops_ratio_fastv`` (the papers' formula), ``avg_duet_vlm_kv_ratio`` and
``avg_duet_vlm_prefills``. lmms-eval sends all generation requests of a run in one call, so these
are whole-run values (per call otherwise).
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import json
from pathlib import Path
from typing import Any

import torch
from accelerate import PartialState
from lmms_eval.models.chat.internvl_hf import InternVLHf
from lmms_eval.models.chat.llava_hf import LlavaHf
from lmms_eval.models.model_utils.gen_metrics import log_metrics
from lmms_eval.models.model_utils.load_video import read_video
from lmms_eval.models.simple.gemma3 import Gemma3
from lmms_eval.models.simple.gemma4 import Gemma4
from lmms_eval.models.simple.video_llava import VideoLLaVA
from loguru import logger as eval_logger
from tqdm import tqdm

import duet_vlm

PREFIX = "duet_vlm_"
#: The generation arguments of a request that set its own budget (see the module docstring).
REQUEST_KEYS = ("duet_budget", "duet_ratio")


def _flag(value: Any) -> bool:
    """A boolean model arg (lmms-eval passes ``true``/``false`` as text or as a bool)."""
    if isinstance(value, str):
        if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
            raise ValueError(f"saved_reducer must be true or false, got {value!r}")
        return value.lower() in ("true", "1", "yes")
    return bool(value)


def generation_arguments(request) -> dict:
    """A request's generation arguments: the dict among its ``args`` (a simple model's second, a chat
    model's third)."""
    return next((argument for argument in request.args if isinstance(argument, dict)), {})


def request_budget(gen_kwargs: dict) -> tuple[str, Any] | None:
    """``("budget", N)`` or ``("ratio", R)`` from a request's generation arguments, or ``None``.

    >>> request_budget({"max_new_tokens": 8, "duet_budget": "64"})
    ('budget', 64)
    >>> request_budget({"max_new_tokens": 8}) is None
    True
    """
    given = [key for key in REQUEST_KEYS if gen_kwargs.get(key) is not None]
    if len(given) > 1:
        raise ValueError("a request's generation arguments give duet_budget or duet_ratio, not both")
    if not given:
        return None
    value = gen_kwargs[given[0]]
    kind = given[0].removeprefix("duet_")
    return kind, (int(value) if kind == "budget" else float(value)) if isinstance(value, str) else value


def lmms_arguments(cls: type) -> set[str]:
    """The keyword arguments the lmms-eval class behind ``ReducerMixin`` in ``cls`` accepts: its
    ``__init__``'s, and those of the classes it passes ``**kwargs`` on to (lmms-eval's Qwen3.5 is
    Qwen3-VL's ``__init__`` with other defaults)."""
    names: set[str] = set()
    for base in cls.__mro__[cls.__mro__.index(ReducerMixin) + 1 :]:
        init = base.__dict__.get("__init__")
        if init is None:
            continue
        parameters = inspect.signature(init).parameters.values()
        names |= {p.name for p in parameters if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL) and p.name != "self"}
        if not any(p.kind == p.VAR_KEYWORD for p in parameters):
            break
    return names


def method_options(method: str, options: dict[str, Any]) -> dict[str, Any]:
    """Keyword arguments for ``duet_vlm.make(method, ...)`` from lmms-eval's parsed ``model_args``.

    >>> method_options("duet", {"layers": "16;24", "ratios": "0.5;0.0", "cluster_width": "none"})
    {'layers': (16, 24), 'ratios': (0.5, 0.0), 'cluster_width': None}
    >>> method_options("duet", {"layers": 16})
    {'layers': (16,)}
    """
    if method not in duet_vlm.METHODS:
        raise ValueError(f"unknown method {method!r}; registered: {', '.join(sorted(duet_vlm.METHODS))}")
    fields = {f.name: f for f in dataclasses.fields(duet_vlm.METHODS[method])}
    parsed = {}
    for name, value in options.items():
        if name not in fields:
            raise ValueError(f"method {method!r} has no option {name!r}; its options: {', '.join(fields)}")
        if isinstance(value, str) and value.lower() == "none":
            parsed[name] = None
        elif "tuple" in str(fields[name].type):
            items = value.split(";") if isinstance(value, str) else [value]
            parsed[name] = tuple(_scalar(item) for item in items if item != "")
        else:
            parsed[name] = value
    return parsed


def _scalar(text: Any) -> Any:
    if not isinstance(text, str):
        return text
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


class RunStats:
    """Sums of a reducer's ``ReductionStats`` over prefills, reducible across processes."""

    FIELDS = ("prefills", "tokens_per_layer", "llm_input_tokens", "flops", "flops_full", "flops_fastv",
              "flops_fastv_full", "kv_bytes", "kv_bytes_full")

    def __init__(self) -> None:
        self.totals = torch.zeros(len(self.FIELDS), dtype=torch.float64)

    def add(self, stats: duet_vlm.ReductionStats) -> None:
        rows = len(stats.text_tokens)
        values = (rows, rows * stats.average_tokens, rows * stats.llm_input_tokens, stats.flops_exact,
                  stats.flops_exact_full, stats.flops_fastv, stats.flops_fastv_full, stats.kv_bytes, stats.kv_bytes_full)
        self.totals += torch.tensor(values, dtype=torch.float64)

    def summary(self, totals: torch.Tensor | None = None) -> dict[str, float]:
        t = dict(zip(self.FIELDS, (self.totals if totals is None else totals).tolist()))
        if not t["prefills"]:
            return {}
        return {
            "prefills": int(t["prefills"]),
            "visual_tokens_per_layer": t["tokens_per_layer"] / t["prefills"],
            "llm_input_tokens": t["llm_input_tokens"] / t["prefills"],
            "flops_ratio": t["flops"] / t["flops_full"],
            "flops_ratio_fastv": t["flops_fastv"] / t["flops_fastv_full"],
            "kv_ratio": t["kv_bytes"] / t["kv_bytes_full"],
        }


class ReducerMixin:
    """Attaches ``duet_vlm.make(method, budget=..., ratio=..., **options)`` to an lmms-eval model for
    the whole run and logs the reducer's statistics after every ``generate_until`` and
    ``loglikelihood`` call (see the module docstring for the ``model_args``).

    Put it first among the bases; the lmms-eval class must load its model in ``__init__`` and expose
    it as ``self.model`` (unwrapped under accelerate), as lmms-eval's HF model classes do. A new
    family is one line, ``class DuetX(ReducerMixin, X): ...``, plus a manifest entry.

    >>> from lmms_eval.models.chat.llava_hf import LlavaHf                          # doctest: +SKIP
    >>> class DuetLlavaHf(ReducerMixin, LlavaHf): ...                                 # doctest: +SKIP
    >>> DuetLlavaHf(pretrained="llava-hf/llava-1.5-7b-hf", method="duet", budget=64)  # doctest: +SKIP
    """

    def __init__(self, method: str | None = None, budget: int | None = None, ratio: float | None = None,
                 saved_reducer: Any = True, **kwargs: Any) -> None:
        # lmms-eval's classes reject unknown keyword arguments: everything that is not the lmms-eval
        # class's own is the method's.
        own = lmms_arguments(type(self))
        options = method_options(method or "duet", {name: kwargs.pop(name) for name in list(kwargs) if name not in own})
        # a checkpoint fine-tuned under a reducer carries it (unless a method or budget is given)
        pretrained = kwargs.get("pretrained")
        saved = None
        if _flag(saved_reducer) and method is None and budget is None and ratio is None and not options and pretrained \
                and Path(str(pretrained)).is_dir():
            saved = duet_vlm.load_reducer(pretrained)
        # fails here, before loading weights
        self.reducer = saved or duet_vlm.make(method or "duet", budget=budget, ratio=ratio, **options)
        self._place(kwargs)
        super().__init__(**kwargs)
        if saved is not None and "salient" in json.dumps(saved.to_dict()):  # objects a record leaves out
            self.reducer = duet_vlm.load_reducer(pretrained, tokenizer=self.tokenizer)
        elif options.get("query") == "salient" and "tokenizer" not in options:
            self.reducer = duet_vlm.make(method or "duet", budget=budget, ratio=ratio, tokenizer=self.tokenizer, **options)
        self.run_stats = RunStats()
        self._seen = None
        self._handle = self.reducer.attach(self.model)
        self._hook = self.model.register_forward_hook(self._collect)
        # exactly what runs, as data: duet_vlm.from_dict(json.loads(...)) rebuilds it
        self.reducer_record = self.reducer.to_dict()
        eval_logger.info(f"duet_vlm: attached {json.dumps(self.reducer_record)}"
                         + (f" (saved with {pretrained})" if saved is not None else ""))

    def _place(self, kwargs: dict[str, Any]) -> None:
        """Adjust the lmms-eval class's device arguments before it loads the model (none by default)."""

    def _collect(self, module, args, output) -> None:
        # The runtime stores a new ReductionStats at every prefill; decoding steps leave it alone.
        stats = self.reducer.stats
        if stats is not None and stats is not self._seen:
            self._seen = stats
            self.run_stats.add(stats)

    def _log_reduction(self) -> None:
        totals = self.run_stats.totals
        if self.world_size > 1:
            totals = self.accelerator.reduce(totals.to(self.accelerator.device), reduction="sum").cpu()
        summary = self.run_stats.summary(totals)
        self.run_stats = RunStats()
        if not summary:
            return
        self.reduction_summary = summary
        eval_logger.info("duet_vlm: " + ", ".join(f"{k}={v:.4g}" for k, v in summary.items()))
        # Additional metrics reach results["throughput"] as avg_<name>; zero time and tokens leave
        # lmms-eval's own throughput totals unchanged.
        log_metrics(total_elapsed_time=0.0, total_gen_tokens=0, avg_speed=0.0,
                    additional_metrics={PREFIX + k: v for k, v in summary.items()})

    def clean(self):
        # lmms-eval frees the model at the end of simple_evaluate by deleting its attributes; the
        # hooks and the attach handle hold the model too: drop them first or the weights stay in memory.
        if self._handle is not None:
            self._hook.remove()
            self._handle.remove()
            self._hook = self._handle = None
        super().clean()

    def generate_until(self, requests):
        results = self._per_request_budgets(requests, super().generate_until)
        self._log_reduction()
        return results

    def _per_request_budgets(self, requests, generate_until):
        """``generate_until`` over ``requests``, each group of requests with the same budget (their
        ``duet_budget``/``duet_ratio`` generation argument, taken out) under that budget."""
        arguments = [generation_arguments(request) for request in requests]
        budgets = [request_budget(kwargs) for kwargs in arguments]
        if not any(budgets):
            return generate_until(requests)
        for kwargs in arguments:  # a task's requests may share one dict: read every budget first
            for key in REQUEST_KEYS:
                kwargs.pop(key, None)
        results: list = [None] * len(requests)
        for budget in dict.fromkeys(budgets):
            indices = [i for i, b in enumerate(budgets) if b == budget]
            with self._request_budget(budget):
                answers = generate_until([requests[i] for i in indices])
            for i, answer in zip(indices, answers):
                results[i] = answer
        return results

    @contextlib.contextmanager
    def _request_budget(self, budget: tuple[str, Any] | None):
        """Every ``generate`` of the model inside runs with ``budget`` (``("budget", N)`` or
        ``("ratio", R)``) on each of its rows (``reducer.per_row``); ``None``: the reducer's own."""
        if budget is None:
            yield
            return
        kind, value = budget
        model, reducer = self.model, self.reducer
        with reducer.per_row(**{kind: [value]}):  # checks the value now
            pass
        previous = model.__dict__.get("generate")
        original = model.generate

        def generate(*args, **kwargs):
            ids = kwargs.get("input_ids", args[0] if args else None)
            rows = ids.shape[0] if ids is not None else 1
            with reducer.per_row(**{kind: [value] * rows}):
                return original(*args, **kwargs)

        model.generate = generate
        try:
            yield
        finally:
            if previous is None:
                del model.generate
            else:
                model.generate = previous

    def loglikelihood(self, requests):
        results = super().loglikelihood(requests)
        self._log_reduction()
        return results


class DuetLlavaHf(ReducerMixin, LlavaHf):
    """lmms-eval's chat ``llava_hf`` (LLaVA-1.5, LLaVA-NeXT and LLaVA-OneVision HF checkpoints; the
    transformers class follows the checkpoint's ``model_type``) with a reducer attached.
    ``batch_size`` must be 1 (lmms-eval's class asserts it).

    >>> from lmms_eval.evaluator import simple_evaluate                              # doctest: +SKIP
    >>> simple_evaluate(model="duet_llava_hf", tasks=["pope"],                       # doctest: +SKIP
    ...                 model_args="pretrained=llava-hf/llava-1.5-7b-hf,method=duet,budget=192")
    """

    def _place(self, kwargs: dict[str, Any]) -> None:
        # LlavaHf's default device_map ("") is rejected by from_pretrained on transformers 5; in a single
        # process put the model on `device` (LlavaHf sets device_map itself under accelerate launch).
        if not kwargs.get("device_map") and PartialState().num_processes == 1:
            kwargs["device_map"] = kwargs.get("device", "cuda")


class DuetVideoLlava(ReducerMixin, VideoLLaVA):
    """lmms-eval's ``video_llava`` (a "simple" model: one video per question, 8 frames, prompt
    ``USER: <video>{question}? ASSISTANT:``; ``generate_until`` only) with a reducer attached.

    lmms-eval's class loads the checkpoint's own dtype on the CPU and ignores ``dtype`` and
    ``attn_implementation``; in one process it moves the model to ``cuda:0`` unless
    ``device_map=auto``, so ``device=cpu`` sets that for you.

    >>> from lmms_eval.evaluator import simple_evaluate                              # doctest: +SKIP
    >>> simple_evaluate(model="duet_video_llava", tasks=["mvbench"],                 # doctest: +SKIP
    ...                 model_args="pretrained=LanguageBind/Video-LLaVA-7B-hf,method=duet,ratio=0.25")
    """

    def _place(self, kwargs: dict[str, Any]) -> None:
        if str(kwargs.get("device", "")).startswith("cpu") and "device_map" not in kwargs:
            kwargs["device_map"] = "auto"

    @property
    def tokenizer(self):
        # lmms-eval's VideoLLaVA never sets the tokenizer its base class reads.
        return self._processor.tokenizer

    def generate_until(self, requests):
        answers = self._per_request_budgets(requests, self._generate_until)
        self._log_reduction()
        return answers

    def _generate_until(self, requests):
        # lmms-eval 0.7.3's VideoLLaVA.generate_until passes the frame count to read_video
        # positionally, and read_video takes it by keyword only: every request raises a TypeError
        # (fixed upstream, EvolvingLMMs-Lab/lmms-eval#1487). This is that loop with the call fixed and
        # nothing else changed; drop it when the lmms-eval pin moves past the fix.
        answers = []
        for contexts, gen_kwargs, doc_to_visual, doc_id, task, split in tqdm(
            [request.args for request in requests], disable=self.rank != 0, desc="Model Responding"
        ):
            visuals = self.flatten([doc_to_visual(self.task_dict[task][split][doc_id])])
            assert len(visuals) == 1
            clip = read_video(visuals[0], num_frm=self.num_frames)
            inputs = self._processor(text=self.prompt.format(contexts), videos=clip, return_tensors="pt")
            videos = inputs["pixel_values_videos"]
            if videos.shape[1] != self.num_frames:
                empty = torch.zeros((1, self.num_frames - videos.shape[1], *videos.shape[2:]), dtype=videos.dtype)
                inputs["pixel_values_videos"] = torch.cat([videos, empty], dim=1)
            inputs = {k: v.to(self.device) for k, v in inputs.items()}
            output = self.model.generate(**inputs, max_new_tokens=gen_kwargs.get("max_new_tokens", 1024),
                                         temperature=gen_kwargs.get("temperature", 0))
            text = self._processor.batch_decode(output, skip_special_tokens=True, clean_up_tokenization_spaces=False)[0]
            answers.append(text.split("ASSISTANT:")[-1].strip())
        return answers


class DuetInternVLHf(ReducerMixin, InternVLHf):
    """lmms-eval's chat ``internvl_hf`` (InternVL3 and InternVL3.5 checkpoints in the transformers
    format, ``...-hf``/``...-HF``: ``InternVLForConditionalGeneration``) with a reducer attached; an
    image's tiles and thumbnail are one item, with one budget. ``batch_size`` must be 1 (lmms-eval's
    class asserts it); it loads the weights in bfloat16.

    >>> from lmms_eval.evaluator import simple_evaluate                              # doctest: +SKIP
    >>> simple_evaluate(model="duet_internvl_hf", tasks=["mme"],                     # doctest: +SKIP
    ...                 model_args="pretrained=OpenGVLab/InternVL3_5-8B-HF,method=duet,ratio=0.25")
    """


class DuetGemma3(ReducerMixin, Gemma3):
    """lmms-eval's simple ``gemma3`` (``Gemma3ForConditionalGeneration``) with a reducer attached: each
    image (and each pan-and-scan crop) is one item of soft tokens; the processor's
    ``token_type_ids``, which Gemma 3's image blocks need, reach ``generate`` with the rest of its
    inputs. It loads the weights in bfloat16.

    >>> from lmms_eval.evaluator import simple_evaluate                              # doctest: +SKIP
    >>> simple_evaluate(model="duet_gemma3", tasks=["mme"],                          # doctest: +SKIP
    ...                 model_args="pretrained=google/gemma-3-4b-it,method=duet,budget=64")
    """


class DuetGemma4(ReducerMixin, Gemma4):
    """lmms-eval's simple ``gemma4`` (``Gemma4ForConditionalGeneration``) with a reducer attached: each
    image is one item of its own soft tokens. lmms-eval's ``max_soft_tokens=`` sets the rung of Gemma
    4's ladder and the method's budget reduces from there ("280 soft tokens, then DUET to 64":
    ``max_soft_tokens=280,method=duet,budget=64``). It loads the weights in bfloat16; videos are
    refused while a method reduces.

    >>> from lmms_eval.evaluator import simple_evaluate                              # doctest: +SKIP
    >>> simple_evaluate(model="duet_gemma4", tasks=["mme"],                          # doctest: +SKIP
    ...                 model_args="pretrained=google/gemma-4-e4b-it,max_soft_tokens=280,method=duet,budget=64")
    """
