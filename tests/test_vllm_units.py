"""Parts of the vLLM plugin checked without an engine, in the vLLM environment: what a dropping
server refuses per request, a stage's scores from tensor-parallel ranks' heads gathered in one
process, and the sliding KV group's frees against vLLM's own sliding-window manager.

Needs vLLM (tests/test_vllm.py's environment); skipped without it unless ``DUET_REQUIRE_VLLM=1``.
"""

from __future__ import annotations

import os
from types import SimpleNamespace

import pytest

if os.environ.get("DUET_REQUIRE_VLLM") == "1":
    import vllm  # noqa: F401 - an ImportError here fails the run instead of skipping
else:
    pytest.importorskip("vllm")

import torch  # noqa: E402
from vllm import SamplingParams  # noqa: E402

from duet_vlm.integrations.vllm.language import hooks  # noqa: E402
from duet_vlm.integrations.vllm.refusals import RefusePromptLogprobs  # noqa: E402


@pytest.mark.parametrize("asked", [0, 1, 5])
def test_prompt_logprobs_are_refused_however_many_are_asked(asked):
    """``prompt_logprobs=0`` (the prompt tokens' own log-probabilities, which vLLM accepts) is refused
    as any other count is; a request without them, and one asking ``logprobs`` of its answer, pass."""
    with pytest.raises(ValueError, match="prompt_logprobs are not served"):
        RefusePromptLogprobs.validate_params(SamplingParams(prompt_logprobs=asked))
    RefusePromptLogprobs.validate_params(SamplingParams())
    RefusePromptLogprobs.validate_params(SamplingParams(logprobs=2))


def _ranks(full: torch.Tensor, heads: int, ranks: int, head_dim: int) -> list[torch.Tensor]:
    """Each rank's part of a ``(rows, heads * d)`` projection: a contiguous run of the heads; where
    there are fewer heads than ranks, each rank holds a copy of its group's head (vLLM's rule)."""
    if heads >= ranks:
        return list(full.split(heads // ranks * head_dim, dim=-1))
    return [full.view(full.shape[0], heads, head_dim)[:, rank * heads // ranks].clone() for rank in range(ranks)]


@pytest.mark.parametrize("heads,kv_heads", [(8, 4), (8, 2), (4, 1)])
def test_a_stages_scores_from_two_ranks_heads_equal_one_processs(monkeypatch, heads, kv_heads):
    """A stage's scores from a layer's queries and keys split over two tensor-parallel ranks and
    gathered (``rank_heads``: every rank's heads in rank order; one key head copied to both ranks
    where the model has fewer than two) equal the one-process scores: each query head meets its own
    group's keys (``gathered_scores`` counts the heads from the gathered widths). Two workers run the
    same under vLLM in tests/test_vllm.py; this checks the gather's arithmetic without them."""
    import vllm.distributed as distributed

    head_dim, length, ranks = 8, 12, 2
    generator = torch.Generator().manual_seed(heads + kv_heads)
    query = torch.randn(length, heads * head_dim, generator=generator)
    key = torch.randn(length, kv_heads * head_dim, generator=generator)
    query_parts, key_parts = _ranks(query, heads, ranks, head_dim), _ranks(key, kv_heads, ranks, head_dim)
    rank_query, rank_key = query_parts[0], key_parts[0]  # what rank 0's layer computed
    every_rank = {}

    def gather(tensor, dim):  # what vLLM's all-gather returns on rank 0: every rank's part, in rank order
        parts = every_rank[next(name for name, ours in (("query", rank_query), ("key", rank_key)) if torch.equal(ours, tensor))]
        return torch.cat([part.contiguous() for part in parts], dim=dim)

    every_rank.update(query=query_parts, key=key_parts)
    monkeypatch.setattr(distributed, "get_tensor_model_parallel_world_size", lambda: ranks)
    monkeypatch.setattr(distributed, "tensor_model_parallel_all_gather", gather)
    gathered_query, gathered_key = hooks.rank_heads((rank_query, rank_key))
    torch.testing.assert_close(gathered_query, query, rtol=0, atol=0)

    queries = [torch.tensor([9, 10, 11])]
    valid = [torch.ones(length, dtype=torch.bool)]
    visual = [torch.tensor([[2, 3, 4, 5, 6]])]
    for window in (None, 4):
        alone = hooks.gathered_scores(query, key, head_dim, 0.35, window, queries, valid, visual)
        split = hooks.gathered_scores(gathered_query, gathered_key, head_dim, 0.35, window, queries, valid, visual)
        torch.testing.assert_close(split, alone, rtol=1e-6, atol=1e-7)
        # the rank's own heads alone (no gather) score otherwise: what the gather is for
        own = hooks.gathered_scores(rank_query, rank_key, head_dim, 0.35, window, queries, valid, visual)
        assert not torch.allclose(own, alone, atol=1e-4)


def test_the_sliding_group_frees_exactly_what_vllms_sliding_manager_frees_for_the_tokens_it_holds():
    """``DroppedSlidingManager`` skips, for every count of tokens a segment holds, the tokens vLLM's
    own ``SlidingWindowManager`` skips for a request of that many tokens (the window behind the next
    token, to the token); and a request that dropped 10 of 25 tokens frees its blocks as a 15-token
    request does: 2 of 4 blocks of 4 at a window of 8 (a block freed one token late keeps 3)."""
    from vllm.v1.core.block_pool import BlockPool
    from vllm.v1.core.single_type_kv_cache_manager import get_manager_for_kv_cache_spec
    from vllm.v1.kv_cache_interface import SlidingWindowSpec

    from duet_vlm.integrations.vllm.memory import DroppedSpec, RequestDrops

    window = SlidingWindowSpec(block_size=4, num_kv_heads=1, head_size=32, dtype=torch.float32, sliding_window=8)

    def manager(spec):
        pool = BlockPool(num_gpu_blocks=32, enable_caching=False, hash_block_size=4)
        return get_manager_for_kv_cache_spec(spec, max_in_flight_tokens=64, max_model_len=64, block_pool=pool,
                                             enable_caching=False, kv_cache_group_id=0, scheduler_block_size=4)

    dropped, plain = manager(DroppedSpec.of(window, 2, 7)), manager(window)
    assert [dropped.get_num_skipped_tokens(n) for n in range(40)] == [plain.get_num_skipped_tokens(n) for n in range(40)]
    dropped.drops = {"drops": RequestDrops(20, (0, 0, 10, 10, 10, 10, 10, 10))}
    for name, target, tokens in (("drops", dropped, 25), ("whole", plain, 15)):
        target.allocate_new_blocks(name, tokens, tokens)
        blocks = target.req_to_blocks[name]
        target.remove_skipped_blocks(name, tokens)
        assert [block.is_null for block in blocks] == [True, True, False, False], name


def test_every_served_familys_class_is_the_model_the_runner_declares():
    """Each class of the registry (imported as vLLM imports it) has every member of the runner's
    declared protocol (``language.protocol.DroppingModel``), and its family's name and language flag
    are the registry's."""
    import importlib

    from duet_vlm.integrations.vllm import registry
    from duet_vlm.integrations.vllm.language.protocol import DroppingModel

    for family in registry.FAMILIES:
        module, name = family.target.split(":")
        cls = getattr(importlib.import_module(module), name)
        assert issubclass(cls, DroppingModel), family
        assert registry.of(cls) is family
        instance = cls.__new__(cls)  # (the properties read the class only)
        assert (instance.family, instance.serves_language) == (family.name, family.language)


def test_the_scheduler_and_the_runner_count_a_requests_drops_alike():
    """What the scheduler's groups count (``memory.request_drops``, from each item's
    ``duet_layer_tokens`` and its runs in the prompt) and what the runner's steps count
    (``RequestPlan.dropped``, from each run's plan) agree, for an image of one run and a video whose
    two temporal slices are runs of their own (each holding the plan's tokens)."""
    from vllm.multimodal.inputs import PlaceholderRange

    from duet_vlm.integrations.vllm.language.steps import RequestPlan
    from duet_vlm.integrations.vllm.memory import request_drops

    image, video = [64, 64, 16, 16, 4], [40, 40, 40, 10, 0]
    slice_mask = torch.tensor([0] + [1] * 40 + [0] + [1] * 40).bool()  # a timestamp token before each slice

    def feature(modality, held, position):
        key = ("duet_" if modality == "image" else f"duet_{modality}_") + "layer_tokens"
        return SimpleNamespace(modality=modality, mm_position=position, data={key: SimpleNamespace(data=torch.tensor(held))})

    request = SimpleNamespace(num_prompt_tokens=200, mm_features=[
        feature("image", image, PlaceholderRange(offset=3, length=64)),
        feature("video", video, PlaceholderRange(offset=80, length=82, is_embed=slice_mask))])
    plans = tuple(SimpleNamespace(schedule=SimpleNamespace(tokens_per_layer=held)) for held in (image, video, video))
    runner = RequestPlan(200, ((3, 64), (81, 40), (122, 40)), plans)
    scheduler = request_drops(request, 5)
    assert scheduler.dropped == runner.dropped == (0, 0, 48, 108, 140)
