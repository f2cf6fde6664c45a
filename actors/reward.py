"""Reward: scores samples with the user's function, so a bad reward never stops the run.

The function is ``fn(prompt: Prompt, sample: Sample) -> float`` (or a coroutine function).
A reward that raises, returns a non-number, or exceeds ``timeout_s`` marks the sample FAILED
(excluded from the loss), is counted by kind, and the run goes on. Synchronous functions run on
reusable daemon threads: a hung one is abandoned after its timeout and cannot block process exit.

``score_many`` scores a group. A synchronous function that has proved fast (mean call under
``FAST_CALL_S``) scores the whole group in one job on one thread: one thread hop and one wake-up
of the event loop per group instead of per sample, which took ~3 ms of driver CPU off each step
of the default recipe (128 samples). A slow or not yet measured one gets a job per sample, so
samples run in parallel threads. Either way each call is bounded by ``timeout_s`` on its own:
a job's progress is watched, and a call that overruns fails its sample, its job is abandoned
and the samples after it go on in a new job.

A plug-in cannot take the runtime with it. A coroutine function runs on its own event loop in a
thread (``runtime.core.plugin_loop``), so one that blocks (``time.sleep`` in an ``async def``) stalls
only the other reward calls, which time out; the runtime's loop, its watchdog and its signal
handling go on. Hung synchronous calls keep their threads, but at most ``MAX_HUNG_CALLS`` of them:
past that the function is not called again until one returns, and samples fail at once. Values
that are not finite or beyond ``MAX_ABS_REWARD`` fail their sample (they would overflow the
advantages). Every failure is logged with its reason (rate-limited) and reported to ``budget``,
which ends a run whose reward fails on every call.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import inspect
import logging
import math
import queue
import threading
import time
from collections.abc import Callable
from typing import Any

from buffers.types import Prompt, Sample
from runtime.core.failures import FailureBudget, RateLog
from runtime.core.plugin_loop import plugin_loop

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

            with contextlib.suppress(RuntimeError):  # the loop has closed: an abandoned call nobody awaits
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


FAST_CALL_S = 0.001  # a synchronous reward faster than this per call scores a group on one thread
MAX_HUNG_CALLS = 32  # synchronous calls past their timeout (each holds a thread) before calls stop
MAX_ABS_REWARD = 1e6  # larger rewards are a bug: their squares overflow the advantages' float32


class _Job:
    """Calls ``fn`` on ``pairs`` in order, on one pool thread, leaving what the loop watches:
    ``current`` (index and start of the call in progress) and ``results`` (error or value, and
    seconds, per finished call). Abandoned, it stops before its next call."""

    def __init__(self, fn: Callable[..., Any], pairs: list[tuple[Prompt, Sample]]):
        self.fn, self.pairs = fn, pairs
        self.current = (0, time.monotonic())  # one tuple, swapped whole: the loop reads it unlocked
        self.results: list[tuple[Exception | None, Any, float]] = []
        self.abandoned = False
        self.finished = False  # set by the thread as it leaves: a hung job's thread is free again

    def __call__(self) -> None:
        try:
            self._run()
        finally:
            self.finished = True

    def _run(self) -> None:
        for i, (prompt, sample) in enumerate(self.pairs):
            if self.abandoned:
                return
            start = time.monotonic()
            self.current = (i, start)
            error: Exception | None = None
            try:
                value = self.fn(prompt, sample)
            except Exception as e:  # noqa: BLE001 - the sample's error, handed to the loop
                error, value = e, None
            self.results.append((error, value, time.monotonic() - start))


class RewardScorer:
    """``group``: ``fn(prompt, samples) -> list`` scores a whole group in one call (``--group-rm``;
    pairwise or ranking rewards); the call is bounded by ``timeout_s`` and its failure fails the
    group's samples. ``reward_key``: ``fn`` returns a dict of components (``--reward-key``); the
    sample trains on that one and keeps them all in ``reward_components``."""

    def __init__(self, fn: Callable[..., Any], *, timeout_s: float, group: bool = False, reward_key: str = "",
                 budget: FailureBudget | None = None):
        self.fn = fn
        self.timeout_s = timeout_s
        self.group, self.reward_key = group, reward_key
        self.failures: collections.Counter[str] = collections.Counter()  # kind -> count
        self.budget = budget or FailureBudget(limit=0)
        self._log = RateLog(log)
        self._hung: list[_Job] = []  # abandoned jobs whose call has not returned
        self._pool = DaemonPool("reward")
        self._is_async = inspect.iscoroutinefunction(fn)
        self._call_s: float | None = None  # moving mean of a synchronous call; None until measured

    async def score(self, prompt: Prompt, sample: Sample) -> None:
        """Set ``sample.reward``, or fail the sample with the reason; never raises."""
        await self.score_many([(prompt, sample)])

    async def score_many(self, pairs: list[tuple[Prompt, Sample]]) -> None:
        """``score`` for each pair (module docstring: how a group is batched)."""
        if not pairs:  # a group with no scorable sample
            return
        if self.group:
            groups: dict[int, tuple[Prompt, list[Sample]]] = {}
            for p, smp in pairs:  # one call per prompt, its samples in the order given
                groups.setdefault(id(p), (p, []))[1].append(smp)
            await asyncio.gather(*(self._score_group(p, samples) for p, samples in groups.values()))
            return
        if self._is_async:
            await asyncio.gather(*(self._score_async(p, s) for p, s in pairs))
            return
        size = len(pairs) if self._call_s is not None and self._call_s < FAST_CALL_S else 1
        await asyncio.gather(*(self._score_on_thread(pairs[i:i + size]) for i in range(0, len(pairs), size)))

    async def _score_async(self, prompt: Prompt, sample: Sample) -> None:
        try:
            value = await asyncio.wait_for(plugin_loop().run(self.fn(prompt, sample)), self.timeout_s)
        except TimeoutError:
            self._timed_out(sample)
        except Exception as e:  # noqa: BLE001 - any user error is counted, not fatal
            self._set(sample, e, None)
        else:
            self._set(sample, None, value)

    async def _score_on_thread(self, pairs: list[tuple[Prompt, Sample]]) -> None:
        while pairs:
            self._hung = [j for j in self._hung if not j.finished]
            if len(self._hung) >= MAX_HUNG_CALLS:
                for _, sample in pairs:
                    self._fail(sample, "reward_timeout", f"{len(self._hung)} reward calls are still running past "
                               f"--reward-timeout {self.timeout_s}s; not calling it again until one returns")
                    sample.timing.scored = time.monotonic()
                return
            job = _Job(self.fn, pairs)
            done = self._pool.submit(job)
            overran = None
            while not done.done():  # wake when the call in progress would overrun
                i, started = job.current
                if len(job.results) > i:  # call i just ended; the next one starts now
                    i, started = i + 1, time.monotonic()
                left = started + self.timeout_s - time.monotonic()
                if left <= 0:
                    overran = i
                    break
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(max(left, 0.0)):
                        await asyncio.shield(done)
            if overran is None:
                done.result()  # anything but an Exception from fn (a bug) ends the caller here
            finished = job.results[: len(pairs) if overran is None else overran]
            for (_, sample), (error, value, seconds) in zip(pairs, finished):
                self._set(sample, error, value)
                self._call_s = seconds if self._call_s is None else 0.9 * self._call_s + 0.1 * seconds
            if overran is None:
                return
            job.abandoned = True  # its thread stays with the hung call; the rest go on afresh
            self._hung.append(job)
            self._timed_out(pairs[overran][1])
            pairs = pairs[overran + 1 :]

    async def _score_group(self, prompt: Prompt, samples: list[Sample]) -> None:
        """One call for the group; a failure or a timeout fails every sample of it."""
        try:
            if self._is_async:
                values = await asyncio.wait_for(plugin_loop().run(self.fn(prompt, samples)), self.timeout_s)
            else:  # on a pool thread; an overrunning call is abandoned there
                values = await asyncio.wait_for(asyncio.shield(self._pool.submit(self.fn, prompt, samples)),
                                                self.timeout_s)
        except TimeoutError:
            for smp in samples:
                self._timed_out(smp)
            return
        except Exception as e:  # noqa: BLE001 - any user error is counted, not fatal
            values, error = None, e
        else:
            error = None
            if not isinstance(values, (list, tuple)) or len(values) != len(samples):
                error = ValueError(f"a group reward returns one value per sample ({len(samples)}), got {values!r}")
        for i, smp in enumerate(samples):
            self._set(smp, error, None if error else values[i])

    def _set(self, sample: Sample, error: Exception | None, value: Any) -> None:
        try:
            if error is not None:
                raise error
            if isinstance(value, dict):
                value = self._components(sample, value)
            value = float(value)
            if not math.isfinite(value) or abs(value) > MAX_ABS_REWARD:
                raise ValueError(f"reward is {value} (finite and within +-{MAX_ABS_REWARD:g} expected)")
        except Exception as e:  # noqa: BLE001 - any user error is counted, not fatal
            self._fail(sample, "reward_error", f"{type(e).__name__}: {e}")
        else:
            sample.reward = value
            self.budget.ok("reward")
        sample.timing.scored = time.monotonic()

    def _components(self, sample: Sample, parts: dict[Any, Any]) -> float:
        """A dict reward: every part kept (and logged), the ``reward_key`` one trained on."""
        if not self.reward_key:
            raise TypeError(f"the reward returned a dict {sorted(parts)}; name the one to train on with --reward-key")
        if self.reward_key not in parts:
            raise KeyError(f"--reward-key {self.reward_key!r} is not among the reward's parts {sorted(parts)}")
        sample.reward_components = {str(k): float(v) for k, v in parts.items()}
        return parts[self.reward_key]

    def _timed_out(self, sample: Sample) -> None:
        self._fail(sample, "reward_timeout", f"reward exceeded {self.timeout_s}s")
        sample.timing.scored = time.monotonic()

    def _fail(self, sample: Sample, kind: str, reason: str) -> None:
        self.failures[kind] += 1
        self._log(kind, reason)
        self.budget.failed("reward", reason, what="reward calls failed")
        sample.fail(reason)
