"""A step as the runner sees it before its forward: each request's drops (``RequestPlan``, from its
items' plans), and what the model's hooks need of the step (``StepPlan``: the dropping requests,
each request's rows, the boundaries). Neither depends on which tokens are kept, only on how many."""

from __future__ import annotations

import dataclasses
import functools

from ....plan import Plan
from ..options import dropped_tokens
from .checks import StageNotServed, check_stage


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

    @functools.cached_property
    def dropped(self) -> tuple[int, ...]:
        """Tokens this request no longer holds in each decoder layer (0-based), made once: every
        step asks it of every layer."""
        return dropped_tokens([(length, plan.schedule.tokens_per_layer) for (_, length), plan in zip(self.spans, self.plans)])

    @functools.cached_property
    def changes(self) -> tuple[int, ...]:
        """The decoder layers where this request holds other tokens than in the layer before (its
        boundaries that drop): what the compacted layers' metadata is made anew at, made once."""
        dropped = self.dropped
        return tuple(layer for layer in range(1, len(dropped)) if dropped[layer] != dropped[layer - 1])

    def dropped_before(self, layer: int) -> int:
        """Tokens this request no longer holds in decoder layer ``layer`` (0-based)."""
        return self.dropped[layer]

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

    def renumbering_requests(self) -> list[tuple[int, RequestPlan]]:
        """``(batch index, plan)`` of each request whose positions change in some layer of this step:
        those that dropped (in it or before it) with contiguous positions."""
        return [(index, plan) for index, (plan, computed) in enumerate(self.batch)
                if plan is not None and plan.contiguous and (index in self.drops or computed >= plan.prompt)]

    def renumbering(self) -> list[RequestPlan]:
        """The plans of the requests whose positions change in some layer of this step (``renumbering_requests``)."""
        return [plan for _, plan in self.renumbering_requests()]

    def renumbers(self) -> bool:
        """Whether some request's positions change in some layer (``renumbering``)."""
        return bool(self.renumbering())


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
