"""The figures of ``runtime.report``: one function per PNG, each from metrics lines or trace events.

Every function takes plain data and a path, draws with matplotlib's Agg backend (no display
needed) and returns a one-line caption for ``report.md``. Time axes are seconds since the engines
were ready (``time_s``) for metrics, and seconds since the trace began for the Gantt chart.
"""

from __future__ import annotations

import re
from collections import defaultdict
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402 - the backend must be chosen first
from matplotlib.ticker import MaxNLocator  # noqa: E402

from runtime.core.trace import iter_spans  # noqa: E402

SMOOTH = 10  # steps in the rolling means drawn over noisy per-step values
BUCKET = re.compile(r"^correction/s(\d+)(\+?)/tokens$")
TRACK_ORDER = ["scheduler", "learner", "broadcaster", "generator", "groups", "evaluator",
               *(f"engine{i}" for i in range(64))]
COLORS = {
    "train": "tab:blue", "save weights": "tab:cyan", "wait buffer.get_batch": "0.75",
    "wait admission": "0.85", "wait admission (no group generating)": "0.6",
    "generate": "tab:orange", "score": "tab:green", "request": "navajowhite", "eval request": "thistle",
    "eval": "tab:purple",
    "weight sync": "tab:red", "paused": "darkred", "start engines": "tab:brown", "final sync": "tab:pink",
}


def series(lines: list[dict[str, Any]], key: str, x: str = "time_s") -> tuple[list[float], list[float]]:
    pairs = [(line[x], line[key]) for line in lines if line.get(key) is not None]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def rolling(values: list[float], n: int = SMOOTH) -> list[float]:
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v - (values[i - n] if i >= n else 0.0)
        out.append(acc / min(i + 1, n))
    return out


def _save(fig: plt.Figure, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def reward(lines: list[dict[str, Any]], path: Path, evals: list[tuple[int, float]] | None = None) -> str:
    """``evals``: (version, reward) of every evaluation (the summary's, which has the final one);
    on the time axis an evaluation sits where it finished, on the step axis at the version it scored."""
    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    for ax, x, label in ((axes[0], "time_s", "seconds since engines ready"), (axes[1], "step", "learner step")):
        xs, ys = series(lines, "reward/mean", x)
        ax.plot(xs, ys, color="tab:blue", alpha=0.25, lw=1, label="train reward (per step)")
        ax.plot(xs, rolling(ys), color="tab:blue", lw=2, label=f"train reward ({SMOOTH}-step mean)")
        ex, ey = series(lines, "eval/reward", "time_s" if x == "time_s" else "eval/version")
        if x == "step" and evals:
            ex, ey = [v for v, _ in evals], [r for _, r in evals]
        ax.plot(ex, ey, "o-", color="tab:red", lw=2, label="eval reward (held-out)")
        ax.set_xlabel(label)
        ax.set_ylabel("reward")
        ax.grid(alpha=0.3)
    axes[0].set_title("reward against wall time")
    axes[1].set_title("reward against steps")
    axes[1].legend(loc="lower right")
    _save(fig, path)
    return "Training reward (per step and smoothed) and held-out eval reward, against time and against steps."


def token_staleness(lines: list[dict[str, Any]]) -> tuple[dict[str, float], bool]:
    """Trained tokens per staleness bucket, and whether that is exact (per-bucket counts logged)
    or estimated from each step's mean (exact when a step's max staleness is at most 1)."""
    counts: dict[str, float] = defaultdict(float)
    for line in lines:
        for key, value in line.items():
            m = BUCKET.match(key)
            if m and value:
                counts[m.group(1) + m.group(2)] += value
    if counts:
        return dict(sorted(counts.items(), key=lambda kv: int(kv[0].rstrip("+")))), True
    for line in lines:  # least-spread split with the step's mean: floor and floor + 1
        n, mu = line.get("train/n_tokens") or 0, line["staleness/mean"]
        lo = int(mu)
        counts[str(lo)] += n * (1 - (mu - lo))
        if mu > lo:
            counts[str(lo + 1)] += n * (mu - lo)
    return dict(sorted(counts.items(), key=lambda kv: int(kv[0]))), False


def staleness(lines: list[dict[str, Any]], path: Path) -> str:
    counts, exact = token_staleness(lines)
    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    total = sum(counts.values()) or 1.0
    axes[0].bar(list(counts), [v / total for v in counts.values()], color="tab:blue")
    axes[0].set_xlabel("staleness of a trained token (policy versions behind the learner)")
    axes[0].set_ylabel("fraction of trained tokens")
    axes[0].set_title("token staleness" + ("" if exact else " (estimated from per-step means)"))
    xs, mean_ = series(lines, "staleness/mean", "step")
    _, max_ = series(lines, "staleness/max", "step")
    axes[1].plot(xs, mean_, color="tab:blue", alpha=0.2, lw=1)
    axes[1].plot(xs, rolling(mean_), color="tab:blue", lw=2, label=f"mean over tokens ({SMOOTH}-step mean)")
    axes[1].plot(xs, rolling(max_), color="tab:red", lw=1.5, label=f"max ({SMOOTH}-step mean)")
    axes[1].set_xlabel("learner step")
    axes[1].set_ylabel("staleness (versions)")
    axes[1].set_title("staleness per step")
    axes[1].legend()
    for ax in axes:
        ax.grid(alpha=0.3)
    _save(fig, path)
    how = "exact per-bucket counts" if exact else "estimated from each step's mean (exact when max <= 1)"
    return f"Staleness of trained tokens ({how}), and its mean and max per step."


def waits(lines: list[dict[str, Any]], path: Path) -> str:
    fig, ax = plt.subplots(figsize=(12, 3.5))
    for key, color in (("learner/wait_frac", "tab:blue"), ("generator/wait_frac", "tab:orange")):
        xs, ys = series(lines, key)
        ax.plot(xs, ys, color=color, alpha=0.25, lw=1)
        ax.plot(xs, rolling(ys), color=color, lw=2, label=f"{key.split('/')[0]} ({SMOOTH}-step mean)")
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("seconds since engines ready")
    ax.set_ylabel("fraction of time waiting")
    ax.set_title("waiting: the learner for data, the generator for admission with nothing generating")
    ax.legend()
    ax.grid(alpha=0.3)
    _save(fig, path)
    return "Share of each step's wall time the learner waited for a batch and the generator sat idle at admission."


def queues(lines: list[dict[str, Any]], path: Path) -> str:
    fig, ax = plt.subplots(figsize=(12, 3.5))
    for key, label, color in (("buffer/groups", "ready (scored, untrained)", "tab:blue"),
                              ("buffer/pending", "admitted, still generating", "tab:orange")):
        xs, ys = series(lines, key)
        ax.plot(xs, ys, color=color, alpha=0.2, lw=1)
        ax.plot(xs, rolling(ys), color=color, lw=2, label=f"{label} ({SMOOTH}-step mean)")
    xs, ys = series(lines, "buffer/capacity")
    ax.plot(xs, ys, "--", color="tab:green", label="capacity")
    ax.set_ylim(-0.5, max([line["buffer/capacity"] for line in lines], default=1) * 1.35)  # room for the legend
    ax.set_xlabel("seconds since engines ready")
    ax.set_ylabel("prompt groups")
    ax.set_title("buffer depth, sampled as each learner step ends")
    ax.legend(loc="upper right", ncol=3)
    ax.grid(alpha=0.3)
    _save(fig, path)
    return "Groups in the buffer at each step: ready for the learner, still generating, and the bound."


def syncs(lines: list[dict[str, Any]], path: Path) -> str:
    seen: dict[int, tuple[float, float]] = {}
    for line in lines:  # each line repeats the latest sync: keep one point per synced version
        if line.get("sync/version") is not None:
            seen[line["sync/version"]] = (line["sync/total_s"], line["sync/paused_s"])
    fig, ax = plt.subplots(figsize=(12, 3.5))
    versions = sorted(seen)
    ax.plot(versions, [seen[v][0] for v in versions], ".-", label="sync total (publish to serving)")
    ax.plot(versions, [seen[v][1] for v in versions], ".-", label="generation paused")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("synced policy version")
    ax.set_ylabel("seconds")
    ax.set_title("weight syncs")
    ax.legend()
    ax.grid(alpha=0.3)
    _save(fig, path)
    return "Time of each weight sync, and the part of it the engines were paused."


def default_window(events: list[dict[str, Any]], width_s: float = 4.0) -> tuple[float, float]:
    """A window in the middle of training (between the first and last train spans)."""
    train = [e for _, _, e in iter_spans(events) if e["name"] == "train"] or [
        e for _, _, e in iter_spans(events)]
    if not train:
        return 0.0, width_s
    t0 = min(e["ts"] for e in train) / 1e6
    t1 = max(e["ts"] + e["dur"] for e in train) / 1e6
    width = min(width_s, max((t1 - t0) / 3, 0.5))
    mid = (t0 + t1) / 2
    return mid - width / 2, mid + width / 2


def gantt(events: list[dict[str, Any]], path: Path, window: tuple[float, float]) -> None:
    start, end = window
    lanes: dict[str, int] = defaultdict(int)
    bars: dict[tuple[str, int, str], list[tuple[float, float]]] = defaultdict(list)
    for track, lane, e in iter_spans(events):
        lanes[track] = max(lanes[track], lane + 1)
        t0, t1 = e["ts"] / 1e6, (e["ts"] + e["dur"]) / 1e6
        if t1 >= start and t0 <= end:
            bars[(track, lane, e["name"])].append((max(t0, start), min(t1, end) - max(t0, start)))
    tracks = sorted(lanes, key=lambda t: (TRACK_ORDER.index(t) if t in TRACK_ORDER else len(TRACK_ORDER), t))
    row = {t: len(tracks) - 1 - i for i, t in enumerate(tracks)}  # first track on top
    fig, ax = plt.subplots(figsize=(13, 0.8 + 0.75 * len(tracks)))
    handles = {}
    for (track, lane, name), spans in bars.items():
        height = 0.8 / lanes[track]
        y = row[track] + 0.1 + lane * height
        color = COLORS.get(name, "tab:gray")
        ax.broken_barh(spans, (y, height * (0.9 if lanes[track] > 1 else 1.0)), facecolors=color, edgecolor="none")
        handles.setdefault(name, plt.Rectangle((0, 0), 1, 1, color=color))
    ax.set_yticks([row[t] + 0.5 for t in tracks])
    ax.set_yticklabels([t if lanes[t] == 1 else f"{t} ({lanes[t]} lanes)" for t in tracks])
    ax.set_ylim(0, len(tracks))
    ax.set_xlim(start, end)
    ax.set_xlabel("seconds since the trace began")
    ax.set_title(f"actor activity, {start:.1f}-{end:.1f}s (trace.json; concurrent spans of a track stacked in lanes)")
    ax.legend(handles.values(), handles.keys(), loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8)
    ax.grid(axis="x", alpha=0.3)
    _save(fig, path)
