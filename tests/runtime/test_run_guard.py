"""RunGuard's signal rule, in process: one request to stop delivered twice is one request; a second
request after that is the user insisting, and forces the exit. (The real signals, the forced exit and
the graceful one are tests/integration/test_bad_inputs.py's.)"""

from __future__ import annotations

import signal

from runtime import run_guard


def guard_with_clock(monkeypatch) -> tuple[run_guard.RunGuard, list[str], list[float]]:
    now = [100.0]
    monkeypatch.setattr(run_guard.time, "monotonic", lambda: now[0])
    guard = run_guard.RunGuard(stall_timeout_s=600.0)
    forced: list[str] = []
    monkeypatch.setattr(guard, "force", lambda status, line, *, code: forced.append(f"{code} {line}"))
    return guard, forced, now


def test_the_same_signal_delivered_twice_at_once_is_one_request(monkeypatch):
    guard, forced, now = guard_with_clock(monkeypatch)
    guard._on_signal(signal.SIGTERM, None)  # GNU timeout: to the command...
    now[0] += 0.001
    guard._on_signal(signal.SIGTERM, None)  # ...then to its process group
    assert guard.signum == signal.SIGTERM and forced == []


def test_a_second_signal_later_forces_the_exit(monkeypatch):
    guard, forced, now = guard_with_clock(monkeypatch)
    guard._on_signal(signal.SIGINT, None)
    now[0] += run_guard.SIGNAL_REPEAT_S + 0.5  # Ctrl-C pressed again
    guard._on_signal(signal.SIGINT, None)
    assert forced == ["130 interrupted (SIGINT, a second time): forced exit"]
