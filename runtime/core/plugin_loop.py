"""An event loop of its own, on a daemon thread, for users' coroutine plug-ins (async rewards).

A coroutine that blocks (``time.sleep`` in an ``async def``, a synchronous HTTP call) blocks the
loop it runs on. On the runtime's loop that would stop every actor, the stall watchdog's task and
the signal handling with them. Here it stops only the other plug-in calls, whose callers time out
on the runtime's loop as usual. Daemon: a plug-in that never returns cannot block process exit.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


class PluginLoop:
    def __init__(self, name: str = "plugin-loop"):
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name=name, daemon=True)
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, T]) -> asyncio.Future[T]:
        """``coro`` scheduled on the plug-in loop, as a future of the calling loop (cancelling it
        cancels the coroutine there, as soon as that loop runs again)."""
        return asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coro, self.loop))


_shared: PluginLoop | None = None
_lock = threading.Lock()


def plugin_loop() -> PluginLoop:
    """The process's plug-in loop, started on first use."""
    global _shared
    with _lock:
        if _shared is None:
            _shared = PluginLoop()
        return _shared
