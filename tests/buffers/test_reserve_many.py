"""``reserve_many``: several slots at once or none, so a multi-group producer never holds part of
its share while it waits (the episode driver's no-deadlock rule)."""

import asyncio

import pytest

from buffers.buffer import Closed, StalenessBuffer
from runtime.core.ledger import Ledger
from tests.buffers.test_buffer import blocked, group
from tests.conftest import run


def test_reserve_many_takes_all_slots_or_waits_holding_none():
    async def go():
        buf, led = StalenessBuffer(groups_per_step=2, max_staleness=1), Ledger()  # 4 slots at version 0
        first = await buf.reserve_many(led.admit, 3)
        assert [t.group_id for t in first] == [0, 1, 2] and buf.free_slots() == 1
        waiter = asyncio.ensure_future(buf.reserve_many(led.admit, 3))
        assert await blocked(asyncio.shield(waiter))
        assert buf.admitted == 3  # it holds nothing while it waits
        for t in first[:2]:
            await buf.put(group(t))
        assert len(await buf.get_batch(0)) == 2
        await buf.set_served_version(1)  # two more slots: 3 free now
        taken = await asyncio.wait_for(waiter, 1)
        assert [t.group_id for t in taken] == [3, 4, 5] and {t.admitted_version for t in taken} == {1}
        closing = asyncio.ensure_future(buf.reserve_many(led.admit, 2))
        assert await blocked(asyncio.shield(closing))
        await buf.close()
        with pytest.raises(Closed):
            await closing

    run(go())


def test_reserve_many_refuses_more_than_the_buffer_can_ever_hold():
    async def go():
        buf = StalenessBuffer(groups_per_step=2, max_staleness=0)
        with pytest.raises(ValueError, match="capacity 2"):
            await buf.reserve_many(Ledger().admit, 3)

    run(go())
