"""A metrics line per learner step: the union of what each actor reports, one schema for any run.

Each actor reports a typed record (``Learner.stats()``, ``StalenessBuffer.stats()``,
``WeightBroadcaster.stats()``, ``Generator.stats()``, the ledger's ``counts()``, the trainer's
``StepStats``); a line is their union under fixed prefixes, never a reach into an actor's fields.
Every agent's keys (``reward/mean``, ``learner/wait_frac``, ``buffer/*``, ``ledger/*``, ``train/*``,
``correction/*``, ``sync/*``, ``throughput/tokens_per_s``) carry ``agent/NAME/`` when the run has
several agents, and stand bare when it has one; the producer's keys (``generator/wait_frac`` and
``data/cursor``, or ``episodes/*``), ``faults/*`` and evaluations (``eval/*``) are the run's.
The keys other tools rely on are listed in ``runtime/metrics.py``.
"""

from __future__ import annotations

import collections
import dataclasses
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from actors.learner import StepRecord

if TYPE_CHECKING:  # (typing only: the scheduler imports this module)
    from runtime.agents import Agent

THROUGHPUT_WINDOW = 10  # steps


@dataclasses.dataclass
class EvalReport:
    """One evaluation, as the scheduler records it."""

    step: int  # learner steps (all agents) when it was asked for
    rewards: dict[str, float]  # each evaluated agent's mean reward
    line: dict[str, Any]  # its keys on the next metrics line
    record: dict[str, Any]  # the evaluator's own record, for summary.json's "evals"
    text: str  # one line for the progress output

    def describe(self) -> str:
        return self.text


class Lines:
    def __init__(self, agents: Mapping[str, Agent], producer: Any):
        self.agents = agents
        self.producer = producer
        self.several = len(agents) > 1
        self.staleness_max: dict[str, int] = {name: 0 for name in agents}
        # (time, engine tokens) at an agent's recent steps: throughput over a window, since
        # answers arrive in bursts and one step's share would read 0 or double
        self._marks: dict[str, collections.deque[tuple[float, int]]] = {
            name: collections.deque(maxlen=THROUGHPUT_WINDOW) for name in agents}
        self._started = time.monotonic()

    def prefix(self, agent: Agent) -> str:
        return f"agent/{agent.name}/" if self.several else ""

    def step(self, agent: Agent, rec: StepRecord, *, step: int, time_s: float) -> dict[str, Any]:
        self.staleness_max[agent.name] = max(self.staleness_max[agent.name], rec.staleness_max)
        line: dict[str, Any] = {"step": step, "time_s": round(time_s, 4)}
        if self.several:
            line["agent"] = agent.name
            line |= {f"agent/{a.name}/version": a.version for a in self.agents.values()}
        else:
            line["version"] = rec.version
        p = self.prefix(agent)
        line |= {p + k: v for k, v in self.agent_keys(agent, rec).items()}
        return line | self.producer.line()

    def agent_keys(self, agent: Agent, rec: StepRecord) -> dict[str, Any]:
        assert agent.learner is not None and agent.buffer is not None and agent.broadcaster is not None
        ledger = agent.ledger.counts()
        keys: dict[str, Any] = {
            **({"step": rec.step} if self.several else {}),
            "reward/mean": rec.reward_mean, "response_len/mean": rec.response_len_mean,
            **{f"reward/{k}": v for k, v in rec.reward_components.items()},
            "staleness/max": rec.staleness_max, "staleness/mean": rec.staleness_mean,
            "max_staleness": agent.config.max_staleness,
            **{f"learner/{k}": v for k, v in _items(agent.learner.stats())}, "learner/train_s": rec.train_s,
            # whole batches ready behind this step: the data prefetch (an SFT run's is read, not generated)
            "data/prefetch_queue_depth": agent.buffer.n_ready // agent.buffer.groups_per_step,
            **{f"buffer/{k}": v for k, v in _items(agent.buffer.stats())},
            "throughput/tokens_per_s": self._throughput(agent),
            **{f"train/{k}": v for k, v in _items(rec.stats) if k != "correction"},
            **{f"correction/{k}": v for k, v in rec.stats.correction.items()},
            "ledger/admitted": ledger.admitted, "ledger/trained": ledger.trained,
            "ledger/dropped": sum(ledger.dropped.values()), "ledger/in_flight": ledger.in_flight,
            "ledger/duplicates": ledger.duplicates,
        }
        sync = agent.broadcaster.stats()
        if sync is not None:
            keys |= {f"sync/{k}": v for k, v in _items(sync)}
        return keys

    def _throughput(self, agent: Agent) -> float:
        marks, now = self._marks[agent.name], time.monotonic()
        if not marks:
            marks.append((self._started, 0))
        marks.append((now, getattr(agent.engines, "generated_tokens", 0)))
        (t0, n0), (t1, n1) = marks[0], marks[-1]
        return (n1 - n0) / max(t1 - t0, 1e-9)

    def fault_counts(self, extra: Mapping[str, int]) -> dict[str, int]:
        """The producer's and every agent's fault counts, plus the scheduler's own."""
        out: collections.Counter[str] = collections.Counter(self.producer.counters())
        for a in self.agents.values():
            out.update(a.counters())
        out.update(extra)
        return dict(out)

    def faults(self, extra: Mapping[str, int]) -> dict[str, int]:
        return {f"faults/{k}": v for k, v in self.fault_counts(extra).items()}

    def report(self, evals: list[EvalReport], time_s: float) -> str:
        """A multi-agent run's progress line (the dashboard and bar show one agent)."""
        parts = [f"{a.name} v{a.version}/{a.config.num_steps if a.trained else 'frozen'}" for a in self.agents.values()]
        if evals:
            parts.append(f"eval {evals[-1].describe()}")
        faults = sum(v for k, v in self.fault_counts({}).items() if k.startswith("episode_"))
        if faults:
            parts.append(f"episode errors {faults}")
        return " | ".join(parts) + f" | {time_s:.0f}s"


def _items(obj: Any) -> list[tuple[str, Any]]:
    return [(f, getattr(obj, f)) for f in obj.__struct_fields__]
