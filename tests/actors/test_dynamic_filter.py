"""Dynamic sampling: groups a filter drops (DAPO's zero-variance rule) are counted by reason in the
ledger, admission tops up in their place, every batch stays full, and the staleness bound holds."""

from __future__ import annotations

import pytest

from buffers.filters import FilterResult, as_result, check_reward_nonzero_std
from buffers.types import Group, Prompt, Sample, Status
from tests.actors.fakes import TOKEN_BASE
from tests.actors.test_loop_staleness import loop
from tests.conftest import run

GROUPS_PER_STEP = 3
STEPS = 8


def same_reward_on_odd_groups(prompt: Prompt, sample: Sample) -> float:
    """Every sample of an odd group gets 1.0 (zero variance); even groups vary by answer length."""
    return 1.0 if sample.group_id % 2 else float(len(sample.response_ids) % 3)


@pytest.mark.parametrize("max_staleness", [0, 2])
def test_zero_variance_groups_are_dropped_counted_and_replaced(max_staleness, tmp_path):
    trainer, ledger, _, _ = run(loop(max_staleness=max_staleness, engine_tick_s=0.0003, learner_delay_s=0.002,
                                     steps=STEPS, groups_per_step=GROUPS_PER_STEP,
                                     reward_fn=same_reward_on_odd_groups, group_filter=check_reward_nonzero_std,
                                     tmp=tmp_path, stop_prob=0.3))
    assert len(trainer.batches) == STEPS
    assert all(len(batch) == GROUPS_PER_STEP for batch in trainer.batches)  # full batches
    trained = [g for batch in trainer.batches for g in batch]
    # nothing trained has zero variance (odd groups never do; an even one may by chance: dropped too)
    assert all(len({s.reward for s in g.samples if s.trainable}) > 1 for g in trained)
    assert all(g.group_id % 2 == 0 for g in trained)
    lags = [v - t + TOKEN_BASE for v, batch in enumerate(trainer.batches) for g in batch for s in g.samples
            for t in s.response_ids]
    assert lags and max(lags) <= max_staleness
    counts = ledger.counts()
    assert counts.balanced and counts.duplicates == 0 and counts.trained == STEPS * GROUPS_PER_STEP
    assert counts.dropped["filter_zero_std"] >= STEPS * GROUPS_PER_STEP - 1  # about one odd group per even one


def test_a_filter_that_raises_keeps_the_group_and_counts_it(tmp_path):
    def broken(group: Group) -> bool:
        raise RuntimeError("filter bug")

    out: dict = {}
    trainer, ledger, _, _ = run(loop(max_staleness=1, engine_tick_s=0.0002, learner_delay_s=0.0, steps=3,
                                     groups_per_step=GROUPS_PER_STEP, group_filter=broken, tmp=tmp_path, out=out))
    assert len(trainer.batches) == 3 and ledger.counts().balanced
    assert out["generator"].filtered["filter_error"] >= 3 * GROUPS_PER_STEP


def test_filter_verdicts() -> None:
    def group(rewards: list[float], failed: int = -1) -> Group:
        samples = [Sample(group_id=0, index=i, prompt_ids=[1], response_ids=[5], loss_mask=[1], reward=r,
                          status=Status.FAILED if i == failed else Status.COMPLETED) for i, r in enumerate(rewards)]
        return Group(group_id=0, prompt=Prompt(0, [1]), samples=samples, admitted_version=0, deadline_version=0)

    assert check_reward_nonzero_std(group([1.0, 0.0])).keep
    assert check_reward_nonzero_std(group([1.0, 1.0])) == FilterResult(False, "zero_std")
    assert not check_reward_nonzero_std(group([1.0, 0.0], failed=1)).keep  # only trainable samples count
    assert as_result(False) == FilterResult(False) and as_result((False, "short")) == FilterResult(False, "short")
    with pytest.raises(TypeError):
        as_result("keep")
