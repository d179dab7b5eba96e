"""The blocks a request holds after a boundary: only its kept tokens' (vLLM's allocator, served).

Without this module the layers after a boundary use the first slots of blocks allocated for the
whole prompt (``language``): compute and cache writes are saved, memory is not. Here those layers
get KV-cache groups of their own, sized by what each request holds there, so the pool admits more
requests. What enters vLLM, each through an interface it offers (nothing is patched):

- **A KV-cache spec per segment** (``DroppedSpec``: the decoder layers from one boundary of the
  server's methods to the next). duet-vlm's runner reports it for those layers
  (``DuetCPUModelRunner.get_kv_cache_spec``); vLLM groups layers by their spec, so each segment
  has its own groups, block tables and slots. It subclasses ``AttentionSpec``, not
  ``FullAttentionSpec``, whose ``merge`` would take every full-attention layer back into one group;
  and it is registered (``KVCacheSpecRegistry``) after vLLM's own specs, which register only
  while the registry is empty.
- **A manager per spec** (``DroppedManager``, vLLM's ``FullAttentionManager`` counting fewer
  tokens): once a request's prompt is in, it holds blocks for its tokens less those dropped
  before its segment (``cdiv(n - D, block_size)``), in the admission check and in the allocation.
  A sliding-window layer of a segment (``DroppedSlidingSpec``, Gemma 3's) frees, besides, the
  blocks wholly behind the window of the tokens it holds (``DroppedSlidingManager``).
- **A scheduler** (``DuetScheduler``, ``--scheduler-cls``): it reads, as each request arrives, the
  tokens each decoder layer holds of each of its items, which the processor wrote beside the
  item's budget (``duet_layer_tokens``), and tells the managers; and it does not split a prompt
  that drops where an item's encoder input does not fit a step (it waits, whole).

The layers of a segment write a request's kept tokens into the first slots of the request's own
blocks of their group (``language``'s runner, with each group's block table), so the blocks it
does not hold are never written.
"""

from __future__ import annotations

import dataclasses

import torch
from vllm.logger import init_logger
from vllm.utils.math_utils import cdiv
from vllm.v1.core.sched.async_scheduler import AsyncScheduler
from vllm.v1.core.sched.scheduler import Scheduler
from vllm.v1.core.single_type_kv_cache_manager import FullAttentionManager
from vllm.v1.kv_cache_interface import AttentionSpec, FullAttentionSpec, SlidingWindowSpec
from vllm.v1.kv_cache_spec_registry import KVCacheSpecRegistry

from .options import dropped_tokens, embedded_runs, field_prefix

logger = init_logger(__name__)


@dataclasses.dataclass(frozen=True, kw_only=True)
class DroppedSpec(AttentionSpec):
    """Full attention in decoder layers ``first`` to ``last`` (a segment between two boundaries),
    whose blocks hold, per request, its tokens less those dropped before the segment."""

    first: int
    last: int

    @property
    def prefix_cacheable(self) -> bool:  # a dropped block depends on the text after it
        return False

    def max_memory_usage_bytes(self, vllm_config) -> int:
        return cdiv(vllm_config.model_config.max_model_len, self.block_size) * self.page_size_bytes

    @classmethod
    def of(cls, spec: AttentionSpec, first: int, last: int) -> "DroppedSpec":
        """The spec of a segment's layer whose spec was vLLM's ``spec``: full attention, or a sliding
        window (``DroppedSlidingSpec``)."""
        fields = {f.name: getattr(spec, f.name) for f in dataclasses.fields(AttentionSpec) if f.init}
        if isinstance(spec, SlidingWindowSpec) and not spec.extra_retained_tokens:
            return DroppedSlidingSpec(**fields, first=first, last=last, sliding_window=spec.sliding_window)
        if not isinstance(spec, FullAttentionSpec) or spec.attention_chunk_size is not None:
            raise ValueError(f"duet-vlm drops in layers of full attention or a sliding window only (not {spec})")
        # (a full-attention spec with a window: a sliding layer where vLLM's hybrid manager is off, which
        # then holds all its blocks, as this group does; its kernel still slides)
        return cls(**fields, first=first, last=last)


@dataclasses.dataclass(frozen=True, kw_only=True)
class DroppedSlidingSpec(DroppedSpec):
    """A sliding-window layer of a segment: its window counts the tokens its cache holds (the kept
    ones), as vLLM's kernels count it and as the Hugging Face path's windowed masks and sliding
    caches over the kept tokens do, so a request frees the blocks that fall behind the window of
    its kept tokens (``DroppedSlidingManager``)."""

    sliding_window: int


@dataclasses.dataclass(frozen=True)
class RequestDrops:
    """What a request drops: its prompt's length, and the tokens it no longer holds in each layer."""

    prompt: int
    dropped: tuple[int, ...]  # per decoder layer

    def in_segment(self, first: int, last: int) -> int:
        """Tokens it holds in no layer of the segment (the segment's blocks hold its most)."""
        return min(self.dropped[first : last + 1])


def request_drops(request, num_layers: int) -> RequestDrops | None:
    """From a request's items (``duet_layer_tokens``: what each decoder layer holds of each item),
    what it drops; ``None`` where none of its items drops inside the language model."""
    items = []
    for feature in request.mm_features or ():
        data = feature.data
        key = field_prefix(feature.modality) + "layer_tokens"
        if data is None:  # held by a processor cache that does not hand it to the scheduler (shm, it may be)
            logger.warning_once("duet-vlm: an item reached vLLM's scheduler without its fields (its data is in a "
                                "processor cache the scheduler does not read): its request holds blocks for all its "
                                "tokens in every layer (exact, no memory saved); --mm-processor-cache-type lru "
                                "hands the scheduler the fields")
            continue
        if key not in data:
            continue
        tokens = torch.as_tensor(data[key].data).reshape(-1).tolist()
        if len(tokens) != num_layers:
            raise ValueError(f"an item's tokens for {len(tokens)} decoder layers, the model has {num_layers}")
        entered = feature.mm_position.get_num_embeds()  # the item's tokens (not InternVL's <img> and </img>)
        runs = len(embedded_runs(feature.mm_position))  # a Qwen3-VL video's slices: each one the plan's item
        items.append((entered, [held * runs for held in tokens]))
    dropped = dropped_tokens(items, num_layers)
    if not any(dropped):
        return None
    return RequestDrops(request.num_prompt_tokens, dropped)


class DroppedManager(FullAttentionManager):
    """vLLM's full-attention manager for a ``DroppedSpec`` group: a request whose prompt is in holds
    blocks for its tokens less those it dropped before the segment (``drops``, from the scheduler)."""

    def __init__(self, kv_cache_spec: DroppedSpec, **kwargs) -> None:
        super().__init__(kv_cache_spec, **kwargs)
        self.drops: dict[str, RequestDrops] = {}

    def held(self, request_id: str, num_tokens: int) -> int:
        """The token slots request ``request_id`` needs in this group for ``num_tokens`` tokens."""
        drops = self.drops.get(request_id)
        if drops is None or num_tokens < drops.prompt:  # nothing drops before its prompt is in
            return num_tokens
        return num_tokens - drops.in_segment(self.kv_cache_spec.first, self.kv_cache_spec.last)

    def get_num_blocks_to_allocate(self, request_id: str, num_tokens: int, *args, **kwargs) -> int:
        return super().get_num_blocks_to_allocate(request_id, self.held(request_id, num_tokens), *args, **kwargs)

    def allocate_new_blocks(self, request_id: str, num_tokens: int, num_tokens_main_model: int):
        return super().allocate_new_blocks(request_id, self.held(request_id, num_tokens),
                                           self.held(request_id, num_tokens_main_model))


class DroppedSlidingManager(DroppedManager):
    """A ``DroppedSlidingSpec`` group's manager: a request holds blocks for its kept tokens, and frees
    those wholly behind the window of the tokens it holds in the segment, as vLLM's
    ``SlidingWindowManager`` frees them behind the window of a request's tokens."""

    def remove_skipped_blocks(self, request_id: str, processed_computed_tokens: int, num_prompt_tokens=None) -> None:
        super().remove_skipped_blocks(request_id, self.held(request_id, processed_computed_tokens), num_prompt_tokens)

    def get_num_skipped_tokens(self, num_computed_tokens: int) -> int:
        """Of ``num_computed_tokens`` the segment holds, those behind the window of the next token."""
        return max(0, num_computed_tokens - self.kv_cache_spec.sliding_window + 1)


def register() -> None:
    """Register ``DroppedSpec`` and ``DroppedSlidingSpec`` with their managers, after vLLM's own specs
    (safe to call again)."""
    KVCacheSpecRegistry._ensure_registered()
    KVCacheSpecRegistry.register(DroppedSpec, DroppedManager, uniform_type_base_spec=DroppedSpec)
    KVCacheSpecRegistry.register(DroppedSlidingSpec, DroppedSlidingManager, uniform_type_base_spec=DroppedSlidingSpec)


register()


class _SchedulerMixin:
    """vLLM's scheduler telling the ``DroppedManager`` of each group what each request drops.

    ``STATS`` (tests and ``bench --memory``, with the engine in their process): when a dict, the
    KV-cache groups (``groups``: each one's layer names, ``block_size``, the first group's, and
    ``block_sizes``, each group's: vLLM sizes a group's blocks so that every group's pages are
    equal, so layers of wider heads, Gemma 4's global ones, take fewer tokens a block), the pool's blocks
    (``pool``, vLLM's null block not counted), each group's most blocks per request
    (``blocks[request][group]``) and the most requests running at once (``running``)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.duet_drops: dict[str, RequestDrops] = {}
        self.duet_layers = 0  # the decoder's layers where some group drops (the last segment ends at the last layer)
        for manager in self.kv_cache_manager.coordinator.single_type_managers:
            if isinstance(manager, DroppedManager):
                manager.drops = self.duet_drops
                self.duet_layers = max(self.duet_layers, manager.kv_cache_spec.last + 1)
        if STATS is not None:
            groups = self.kv_cache_config.kv_cache_groups
            STATS.update(groups=[list(group.layer_names) for group in groups], pool=self.kv_cache_config.num_blocks - 1,
                         block_size=groups[0].kv_cache_spec.block_size,
                         block_sizes=[group.kv_cache_spec.block_size for group in groups],
                         page_bytes=groups[0].kv_cache_spec.page_size_bytes)

    def add_request(self, request) -> None:
        if self.duet_layers and request.request_id not in self.requests:
            drops = request_drops(request, self.duet_layers)
            if drops is not None:
                self.duet_drops[request.request_id] = drops
        super().add_request(request)

    def _try_schedule_encoder_inputs(self, request, num_computed_tokens: int, num_new_tokens: int,
                                     encoder_compute_budget: int, *args, **kwargs):
        """vLLM's choice of a step's encoder inputs, but a prompt that drops is not split: where an
        item's encoder input does not fit this step (the encoder's budget or cache is spent), vLLM
        would run the text before the item now and the rest later; the prompt waits, whole, for a
        step it fits (what vLLM itself does where nothing can be scheduled)."""
        scheduled = super()._try_schedule_encoder_inputs(request, num_computed_tokens, num_new_tokens,
                                                         encoder_compute_budget, *args, **kwargs)
        drops = self.duet_drops.get(request.request_id)
        if drops is not None and num_computed_tokens < drops.prompt and scheduled[1] < num_new_tokens:
            return [], 0, encoder_compute_budget, [], []
        return scheduled

    def schedule(self, *args, **kwargs):
        output = super().schedule(*args, **kwargs)
        if STATS is not None:
            STATS["running"] = max(STATS.get("running", 0), len(self.running))
            for request in self.running:
                blocks = self.kv_cache_manager.get_block_ids(request.request_id)
                held = STATS.setdefault("blocks", {}).setdefault(request.request_id, [0] * len(blocks))
                for group, ids in enumerate(blocks):
                    held[group] = max(held[group], len(ids))
        return output

    def _free_blocks(self, request) -> None:
        super()._free_blocks(request)
        self.duet_drops.pop(request.request_id, None)


#: see ``_SchedulerMixin``.
STATS: dict | None = None


class DuetScheduler(_SchedulerMixin, Scheduler):
    """vLLM's scheduler with each request's drops told to the groups after a boundary; where vLLM
    schedules asynchronously, its asynchronous scheduler so (one ``--scheduler-cls`` for both)."""

    def __new__(cls, *args, **kwargs):
        config = kwargs.get("vllm_config", args[0] if args else None)
        if cls is DuetScheduler and config is not None and config.scheduler_config.async_scheduling:
            cls = DuetAsyncScheduler
        return super().__new__(cls)


class DuetAsyncScheduler(DuetScheduler, AsyncScheduler):
    """vLLM's asynchronous scheduler with each request's drops told to the groups after a boundary."""
