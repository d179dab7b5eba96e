"""The compacted layers' attention metadata and KV slots (``compact_attention``), and the KV-cache
specs that give the layers after each boundary groups of their own (``dropped_specs``): what either
runner adds to a step, built from the ``StepPlan`` before the forward."""

from __future__ import annotations

import dataclasses

import torch

from .protocol import dropping
from .steps import RequestPlan, StepPlan


def compact_slots(blocks: torch.Tensor, block_size: int, starts: list[int], counts: list[int]) -> torch.Tensor:
    """The KV slots of each request's compacted token indices ``start .. start + count``, one request
    after another (``blocks``: a row of block ids per request, the first ``len(counts)`` rows in the
    order of ``starts`` and ``counts``): a request's kept tokens fill its own blocks from the first
    slot, one after another. A handful of tensor operations whatever the number of requests.

    >>> compact_slots(torch.tensor([[7, 3], [5, 0]]), 4, [2, 1], [4, 2]).tolist()
    [30, 31, 12, 13, 21, 22]
    """
    lengths = torch.tensor(counts, dtype=torch.long)
    rows = torch.repeat_interleave(torch.arange(len(counts)), lengths)
    # each slot's token index: its place among all the slots, less its request's first place, plus its start
    index = torch.arange(rows.shape[0]) + torch.repeat_interleave(
        torch.tensor(starts, dtype=torch.long) - (lengths.cumsum(0) - lengths), lengths)
    rows, index = rows.to(blocks.device), index.to(blocks.device)
    return blocks[rows, index // block_size].long() * block_size + index % block_size


def layer_segments(num_layers: int, holds, changes) -> list[tuple[tuple, list[int]]]:
    """Decoder layers grouped by what ``holds(layer)`` gives (equal values, one metadata), in order.
    ``changes``: the layers where that value may differ from the layer before's; ``holds`` is asked
    at layer 0 and at those only.

    >>> layer_segments(4, lambda layer: layer >= 2, changes=[2])
    [(False, [0, 1]), (True, [2, 3])]
    >>> layer_segments(6, lambda layer: min(layer // 2, 1) if layer < 5 else 0, changes=[2, 5])
    [(0, [0, 1, 5]), (1, [2, 3, 4])]
    """
    edges = sorted({0, *(layer for layer in changes if 0 < layer < num_layers)})
    segments: dict = {}
    for first, end in zip(edges, [*edges[1:], num_layers]):
        segments.setdefault(holds(first), []).extend(range(first, end))
    return list(segments.items())


def compact_ranges(plan: RequestPlan, layer: int, ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """A request's bidirectional ranges (vLLM's ``mm_req_doc_ranges``: ``(first, last)`` prompt
    positions of each image run, inclusive) in the coordinates of decoder layer ``layer``'s cache,
    which holds the kept tokens only, in order: a run that is a dropping item holds its kept tokens,
    every range moves back by the tokens dropped before it, and a run with no token left has none.

    >>> from types import SimpleNamespace
    >>> plan = RequestPlan(20, ((2, 4), (10, 6)), tuple(SimpleNamespace(schedule=SimpleNamespace(
    ...     tokens_per_layer=held)) for held in ([4, 1], [6, 0])))
    >>> compact_ranges(plan, 1, [(2, 5), (8, 8), (10, 15), (17, 18)])
    [(2, 2), (5, 5), (8, 9)]
    >>> compact_ranges(plan, 0, [(2, 5), (10, 15)])
    [(2, 5), (10, 15)]
    """
    items = {offset: (length, item_plan.schedule.tokens_per_layer[layer])
             for (offset, length), item_plan in zip(plan.spans, plan.plans)}
    moved = []
    for first, last in ranges:
        before = sum(length - held for offset, (length, held) in items.items() if offset + length <= first)
        if first in items and items[first][0] == last - first + 1:
            last = first + items[first][1] - 1
        elif any(offset <= last and first < offset + length for offset, (length, _) in items.items()):
            raise RuntimeError(f"a bidirectional range ({first}, {last}) that is not one of its request's items "
                               f"({sorted(items)}) overlaps one")
        if last >= first:
            moved.append((first - before, last - before))
    return moved


@dataclasses.dataclass
class KVGroup:
    """One KV-cache group as a runner hands it over: its attention groups (vLLM's ``AttentionGroup``:
    layer names and metadata builder), each request's block ids in batch order, and the block size
    its slots count in (slot = block * block_size + offset)."""

    attention: list
    blocks: torch.Tensor  # [requests (at least), blocks] block ids, batch order
    block_size: int
    table: torch.Tensor  # what the metadata's ``block_table_tensor`` gets


class MetadataBuffers:
    """Where a runner's compacted layers' metadata lives: each decoder layer's query starts, sequence
    lengths and KV slots, made once at the runner's largest step (``max_reqs`` requests, ``max_tokens``
    rows) and written in place at every step (``compact_attention``), every layer's own row. vLLM's
    attention reads views of them: a step allocates no metadata tensor of its own, and a step laid out
    as the one before reads its metadata at the same addresses (what a captured CUDA graph, which
    replays on the addresses it captured, needs of a decoding step). Each layer's KV slots are a view
    of its own row; the starts and lengths one metadata build shares (a segment's layers of one
    attention group) are its first layer's. Host copies of the starts and lengths (vLLM's ``*_cpu``
    fields) are the same tensors on a CPU."""

    def __init__(self, layers: int, max_reqs: int, max_tokens: int, device) -> None:
        device = torch.device(device)
        self.starts_cpu = torch.zeros(layers, max_reqs + 1, dtype=torch.int32)
        self.lens_cpu = torch.zeros(layers, max_reqs, dtype=torch.int32)
        on_host = device.type == "cpu"
        self.starts = self.starts_cpu if on_host else torch.zeros_like(self.starts_cpu, device=device)
        self.lens = self.lens_cpu if on_host else torch.zeros_like(self.lens_cpu, device=device)
        self.slots = torch.zeros(layers, max_tokens, dtype=torch.long, device=device)

    @classmethod
    def of(cls, owner, layers: int, device) -> "MetadataBuffers":
        """``owner``'s buffers (a runner or Model Runner V2's state: its ``max_num_reqs`` and
        ``max_num_tokens``), made on first use and kept on it."""
        made = owner.__dict__.get("_duet_metadata_buffers")
        if made is None:
            made = owner.__dict__["_duet_metadata_buffers"] = cls(layers, owner.max_num_reqs, owner.max_num_tokens, device)
        return made

    def write(self, layers: list[int], starts: torch.Tensor, lens: torch.Tensor) -> tuple:
        """Layers ``layers``' query starts and sequence lengths (host tensors); views of the first layer's
        rows: (starts, starts on the host, lengths, lengths on the host)."""
        rows = torch.tensor(layers)
        reqs = lens.shape[0]
        self.starts_cpu[rows, : reqs + 1] = starts
        self.lens_cpu[rows, :reqs] = lens.to(torch.int32)
        if self.starts is not self.starts_cpu:
            self.starts[rows.to(self.starts.device), : reqs + 1] = starts.to(self.starts.device, non_blocking=True)
            self.lens[rows.to(self.lens.device), :reqs] = lens.to(self.lens.device, torch.int32, non_blocking=True)
        first = layers[0]
        return (self.starts[first, : reqs + 1], self.starts_cpu[first, : reqs + 1], self.lens[first, :reqs],
                self.lens_cpu[first, :reqs])

    def write_slots(self, layers: list[int], slots: torch.Tensor) -> list[torch.Tensor]:
        """Layers ``layers``' KV slots; a view of each layer's own row, in order."""
        count = slots.shape[0]
        self.slots[torch.tensor(layers, device=self.slots.device), :count] = slots.to(self.slots.device)
        return [self.slots[layer, :count] for layer in layers]


def compact_attention(step: StepPlan, names: tuple[str, ...], seq_lens: torch.Tensor, groups: list[KVGroup], build,
                      buffers: MetadataBuffers, doc_ranges: dict[int, list[tuple[int, int]]] | None = None,
                      prefilling: torch.Tensor | None = None) -> tuple[dict, dict]:
    """Attention metadata and KV slots for the layers where some request holds fewer tokens than
    the step's rows (``names``: each decoder layer's attention), by layer name: query starts and
    sequence lengths of the tokens each request holds, and slots that put a request's kept tokens
    in the first slots of its own blocks (``compact_slots``), written into ``buffers`` (the runner's,
    made once). ``seq_lens``: each request's length after the step (CPU); ``build(attention_group,
    common_metadata)``: the runner's way to build. Both runners call this (the V1 runner from
    ``_build_attention_metadata``, Model Runner V2 from its ``ModelState.prepare_attn``).
    ``doc_ranges``: the step's bidirectional ranges by request (vLLM's ``mm_req_doc_ranges``, on a
    model whose images attend both ways), given each compacted layer in its own coordinates
    (``compact_ranges``). ``prefilling``: whether each request is in its prompt (vLLM's
    ``is_prefilling``: a linear-attention layer starts such a request from no state)."""
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
    changes = {layer for plan, _ in step.batch if plan is not None for layer in plan.changes}
    for value, layers in layer_segments(len(names), holds, changes):
        if all(dropped == 0 for _, _, dropped in value):
            continue
        counts = [count for count, _, _ in value]
        starts = torch.tensor([0, *counts], dtype=torch.int32).cumsum(0, dtype=torch.int32)
        lens = seq_lens - torch.tensor([dropped for _, _, dropped in value], dtype=seq_lens.dtype)
        starts, starts_cpu, lens, lens_cpu = buffers.write(layers, starts, lens)
        index_of = {names[layer]: layer for layer in layers}
        ranges = None if doc_ranges is None else {
            index: (compact_ranges(plan, layers[0], spans) if plan is not None and value[index][2] else spans)
            for index, spans in doc_ranges.items() for plan in [step.batch[index][0]]}
        # each KV-cache group its own block table: the layers after a boundary have groups of
        # their own where the server saves memory (``memory.DroppedSpec``), one with the others if not
        for group in groups:
            chosen = [(attention, mine) for attention in group.attention
                      if (mine := [name for name in attention.layer_names if name in index_of])]
            if not chosen:
                continue
            slots = compact_slots(group.blocks, group.block_size,
                                  [computed - before for (_, before, _), (_, computed) in zip(value, step.batch)],
                                  counts)
            mine_all = [name for _, mine in chosen for name in mine]
            rows = buffers.write_slots([index_of[name] for name in mine_all], slots)
            own_slots = dict(zip(mine_all, rows))
            common = CommonAttentionMetadata(
                query_start_loc=starts, query_start_loc_cpu=starts_cpu, seq_lens=lens,
                seq_lens_cpu_upper_bound=lens_cpu, num_reqs=num_reqs, num_actual_tokens=int(starts_cpu[-1]),
                max_query_len=max(counts), max_seq_len=int(lens_cpu.max()), block_table_tensor=group.table,
                slot_mapping=rows[0], causal=True, mm_req_doc_ranges=ranges, is_prefilling=prefilling,
            )
            for attention, mine in chosen:
                built = build(attention, common)
                for name in mine:
                    metadata[name] = built
                    slots_by_layer[name] = own_slots[name]
    return metadata, slots_by_layer


def dropped_specs(model, specs: dict) -> dict:
    """vLLM's KV-cache specs by layer name, the layers from each boundary of the server's methods
    to the next reporting ``memory.DroppedSpec``: their own KV-cache groups, whose blocks hold the
    kept tokens only (either runner's ``get_kv_cache_spec``)."""
    model = dropping(model)
    boundaries = [] if model is None else model.duet_boundaries()
    if not boundaries:
        return specs
    from vllm.v1.kv_cache_interface import AttentionSpec

    from ..memory import DroppedSpec

    names = model.duet_attention_layer_names()
    edges = [*boundaries, len(names)]
    for first, end in zip(edges, edges[1:]):
        for layer in range(first, end):
            # (a linear-attention layer's state is one per request; a layer that reads another's keys and
            # values, Gemma 4's last ones, has no spec: vLLM puts it in the group of the layer it reads)
            if isinstance(specs.get(names[layer]), AttentionSpec):
                specs[names[layer]] = DroppedSpec.of(specs[names[layer]], first, end - 1)
    return specs
