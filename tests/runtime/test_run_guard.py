"""RunGuard's signal rule, in process: one request to stop delivered twice is one request; a second
request after that is the user insisting, and forces the exit. (The real signals, the forced exit and
the graceful one are tests/integration/test_bad_inputs.py's.)"""

from __future__ import annotations

import signal

from runtime import run_guard


def recording_guard(monkeypatch) -> tuple[run_guard.RunGuard, list[str]]:
    guard = run_guard.RunGuard(stall_timeout_s=600.0)
    forced: list[str] = []
    monkeypatch.setattr(guard, "force", lambda status, line, *, code: forced.append(f"{code} {line}"))
    return guard, forced


def test_the_same_signal_delivered_twice_at_once_is_one_request(monkeypatch):
    guard, forced = recording_guard(monkeypatch)
    guard._on_signal(signal.SIGTERM, None)  # GNU timeout: to the command...
    guard._on_signal(signal.SIGTERM, None)  # ...then to its process group, microseconds later
    assert guard.signum == signal.SIGTERM and forced == []


def test_a_second_signal_later_forces_the_exit(monkeypatch):
    guard, forced = recording_guard(monkeypatch)
    guard._on_signal(signal.SIGINT, None)
    guard._signalled_at -= run_guard.SIGNAL_REPEAT_S + 0.5  # Ctrl-C pressed again, later
    guard._on_signal(signal.SIGINT, None)
    assert forced == ["130 interrupted (SIGINT, a second time): forced exit"]
