"""Learner: takes batches from the buffer, steps the policy, bumps the version, publishes weights.

Version ``v`` is the number of optimizer steps taken; the batch of step ``v`` is trained by the
policy at version ``v``, so a token's staleness is ``v - token_version``. The learner checks it on
every trained token: the buffer's admission makes a violation impossible, and a violation here is
a bug that stops the run rather than silently training on stale data.
Heavy compute (the step and the weight save) runs on one dedicated thread, off the event loop.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Protocol

import msgspec

from buffers.buffer import StalenessBuffer
from buffers.types import Group
from policies.trainer import StepStats
from runtime import trace
from runtime.ledger import Ledger
from runtime.waits import WaitClock


class StalenessViolation(AssertionError):
    pass


class Trainer(Protocol):
    def step(self, batch: list[Group], version: int) -> StepStats: ...
    def save_weights(self, out_dir: Path) -> Path: ...
    def save_checkpoint(self, out_dir: Path) -> None: ...
    def close(self) -> None: ...


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


def staleness(batch: list[Group], version: int) -> list[int]:
    """Per trained token: ``version - token_version``."""
    return [version - v for g in batch for s in g.samples for v, m in zip(s.token_versions, s.loss_mask) if m]


class Learner:
    def __init__(self, *, trainer: Trainer, buffer: StalenessBuffer, ledger: Ledger, publisher: Publisher,
                 num_steps: int, max_staleness: int, weights_dir: Path,
                 on_step: Callable[[StepRecord], None] = lambda r: None, version: int = 0,
                 after_step: Callable[[int], Awaitable[None]] | None = None):
        self.trainer, self.buffer, self.ledger, self.publisher = trainer, buffer, ledger, publisher
        self.num_steps = num_steps
        self.max_staleness = max_staleness
        self.weights_dir = weights_dir
        self.on_step = on_step
        self.after_step = after_step  # e.g. a checkpoint; the next step waits for it
        self.version = version
        self.clock = WaitClock("learner")
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="learner-compute")

    async def run(self) -> None:
        """Train until ``num_steps`` versions exist; returning is the run's normal completion."""
        loop = asyncio.get_running_loop()
        try:
            while self.version < self.num_steps:
                batch = await self.buffer.get_batch(self.version, clock=self.clock)
                lags = staleness(batch, self.version)
                if lags and max(lags) > self.max_staleness:
                    raise StalenessViolation(
                        f"step {self.version}: token staleness {max(lags)} > max_staleness {self.max_staleness}"
                    )
                t0 = loop.time()
                with trace.span("learner", "train", groups=len(batch)):
                    stats = await loop.run_in_executor(self._pool, self.trainer.step, batch, self.version)
                train_s = loop.time() - t0
                self.version += 1
                for g in batch:
                    self.ledger.trained(g.group_id)
                path = None
                if getattr(self.publisher, "wants_files", True):  # else it broadcasts from the trainer
                    with trace.span("learner", "save weights"):
                        path = await loop.run_in_executor(
                            self._pool, self.trainer.save_weights, self.weights_dir / f"v{self.version}"
                        )
                await self.publisher.publish(self.version, path)
                self.on_step(_record(self.version, batch, stats, lags, train_s))
                if self.after_step is not None:
                    await self.after_step(self.version)
        finally:
            self._pool.shutdown(wait=False, cancel_futures=True)

    async def save_trainer(self, out_dir: Path) -> None:
        """The trainer's weights (HF format), optimizer and RNG at the current version."""
        await asyncio.get_running_loop().run_in_executor(self._pool, self.trainer.save_checkpoint, out_dir)

    def close(self) -> None:
        """Release the trainer (its process, on the local backend)."""
        self.trainer.close()


def _record(version: int, batch: list[Group], stats: StepStats, lags: list[int], train_s: float) -> StepRecord:
    trainable = [s for g in batch for s in g.samples if s.trainable]
    return StepRecord(
        step=version, version=version, stats=stats,
        reward_mean=sum(s.reward for s in trainable) / max(1, len(trainable)),
        response_len_mean=sum(len(s.response_ids) for s in trainable) / max(1, len(trainable)),
        staleness_max=max(lags, default=0), staleness_mean=sum(lags) / max(1, len(lags)),
        group_ids=[g.group_id for g in batch], train_s=train_s,
    )
