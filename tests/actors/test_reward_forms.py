"""Reward forms beyond one float per sample: a group reward (one call scores a whole group) and a
dict of components (``--reward-key`` picks the trained one); their failures stay counted."""

from __future__ import annotations

import asyncio
import threading

from actors.reward import RewardScorer
from buffers.types import Prompt, Sample, Status
from tests.conftest import run


def pairs(prompt: Prompt, n: int = 4) -> list[tuple[Prompt, Sample]]:
    return [(prompt, Sample(group_id=prompt.index, index=i, prompt_ids=[1], response_text=str(i % 3)))
            for i in range(n)]


def rank(prompt: Prompt, samples: list[Sample]) -> list[float]:
    """A ranking reward: 1 for the group's largest answer, 0 for the rest (it needs the whole group)."""
    best = max(int(s.response_text) for s in samples)
    return [float(int(s.response_text) == best) for s in samples]


def test_a_group_reward_scores_each_prompt_in_one_call() -> None:
    calls: list[tuple[int, int]] = []

    def fn(prompt: Prompt, samples: list[Sample]) -> list[float]:
        calls.append((prompt.index, len(samples)))
        return rank(prompt, samples)

    async def scenario() -> None:
        a, b = Prompt(index=0, input_ids=[1]), Prompt(index=1, input_ids=[1])
        both = pairs(a) + pairs(b, 5)  # the evaluator hands several prompts' samples at once
        await RewardScorer(fn, timeout_s=5, group=True).score_many(both)
        assert sorted(calls) == [(0, 4), (1, 5)]
        assert [s.reward for _, s in both] == [0.0, 0.0, 1.0, 0.0] + [0.0, 0.0, 1.0, 0.0, 0.0]

    run(scenario())


def test_an_async_group_reward_and_its_failures() -> None:
    never = threading.Event()

    async def async_rank(prompt: Prompt, samples: list[Sample]) -> list[float]:
        await asyncio.sleep(0)
        return rank(prompt, samples)

    def short(prompt: Prompt, samples: list[Sample]) -> list[float]:
        return [1.0]  # one value for a group of four

    def hangs(prompt: Prompt, samples: list[Sample]) -> list[float]:
        never.wait()
        return []

    async def scenario() -> None:
        ok = pairs(Prompt(index=0, input_ids=[1]))
        await RewardScorer(async_rank, timeout_s=5, group=True).score_many(ok)
        assert [s.reward for _, s in ok] == [0.0, 0.0, 1.0, 0.0]
        for fn, kind in ((short, "reward_error"), (hangs, "reward_timeout")):
            scorer = RewardScorer(fn, timeout_s=0.2, group=True)
            bad = pairs(Prompt(index=0, input_ids=[1]))
            await scorer.score_many(bad)
            assert all(s.status == Status.FAILED for _, s in bad) and scorer.failures == {kind: 4}

    try:
        run(scenario())
    finally:
        never.set()


def test_reward_components_train_on_the_reward_key() -> None:
    def parts(prompt: Prompt, sample: Sample) -> dict[str, float]:
        return {"correct": float(sample.index == 1), "format": 0.5}

    async def scenario() -> None:
        scored = pairs(Prompt(index=0, input_ids=[1]))
        await RewardScorer(parts, timeout_s=5, reward_key="correct").score_many(scored)
        assert [s.reward for _, s in scored] == [0.0, 1.0, 0.0, 0.0]
        assert scored[1][1].reward_components == {"correct": 1.0, "format": 0.5}
        for key in ("", "missing"):  # no key, or one the dict lacks: the sample fails, counted
            scorer = RewardScorer(parts, timeout_s=5, reward_key=key)
            bad = pairs(Prompt(index=0, input_ids=[1]), 2)
            await scorer.score_many(bad)
            assert all(s.status == Status.FAILED for _, s in bad) and scorer.failures == {"reward_error": 2}
        assert "--reward-key" in bad[0][1].failure

    run(scenario())
