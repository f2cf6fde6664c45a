"""Failures that repeat: counted, logged at a bounded rate, and ending the run when nothing else can.

A failed sample is normal (a reward that raises once, an engine refusing one long prompt): it is
counted and the run goes on. The same failure on every request is not: the engine refusing every
request, a reward that fails on every call. Without a budget such a run admits and drops groups
as fast as it can, logs nothing and ends only at the stall timeout, without naming the cause.
``FailureBudget`` ends it instead, after ``limit`` failures of one cause in a row (any success of
that cause resets the count), with one line naming the cause and the first error of the streak.
Like the engine restart budget, ``limit`` is a flag (``--max-consecutive-failures``; 0: never).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time

from runtime.core.errors import RunFailed

log = logging.getLogger(__name__)

LOG_EVERY_S = 30.0  # besides the 1st, 10th, 100th... of a kind, at most one line per kind this often


class RateLog:
    """Logs the 1st, 10th, 100th, ... event of each kind, and one every ``LOG_EVERY_S`` besides:
    every kind is seen, with its reason, in a bounded number of lines."""

    def __init__(self, logger: logging.Logger = log):
        self.logger = logger
        self.counts: collections.Counter[str] = collections.Counter()
        self._last: dict[str, float] = {}

    def __call__(self, kind: str, reason: str) -> None:
        self.counts[kind] += 1
        n, now = self.counts[kind], time.monotonic()
        power_of_ten = n == 10 ** (len(str(n)) - 1)
        if power_of_ten or now - self._last.get(kind, now) >= LOG_EVERY_S:
            self._last[kind] = now
            self.logger.warning("%s (%d so far): %s", kind, n, reason)


class FailureBudget:
    """Consecutive failures per cause (``"engine"``, ``"reward"``); ``wait()`` raises ``RunFailed``
    once one cause has failed ``limit`` times in a row. Callers report every outcome."""

    def __init__(self, *, limit: int):
        self.limit = limit  # 0: never ends the run
        self._streak: collections.Counter[str] = collections.Counter()
        self._first: dict[str, str] = {}
        self.reason: str | None = None  # the line, once spent
        self._spent: asyncio.Event | None = None

    def ok(self, cause: str) -> None:
        if self._streak[cause]:
            self._streak[cause] = 0
            self._first.pop(cause, None)

    def failed(self, cause: str, error: str, *, what: str) -> None:
        """One failure of ``cause``; ``what`` names it for the user (``"samples the engines refused"``)."""
        self._first.setdefault(cause, error)
        self._streak[cause] += 1
        if self.limit and self._streak[cause] >= self.limit and self.reason is None:
            self.reason = (f"{self._streak[cause]} {what} in a row (--max-consecutive-failures); "
                           f"first error: {self._first[cause]}")
            if self._spent is not None:
                self._spent.set()

    async def wait(self) -> None:
        """Returns never; raises ``RunFailed`` with the line once the budget is spent."""
        if self._spent is None:
            self._spent = asyncio.Event()
        if self.reason is None:
            await self._spent.wait()
        raise RunFailed(self.reason)
