"""The curve and the time budget of a real-model run (``--recipe smollm2_chain_sum``), from its run
directory: held-out greedy accuracy at each evaluation, seconds per step, and where the wall time
went (engine start, training, evaluation, the learner waiting for data), read from
``metrics.jsonl``, ``summary.json`` and ``trace.json``.

    python benchmarks/real_model_curve.py RUN_DIR [RUN_DIR ...]   # several: a run and its resumes
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def spans(run_dir: Path) -> dict[str, float]:
    """Seconds per span name on the scheduler, learner and evaluator tracks."""
    path = run_dir / "trace.json"
    if not path.is_file():
        return {}
    text = path.read_text().strip().rstrip(",")
    events = json.loads(text if text.endswith("]") else text + "]")
    out: dict[str, float] = {}
    for e in events:
        if e.get("ph") == "X" and e.get("name") in ("start engines", "train", "save weights", "eval", "weight sync"):
            out[e["name"]] = out.get(e["name"], 0.0) + e.get("dur", 0.0) / 1e6
    return out


def report(run_dirs: list[Path]) -> None:
    print("| run | step | time_s | eval (held-out greedy) | train reward | train_s |")
    print("|---|---|---|---|---|---|")
    for run_dir in run_dirs:
        for line in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()):
            ev = next((v for k, v in line.items() if k.startswith("eval/") and k.count("/") == 1
                       and k not in ("eval/reward", "eval/version", "eval/wall_s")), line.get("eval/reward"))
            evs = f"{ev:.2f} (v{line['eval/version']})" if ev is not None else ""
            print(f"| {run_dir.name} | {line['step']} | {line['time_s']:.0f} | {evs} | {line['reward/mean']:.3f} "
                  f"| {line['learner/train_s']:.1f} |")
    for run_dir in run_dirs:
        summary = json.loads((run_dir / "summary.json").read_text())
        lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
        evals = [(e["version"], e["sets"]) for e in summary.get("evals", [])]
        print(f"\n{run_dir.name}: status {summary['status']}, {summary['steps']} steps, wall {summary['wall_s']:.0f}s "
              f"(after engine start), evals {evals}")
        if len(lines) > 1:
            per_step = (lines[-1]["time_s"] - lines[0]["time_s"]) / (len(lines) - 1)
            print(f"  s/step {per_step:.1f} (steps {lines[0]['step']}..{lines[-1]['step']}); mean learner wait "
                  f"{sum(x['learner/wait_frac'] for x in lines) / len(lines):.2f}")
        print("  seconds by span: " + ", ".join(f"{k} {v:.0f}" for k, v in spans(run_dir).items()))


if __name__ == "__main__":
    report([Path(p) for p in sys.argv[1:]])
