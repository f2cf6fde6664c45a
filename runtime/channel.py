"""A bounded, closable async channel (trio's ``MemorySendChannel`` semantics, asyncio-sized).

- ``send`` awaits while the channel holds ``capacity`` items: backpressure, never a drop.
- ``recv`` awaits while it is empty.
- ``close()`` wakes every waiter: pending and later ``send`` raise ``Closed``; ``recv`` drains
  what is left, then raises ``Closed`` (a clean end-of-stream).
Time spent blocked is added to the optional ``WaitClock`` so waits are measured, not guessed.
"""

from __future__ import annotations

import asyncio
import collections
from typing import Generic, TypeVar

from runtime.waits import WaitClock, waiting

T = TypeVar("T")


class Closed(Exception):
    """The channel was closed: no more items will come (recv) or be accepted (send)."""


class Channel(Generic[T]):
    def __init__(self, capacity: int, *, name: str = "channel"):
        if capacity < 1:
            raise ValueError(f"{name}: capacity must be >= 1, got {capacity}")
        self.capacity = capacity
        self.name = name
        self._items: collections.deque[T] = collections.deque()
        self._changed = asyncio.Condition()
        self._closed = False

    def __len__(self) -> int:
        return len(self._items)

    @property
    def closed(self) -> bool:
        return self._closed

    async def send(self, item: T, *, clock: WaitClock | None = None) -> None:
        async with self._changed:
            if len(self._items) >= self.capacity and not self._closed:
                with waiting(clock, f"{self.name}.send"):
                    await self._changed.wait_for(lambda: len(self._items) < self.capacity or self._closed)
            if self._closed:
                raise Closed(self.name)
            self._items.append(item)
            self._changed.notify_all()

    async def recv(self, *, clock: WaitClock | None = None) -> T:
        async with self._changed:
            if not self._items and not self._closed:
                with waiting(clock, f"{self.name}.recv"):
                    await self._changed.wait_for(lambda: bool(self._items) or self._closed)
            if not self._items:
                raise Closed(self.name)
            item = self._items.popleft()
            self._changed.notify_all()
            return item

    async def close(self) -> None:
        async with self._changed:
            self._closed = True
            self._changed.notify_all()
