"""``python -m runtime.tune``: short runs over a grid of async knobs, and the setting to use.

    python -m runtime.tune --quick                       # default recipe, ~2-4 minutes on 2 cores
    python -m runtime.tune --config my.toml --staleness 0,1,2,4,8 --capacity auto,32 -- --lr 5e-4

Each grid point is one ``python -m runtime.launch`` subprocess with its own run directory under
``--out``, run one after another (the points would otherwise compete for the same cores and the
throughputs would mean nothing). The grid: ``--max-staleness`` x ``--buffer-capacity`` (``auto``
is the launch default, ``(s + 1) x groups per step``; points whose effective capacity repeats
another's are skipped), x ``--over-sampling-batch-size`` when launch has that flag (default: unset
and twice the rollout batch; not in ``--quick``). Flags after ``--`` go to every run, last, so
they override the tune's own defaults.

Writes ``tune.md`` (a table: steps/s, trained tokens/s, mean token staleness, final reward, wall
time), ``tune.png`` (throughput against staleness, coloured by final eval reward) and
``tune.json``. The rule (``recommend``): among completed runs whose throughput is within
``--margin`` of the best, the least stale; ties go to the faster.
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import json
import subprocess
import sys
import time
from pathlib import Path

import msgspec

from runtime import cli
from runtime import config as C
from runtime.metrics import read_metrics, write_json
from runtime.run_stats import RunStats, run_stats

ROOT = Path(__file__).resolve().parents[1]
QUICK = {"staleness": "0,1,2,4", "capacity": "auto", "num_rollout": 60}
FULL = {"staleness": "0,1,2,4,8", "capacity": "auto,2x", "num_rollout": 100}
# the tune's defaults for every run, before the user's flags: evaluations only first and last (they
# share the engines and would blur throughput), no live display, and trace.json left on
RUN_DEFAULTS = ["--eval-interval", "0", "--progress", "off"]


class Point(msgspec.Struct, frozen=True):
    max_staleness: int
    buffer_capacity: int | None  # None: the launch default
    over_sampling_batch_size: int | None = None

    @property
    def name(self) -> str:
        cap = "auto" if self.buffer_capacity is None else str(self.buffer_capacity)
        over = "" if self.over_sampling_batch_size is None else f"-o{self.over_sampling_batch_size}"
        return f"s{self.max_staleness}-c{cap}{over}"

    def flags(self) -> list[str]:
        out = ["--max-staleness", str(self.max_staleness)]
        if self.buffer_capacity is not None:
            out += ["--buffer-capacity", str(self.buffer_capacity)]
        if self.over_sampling_batch_size is not None:
            out += ["--over-sampling-batch-size", str(self.over_sampling_batch_size)]
        return out


class Result(msgspec.Struct):
    point: Point
    status: str  # completed | failed
    wall_s: float  # the subprocess, start-up included
    stats: RunStats | None = None
    final_eval: float | None = None
    error: str = ""


# -- the grid --------------------------------------------------------------------------------------
def grid(staleness: list[int], capacities: list[str], groups_per_step: int,
         over_sampling: list[int | None]) -> list[Point]:
    """Points in order, each effective (staleness, capacity) once; ``Nx`` is N x groups per step."""
    points, seen = [], set()
    for s, cap, over in itertools.product(staleness, capacities, over_sampling):
        bound = (s + 1) * groups_per_step
        explicit = None if cap == "auto" else _capacity(cap, groups_per_step)
        effective = bound if explicit is None else min(explicit, bound)
        if explicit is not None and explicit < groups_per_step:
            raise ValueError(f"--capacity {cap}: {explicit} groups cannot hold one step's {groups_per_step}")
        if (s, effective, over) in seen:
            continue
        seen.add((s, effective, over))
        points.append(Point(s, None if effective == bound else explicit, over))
    return points


def _capacity(text: str, groups_per_step: int) -> int:
    return int(text[:-1]) * groups_per_step if text.endswith("x") else int(text)


# -- the rule --------------------------------------------------------------------------------------
def recommend(results: list[Result], margin: float) -> tuple[Result, str]:
    """The least stale completed run whose steps/s is within ``margin`` of the best; and why."""
    done = [r for r in results if r.status == "completed" and r.stats is not None]
    if not done:
        raise ValueError("no run completed: nothing to recommend")
    best = max(done, key=lambda r: r.stats.steps_per_s)
    floor = (1 - margin) * best.stats.steps_per_s
    close = [r for r in done if r.stats.steps_per_s >= floor]
    pick = min(close, key=lambda r: (r.stats.staleness_mean, -r.stats.steps_per_s))
    why = (f"the fastest run, {best.point.name}, made {best.stats.steps_per_s:.2f} steps/s; "
           f"{len(close)} of {len(done)} runs are within {margin:.0%} of it (>= {floor:.2f} steps/s), and of "
           f"those {pick.point.name} trains on the freshest data (mean token staleness "
           f"{pick.stats.staleness_mean:.2f}) at {pick.stats.steps_per_s:.2f} steps/s")
    return pick, why


# -- running ---------------------------------------------------------------------------------------
def run_point(point: Point, *, base: list[str], extra: list[str], num_rollout: int, out: Path,
              timeout_s: float) -> Result:
    run_dir = out / point.name
    cmd = [sys.executable, "-m", "runtime.launch", "--run-dir", str(run_dir), *base, *point.flags(),
           "--num-rollout", str(num_rollout), *RUN_DEFAULTS, *extra]
    started = time.monotonic()
    with open(out / f"{point.name}.log", "w") as log:
        try:
            rc = subprocess.run(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, timeout=timeout_s).returncode
        except subprocess.TimeoutExpired:
            rc = None
    wall = time.monotonic() - started
    summary_path = run_dir / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    if rc != 0:
        why = f"timed out after {timeout_s:.0f}s" if rc is None else f"exit {rc}"
        return Result(point, "failed", wall, error=f"{why}: {summary.get('error', '')} (see {log.name})".strip())
    return Result(point, "completed", wall, stats=run_stats(read_metrics(run_dir / "metrics.jsonl")),
                  final_eval=summary.get("final_eval_reward"))


# -- output ----------------------------------------------------------------------------------------
def table(results: list[Result], pick: Result | None) -> str:
    rows = ["| setting | steps/s | trained tokens/s | mean staleness | max staleness | final train reward "
            "| final eval reward | wall s | |", "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        mark = "**recommended**" if r is pick else ""
        if r.stats is None:
            rows.append(f"| {r.point.name} | failed: {r.error} | | | | | | {r.wall_s:.0f} | |")
            continue
        s = r.stats
        ev = "-" if r.final_eval is None else f"{r.final_eval:.3f}"
        rows.append(f"| {r.point.name} | {s.steps_per_s:.2f} | {s.tokens_per_s:,.0f} | {s.staleness_mean:.2f} "
                    f"| {s.staleness_max} | {s.final_reward:.3f} | {ev} | {r.wall_s:.0f} | {mark} |")
    return "\n".join(rows)


def plot(results: list[Result], path: Path, pick: Result | None, margin: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [r for r in results if r.stats is not None]
    reward = [r.final_eval if r.final_eval is not None else r.stats.final_reward for r in done]
    fig, ax = plt.subplots(figsize=(8, 5))
    dots = ax.scatter([r.stats.staleness_mean for r in done], [r.stats.steps_per_s for r in done], c=reward,
                      cmap="viridis", s=90, edgecolors="black", zorder=3)
    for r in done:
        ax.annotate(r.point.name + ("  (recommended)" if r is pick else ""),
                    (r.stats.staleness_mean, r.stats.steps_per_s), textcoords="offset points", xytext=(6, 6),
                    fontsize=9, fontweight="bold" if r is pick else "normal")
    if pick is not None and len(done) > 1:
        floor = (1 - margin) * max(r.stats.steps_per_s for r in done)
        ax.axhline(floor, ls="--", color="gray", label=f"within {margin:.0%} of the fastest")
        ax.legend(loc="lower right")
    ax.margins(x=0.2, y=0.15)  # room for the labels
    fig.colorbar(dots, ax=ax, label="final eval reward (train reward where no eval)")
    ax.set_xlabel("mean staleness of trained tokens (policy versions)")
    ax.set_ylabel("throughput (learner steps/s)")
    ax.set_title("async tuning: throughput against staleness")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_outputs(results: list[Result], out: Path, margin: float, command: str) -> tuple[Result, str]:
    pick, why = recommend(results, margin)
    write_json(out / "tune.json", {"margin": margin, "recommended": pick.point.name, "results": results})
    flags = " ".join(pick.point.flags())
    text = [f"# Tuning: {command}", "", table(results, pick), "",
            f"**Recommendation: `{flags}`.** Rule: the least stale setting within {margin:.0%} of the best "
            f"throughput. Here {why}.", "", "![tune.png](tune.png)", ""]
    (out / "tune.md").write_text("\n".join(text))
    if importlib.util.find_spec("matplotlib") is not None:
        plot(results, out / "tune.png", pick, margin)
    return pick, why


# -- command line ----------------------------------------------------------------------------------
def has_flag(field: str) -> bool:
    """Whether launch has ``--<field>`` (its flags are the config structs' fields)."""
    return any(f.name == field for section in C.SECTIONS.values() for f in msgspec.structs.fields(section))


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    ours, extra = (argv[: argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    p = argparse.ArgumentParser(prog="python -m runtime.tune", description=__doc__.splitlines()[0])
    src = p.add_mutually_exclusive_group()
    src.add_argument("--recipe", help="a built-in recipe (default: the launch default)")
    src.add_argument("--config", help="a launch TOML config")
    p.add_argument("--quick", action="store_true", help=f"grid {QUICK}: minutes on a small CPU machine")
    p.add_argument("--staleness", help=f"comma-separated --max-staleness values (default {FULL['staleness']})")
    p.add_argument("--capacity", help="comma-separated --buffer-capacity values: auto, a number of groups, "
                   f"or Nx (N x groups per step) (default {FULL['capacity']})")
    p.add_argument("--over-sampling", help="comma-separated --over-sampling-batch-size values (if launch has it)")
    p.add_argument("--num-rollout", type=int, help=f"per run (default {FULL['num_rollout']})")
    p.add_argument("--margin", type=float, default=0.1, help="throughput tolerance of the rule (default 0.1)")
    p.add_argument("--out", type=Path, help="default: runs/tune-<timestamp>")
    p.add_argument("--timeout", type=float, default=1200, help="seconds per run before it counts as failed")
    return p.parse_args(ours), extra


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args, extra = parse_args(argv)
    preset = QUICK if args.quick else FULL
    # absolute paths: every run's working directory is the repository root
    base = ["--recipe", args.recipe] if args.recipe else ["--config", str(Path(args.config).resolve())] \
        if args.config else []
    cfg = cli.resolve([*base, *extra], prog="python -m runtime.tune")  # exits 2 on a bad flag, like launch
    if args.over_sampling and not has_flag("over_sampling_batch_size"):
        print("python -m runtime.tune: error: --over-sampling: launch has no --over-sampling-batch-size",
              file=sys.stderr)
        return 2
    over: list[int | None] = [None]
    if args.over_sampling:
        over = [int(x) for x in args.over_sampling.split(",")]
    elif has_flag("over_sampling_batch_size") and not args.quick:  # launch's default, and sampling twice the batch
        over = [None, 2 * cfg.rollout.rollout_batch_size]
    try:
        points = grid([int(x) for x in (args.staleness or preset["staleness"]).split(",")],
                      (args.capacity or preset["capacity"]).split(","), cfg.rollout.groups_per_step, over)
    except ValueError as e:
        print(f"python -m runtime.tune: error: {e}", file=sys.stderr)
        return 2
    num_rollout = args.num_rollout or preset["num_rollout"]
    out = (args.out or Path(f"runs/tune-{time.strftime('%Y%m%d-%H%M%S')}")).resolve()
    out.mkdir(parents=True, exist_ok=True)
    print(f"{len(points)} runs of {num_rollout} rollouts into {out}", file=sys.stderr)
    results = []
    for i, point in enumerate(points, 1):
        results.append(run_point(point, base=base, extra=extra, num_rollout=num_rollout, out=out,
                                 timeout_s=args.timeout))
        r = results[-1]
        got = (f"{r.stats.steps_per_s:.2f} steps/s, staleness {r.stats.staleness_mean:.2f}" if r.stats
               else r.error)
        print(f"[{i}/{len(points)}] {point.name}: {got} ({r.wall_s:.0f}s)", file=sys.stderr)
    try:
        pick, why = write_outputs(results, out, args.margin, "python -m runtime.tune " + " ".join(argv))
    except ValueError as e:
        print(f"python -m runtime.tune: {e}; logs in {out}", file=sys.stderr)
        return 1
    print(f"recommended: {' '.join(pick.point.flags())}\nwhy: {why}\ntable: {out / 'tune.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
