"""``summary.json``: the run's outcome in the keys other tools and tests rely on.

The run's keys (``status``, ``error``, ``steps``, ``wall_s``, ``evals``, ``counters``) and each
agent's (``version``, ``ledger``, ``first_eval_reward``, ``final_eval_reward``,
``staleness_max_observed``, ``weight_sync``, ``engine_restarts``, ...): at the top level for a run
of one agent, under ``agents.NAME`` for a run of several.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # (typing only: the scheduler is what is summarised)
    from runtime.agents import Agent
    from runtime.scheduler import Scheduler


def summarize(s: Scheduler, *, status: str, error: str = "") -> dict[str, Any]:
    produced = s.producer.summary()
    out: dict[str, Any] = {
        "status": status, "error": error, "steps": s.steps, "wall_s": time.monotonic() - s.started_at,
        "evals": [r.record for r in sorted(s.evals, key=lambda r: r.step)],
        "counters": s.lines.fault_counts(s.own_counters()) | produced.pop("counters", {}),
        **produced,
    }
    agents = {name: agent_summary(s, a) for name, a in s.agents.items()}
    if s.lines.several:
        return out | {"agents": agents}
    (agent,) = agents.values()
    del agent["counters"]  # the run's counters (above) already hold its one agent's
    return out | agent


def agent_summary(s: Scheduler, a: Agent) -> dict[str, Any]:
    ledger = a.ledger.counts()
    evals = [r.rewards[a.name] for r in sorted(s.evals, key=lambda r: r.step) if a.name in r.rewards]
    return {
        "frozen": not a.trained, "version": a.version, "max_staleness": a.config.max_staleness,
        "staleness_max_observed": s.lines.staleness_max[a.name],
        "first_eval_reward": evals[0] if evals else None, "final_eval_reward": evals[-1] if evals else None,
        "ledger": {"admitted": ledger.admitted, "trained": ledger.trained, "dropped": ledger.dropped,
                   "in_flight": ledger.in_flight, "duplicates": ledger.duplicates},
        "counters": a.counters(),
        "engine_versions": s.engine_versions.get(a.name),
        "engine_restarts": [
            {"engine": r.engine, "reason": r.reason, "recovery_s": r.recovery_s, "refit_version": r.refit_version,
             "first_version": r.first_version, "current_at_first": r.current_at_first}
            for r in getattr(a.engines, "restart_records", [])
        ],
        "weight_syncs": a.broadcaster.synced if a.broadcaster is not None else 0,
        "weight_sync": weight_sync(a),
    }


def weight_sync(a: Agent) -> dict[str, Any]:
    b, c = a.broadcaster, getattr(a.engines, "collective", None)
    if b is None:
        return {"count": 0}
    return {
        "count": b.synced,
        "mean_s": b.total_s / b.synced if b.synced else None,
        "mean_paused_s": b.paused_s / b.synced if b.synced else None,
        "transport": c.backend if c else "shm",
        "regroups": c.regroups if c else 0,
        # the collective's parts (no pause, no regroup): the trainer's sends, and until every
        # engine has loaded them (a pause-less swap waits for a decode step to end, generating)
        "mean_broadcast_s": c.broadcast_s / c.sends if c and c.sends else None,
        "mean_transfer_s": c.send_s / c.sends if c and c.sends else None,
        "bytes": sum(m.nbytes for m in c.plan) if c else None,
    }
