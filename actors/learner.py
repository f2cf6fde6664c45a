"""Learner: takes batches from the buffer, steps the policy, bumps the version, publishes weights.

Version ``v`` is the number of optimizer steps taken; the batch of step ``v`` is trained by the
policy at version ``v``, so a token's staleness is ``v - token_version``. The learner checks it on
every trained token: the buffer's admission makes a violation impossible, and a violation here is
a bug that stops the run rather than silently training on stale data.
Heavy compute (the step and the weight save) runs on one dedicated thread, off the event loop.

Pipelined: the trainer is the loop's bottleneck, so the learner keeps it fed. Each step is one
job on the compute thread (``_Job``: step v, then save version v+1's weights). While it runs,
the learner takes the next batch as soon as the buffer has it and queues the next job behind it,
so the thread goes from one job to the next without waiting for the event loop; the learner
publishes version v+1, writes its metrics line and checks the next batch's staleness while the
trainer computes. Before this the trainer idled ~3.5 ms a step (and up to tens of ms when the
event loop or the driver's GIL was busy) between its save and its next step. What each step
trains is unchanged: step v+1 runs after version v+1 is saved, on the batch ``get_batch(v+1)``
returns (taken at most one step early: expiry and EDF ordering are by version, not time). A
batch that is not ready in time is waited for after the publish, as before (with max_staleness 0
it needs the published version). Never pipelined: a publisher without files (a collective sync
reads the trainer, which must be between steps), an ``after_step`` hook (a checkpoint must
see the trainer between steps) and a ``before_step`` hook (time-sliced engines must have handed
the GPU over before a step starts).
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import dataclasses
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Protocol

import msgspec

from buffers.buffer import StalenessBuffer
from buffers.types import Group, Sample
from policies.step_stats import StepStats
from policies.trainer_api import Trainer
from runtime.core import trace
from runtime.core.ledger import Ledger
from runtime.core.waits import WaitClock


class StalenessViolation(AssertionError):
    pass


class Publisher(Protocol):
    async def publish(self, version: int, path: Path | None) -> None:
        """``path``: the weights' files, or None when the publisher reads them from the trainer
        itself (a collective broadcast: then it returns once they are sent)."""
        ...


class StepRecord(msgspec.Struct):
    """What one learner step reports; the scheduler adds run-wide figures to make a metrics line."""

    step: int  # 1-based count of optimizer steps
    version: int  # policy version after the step
    stats: StepStats
    reward_mean: float
    response_len_mean: float
    staleness_max: int
    staleness_mean: float
    group_ids: list[int]
    train_s: float
    reward_components: dict[str, float] = {}  # mean of each part of a dict reward (--reward-key)


class LearnerStats(msgspec.Struct):
    """The learner's figures on a metrics line (``learner/*``)."""

    wait_frac: float  # share of the time since the last stats() spent waiting for a batch


@dataclasses.dataclass(eq=False)
class _Job:
    """One step on the compute thread: train ``batch`` at ``version``, then save the new weights
    to ``save_to`` (None: the publisher reads them from the trainer). Times are
    ``time.monotonic``, the trace's clock."""

    version: int
    batch: list[Group]
    lags: list[int]
    save_to: Path | None
    train_s: tuple[float, float] = (0.0, 0.0)
    save_s: tuple[float, float] = (0.0, 0.0)
    done: asyncio.Future[StepStats] = dataclasses.field(init=False)


def staleness(batch: list[Group], version: int) -> list[int]:
    """Per trained token: ``version - token_version``."""
    return [version - v for g in batch for s in g.samples for v, m in zip(s.token_versions, s.loss_mask) if m]


class Learner:
    def __init__(self, *, trainer: Trainer, buffer: StalenessBuffer, ledger: Ledger, publisher: Publisher,
                 num_steps: int, max_staleness: int, weights_dir: Path,
                 on_step: Callable[[StepRecord], None] = lambda r: None, version: int = 0,
                 after_step: Callable[[int], Awaitable[None]] | None = None,
                 before_step: Callable[[int], Awaitable[None]] | None = None):
        self.trainer, self.buffer, self.ledger, self.publisher = trainer, buffer, ledger, publisher
        self.num_steps = num_steps
        self.max_staleness = max_staleness
        self.weights_dir = weights_dir
        self.on_step = on_step
        self.after_step = after_step  # e.g. a checkpoint; the next step waits for it
        self.before_step = before_step  # e.g. colocated engines handing the GPU over (runtime/time_slice.py)
        self.version = version
        self.clock = WaitClock("learner")
        # one thread, jobs in order: a queued job starts the moment the one before it ends
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="learner-compute")

    def stats(self) -> LearnerStats:
        """Figures since the last call (the wait share is a lap of the clock)."""
        return LearnerStats(wait_frac=self.clock.lap())

    async def run(self) -> None:
        """Train until ``num_steps`` versions exist; returning is the run's normal completion."""
        try:
            jobs: collections.deque[_Job] = collections.deque()  # started, in version order (at most 2)
            while self.version < self.num_steps:
                if not jobs:
                    batch = await self.buffer.get_batch(self.version, clock=self.clock)
                    if self.before_step is not None:
                        await self.before_step(self.version)
                    jobs.append(self._start(batch, self.version))
                job = jobs[0]
                if len(jobs) == 1 and self._pipelined(job.version + 1):
                    batch = await self._batch_before(job)
                    if batch is not None:
                        jobs.append(self._start(batch, job.version + 1))
                try:
                    stats = await job.done
                finally:
                    _trace_job(job)  # a step that failed too: the timeline shows where the run ended
                jobs.popleft()
                self.version += 1
                for g in job.batch:
                    self.ledger.trained(g.group_id)
                await self.publisher.publish(self.version, job.save_to)
                self.on_step(_record(self.version, job.batch, stats, job.lags, job.train_s[1] - job.train_s[0]))
                if self.after_step is not None:
                    await self.after_step(self.version)
        finally:
            self._pool.shutdown(wait=False, cancel_futures=True)

    def _pipelined(self, version: int) -> bool:
        """May the step at ``version`` be queued while the one before it runs (module docstring)?"""
        return (version < self.num_steps and self.after_step is None and self.before_step is None
                and self._wants_files)

    async def _batch_before(self, job: _Job) -> list[Group] | None:
        """The batch for the step after ``job``, once the buffer has it, if that is before ``job``
        ends; else None (nothing taken)."""
        take = asyncio.ensure_future(self.buffer.get_batch(job.version + 1, busy=True))
        take.set_name(f"learner-next-batch-v{job.version + 1}")
        # retrieved however it ends: cancelled at shutdown, this method never reads it, and the
        # buffer closing under it would print "Task exception was never retrieved"
        take.add_done_callback(lambda t: t.cancelled() or t.exception())
        await asyncio.wait([take, job.done], return_when=asyncio.FIRST_COMPLETED)
        if not take.done():
            take.cancel()
        (batch,) = await asyncio.gather(take, return_exceptions=True)  # (it may have won the race anyway)
        if isinstance(batch, BaseException) and not isinstance(batch, asyncio.CancelledError):
            raise batch  # the buffer closed, or a deadline missed: as from get_batch
        return None if isinstance(batch, BaseException) else batch

    def _start(self, batch: list[Group], version: int) -> _Job:
        """Check ``batch`` for the step at ``version``, then queue it on the compute thread."""
        lags = staleness(batch, version)
        if lags and max(lags) > self.max_staleness:
            raise StalenessViolation(
                f"step {version}: token staleness {max(lags)} > max_staleness {self.max_staleness}")
        job = _Job(version, batch, lags, self.weights_dir / f"v{version + 1}" if self._wants_files else None)
        job.done = asyncio.get_running_loop().run_in_executor(self._pool, self._work, job)
        # retrieved however it ends: a job still queued when the learner stops (its trainer died
        # under the one before) would print "Future exception was never retrieved"
        job.done.add_done_callback(lambda f: f.cancelled() or f.exception())
        return job

    def _work(self, job: _Job) -> StepStats:
        """On the compute thread."""
        t0 = time.monotonic()
        try:
            stats = self.trainer.step(job.batch, job.version)
        finally:
            job.train_s = (t0, time.monotonic())
        if job.save_to is not None:
            # (its span starts 1 us late: the file rounds times to 0.1 us, and spans that touch
            # could then overlap there, which a trace viewer cannot draw on one row)
            s0 = job.train_s[1] + 1e-6
            job.save_to = self.trainer.save_weights(job.save_to)
            job.save_s = (s0, max(time.monotonic(), s0 + 1e-6))
        return stats

    @property
    def _wants_files(self) -> bool:
        return getattr(self.publisher, "wants_files", True)  # else it broadcasts from the trainer

    async def save_trainer(self, out_dir: Path) -> None:
        """The trainer's weights (HF format), optimizer and RNG at the current version."""
        await asyncio.get_running_loop().run_in_executor(self._pool, self.trainer.save_checkpoint, out_dir)

    def close(self) -> None:
        """Release the trainer (its process, on the local backend)."""
        self.trainer.close()


def _trace_job(job: _Job) -> None:
    """The job's step and save on the learner's track, recorded once it ended (it ran on the
    compute thread, where spans cannot be opened); nothing for a job that never started."""
    if not job.train_s[0]:
        return
    with trace.lane("learner", since=job.train_s[0]) as lane:
        lane.record("train", *job.train_s, v=job.version, groups=len(job.batch))
        if job.save_s[0]:
            lane.record("save weights", *job.save_s, v=job.version + 1)


def _record(version: int, batch: list[Group], stats: StepStats, lags: list[int], train_s: float) -> StepRecord:
    trainable = [s for g in batch for s in g.samples if s.trainable]
    return StepRecord(
        step=version, version=version, stats=stats,
        reward_mean=sum(s.reward for s in trainable) / max(1, len(trainable)),
        response_len_mean=sum(len(s.response_ids) for s in trainable) / max(1, len(trainable)),
        staleness_max=max(lags, default=0), staleness_mean=sum(lags) / max(1, len(lags)),
        group_ids=[g.group_id for g in batch], train_s=train_s, reward_components=_component_means(trainable),
    )


def _component_means(samples: list[Sample]) -> dict[str, float]:
    parts: dict[str, list[float]] = {}
    for s in samples:
        for k, v in s.reward_components.items():
            parts.setdefault(k, []).append(v)
    return {k: sum(v) / len(v) for k, v in parts.items()}
