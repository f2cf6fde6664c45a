"""Reward: scores samples with the user's function, so a bad reward never stops the run.

The function is ``fn(prompt: Prompt, sample: Sample) -> float`` (or a coroutine function).
A reward that raises, returns a non-number, or exceeds ``timeout_s`` marks the sample FAILED
(excluded from the loss), is counted by kind, and the run goes on. Synchronous functions run on
reusable daemon threads: a hung one is abandoned after its timeout and cannot block process exit.
"""

from __future__ import annotations

import asyncio
import collections
import inspect
import logging
import math
import queue
import threading
import time
from collections.abc import Callable
from typing import Any

from buffers.types import Prompt, Sample

log = logging.getLogger(__name__)


class DaemonPool:
    """Runs synchronous calls on reusable daemon threads, starting one more when none is idle.

    Daemon threads, because a reward that hangs forever must not block process exit; reusable,
    because starting a thread per call blocks the event loop until the OS schedules it (it showed
    in profiles of the default run). A hung call keeps its thread; later calls get fresh ones.
    """

    def __init__(self, name: str):
        self.name = name
        self._jobs: queue.SimpleQueue[tuple[Callable[[], Any], Callable[[BaseException | None, Any], None]]] = (
            queue.SimpleQueue()
        )
        self._idle = 0
        self._threads = 0
        self._lock = threading.Lock()

    def submit(self, fn: Callable[..., Any], *args: Any) -> asyncio.Future[Any]:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Any] = loop.create_future()

        def deliver(error: BaseException | None, value: Any) -> None:
            def settle() -> None:
                if fut.done():
                    return
                if error is not None:
                    fut.set_exception(error)
                else:
                    fut.set_result(value)

            loop.call_soon_threadsafe(settle)

        with self._lock:
            start = self._idle == 0
            if start:
                self._threads += 1
            else:
                self._idle -= 1
        self._jobs.put((lambda: fn(*args), deliver))
        if start:
            threading.Thread(target=self._work, name=f"{self.name}-{self._threads}", daemon=True).start()
        return fut

    def _work(self) -> None:
        while True:
            job, deliver = self._jobs.get()
            try:
                result = job()
            except BaseException as e:  # noqa: BLE001 - delivered to the awaiting task
                deliver(e, None)
            else:
                deliver(None, result)
            with self._lock:
                self._idle += 1


class RewardScorer:
    def __init__(self, fn: Callable[..., Any], *, timeout_s: float):
        self.fn = fn
        self.timeout_s = timeout_s
        self.failures: collections.Counter[str] = collections.Counter()  # kind -> count
        self._pool = DaemonPool("reward")

    async def score(self, prompt: Prompt, sample: Sample) -> None:
        """Set ``sample.reward``, or fail the sample with the reason; never raises."""
        try:
            if inspect.iscoroutinefunction(self.fn):
                value = await asyncio.wait_for(self.fn(prompt, sample), self.timeout_s)
            else:
                value = await asyncio.wait_for(self._pool.submit(self.fn, prompt, sample), self.timeout_s)
            value = float(value)
            if not math.isfinite(value):
                raise ValueError(f"reward is {value}")
        except TimeoutError:
            self._fail(sample, "reward_timeout", f"reward exceeded {self.timeout_s}s")
        except Exception as e:  # noqa: BLE001 - any user error is counted, not fatal
            self._fail(sample, "reward_error", f"{type(e).__name__}: {e}")
        else:
            sample.reward = value
        sample.timing.scored = time.monotonic()

    def _fail(self, sample: Sample, kind: str, reason: str) -> None:
        self.failures[kind] += 1
        if self.failures[kind] in (1, 10, 100, 1000):
            log.warning("%s (%d so far): %s", kind, self.failures[kind], reason)
        sample.fail(reason)
