"""Measured waiting: each actor owns a ``WaitClock`` and wraps its blocking awaits in it.

``wait_frac`` is the share of wall time since the last ``lap()`` spent inside ``waiting()``
blocks, which is how "rollout never blocks training" becomes a number (DESIGN.md, invariant 7).
The clock also remembers what its owner is waiting on right now, for the stall dump, and puts
each wait on the run's timeline as a ``wait <what>`` span on its owner's track (``runtime.core.trace``).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator

from runtime.core import trace


class WaitClock:
    def __init__(self, owner: str):
        self.owner = owner
        self.total_s = 0.0
        self._depth = 0
        self._since: float | None = None
        self._lap_start = time.monotonic()
        self._lap_wait_start = 0.0
        self.waiting_on: str | None = None
        self._span: trace.Span | trace.NoSpan = trace.OFF  # the open wait on the run's timeline

    @contextlib.contextmanager
    def waiting(self, what: str) -> Iterator[None]:
        """Count the enclosed time as waiting (nested or concurrent blocks count once)."""
        previous = self.waiting_on
        self.enter(what)
        try:
            yield
        finally:
            self.exit()
            self.waiting_on = previous

    def enter(self, what: str) -> None:
        """Start waiting on ``what`` (pair with ``exit``; for waits that are not one block)."""
        if self._depth == 0:
            self._since = time.monotonic()
            self._span = trace.span(self.owner, f"wait {what}").__enter__()
        self._depth += 1
        self.waiting_on = what

    def exit(self) -> None:
        self._depth -= 1
        if self._depth == 0 and self._since is not None:
            self.total_s += time.monotonic() - self._since
            self._since = None
            self.waiting_on = None
            self._span.__exit__(None, None, None)

    def _now_total(self) -> float:
        open_s = time.monotonic() - self._since if self._since is not None else 0.0
        return self.total_s + open_s

    def lap(self) -> float:
        """Share of time spent waiting since the previous lap; starts a new lap."""
        now, waited = time.monotonic(), self._now_total()
        span = now - self._lap_start
        frac = (waited - self._lap_wait_start) / span if span > 0 else 0.0
        self._lap_start, self._lap_wait_start = now, waited
        return min(1.0, max(0.0, frac))


def waiting(clock: WaitClock | None, what: str) -> contextlib.AbstractContextManager[None]:
    """``clock.waiting(what)``, or nothing when no clock is attached."""
    return clock.waiting(what) if clock is not None else contextlib.nullcontext()
