"""Two GPUs: the learner on GPU 0, one embedded engine on GPU 1, a Qwen3-0.6B-shaped random model.

    python benchmarks/gpu_sync.py [--steps 40] [--warmup 5] [--bucket-mb 512] [extra launch flags...]

Measured side by side in one run, on the default recipe at that model shape:
  (a) weight sync per version: the NCCL broadcast of every bucket and the engine's load of it
      (``weight_sync.mean_transfer_s``), next to a raw NCCL broadcast of the same bytes between
      the same two GPUs (two bare processes, nothing else running) — target: within 3x;
  (b) generation paused per sync (pause -> weights loaded -> continue);
  (c) seconds per step of generation alone (G), training alone (T), the synchronous loop
      (``--max-staleness 0``) and the async loop — target: async <= 1.1 x max(G, T);
  (d) the learner's and the generator's wait fractions in both loops.
Writes the table to stdout and ``--out``/table.md. Later flags override the defaults above, so
the script can be tried on CPUs with a small model (``--actor-num-gpus-per-node 0 --rollout-num-gpus 0
--weight-transport gloo --num-layers 2 ...``).
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import msgspec
from solo import generation_alone, per_step

from buffers.types import Group
from runtime import cli
from runtime.agents import initial_checkpoint
from runtime.launch import build, prepare_run_dir, run_event_loop, train
from runtime.metrics import read_metrics
from runtime.progress import Progress

QWEN3_06B = ["--num-layers", "28", "--hidden-size", "1024", "--num-attention-heads", "16", "--num-query-groups", "8",
             "--ffn-hidden-size", "3072", "--vocab-size", "151936", "--max-position-embeddings", "512"]
TWO_GPUS = ["--actor-num-gpus-per-node", "1", "--rollout-num-gpus", "1", "--weight-transport", "nccl"]


def training_alone(argv: list[str], run_dir: Path, batches: list[list[Group]], warmup: int) -> float:
    """The trainer's steps on G's batches, nothing else (no engine, no sync)."""
    cfg = cli.resolve(argv + ["--run-dir", str(run_dir)])
    sched = build(cfg, prepare_run_dir(cfg), Path(tempfile.mkdtemp()), Progress(total_steps=1, mode="off"))
    trainer = sched.agent.learner.trainer
    times = [time.monotonic()]
    for i, batch in enumerate(batches):
        trainer.step(msgspec.convert(msgspec.to_builtins(batch), list[Group]), i)  # batch i: version i
        times.append(time.monotonic())
    trainer.close()
    return per_step(times, warmup)


async def whole_loop(argv: list[str], run_dir: Path, warmup: int) -> dict[str, float]:
    cfg = cli.resolve(argv + ["--run-dir", str(run_dir)])
    summary = await train(cfg, prepare_run_dir(cfg))
    lines = read_metrics(run_dir / "metrics.jsonl")
    steady = lines[warmup:]
    out = {k: statistics.fmean(line[k] for line in steady)
           for k in ("learner/wait_frac", "generator/wait_frac", "staleness/mean")}
    out["s_per_step"] = per_step([line["time_s"] for line in lines], warmup)
    out |= {f"sync/{k}": v for k, v in summary["weight_sync"].items() if isinstance(v, (int, float))}
    return out


RAW = r"""
import os, sys, time, torch
from policies import weight_sync
rank, port, nbytes, reps = map(int, sys.argv[1:5])
gpu = torch.cuda.is_available()  # (no GPU: gloo, to try the script on a CPU machine)
if gpu:
    torch.cuda.set_device(0)  # CUDA_VISIBLE_DEVICES names this rank's GPU
pg = weight_sync.new_group(backend="nccl" if gpu else "gloo", master_address="127.0.0.1", master_port=port,
                           rank=rank, world_size=2, group_name="raw", timeout_s=120)
buf = torch.empty(nbytes, dtype=torch.uint8, device="cuda" if gpu else "cpu")
times = []
for _ in range(reps):
    if gpu:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    weight_sync.broadcast(buf, pg)
    times.append(time.perf_counter() - t0)
if rank == 0:
    times.sort()
    print(times[len(times) // 2], flush=True)
os._exit(0)  # skip teardown: gloo can abort destroying a group whose peer has gone
"""


def raw_broadcast(nbytes: int, reps: int = 20) -> float:
    """Median seconds for a bare NCCL broadcast of ``nbytes`` from GPU 0 to GPU 1 (two processes)."""
    from policies.weight_sync import free_port

    port = free_port()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(__file__).resolve().parent.parent),
                                                       os.environ.get("PYTHONPATH", "")]))
    procs = [subprocess.Popen([sys.executable, "-c", RAW, str(rank), str(port), str(nbytes), str(reps)],
                              env=dict(env, CUDA_VISIBLE_DEVICES=str(rank)), stdout=subprocess.PIPE, text=True)
             for rank in (0, 1)]
    out = [p.communicate(timeout=300)[0] for p in procs]
    if any(p.returncode for p in procs):
        raise RuntimeError(f"raw broadcast failed: {[p.returncode for p in procs]}")
    return float(out[0].strip().splitlines()[-1])


def table(g: dict[int, float], t: float, sync: dict, loops: dict[int, dict], raw: float, *, extra: list[str],
          elapsed_s: float) -> str:
    """The report: (a) sync cost against a raw broadcast, (b) pauses, (c) G, T and each loop against
    max(G, T), (d) who waited. ``g``: generation alone per queue depth; ``loops``: the async loops."""
    ks, asy = list(loops), next(iter(loops.values()))
    bound = {k: max(g[k], t) for k in ks}
    import torch

    gpu = ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())) or "no GPU"
    rows = [
        f"machine: {platform.node()}, {gpu}; {time.strftime('%Y-%m-%d')}; {elapsed_s:.0f}s; "
        f"flags: {' '.join(extra) or '(defaults)'}",
        "",
        "| measure | value | note |",
        "|---|---|---|",
        f"| weight bytes per sync | {asy['sync/bytes'] / 2**30:.3f} GiB | in the engine's dtype, tied embedding "
        f"once |",
        f"| raw NCCL broadcast, same bytes | {raw * 1e3:.1f} ms | GPU 0 -> GPU 1, bare processes |",
        *(f"| (a) weight sync, {name} loop: trainer's broadcast (flatten + send) | "
          f"{w['sync/mean_broadcast_s'] * 1e3:.1f} ms | {w['sync/mean_broadcast_s'] / raw:.2f} x raw (target <= 3); "
          f"until loaded on the engine: {w['sync/mean_transfer_s'] * 1e3:.1f} ms |"
          for name, w in (("async", asy), ("sync", sync))),
        *(f"| (b) generation paused per sync, {name} loop | {w['sync/mean_paused_s'] * 1e3:.1f} ms | "
          f"whole sync (publish to served): {w['sync/mean_s'] * 1e3:.1f} ms |" for name, w in (("async", asy),
                                                                                              ("sync", sync))),
        *(f"| (c) G: generation alone, queue of {k + 1} batches | {g[k]:.4f} s/step | |" for k in ks),
        f"| (c) T: training alone | {t:.4f} s/step | |",
        f"| (c) sync loop (max_staleness 0) | {sync['s_per_step']:.4f} s/step | {sync['s_per_step'] / bound[ks[0]]:.2f}"
        f" x max(G,T) with G of {ks[0] + 1} batches |",
        *(f"| (c) async loop (max_staleness {k}) | {w['s_per_step']:.4f} s/step | {w['s_per_step'] / bound[k]:.2f} x "
          f"max(G,T) (target <= 1.1), {w['s_per_step'] / sync['s_per_step']:.2f} x sync |" for k, w in loops.items()),
        *(f"| (d) {name} loop waits | learner {w['learner/wait_frac']:.0%}, generator {w['generator/wait_frac']:.0%} "
          f"| mean staleness {w['staleness/mean']:.2f} |"
          for name, w in (("sync", sync), *((f"async (max_staleness {k})", w) for k, w in loops.items()))),
    ]
    return "\n".join(rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--max-staleness", default="1", help="for the async loop; several (1,2) run one loop each")
    p.add_argument("--out", default="runs/bench-gpu-sync")
    args, extra = p.parse_known_args()
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    base = ["--num-rollout", str(args.steps), "--eval-interval", "0", "--progress", "off", *QWEN3_06B, *TWO_GPUS,
            *extra]
    # one random checkpoint for every measurement (building a 0.6B model takes a while)
    cfg = cli.resolve(base + ["--run-dir", str(out / "init")])
    from launchers.recipes import get_recipe

    task = get_recipe(cfg.run.recipe).make_task(seed=cfg.rollout.rollout_seed, eval_num_prompts=1)
    base += ["--hf-checkpoint", initial_checkpoint(cfg, task, prepare_run_dir(cfg))]

    t0 = time.monotonic()
    ks = [int(k) for k in args.max_staleness.split(",")]
    # G for each queue depth: generation alone with the buffer the async loop at max_staleness k
    # has ((k + 1) batches outstanding), so each ratio compares like with like
    gens = {k: run_event_loop(generation_alone(base + ["--max-staleness", str(k)], out / f"gen{k}", args.warmup))
            for k in ks}
    batches = gens[ks[0]][1]
    t = training_alone(base, out / "train", batches, args.warmup)
    sync = run_event_loop(whole_loop(base + ["--max-staleness", "0"], out / "sync", args.warmup))
    loops = {k: run_event_loop(whole_loop(base + ["--max-staleness", str(k)], out / f"async{k}", args.warmup))
             for k in ks}
    raw = raw_broadcast(int(loops[ks[0]]["sync/bytes"]))
    text = table({k: gens[k][0] for k in ks}, t, sync, loops, raw, extra=extra, elapsed_s=time.monotonic() - t0)
    print(text)
    (out / "table.md").write_text(text + "\n")


if __name__ == "__main__":
    main()
