import asyncio

import pytest

from buffers.buffer import Closed, StalenessBuffer
from buffers.types import Group, Prompt, Sample
from runtime.core.ledger import Ledger
from tests.conftest import run


def group(ticket, versions=(0,)):
    s = Sample(group_id=ticket.group_id, index=0, prompt_ids=[1])
    s.add_segment(list(range(len(versions))), [0.0] * len(versions), versions[0])
    s.status = "completed"
    return Group(group_id=ticket.group_id, prompt=Prompt(0, [1]), samples=[s],
                 admitted_version=ticket.admitted_version, deadline_version=ticket.deadline_version)


async def blocked(aw, settle: int = 5) -> bool:
    """True if ``aw`` is still waiting after the loop has run everything runnable."""
    task = asyncio.ensure_future(aw)
    for _ in range(settle):
        await asyncio.sleep(0)
    if task.done():
        return False
    task.cancel()
    return True


def test_admission_rule_synchronous():
    async def main():
        buf, led = StalenessBuffer(groups_per_step=2, max_staleness=0), Ledger()
        t = [await buf.reserve(led.admit) for _ in range(2)]
        assert [x.deadline_version for x in t] == [0, 0]
        assert await blocked(buf.reserve(led.admit))  # third group must wait for version 1
        for x in t:
            await buf.put(group(x))
        assert len(await buf.get_batch(0)) == 2
        assert await blocked(buf.reserve(led.admit))  # trained, but engines still serve version 0
        await buf.set_served_version(1)
        t3 = await buf.reserve(led.admit)
        assert (t3.admitted_version, t3.deadline_version) == (1, 1)

    run(main())


def test_full_buffer_makes_producer_wait_and_drops_nothing():
    async def main():
        buf, led = StalenessBuffer(groups_per_step=2, max_staleness=3, capacity=2), Ledger()
        tickets = [await buf.reserve(led.admit) for _ in range(2)]
        waiter = asyncio.ensure_future(buf.reserve(led.admit))
        assert await blocked(asyncio.shield(waiter))
        for t in tickets:
            await buf.put(group(t))
        assert not waiter.done()  # ready but untrained groups still hold their slots
        batch = await buf.get_batch(0)
        assert sorted(g.group_id for g in batch) == [0, 1]
        third = await waiter
        assert third.group_id == 2 and buf.dropped == 0

    run(main())


def test_batches_are_earliest_deadline_first_and_wait_for_a_due_group():
    async def main():
        buf, led = StalenessBuffer(groups_per_step=1, max_staleness=1), Ledger()
        a = await buf.reserve(led.admit)  # deadline 1
        b = await buf.reserve(led.admit)  # deadline 1
        await buf.put(group(b))
        # a and b are equally due: the ready one goes first rather than waiting for a
        assert [g.group_id for g in await buf.get_batch(0)] == [b.group_id]
        await buf.set_served_version(1)
        c = await buf.reserve(led.admit)  # deadline 2
        await buf.put(group(c))
        # c is ready, but a is due at version 1 and still generating: the learner must wait for a
        assert await blocked(buf.get_batch(1))
        await buf.put(group(a))
        assert [g.group_id for g in await buf.get_batch(1)] == [a.group_id]
        assert [g.group_id for g in await buf.get_batch(2)] == [c.group_id]

    run(main())


def test_cancel_frees_slot_and_close_wakes_everyone():
    async def main():
        buf, led = StalenessBuffer(groups_per_step=1, max_staleness=0), Ledger()
        t = await buf.reserve(led.admit)
        getter = asyncio.ensure_future(buf.get_batch(0))
        await buf.cancel(t.group_id)
        assert buf.can_admit()
        await buf.close()
        with pytest.raises(Closed):
            await getter
        with pytest.raises(Closed):
            await buf.reserve(led.admit)

    run(main())


def test_put_without_reservation_is_an_error():
    async def main():
        buf, led = StalenessBuffer(groups_per_step=1, max_staleness=0), Ledger()
        t = await buf.reserve(led.admit)
        await buf.put(group(t))
        with pytest.raises(KeyError):
            await buf.put(group(t))

    run(main())
