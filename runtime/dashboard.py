"""The live terminal dashboard (``--progress rich``; the default on a terminal when rich is installed).

One panel redrawn from each metrics line, at most ``MAX_FPS`` times a second: progress and ETA,
reward (with a sparkline of recent steps) and the last evaluation, staleness, queue depths, wait
fractions, throughput, the last weight sync, and engine health from the ``faults/*`` counters.
Messages (the final eval, warnings) print above the panel. Redraws happen on the event loop when
a step lands, never from a thread of rich's own (``auto_refresh`` off), so nothing races the run.
"""

from __future__ import annotations

import collections
import time
from typing import Any, TextIO

from rich.console import Console, Group
from rich.live import Live
from rich.panel import Panel
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from runtime.metrics import fault_counts

MAX_FPS = 4
SPARK = "▁▂▃▄▅▆▇█"
HISTORY = 60  # steps of reward in the sparkline
BAD_FAULTS = ("engine_failures", "samples_failed_engine", "reward_error", "reward_timeout")


class Dashboard:
    def __init__(self, *, total_steps: int, stream: TextIO, force_terminal: bool | None = None):
        self.total = total_steps
        self.console = Console(file=stream, force_terminal=force_terminal)
        self.live = Live(console=self.console, auto_refresh=False, redirect_stdout=False, redirect_stderr=False)
        self.rewards: collections.deque[float] = collections.deque(maxlen=HISTORY)
        self._last_draw = -float("inf")
        self.live.start()

    def update(self, line: dict[str, Any], *, elapsed_s: float, eta_s: float, steps_per_s: float,
               last_eval: tuple[float, int] | None) -> None:
        self.rewards.append(line["reward/mean"])
        now = time.monotonic()
        final = line["step"] >= self.total
        if now - self._last_draw < 1 / MAX_FPS and not final:
            return
        self._last_draw = now
        self.live.update(render(line, total=self.total, elapsed_s=elapsed_s, eta_s=eta_s, steps_per_s=steps_per_s,
                                last_eval=last_eval, rewards=list(self.rewards)), refresh=True)

    def message(self, text: str) -> None:
        self.live.console.print(text, markup=False, highlight=False)

    def close(self) -> None:
        self.live.stop()


def render(line: dict[str, Any], *, total: int, elapsed_s: float, eta_s: float, steps_per_s: float,
           last_eval: tuple[float, int] | None, rewards: list[float]) -> Panel:
    step = line["step"]
    rows = Table.grid(padding=(0, 2))
    rows.add_column(style="bold cyan", justify="right")
    rows.add_column()
    rows.add_row("reward", f"{line['reward/mean']:.3f}  {sparkline(rewards)}")
    rows.add_row("eval", f"{last_eval[0]:.3f} at v{last_eval[1]}" if last_eval else "-")
    rows.add_row("staleness", f"max {line['staleness/max']}  mean {line['staleness/mean']:.2f}")
    rows.add_row("buffer", f"ready {line['buffer/groups']}  generating {line['buffer/pending']}  capacity "
                           f"{line['buffer/capacity']} groups  (engines serve v{line['buffer/served_version']})")
    rows.add_row("waiting", f"learner {line['learner/wait_frac']:4.0%}  generator {line['generator/wait_frac']:4.0%}")
    rows.add_row("throughput", f"{line['throughput/tokens_per_s']:,.0f} tokens/s  {steps_per_s:.2f} steps/s")
    if "sync/total_s" in line:
        rows.add_row("weight sync", f"v{line['sync/version']} in {line['sync/total_s']:.3f}s "
                                    f"(paused {line['sync/paused_s']:.3f}s)")
    rows.add_row("engines", engine_health(line))
    head = Table.grid(padding=(0, 2))
    head.add_row(ProgressBar(total=total, completed=step, width=40),
                 Text(f"step {step}/{total}  v{line['version']}  {elapsed_s:.0f}s elapsed  eta {eta_s:.0f}s"))
    return Panel(Group(head, rows), title="asyncrl", border_style="blue")


def engine_health(line: dict[str, Any]) -> Text:
    faults = fault_counts(line)
    if not faults:
        return Text("healthy, no faults", style="green")
    style = "red" if any(k in faults for k in BAD_FAULTS) else "yellow"
    return Text(", ".join(f"{k} {v}" for k, v in sorted(faults.items())), style=style)


def sparkline(values: list[float]) -> str:
    if not values:
        return ""
    lo, hi = min(values), max(values)
    span = hi - lo or 1.0
    return "".join(SPARK[min(len(SPARK) - 1, int((v - lo) / span * len(SPARK)))] for v in values)
