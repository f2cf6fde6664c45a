"""What the loop benchmarks share: generation alone (G), per-step times and CPU accounting.

G runs the real generator and engines with a learner that trains nothing and a publisher that
takes every version as served the moment it exists, so admission never waits on training or on a
weight sync. The heap is frozen out of the cyclic GC as ``Scheduler.run`` does for the loops, so
G and the loops pay the same collector. Imported by ``async_vs_sync.py`` and ``gpu_sync.py`` (run
as scripts, so this directory is on ``sys.path``).
"""

from __future__ import annotations

import asyncio
import gc
import tempfile
import time
from pathlib import Path

import psutil

from buffers.buffer import StalenessBuffer
from buffers.types import Group
from policies.trainer import StepStats
from runtime import cli
from runtime.launch import build, prepare_run_dir
from runtime.progress import Progress
from runtime.scheduler import freeze_heap


class NoTraining:
    """G's trainer: keeps each batch (T may train on them), trains nothing."""

    def __init__(self) -> None:
        self.batches: list[list[Group]] = []

    def step(self, batch: list[Group], version: int) -> StepStats:
        self.batches.append(batch)
        return StepStats(loss=0, pg_clipfrac=0, tis_mean=1, tis_clipfrac=0, kl=0, entropy=0, grad_norm=0,
                         n_tokens=0, n_samples=0)

    def save_weights(self, out_dir: Path) -> Path:
        return out_dir

    def close(self) -> None:
        pass


class ServeAtOnce:
    """G's publisher: every version is served the moment it exists (no sync, no wait)."""

    def __init__(self, buffer: StalenessBuffer):
        self.buffer = buffer

    async def publish(self, version: int, path: Path | None) -> None:
        await self.buffer.set_served_version(version)


def per_step(times: list[float], warmup: int) -> float:
    """Mean seconds per step after the first ``warmup`` steps (``times``: one per step)."""
    return (times[-1] - times[warmup]) / (len(times) - 1 - warmup)


def cpu_seconds() -> dict[str, float]:
    """CPU seconds (user + system) used so far by this process and each child, by role."""
    me = psutil.Process()
    out = {"driver": sum(me.cpu_times()[:2])}
    for child in me.children(recursive=True):
        cmd = " ".join(child.cmdline())
        role = "engine" if "policies.engine.server" in cmd else "trainer" if "trainer_process" in cmd else "other"
        out[role] = out.get(role, 0.0) + sum(child.cpu_times()[:2])
    return out


def cpu_per_step(marks: list[dict[str, float]], steps: int) -> dict[str, float]:
    """CPU seconds per step of each role between two ``cpu_seconds`` marks."""
    return {k: (marks[1][k] - marks[0].get(k, 0.0)) / steps for k in marks[1]}


async def generation_alone(argv: list[str], run_dir: Path, warmup: int
                           ) -> tuple[float, list[list[Group]], dict[str, float]]:
    """(G in s/step, the batches made, CPU s/step by role) for the launch flags ``argv``."""
    cfg = cli.resolve(argv + ["--run-dir", str(run_dir)])
    sched = build(cfg, prepare_run_dir(cfg), Path(tempfile.mkdtemp()), Progress(total_steps=1, mode="off"))
    a, generator = sched.agent, sched.producer.generator
    trainer = NoTraining()
    a.learner.close()  # its real trainer: G trains nothing
    a.learner.trainer, a.learner.publisher = trainer, ServeAtOnce(a.buffer)
    a.learner.max_staleness = 10**9  # engines keep version 0 weights here; nothing is trained
    times: list[float] = []
    marks: list[dict[str, float]] = []  # CPU at the end of warm-up and at the last step

    def on_step(rec) -> None:  # noqa: ANN001
        times.append(time.monotonic())
        if rec.step in (warmup + 1, a.learner.num_steps):
            marks.append(cpu_seconds())

    a.learner.on_step = on_step
    await a.engines.start()
    freeze_heap()
    gen = asyncio.create_task(generator.run(), name="generator")
    try:
        await a.learner.run()
    finally:
        gen.cancel()
        await asyncio.gather(gen, return_exceptions=True)
        await a.buffer.close()
        await a.engines.stop()
        gc.unfreeze()
    return per_step(times, warmup), trainer.batches, cpu_per_step(marks, len(times) - 1 - warmup)
