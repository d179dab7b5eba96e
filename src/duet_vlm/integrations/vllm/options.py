"""What a vLLM server and its requests ask of duet-vlm, read from vLLM's multimodal processor options.

No vLLM import here: these are pure functions of the options and of an item's ``Geometry``, shared by
the multimodal processor (which must know an item's placeholder count before the encoder runs) and
by the model's embedding step (which must cut exactly that many tokens).

The options, all optional, travel the way vLLM passes a model's processor options:

- server-wide, ``vllm serve MODEL --mm-processor-kwargs '{"duet_method": "visionzip", "duet_budget": 64}'``
  (``LLM(model, mm_processor_kwargs={...})`` offline);
- per request, the request's ``mm_processor_kwargs`` (``{"duet_budget": 32}`` or ``{"duet_ratio": 0.1}``);
  a request's budget or ratio replaces the server's, whichever of the two the server gave.

Keys: ``duet_method`` (a registered method), ``duet_budget`` (average visual tokens per decoder
layer per item: ``duet_vlm.make``'s budget) or ``duet_ratio`` (of each item's own tokens),
``duet_options`` (the method's other settings, as ``make``'s keyword arguments, e.g.
``"{\"layers\": []}"`` for DUET's Stage A alone: a JSON string where a setting is a list, since vLLM
caches processors by their options and cannot hash lists), ``duet_allow`` (the server's only: the
methods a request may choose instead of the server's, comma-separated, each at its defaults; a
server that sets it takes ``duet_method``, ``duet_budget`` and ``duet_ratio`` from a request and no
other processor option, so ``--trust-request-mm-kwargs``, which vLLM requires for any request
option, opens these three and nothing else).

>>> settings = Settings.read({"duet_method": "pool", "duet_budget": 64}, {"duet_ratio": 0.5})
>>> settings.budget, settings.ratio
(None, 0.5)
>>> from duet_vlm.generation_modes import LLAVA15  # a LLaVA-1.5 image's geometry
>>> settings.item_budget(LLAVA15)
288
>>> settings.tokens(LLAVA15)
288
"""

from __future__ import annotations

import dataclasses
import json
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Mapping

from ...generation_modes import LLAVA15
from ...geometry import Geometry
from ...methods import METHODS, make
from ...methods.base import Reducer
from .registry import named
from .served import language_methods, loads_learned_state, supported_methods, vision_half

#: every key of the processor options that duet-vlm reads (and takes out before the HF processor).
KEYS = ("duet_method", "duet_budget", "duet_ratio", "duet_options", "duet_text", "duet_allow")

#: the worker class a server that drops inside the language model runs (``--worker-cls``; ``language``):
#: the platform's, vLLM's V1 runner on CPUs (``DuetCPUWorker``), Model Runner V2 on GPUs (``DuetGPUWorker``).
WORKER = "duet_vlm.integrations.vllm.language.DuetWorker"
#: the names it is accepted under.
WORKERS = (WORKER, "duet_vlm.integrations.vllm.language.DuetCPUWorker",
           "duet_vlm.integrations.vllm.language.DuetGPUWorker")
#: the scheduler it runs (``--scheduler-cls``; ``memory``: the blocks of the kept tokens only).
SCHEDULER = "duet_vlm.integrations.vllm.memory.DuetScheduler"
#: the logits processors it names (``--logits-processors``), whose per-request check refuses what a
#: dropping request cannot answer (``refusals``: ``prompt_logprobs``).
REFUSALS = "duet_vlm.integrations.vllm.refusals:RefusePromptLogprobs"
#: vLLM's engine settings (``EngineArgs``' names) such a server runs with (``language.check_engine``):
#: duet-vlm's worker, scheduler and refusals, every prompt in one step, no prefix cache, no CUDA graphs
#: (the model compiled, the drops run by the plugin's operators in its graph), and no multimodal
#: processor cache (``--mm-processor-cache-gb 0``): vLLM 0.32 checks a request's parameters
#: after its images were processed, and a request refused there leaves its images in the front end's
#: cache but not in the engine's, so the next request with the same image failed (a 500).
LANGUAGE_SETTINGS = {"worker_cls": WORKER, "scheduler_cls": SCHEDULER, "enable_chunked_prefill": False,
                     "enable_prefix_caching": False, "compilation_config": {"cudagraph_mode": "NONE"},
                     "logits_processors": [REFUSALS],
                     "mm_processor_cache_gb": 0}

#: what a request may set on a server with ``duet_allow``.
REQUEST_KEYS = ("duet_method", "duet_budget", "duet_ratio")


class RefusedMethod(ValueError):
    """A method that cannot run under vLLM (it prunes inside the language model, or chooses an
    item's budget from its content)."""


def strip(kwargs: Mapping[str, object]) -> dict[str, object]:
    """The processor options without duet-vlm's (what the Hugging Face processor receives)."""
    return {key: value for key, value in kwargs.items() if key not in KEYS}


@dataclass(frozen=True)
class Settings:
    """The reducer a server runs and the budget or ratio an item gets.

    ``method`` ``None``: nothing is reduced (the plugin is installed, not asked for). ``allow``: the
    methods a request may choose instead of the server's (``duet_allow``); ``server_method``: the
    server's own (``methods`` numbers them: an item carries its method's index to the model).
    """

    method: str | None = None
    budget: int | None = None
    ratio: float | None = None
    options: dict = field(default_factory=dict)
    allow: tuple = ()
    server_method: str | None = None
    language: bool = False
    not_served: str | None = None  # where the family refuses dropping inside the language model: why

    @classmethod
    def read(cls, server: Mapping[str, object] | None, request: Mapping[str, object] | None = None,
             language: bool = False, not_served: str | None = None) -> "Settings":
        """The server's options (``--mm-processor-kwargs``) with a request's budget or ratio over them.
        A request may name another method only if the server allows it (``duet_allow``). ``language``:
        methods that drop inside the language model are served (``language.LanguageStages``), else
        refused (``not_served``: the family's reason, where duet-vlm's worker was given)."""
        server, request = dict(server or {}), dict(request or {})
        method = server.get("duet_method")
        allow = parse_allow(server.get("duet_allow"))
        if allow and method is None:
            raise ValueError("duet_allow names the methods a request may choose instead of the server's duet_method: set one")
        if "duet_allow" in request and parse_allow(request["duet_allow"]) != allow:
            raise ValueError("duet_allow is the server's (--mm-processor-kwargs); a request may not change it")
        chosen = request.get("duet_method")
        options_of = server.get("duet_options")
        if chosen not in (None, method):
            if chosen not in allow:
                choices = f"; a request may choose one of {', '.join(allow)} (duet_allow)" if allow else ""
                raise ValueError(
                    f"this server runs duet_method={method!r}{choices}; a request may set duet_budget or duet_ratio, "
                    f"not another method (duet_method={chosen!r})"
                    + ("" if allow else " (start the server with duet_allow to let requests choose)")
                )
            if parse_options(request.get("duet_options")):
                raise ValueError(
                    f"a request that chooses duet_method={chosen!r} runs it at its defaults: duet_options are the "
                    f"server's (--mm-processor-kwargs) and belong to its duet_method={method!r}; a request may set "
                    "duet_budget or duet_ratio"
                )
            options_of = None  # the server's duet_options belong to its own method
        elif request.get("duet_options") is not None and parse_options(request["duet_options"]) != parse_options(server.get("duet_options")):
            raise ValueError("duet_options are the server's (--mm-processor-kwargs); a request may set duet_budget or duet_ratio")
        values = server
        if "duet_budget" in request or "duet_ratio" in request:
            values = {**server, "duet_budget": request.get("duet_budget"), "duet_ratio": request.get("duet_ratio")}
        budget, ratio = values.get("duet_budget"), values.get("duet_ratio")
        options = parse_options(options_of)
        if method is None:
            if budget is not None or ratio is not None:
                raise ValueError(
                    "duet_budget / duet_ratio given but no duet_method: start the server with "
                    "--mm-processor-kwargs '{\"duet_method\": ..., \"duet_budget\": ...}'"
                )
            return cls()
        if method in METHODS and not METHODS[method].takes_budget:
            cls(method).reducer()  # refused for what it is, not for the budget it does not take
        if budget is not None and ratio is not None:
            raise ValueError(f"duet_method={method!r} takes duet_budget or duet_ratio, not both")
        if budget is None and ratio is None:
            raise ValueError(f"duet_method={method!r} needs one of duet_budget or duet_ratio")
        if not request:  # the server's own settings: every method it allows runs here
            for name in allow:
                cls(name, budget, ratio, language=language, not_served=not_served).reducer()
        method = chosen if chosen is not None else method
        settings = cls(method, budget, ratio, options, allow, server.get("duet_method"), language, not_served)
        settings.reducer()  # the method exists and takes these settings, and runs before the language model
        return settings

    @staticmethod
    def check_request(server: Mapping[str, object] | None, request: Mapping[str, object] | None) -> None:
        """Refuse a client's processor options other than duet-vlm's where the server sets
        ``duet_allow`` (called on what the client sent, before vLLM adds its own options)."""
        server, request = dict(server or {}), dict(request or {})
        if not parse_allow(server.get("duet_allow")):
            return
        others = sorted(k for k in request if k not in KEYS and request[k] != server.get(k))
        if others:
            raise ValueError(
                f"this server (duet_allow) takes {', '.join(REQUEST_KEYS)} from a request and no other processor "
                f"option; got {', '.join(others)}"
            )

    @property
    def methods(self) -> tuple:
        """The server's method, then those a request may choose (an item's method is its index here)."""
        return (self.server_method or self.method, *self.allow)

    def choose(self, index: int) -> "Settings":
        """The settings of method ``index`` of ``methods`` (the server's options go with its own method only)."""
        if index == 0:
            return dataclasses.replace(self, method=self.methods[0])
        return dataclasses.replace(self, method=self.methods[index], options={})

    @property
    def active(self) -> bool:
        return self.method is not None

    def key(self) -> tuple:
        """What the reducer and an item's plan depend on, hashable (``PLANS``' key)."""
        options = json.dumps(self.options, sort_keys=True, default=repr)
        return (self.method, self.budget, self.ratio, options, self.allow, self.server_method, self.language,
                self.not_served)

    def reducer(self) -> Reducer:
        """The method as ``duet_vlm.make`` builds it (budget or ratio), refused if it cannot run here:
        built once per process for these settings (``PLANS``)."""
        return PLANS.reducer(self)

    def build_reducer(self) -> Reducer:
        """``reducer`` built anew: checked and made."""
        if self.method == "adaptive":  # a wrapper, not a registered method: refused as what it is
            raise RefusedMethod(
                "'adaptive' chooses each item's budget from its content, but vLLM needs an item's token count "
                "before its encoder runs: use a fixed duet_budget or duet_ratio"
            )
        if self.method not in METHODS:
            raise ValueError(f"unknown duet_method {self.method!r}; registered: {', '.join(sorted(METHODS))}")
        if loads_learned_state(METHODS[self.method]):
            raise RefusedMethod(
                f"{self.method!r} needs what it learned (a trained scorer, saved beside a fine-tuned model), which this "
                "plugin does not load yet: it would run untrained (run it through transformers, duet_vlm.load_reducer)"
            )
        if METHODS[self.method].input_stage is not Reducer.input_stage:
            raise RefusedMethod(
                f"{self.method!r} chooses from the pixels which tokens enter the vision encoder, but this plugin sizes "
                "each item's placeholders in its processor from a budget: it is not served yet (run it through "
                "transformers)"
            )
        check_options(self.method, self.options)
        reducer = make(self.method, budget=self.budget, ratio=self.ratio, **tuples(self.options))
        check_supported(reducer, self.language, self.not_served)
        return reducer

    def item_budget(self, geometry: Geometry) -> int:
        """The absolute budget of one item (a ratio resolved on the item's own tokens); 0: unreduced."""
        if not self.active:
            return 0
        reducer = self.reducer()
        budget = reducer.budget_for(geometry) if hasattr(reducer, "budget_for") else self.budget
        return budget if budget < geometry.visual_tokens else 0

    def tokens(self, geometry: Geometry) -> int:
        """How many visual tokens the language model receives for an item: its placeholder count."""
        return tokens_for(self, self.item_budget(geometry), geometry)

    def needs_text(self) -> bool:
        """Whether the method's vision stage reads the prompt's text (``VisionStage.needs_text``)."""
        if not self.active:
            return False
        reducer = self.reducer()
        inner = reducer.build(64) if hasattr(reducer, "build") else reducer.with_budget(64)
        plan = inner.resolve(LLAVA15, quiet=True)
        return plan.vision is not None and plan.vision.needs_text

    def record(self) -> dict[str, Any] | None:
        """The reducer's record (``to_dict``), or ``None``."""
        return self.reducer().to_dict() if self.active else None


def parse_allow(allow) -> tuple:
    """``duet_allow`` as a tuple of method names (a comma-separated string, or a list offline)."""
    if allow is None or allow == "":
        return ()
    names = allow.split(",") if isinstance(allow, str) else list(allow)
    names = tuple(str(name).strip() for name in names if str(name).strip())
    unknown = [name for name in names if name not in METHODS]
    if unknown:
        raise ValueError(f"duet_allow names unknown methods {', '.join(unknown)}; registered: {', '.join(sorted(METHODS))}")
    return names


def parse_options(options) -> dict:
    """``duet_options`` as a dict, or as a JSON string (vLLM caches its processors by their options
    and cannot hash a list inside a dict: ``"duet_options": "{\\"layers\\": []}"``)."""
    if options is None or options == "":
        return {}
    if isinstance(options, str):
        try:
            options = json.loads(options)
        except json.JSONDecodeError as error:
            raise ValueError(f"duet_options must be a JSON object, got {options!r}: {error}") from None
    if not isinstance(options, Mapping):
        raise ValueError(f"duet_options must be a JSON object of the method's settings, got {options!r}")
    return dict(options)


def check_options(method: str, options: Mapping[str, object]) -> None:
    """Refuse ``duet_options`` that ``method`` does not take (they would be dropped, or fail later).

    >>> check_options("divprune", {"foo": 1})  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: duet_options names foo, which divprune does not take; its options: ...
    """
    cls = METHODS[method]
    if not dataclasses.is_dataclass(cls):
        return
    known = {spec.name for spec in dataclasses.fields(cls) if spec.init} - {"budget"}
    unknown = sorted(set(options) - known)
    if unknown:
        raise ValueError(f"duet_options names {', '.join(unknown)}, which {method} does not take; its options: "
                         f"{', '.join(sorted(known)) or 'none'}")


def tuples(options: Mapping[str, object]) -> dict[str, object]:
    """JSON lists as the tuples ``make`` takes (``layers``, ``shape``...)."""
    return {key: tuple(value) if isinstance(value, list) else value for key, value in options.items()}


def check_supported(reducer: Reducer, language: bool = False, not_served: str | None = None) -> None:
    """Refuse what cannot run under vLLM: pruning inside the language model (vLLM's paged KV cache
    holds every prompt token in every layer), unless ``language`` (the plugin serves it there; where
    the family does not, ``not_served`` says why), and budgets chosen from an item's content (the
    placeholder count must be known before the encoder runs)."""
    if reducer.adapts_to_content:
        raise RefusedMethod(
            f"{reducer.method_name!r} chooses each item's budget from its content, but vLLM needs an item's token "
            "count before its encoder runs: use a fixed duet_budget or duet_ratio"
        )
    inner = reducer.build(64) if hasattr(reducer, "build") else reducer
    if getattr(inner, "budget", None) is not None:
        inner = inner.with_budget(64)
    try:
        plan = inner.resolve(LLAVA15, quiet=True)
        in_language_model = plan.language is not None or bool(plan.schedule.boundaries)
    except RefusedMethod:
        raise
    except Exception:  # settings that need another geometry: judge by the method's kind
        in_language_model = type(inner).prunes_in_language_model()
    if not in_language_model or language:
        return
    hint = ""
    if vision_half(inner.method_name):
        hint = ' (its vision-side half alone runs: "duet_options": "{\\"layers\\": []}")'
    if not_served:
        raise RefusedMethod(
            f"{inner.method_name!r} prunes visual tokens inside the language model, and {not_served} (docs/serving.md). "
            f"Methods that select before the language model run on it{hint}. Supported: {', '.join(supported_methods())}"
        )
    raise RefusedMethod(
        f"{inner.method_name!r} prunes visual tokens inside the language model, which the plugin serves only with its "
        f"own worker (--worker-cls {WORKER}), on {named(language=True)} (images; videos but InternVL's), for "
        f"{', '.join(language_methods())} so far (docs/serving.md); otherwise vLLM's "
        f"paged KV cache keeps every prompt token in every layer, and only methods that select before the language "
        f"model run{hint}. Supported: {', '.join(supported_methods())}"
    )


def tokens_for(settings: Settings, budget: int, geometry: Geometry) -> int:
    """The language model's visual tokens for an item reduced at ``budget`` (0: unreduced)."""
    plan = plan_for(settings, budget, geometry)
    return plan.schedule.llm_input if plan is not None else geometry.visual_tokens


class PlanCache:
    """Each method's reducer and each item's plan, by the settings, the budget and the geometry they
    were made for, resolved once per process (a server's front end and its engine process each hold
    one, ``PLANS``): an item's plan is asked for its placeholder count, its item fields, the model's
    reduction and the runner's step. Plans are not changed by their readers; what cannot be made
    (a refused method) raises each time and is not kept. ``size``: the entries kept, the oldest
    forgotten first."""

    def __init__(self, size: int = 4096) -> None:
        self.size = size
        self.reducers: OrderedDict = OrderedDict()
        self.plans: OrderedDict = OrderedDict()
        self.lock = threading.RLock()  # a front end may process requests in threads

    def _kept(self, store: OrderedDict, key, make):
        with self.lock:
            if key in store:
                store.move_to_end(key)
                return store[key]
            value = store[key] = make()
            if len(store) > self.size:
                store.popitem(last=False)
            return value

    def reducer(self, settings: Settings) -> Reducer:
        return self._kept(self.reducers, settings.key(), settings.build_reducer)

    def plan(self, settings: Settings, budget: int, geometry: Geometry):
        return self._kept(self.plans, (settings.key(), budget, geometry),
                          lambda: settings.reducer().with_budget(budget).resolve(geometry, quiet=True))


#: this process's plans (``PlanCache``).
PLANS = PlanCache()


def item_plan(settings: Settings, budget: int, geometry: Geometry):
    """The method's whole plan for an item at its absolute ``budget`` (``None``: unreduced)."""
    if not settings.active or budget <= 0:
        return None
    return PLANS.plan(settings, int(budget), geometry)


def plan_for(settings: Settings, budget: int, geometry: Geometry):
    """The method's plan for an item at its absolute ``budget`` where it has a vision side (``None``:
    it has none, or the item is unreduced)."""
    plan = item_plan(settings, budget, geometry)
    if plan is None:
        return None
    if (plan.language is not None or plan.schedule.boundaries) and not settings.language:
        raise RefusedMethod(f"{settings.method!r} prunes inside the language model: it cannot run under vLLM")
    return plan if plan.vision is not None else None


def language_plan_for(settings: Settings, budget: int, geometry: Geometry):
    """The method's whole plan for an item at its absolute ``budget`` where it drops inside the
    language model (``None``: it does not, or the item is unreduced)."""
    plan = item_plan(settings, budget, geometry)
    return plan if plan is not None and plan.schedule.boundaries else None


def field_prefix(modality: str) -> str:
    """The item fields' prefix: ``duet_budget`` for an image, ``duet_video_budget`` for a video."""
    return "duet_" if modality == "image" else f"duet_{modality}_"


def dropped_tokens(items, layers: int | None = None) -> tuple[int, ...]:
    """Tokens a request no longer holds in each decoder layer, from each of its dropping items'
    ``(tokens entering the language model, tokens it holds in each layer)``: what the runner's steps
    (``RequestPlan.dropped``) and the scheduler's block counts (``memory.request_drops``) both read,
    made in one place. ``layers``: the decoder's, where no item is given.

    >>> dropped_tokens([(576, [576, 576, 64, 32]), (10, [10, 10, 10, 0])])
    (0, 0, 512, 554)
    """
    items = list(items)
    count = len(items[0][1]) if items else layers
    for _, held in items:
        if len(held) != count:
            raise ValueError(f"an item's tokens for {len(held)} decoder layers, the model has {count}")
    return tuple(sum(entered - held[layer] for entered, held in items) for layer in range(count))


def embedded_runs(position) -> list[tuple[int, int]]:
    """``(offset, length)`` of each run of tokens an item's embeddings fill in the prompt (vLLM's
    ``PlaceholderRange``: InternVL's run holds ``<img>`` and ``</img>`` around them, ``is_embed``
    False there; a Qwen3-VL video's frames are runs of their own between timestamps).

    >>> from types import SimpleNamespace  # a PlaceholderRange's fields
    >>> import torch
    >>> embedded_runs(SimpleNamespace(offset=4, length=6, is_embed=torch.tensor([0, 1, 1, 1, 1, 0]).bool()))
    [(5, 4)]
    >>> embedded_runs(SimpleNamespace(offset=0, length=7, is_embed=torch.tensor([0, 1, 1, 0, 0, 1, 1]).bool()))
    [(1, 2), (5, 2)]
    """
    if position.is_embed is None:
        return [(position.offset, position.length)]
    flags = [bool(v) for v in position.is_embed.tolist()]
    runs, start = [], None
    for index, flag in enumerate([*flags, False]):
        if flag and start is None:
            start = index
        elif not flag and start is not None:
            runs.append((position.offset + start, index - start))
            start = None
    return runs
