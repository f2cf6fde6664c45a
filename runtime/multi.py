"""The multi-agent scheduler: owns every agent's actors, the episode driver, and the run's record.

Dataflow (local backend: each loop a named asyncio task; engines and trainers are subprocesses):

                      +--reserve_many(k_A)--> buffer A --get_batch--> learner-A --publish--> broadcaster-A --> engines A
    episode driver ---+--reserve_many(k_B)--> buffer B --get_batch--> learner-B --publish--> broadcaster-B --> engines B
      |  episode tasks: the user's function generates on engines A and B through handles,
      |  sets rewards, returns each agent's groups -> buffer A / buffer B (put or drop)

Bounds and who waits on whom:
- Admission, per agent: the driver starts an episode only when every training agent's buffer has
  room for its ``groups_per_episode`` groups under that agent's own rule, live < (v_A + s_A + 1)
  x G_A with v_A the version A's engines serve. Each agent's staleness bound therefore holds
  against its own version, whatever the other agents do. A frozen agent holds no slots.
- Each learner waits only for its own buffer; each broadcaster's mailbox holds one version and
  reaches only its own engines (separate engine sets: no call path from A's learner to B).
- Evaluations run ``eval_episodes`` episodes in evaluation mode (greedy, untrained) beside
  training, never holding a slot; at most one at a time, a trigger while one runs is skipped.
Engine health: one monitor task per engine set (``engine-health-NAME``), as in the single-agent run.
Completion: every trained agent's learner returning after its ``num_steps``. An agent that finishes
early is retired (served, untrained) while the others go on. Then every agent's final version is
synced, a final evaluation runs, each engine's reported weight version is recorded, and every
task is cancelled and every engine and trainer stopped. Any other task ending or raising ends the
run with its traceback; no learner step of any agent for --stall-timeout ends it with a dump.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import msgspec

from actors.episode_driver import EpisodeDriver, EpisodeEval
from actors.learner import StepRecord
from runtime.agents import Agent
from runtime.core import trace
from runtime.core.errors import RunFailed
from runtime.metrics import MetricsLog
from runtime.progress import Progress
from runtime.scheduler import _describe_end

log = logging.getLogger(__name__)


class MultiScheduler:
    def __init__(self, agents: Sequence[Agent], driver: EpisodeDriver, *, run_dir: Path, eval_interval: int,
                 eval_episodes: int, stall_timeout_s: float, progress: Progress, metrics: MetricsLog | None = None,
                 report_every_s: float = 10.0):
        self.agents = {a.name: a for a in agents}
        self.driver = driver
        self.run_dir = run_dir
        self.eval_interval, self.eval_episodes = eval_interval, eval_episodes
        self.stall_timeout_s = stall_timeout_s
        self.progress = progress
        self.metrics = metrics or MetricsLog(run_dir / "metrics.jsonl")
        self.report_every_s = report_every_s
        self.steps = 0  # learner steps, all agents
        self.evals: list[EpisodeEval] = []
        self.counters: collections.Counter[str] = collections.Counter()
        self.staleness_max: dict[str, int] = {a.name: 0 for a in agents}
        self.engine_versions: dict[str, list[str]] = {}  # each engine's reported weight version, at the end
        self.started_at = self._last_step_at = time.monotonic()
        self._last_report = -float("inf")
        self._eval_task: asyncio.Task[None] | None = None
        self._unreported: list[EpisodeEval] = []
        self._tasks: dict[str, asyncio.Task[Any]] = {}
        self._failure: str | None = None
        for a in agents:
            if a.learner is not None:
                a.learner.on_step = lambda rec, a=a: self.on_step(a, rec)

    # -- lifecycle -------------------------------------------------------------------------------
    async def run(self) -> None:
        try:
            with trace.span("scheduler", "start engines"):
                await asyncio.gather(*(a.engines.start() for a in self.agents.values()))
            self.started_at = self._last_step_at = time.monotonic()
            self._start_eval()
            coros: list[tuple[str, Any]] = [("episodes", self.driver.run()), ("watchdog", self._watchdog())]
            for a in self.agents.values():
                coros.append((f"engine-health-{a.name}", a.engines.monitor()))
                if a.learner is not None and a.broadcaster is not None:
                    coros += [(f"learner-{a.name}", a.learner.run()), (f"broadcaster-{a.name}", a.broadcaster.run())]
            self._tasks = {name: asyncio.create_task(c, name=name) for name, c in coros}
            learners = {f"learner-{a.name}": a for a in self.agents.values() if a.learner is not None}
            while learners:
                done, _ = await asyncio.wait(self._tasks.values(), return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    self._check_end(task, learners)
                    del self._tasks[task.get_name()]
                    agent = learners.pop(task.get_name())
                    await self.driver.retire(agent.name)
                    self.progress.message(f"agent {agent.name}: {agent.version} steps done")
            await self._finish()
        finally:
            await self._shutdown()

    def _check_end(self, task: asyncio.Task[Any], learners: dict[str, Agent]) -> None:
        """A learner returning is an agent's normal end; anything else ending ends the run."""
        if self._failure is not None:
            raise RunFailed(self._failure)
        if not task.cancelled() and isinstance(task.exception(), RunFailed):
            raise task.exception()  # already one clear line
        if task.get_name() not in learners or task.cancelled() or task.exception() is not None:
            raise RunFailed(_describe_end(task))

    async def _finish(self) -> None:
        with trace.span("scheduler", "final sync"):
            for a in self.agents.values():
                if a.broadcaster is not None:
                    await asyncio.wait_for(a.broadcaster.wait_served(a.version), a.broadcaster.timeout_s)
        if self._eval_task is not None:
            await self._eval_task
        if self.eval_episodes:
            result = await self.driver.evaluate(self.eval_episodes, step=self.steps)
            self.evals.append(result)
            self.progress.message(f"final eval: {_fmt(result.rewards)}")
        for name, a in self.agents.items():
            self.engine_versions[name] = await reported_versions(a.engines)

    async def _shutdown(self) -> None:
        tasks = [*self._tasks.values(), *([self._eval_task] if self._eval_task else [])]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for a in self.agents.values():
            if a.buffer is not None:
                await a.buffer.close()
        await asyncio.gather(*(a.engines.stop() for a in self.agents.values()), return_exceptions=True)
        for a in self.agents.values():
            if a.learner is not None:
                await asyncio.to_thread(a.learner.close)
        self.progress.close()
        self.metrics.close()

    # -- per step --------------------------------------------------------------------------------
    def on_step(self, agent: Agent, rec: StepRecord) -> None:
        now = time.monotonic()
        self.steps += 1
        self.staleness_max[agent.name] = max(self.staleness_max[agent.name], rec.staleness_max)
        p, buf, ledger = f"agent/{agent.name}/", agent.buffer, agent.ledger.counts()
        assert buf is not None and agent.learner is not None and agent.broadcaster is not None
        line: dict[str, Any] = {
            "step": self.steps, "agent": agent.name, "time_s": round(now - self.started_at, 4),
            **{f"agent/{a.name}/version": a.version for a in self.agents.values()},
            p + "step": rec.step, p + "reward/mean": rec.reward_mean, p + "response_len/mean": rec.response_len_mean,
            p + "staleness/max": rec.staleness_max, p + "staleness/mean": rec.staleness_mean,
            p + "max_staleness": agent.config.max_staleness, p + "learner/wait_frac": agent.learner.clock.lap(),
            p + "learner/train_s": rec.train_s, p + "buffer/groups": buf.n_ready, p + "buffer/pending": buf.n_pending,
            p + "buffer/served_version": buf.served_version,
            **{p + f"train/{k}": getattr(rec.stats, k) for k in rec.stats.__struct_fields__ if k != "correction"},
            p + "ledger/admitted": ledger.admitted, p + "ledger/trained": ledger.trained,
            p + "ledger/dropped": sum(ledger.dropped.values()), p + "ledger/in_flight": ledger.in_flight,
            "episodes/started": self.driver.started, "episodes/running": self.driver.in_flight,
            "episodes/wait_frac": self.driver.clock.lap(),
            **{f"episode/{k}": v for k, v in self.driver.take_figures().items()},
            **{f"faults/{k}": v for k, v in self.fault_counts().items()},
        }
        if agent.broadcaster.records:
            last = agent.broadcaster.records[-1]
            line |= {p + "sync/version": last.version, p + "sync/total_s": last.total_s}
        for ev in self._unreported:
            line |= {f"agent/{name}/eval/reward": r for name, r in ev.rewards.items()}
            line |= {f"eval/episode/{k}": v for k, v in ev.figures.items()}
            line |= {"eval/step": ev.step, "eval/errors": ev.errors, "eval/wall_s": ev.wall_s}
        self._unreported.clear()
        self._last_step_at = now
        self.metrics.write(line)
        if now - self._last_report >= self.report_every_s:
            self._last_report = now
            self.progress.message(self._report_line(now))
        if self.eval_interval and self.steps % self.eval_interval == 0:
            self._start_eval()

    def fault_counts(self) -> dict[str, int]:
        """Episode failures (``episode_errors``, ``episode_timeouts``, ...) and every agent's engine faults."""
        out = {k: v for k, v in self.driver.counters.items() if k != "episodes_completed"}
        out.setdefault("episode_errors", 0)
        for a in self.agents.values():
            for kind, n in a.counters().items():
                out[kind] = out.get(kind, 0) + n
        return out | dict(self.counters)

    def _report_line(self, now: float) -> str:
        parts = [f"{self.driver.started} episodes"]
        for a in self.agents.values():
            last = a.config.num_steps if a.trained else "frozen"
            parts.append(f"{a.name} v{a.version}/{last}")
        if self.evals:
            parts.append(f"eval {_fmt(self.evals[-1].rewards)}")
        errors = self.driver.counters["episode_errors"] + self.driver.counters["episode_timeouts"]
        if errors:
            parts.append(f"episode errors {errors}")
        return " | ".join(parts) + f" | {now - self.started_at:.0f}s"

    def _start_eval(self) -> None:
        if not self.eval_episodes:
            return
        if self._eval_task is not None and not self._eval_task.done():
            self.counters["evals_skipped_busy"] += 1
            return
        step = self.steps

        async def evaluate() -> None:
            result = await self.driver.evaluate(self.eval_episodes, step=step)
            self.evals.append(result)
            self._unreported.append(result)

        self._eval_task = asyncio.create_task(evaluate(), name=f"eval-{step}")
        self._eval_task.add_done_callback(self._eval_done)

    def _eval_done(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            self._failure = _describe_end(task)  # a bug: episode failures are counted below it
            self._tasks["watchdog"].cancel()  # wakes the supervisor

    # -- no hangs --------------------------------------------------------------------------------
    async def _watchdog(self) -> None:
        while True:
            await asyncio.sleep(min(5.0, self.stall_timeout_s / 4))
            idle = time.monotonic() - max(self._last_step_at, self.started_at)
            if idle > self.stall_timeout_s:
                path = self.run_dir / "stall_dump.txt"
                path.write_text(self.dump())
                raise RunFailed(f"no learner step of any agent for {idle:.0f}s (--stall-timeout); what each "
                                f"actor was waiting on is in {path}")

    def dump(self) -> str:
        """What every agent, the episode driver and every task is waiting on right now."""
        rows = [f"episodes: started {self.driver.started}, running {self.driver.in_flight}, "
                f"waiting on {self.driver.clock.waiting_on}, training {sorted(self.driver.training)}"]
        for a in self.agents.values():
            rows.append(f"agent {a.name}: version {a.version}, engines {a.engines.health()}")
            if a.learner is not None and a.buffer is not None:
                b = a.buffer
                rows.append(f"  learner waiting on {a.learner.clock.waiting_on}; buffer served v{b.served_version}, "
                            f"ready {b.n_ready}, pending {b.n_pending}, free {b.free_slots()}; "
                            f"ledger {a.ledger.counts()}")
        rows += ["", "tasks:"]
        for t in asyncio.all_tasks():
            stack = "".join(traceback.format_stack(t.get_stack(limit=3)[-1])) if t.get_stack(limit=3) else ""
            rows.append(f"- {t.get_name()}: {stack.strip()}")
        return "\n".join(rows) + "\n"

    # -- record ----------------------------------------------------------------------------------
    def summary(self, *, status: str, error: str = "") -> dict[str, Any]:
        """``summary.json``: the run's outcome, with a section per agent."""
        agents = {}
        for name, a in self.agents.items():
            ledger = a.ledger.counts()
            evals = [ev.rewards[name] for ev in self.evals if name in ev.rewards]
            syncs = a.broadcaster.records if a.broadcaster is not None else []
            agents[name] = {
                "frozen": not a.trained, "version": a.version, "max_staleness": a.config.max_staleness,
                "staleness_max_observed": self.staleness_max[name],
                "first_eval_reward": evals[0] if evals else None, "final_eval_reward": evals[-1] if evals else None,
                "ledger": {"admitted": ledger.admitted, "trained": ledger.trained, "dropped": ledger.dropped,
                           "in_flight": ledger.in_flight, "duplicates": ledger.duplicates},
                "weight_syncs": len(syncs), "engine_versions": self.engine_versions.get(name),
                "counters": a.counters(),
            }
        return {
            "status": status, "error": error, "steps": self.steps, "wall_s": time.monotonic() - self.started_at,
            "episodes": {"started": self.driver.started, **self.driver.counters},
            "agents": agents, "evals": [msgspec.to_builtins(ev) for ev in self.evals],
            "counters": self.fault_counts(),
        }


async def reported_versions(engines: Any) -> list[str]:
    """The weight version each serving engine of ``engines`` reports (its /model_info)."""
    clients = [s.client for s in engines.serving() if s.client is not None]
    return list(await asyncio.gather(*(c.get_weight_version() for c in clients)))


def _fmt(rewards: dict[str, float]) -> str:
    return ", ".join(f"{name} {r:.3f}" for name, r in rewards.items())
