"""Progress on the terminal: one live line on a TTY, plain periodic lines otherwise."""

from __future__ import annotations

import sys
import time
from typing import Any, TextIO


class Progress:
    def __init__(self, *, total_steps: int, mode: str = "auto", stream: TextIO | None = None,
                 every_s: float = 10.0):
        self.stream = stream or sys.stderr
        self.total = total_steps
        if mode == "auto":
            mode = "bar" if self.stream.isatty() else "lines"
        self.mode = mode
        self.every_s = every_s
        self._start = time.monotonic()
        self._last_print = -float("inf")
        self._last_eval: float | None = None

    def update(self, line: dict[str, Any]) -> None:
        if "eval/reward" in line:
            self._last_eval = line["eval/reward"]
        if self.mode == "off":
            return
        now = time.monotonic()
        final = line["step"] >= self.total
        if self.mode == "lines" and now - self._last_print < self.every_s and not final:
            return
        self._last_print = now
        text = self._format(line, now)
        if self.mode == "bar":
            self.stream.write("\r" + text.ljust(120)[:160] + ("\n" if final else ""))
        else:
            self.stream.write(text + "\n")
        self.stream.flush()

    def _format(self, line: dict[str, Any], now: float) -> str:
        step, elapsed = line["step"], now - self._start
        eta = elapsed / step * (self.total - step) if step else float("nan")
        ev = f" eval {self._last_eval:.3f}" if self._last_eval is not None else ""
        return (
            f"step {step}/{self.total} v{line['version']} reward {line['reward/mean']:.3f}{ev}"
            f" | stale max {line['staleness/max']} mean {line['staleness/mean']:.2f}"
            f" | buffer {line['buffer/groups']}+{line['buffer/pending']} groups"
            f" | wait learner {line['learner/wait_frac']:.0%} gen {line['generator/wait_frac']:.0%}"
            f" | {elapsed:.0f}s, eta {eta:.0f}s"
        )

    def message(self, text: str) -> None:
        if self.mode == "bar":
            self.stream.write("\r" + " " * 120 + "\r")
        if self.mode != "off":
            self.stream.write(text + "\n")
            self.stream.flush()
