"""Weight syncs of an engine set: pause -> load -> continue on every serving engine, by files or
by the trainer's own transport, and the colocated time slice's release/resume of KV memory.

Control calls go to every serving engine directly and concurrently (routers in front of SGLang do
not forward them), under the set's control lock, so a replacement's refit never interleaves with
a sync. An engine failing in a control call is failed (``fail``: the health checks restart it,
and it refits to the version being loaded); the sync goes on with the others.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from policies.engine.client import EngineClient, EngineError
from runtime.engine_members import Members, Slot, adapter_name


class WeightSyncs:
    def __init__(self, members: Members, fail: Callable[[Slot, str], None]):
        self.m = members
        self.fail = fail

    async def sync_weights(self, path: str | Path | None, version: int, pause_mode: str,
                           sent: asyncio.Event | None = None) -> float:
        """Pause -> load ``version`` -> continue, on every serving engine; returns the seconds
        generation was paused. ``path``: the weights' files (shared memory); None: the trainer
        sends them (``collective``: a broadcast, or CUDA IPC handles), and ``sent`` is set once
        the trainer's part is done."""
        m = self.m
        async with m.control:
            m.syncing, m.sync_epoch = True, m.sync_epoch + 1
            try:
                if not m.slots:  # no engine (an SFT run): nothing to load
                    m.current = (version, None if path is None else str(path))
                    return 0.0
                if path is None:
                    return await self._broadcast(version, pause_mode, sent)
                await self.on_each("pause", lambda c: c.pause(pause_mode))
                paused = time.monotonic()
                unload = m.adapter_names[:-1]
                await self.on_each("weight update", lambda c: m.load(c, str(path), version, unload=unload))
                if m.adapters:
                    m.adapter_names = m.adapter_names[-1:] + [adapter_name(version)]
                m.current = (version, str(path))
                await self.on_each("continue", lambda c: c.resume())
                return time.monotonic() - paused
            finally:
                if sent is not None:
                    sent.set()  # also when no engine took part, or it failed: the learner goes on
                m.syncing = False
                now = time.monotonic()
                for s in m.serving():
                    s.last_progress = max(s.last_progress, now)  # a pause is not a stall

    async def _broadcast(self, version: int, pause_mode: str, sent: asyncio.Event | None) -> float:
        """One collective sync over the serving engines, paused unless they can swap the weights
        in between decode steps (``CollectiveWeights.pauseless``); returns the seconds generation
        stopped. An engine failing in it breaks the group for everyone: it is failed, and the sync
        is retried once over the others (new group)."""
        m = self.m
        assert m.collective is not None, "a sync without files needs the collective transport"
        for attempt in (1, 2):
            targets = [((s.index, s.incarnation), s) for s in m.serving()]
            if not targets:
                m.current = (version, None)  # replacements refit to it when they start
                return 0.0
            try:
                clients = [(key, s.client) for key, s in targets]
                await m.collective.join(clients)
                pauseless = m.collective.pauseless(pause_mode)
                if not pauseless:
                    await self.on_each("pause", lambda c: c.pause(pause_mode))
                paused = time.monotonic()
                _, held = await m.collective.send(clients, version, sent)
                m.current = (version, None)
                if pauseless:
                    return held
                await self.on_each("continue", lambda c: c.resume())
                return time.monotonic() - paused
            except Exception as e:  # noqa: BLE001 - whoever broke it is found below, else re-raised
                broken = [s for _, s in targets if not s.process.alive
                          or (isinstance(e, EngineError) and s.client is not None and s.client.base_url == e.url)]
                if not broken or attempt == 2:
                    raise
                for s in broken:
                    self.fail(s, f"weight broadcast failed: {e}")
                if not m.collective.pauseless(pause_mode):
                    await self.on_each("continue", lambda c: c.resume())  # the others, paused above
        raise AssertionError("unreachable")

    async def on_each(self, what: str, call: Callable[[EngineClient], Awaitable[object]]) -> None:
        async def one(slot: Slot) -> None:
            assert slot.client is not None
            try:
                await call(slot.client)
            except EngineError as e:
                self.fail(slot, f"{what} failed: {e.reason}")

        await asyncio.gather(*(one(s) for s in self.m.serving()))

    async def release_memory(self) -> None:
        """Colocated time slice: stop every engine (``retract``: requests stay queued, their KV cache
        dropped) and free its KV memory for the learner's step. Waits for a sync in progress, so a
        sync's own continue cannot undo the release. Probes treat released engines as paused."""
        m = self.m
        async with m.control:
            # (a new epoch: a generation probe the pause aborts is not evidence, as for a sync)
            m.released, m.sync_epoch = True, m.sync_epoch + 1
            await self.on_each("pause", lambda c: c.pause("retract"))
            await self.on_each("memory release", lambda c: c.release_memory_occupation(["kv_cache"]))

    async def resume_memory(self) -> None:
        """End the time slice: KV memory back, generation continues (after any sync in progress)."""
        m = self.m
        async with m.control:
            await self.on_each("memory resume", lambda c: c.resume_memory_occupation(["kv_cache"]))
            await self.on_each("continue", lambda c: c.resume())
            m.released = False
            now = time.monotonic()
            for s in m.serving():
                s.last_progress = max(s.last_progress, now)  # a released engine was not stalled
