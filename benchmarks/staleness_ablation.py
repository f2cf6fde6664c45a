"""Staleness ablation (on ``copy4``) and over-provisioning throughput (on ``long_tail``).

    python benchmarks/staleness_ablation.py ablation --jobs 5 --out runs/ablation
    python benchmarks/staleness_ablation.py overprov --out runs/overprov

``ablation``: ``--max-staleness`` in {0,1,2,4,8} x correction in {none, tis, staleness} x seeds.
  - none:      no importance weight (plain PPO-clip on stale samples)
  - tis:       ``--use-tis`` (truncated at ``--tis-clip`` 2.0 whatever the staleness)
  - staleness: ``--use-tis --tis-clip-by-staleness 2,1.5,1.25,1.1`` (tighter caps for older tokens)
  Reports final eval reward (mean and min..max over seeds), wall time, and time to an eval reward
  threshold, and compares each setting with synchronous training (``--max-staleness 0``, none).
``overprov``: generation throughput with and without ``--over-sampling-batch-size`` (APRIL), one
  over-provisioned arm per ``--expiry`` rule (``--partial-expiry`` recompute, mask), on
  ``long_tail`` (the prompt says how many tokens to answer with; Pareto lengths, median 3, cap
  120), from two starting policies. ``trained``: a random-init policy ignores the prompt, so one
  is first trained on ``long_tail_warmup`` (``OUT/warmup``, reused by later sweeps) and the runs
  start from it (``--hf-checkpoint``): each answer's length is set by its prompt, long-tailed
  from the first step. ``random``: the random-init policy, whose lengths are geometric (about
  1/15 stop chance per token) whatever the prompt, so a tail is luck, not the prompt. Runs go one
  at a time, the two arms of a seed back to back (alternating which goes first), so a ratio is
  taken between neighbours. Each run's engine is polled (``/get_server_info``) for its running
  rows: occupancy. Reported: learner steps/s, engine tokens/s (every token the engines returned),
  trained tokens/s, mean running rows, learner and generator wait, expired groups, the mean
  trained answer length (a check for a bias toward short answers: skipping the long groups that
  hold a batch could train the short ones more often), and the per-seed ratios against no
  over-provisioning. Results and why: BENCHMARKS.md, "Over-provisioning on a long-tailed workload".

Every run is a real ``python -m runtime.launch`` subprocess with its own run directory; ``--jobs``
run at once (each uses three single-threaded processes: driver, engine, trainer), so give each job
three cores for wall times that mean something. Results go to ``OUT/results.jsonl`` (one line per
run, appended, so an interrupted sweep resumes), ``OUT/table.md`` and, for the ablation, ``OUT/*.png``
(``ablation_report.py``).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import re
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

from ablation_report import plot, table_ablation, table_overprov

ROOT = Path(__file__).resolve().parents[1]
# Over-provisioning runs: 8 groups x 4 samples per step, so the trainer's step (padded to the
# batch's longest answer) stays shorter than the engine's decode of a long answer (generation-
# bound); lr 1e-6 keeps the starting policy, so the lengths stay put through a run (a policy that
# learns would drift, and differently in each arm: over-provisioning trains other groups).
OVERPROV_FLAGS = ["--rollout-batch-size", "8", "--n-samples-per-prompt", "4", "--global-batch-size", "32",
                  "--normalize-advantage-std", "false", "--lr", "1e-6"]
# The starting policy: long_tail_warmup's heavier tail teaches long answers that long_tail's rare
# long targets alone do not (there the policy learns to stop early everywhere); Dr. GRPO
# (no std normalisation) and lr 5e-4 were stable where lr 1e-3 with std normalisation oscillated.
WARMUP_RECIPE = "long_tail_warmup"
WARMUP_FLAGS = ["--normalize-advantage-std", "false", "--lr", "5e-4"]
CORRECTIONS = {
    "none": [],
    "tis": ["--use-tis"],
    "staleness": ["--use-tis", "--tis-clip-by-staleness", "2,1.5,1.25,1.1"],
}


def run_one(out: Path, name: str, flags: list[str], timeout_s: float, probe: bool = False) -> dict:
    run_dir = out / name
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    t0 = time.monotonic()
    engine = EngineProbe(run_dir) if probe else None
    try:
        proc = subprocess.run([sys.executable, "-m", "runtime.launch", "--run-dir", str(run_dir), "--progress", "off",
                               "--trace", "false", *flags], cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=timeout_s)
    finally:
        if engine is not None:
            engine.stop()
    record = {"name": name, "flags": flags, "returncode": proc.returncode, "elapsed_s": time.monotonic() - t0}
    if proc.returncode != 0:
        return record | {"error": proc.stderr[-2000:]}
    summary = json.loads((run_dir / "summary.json").read_text())
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    evals = [(x["time_s"], x["step"], x["eval/reward"]) for x in lines if x.get("eval/reward") is not None]
    tokens = [x["throughput/tokens_per_s"] for x in lines if x.get("throughput/tokens_per_s")]
    if engine is not None:
        record |= throughput(lines, engine.samples)
    return record | {
        "final_eval_reward": summary["final_eval_reward"], "wall_s": summary["wall_s"], "steps": summary["steps"],
        "staleness_max_observed": summary["staleness_max_observed"], "ledger": summary["ledger"],
        "counters": summary["counters"], "evals": evals,
        "tokens_per_s": statistics.mean(tokens[len(tokens) // 4:]) if tokens else None,
        "samples_per_s": summary["steps"] * _batch(flags) / summary["wall_s"],
    }


class EngineProbe:
    """Polls a run's engine (``/get_server_info``) from a thread: its running rows over time.

    Each sample is (time, metrics lines written so far, running rows, decode steps): the line count
    places a sample in the run's steady state without sharing a clock with the run. The engine's address
    is read from its log; a restarted engine (none here) would not be followed.
    """

    def __init__(self, run_dir: Path, period_s: float = 0.05):
        self.run_dir, self.period_s = run_dir, period_s
        self.samples: list[tuple[float, int, int, int]] = []  # (time, lines, rows, decode steps)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, name="engine-probe", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def _poll(self) -> None:
        url, lines, metrics = None, 0, None
        while not self._stop.wait(self.period_s):
            if url is None:
                log = self.run_dir / "logs" / "engine0.log"
                found = re.search(r"serving .* on (http://\S+)", log.read_text()) if log.exists() else None
                url = found and found.group(1)
                continue
            if metrics is None and (self.run_dir / "metrics.jsonl").exists():
                metrics = open(self.run_dir / "metrics.jsonl")  # noqa: SIM115 (read as it grows)
            if metrics is not None:
                lines += metrics.read().count("\n")
            try:
                with urllib.request.urlopen(url + "/get_server_info", timeout=1.0) as r:
                    state = json.load(r)["internal_states"][0]
            except (OSError, ValueError):
                continue  # not up yet, or shutting down
            self.samples.append((time.monotonic(), lines, state["num_running_reqs"], state["decode_steps"]))
        if metrics is not None:
            metrics.close()


def engine_tokens(lines: list[dict]) -> list[float]:
    """Cumulative engine tokens at each metrics line, rebuilt from ``throughput/tokens_per_s``:
    the scheduler's rate over its last ``THROUGHPUT_WINDOW`` steps, the first window counted from
    the run's start (``runtime/step_line.py``)."""
    from runtime.step_line import THROUGHPUT_WINDOW

    span = THROUGHPUT_WINDOW - 1  # marks in the window, less one
    cum: list[float] = []
    for i, x in enumerate(lines):
        rate, t = x["throughput/tokens_per_s"], x["time_s"]
        cum.append(rate * t if i < span else cum[i - span] + rate * (t - lines[i - span]["time_s"]))
    return cum


def throughput(lines: list[dict], engine: list[tuple[float, int, int, int]], skip: float = 0.2) -> dict:
    """Figures of the steady state: the steps after the first ``skip`` of them (which hold the
    first evaluation), and the engine samples taken meanwhile."""
    k = max(1, int(len(lines) * skip))
    steps, dt = lines[k:], lines[-1]["time_s"] - lines[k - 1]["time_s"]
    cum = engine_tokens(lines)
    samples = [x["train/n_samples"] for x in steps]
    waits = [(x["time_s"] - prev["time_s"]) for prev, x in zip(lines[k - 1:], steps)]
    probe = [(t, r, d) for t, n, r, d in engine if k <= n < len(lines)]
    rows = [r for _, r, _ in probe]
    return {
        "steps_per_s": len(steps) / dt,
        "engine_tokens_per_s": (cum[-1] - cum[k - 1]) / dt,
        "trained_tokens_per_s": sum(x["train/n_tokens"] for x in steps) / dt,
        "trained_len_mean": sum(x["response_len/mean"] * n for x, n in zip(steps, samples)) / sum(samples),
        "learner_wait": sum(x["learner/wait_frac"] * w for x, w in zip(steps, waits)) / dt,
        "generator_wait": sum(x["generator/wait_frac"] * w for x, w in zip(steps, waits)) / dt,
        "expired_in_window": steps[-1]["buffer/expired"] - lines[k - 1]["buffer/expired"],
        # tokens kept as context but masked from the loss (--partial-expiry mask), over all handed out
        "masked_frac": (lambda m: m / (m + sum(x["train/n_tokens"] for x in steps)))(
            steps[-1].get("buffer/masked_tokens", 0) - lines[k - 1].get("buffer/masked_tokens", 0)),
        "rows_mean": statistics.mean(rows) if rows else None,
        "rows_median": statistics.median(rows) if rows else None,
        "decode_steps_per_s": (probe[-1][2] - probe[0][2]) / (probe[-1][0] - probe[0][0]) if len(probe) > 1 else None,
    }


def _batch(flags: list[str]) -> int:
    return int(flags[flags.index("--global-batch-size") + 1]) if "--global-batch-size" in flags else 128


def grid(mode: str, args: argparse.Namespace) -> dict[str, list[str]]:
    """Every run's flags, in the order to run them. Over-provisioning: the two arms of a seed are
    neighbours, and which goes first alternates, so a drift in the machine's speed hits both."""
    recipe = args.recipe or ("copy4" if mode == "ablation" else "long_tail")
    base = ["--recipe", recipe, "--num-rollout", str(args.num_rollout), "--eval-interval", str(args.eval_interval)]
    runs = {}
    for i, seed in enumerate(args.seeds):
        if mode == "ablation":
            for s in args.staleness:
                for corr in args.corrections:
                    runs[f"s{s}-{corr}-seed{seed}"] = base + ["--max-staleness", str(s), "--seed", str(seed),
                                                             *CORRECTIONS[corr]]
        else:
            for policy in args.policies:
                for s in args.staleness:
                    arms = [None, *args.expiry]
                    for arm in arms if i % 2 == 0 else arms[::-1]:
                        extra = ["--over-sampling-batch-size", str(args.over_sampling), "--partial-expiry", arm
                                 ] if arm else []
                        label = f"over{args.over_sampling}{'' if arm == 'recompute' else arm}" if arm else "over0"
                        runs[f"{policy}-s{s}-{label}-seed{seed}"] = base + [
                            "--max-staleness", str(s), "--seed", str(seed), "--rollout-seed", str(seed),
                            *OVERPROV_FLAGS, *args.extra_flags, *extra]
    return runs


def workload_lengths(model: Path, n_prompts: int = 1024, seed: int = 0) -> dict:
    """The workload's answer lengths: the starting policy sampled (temperature 1) on ``long_tail``'s
    training prompts, in-process on the engine's own model runner; and the targets it was asked."""
    import random

    import torch

    from launchers.recipes import long_tail
    from policies.engine.runner import ModelRunner, Row
    from policies.engine.sampling import RowParams

    torch.manual_seed(seed)
    task = long_tail.make_task(seed=42, eval_num_prompts=200)  # the runs' prompts (--rollout-seed aside)
    runner = ModelRunner.load(str(model))
    rows = [Row(i, task.train_prompt(i).input_ids, RowParams(1.0, 1.0, -1, random.Random(seed + i)))
            for i in range(n_prompts)]
    lengths = [0] * n_prompts
    for _ in range(long_tail.MAX_LEN + 1):
        if not rows:
            break
        tokens = runner.step(rows).tokens
        going = []
        for row, token in zip(rows, tokens):
            lengths[row.key] += 1
            if token not in task.stop_token_ids:
                going.append(Row(row.key, [*row.tokens, token], row.params))
        rows = going

    def spread(xs: list[int]) -> dict:
        xs = sorted(xs)
        return {"median": xs[len(xs) // 2], "p90": xs[int(0.9 * len(xs))], "p99": xs[int(0.99 * len(xs))],
                "max": xs[-1], "mean": round(statistics.mean(xs), 2)}

    targets = [int(task.train_prompt(i).label) for i in range(n_prompts)]
    return {"prompts": n_prompts, "answer_tokens": spread(lengths), "targets": spread(targets)}


def warmup_policy(out: Path, args: argparse.Namespace) -> Path:
    """The policy every over-provisioning run starts from, trained once (``OUT/warmup``) and reused."""
    ckpt = out / "warmup" / "ckpt"
    if not (ckpt / "latest").exists():
        print(f"warm-up: {args.warmup_steps} steps of {WARMUP_RECIPE} -> {ckpt}", flush=True)
        flags = ["--recipe", WARMUP_RECIPE, "--num-rollout", str(args.warmup_steps), "--save", str(ckpt),
                 "--eval-interval", "0", *WARMUP_FLAGS]
        rec = run_one(out, "warmup", flags, args.timeout)
        if rec["returncode"] != 0:
            raise SystemExit(f"warm-up failed: {rec['error'][-1000:]}")
    return ckpt / (ckpt / "latest").read_text().strip() / "model"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("mode", choices=["ablation", "overprov"])
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--jobs", type=int, default=1)
    ap.add_argument("--seeds", type=lambda s: [int(x) for x in s.split(",")], default=[1, 2, 3])
    ap.add_argument("--staleness", type=lambda s: [int(x) for x in s.split(",")], default=None)
    ap.add_argument("--corrections", type=lambda s: s.split(","), default=list(CORRECTIONS))
    ap.add_argument("--recipe", default=None, help="default: copy4 (ablation), long_tail (overprov)")
    ap.add_argument("--num-rollout", type=int, default=None, help="default: 300 (ablation), 120 (overprov)")
    ap.add_argument("--eval-interval", type=int, default=None, help="default: 20 (ablation), 0 (overprov)")
    ap.add_argument("--over-sampling", type=int, default=16, help="overprov: --over-sampling-batch-size")
    ap.add_argument("--expiry", type=lambda s: s.split(","), default=["recompute", "mask"],
                    help="overprov: the --partial-expiry of each over-provisioned arm")
    ap.add_argument("--warmup-steps", type=int, default=400, help="overprov: steps of the starting policy")
    ap.add_argument("--policies", type=lambda s: s.split(","), default=["trained", "random"],
                    help="overprov: start from the warm-up policy (prompt-set lengths) and/or a random-init "
                    "one (lengths geometric, about 1/15 stop chance per token, whatever the prompt)")
    ap.add_argument("--extra-flags", type=str.split, default=[], help="overprov: more launch flags, one string")
    ap.add_argument("--threshold", type=float, default=0.9)
    ap.add_argument("--timeout", type=float, default=1800)
    ap.add_argument("--report-only", action="store_true", help="rebuild table and plot from results.jsonl")
    args = ap.parse_args()
    ablation = args.mode == "ablation"
    args.staleness = args.staleness or ([0, 1, 2, 4, 8] if ablation else [0, 1])
    args.num_rollout = args.num_rollout or (300 if ablation else 120)
    args.eval_interval = args.eval_interval if args.eval_interval is not None else (20 if ablation else 0)
    out = args.out or ROOT / "runs" / args.mode
    out.mkdir(parents=True, exist_ok=True)
    results_path = out / "results.jsonl"
    done = {json.loads(x)["name"] for x in results_path.read_text().splitlines()} if results_path.exists() else set()
    todo = {k: v for k, v in grid(args.mode, args).items() if k not in done}
    probe = args.mode == "overprov"
    if probe and not args.report_only and any(k.startswith("trained-") for k in todo):
        model = warmup_policy(out, args)
        todo = {k: [*v, "--hf-checkpoint", str(model)] if k.startswith("trained-") else v for k, v in todo.items()}
        if not (out / "workload.json").exists():
            (out / "workload.json").write_text(json.dumps(workload_lengths(model), indent=1) + "\n")
    if not args.report_only and todo:
        print(f"{len(todo)} runs, {args.jobs} at a time -> {out}", flush=True)
        with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
            futures = {pool.submit(run_one, out, k, v, args.timeout, probe): k for k, v in todo.items()}
            for f in concurrent.futures.as_completed(futures):
                rec = f.result()
                with open(results_path, "a") as fh:
                    fh.write(json.dumps(rec) + "\n")
                print(f"{rec['name']}: final {rec.get('final_eval_reward')} wall {rec.get('wall_s', 0):.0f}s"
                      + (f" ERROR {rec['error'][-300:]}" if "error" in rec else ""), flush=True)
    results = [json.loads(x) for x in results_path.read_text().splitlines() if x.strip()]
    table = table_ablation(results, args.threshold) if args.mode == "ablation" else table_overprov(results)
    if (out / "workload.json").exists() and not ablation:
        workload = json.loads((out / "workload.json").read_text())
        table = f"workload (starting policy; tokens per answer, <eos> included): {json.dumps(workload)}\n\n" + table
    (out / "table.md").write_text(table + "\n")
    print(table)
    if ablation:  # over-provisioning runs keep their policy: no learning curve to draw
        plot(results, out, args.mode)


if __name__ == "__main__":
    main()
