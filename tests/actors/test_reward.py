"""RewardScorer: every sample ends scored or failed with a reason, each call bounded on its own,
whether a group is scored in one job (a fast function) or a job per sample (a slow one)."""

import asyncio
import threading
import time

from actors.reward import FAST_CALL_S, RewardScorer
from buffers.types import Prompt, Sample, Status
from tests.conftest import run

PROMPT = Prompt(index=0, input_ids=[1])


def group(n=8):
    return [(PROMPT, Sample(group_id=0, index=i, prompt_ids=[1])) for i in range(n)]


def test_a_fast_function_scores_a_group_in_one_job_on_one_thread():
    threads = []

    def fn(prompt, sample):
        threads.append(threading.current_thread().name)
        return sample.index

    async def scenario():
        scorer = RewardScorer(fn, timeout_s=5)
        await scorer.score_many(group())  # not measured yet: a job per sample
        threads.clear()
        pairs = group()
        await scorer.score_many(pairs)
        assert [s.reward for _, s in pairs] == list(range(8))
        assert len(set(threads)) == 1  # measured fast: one job

    run(scenario())


def test_a_slow_function_scores_samples_in_parallel():
    def fn(prompt, sample):
        time.sleep(0.05)  # over FAST_CALL_S: one job (thread) per sample
        return 1.0

    async def scenario():
        scorer = RewardScorer(fn, timeout_s=5)
        for _ in range(2):
            t0 = time.monotonic()
            pairs = group()
            await scorer.score_many(pairs)
            assert all(s.reward == 1.0 for _, s in pairs)
            assert time.monotonic() - t0 < 8 * 0.05  # not one after another
        assert scorer._call_s > FAST_CALL_S

    run(scenario())


def test_in_one_job_a_hung_call_fails_its_sample_alone_and_the_rest_are_scored():
    never = threading.Event()

    def fn(prompt, sample):
        if sample.index == 3 and sample.group_id == 1:
            never.wait()
        if sample.index == 5:
            raise ValueError("boom")
        return float("nan") if sample.index == 6 else 1.0

    async def scenario():
        scorer = RewardScorer(fn, timeout_s=0.3)
        await scorer.score_many(group())  # measured fast from now on
        pairs = [(PROMPT, Sample(group_id=1, index=i, prompt_ids=[1])) for i in range(8)]
        t0 = time.monotonic()
        await scorer.score_many(pairs)
        assert time.monotonic() - t0 < 2.0
        statuses = {s.index: (s.status, s.reward) for _, s in pairs}
        assert statuses[3][0] == Status.FAILED and "exceeded" in pairs[3][1].failure
        assert statuses[5][0] == Status.FAILED and "boom" in pairs[5][1].failure
        assert statuses[6][0] == Status.FAILED and "nan" in pairs[6][1].failure
        assert all(statuses[i] == (Status.PENDING, 1.0) for i in (0, 1, 2, 4, 7))
        assert scorer.failures == {"reward_timeout": 1, "reward_error": 4}  # 5 and 6, in both groups
        assert all(s.timing.scored > 0 for _, s in pairs)

    run(scenario())
    never.set()


def test_a_coroutine_function_is_awaited_with_its_timeout():
    async def fn(prompt, sample):
        if sample.index == 0:
            await asyncio.sleep(10)
        return 0.5

    async def scenario():
        scorer = RewardScorer(fn, timeout_s=0.1)
        pairs = group(3)
        await scorer.score_many(pairs)
        assert pairs[0][1].status == Status.FAILED and [s.reward for _, s in pairs[1:]] == [0.5, 0.5]
        assert scorer.failures == {"reward_timeout": 1}

    run(scenario())


def test_a_coroutine_function_that_blocks_does_not_block_the_callers_loop():
    """``time.sleep`` in an ``async def`` (issue 16): it runs on the plug-in loop, so the caller's
    loop keeps running (a ticker advances) and the call fails on its timeout."""
    release = threading.Event()

    async def fn(prompt, sample):
        release.wait(5)  # noqa: ASYNC251 - the bug this stands for
        return 1.0

    async def scenario():
        ticks = 0

        async def ticker():
            nonlocal ticks
            while True:
                ticks += 1
                await asyncio.sleep(0.01)

        tick = asyncio.create_task(ticker())
        scorer = RewardScorer(fn, timeout_s=0.3)
        pairs = group(2)
        await scorer.score_many(pairs)
        tick.cancel()
        assert all(s.status == Status.FAILED and "exceeded" in s.failure for _, s in pairs)
        assert scorer.failures == {"reward_timeout": 2}
        assert ticks >= 10  # ~30 at 10 ms over 0.3 s; 1 if the loop had been blocked

    try:
        run(scenario())
    finally:
        release.set()


def test_hung_calls_hold_at_most_max_hung_calls_threads_and_later_samples_fail_at_once(monkeypatch):
    from actors import reward

    monkeypatch.setattr(reward, "MAX_HUNG_CALLS", 4)
    never = threading.Event()

    def fn(prompt, sample):
        never.wait()

    async def scenario():
        scorer = RewardScorer(fn, timeout_s=0.05)
        before = threading.active_count()
        for _ in range(10):  # 80 calls that all hang
            pairs = group()
            await scorer.score_many(pairs)
            assert all(s.status == Status.FAILED for _, s in pairs)
        grown = threading.active_count() - before
        assert grown <= 8 + 4  # one group's first jobs, then no new thread once 4 calls hang
        assert scorer.failures["reward_timeout"] == 80
        assert sum("still running past --reward-timeout" in s.failure for _, s in pairs) == 8

    try:
        run(scenario())
    finally:
        never.set()


def test_huge_and_non_finite_rewards_fail_their_sample_with_the_value():
    bad = {0: 1e300, 1: float("inf"), 2: -2e6, 3: "1e9"}

    async def scenario():
        scorer = RewardScorer(lambda p, s: bad.get(s.index, 1e6), timeout_s=5)
        pairs = group(5)
        await scorer.score_many(pairs)
        assert [s.status == Status.FAILED for _, s in pairs] == [True, True, True, True, False]
        assert "reward is 1e+300" in pairs[0][1].failure and pairs[4][1].reward == 1e6
        assert scorer.failures == {"reward_error": 4}

    run(scenario())
