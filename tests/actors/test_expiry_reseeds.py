"""An over-provisioned group that expires is generated again with new sampling seeds.

With the old seeds the engine would replay the answers the group expired on (the same long tail),
and regenerating it would buy nothing but the same wait.
"""

import asyncio

import pytest

from actors.generator import Generator
from actors.reward import RewardScorer
from actors.rollout import SampleRunner
from buffers.buffer import StalenessBuffer
from buffers.types import Prompt, Status
from policies.engine.client import GenerateOutput
from runtime.core.ledger import Ledger
from tests.conftest import run


class RecordingRunner:
    """Records each group's attempt; group 0's first attempt never finishes (the long tail)."""

    def __init__(self):
        self.calls: list[tuple[int, int]] = []
        self.changed = asyncio.Event()

    async def run_group(self, samples, *, attempt=0, share=None):
        gid = samples[0].group_id
        self.calls.append((gid, attempt))
        self.changed.set()
        if gid == 0 and attempt == 0:
            await asyncio.Event().wait()  # cancelled when the group expires
        for s in samples:
            s.add_segment([5], [-1.0], 0)
            s.status = Status.COMPLETED


def test_an_expired_group_is_regenerated_with_its_attempt_number():
    async def scenario():
        buffer = StalenessBuffer(groups_per_step=1, max_staleness=0, extra=1)
        runner = RecordingRunner()
        gen = Generator(prompts=lambda i: Prompt(i, [1, 2]), buffer=buffer, ledger=Ledger(), runner=runner,
                        scorer=RewardScorer(lambda p, s: 1.0, timeout_s=5.0), n_samples=2, expiry="recompute")
        task = asyncio.create_task(gen.run())
        try:
            # group 0 holds the batch; over-sampled group 1 is ready first and is trained instead
            assert [g.group_id for g in await buffer.get_batch(0)] == [1]
            await buffer.set_served_version(1)
            batch = await buffer.get_batch(1)  # group 0 expires (deadline 0) and is generated again
            assert [g.group_id for g in batch] == [0] and buffer.expired == 1
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        return runner.calls

    calls = run(scenario())
    assert calls[:2] == [(0, 0), (1, 0)]
    assert (0, 1) in calls  # the second attempt says so, and so gets new seeds


class SeedEngines:
    def __init__(self):
        self.seeds: list[int] = []

    async def generate_batch(self, input_ids, sampling_params, *, rids=None):
        self.seeds += [p["sampling_seed"] for p in sampling_params]
        return [GenerateOutput(output_ids=[5], logprobs=[-1.0], finish_reason="stop", weight_version="0",
                               prompt_tokens=len(i), completion_tokens=1, latency_s=0.0, token_versions=["0"])
                for i in input_ids]


def test_attempt_changes_the_seeds_and_attempt_zero_keeps_them():
    from buffers.types import Sample

    async def seeds(attempt):
        engines = SeedEngines()
        runner = SampleRunner(engines=engines, decode=str, seed=7, sampling_params={"max_new_tokens": 4})
        await runner.run_group([Sample(group_id=3, index=i, prompt_ids=[1]) for i in range(4)], attempt=attempt)
        return engines.seeds

    first, second, third = (run(seeds(a)) for a in (0, 1, 2))
    assert first == [hash((7, 3, i, 0)) % 2**31 for i in range(4)]  # unchanged: runs stay reproducible
    assert not set(first) & set(second) and not set(second) & set(third)


def test_the_mask_rule_and_the_buffer_must_agree():
    """Built apart (as an embedder might), a mismatch would make "mask" silently regenerate."""
    for expiry, mask_stale in (("mask", False), ("recompute", True)):
        buffer = StalenessBuffer(groups_per_step=1, max_staleness=0, extra=1, mask_stale=mask_stale)
        with pytest.raises(ValueError, match="mask_stale"):
            Generator(prompts=lambda i: Prompt(i, [1]), buffer=buffer, ledger=Ledger(), runner=RecordingRunner(),
                      scorer=RewardScorer(lambda p, s: 1.0, timeout_s=5.0), n_samples=1, expiry=expiry)
