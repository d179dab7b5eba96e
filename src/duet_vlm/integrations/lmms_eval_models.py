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
=============================  ===============================  ==========================================

Every model takes the same ``model_args`` on top of its lmms-eval class's own: ``method=`` (any
name in ``duet_vlm.METHODS``, default ``duet``), ``budget=`` (average visual tokens per decoder
layer, per visual item) or ``ratio=`` (the kept fraction of each item's tokens; suits anyres images
and videos, whose token counts differ), and any option of that method. Options whose field is a
tuple take ``;``-separated values (``layers=16;24,ratios=0.5;0.0``; an empty value, ``layers=``, is
the empty tuple) and ``none`` means ``None`` (``cluster_width=none``). With ``query=salient`` the
model's tokenizer is passed to the method.

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

import dataclasses
import inspect
import json
from typing import Any

import torch
from accelerate import PartialState
from lmms_eval.models.chat.llava_hf import LlavaHf
from lmms_eval.models.model_utils.gen_metrics import log_metrics
from lmms_eval.models.model_utils.load_video import read_video
from lmms_eval.models.simple.video_llava import VideoLLaVA
from loguru import logger as eval_logger
from tqdm import tqdm

import duet_vlm

PREFIX = "duet_vlm_"


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

    def __init__(self, method: str = "duet", budget: int | None = None, ratio: float | None = None, **kwargs: Any) -> None:
        # lmms-eval's classes reject unknown keyword arguments: everything that is not the lmms-eval
        # class's own is the method's.
        own = {name for name, p in inspect.signature(super().__init__).parameters.items()
               if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}
        options = method_options(method, {name: kwargs.pop(name) for name in list(kwargs) if name not in own})
        self.reducer = duet_vlm.make(method, budget=budget, ratio=ratio, **options)  # fails here, before loading weights
        self._place(kwargs)
        super().__init__(**kwargs)
        if options.get("query") == "salient" and "tokenizer" not in options:
            self.reducer = duet_vlm.make(method, budget=budget, ratio=ratio, tokenizer=self.tokenizer, **options)
        self.run_stats = RunStats()
        self._seen = None
        self._handle = self.reducer.attach(self.model)
        self._hook = self.model.register_forward_hook(self._collect)
        # exactly what runs, as data: duet_vlm.from_dict(json.loads(...)) rebuilds it
        self.reducer_record = self.reducer.to_dict()
        eval_logger.info(f"duet_vlm: attached {json.dumps(self.reducer_record)}")

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
        results = super().generate_until(requests)
        self._log_reduction()
        return results

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
        self._log_reduction()
        return answers
