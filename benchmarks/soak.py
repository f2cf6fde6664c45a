"""Soak with chaos: a long default-recipe run while engines are SIGKILLed and one is hung.

    python benchmarks/soak.py --steps 2000 --out runs/soak

Samples the resident memory of every process of the run (driver, trainer, each engine by slot,
including replacements) every ``--every`` seconds, and reads queue depths from ``metrics.jsonl``.
Prints first-quarter and last-quarter means (flat = no leak), the run's ledger, and the recovery
time of every engine restart (fault injected -> serving again, from ``summary.json``).
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]


def role(p: psutil.Process) -> str | None:
    cmd = " ".join(p.cmdline())
    if "policies.engine.server" in cmd:
        m = re.search(r"engine(\d+)\.log", cmd)
        return f"engine{m.group(1)}" if m else "engine"
    if "policies.trainer_process" in cmd:
        return "trainer"
    return None


def sample(root: psutil.Process) -> dict[str, float]:
    out = {"driver": root.memory_info().rss / 2**20}
    for child in root.children(recursive=True):
        try:
            if (name := role(child)) is not None:
                out[name] = out.get(name, 0.0) + child.memory_info().rss / 2**20
        except psutil.NoSuchProcess:  # killed by chaos between listing and reading
            continue
    return out


def quarters(values: list[float]) -> tuple[float, float, float]:
    """Means of the first, second and last quarter (the first holds start-up: imports, model load)."""
    q = max(1, len(values) // 4)
    return statistics.mean(values[:q]), statistics.mean(values[q:2 * q] or values[:q]), statistics.mean(values[-q:])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "soak")
    ap.add_argument("--every", type=float, default=2.0)
    ap.add_argument("--kill-interval", type=float, default=20.0)
    ap.add_argument("--hang-at", type=float, default=60.0)
    args = ap.parse_args()
    cmd = [sys.executable, "-m", "runtime.launch", "--run-dir", str(args.out), "--num-rollout", str(args.steps),
           "--rollout-num-engines", "2", "--chaos-kill-interval", str(args.kill_interval), "--chaos-hang-at",
           str(args.hang_at), "--max-engine-restarts", "10000", "--eval-interval", "100", "--progress", "off",
           "--trace", "false"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    root, rss, t0 = psutil.Process(proc.pid), [], time.monotonic()
    while proc.poll() is None:
        try:
            rss.append((time.monotonic() - t0, sample(root)))
        except psutil.NoSuchProcess:
            break
        time.sleep(args.every)  # a sampling period, not a wait for state
    err = proc.stderr.read() if proc.stderr else ""
    if proc.wait() != 0:
        sys.exit(f"run failed ({proc.returncode}):\n{err[-3000:]}")
    summary = json.loads((args.out / "summary.json").read_text())
    lines = [json.loads(x) for x in (args.out / "metrics.jsonl").read_text().splitlines() if x.strip()]
    print(f"steps {summary['steps']}, wall {summary['wall_s']:.0f}s, eval {summary['first_eval_reward']:.3f} -> "
          f"{summary['final_eval_reward']:.3f}, staleness max {summary['staleness_max_observed']}")
    print(f"ledger {summary['ledger']}")
    print("counters", {k: v for k, v in summary["counters"].items()})
    rec = [r["recovery_s"] for r in summary["engine_restarts"] if r["recovery_s"] is not None]
    stale_first = [r for r in summary["engine_restarts"]
                   if r["first_version"] is not None and int(r["first_version"]) < r["current_at_first"]]
    if rec:
        print(f"restarts {len(rec)}: recovery (fault -> serving) mean {statistics.mean(rec):.1f}s, "
              f"median {statistics.median(rec):.1f}s, max {max(rec):.1f}s; first request older than current: "
              f"{len(stale_first)}")
    (args.out / "rss.jsonl").write_text("".join(json.dumps({"t": t, **r}) + "\n" for t, r in rss))
    print("\n| process | RSS MiB, first quarter | second quarter | last quarter | last vs second |\n"
          "|---|---|---|---|---|")
    for name in sorted({k for _, s in rss for k in s}):
        a, b, c = quarters([s[name] for _, s in rss if name in s])
        print(f"| {name} | {a:.0f} | {b:.0f} | {c:.0f} | {100 * (c - b) / b:+.1f}% |")
    print("\n| queue | first quarter | second quarter | last quarter |\n|---|---|---|---|")
    for key in ("buffer/groups", "buffer/pending", "ledger/in_flight"):
        a, b, c = quarters([x[key] for x in lines if x.get(key) is not None])
        print(f"| {key} | {a:.1f} | {b:.1f} | {c:.1f} |")


if __name__ == "__main__":
    main()
