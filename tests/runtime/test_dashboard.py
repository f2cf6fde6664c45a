"""The terminal display: the rich dashboard's content, and plain lines off a terminal."""

from __future__ import annotations

import io

import pytest

from runtime.metrics import fault_counts
from runtime.progress import Progress

LINE = {"step": 3, "version": 3, "reward/mean": 0.25, "staleness/max": 1, "staleness/mean": 0.5,
        "buffer/groups": 4, "buffer/pending": 12, "buffer/capacity": 32, "buffer/served_version": 2,
        "learner/wait_frac": 0.1, "generator/wait_frac": 0.4, "throughput/tokens_per_s": 2500.0,
        "sync/version": 3, "sync/total_s": 0.02, "sync/paused_s": 0.01, "eval/reward": 0.5, "eval/version": 2,
        "faults/resumed_after_abort": 7, "faults/engine_restarts": 1, "faults/engine_failures": 1}


def test_routine_counters_are_not_faults():
    assert fault_counts(LINE) == {"engine_restarts": 1, "engine_failures": 1}


def test_plain_lines_off_a_terminal_carry_the_numbers():
    out = io.StringIO()
    p = Progress(total_steps=3, stream=out)  # auto: a StringIO is not a terminal
    assert p.mode == "lines"
    p.update(LINE)
    text = out.getvalue()
    assert "step 3/3" in text and "eval 0.500" in text and "2500 tok/s" in text and "faults 2" in text


def test_the_dashboard_shows_progress_health_and_queues():
    pytest.importorskip("rich", reason="rich is not installed")
    out = io.StringIO()
    p = Progress(total_steps=10, mode="rich", stream=out)
    p._dashboard.console.width = 120
    p.update(LINE)
    p.message("final eval at version 10: reward 0.9")
    p.close()
    text = out.getvalue()
    for needle in ("step 3/10", "0.250", "0.500 at v2", "max 1", "ready 4", "generating 12", "capacity 32",
                   "learner", "40%", "2,500 tokens/s", "engine_failures 1", "engine_restarts 1", "final eval"):
        assert needle in text, needle
    assert "resumed_after_abort" not in text
