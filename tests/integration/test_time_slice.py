"""Colocated runs are time-sliced (runtime/time_slice.py): the engines release their KV memory for
every learner step and resume after it; a whole local run shows it in the engine's own log."""

from __future__ import annotations

import json
import re

from tests.integration.runs import GROUPS_PER_STEP, Backend, engines_of, launch


def test_a_colocated_run_releases_engine_memory_around_every_step(tmp_path):
    run_dir = tmp_path / "coloc"
    proc = launch(run_dir, Backend("local"), "--colocate", "--max-staleness", "1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["steps"] == 10
    assert summary["staleness_max_observed"] <= 1 and summary["engine_restarts"] == []  # paused, not "hung"
    ledger = summary["ledger"]
    assert ledger["trained"] == 10 * GROUPS_PER_STEP and ledger["duplicates"] == 0
    assert ledger["admitted"] == ledger["trained"] + sum(ledger["dropped"].values()) + ledger["in_flight"]
    # the engine's order of events: a release before each step, then the load of the version it made
    events = []
    for line in (run_dir / "logs" / "engine0.log").read_text().splitlines():
        if "memory released" in line:
            events.append("release")
        elif m := re.search(r"loaded weights from .* \(version (\d+)\)", line):
            events.append(f"v{m[1]}")
    assert events == [e for v in range(1, 11) for e in ("release", f"v{v}")], events
    assert not engines_of(run_dir)
