"""Staleness ablation (on ``copy4``) and over-provisioning throughput (on ``copy_long``).

    python benchmarks/staleness_ablation.py ablation --jobs 5 --out runs/ablation
    python benchmarks/staleness_ablation.py overprov --jobs 4 --out runs/overprov

``ablation``: ``--max-staleness`` in {0,1,2,4,8} x correction in {none, tis, staleness} x seeds.
  - none:      no importance weight (plain PPO-clip on stale samples)
  - tis:       ``--use-tis`` (truncated at ``--tis-clip`` 2.0 whatever the staleness)
  - staleness: ``--use-tis --tis-clip-by-staleness 2,1.5,1.25,1.1`` (tighter caps for older tokens)
  Reports final eval reward (mean and min..max over seeds), wall time, and time to an eval reward
  threshold, and compares each setting with synchronous training (``--max-staleness 0``, none).
``overprov``: the long-tailed recipe with and without ``--over-sampling-batch-size`` (APRIL),
  reporting trained samples per second and engine tokens per second, and their ratio.

Every run is a real ``python -m runtime.launch`` subprocess with its own run directory; ``--jobs``
run at once (each uses three single-threaded processes: driver, engine, trainer), so give each job
three cores for wall times that mean something. Results go to ``OUT/results.jsonl`` (one line per
run, appended, so an interrupted sweep resumes), ``OUT/table.md`` and ``OUT/*.png``.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CORRECTIONS = {
    "none": [],
    "tis": ["--use-tis"],
    "staleness": ["--use-tis", "--tis-clip-by-staleness", "2,1.5,1.25,1.1"],
}


def run_one(out: Path, name: str, flags: list[str], timeout_s: float) -> dict:
    run_dir = out / name
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "runtime.launch", "--run-dir", str(run_dir), "--progress", "off",
                           "--trace", "false", *flags], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout_s)
    record = {"name": name, "flags": flags, "returncode": proc.returncode, "elapsed_s": time.monotonic() - t0}
    if proc.returncode != 0:
        return record | {"error": proc.stderr[-2000:]}
    summary = json.loads((run_dir / "summary.json").read_text())
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    evals = [(x["time_s"], x["step"], x["eval/reward"]) for x in lines if x.get("eval/reward") is not None]
    tokens = [x["throughput/tokens_per_s"] for x in lines if x.get("throughput/tokens_per_s")]
    return record | {
        "final_eval_reward": summary["final_eval_reward"], "wall_s": summary["wall_s"], "steps": summary["steps"],
        "staleness_max_observed": summary["staleness_max_observed"], "ledger": summary["ledger"],
        "counters": summary["counters"], "evals": evals,
        "tokens_per_s": statistics.mean(tokens[len(tokens) // 4:]) if tokens else None,
        "samples_per_s": summary["steps"] * _batch(flags) / summary["wall_s"],
    }


def _batch(flags: list[str]) -> int:
    return int(flags[flags.index("--global-batch-size") + 1]) if "--global-batch-size" in flags else 128


def grid(mode: str, args: argparse.Namespace) -> dict[str, list[str]]:
    recipe = args.recipe or ("copy4" if mode == "ablation" else "copy_long")
    base = ["--recipe", recipe, "--num-rollout", str(args.num_rollout), "--eval-interval", str(args.eval_interval)]
    runs = {}
    for seed in args.seeds:
        if mode == "ablation":
            for s in args.staleness:
                for corr in args.corrections:
                    runs[f"s{s}-{corr}-seed{seed}"] = base + ["--max-staleness", str(s), "--seed", str(seed),
                                                             *CORRECTIONS[corr]]
        else:
            for s in args.staleness:
                for over in (None, args.over_sampling):
                    extra = ["--over-sampling-batch-size", str(over)] if over else []
                    runs[f"s{s}-over{over or 0}-seed{seed}"] = base + ["--max-staleness", str(s), "--seed",
                                                                      str(seed), *extra]
    return runs


def first_time_at(evals: list, threshold: float) -> float | None:
    return next((t for t, _, r in evals if r >= threshold), None)


def _spread(values: list[float]) -> str:
    if not values:
        return "-"
    return f"{statistics.mean(values):.3f} ({min(values):.2f}..{max(values):.2f})"


def table_ablation(results: list[dict], threshold: float) -> str:
    by: dict[tuple[int, str], list[dict]] = {}
    for r in results:
        if r.get("final_eval_reward") is None:
            continue
        s, corr, _ = r["name"].split("-")
        by.setdefault((int(s[1:]), corr), []).append(r)
    sync = statistics.mean(r["final_eval_reward"] for r in by.get((0, "none"), [])) if (0, "none") in by else None
    sync_wall = statistics.mean(r["wall_s"] for r in by.get((0, "none"), [])) if (0, "none") in by else None
    rows = [f"| max_staleness | correction | runs | final eval reward, mean (min..max) | wall s | "
            f"time to eval {threshold} s (runs reaching it) | vs sync reward | vs sync wall |",
            "|---|---|---|---|---|---|---|---|"]
    for (s, corr), rs in sorted(by.items()):
        finals = [r["final_eval_reward"] for r in rs]
        walls = [r["wall_s"] for r in rs]
        reach = [t for r in rs if (t := first_time_at(r["evals"], threshold)) is not None]
        d_reward = f"{statistics.mean(finals) - sync:+.3f}" if sync is not None else "-"
        d_wall = f"{statistics.mean(walls) / sync_wall:.2f}x" if sync_wall else "-"
        rows.append(f"| {s} | {corr} | {len(rs)} | {_spread(finals)} | {statistics.mean(walls):.0f} | "
                    f"{statistics.mean(reach):.0f} ({len(reach)}/{len(rs)}) | {d_reward} | {d_wall} |"
                    if reach else f"| {s} | {corr} | {len(rs)} | {_spread(finals)} | {statistics.mean(walls):.0f} | "
                    f"- (0/{len(rs)}) | {d_reward} | {d_wall} |")
    return "\n".join(rows)


def table_overprov(results: list[dict]) -> str:
    by: dict[tuple[str, str], list[dict]] = {}
    for r in results:
        if r.get("final_eval_reward") is None:
            continue
        s, over, _ = r["name"].split("-")
        by.setdefault((s, over), []).append(r)
    rows = ["| max_staleness | over-sampling | runs | samples/s | engine tokens/s | expired groups | "
            "final eval reward | samples/s vs none |", "|---|---|---|---|---|---|---|---|"]
    for (s, over), rs in sorted(by.items()):
        sps = statistics.mean(r["samples_per_s"] for r in rs)
        base = by.get((s, "over0"))
        ratio = sps / statistics.mean(r["samples_per_s"] for r in base) if base else None
        expired = statistics.mean(r["counters"].get("expired_recompute", 0) for r in rs)
        rows.append(f"| {s[1:]} | {over[4:]} | {len(rs)} | {sps:.1f} | "
                    f"{statistics.mean(r['tokens_per_s'] or 0 for r in rs):.0f} | {expired:.0f} | "
                    f"{_spread([r['final_eval_reward'] for r in rs])} | {f'{ratio:.2f}x' if ratio else '-'} |")
    return "\n".join(rows)


def plot(results: list[dict], out: Path, mode: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot")
        return
    fig, ax = plt.subplots(figsize=(8, 5))
    groups: dict[str, list[dict]] = {}
    for r in results:
        if r.get("evals"):
            groups.setdefault(r["name"].rsplit("-", 1)[0], []).append(r)
    colors = {}  # one colour per max_staleness, one line style per variant
    styles = {"none": "-", "tis": "--", "staleness": ":", "over0": "-"}
    for label, rs in sorted(groups.items(), key=lambda kv: (int(kv[0].split("-")[0][1:]), kv[0])):
        stale, variant = label.split("-")
        color = colors.setdefault(stale, f"C{len(colors)}")
        n = min(len(r["evals"]) for r in rs)
        t = [statistics.mean(r["evals"][i][0] for r in rs) for i in range(n)]
        y = [statistics.mean(r["evals"][i][2] for r in rs) for i in range(n)]
        ax.plot(t, y, marker=".", color=color, linestyle=styles.get(variant, "-."), label=f"{label} (n={len(rs)})")
    ax.set_xlabel("wall time (s)")
    ax.set_ylabel("eval reward (mean over seeds)")
    ax.set_title(f"eval reward against wall time ({mode})")
    ax.legend(fontsize=7, ncol=2)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / f"{mode}.png", dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("mode", choices=["ablation", "overprov"])
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--jobs", type=int, default=1)
    ap.add_argument("--seeds", type=lambda s: [int(x) for x in s.split(",")], default=[1, 2, 3])
    ap.add_argument("--staleness", type=lambda s: [int(x) for x in s.split(",")], default=None)
    ap.add_argument("--corrections", type=lambda s: s.split(","), default=list(CORRECTIONS))
    ap.add_argument("--recipe", default=None, help="default: copy4 (ablation), copy_long (overprov)")
    ap.add_argument("--num-rollout", type=int, default=300)
    ap.add_argument("--eval-interval", type=int, default=20)
    ap.add_argument("--over-sampling", type=int, default=32)
    ap.add_argument("--threshold", type=float, default=0.9)
    ap.add_argument("--timeout", type=float, default=1800)
    ap.add_argument("--report-only", action="store_true", help="rebuild table and plot from results.jsonl")
    args = ap.parse_args()
    args.staleness = args.staleness or ([0, 1, 2, 4, 8] if args.mode == "ablation" else [1, 2])
    out = args.out or ROOT / "runs" / args.mode
    out.mkdir(parents=True, exist_ok=True)
    results_path = out / "results.jsonl"
    done = {json.loads(x)["name"] for x in results_path.read_text().splitlines()} if results_path.exists() else set()
    todo = {k: v for k, v in grid(args.mode, args).items() if k not in done}
    if not args.report_only and todo:
        print(f"{len(todo)} runs, {args.jobs} at a time -> {out}", flush=True)
        with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
            futures = {pool.submit(run_one, out, k, v, args.timeout): k for k, v in todo.items()}
            for f in concurrent.futures.as_completed(futures):
                rec = f.result()
                with open(results_path, "a") as fh:
                    fh.write(json.dumps(rec) + "\n")
                print(f"{rec['name']}: final {rec.get('final_eval_reward')} wall {rec.get('wall_s', 0):.0f}s"
                      + (f" ERROR {rec['error'][-300:]}" if "error" in rec else ""), flush=True)
    results = [json.loads(x) for x in results_path.read_text().splitlines() if x.strip()]
    table = table_ablation(results, args.threshold) if args.mode == "ablation" else table_overprov(results)
    (out / "table.md").write_text(table + "\n")
    print(table)
    plot(results, out, args.mode)


if __name__ == "__main__":
    main()
