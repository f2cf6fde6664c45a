"""``summary.json``: the run's outcome in the keys other tools and tests rely on."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import msgspec

if TYPE_CHECKING:
    from runtime.scheduler import Scheduler


def summarize(s: Scheduler, *, status: str, error: str = "") -> dict[str, Any]:
    a = s.a
    ledger = a.ledger.counts()
    evals = sorted(s.evals, key=lambda e: e.version)
    syncs = a.broadcaster
    counters = a.rollout_counters() | dict(s.counters) | dict(a.generator.expired) | dict(a.generator.filtered)
    if a.buffer.mask_stale:
        counters |= {"carried": a.buffer.carried, "masked_tokens": a.buffer.masked_tokens}
    return {
        "status": status,
        "error": error,
        "steps": a.learner.version,
        "wall_s": time.monotonic() - s.started_at,
        "first_eval_reward": evals[0].reward if evals else None,
        "final_eval_reward": evals[-1].reward if evals else None,
        "evals": [msgspec.to_builtins(e) for e in evals],
        "staleness_max_observed": s.staleness_max_observed,
        "ledger": {
            "admitted": ledger.admitted, "trained": ledger.trained, "dropped": ledger.dropped,
            "in_flight": ledger.in_flight, "duplicates": ledger.duplicates,
        },
        "counters": counters,
        "engine_restarts": [
            {"engine": r.engine, "reason": r.reason, "recovery_s": r.recovery_s, "refit_version": r.refit_version,
             "first_version": r.first_version, "current_at_first": r.current_at_first}
            for r in a.engines.restart_records
        ],
        "weight_sync": {
            "count": syncs.synced,
            "mean_s": syncs.total_s / syncs.synced if syncs.synced else None,
            "mean_paused_s": syncs.paused_s / syncs.synced if syncs.synced else None,
            "transport": a.engines.collective.backend if a.engines.collective else "shm",
            "regroups": a.engines.collective.regroups if a.engines.collective else 0,
            # the collective's parts (no pause, no regroup): the trainer's sends, and until every
            # engine has loaded them (a pause-less swap waits for a decode step to end, generating)
            "mean_broadcast_s": (a.engines.collective.broadcast_s / a.engines.collective.sends
                                 if a.engines.collective and a.engines.collective.sends else None),
            "mean_transfer_s": (a.engines.collective.send_s / a.engines.collective.sends
                                if a.engines.collective and a.engines.collective.sends else None),
            "bytes": sum(m.nbytes for m in a.engines.collective.plan) if a.engines.collective else None,
        },
    }
