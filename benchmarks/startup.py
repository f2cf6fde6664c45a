"""Launch to first learner step, two checkouts side by side: ``python -m runtime.launch`` on the
default recipe, timed from the command to the first line of ``metrics.jsonl`` (the first step
includes the first batch's generation). Runs alternate A, B, A, B, ... so machine noise hits both.

    python benchmarks/startup.py --a /path/to/old/checkout --b . --runs 5
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def first_step_s(tree: Path) -> float:
    run_dir = Path(tempfile.mkdtemp()) / "run"
    t0 = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "runtime.launch", "--run-dir", str(run_dir), "--progress", "off",
                             "--trace", "false", "--eval-interval", "0"], cwd=tree, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True,
                            env=dict(os.environ, PYTHONPATH=str(tree)))
    metrics = run_dir / "metrics.jsonl"
    try:
        while not (metrics.exists() and metrics.read_text().strip()):
            if proc.poll() is not None:
                raise RuntimeError(f"{tree}: the run ended (exit {proc.returncode}) before a step")
            time.sleep(0.01)
        return time.monotonic() - t0
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--a", type=Path, required=True)
    p.add_argument("--b", type=Path, default=Path("."))
    p.add_argument("--runs", type=int, default=5)
    args = p.parse_args()
    times: dict[str, list[float]] = {"a": [], "b": []}
    for _ in range(args.runs):
        for key in ("a", "b"):
            times[key].append(first_step_s(getattr(args, key).resolve()))
    a, b = statistics.median(times["a"]), statistics.median(times["b"])
    print(f"launch to first step, median of {args.runs}: A {a:.2f} s  B {b:.2f} s  B/A {b / a:.2f}")
    print(f"A runs: {' '.join(f'{t:.2f}' for t in times['a'])}")
    print(f"B runs: {' '.join(f'{t:.2f}' for t in times['b'])}")


if __name__ == "__main__":
    main()
