"""``--partial-expiry mask``: a late over-sampled group is carried, not thrown away, and only its
tokens past the bound are kept out of the loss (buffers/buffer.py, "Carrying stale partials")."""

import pytest

from buffers.buffer import StalenessBuffer
from buffers.types import Group, Prompt, Sample
from runtime.core.ledger import Ledger
from tests.buffers.test_buffer import blocked
from tests.conftest import run


def answered(ticket, versions):
    """A ticket's group with one completed answer whose tokens have ``versions``."""
    s = Sample(group_id=ticket.group_id, index=0, prompt_ids=[1])
    s.add_segment(list(range(len(versions))), [0.0] * len(versions), list(versions))
    s.status = "completed"
    return Group(group_id=ticket.group_id, prompt=Prompt(0, [1]), samples=[s],
                 admitted_version=ticket.admitted_version, deadline_version=ticket.deadline_version)


def test_a_batch_goes_once_full_and_the_tail_is_carried_with_its_stale_tokens_masked():
    async def main():
        buf, led = StalenessBuffer(groups_per_step=1, max_staleness=0, extra=1, mask_stale=True), Ledger()
        tail = await buf.reserve(led.admit)  # deadline 0
        assert await blocked(buf.get_batch(0))  # the learner waits on the tail: over-sampling opens
        quick = await buf.reserve(led.admit)
        await buf.put(answered(quick, [0, 0]))
        assert [g.group_id for g in await buf.get_batch(0)] == [quick.group_id]  # full: it goes
        await buf.set_served_version(1)
        assert await blocked(buf.get_batch(1))  # at version 1 the tail is late: carried, not expired
        assert (buf.carried, buf.expired, buf.n_pending) == (1, 0, 1)
        # the tail finishes: 3 tokens from version 0, 2 from version 1, all still in the answer
        await buf.put(answered(tail, [0, 0, 0, 1, 1]))
        (g,) = await buf.get_batch(1)
        s = g.samples[0]
        assert s.response_ids == [0, 1, 2, 3, 4] and s.token_versions == [0, 0, 0, 1, 1]
        assert s.loss_mask == [0, 0, 0, 1, 1] and buf.masked_tokens == 3
        assert buf.dropped == 0 and buf.untrained == 0

    run(main())


@pytest.mark.parametrize("newest, expires", [(1, False), (0, True)])
def test_a_late_ready_group_is_kept_while_a_token_can_train(newest, expires):
    async def main():
        expired = []
        buf = StalenessBuffer(groups_per_step=1, max_staleness=1, extra=1, mask_stale=True,
                              on_expire=lambda gid, prompt: expired.append(gid))
        led = Ledger()
        a = await buf.reserve(led.admit)  # deadline 1
        b = await buf.reserve(led.admit)  # deadline 1
        await buf.put(answered(a, [0]))
        await buf.put(answered(b, [0, newest]))
        assert [g.group_id for g in await buf.get_batch(0)] == [a.group_id]
        await buf.set_served_version(1)
        c = await buf.reserve(led.admit)  # deadline 2: b, never taken at 1, is late at 2
        await buf.put(answered(c, [1]))
        (g,) = await buf.get_batch(2)
        if expires:  # nothing of b within the bound at 2: it goes back to its owner, as before
            assert g.group_id == c.group_id and expired == [b.group_id] and buf.expired == 1
        else:  # b's version-1 token may still train: carried, its version-0 token masked
            assert g.group_id == b.group_id and expired == [] and buf.carried == 1
            assert g.samples[0].loss_mask == [0, 1] and buf.masked_tokens == 1

    run(main())


@pytest.mark.parametrize("mask_stale", [True, False])
def test_the_learner_waits_on_an_earlier_deadline_only_without_the_rule(mask_stale):
    async def main():
        expired = []
        buf = StalenessBuffer(groups_per_step=1, max_staleness=1, extra=1, mask_stale=mask_stale,
                              on_expire=lambda gid, prompt: expired.append(gid))
        led = Ledger()
        tail = await buf.reserve(led.admit)  # deadline 1, still generating
        q1 = await buf.reserve(led.admit)  # deadline 1
        await buf.put(answered(q1, [0]))
        assert [g.group_id for g in await buf.get_batch(0)] == [q1.group_id]
        await buf.set_served_version(1)
        q2 = await buf.reserve(led.admit)  # deadline 2
        await buf.put(answered(q2, [1]))
        # EDF says the tail (deadline 1) must be in batch 1; a batch's worth is ready all the same
        if not mask_stale:
            assert await blocked(buf.get_batch(1))  # waits (the slack is G + extra ready groups)
            return
        assert [g.group_id for g in await buf.get_batch(1)] == [q2.group_id]
        await buf.set_served_version(2)
        assert await blocked(buf.get_batch(2))  # the tail, late at 2, is carried to deadline 3
        assert (buf.carried, buf.expired, expired) == (1, 0, [])
        await buf.put(answered(tail, [0, 1, 2]))
        (g,) = await buf.get_batch(2)
        assert g.group_id == tail.group_id and g.samples[0].loss_mask == [0, 1, 1]

    run(main())


def test_a_carried_deadline_survives_a_checkpoint():
    """A resumed generator puts the group with its admission ticket's deadline; the restored buffer
    keeps the carried one, and the carried group's stale tokens are still masked."""
    async def main():
        buf, led = StalenessBuffer(groups_per_step=1, max_staleness=0, extra=1, mask_stale=True), Ledger()
        tail = await buf.reserve(led.admit)
        assert await blocked(buf.get_batch(0))
        quick = await buf.reserve(led.admit)
        await buf.put(answered(quick, [0]))
        await buf.get_batch(0)
        await buf.set_served_version(1)
        assert await blocked(buf.get_batch(1))  # carried: deadline 0 -> 1
        state = buf.snapshot()
        assert state.pending == {tail.group_id: 1}
        again = StalenessBuffer(groups_per_step=1, max_staleness=0, extra=1, mask_stale=True)
        again.restore(state, served_version=1)
        await again.put(answered(tail, [0, 1]))  # the ticket still says deadline 0
        (g,) = await again.get_batch(1)
        assert g.deadline_version == 1 and g.samples[0].loss_mask == [0, 1]

    run(main())
