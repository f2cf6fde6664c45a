"""WeightBroadcaster: brings every engine to the newest version the learner published.

Per sync: pause -> update weights -> continue -> tell the buffer the new served version.
- ``in_place`` (default on the embedded engine): in-flight requests are frozen between decode
  steps and continue under the new weights; the engine reports the version of every token, so a
  request spanning the update is exact, and no work is thrown away or re-sent.
- ``abort`` (for engines that report one version per answer, e.g. SGLang): each in-flight
  request returns what it has (at the old version); the generator resumes it, and the resumed
  request waits in the paused engine until the weights are new. No request ever sees its weights
  change under it, so one version per answer is exact.
Only the newest published version is synced: a learner faster than the sync skips versions
rather than queueing them (a mailbox of one, newest wins). Every sync is timed and bounded by
``timeout_s``: a stuck engine becomes an error, not a hang. The served version's files stay on
disk until a newer one is served: a restarted engine loads them before it serves (refit).
"""

from __future__ import annotations

import asyncio
import collections
import shutil
import time
from pathlib import Path
from typing import Protocol

import msgspec

from buffers.buffer import StalenessBuffer
from runtime.core import trace

RECENT_SYNCS = 1000  # records kept (a long run keeps flat memory; totals cover every sync)


class SyncRecord(msgspec.Struct):
    version: int
    total_s: float  # publish seen -> engines serving it
    paused_s: float  # generation paused on the engines


class ControlledEngines(Protocol):
    async def sync_weights(self, path: str | Path | None, version: int, pause_mode: str,
                           sent: asyncio.Event | None = None) -> float:
        """Pause, load, continue on every engine; returns the seconds generation was paused."""
        ...


class WeightSyncError(RuntimeError):
    pass


class WeightBroadcaster:
    def __init__(self, *, engines: ControlledEngines, buffer: StalenessBuffer, timeout_s: float,
                 served_version: int = 0, pause_mode: str = "abort", collective: bool = False):
        if pause_mode not in ("abort", "in_place"):
            raise ValueError(f"pause_mode must be abort or in_place, got {pause_mode!r}")
        # collective: the engines receive the weights from the trainer (runtime.weight_transport):
        # no files, and publish holds the learner until the trainer has sent them
        self.wants_files = not collective
        self.pause_mode = pause_mode
        self.engines = engines
        self.buffer = buffer
        self.timeout_s = timeout_s
        self.served_version = served_version
        self.records: collections.deque[SyncRecord] = collections.deque(maxlen=RECENT_SYNCS)  # the latest
        self.synced, self.total_s, self.paused_s = 0, 0.0, 0.0  # over the whole run
        self._published: tuple[int, Path | None, asyncio.Event | None] | None = None
        self._served_path: Path | None = None  # kept for refits until superseded
        self._changed = asyncio.Condition()

    def stats(self) -> SyncRecord | None:
        """The latest sync's figures (``sync/*``), None before the first."""
        return self.records[-1] if self.records else None

    async def publish(self, version: int, path: Path | None) -> None:
        """The learner's weights at ``version`` are in ``path``; returns at once. Without files
        (collective), returns once the trainer has sent them: the run loop syncs them meanwhile."""
        sent = asyncio.Event() if path is None else None
        async with self._changed:
            stale = self._published
            self._published = (version, path, sent)
            self._changed.notify_all()
        if stale is not None:  # never synced: superseded (its publisher, if waiting, goes on)
            if stale[1] is not None:
                shutil.rmtree(stale[1], ignore_errors=True)
            if stale[2] is not None:
                stale[2].set()
        if sent is not None:
            await sent.wait()  # set by the sync even when it fails (the run loop reports that)

    async def wait_served(self, version: int) -> None:
        async with self._changed:
            await self._changed.wait_for(lambda: self.served_version >= version)

    async def run(self) -> None:
        while True:
            async with self._changed:
                await self._changed.wait_for(lambda: self._published is not None)
                assert self._published is not None
                version, path, sent = self._published
                self._published = None
            await self.sync(version, path, sent)

    async def sync(self, version: int, path: Path | None, sent: asyncio.Event | None = None) -> None:
        start = time.monotonic()
        try:
            async with asyncio.timeout(self.timeout_s):
                paused_s = await self.engines.sync_weights(path, version, self.pause_mode, sent)
        except TimeoutError:
            raise WeightSyncError(f"weight sync to version {version} took over {self.timeout_s}s") from None
        end = time.monotonic()
        self.records.append(SyncRecord(version=version, total_s=end - start, paused_s=paused_s))
        self.synced, self.total_s, self.paused_s = self.synced + 1, self.total_s + end - start, self.paused_s + paused_s
        with trace.lane("broadcaster", since=start) as lane:  # the sync, and the pause that ends it
            lane.record("weight sync", start, end, version=version)
            lane.record("paused", end - paused_s, end, version=version)
        if self._served_path is not None:
            shutil.rmtree(self._served_path, ignore_errors=True)
        self._served_path = path  # (None when collective: a refit is broadcast too)
        async with self._changed:
            self.served_version = version
            self._changed.notify_all()
        await self.buffer.set_served_version(version)
