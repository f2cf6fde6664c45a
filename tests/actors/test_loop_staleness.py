"""The loop's invariants under controlled timing: the real generator, buffer, learner and
broadcaster, driven by a fake engine set and a fake trainer (tests/actors/fakes.py)."""

import asyncio
from pathlib import Path

import msgspec
import pytest

from actors.broadcaster import WeightBroadcaster
from actors.generator import Generator
from actors.learner import Learner
from actors.reward import RewardScorer
from actors.rollout import SampleRunner
from buffers.buffer import StalenessBuffer
from buffers.types import Prompt
from runtime.core.ledger import Ledger
from tests.actors.fakes import TOKEN_BASE, FakeEngines, FakeTrainer
from tests.conftest import run


def reward(prompt, sample):
    return float(len(sample.response_ids) % 3)


async def loop(*, max_staleness, engine_tick_s, learner_delay_s, steps=12, groups_per_step=3, n=4,
               reward_fn=reward, reward_timeout=5.0, tmp=Path("/tmp"), pause="in_place", extra=0,
               expiry="recompute", max_new_tokens=12, stop_prob=0.2, out=None, group_filter=None,
               outlive_versions=0):
    engines = FakeEngines(tick_s=engine_tick_s, report_token_versions=pause == "in_place", stop_prob=stop_prob,
                          outlive_versions=outlive_versions)
    buffer = StalenessBuffer(groups_per_step=groups_per_step, max_staleness=max_staleness, extra=extra,
                             mask_stale=expiry == "mask")
    ledger = Ledger()
    runner = SampleRunner(engines=engines, decode=lambda ids: " ".join(map(str, ids)),
                          sampling_params={"max_new_tokens": max_new_tokens, "temperature": 1.0},
                          exact_answer_versions=pause == "abort")
    scorer = RewardScorer(reward_fn, timeout_s=reward_timeout)
    gen = Generator(prompts=lambda i: Prompt(i, [1, 2, 3]), buffer=buffer, ledger=ledger, runner=runner,
                    scorer=scorer, n_samples=n, expiry=expiry, group_filter=group_filter)
    if out is not None:
        out.update(engines=engines, generator=gen, buffer=buffer)
    trainer = FakeTrainer(delay_s=learner_delay_s)
    bc = WeightBroadcaster(engines=engines, buffer=buffer, timeout_s=10, pause_mode=pause)
    learner = Learner(trainer=trainer, buffer=buffer, ledger=ledger, publisher=bc, num_steps=steps,
                      max_staleness=max_staleness, weights_dir=tmp)
    if out is not None:
        out.update(broadcaster=bc, learner=learner)
    tasks = [asyncio.create_task(gen.run(), name="generator"), asyncio.create_task(bc.run(), name="bc")]
    try:
        await learner.run()
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    return trainer, ledger, runner, scorer


@pytest.mark.parametrize("pause", ["in_place", "abort"])
@pytest.mark.parametrize("max_staleness", [0, 1, 3])
@pytest.mark.parametrize("slow", ["learner", "engine"])
def test_no_trained_token_exceeds_max_staleness(max_staleness, slow, pause, tmp_path):
    trainer, ledger, runner, _ = run(loop(
        max_staleness=max_staleness, pause=pause,
        engine_tick_s=0.003 if slow == "engine" else 0.0002,
        learner_delay_s=0.03 if slow == "learner" else 0.0,
        tmp=tmp_path,
    ))
    lags = []
    for version, batch in enumerate(trainer.batches):
        for g in batch:
            for s in g.samples:
                # the recorded version of every token is the version that produced it
                assert s.token_versions == [t - TOKEN_BASE for t in s.response_ids]
                lags += [version - v for v in s.token_versions]
    assert lags and max(lags) <= max_staleness
    if max_staleness == 0:
        assert set(lags) == {0}
    else:
        # the bound is used, not just respected: rollout ran ahead of training
        assert max(lags) >= 1
    counts = ledger.counts()
    assert counts.trained == 12 * 3 and counts.duplicates == 0 and counts.balanced


@pytest.mark.parametrize("pause", ["in_place", "abort"])
def test_requests_spanning_updates_keep_per_token_versions(pause, tmp_path):
    trainer, _, runner, _ = run(loop(max_staleness=2, engine_tick_s=0.002, learner_delay_s=0.0, tmp=tmp_path,
                                     pause=pause))
    spanning = [s for b in trainer.batches for g in b for s in g.samples if len(set(s.token_versions)) > 1]
    assert spanning
    # abort ends and re-sends the request (several segments); in_place keeps it whole (one segment)
    assert (runner.counters["resumed_after_abort"] > 0) == (pause == "abort")
    assert all((s.n_segments > 1) == (pause == "abort") for s in spanning)
    for s in spanning:
        assert s.token_versions == sorted(s.token_versions)
        assert s.token_versions == [t - TOKEN_BASE for t in s.response_ids]
        assert len(s.behavior_logprobs) == len(s.loss_mask) == len(s.response_ids)


def test_reward_that_raises_or_hangs_is_counted_and_the_loop_completes(tmp_path):
    import threading

    never = threading.Event()

    def flaky(prompt, sample):
        if sample.index == 0:
            raise ValueError("boom")
        if sample.index == 1 and sample.group_id % 2 == 0:
            never.wait()  # hangs forever
        return 1.0 if sample.index == 2 else 0.0

    trainer, ledger, _, scorer = run(loop(max_staleness=1, engine_tick_s=0.0002, learner_delay_s=0.0,
                                          reward_fn=flaky, reward_timeout=0.2, steps=4, tmp=tmp_path))
    assert len(trainer.batches) == 4
    assert scorer.failures["reward_error"] >= 4 * 3 and scorer.failures["reward_timeout"] >= 1
    failed = [s for b in trainer.batches for g in b for s in g.samples if s.status == "failed"]
    assert failed and all(not any(s.loss_mask) for s in failed)
    assert ledger.counts().balanced


def test_answers_without_token_versions_are_refused_when_requests_can_span_updates():
    from actors.rollout import VersionsUnknown
    from buffers.types import Sample

    runner = SampleRunner(engines=FakeEngines(report_token_versions=False), decode=str,
                          sampling_params={"max_new_tokens": 4}, exact_answer_versions=False)
    with pytest.raises(VersionsUnknown, match="--partial-rollout-mode recompute"):
        run(runner.run(Sample(group_id=0, index=0, prompt_ids=[1])))


def trained_lags(trainer):
    """Every trained token's staleness, checking its recorded version against the fake's truth."""
    lags = []
    for version, batch in enumerate(trainer.batches):
        for g in batch:
            for s in g.samples:
                assert s.token_versions == [t - TOKEN_BASE for t in s.response_ids]
                assert len(s.behavior_logprobs) == len(s.loss_mask) == len(s.response_ids)
                lags += [version - v for v in s.token_versions]
    return lags


@pytest.mark.parametrize("expiry", ["recompute", "drop"])
@pytest.mark.parametrize("max_staleness", [0, 1])
def test_over_provisioning_expires_the_long_tail_and_never_trains_past_the_bound(max_staleness, expiry, tmp_path):
    """Long-tail answers (up to 40 tokens, most short) and 4 over-sampled groups: batches take
    ready groups without waiting on the tail; a group whose deadline passes is regenerated or
    dropped, counted, and no token is ever trained staler than the bound."""
    out = {}
    trainer, ledger, _, _ = run(loop(max_staleness=max_staleness, engine_tick_s=0.001, learner_delay_s=0.004,
                                     extra=4, expiry=expiry, max_new_tokens=40, stop_prob=0.08, steps=16,
                                     tmp=tmp_path, out=out), timeout=60)
    lags = trained_lags(trainer)
    assert lags and max(lags) <= max_staleness
    counts = ledger.counts()
    assert counts.trained == 16 * 3 and counts.duplicates == 0 and counts.balanced
    expired = out["buffer"].expired
    assert out["buffer"].oversampled > 0  # the tail did open over-sampling: the scenario exercises it
    assert out["generator"].expired[f"expired_{expiry}"] == expired
    assert counts.dropped == ({} if expiry == "recompute" else {"expired": expired})
    trained_ids = [g.group_id for b in trainer.batches for g in b]
    assert len(trained_ids) == len(set(trained_ids))


@pytest.mark.parametrize("pause", ["in_place", "abort"])
def test_a_partial_carried_over_two_versions_trains_with_each_tokens_own_staleness(pause, tmp_path):
    """With max_staleness 2, answers long enough to outlive two weight updates: kept (in_place)
    or resumed (abort) partial answers carry tokens of three versions, and each token is trained
    with its own staleness (version at training - version that produced it), within the bound."""
    out = {}
    trainer, _, _, _ = run(loop(max_staleness=2, engine_tick_s=0.002, learner_delay_s=0.0, pause=pause,
                                max_new_tokens=30, stop_prob=0.02, steps=10, tmp=tmp_path, out=out,
                                outlive_versions=2), timeout=60)
    lags = trained_lags(trainer)
    assert max(lags) <= 2
    three = [(version, s) for version, batch in enumerate(trainer.batches) for g in batch for s in g.samples
             if len(set(s.token_versions)) >= 3]
    outliver = [s for _, s in three if (s.group_id, s.index) == (0, 0)]  # others may span by timing too
    assert len(outliver) == 1 and len(outliver[0].response_ids) == 3  # trained once, one token per version
    assert (outliver[0].n_segments > 1) == (pause == "abort")  # abort resumed it; in_place kept it whole
    for version, s in three:
        per_token = [version - v for v in s.token_versions]
        assert per_token == sorted(per_token, reverse=True) and per_token[0] - per_token[-1] >= 2


@pytest.mark.parametrize("max_staleness", [0, 1])
def test_carried_partials_keep_every_token_and_train_none_past_the_bound(max_staleness, tmp_path):
    """``--partial-expiry mask`` on the long-tail scenario above: batches go once a batch's worth is
    ready, late groups are carried rather than regenerated, and no token is thrown away: every
    answer is whole and aligned, its tokens past the bound are exactly the masked ones, and
    every masked token is counted."""
    out = {}
    trainer, ledger, _, _ = run(loop(max_staleness=max_staleness, engine_tick_s=0.001, learner_delay_s=0.004,
                                     extra=4, expiry="mask", max_new_tokens=40, stop_prob=0.08, steps=16,
                                     tmp=tmp_path, out=out), timeout=60)
    buffer = out["buffer"]
    assert buffer.carried > 0  # the tail was carried: the scenario exercises the rule
    masked = 0
    for version, batch in enumerate(trainer.batches):
        for g in batch:
            for s in g.samples:
                assert s.token_versions == [t - TOKEN_BASE for t in s.response_ids]
                assert len(s.behavior_logprobs) == len(s.loss_mask) == len(s.response_ids)
                if s.status == "failed":
                    continue
                # masked exactly where the bound says, trained everywhere else
                assert s.loss_mask == [int(version - v <= max_staleness) for v in s.token_versions]
                masked += s.loss_mask.count(0)
    assert masked == buffer.masked_tokens
    # at 0 a carried answer's tokens from before an update are always past the bound; at 1 a
    # carried group may still finish in time to train them all
    assert masked > 0 or max_staleness > 0
    counts = ledger.counts()
    assert counts.trained == 16 * 3 and counts.duplicates == 0 and counts.balanced and counts.dropped == {}
    # regenerated only when nothing of a ready group could train any more (and then counted)
    assert out["generator"].expired["expired_mask"] == buffer.expired


def test_each_actor_reports_a_typed_stats_record(tmp_path):
    """What a metrics line is made of: each actor's own record (no reach into its fields)."""
    parts: dict = {}
    _, ledger, _, _ = run(loop(max_staleness=1, engine_tick_s=0.0005, learner_delay_s=0.01, steps=4, tmp=tmp_path,
                               out=parts))
    gen, bc, learner, buffer = parts["generator"], parts["broadcaster"], parts["learner"], parts["buffer"]
    g = gen.stats()
    assert g.cursor == ledger.counts().admitted > 0 and 0.0 <= g.wait_frac <= 1.0
    sync = bc.stats()
    assert sync is not None and 1 <= sync.version <= 4 and sync.total_s >= sync.paused_s >= 0
    assert 0.0 <= learner.stats().wait_frac <= 1.0
    assert buffer.stats().served_version <= sync.version  # the buffer hears of a sync after its record
    assert msgspec.structs.asdict(g).keys() == {"wait_frac", "cursor"}
