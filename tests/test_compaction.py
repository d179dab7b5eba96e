"""The compaction value type every prefill step, the exit and the benchmark's ideal model use.

Properties on random keep masks (hypothesis): composing then scattering puts every kept token back
where it came from; gathering through a composition equals two gathers; renumbered positions are
contiguous per row; alignment padding never leaks into a row's kept tokens; the rank of a kept
position is its slot. Plus the module's doctests.
"""

import doctest

import hypothesis.strategies as st
import torch
from hypothesis import given, settings

import duet_vlm.compaction
from duet_vlm.compaction import Compaction
from duet_vlm.runtime.positions import Renumbered


@st.composite
def keep_masks(draw, min_rows=1, max_rows=4, max_length=12):
    rows = draw(st.integers(min_rows, max_rows))
    length = draw(st.integers(1, max_length))
    flags = draw(st.lists(st.lists(st.booleans(), min_size=length, max_size=length), min_size=rows, max_size=rows))
    keep = torch.tensor(flags, dtype=torch.bool)
    keep[:, -1] = True  # the last prompt token is text: always kept
    return keep


@st.composite
def two_steps(draw):
    first = draw(keep_masks())
    step = Compaction.from_keep(first)
    flags = draw(st.lists(st.booleans(), min_size=step.length * step.batch, max_size=step.length * step.batch))
    second = torch.tensor(flags, dtype=torch.bool).view(step.batch, step.length)
    second[:, -1] = True
    if step.pad is not None:
        second &= ~step.pad  # an alignment pad is never a kept token
    return step, Compaction.from_keep(second, source_pad=step.pad)


def test_doctests():
    assert doctest.testmod(duet_vlm.compaction, extraglobs={"torch": torch}).failed == 0


@given(keep_masks())
@settings(max_examples=200, deadline=None)
def test_index_lists_each_rows_kept_positions_in_order_left_padded(keep):
    step = Compaction.from_keep(keep)
    for b in range(keep.shape[0]):
        kept = keep[b].nonzero()[:, 0]
        pads = step.length - len(kept)
        assert step.index[b, pads:].tolist() == kept.tolist()
        assert (step.pad is None and pads == 0) or step.pad[b].tolist() == [True] * pads + [False] * len(kept)
    assert step.present().tolist() == keep.sum(dim=1).tolist()


@given(keep_masks())
@settings(max_examples=200, deadline=None)
def test_rank_is_each_kept_positions_slot(keep):
    step = Compaction.from_keep(keep)
    rank = step.rank()
    for b, p in keep.nonzero().tolist():
        assert step.index[b, rank[b, p]] == p


@given(two_steps())
@settings(max_examples=200, deadline=None)
def test_compose_then_scatter_puts_every_kept_token_back(steps):
    first, second = steps
    composed = first.then(second)
    source = torch.arange(1, 1 + first.batch * first.source_length).view(first.batch, -1)
    back = composed.scatter(composed.gather(source))
    assert torch.equal(back, source * composed.keep)
    # The composition keeps exactly the source positions both steps kept.
    kept_twice = first.scatter(second.scatter(torch.ones_like(second.index)))
    assert torch.equal(composed.keep.long(), kept_twice)


@given(two_steps())
@settings(max_examples=200, deadline=None)
def test_gather_of_a_composition_equals_two_gathers_on_kept_slots(steps):
    first, second = steps
    composed = first.then(second)
    states = torch.randn(first.batch, first.source_length, 3)
    once = composed.gather(states)
    twice = second.gather(first.gather(states))
    present = torch.ones_like(composed.index, dtype=torch.bool) if composed.pad is None else ~composed.pad
    assert torch.equal(once[present], twice[present])


@given(two_steps())
@settings(max_examples=200, deadline=None)
def test_renumbered_positions_are_contiguous_per_row_and_pads_never_leak(steps):
    first, second = steps
    scheme = Renumbered()
    entry_positions = scheme.at_entry(torch.arange(first.source_length)[None], first)
    if entry_positions is None:
        entry_positions = torch.arange(first.length)[None].expand(first.batch, -1)
    after, rope = scheme.after_boundary(entry_positions, entry_positions, second)
    assert rope is after
    for step, positions in ((first, entry_positions), (second, after)):
        present = torch.ones_like(step.index, dtype=torch.bool) if step.pad is None else ~step.pad
        for b in range(step.batch):
            row = positions[b][present[b]]
            assert row.tolist() == list(range(len(row)))  # contiguous from 0
            if step.pad is not None:
                assert positions[b][~present[b]].eq(0).all()


@given(keep_masks(min_rows=2))
@settings(max_examples=100, deadline=None)
def test_padding_never_leaks_into_a_rows_kept_tokens(keep):
    step = Compaction.from_keep(keep)
    states = torch.randn(keep.shape[0], keep.shape[1], 2)
    gathered = step.gather(states)
    for b in range(keep.shape[0]):
        alone = Compaction.from_keep(keep[b : b + 1])
        pads = step.length - alone.length
        assert torch.equal(gathered[b, pads:], alone.gather(states[b : b + 1])[0])
        # Scattering back writes nothing from the pads.
        assert torch.equal(step.scatter(gathered)[b], alone.scatter(alone.gather(states[b : b + 1]))[0])


def test_next_slots_put_each_state_before_the_next_kept_token():
    keep = torch.tensor([[True, False, False, True, True, False, True]])
    step = Compaction.from_keep(keep)
    # kept 0, 3, 4, 6: the state at 0 predicts 3 (placed at 2), at 3 predicts 4 (at 3), ...
    assert step.next_slots().tolist() == [[2, 3, 5, 6]]
