"""The scheduler: owns every actor's lifetime, the run's completion, its failure and its record.

Dataflow (local backend: each actor is a named asyncio task in this process, engines are
subprocesses reached over HTTP):

    prompts -> Generator --reserve()--> StalenessBuffer --get_batch(v)--> Learner
                  |  ^      waits: admission           waits: EDF batch     |  step on a thread
         /generate|  |abort answers are resumed                             | publish(v+1, weights)
                  v  |                                                      v
               Engines <--- pause -> update -> continue --- WeightBroadcaster
                                                                |
                          buffer.set_served_version(v+1) <------+  (wakes admission)

Bounds and who waits on whom:
- Admission: live groups < (served_version + max_staleness + 1) * groups_per_step and untrained
  groups < capacity = min(--buffer-capacity, (max_staleness + 1) * groups_per_step). The
  generator waits here and nowhere else; the buffer can therefore never overflow.
- The learner waits for the earliest-deadline batch; it never waits on the broadcaster.
- The broadcaster's mailbox holds one version (newest wins), so a slow sync skips versions
  instead of queueing them; each sync is bounded by --weight-sync-timeout.
- An evaluation is a task of its own on the same engines, outside admission: it never stalls
  training. At most one runs at a time; a trigger while one runs is skipped and counted.
Engine health: the engine set's monitor task probes every engine and restarts failed ones
(refit to the current version before they serve); requests lost with an engine are re-sent by
the rollout (failover). A spent restart budget ends the run with one line.
Completion: the learner returning after --num-rollout x steps-per-rollout steps. Then the final
version is synced and evaluated, every task is cancelled and every engine stopped. Any other task
ending (it never should) or raising ends the run with that task's traceback; a learner that makes
no step for --stall-timeout ends it with a dump of what every actor was waiting on.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import gc
import json
import logging
import time
import traceback
from pathlib import Path
from typing import Any

from actors.broadcaster import WeightBroadcaster
from actors.chat_endpoint import ChatEndpoint
from actors.evaluator import EvalResult, Evaluator
from actors.generator import Generator
from actors.learner import Learner, StepRecord
from buffers.buffer import StalenessBuffer
from policies.trainer_process import TrainerDied
from runtime.chaos import Chaos
from runtime.core import trace
from runtime.core.errors import RunFailed
from runtime.core.failures import FailureBudget
from runtime.core.ledger import Ledger
from runtime.engines import EngineSet
from runtime.metrics import MetricsLog
from runtime.progress import Progress

log = logging.getLogger(__name__)


THROUGHPUT_WINDOW = 10  # steps


__all__ = ["Actors", "RunFailed", "Scheduler"]


@dataclasses.dataclass
class Actors:
    engines: EngineSet
    buffer: StalenessBuffer
    ledger: Ledger
    generator: Generator
    learner: Learner
    broadcaster: WeightBroadcaster
    evaluator: Evaluator
    chaos: Chaos | None = None
    endpoint: ChatEndpoint | None = None  # multi-turn agents' OpenAI-compatible endpoint, while the run lasts
    budget: FailureBudget | None = None  # repeated failures (engine, reward) that end the run

    def rollout_counters(self) -> dict[str, int]:
        """Fault and recovery counts: engine errors, failovers, restarts, resumes, reward failures."""
        out = dict(self.generator.runner.counters)
        for source in (self.evaluator.runner.counters, self.engines.counters,
                       self.chaos.counters if self.chaos else {}, self.endpoint.counters if self.endpoint else {}):
            for kind, n in source.items():
                out[kind] = out.get(kind, 0) + n
        for kind, n in self.generator.scorer.failures.items():
            out[kind] = out.get(kind, 0) + n
        if self.generator.prompts_too_long:
            out["prompts_too_long"] = out.get("prompts_too_long", 0) + self.generator.prompts_too_long
        return out


class Scheduler:
    def __init__(self, actors: Actors, *, run_dir: Path, eval_interval: int, stall_timeout_s: float,
                 progress: Progress, metrics: MetricsLog | None = None, tracer: trace.Tracer | None = None):
        self.a = actors
        self.run_dir = run_dir
        self.eval_interval = eval_interval
        self.stall_timeout_s = stall_timeout_s
        self.progress = progress
        self.metrics = metrics or MetricsLog(run_dir / "metrics.jsonl")
        self.tracer = tracer  # trace.json; None: not traced
        if tracer is not None:
            tracer.version_of = lambda: self.a.learner.version
        # which groups each step trained: the exactly-once record across a kill and resume
        self.groups_log = open(run_dir / "groups.jsonl", "a", buffering=1)
        self.evals: list[EvalResult] = []
        self.counters: collections.Counter[str] = collections.Counter()
        self.staleness_max_observed = 0
        self.started_at = time.monotonic()
        self._last_step_at = self.started_at
        # (time, engine tokens) at recent steps: throughput over a window, since answers arrive
        # in bursts and one step's share would read 0 or double
        self._token_marks: collections.deque[tuple[float, int]] = collections.deque(maxlen=THROUGHPUT_WINDOW)
        self._eval_task: asyncio.Task[None] | None = None
        self._unreported: list[EvalResult] = []
        self._tasks: dict[str, asyncio.Task[Any]] = {}
        self._failure: str | None = None

    # -- lifecycle -------------------------------------------------------------------------------
    async def run(self) -> None:
        trace.activate(self.tracer)  # every actor task created below inherits it
        try:
            with trace.span("scheduler", "start engines"):
                await self.a.engines.start()
            if self.a.endpoint is not None:
                await self.a.endpoint.start()
            freeze_heap()
            self.started_at = self._last_step_at = time.monotonic()
            self._start_eval(self.a.learner.version)
            self._tasks = {
                name: asyncio.create_task(coro, name=name)
                for name, coro in [
                    ("learner", self.a.learner.run()),
                    ("generator", self.a.generator.run()),
                    ("broadcaster", self.a.broadcaster.run()),
                    ("watchdog", self._watchdog()),
                    ("engine-health", self.a.engines.monitor()),
                    *([("chaos", self.a.chaos.run())] if self.a.chaos and self.a.chaos.enabled else []),
                    *([("failure-budget", self.a.budget.wait())] if self.a.budget else []),
                ]
            }
            done, _ = await asyncio.wait(self._tasks.values(), return_when=asyncio.FIRST_COMPLETED)
            finished = done.pop()
            if self._failure is not None:
                raise RunFailed(self._failure)
            if not finished.cancelled() and isinstance(finished.exception(), RunFailed):
                raise finished.exception()  # already one clear line (the watchdog's)
            if finished.get_name() != "learner" or finished.cancelled() or finished.exception() is not None:
                raise RunFailed(_describe_end(finished))
            await self._finish()
        finally:
            await self._shutdown()

    async def _finish(self) -> None:
        final = self.a.learner.version
        with trace.span("scheduler", "final sync"):
            await asyncio.wait_for(self.a.broadcaster.wait_served(final), self.a.broadcaster.timeout_s)
        if self._eval_task is not None:
            await self._eval_task
        if not self.a.evaluator.enabled:
            return
        result = await self.a.evaluator.evaluate(final)
        self.evals.append(result)
        self.progress.message(f"final eval at version {final}: reward {result.reward:.3f}")

    async def _shutdown(self) -> None:
        tasks = [*self._tasks.values(), *([self._eval_task] if self._eval_task else [])]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self.a.buffer.close()
        if self.a.endpoint is not None:
            await self.a.endpoint.stop()
        await self.a.engines.stop()
        await asyncio.to_thread(self.a.learner.close)
        self.progress.close()
        if self.tracer is not None:
            self.tracer.close()  # closes the JSON array, also when the run failed
            trace.activate(None)
        self.metrics.close()
        self.groups_log.close()
        gc.unfreeze()

    # -- per step --------------------------------------------------------------------------------
    def on_step(self, rec: StepRecord) -> None:
        now = time.monotonic()
        if not self._token_marks:
            self._token_marks.append((self.started_at, 0))
        self._token_marks.append((now, self.a.engines.generated_tokens))
        (t0, n0), (t1, n1) = self._token_marks[0], self._token_marks[-1]
        self.staleness_max_observed = max(self.staleness_max_observed, rec.staleness_max)
        ledger = self.a.ledger.counts()
        line: dict[str, Any] = {
            "step": rec.step, "version": rec.version, "time_s": round(now - self.started_at, 4),
            "reward/mean": rec.reward_mean, "response_len/mean": rec.response_len_mean,
            **{f"reward/{k}": v for k, v in rec.reward_components.items()},
            "staleness/max": rec.staleness_max, "staleness/mean": rec.staleness_mean,
            "learner/wait_frac": self.a.learner.clock.lap(),
            "generator/wait_frac": self.a.generator.clock.lap(), "data/cursor": self.a.generator.cursor,
            "learner/train_s": rec.train_s,
            # whole batches ready behind this step: the data prefetch (an SFT run's is read, not generated)
            "data/prefetch_queue_depth": self.a.buffer.n_ready // self.a.buffer.groups_per_step,
            "buffer/groups": self.a.buffer.n_ready, "buffer/pending": self.a.buffer.n_pending,
            "buffer/capacity": self.a.buffer.capacity, "buffer/expired": self.a.buffer.expired,
            "buffer/carried": self.a.buffer.carried, "buffer/masked_tokens": self.a.buffer.masked_tokens,
            "buffer/served_version": self.a.buffer.served_version,
            "throughput/tokens_per_s": (n1 - n0) / max(t1 - t0, 1e-9),
            **{f"train/{k}": v for k, v in _struct_items(rec.stats) if k != "correction"},
            **{f"correction/{k}": v for k, v in rec.stats.correction.items()},
            "ledger/admitted": ledger.admitted, "ledger/trained": ledger.trained,
            "ledger/dropped": sum(ledger.dropped.values()), "ledger/in_flight": ledger.in_flight,
            "ledger/duplicates": ledger.duplicates,
            **{f"faults/{k}": v for k, v in self.a.rollout_counters().items()},
        }
        if self.a.broadcaster.records:
            last = self.a.broadcaster.records[-1]
            line |= {"sync/version": last.version, "sync/total_s": last.total_s, "sync/paused_s": last.paused_s}
        for ev in self._unreported:
            line |= {"eval/reward": ev.reward, "eval/version": ev.version, "eval/wall_s": ev.wall_s}
            line |= {f"eval/{name}": r for name, r in ev.sets.items() if name}  # --eval-prompt-data's sets
        self._unreported.clear()
        self._last_step_at = now
        self.metrics.write(line)
        trace.counter("buffer", ready=line["buffer/groups"], generating=line["buffer/pending"])
        self.groups_log.write(json.dumps({"step": rec.step, "groups": rec.group_ids}) + "\n")
        self.progress.update(line)
        if self.eval_interval and rec.version % self.eval_interval == 0:
            self._start_eval(rec.version)

    def _start_eval(self, version: int) -> None:
        if not self.a.evaluator.enabled:
            return
        if self._eval_task is not None and not self._eval_task.done():
            self.counters["evals_skipped_busy"] += 1
            return

        async def evaluate() -> None:
            result = await self.a.evaluator.evaluate(version)
            self.evals.append(result)
            self._unreported.append(result)

        self._eval_task = asyncio.create_task(evaluate(), name=f"eval-v{version}")
        self._eval_task.add_done_callback(self._eval_done)

    def _eval_done(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            # An evaluation failing is a bug (engine faults are absorbed below it), or every one of
            # its requests failed (RunFailed, one line): stop the run.
            exc = task.exception()
            self._failure = str(exc) if isinstance(exc, RunFailed) else _describe_end(task)
            self._tasks["learner"].cancel()

    # -- no hangs --------------------------------------------------------------------------------
    async def _watchdog(self) -> None:
        while True:
            await asyncio.sleep(min(5.0, self.stall_timeout_s / 4))
            idle = time.monotonic() - max(self._last_step_at, self.started_at)
            if idle > self.stall_timeout_s:
                path = self.run_dir / "stall_dump.txt"
                path.write_text(self.dump())
                self.counters["watchdog_trips"] += 1  # in summary.json's counters
                raise RunFailed(f"no learner step for {idle:.0f}s (--stall-timeout); what each actor "
                                f"was waiting on is in {path}")

    def dump(self) -> str:
        """What every actor and task is waiting on right now."""
        rows = [
            f"learner: version {self.a.learner.version}, waiting on {self.a.learner.clock.waiting_on}",
            f"generator: cursor {self.a.generator.cursor}, waiting on {self.a.generator.clock.waiting_on}",
            f"buffer: served v{self.a.buffer.served_version}, ready {self.a.buffer.n_ready}, "
            f"pending {self.a.buffer.n_pending}, admitted {self.a.buffer.admitted}, dropped {self.a.buffer.dropped}",
            f"engines: {self.a.engines.health()}, in flight: {self.a.engines.in_flight}",
            f"ledger: {self.a.ledger.counts()}", "", "tasks:",
        ]
        for t in asyncio.all_tasks():
            stack = "".join(traceback.format_stack(t.get_stack(limit=3)[-1])) if t.get_stack(limit=3) else ""
            rows.append(f"- {t.get_name()}: {stack.strip()}")
        return "\n".join(rows) + "\n"


def freeze_heap() -> None:
    """Exempt what exists now (modules, the model classes, the task: all live for the run) from
    the cyclic collector until ``gc.unfreeze()``. Without it a full collection walked some 370k
    objects every few seconds, holding the GIL ~0.2 s: the event loop stopped serving the engines
    and the learner stopped feeding the trainer (~2 ms a step on average, on the default recipe)."""
    gc.collect()
    gc.freeze()


def _struct_items(obj: Any) -> list[tuple[str, Any]]:
    return [(f, getattr(obj, f)) for f in obj.__struct_fields__]


def _describe_end(task: asyncio.Task[Any]) -> str:
    if task.cancelled():
        return f"actor {task.get_name()!r} was cancelled"
    exc = task.exception()
    if exc is None:
        return f"actor {task.get_name()!r} returned unexpectedly"
    if isinstance(exc, TrainerDied):  # a process killed from outside (OOM killer, kill -9): not a bug here
        return f"actor {task.get_name()!r} lost its trainer: {exc}"
    tb = "".join(traceback.format_exception(exc))
    return f"actor {task.get_name()!r} crashed:\n{tb}"
