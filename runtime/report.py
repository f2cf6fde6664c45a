"""``python -m runtime.report RUN_DIR``: PNG figures and a short ``report.md`` for one run.

Reads ``metrics.jsonl`` (needed), ``summary.json`` and ``trace.json`` (used when present) and
writes into ``RUN_DIR/report/`` (``--out`` to change): reward against time and steps, token
staleness, wait fractions, buffer depths, weight-sync times, and a Gantt chart of actor activity
over ``--window START:END`` seconds of the trace (default: a few seconds mid-training).
Needs matplotlib (``pip install -e '.[report]'``); without it, exits 2 with one line.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path
from typing import Any

from runtime.core.trace import iter_spans, load_events
from runtime.metrics import read_metrics
from runtime.run_stats import RunStats, run_stats


def parse_window(text: str) -> tuple[float, float]:
    start, sep, end = text.partition(":")
    try:
        window = float(start), float(end)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected START:END in seconds, got {text!r}") from None
    if not sep or window[1] <= window[0]:
        raise argparse.ArgumentTypeError(f"expected START:END with END > START, got {text!r}")
    return window


def overlap_s(events: list[dict[str, Any]], window: tuple[float, float], a: str, b: str) -> tuple[float, float]:
    """(seconds of span ``a`` in the window, seconds of those during which some ``b`` span ran)."""
    def intervals(name: str) -> list[tuple[float, float]]:
        out = sorted((max(e["ts"] / 1e6, window[0]), min((e["ts"] + e["dur"]) / 1e6, window[1]))
                     for _, _, e in iter_spans(events) if e["name"] == name)
        return [iv for iv in out if iv[1] > iv[0]]

    merged: list[list[float]] = []
    for s, e in intervals(b):
        if merged and s <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], e)
        else:
            merged.append([s, e])
    total = both = 0.0
    for s, e in intervals(a):
        total += e - s
        both += sum(max(0.0, min(e, me) - max(s, ms)) for ms, me in merged)
    return total, both


def markdown(run_dir: Path, stats: RunStats, summary: dict[str, Any], captions: list[tuple[str, str]]) -> str:
    final_eval = summary.get("final_eval_reward", stats.final_eval)
    first_eval = summary.get("first_eval_reward")
    rows = [
        ("status", summary.get("status", "unknown (no summary.json)")),
        ("learner steps", f"{stats.steps} in {stats.time_s:.1f}s after the engines were ready"),
        ("throughput", f"{stats.steps_per_s:.2f} steps/s, {stats.tokens_per_s:,.0f} trained tokens/s"),
        ("eval reward", f"{_fmt(first_eval)} -> {_fmt(final_eval)}"),
        ("train reward (last steps)", f"{stats.final_reward:.3f}"),
        ("staleness of trained tokens", f"mean {stats.staleness_mean:.2f}, max {stats.staleness_max}"),
        ("waiting (mean over steps)", f"learner {stats.learner_wait:.0%}, generator {stats.generator_wait:.0%}"),
    ]
    sync = summary.get("weight_sync") or {}
    if sync.get("count"):
        rows.append(("weight syncs", f"{sync['count']}, mean {sync['mean_s']:.3f}s "
                                     f"(paused {sync['mean_paused_s']:.3f}s)"))
    out = [f"# Run report: {run_dir.name}", "", "| | |", "|---|---|"]
    out += [f"| {k} | {v} |" for k, v in rows]
    for png, caption in captions:
        out += ["", f"![{png}]({png})", "", caption]
    return "\n".join(out) + "\n"


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"


def report(run_dir: Path, out: Path, window: tuple[float, float] | None = None) -> Path:
    from runtime import figures  # matplotlib: imported only once the caller knows it is there

    lines = read_metrics(run_dir / "metrics.jsonl")
    summary_path = run_dir / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    out.mkdir(parents=True, exist_ok=True)
    evals = [(e["version"], e["reward"]) for e in summary.get("evals", [])]
    captions = [("reward.png", figures.reward(lines, out / "reward.png", evals))]
    captions += [(name + ".png", draw(lines, out / (name + ".png"))) for name, draw in (
        ("staleness", figures.staleness), ("waits", figures.waits), ("queues", figures.queues),
        ("syncs", figures.syncs))]
    trace_path = run_dir / "trace.json"
    if trace_path.exists():
        events = load_events(trace_path)
        window = window or figures.default_window(events)
        figures.gantt(events, out / "gantt.png", window)
        train, both = overlap_s(events, window, "train", "generate")
        captions.append(("gantt.png", f"Actor activity from trace.json over {window[0]:.1f}-{window[1]:.1f}s "
                         f"(`--window START:END` to change): the learner trained for {train:.2f}s of the window, "
                         f"{both:.2f}s of it ({both / max(train, 1e-9):.0%}) while groups were generating."))
    path = out / "report.md"
    path.write_text(markdown(run_dir, run_stats(lines), summary, captions))
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m runtime.report", description=__doc__.splitlines()[0])
    p.add_argument("run_dir", type=Path)
    p.add_argument("--window", type=parse_window, metavar="START:END",
                   help="seconds of trace.json for the Gantt chart (default: a few seconds mid-training)")
    p.add_argument("--out", type=Path, help="output directory (default: RUN_DIR/report)")
    args = p.parse_args(argv)
    if importlib.util.find_spec("matplotlib") is None:
        p.exit(2, f"{p.prog}: error: needs matplotlib, which is not installed (pip install matplotlib)\n")
    if not (args.run_dir / "metrics.jsonl").exists():
        p.exit(2, f"{p.prog}: error: {args.run_dir}/metrics.jsonl not found: not a run directory\n")
    try:
        path = report(args.run_dir, args.out or args.run_dir / "report", args.window)
    except ValueError as e:  # e.g. a run that took no step
        p.exit(2, f"{p.prog}: error: {e}\n")
    print(f"wrote {path} and its figures", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
