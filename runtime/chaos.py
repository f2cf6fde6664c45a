"""Fault injection for testing recovery: real SIGKILLs and SIGSTOPs of engine processes.

This is a deliberate fake *fault*, not a fake component: the engines are real processes, killed
or frozen by real signals, and everything downstream (detection, restart, refit, failover) runs
as it would after a real crash or hang. Off unless ``--chaos-kill-interval`` or ``--chaos-hang-at``
is set. The engine set is told when a fault was injected, so recovery is timed from the fault.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import math
import os
import random
import signal
import time

from runtime.engines import EngineSet

log = logging.getLogger(__name__)


class Chaos:
    def __init__(self, engines: EngineSet, *, kill_interval_s: float, hang_at_s: float, seed: int = 0):
        self.engines = engines
        self.kill_interval_s = kill_interval_s
        self.hang_at_s = hang_at_s
        self.rng = random.Random(seed)
        self.counters: collections.Counter[str] = collections.Counter()

    @property
    def enabled(self) -> bool:
        return bool(self.kill_interval_s or self.hang_at_s)

    async def run(self) -> None:
        start = time.monotonic()
        next_kill = self.kill_interval_s or math.inf
        hang_at = self.hang_at_s or math.inf
        frozen: tuple[int, int] | None = None
        while True:
            due = min(next_kill, hang_at)
            if due == math.inf:
                await asyncio.Future()  # nothing left to inject: idle until the run ends
            await asyncio.sleep(max(0.0, start + due - time.monotonic()))  # a schedule, not a wait for state
            # the frozen engine is left for health checks to find: killing it would hide the hang
            victims = [s for s in self.engines.serving() if s.process.alive and (s.index, s.incarnation) != frozen]
            if not victims:  # everything is already down: try again at the next tick
                next_kill, hang_at = (t + 1.0 if t == due else t for t in (next_kill, hang_at))
                continue
            slot = self.rng.choice(victims)
            slot.injected_at = time.monotonic()
            if due == hang_at:
                hang_at = math.inf
                frozen = (slot.index, slot.incarnation)
                self.counters["chaos_hangs"] += 1
                log.warning("chaos: SIGSTOP engine %d (pid %s)", slot.index, slot.process.pid)
                os.kill(slot.process.pid, signal.SIGSTOP)
            else:
                next_kill += self.kill_interval_s
                self.counters["chaos_kills"] += 1
                log.warning("chaos: SIGKILL engine %d (pid %s)", slot.index, slot.process.pid)
                os.kill(slot.process.pid, signal.SIGKILL)
