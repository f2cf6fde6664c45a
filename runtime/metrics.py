"""The run directory's record: ``metrics.jsonl`` (one JSON object per learner step), ``summary.json``.

Keys other tools rely on, per step: ``step``, ``version``, ``time_s``, ``reward/mean``,
``eval/reward`` (on lines where an evaluation finished), ``staleness/max``, ``staleness/mean``,
``learner/wait_frac``, ``generator/wait_frac``, ``buffer/groups``, ``throughput/tokens_per_s``,
``ledger/*``. Summary: ``steps``, ``wall_s``, ``first_eval_reward``, ``final_eval_reward``,
``staleness_max_observed``, ``ledger``.

``MetricsLog.write`` is the one metrics API: the line goes to ``metrics.jsonl`` (always) and its
numeric values to every extra sink (``runtime.sinks``: TensorBoard, W&B, a user's own), each on a
thread of its own (``SinkThread``): a sink that blocks or raises never stops the run.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgspec

from runtime.sink_thread import SinkThread

if TYPE_CHECKING:
    from runtime.sinks import Sink


# counters under faults/* that are the protocol working, not something going wrong
ROUTINE = frozenset({"resumed_after_abort"})


def fault_counts(line: dict[str, Any]) -> dict[str, int]:
    """The nonzero ``faults/*`` counters of a metrics line that mean something went wrong."""
    return {k[7:]: v for k, v in line.items() if k.startswith("faults/") and v and k[7:] not in ROUTINE}


class MetricsLog:
    def __init__(self, path: Path, sinks: Sequence[Sink] = ()):
        self.path = path
        self.sinks: list[SinkThread] = [SinkThread(s) for s in sinks]
        self._file = open(path, "a", buffering=1)  # line-buffered: a killed run keeps whole lines
        self.lines = 0

    def write(self, line: dict[str, Any]) -> None:
        """One learner step (``line["step"]``): a JSON line, and its numbers to every sink."""
        self._file.write(json.dumps(_finite(line)) + "\n")
        self.lines += 1
        if self.sinks:
            numbers = numeric(line)
            for sink in self.sinks:
                sink.write(line["step"], numbers)

    def close(self) -> None:
        """Close the file and every sink (a sink that raises is warned about, never fatal)."""
        self._file.close()
        sinks, self.sinks = self.sinks, []
        for sink in sinks:
            sink.close()


def numeric(line: dict[str, Any]) -> dict[str, float]:
    """The finite numbers of a line (TensorBoard and W&B take scalars only; ``step`` is the x axis)."""
    return {k: float(v) for k, v in line.items()
            if k != "step" and isinstance(v, (int, float)) and math.isfinite(v)}


def _finite(obj: Any) -> Any:
    """JSON has no NaN/inf: write them as null rather than produce an unreadable line."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_finite(v) for v in obj]
    return obj


def write_json(path: Path, obj: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(_finite(msgspec.to_builtins(obj)), indent=2) + "\n")
    tmp.replace(path)


def read_metrics(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
