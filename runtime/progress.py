"""Progress on the terminal: a live dashboard, one live line, or plain periodic lines.

Modes (``--progress``): ``rich`` the dashboard (``runtime.dashboard``); ``bar`` one line redrawn
in place; ``lines`` a plain line every ``every_s`` seconds (logs, CI, pipes); ``off``. ``auto``
picks ``rich`` on a terminal when rich is installed, ``bar`` on a terminal without it, and
``lines`` otherwise. ``close()`` ends a live display; the scheduler calls it on shutdown.
"""

from __future__ import annotations

import importlib.util
import sys
import time
from typing import Any, TextIO

from runtime.metrics import fault_counts


class Progress:
    def __init__(self, *, total_steps: int, mode: str = "auto", stream: TextIO | None = None,
                 every_s: float = 10.0):
        self.stream = stream or sys.stderr
        self.total = total_steps
        if mode == "auto":
            tty = self.stream.isatty()
            mode = ("rich" if importlib.util.find_spec("rich") else "bar") if tty else "lines"
        self.mode = mode
        self.every_s = every_s
        self._start = time.monotonic()
        self._last_print = -float("inf")
        self._last_eval: tuple[float, int] | None = None
        self._first_step: int | None = None  # a resumed run starts past 0
        self._dashboard = None
        if mode == "rich":
            from runtime.dashboard import Dashboard

            self._dashboard = Dashboard(total_steps=total_steps, stream=self.stream)

    def update(self, line: dict[str, Any]) -> None:
        if "eval/reward" in line:
            self._last_eval = (line["eval/reward"], line.get("eval/version", line["version"]))
        now = time.monotonic()
        if self._first_step is None:
            self._first_step = line["step"] - 1
        # rate since the engines were ready (``time_s``), so start-up does not inflate the ETA
        rate = (line["step"] - self._first_step) / max(line.get("time_s", now - self._start), 1e-9)
        eta = (self.total - line["step"]) / rate
        if self._dashboard is not None:
            self._dashboard.update(line, elapsed_s=now - self._start, eta_s=eta, steps_per_s=rate,
                                   last_eval=self._last_eval)
            return
        if self.mode == "off":
            return
        final = line["step"] >= self.total
        if self.mode == "lines" and now - self._last_print < self.every_s and not final:
            return
        self._last_print = now
        text = self._format(line, now - self._start, eta)
        if self.mode == "bar":
            self.stream.write("\r" + text.ljust(120)[:160] + ("\n" if final else ""))
        else:
            self.stream.write(text + "\n")
        self.stream.flush()

    def _format(self, line: dict[str, Any], elapsed: float, eta: float) -> str:
        step = line["step"]
        ev = f" eval {self._last_eval[0]:.3f}" if self._last_eval is not None else ""
        faults = sum(fault_counts(line).values())
        return (
            f"step {step}/{self.total} v{line['version']} reward {line['reward/mean']:.3f}{ev}"
            f" | stale max {line['staleness/max']} mean {line['staleness/mean']:.2f}"
            f" | buffer {line['buffer/groups']}+{line['buffer/pending']} groups"
            f" | wait learner {line['learner/wait_frac']:.0%} gen {line['generator/wait_frac']:.0%}"
            f" | {line['throughput/tokens_per_s']:.0f} tok/s" + (f" | faults {faults}" if faults else "")
            + f" | {elapsed:.0f}s, eta {eta:.0f}s"
        )

    def message(self, text: str) -> None:
        if self._dashboard is not None:
            self._dashboard.message(text)
            return
        if self.mode == "bar":
            self.stream.write("\r" + " " * 120 + "\r")
        if self.mode != "off":
            self.stream.write(text + "\n")
            self.stream.flush()

    def close(self) -> None:
        if self._dashboard is not None:
            self._dashboard.close()
            self._dashboard = None
