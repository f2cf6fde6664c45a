"""A process whose event loop misbehaves under ``runtime.run_guard.RunGuard``, as the launcher runs it.

``python -m tests.integration.guarded_loop MODE RECORD [STALL_S]``: starts a child process (as
the launcher starts engines) and a directory to clean up (as its weights directory), arms the
guard, prints ``ready CHILD_PID DIR``, then, by MODE:
    blocked   the loop is blocked in a plug-in's ``time.sleep`` (the bug of issue 16);
    stubborn  the loop runs but the run ignores cancellation (a stop that never ends).
A forced end writes ``{"status": ..., "error": ...}`` to RECORD (as the launcher's summary).
"""

import asyncio
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from runtime import run_guard


async def main(mode: str) -> None:
    guard = run_guard.active()
    child = subprocess.Popen(["sleep", "300"])  # noqa: ASYNC220 - as the launcher starts an engine
    scratch = Path(tempfile.mkdtemp(prefix="guarded-loop-"))
    guard.remove_on_force.append(scratch)
    guard.arm()
    print(f"ready {child.pid} {scratch}", flush=True)
    if mode == "blocked":
        blocked()
    while True:  # stubborn
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            pass


def blocked() -> None:
    time.sleep(3600)


if __name__ == "__main__":
    mode, record = sys.argv[1], Path(sys.argv[2])
    guard = run_guard.RunGuard(stall_timeout_s=float(sys.argv[3]) if len(sys.argv) > 3 else 600.0)
    guard.on_force.append(lambda status, error: record.write_text(json.dumps({"status": status, "error": error})))
    guard.run(main(mode))
