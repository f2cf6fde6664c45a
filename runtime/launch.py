"""``python -m runtime.launch``: fully asynchronous RL post-training, on the embedded default or a recipe.

The algorithm, as wired below:
    1. build the task (prompts, held-out prompts, reward) and each agent's initial policy;
    2. start every agent's engines on it (version 0, or a checkpoint's version);
    3. the producer admits work while each agent's staleness rule allows: the generator samples
       ``n_samples_per_prompt`` responses per prompt and scores them (one agent), or the episode
       driver runs a user's episode function across the agents (several, ``[agents.NAME]``);
    4. each learner takes its batches of groups (earliest deadline first), computes GRPO
       advantages and a PPO-clip step (TIS against the engines' logprobs), and publishes v+1;
    5. each broadcaster brings its agent's engines to the newest version, which admits more work;
    6. evaluations run on the side; the run ends after every agent's last step with a final synced
       evaluation and writes ``summary.json``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec

from launchers.prompt_data import read_rows
from launchers.recipes import get_recipe
from runtime import agent_config, checkpoint, cli, placement, preflight, run_guard, run_task, weight_transport
from runtime.agent_config import RunSpec
from runtime.agents import Agent, Hosts, build_agent
from runtime.chaos import Chaos
from runtime.config import Config, ConfigError
from runtime.core import trace
from runtime.core.errors import RunFailed
from runtime.core.failures import FailureBudget
from runtime.feeds import Resumes, load_feed
from runtime.local_hosts import LocalHosts, gpus_asked
from runtime.logs import setup_logging
from runtime.metrics import MetricsLog, write_json
from runtime.producers import EpisodeFeed, PromptFeed
from runtime.progress import Progress
from runtime.scheduler import Producer, Scheduler
from runtime.sinks import open_sinks
from runtime.summary import summarize

PROG = "python -m runtime.launch"
log = logging.getLogger("runtime.launch")


def build(run: Config | RunSpec, run_dir: Path, weights: Path, progress: Progress, hosts: Hosts | None = None
          ) -> Scheduler:
    """The run's actors, wired. ``hosts``: where engines and trainers run on another backend
    (Ray: ``runtime.ray_actors.RayHosts``); None: subprocesses of this process."""
    spec = agent_config.as_spec(run)
    cfg, several = spec.base, spec.multi
    task = run_task.make_task(cfg)
    budget = FailureBudget(limit=cfg.fault.max_consecutive_failures)  # one cause failing every call ends the run
    feed = load_feed(spec, task, budget)  # plug-ins load, and lengths are checked, before any process starts
    sinks = open_sinks(cfg.log, run_dir=run_dir, config=agent_config.config_tables(spec))  # user code too
    resumes = load_resumes(spec)
    hosts, dtype, transport = place(cfg, hosts)
    agents = [build_agent(cfg, name, ac, i, task=task, home=run_dir / "agents" / name if several else run_dir,
                          log_dir=run_dir / "logs" / name if several else run_dir / "logs",
                          weights=weights / name if several else weights, resume=resumes[name], hosts=hosts,
                          engine_dtype=dtype, transport=transport, budget=budget)
              for i, (name, ac) in enumerate(spec.agents.items())]
    producer, evaluation = feed(agents, resumes)
    save_checkpoints(spec, agents, producer, announce=progress.message)
    f = cfg.fault
    chaos = [Chaos(a.engines, kill_interval_s=f.chaos_kill_interval, hang_at_s=f.chaos_hang_at, seed=f.chaos_seed)
             for a in agents]
    tracer = trace.Tracer(run_dir / "trace.json", max_events=cfg.log.trace_max_events) if cfg.log.trace else None
    return Scheduler(agents, producer, evaluation, run_dir=run_dir, eval_interval=cfg.eval.eval_interval,
                     stall_timeout_s=cfg.async_.stall_timeout, progress=progress,
                     metrics=MetricsLog(run_dir / "metrics.jsonl", sinks), tracer=tracer, chaos=chaos, budget=budget)


def load_resumes(spec: RunSpec) -> Resumes:
    """``--load``: the newest checkpoint of each trained agent (one agent: the directory itself)."""
    load = spec.base.ckpt.load
    if not load:
        return {name: None for name in spec.agents}
    if not spec.multi:
        ((name, _),) = spec.agents.items()
        resume = checkpoint.load(load)
        checkpoint.restore_driver_rng(resume.state)
        return {name: resume}
    return {name: None if ac.frozen else checkpoint.load(Path(load) / name) for name, ac in spec.agents.items()}


def save_checkpoints(spec: RunSpec, agents: list[Agent], producer: Producer, *, announce: Callable[[str], None]
                     ) -> None:
    """``--save``: each trained agent's learner checkpoints after its steps (runtime/checkpoint.py)."""
    c = spec.base.ckpt
    if not c.save:
        return
    for a in agents:
        if a.learner is None or a.buffer is None:
            continue
        saver = checkpoint.Checkpointer(
            save_dir=Path(c.save) / a.name if spec.multi else Path(c.save), interval=c.save_interval,
            num_steps=a.config.num_steps, learner=a.learner, buffer=a.buffer, ledger=a.ledger,
            producer=producer_state(producer, a.name), announce=announce,
            tokenizer_dir=run_task.model_source(spec.base) or None)
        a.learner.after_step = chain(a.learner.after_step, saver.after_step)


def producer_state(producer: Producer, name: str) -> Callable[[], checkpoint.ProducerState]:
    if isinstance(producer, EpisodeFeed):
        d = producer.driver
        return lambda: checkpoint.ProducerState(cursor=d.started, slots=d.live_slots(name))
    assert isinstance(producer, PromptFeed)
    g = producer.generator

    def state() -> checkpoint.ProducerState:
        live, redo = g.snapshot()
        return checkpoint.ProducerState(cursor=g.cursor, live=live, redo=redo)

    return state


def chain(first: Callable[[int], Any] | None, then: Callable[[int], Any]) -> Callable[[int], Any]:
    """An ``after_step`` hook after the one already set (a time slice's resume: generation first)."""
    if first is None:
        return then

    async def both(version: int) -> None:
        await first(version)
        await then(version)

    return both


def place(cfg: Config, hosts: Hosts | None) -> tuple[Hosts | None, str, str]:
    """Where the heavy parts run, the engines' dtype, and how weights reach them."""
    p = cfg.placement
    learner_gpus, engine_gpus = gpus_asked(p)
    if hosts is None and (learner_gpus or engine_gpus):  # GPUs of this host
        plan = placement.plan(p, num_engines=cfg.rollout.rollout_num_engines, learner_threads=1, engine_threads=1)
        hosts = LocalHosts(plan, p)
    dtype = cfg.perf.engine_dtype if cfg.perf.engine_dtype != "auto" else "bfloat16" if engine_gpus else "float32"
    transport = weight_transport.choose(p.weight_transport, learner_gpus=learner_gpus, engine_gpus=engine_gpus,
                                        colocate=p.colocate)
    return hosts, dtype, transport


def weights_dir() -> Path:
    """Where the learner hands weights to CPU engines: shared memory when the host has it."""
    base = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None
    return Path(tempfile.mkdtemp(prefix="asyncrl-weights-", dir=base))


async def train(run: Config | RunSpec, run_dir: Path, hosts: Hosts | None = None) -> dict[str, Any]:
    """Build and run on a fresh weights directory, and write ``summary.json`` however it ends
    (completed, interrupted, failed, or forced by the run guard from outside a blocked loop)."""
    spec = agent_config.as_spec(run)
    if spec.multi:  # the dashboard shows one agent
        mode = "off" if spec.base.run.progress == "off" else "lines"
        total = sum(ac.num_steps for ac in spec.agents.values() if not ac.frozen)
    else:
        mode, total = spec.base.run.progress, spec.base.rollout.num_steps
    progress = Progress(total_steps=total, mode=mode)
    weights = weights_dir()
    log.info("weights directory: %s (removed at the end)", weights)
    scheduler = None
    status, error = "failed", ""
    guard = run_guard.active()
    if guard is not None:  # a forced end (the loop blocked, a second signal) still leaves a record
        guard.remove_on_force.append(weights)
        guard.on_force.append(lambda forced, line: write_json(run_dir / "summary.json",
                                                              forced_summary(scheduler, forced, line)))
    try:
        scheduler = build(spec, run_dir, weights, progress, hosts)
        if guard is not None:
            guard.arm()
        await scheduler.run()
        status = "completed"
    except asyncio.CancelledError:
        signum = guard.signum if guard is not None else None
        status, error = "interrupted", f"interrupted ({signal.Signals(signum).name if signum else 'Ctrl-C'})"
        raise
    except RunFailed as e:
        error = str(e)
        raise
    finally:
        shutil.rmtree(weights, ignore_errors=True)
        summary = summarize(scheduler, status=status, error=error) if scheduler else {"status": status}
        write_json(run_dir / "summary.json", summary)
    return summary


def forced_summary(scheduler: Scheduler | None, status: str, error: str) -> dict[str, Any]:
    """The summary a forced end writes, from outside the blocked loop: the full one if its state
    reads, else status and error alone."""
    try:
        return summarize(scheduler, status=status, error=error) if scheduler else {"status": status, "error": error}
    except Exception:  # noqa: BLE001 - read mid-update from another thread: keep what is certain
        return {"status": status, "error": error}


_terminated = signal.SIGINT  # the signal that interrupted a Ray run


def _sigterm_as_interrupt(signum: int, frame: Any) -> None:
    global _terminated
    _terminated = signal.SIGTERM
    raise KeyboardInterrupt


def with_epochs(cfg: Config) -> Config:
    """``--num-epoch``: --num-rollout from the prompt file's rows (Miles: rows x epochs / rollout batch)."""
    r = cfg.rollout
    if r.num_epoch is None:
        return cfg
    rows = len(read_rows(r.prompt_data, input_key=r.input_key))
    rollouts = max(1, rows * r.num_epoch // r.rollout_batch_size)
    return msgspec.structs.replace(cfg, rollout=msgspec.structs.replace(r, num_rollout=rollouts))


def prepare_recipe(cfg: Config) -> None:
    """The recipe's files (a converted model, prompt files), made once and cached."""
    recipe = get_recipe(cfg.run.recipe)
    if recipe.prepare is not None:
        print(f"preparing recipe {recipe.name} (first use converts the model: about a minute)", file=sys.stderr)
        recipe.prepare()


def default_run_dir(cfg: Config) -> Path:
    return Path(cfg.run.run_dir or f"runs/{cfg.run.recipe}-{time.strftime('%Y%m%d-%H%M%S')}")


def prepare_run_dir(run: Config | RunSpec, run_dir: Path | None = None) -> Path:
    spec = agent_config.as_spec(run)
    run_dir = run_dir or default_run_dir(spec.base)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.toml").write_text(cli.dumps_toml(agent_config.config_tables(spec)))
    return run_dir


def resolve(argv: list[str] | None) -> RunSpec:
    """One agent from the flags and sections, or several from ``[agents.NAME]`` tables (or a
    multi-agent recipe); a bad flag exits 2 with one line (argparse), a bad value raises ConfigError."""
    if agent_config.requested(sys.argv[1:] if argv is None else argv):
        return agent_config.resolve_multi(argv, PROG)
    return agent_config.single(with_epochs(cli.resolve(argv, prog=PROG)))


def check_start(spec: RunSpec, run_dir: Path) -> None:
    """The start-time checks (runtime/preflight.py), for one agent or several."""
    cfg = spec.base
    if not spec.multi:
        return preflight.check_start(cfg, run_dir, overwrite=cfg.run.overwrite)
    # each trained agent resumes from SAVE/NAME (runtime/checkpoint.py); each may start from its own model
    preflight.check_start(msgspec.structs.replace(cfg, ckpt=msgspec.structs.replace(cfg.ckpt, load="")), run_dir,
                          overwrite=cfg.run.overwrite, resuming=bool(cfg.ckpt.load))
    preflight.check_agents(cfg.ckpt.load, {name: (ac.frozen, ac.hf_checkpoint) for name, ac in spec.agents.items()})


def main(argv: list[str] | None = None) -> int:
    try:
        spec = resolve(argv)
        run_dir = default_run_dir(spec.base)
        check_start(spec, run_dir)
    except ConfigError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    import transformers

    transformers.utils.logging.disable_progress_bar()
    try:
        prepare_recipe(spec.base)
    except ConfigError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    run_dir = prepare_run_dir(spec, run_dir)
    setup_logging(run_dir)
    print(f"run directory: {run_dir}", file=sys.stderr)
    try:
        if spec.base.run.backend == "ray":
            from runtime import backend_ray  # the only importer of ray

            signal.signal(signal.SIGTERM, _sigterm_as_interrupt)  # the driver's Ctrl-C path stops the actors
            summary = backend_ray.run(spec, run_dir, train)
        else:
            guard = run_guard.RunGuard(stall_timeout_s=spec.base.async_.stall_timeout, run_dir=run_dir)
            summary = guard.run(train(spec, run_dir))
    except run_guard.Interrupted as e:
        print(f"interrupted ({e}); partial record in {run_dir}", file=sys.stderr)
        return e.code
    except KeyboardInterrupt:
        print(f"interrupted ({signal.Signals(_terminated).name}); partial record in {run_dir}", file=sys.stderr)
        return 128 + _terminated
    except RunFailed as e:
        print(f"run failed: {e}", file=sys.stderr)
        return 1
    except checkpoint.CheckpointError as e:
        print(f"--load: {e}", file=sys.stderr)
        return 2
    except ConfigError as e:  # found while building (a plug-in that does not import): still one line
        if not spec.base.ckpt.load:  # nothing ran: leave the directory as it was, for the corrected command
            logging.shutdown()
            preflight.clear_run_files(run_dir)
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    print(f"done: {done_line(summary)}; {run_dir}/summary.json", file=sys.stderr)
    return 0


def done_line(summary: dict[str, Any]) -> str:
    def evals(s: dict[str, Any]) -> str:
        if s["final_eval_reward"] is None:
            return "no evaluation"
        return f"eval reward {s['first_eval_reward']:.3f} -> {s['final_eval_reward']:.3f}"

    if "agents" not in summary:
        return f"{summary['steps']} steps in {summary['wall_s']:.0f}s, {evals(summary)}"
    per_agent = "; ".join(f"{name} v{s['version']} {evals(s)}" for name, s in summary["agents"].items())
    episodes = summary["episodes"]["started"]
    return f"{summary['steps']} steps, {episodes} episodes in {summary['wall_s']:.0f}s; {per_agent}"


def run_event_loop(coro: Any) -> Any:
    """Run ``coro`` to completion on uvloop (asyncio's own loop where uvloop is missing)."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux/macOS
        return asyncio.run(coro)
    return uvloop.run(coro)


if __name__ == "__main__":
    sys.exit(main())
