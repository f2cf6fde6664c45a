"""Does rollout block training? Time per learner step of generation alone (G), training alone (T),
the synchronous loop (--max-staleness 0) and the asynchronous loop, measured side by side in one run.

    python benchmarks/async_vs_sync.py [--steps 60] [--max-staleness 1] [extra launch flags...]

G: the real generator and engines with a learner that trains nothing (it bumps the served version
   at once, so admission never waits on training or weight syncs). Its policy never learns, so
   its answers stay the random policy's (longer than a learning policy's: more decode steps).
T: the real trainer stepping (and saving weights to shared memory, as the learner does) on the
   batches the async loop trained, at the versions it trained them: the same work as the loop's
   trainer. (Also shown: T on G's batches, the untrained policy's longer answers, which is what
   T was measured on before 2026-11-23; it is the heavier work.)
sync / async: the whole loop, real engines, real weight syncs through shared memory.
Each figure is the steady-state seconds per step, skipping the first ``--warmup`` steps, with the
CPU seconds per step of each process (driver: this process; engine; trainer).
Targets (issue 2): async <= 1.15 x max(G, T); on the default recipe async <= 0.65 x sync.
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import msgspec
from solo import cpu_per_step, cpu_seconds, generation_alone, per_step

from buffers.types import Group
from policies.trainer import StepStats
from runtime import cli
from runtime.launch import build, prepare_run_dir, run_event_loop, weights_dir
from runtime.metrics import read_metrics
from runtime.progress import Progress
from runtime.scheduler import freeze_heap


def training_alone(argv: list[str], run_dir: Path, batches: list[list[Group]], warmup: int
                   ) -> tuple[float, dict[str, float]]:
    cfg = cli.resolve(argv + ["--run-dir", str(run_dir)])
    sched = build(cfg, prepare_run_dir(cfg), Path(tempfile.mkdtemp()), Progress(total_steps=1, mode="off"))
    trainer, out = sched.agent.learner.trainer, weights_dir()
    # fresh copies, made before the clock starts; batch i was trained at version i in the run that made it
    batches = [msgspec.convert(msgspec.to_builtins(batch), list[Group]) for batch in batches]
    freeze_heap()  # as the loops do: a full collection here would stall the trainer's calls
    times = [time.monotonic()]
    marks: list[dict[str, float]] = []
    for i, batch in enumerate(batches):
        trainer.step(batch, i)
        trainer.save_weights(out / f"v{i}")
        times.append(time.monotonic())
        if i in (warmup, len(batches) - 1):
            marks.append(cpu_seconds())
    gc.unfreeze()
    shutil.rmtree(out, ignore_errors=True)
    trainer.close()
    return per_step(times, warmup), cpu_per_step(marks, len(times) - 1 - warmup - 1)


async def whole_loop(argv: list[str], run_dir: Path, warmup: int, trained: list[bytes] | None = None
                     ) -> tuple[float, dict[str, float]]:
    """``trained``: if given, receives each batch the learner trained (msgpack: ~25 us a step)."""
    cfg = cli.resolve(argv + ["--run-dir", str(run_dir)])
    weights = weights_dir()  # where a run puts them (shared memory)
    sched = build(cfg, prepare_run_dir(cfg), weights, Progress(total_steps=1, mode="off"))
    marks: list[dict[str, float]] = []  # CPU at the end of warm-up and at the last step
    on_step = sched.agent.learner.on_step
    if trained is not None:
        trainer = sched.agent.learner.trainer
        step = trainer.step

        def recording_step(batch: list[Group], version: int) -> StepStats:
            trained.append(msgspec.msgpack.encode(batch))
            return step(batch, version)

        trainer.step = recording_step

    def count_cpu(rec):  # noqa: ANN001, ANN202
        on_step(rec)
        if rec.step in (warmup + 1, sched.agent.learner.num_steps):
            marks.append(cpu_seconds())

    sched.agent.learner.on_step = count_cpu
    try:
        await sched.run()
    finally:
        shutil.rmtree(weights, ignore_errors=True)
    lines = read_metrics(run_dir / "metrics.jsonl")[warmup:]
    waits = {k: sum(line[k] for line in lines) / len(lines) for k in ("learner/wait_frac", "generator/wait_frac")}
    for k in ("staleness/mean", "response_len/mean"):
        waits[k] = sum(line[k] for line in lines) / len(lines)
    waits |= {f"cpu/{k}": v for k, v in cpu_per_step(marks, sched.agent.learner.num_steps - warmup - 1).items()}
    return per_step([line["time_s"] for line in read_metrics(run_dir / "metrics.jsonl")], warmup), waits


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--max-staleness", type=int, default=1, help="for the async loop")
    p.add_argument("--out", default="runs/bench-async-vs-sync")
    args, extra = p.parse_known_args()
    base = ["--num-rollout", str(args.steps), "--eval-interval", "0", "--progress", "off", *extra]
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)

    g, g_batches, g_cpu = run_event_loop(generation_alone(base, out / "gen", args.warmup))
    sync, sync_w = run_event_loop(whole_loop(base + ["--max-staleness", "0"], out / "sync", args.warmup))
    trained: list[bytes] = []
    asy, asy_w = run_event_loop(whole_loop(base + ["--max-staleness", str(args.max_staleness)], out / "async",
                                        args.warmup, trained))
    t, t_cpu = training_alone(base, out / "train", [msgspec.msgpack.decode(b, type=list[Group]) for b in trained],
                              args.warmup)
    t_g, t_g_cpu = training_alone(base, out / "train-g", g_batches, args.warmup)
    bound = max(g, t)
    g_len = [len(s.response_ids) for batch in g_batches[args.warmup:] for grp in batch for s in grp.samples]
    print(f"machine: {platform.node()} ({platform.processor() or platform.machine()}), "
          f"{os.cpu_count()} cores; {time.strftime('%Y-%m-%d')}; flags: {' '.join(extra) or '(defaults)'}")
    print("| measure | s/step | ratio |")
    print("|---|---|---|")
    print(f"| G: generation alone | {g:.4f} | |")
    print(f"| T: training alone | {t:.4f} | |")
    print(f"| (T on G's batches) | {t_g:.4f} | |")
    print(f"| sync loop (max_staleness 0) | {sync:.4f} | {sync / bound:.2f} x max(G,T) |")
    print(f"| async loop (max_staleness {args.max_staleness}) | {asy:.4f} | {asy / bound:.2f} x max(G,T), "
          f"{asy / sync:.2f} x sync |")
    print(f"mean answer length (tokens): G {sum(g_len) / len(g_len):.2f}, async {asy_w['response_len/mean']:.2f}")
    for name, cpu in (("G", g_cpu), ("T", t_cpu), ("T on G's batches", t_g_cpu)):
        print(f"{name}: CPU s/step " + ", ".join(f"{k} {v:.4f}" for k, v in sorted(cpu.items()))
              + f"; total {sum(cpu.values()):.4f}")
    for name, w in (("sync", sync_w), ("async", asy_w)):
        cpu = {k[4:]: v for k, v in w.items() if k.startswith("cpu/")}
        print(f"{name}: learner wait {w['learner/wait_frac']:.0%}, generator idle {w['generator/wait_frac']:.0%}, "
              f"mean staleness {w['staleness/mean']:.2f}; CPU s/step "
              + ", ".join(f"{k} {v:.4f}" for k, v in sorted(cpu.items()))
              + f"; total {sum(cpu.values()):.4f}, so {os.cpu_count()} cores need >= "
              f"{sum(cpu.values()) / os.cpu_count():.4f} s/step")
    print(f"targets: async <= 1.15 x max(G,T): {'met' if asy <= 1.15 * bound else 'NOT met'}; "
          f"async <= 0.65 x sync: {'met' if asy <= 0.65 * sync else 'NOT met'}")


if __name__ == "__main__":
    main()
