"""FailureBudget and RateLog: a repeated failure ends the run with its first error; logs stay bounded."""

import asyncio
import logging

import pytest

from runtime.core.errors import RunFailed
from runtime.core.failures import FailureBudget, RateLog
from tests.conftest import run


def test_a_streak_of_one_cause_spends_the_budget_with_the_streaks_first_error():
    async def scenario():
        budget = FailureBudget(limit=3)
        waiter = asyncio.create_task(budget.wait())
        budget.failed("reward", "first", what="reward calls failed")
        budget.ok("reward")  # a success: the streak starts again
        budget.failed("reward", "second", what="reward calls failed")
        budget.failed("engine", "other cause", what="samples failed on the engines")
        budget.failed("reward", "third", what="reward calls failed")
        await asyncio.sleep(0)
        assert not waiter.done()
        budget.failed("reward", "fourth", what="reward calls failed")
        with pytest.raises(RunFailed) as e:
            await waiter
        return str(e.value)

    line = run(scenario())
    assert line == "3 reward calls failed in a row (--max-consecutive-failures); first error: second"


def test_a_budget_of_0_never_ends_the_run():
    budget = FailureBudget(limit=0)
    for _ in range(10_000):
        budget.failed("engine", "refused", what="samples failed on the engines")
    assert budget.reason is None


def test_rate_log_logs_the_first_and_powers_of_ten(caplog):
    rate_log = RateLog(logging.getLogger("test.ratelog"))
    with caplog.at_level(logging.WARNING):
        for i in range(1, 1001):
            rate_log("engine_error", f"refused #{i}")
    assert [r.getMessage() for r in caplog.records] == [
        f"engine_error ({n} so far): refused #{n}" for n in (1, 10, 100, 1000)]
