"""The scheduler: owns every actor's lifetime, the run's completion, its failure and its record.

One scheduler for every run: a run is one agent or several (runtime/agents.py), fed by one
producer — the generator (one agent, prompts from the recipe or a file) or the episode driver
(several agents, a user's episode function). Dataflow, per agent (local backend: each loop a
named asyncio task in this process; engines and trainers are subprocesses reached over HTTP and a
socket):

    prompts -> producer --reserve()--> StalenessBuffer --get_batch(v)--> Learner
                  |  ^      waits: admission          waits: EDF batch     |  step on a thread
         /generate|  |abort answers are resumed                            | publish(v+1, weights)
                  v  |                                                     v
               Engines <--- pause -> update -> continue --- WeightBroadcaster
                                                                |
                          buffer.set_served_version(v+1) <------+  (wakes admission)

Bounds and who waits on whom:
- Admission, per agent: live groups < (served_version + max_staleness + 1) * groups_per_step and
  untrained groups < the buffer's capacity (``StalenessBuffer``, the one place the bound is
  written). The producer waits there and nowhere else; a buffer can therefore never overflow.
  The episode driver admits an episode only when every training agent has room for its share.
- Each learner waits for its own earliest-deadline batch; it never waits on a broadcaster.
- A broadcaster's mailbox holds one version (newest wins), so a slow sync skips versions instead
  of queueing them; each sync is bounded by --weight-sync-timeout.
- An evaluation is a task of its own on the same engines, outside admission: it never stalls
  training. At most one runs at a time; a trigger while one runs is skipped and counted.
Engine health: one monitor task per engine set probes every engine and restarts failed ones
(refit to the current version before they serve); requests lost with an engine are re-sent by
the rollout (failover). A spent restart budget ends the run with one line.
Completion: every trained agent's learner returning after its ``num_steps`` (an agent that
finishes early is retired: served, untrained, while the others go on). Then every final version
is synced and evaluated, every task is cancelled and every engine and trainer stopped. Any other
task ending (it never should) or raising ends the run with that task's traceback; no learner step
for --stall-timeout ends it with a dump of what every actor was waiting on.

The record: one ``metrics.jsonl`` line per learner step (an agent's keys carry ``agent/NAME/``
when the run has several; ``runtime/step_line.py``), ``groups.jsonl`` (which groups each step
trained: the exactly-once record), ``summary.json`` (``runtime/summary.py``).
"""

from __future__ import annotations

import asyncio
import collections
import gc
import json
import logging
import time
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

from actors.learner import StepRecord
from policies.trainer_process import TrainerDied
from runtime import step_line
from runtime.agents import Agent
from runtime.chaos import Chaos
from runtime.core import trace
from runtime.core.errors import RunFailed
from runtime.core.failures import FailureBudget
from runtime.metrics import MetricsLog
from runtime.progress import Progress

log = logging.getLogger(__name__)

__all__ = ["Evaluation", "Producer", "RunFailed", "Scheduler"]

REPORT_EVERY_S = 10.0  # a multi-agent run's progress line


class Producer(Protocol):
    """What feeds the agents' buffers: ``runtime.producers.PromptFeed`` or ``EpisodeFeed``."""

    async def start(self) -> None: ...  # after the engines: what it serves beside them (an endpoint)
    async def run(self) -> None: ...  # admits and generates until cancelled
    async def stop(self) -> None: ...
    async def retire(self, name: str) -> None: ...  # ``name``'s learner is done
    def line(self) -> dict[str, Any]: ...  # its keys on a metrics line
    def counters(self) -> dict[str, int]: ...  # its fault counts
    def dump(self) -> str: ...  # what it is waiting on (the stall watchdog's dump)
    def summary(self) -> dict[str, Any]: ...  # its part of summary.json


class Evaluation(Protocol):
    """Held-out evaluation: ``runtime.producers.HeldOut`` or ``EpisodeEvals``."""

    enabled: bool

    async def evaluate(self, step: int) -> step_line.EvalReport: ...


class Scheduler:
    def __init__(self, agents: Sequence[Agent], producer: Producer, evaluation: Evaluation, *, run_dir: Path,
                 eval_interval: int, stall_timeout_s: float, progress: Progress, metrics: MetricsLog | None = None,
                 tracer: trace.Tracer | None = None, chaos: Sequence[Chaos] = (), budget: FailureBudget | None = None):
        self.agents = {a.name: a for a in agents}
        self.producer, self.evaluation = producer, evaluation
        self.run_dir = run_dir
        self.eval_interval = eval_interval
        self.stall_timeout_s = stall_timeout_s
        self.progress = progress
        self.metrics = metrics or MetricsLog(run_dir / "metrics.jsonl")
        self.tracer = tracer  # trace.json; None: not traced
        self.chaos = [c for c in chaos if c.enabled]
        self.budget = budget  # repeated failures of one cause (engine, reward) that end the run
        self.lines = step_line.Lines(self.agents, producer)
        if tracer is not None:
            tracer.version_of = lambda: sum(a.version for a in self.agents.values())
        # which groups each step trained: the exactly-once record across a kill and resume
        self.groups_log = open(run_dir / "groups.jsonl", "a", buffering=1)
        self.steps = sum(a.version for a in agents)  # learner steps, all agents (a resumed run's too)
        self.evals: list[step_line.EvalReport] = []
        self.counters: collections.Counter[str] = collections.Counter()
        self.engine_versions: dict[str, list[str]] = {}  # each engine's reported weight version, at the end
        self.started_at = time.monotonic()
        self._last_step_at = self.started_at
        self._last_report = -float("inf")
        self._eval_task: asyncio.Task[None] | None = None
        self._unreported: list[step_line.EvalReport] = []
        self._tasks: dict[str, asyncio.Task[Any]] = {}
        self._failure: str | None = None
        for a in agents:
            if a.learner is not None:
                a.learner.on_step = lambda rec, a=a: self.on_step(a, rec)

    @property
    def agent(self) -> Agent:
        """The agent of a one-agent run."""
        (agent,) = self.agents.values()
        return agent

    @property
    def trained(self) -> list[Agent]:
        return [a for a in self.agents.values() if a.learner is not None]

    # -- lifecycle -------------------------------------------------------------------------------
    async def run(self) -> None:
        trace.activate(self.tracer)  # every actor task created below inherits it
        try:
            with trace.span("scheduler", "start engines"):
                await asyncio.gather(*(a.engines.start() for a in self.agents.values()))
            await self.producer.start()
            freeze_heap()
            self.started_at = self._last_step_at = time.monotonic()
            self._start_eval()
            self._tasks = {name: asyncio.create_task(coro, name=name) for name, coro in self._loops()}
            learners = {_task_name("learner", a.name, self.lines.several): a for a in self.trained}
            while learners:
                done, _ = await asyncio.wait(self._tasks.values(), return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    self._check_end(task, learners)
                    del self._tasks[task.get_name()]
                    agent = learners.pop(task.get_name())
                    await self.producer.retire(agent.name)
                    if self.lines.several:
                        self.progress.message(f"agent {agent.name}: {agent.version} steps done")
            await self._finish()
        finally:
            await self._shutdown()

    def _loops(self) -> list[tuple[str, Any]]:
        several = self.lines.several
        loops: list[tuple[str, Any]] = [("producer", self.producer.run()), ("watchdog", self._watchdog())]
        for a in self.agents.values():
            loops.append((_task_name("engine-health", a.name, several), a.engines.monitor()))
            if a.learner is not None and a.broadcaster is not None:
                loops += [(_task_name("learner", a.name, several), a.learner.run()),
                          (_task_name("broadcaster", a.name, several), a.broadcaster.run())]
        loops += [(f"chaos-{i}", c.run()) for i, c in enumerate(self.chaos)]
        if self.budget is not None:
            loops.append(("failure-budget", self.budget.wait()))
        return loops

    def _check_end(self, task: asyncio.Task[Any], learners: dict[str, Agent]) -> None:
        """A learner returning is its agent's normal end; anything else ending ends the run."""
        if self._failure is not None:
            raise RunFailed(self._failure)
        if not task.cancelled() and isinstance(task.exception(), RunFailed):
            raise task.exception()  # already one clear line (the watchdog's, the engines')
        if task.get_name() not in learners or task.cancelled() or task.exception() is not None:
            raise RunFailed(_describe_end(task))

    async def _finish(self) -> None:
        with trace.span("scheduler", "final sync"):
            for a in self.trained:
                assert a.broadcaster is not None
                await asyncio.wait_for(a.broadcaster.wait_served(a.version), a.broadcaster.timeout_s)
        if self._eval_task is not None:
            await self._eval_task
        if self.evaluation.enabled:
            report = await self.evaluation.evaluate(self.steps)
            self.evals.append(report)
            self.progress.message(f"final eval: {report.describe()}")
        for name, a in self.agents.items():
            self.engine_versions[name] = await reported_versions(a.engines)

    async def _shutdown(self) -> None:
        tasks = [*self._tasks.values(), *([self._eval_task] if self._eval_task else [])]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for a in self.trained:
            assert a.buffer is not None
            await a.buffer.close()
        await self.producer.stop()
        await asyncio.gather(*(a.engines.stop() for a in self.agents.values()), return_exceptions=True)
        for a in self.trained:
            assert a.learner is not None
            await asyncio.to_thread(a.learner.close)
        self.progress.close()
        if self.tracer is not None:
            self.tracer.close()  # closes the JSON array, also when the run failed
            trace.activate(None)
        self.metrics.close()
        self.groups_log.close()
        gc.unfreeze()

    # -- per step --------------------------------------------------------------------------------
    def on_step(self, agent: Agent, rec: StepRecord) -> None:
        now = time.monotonic()
        self.steps += 1
        line = self.lines.step(agent, rec, step=self.steps, time_s=now - self.started_at)
        line |= self.lines.faults(self.own_counters())
        for report in self._unreported:
            line |= report.line
        self._unreported.clear()
        self._last_step_at = now
        self.metrics.write(line)
        if agent.buffer is not None:
            trace.counter("buffer", ready=agent.buffer.n_ready, generating=agent.buffer.n_pending)
        entry = {"step": rec.step, "groups": rec.group_ids} | ({"agent": agent.name} if self.lines.several else {})
        self.groups_log.write(json.dumps(entry) + "\n")
        if not self.lines.several:
            self.progress.update(line)
        elif now - self._last_report >= REPORT_EVERY_S:
            self._last_report = now
            self.progress.message(self.lines.report(self.evals, now - self.started_at))
        if self.eval_interval and self.steps % self.eval_interval == 0:
            self._start_eval()

    def own_counters(self) -> collections.Counter[str]:
        """The scheduler's counts (watchdog trips, skipped evaluations) and its chaos monkeys'."""
        out = collections.Counter(self.counters)
        for c in self.chaos:
            out.update(c.counters)
        return out

    def _start_eval(self) -> None:
        if not self.evaluation.enabled:
            return
        if self._eval_task is not None and not self._eval_task.done():
            self.counters["evals_skipped_busy"] += 1
            return
        step = self.steps

        async def evaluate() -> None:
            report = await self.evaluation.evaluate(step)
            self.evals.append(report)
            self._unreported.append(report)

        self._eval_task = asyncio.create_task(evaluate(), name=f"eval-{step}")
        self._eval_task.add_done_callback(self._eval_done)

    def _eval_done(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            # An evaluation failing is a bug (engine and episode faults are counted below it), or
            # every one of its requests failed (RunFailed, one line): stop the run.
            exc = task.exception()
            self._failure = str(exc) if isinstance(exc, RunFailed) else _describe_end(task)
            self._tasks["watchdog"].cancel()  # wakes the supervisor

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
        """What the producer, every agent's actors and every task are waiting on right now."""
        rows = [self.producer.dump()]
        for a in self.agents.values():
            pad = "  " if self.lines.several else ""
            if self.lines.several:
                rows.append(f"agent {a.name}:")
            if a.learner is not None and a.buffer is not None:
                b = a.buffer
                rows += [f"{pad}learner: version {a.version}, waiting on {a.learner.clock.waiting_on}",
                         f"{pad}buffer: served v{b.served_version}, ready {b.n_ready}, pending {b.n_pending}, "
                         f"admitted {b.admitted}, dropped {b.dropped}"]
            rows += [f"{pad}engines: {a.engines.health()}, in flight: {getattr(a.engines, 'in_flight', '?')}",
                     f"{pad}ledger: {a.ledger.counts()}"]
        rows += ["", "tasks:"]
        for t in asyncio.all_tasks():
            stack = "".join(traceback.format_stack(t.get_stack(limit=3)[-1])) if t.get_stack(limit=3) else ""
            rows.append(f"- {t.get_name()}: {stack.strip()}")
        return "\n".join(rows) + "\n"


async def reported_versions(engines: Any) -> list[str]:
    """The weight version each serving engine of ``engines`` reports (its /model_info)."""
    clients = [s.client for s in engines.serving() if s.client is not None]
    return list(await asyncio.gather(*(c.get_weight_version() for c in clients)))


def freeze_heap() -> None:
    """Exempt what exists now (modules, the model classes, the task: all live for the run) from
    the cyclic collector until ``gc.unfreeze()``. Without it a full collection walked some 370k
    objects every few seconds, holding the GIL ~0.2 s: the event loop stopped serving the engines
    and the learner stopped feeding the trainer (~2 ms a step on average, on the default recipe)."""
    gc.collect()
    gc.freeze()


def _task_name(kind: str, agent: str, several: bool) -> str:
    return f"{kind}-{agent}" if several else kind


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
