"""Figures of merit of one run, from its ``metrics.jsonl`` lines: what ``runtime.report`` and
``runtime.tune`` compare runs by. Time is ``time_s``: seconds since the engines were ready."""

from __future__ import annotations

from typing import Any

import msgspec

LAST_STEPS_FRAC = 0.1  # "final reward" averages the last tenth of the steps (at least 1, at most 20)


class RunStats(msgspec.Struct):
    steps: int
    time_s: float  # engines ready -> last step
    steps_per_s: float
    tokens_per_s: float  # trained (loss-masked) tokens per second
    staleness_mean: float  # over trained tokens
    staleness_max: int
    final_reward: float  # mean training reward over the last steps
    final_eval: float | None  # the last evaluation in the metrics (the summary has the final one)
    learner_wait: float  # mean over steps
    generator_wait: float


def run_stats(lines: list[dict[str, Any]]) -> RunStats:
    if not lines:
        raise ValueError("no metrics lines: the run took no step")
    last = lines[-1]
    elapsed = max(last["time_s"], 1e-9)
    tokens = [line.get("train/n_tokens") or 0 for line in lines]
    n_last = min(20, max(1, round(len(lines) * LAST_STEPS_FRAC)))
    evals = [line["eval/reward"] for line in lines if line.get("eval/reward") is not None]
    return RunStats(
        steps=last["step"], time_s=last["time_s"], steps_per_s=len(lines) / elapsed,
        tokens_per_s=sum(tokens) / elapsed,
        staleness_mean=(sum(line["staleness/mean"] * n for line, n in zip(lines, tokens)) / sum(tokens)
                        if sum(tokens) else mean([line["staleness/mean"] for line in lines])),
        staleness_max=max(line["staleness/max"] for line in lines),
        final_reward=mean([line["reward/mean"] for line in lines[-n_last:]]),
        final_eval=evals[-1] if evals else None,
        learner_wait=mean([line["learner/wait_frac"] for line in lines]),
        generator_wait=mean([line["generator/wait_frac"] for line in lines]),
    )


def mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")
