"""The run directory's record: ``metrics.jsonl`` (one JSON object per learner step), ``summary.json``.

Keys other tools rely on, per step: ``step``, ``version``, ``time_s``, ``reward/mean``,
``eval/reward`` (on lines where an evaluation finished), ``staleness/max``, ``staleness/mean``,
``learner/wait_frac``, ``generator/wait_frac``, ``buffer/groups``, ``throughput/tokens_per_s``,
``ledger/*``. Summary: ``steps``, ``wall_s``, ``first_eval_reward``, ``final_eval_reward``,
``staleness_max_observed``, ``ledger``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import msgspec


class MetricsLog:
    def __init__(self, path: Path):
        self.path = path
        self._file = open(path, "a", buffering=1)  # line-buffered: a killed run keeps whole lines
        self.lines = 0

    def write(self, line: dict[str, Any]) -> None:
        self._file.write(json.dumps(_finite(line)) + "\n")
        self.lines += 1

    def close(self) -> None:
        self._file.close()


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
