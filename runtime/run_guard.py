"""Runs the launcher's event loop so that signals and a blocked loop always end the run.

The scheduler's own watchdog is a task on the event loop: a plug-in that blocks the loop (a
``time.sleep`` in an ``async def``, a sink whose ``write`` never returns) would stop it too, and
asyncio's signal handlers with it. ``RunGuard`` keeps both off the loop:

- SIGINT and SIGTERM get Python-level handlers (they run in the main thread between bytecodes,
  even while the loop is blocked in a plug-in). The first cancels the run's task: the launcher
  records ``status: interrupted`` in ``summary.json``, stops the engines, removes the weights
  directory, and ``run`` raises ``Interrupted`` (exit 130 / 143). A second signal forces the end.
- A watchdog thread reads a heartbeat the loop writes every ``BEAT_S``. Once the run is armed
  (``arm``: built, about to run; building blocks the loop on purpose), a loop silent for
  ``WARN_S`` is reported once, with the line of code it is stuck in; silent for the stall timeout,
  or for ``SIGNAL_BLOCKED_S`` after a signal, the run is forced to end.
- Forcing (``force``) does from outside the loop what the graceful path would: write the summary
  (``on_force`` callbacks), end every child process (engines, the trainer), remove the registered
  paths (the weights in ``/dev/shm``), print one line and ``os._exit`` with the code.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import psutil

log = logging.getLogger(__name__)

BEAT_S = 0.25  # the loop's heartbeat period
WARN_S = 5.0  # a loop silent this long is reported (once per blocking)
SIGNAL_BLOCKED_S = 3.0  # after a signal, a loop silent this long cannot stop gracefully: force
# a second signal sooner than this after the first is the same request delivered twice (GNU timeout
# signals the command and then its process group), not a user insisting: it does not force the exit
SIGNAL_REPEAT_S = 0.25
SIGNAL_GRACE_S = 60.0  # after a signal, a graceful stop taking longer than this is forced
CHILD_GRACE_S = 3.0  # children get SIGTERM, then SIGKILL after this long


class Interrupted(Exception):
    """The run was ended by a signal; ``code`` is the shell's 128 + signal number."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum
        self.code = 128 + signum


class RunGuard:
    def __init__(self, *, stall_timeout_s: float, run_dir: Path | None = None):
        self.stall_timeout_s = stall_timeout_s
        self.run_dir = run_dir
        self.on_force: list[Callable[[str, str], None]] = []  # (status, error): write the record
        self.remove_on_force: list[Path] = []
        self.signum: int | None = None
        self._signalled_at = 0.0
        self._armed = False
        self._beat = time.monotonic()
        self._done = threading.Event()
        self._forcing = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task[Any] | None = None

    # -- running ---------------------------------------------------------------------------------
    def run(self, coro: Coroutine[Any, Any, Any]) -> Any:
        """Run ``coro`` to its end on a fresh loop (uvloop where installed); ``Interrupted`` if a
        signal ended it."""
        global _active
        loop = _new_loop()
        self._loop, _active = loop, self
        asyncio.set_event_loop(loop)
        previous = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        watchdog = threading.Thread(target=self._watch, name="run-guard", daemon=True)
        try:
            self._task = loop.create_task(self._main(coro), name="run")
            watchdog.start()
            return loop.run_until_complete(self._task)
        except asyncio.CancelledError:
            if self.signum is None:
                raise
            raise Interrupted(self.signum) from None
        finally:
            self._done.set()
            _active = None
            for s, handler in previous.items():
                signal.signal(s, handler)
            with contextlib.suppress(Exception):
                _cancel_rest(loop)
            asyncio.set_event_loop(None)
            loop.close()

    async def _main(self, coro: Coroutine[Any, Any, Any]) -> Any:
        beat = asyncio.create_task(self._heartbeat(), name="run-guard-heartbeat")
        try:
            return await coro
        finally:
            beat.cancel()

    async def _heartbeat(self) -> None:
        while True:
            self._beat = time.monotonic()
            await asyncio.sleep(BEAT_S)

    def arm(self) -> None:
        """The run is built: from now on a silent loop is a blocked one."""
        self._beat, self._armed = time.monotonic(), True

    # -- signals ---------------------------------------------------------------------------------
    def _on_signal(self, signum: int, frame: Any) -> None:
        if self.signum is not None:
            if time.monotonic() - self._signalled_at < SIGNAL_REPEAT_S:
                return
            self.force("interrupted", f"interrupted ({signal.Signals(signum).name}, a second time): forced exit",
                       code=128 + self.signum)
        self.signum, self._signalled_at = signum, time.monotonic()
        if self._loop is not None and self._task is not None:
            self._loop.call_soon_threadsafe(self._task.cancel)

    # -- the watchdog thread ---------------------------------------------------------------------
    def _watch(self) -> None:
        warned = False
        while not self._done.wait(BEAT_S):
            now = time.monotonic()
            silent = now - self._beat if self._armed else 0.0
            if silent < WARN_S:
                warned = False
            elif not warned:
                warned = True
                log.warning("the event loop has been blocked for %.0fs, at %s (a plug-in that blocks it?)",
                            silent, self.blocked_at())
            if self.signum is not None:
                name = signal.Signals(self.signum).name
                if silent > SIGNAL_BLOCKED_S:
                    self.force("interrupted", f"interrupted ({name}); the event loop was blocked at "
                               f"{self.blocked_at()}: forced exit", code=128 + self.signum)
                if now - self._signalled_at > SIGNAL_GRACE_S:
                    self.force("interrupted", f"interrupted ({name}); the run did not stop within "
                               f"{SIGNAL_GRACE_S:g}s: forced exit", code=128 + self.signum)
            elif silent > self.stall_timeout_s:
                self.force("failed", f"the event loop was blocked for {silent:.0f}s (--stall-timeout) at "
                           f"{self.blocked_at()}{self._dump()}", code=1)

    def blocked_at(self) -> str:
        """The innermost line the main thread (the loop's) is running."""
        frame = sys._current_frames().get(threading.main_thread().ident or 0)
        if frame is None:
            return "an unknown place"
        last = traceback.extract_stack(frame)[-1]
        return f"{last.filename}:{last.lineno} in {last.name}"

    def _dump(self) -> str:
        """Every thread's stack in ``stall_dump.txt``; the sentence that names it."""
        if self.run_dir is None:
            return ""
        path = self.run_dir / "stall_dump.txt"
        with contextlib.suppress(OSError):
            rows = []
            for ident, frame in sys._current_frames().items():
                name = next((t.name for t in threading.enumerate() if t.ident == ident), str(ident))
                rows.append(f"thread {name}:\n{''.join(traceback.format_stack(frame))}")
            path.write_text("\n".join(rows))
            return f"; every thread's stack is in {path}"
        return ""

    # -- forcing ---------------------------------------------------------------------------------
    def force(self, status: str, line: str, *, code: int) -> None:
        """End the process now, from any thread: record, stop children, clean up, one line, exit."""
        if not self._forcing.acquire(blocking=False):
            return  # another thread is already forcing
        for record in self.on_force:
            with contextlib.suppress(Exception):
                record(status, line)
        stop_children()
        for path in self.remove_on_force:
            shutil.rmtree(path, ignore_errors=True)
        prefix = "run failed: " if status == "failed" else ""
        with contextlib.suppress(Exception):
            sys.stderr.write(f"{prefix}{line}\n")
            sys.stderr.flush()
        logging.shutdown()
        os._exit(code)


def stop_children() -> None:
    """SIGTERM every descendant process, SIGKILL those still there after ``CHILD_GRACE_S``."""
    with contextlib.suppress(psutil.Error):
        children = psutil.Process().children(recursive=True)
        for child in children:
            with contextlib.suppress(psutil.Error):
                child.terminate()
        _, alive = psutil.wait_procs(children, timeout=CHILD_GRACE_S)
        for child in alive:
            with contextlib.suppress(psutil.Error):
                child.kill()
        psutil.wait_procs(alive, timeout=CHILD_GRACE_S)


def _new_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux/macOS
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


def _cancel_rest(loop: asyncio.AbstractEventLoop) -> None:
    """As ``asyncio.run`` does: cancel what is left and let it finish, then shut generators down."""
    rest = [t for t in asyncio.all_tasks(loop) if not t.done()]
    for t in rest:
        t.cancel()
    if rest:
        loop.run_until_complete(asyncio.gather(*rest, return_exceptions=True))
    loop.run_until_complete(loop.shutdown_asyncgens())
    # not shutdown_default_executor: it joins every executor thread, and one stuck in a user's
    # call would hang the exit this guard exists to make certain


_active: RunGuard | None = None


def active() -> RunGuard | None:
    """The guard running the current loop, if any (the launcher registers its cleanup on it)."""
    return _active
