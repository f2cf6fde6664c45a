"""What does the timeline trace (``trace.json``, on by default) cost? Two measurements side by side.

    python benchmarks/trace_overhead.py [--pairs 2] [--num-rollout 60] [extra launch flags...]

1. Cost model, robust to a noisy machine: the cost of one span (a lane, two clock reads, the
   encoding and the buffered write, averaged over many) x the spans a real run records per step,
   as a share of the real run's seconds per step.
2. End to end: ``--pairs`` runs with ``--trace true`` and ``--trace false``, interleaved, each
   figure the steady-state seconds per step (skipping the first ``--warmup`` steps). On a shared
   machine the run-to-run spread is larger than the overhead; the spread is printed with it.
Target (issue 6): overhead < 3% of step time.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from runtime.core import trace
from runtime.metrics import read_metrics

ROOT = Path(__file__).resolve().parents[1]
CONCURRENT = 128  # requests in flight in a default-recipe step (16 groups x 8 samples)


def span_cost_us(n: int = 51_200) -> float:
    """Microseconds one request span adds: traced loop minus the same loop outside a traced run.
    Spans are held ``CONCURRENT`` at a time, as a step's requests are, so lanes are really used."""

    async def loop(traced: bool, path: Path) -> float:
        tracer = trace.Tracer(path) if traced else None
        trace.activate(tracer)
        t0 = time.perf_counter()
        for i in range(0, n, CONCURRENT):
            spans = [trace.span("requests", "request", group=i + j) for j in range(CONCURRENT)]
            for s in spans:
                s.__enter__()
            for s in spans:
                s.set(weight_version="3", tokens=6, finish="stop")
                s.__exit__(None, None, None)
        if tracer is not None:
            tracer.close()
        return time.perf_counter() - t0

    with tempfile.TemporaryDirectory() as tmp:
        best_on = min(asyncio.run(loop(True, Path(tmp) / "t.json")) for _ in range(3))
        best_off = min(asyncio.run(loop(False, Path(tmp) / "u.json")) for _ in range(3))
    return (best_on - best_off) / n * 1e6


def run(run_dir: Path, traced: bool, num_rollout: int, extra: list[str]) -> Path:
    cmd = [sys.executable, "-m", "runtime.launch", "--run-dir", str(run_dir), "--num-rollout", str(num_rollout),
           "--progress", "off", "--trace", "true" if traced else "false", *extra]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"run failed: {' '.join(cmd)}\n{proc.stderr[-2000:]}")
    return run_dir


def step_s(run_dir: Path, warmup: int) -> float:
    lines = read_metrics(run_dir / "metrics.jsonl")
    a, b = lines[min(warmup, len(lines) - 2)], lines[-1]
    return (b["time_s"] - a["time_s"]) / (b["step"] - a["step"])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pairs", type=int, default=2)
    p.add_argument("--num-rollout", type=int, default=60)
    p.add_argument("--warmup", type=int, default=5)
    args, extra = p.parse_known_args()

    per_span = span_cost_us()
    on: list[float] = []
    off: list[float] = []
    events_per_step: list[float] = []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.pairs):
            for traced in (True, False) if i % 2 == 0 else (False, True):  # alternate who goes first
                d = run(Path(tmp) / f"{i}-{traced}", traced, args.num_rollout, extra)
                (on if traced else off).append(step_s(d, args.warmup))
                if traced:
                    info = trace.load_events(d / "trace.json")[-1]["args"]
                    events_per_step.append(info["events"] / len(read_metrics(d / "metrics.jsonl")))
    step = statistics.median(on + off)
    eps = statistics.median(events_per_step)
    print(f"span cost: {per_span:.2f} us; spans per step: {eps:.0f}; step: {step * 1e3:.1f} ms")
    print(f"cost model: {per_span * eps / 1e3:.2f} ms per step = {per_span * 1e-6 * eps / step:.2%} of step time")
    med_on, med_off = statistics.median(on), statistics.median(off)
    print(f"end to end, s/step: trace on {', '.join(f'{x:.4f}' for x in on)} (median {med_on:.4f}); "
          f"off {', '.join(f'{x:.4f}' for x in off)} (median {med_off:.4f})")
    spread = (max(on + off) - min(on + off)) / step
    print(f"end to end: on vs off {med_on / med_off - 1:+.1%} (run-to-run spread {spread:.0%} of a step)")


if __name__ == "__main__":
    main()
