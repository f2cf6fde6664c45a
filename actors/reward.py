"""Reward: scores samples with the user's function, so a bad reward never stops the run.

The function is ``fn(prompt: Prompt, sample: Sample) -> float`` (or a coroutine function).
A reward that raises, returns a non-number, or exceeds ``timeout_s`` marks the sample FAILED
(excluded from the loss), is counted by kind, and the run goes on. Synchronous functions run on
daemon threads: a hung one is abandoned after its timeout and cannot block process exit.
"""

from __future__ import annotations

import asyncio
import collections
import inspect
import logging
import math
import threading
import time
from collections.abc import Callable
from typing import Any

from buffers.types import Prompt, Sample

log = logging.getLogger(__name__)


def _in_daemon_thread(fn: Callable[..., Any], *args: Any) -> asyncio.Future[Any]:
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[Any] = loop.create_future()

    def deliver(setter: Callable[[Any], None], value: Any) -> None:
        if not fut.done():
            setter(value)

    def work() -> None:
        try:
            result = fn(*args)
        except BaseException as e:  # noqa: BLE001 - delivered to the awaiting task
            loop.call_soon_threadsafe(deliver, fut.set_exception, e)
        else:
            loop.call_soon_threadsafe(deliver, fut.set_result, result)

    threading.Thread(target=work, name="reward", daemon=True).start()
    return fut


class RewardScorer:
    def __init__(self, fn: Callable[..., Any], *, timeout_s: float):
        self.fn = fn
        self.timeout_s = timeout_s
        self.failures: collections.Counter[str] = collections.Counter()  # kind -> count

    async def score(self, prompt: Prompt, sample: Sample) -> None:
        """Set ``sample.reward``, or fail the sample with the reason; never raises."""
        try:
            if inspect.iscoroutinefunction(self.fn):
                value = await asyncio.wait_for(self.fn(prompt, sample), self.timeout_s)
            else:
                value = await asyncio.wait_for(_in_daemon_thread(self.fn, prompt, sample), self.timeout_s)
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
