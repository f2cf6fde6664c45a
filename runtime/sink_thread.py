"""A metrics sink driven from a thread of its own, so that a user's sink cannot stop the run.

Behind a bounded queue: a sink whose ``write`` blocks only has lines skipped for it (counted,
warned once), never the event loop that trains; one that raises is disabled with a warning; its
``close`` is bounded.
"""

from __future__ import annotations

import logging
import queue
import threading
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from runtime.sinks import Sink

log = logging.getLogger(__name__)

QUEUE_LINES = 256  # lines a slow sink may fall behind before lines are skipped for it
CLOSE_S = 30.0  # a sink's pending lines and close() get this long at the end of a run


class SinkThread:
    """One sink driven from its own daemon thread; ``write`` and ``close`` never raise or block."""

    _STOP = object()

    def __init__(self, sink: Sink):
        self.sink = sink
        self.name = type(sink).__name__
        self.skipped = 0  # lines not handed to the sink: its queue was full, or it was disabled
        self.failed: str | None = None  # why it was disabled
        self._queue: queue.Queue[Any] = queue.Queue(QUEUE_LINES)
        self._thread = threading.Thread(target=self._run, name=f"sink-{self.name}", daemon=True)
        self._thread.start()

    def write(self, step: int, metrics: dict[str, float]) -> None:
        if self.failed is not None:
            self.skipped += 1
            return
        try:
            self._queue.put_nowait((step, metrics))
        except queue.Full:
            self.skipped += 1
            if self.skipped == 1:
                log.warning("metrics sink %s is not keeping up (%d lines behind); skipping lines for it",
                            self.name, QUEUE_LINES)

    def _run(self) -> None:
        while (item := self._queue.get()) is not self._STOP:
            if self.failed is None:
                try:
                    self.sink.write(*item)
                except Exception as e:  # noqa: BLE001 - a user's sink: disabled, not fatal
                    self.failed = f"{type(e).__name__}: {e}"
                    log.warning("metrics sink %s raised %s; disabled for the rest of the run", self.name, self.failed)
        try:
            self.sink.close()
        except Exception as e:  # noqa: BLE001 - as above
            log.warning("metrics sink %s raised on close: %s: %s", self.name, type(e).__name__, e)

    def close(self) -> None:
        """Hand over what is queued, then close the sink; give up after ``CLOSE_S``."""
        try:
            self._queue.put(self._STOP, timeout=CLOSE_S)
        except queue.Full:
            pass
        self._thread.join(CLOSE_S)
        if self._thread.is_alive():
            log.warning("metrics sink %s did not finish within %gs; left behind", self.name, CLOSE_S)
