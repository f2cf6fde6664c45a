"""Tables and the plot of ``staleness_ablation.py``: its results in, markdown and a PNG out."""

from __future__ import annotations

import statistics
from pathlib import Path


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


OVERPROV_COLUMNS = [  # (result key, header, format)
    ("steps_per_s", "learner steps/s", "{:.2f}"), ("engine_tokens_per_s", "engine tokens/s", "{:,.0f}"),
    ("trained_tokens_per_s", "trained tokens/s", "{:,.0f}"), ("rows_mean", "running rows (mean)", "{:.1f}"),
    ("learner_wait", "learner wait", "{:.0%}"), ("generator_wait", "generator idle", "{:.0%}"),
    ("trained_len_mean", "trained answer len", "{:.1f}"), ("expired_in_window", "expired groups", "{:.0f}"),
    ("masked_frac", "tokens masked", "{:.0%}"),
]
RATIO_KEYS = [("steps_per_s", "steps/s"), ("engine_tokens_per_s", "engine tokens/s"),
              ("trained_tokens_per_s", "trained tokens/s")]


def table_overprov(results: list[dict]) -> str:
    """One row per (policy, max_staleness, over-sampling): means over seeds; then each seed's
    ratios against its own no-over-provisioning neighbour."""
    by: dict[tuple[str, int, int], dict[int, dict]] = {}
    for r in results:
        if r.get("steps_per_s") is None:
            continue
        policy, s, over, seed = r["name"].split("-")
        by.setdefault((policy, int(s[1:]), over[4:]), {})[int(seed[4:])] = r
    head = "| policy | max_staleness | over-sampling | seeds | " + " | ".join(h for _, h, _ in OVERPROV_COLUMNS)
    head += " | " + " | ".join(f"{h} vs none, per seed" for _, h in RATIO_KEYS) + " |"
    rows = [head, "|" + "---|" * (4 + len(OVERPROV_COLUMNS) + len(RATIO_KEYS))]
    for (policy, s, over), runs in sorted(by.items(), key=lambda kv: (-len(kv[0][0]), kv[0][1:])):
        cells = [f.format(statistics.mean(r.get(k) or 0 for r in runs.values())) for k, _, f in OVERPROV_COLUMNS]
        base = by.get((policy, s, "0"), {})
        over = "" if over == "0" else over
        ratios = []
        for k, _ in RATIO_KEYS:
            per_seed = [runs[seed][k] / base[seed][k] for seed in sorted(runs) if seed in base]
            ratios.append(f"**{statistics.mean(per_seed):.2f}x** ({', '.join(f'{x:.2f}' for x in per_seed)})"
                          if per_seed and over else "1.00x" if per_seed else "-")
        rows.append(f"| {policy} | {s} | {over or 'none'} | {','.join(map(str, sorted(runs)))} | " + " | ".join(cells)
                    + " | " + " | ".join(ratios) + " |")
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
