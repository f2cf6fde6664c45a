"""``python -m runtime.launch``: fully asynchronous RL post-training, on the embedded default or a recipe.

The algorithm, as wired below:
    1. build the task (prompts, held-out prompts, reward) and the initial policy checkpoint;
    2. start the engines on that checkpoint (version 0);
    3. the generator admits prompt groups while the staleness rule allows, samples
       ``n_samples_per_prompt`` responses per prompt on the engines and scores them;
    4. the learner takes each batch of groups (earliest deadline first), computes GRPO advantages
       and a PPO-clip step (TIS against the engines' logprobs), and publishes version v+1;
    5. the broadcaster brings the engines to the newest version, which admits more groups;
    6. evaluations on held-out prompts run on the side; the run ends after the last step with a
       final synced evaluation and writes ``summary.json``.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import msgspec

from actors.broadcaster import WeightBroadcaster
from actors.chat_endpoint import ChatEndpoint
from actors.conversation import EpisodeLimits
from actors.evaluator import Evaluator
from actors.generate_fn import Episodes
from actors.generator import Generator
from actors.learner import Learner
from actors.reward import RewardScorer
from actors.rollout import SampleRunner
from actors.sft_samples import SftSamples
from buffers.buffer import StalenessBuffer
from launchers.prompt_data import read_rows
from launchers.recipes import get_recipe
from launchers.recipes.task import Task
from policies import lora as adapters
from policies.engine.process import EngineProcess
from policies.engine.sglang_process import with_engine
from policies.model import qwen3_config, write_random_checkpoint
from policies.trainer_api import Trainer
from runtime import checkpoint, cli, placement, preflight, run_guard, run_task, train_config, weight_transport
from runtime.chaos import Chaos
from runtime.config import Config, ConfigError, LoraConfig, to_toml_dict
from runtime.core import trace
from runtime.core.failures import FailureBudget
from runtime.core.ledger import Ledger
from runtime.engines import EngineSet
from runtime.ipc_weights import IpcWeights
from runtime.local_hosts import LocalHosts, gpus_asked, local_trainer
from runtime.metrics import MetricsLog, write_json
from runtime.plugins import load_function
from runtime.progress import Progress
from runtime.scheduler import Actors, RunFailed, Scheduler
from runtime.sinks import open_sinks
from runtime.summary import summarize
from runtime.time_slice import time_slice

log = logging.getLogger("runtime.launch")


class Hosts(Protocol):
    """Where another backend runs the heavy parts, behind the local classes' interfaces."""

    def engine(self, index: int, model_path: str, **kwargs: Any) -> EngineProcess: ...  # EngineProcess's kwargs
    def trainer(self, model_path: str, **kwargs: Any) -> Trainer: ...  # TrainerProcess's kwargs


def prepare_recipe(cfg: Config) -> None:
    """The recipe's files (a converted model, prompt files), made once and cached."""
    recipe = get_recipe(cfg.run.recipe)
    if recipe.prepare is not None:
        print(f"preparing recipe {recipe.name} (first use converts the model: about a minute)", file=sys.stderr)
        recipe.prepare()


def default_run_dir(cfg: Config) -> Path:
    return Path(cfg.run.run_dir or f"runs/{cfg.run.recipe}-{time.strftime('%Y%m%d-%H%M%S')}")


def prepare_run_dir(cfg: Config, run_dir: Path | None = None) -> Path:
    run_dir = run_dir or default_run_dir(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.toml").write_text(cli.dumps_toml(to_toml_dict(cfg)))
    return run_dir


def initial_checkpoint(cfg: Config, task: Task, run_dir: Path) -> str:
    if run_task.model_source(cfg):
        return run_task.model_source(cfg)
    m, tok = cfg.model, task.tokenizer
    if m.vocab_size and m.vocab_size < len(tok):
        raise ConfigError("--vocab-size", f"{m.vocab_size} is below the tokenizer's {len(tok)} tokens")
    config = qwen3_config(
        vocab_size=m.vocab_size or len(tok), num_layers=m.num_layers, hidden_size=m.hidden_size,
        num_attention_heads=m.num_attention_heads, num_query_groups=m.num_query_groups,
        ffn_hidden_size=m.ffn_hidden_size, max_position_embeddings=m.max_position_embeddings,
        pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
    )
    return str(write_random_checkpoint(run_dir / "initial_model", config, tok, seed=cfg.run.seed))


def lora_spec(c: LoraConfig) -> adapters.LoraSpec | None:
    """The adapter to train (--lora-rank > 0), else None: full fine-tuning."""
    if not c.enabled:
        return None
    return adapters.LoraSpec(rank=c.lora_rank, alpha=c.lora_alpha, dropout=c.lora_dropout,
                             target_modules=c.target_modules or "all-linear")


def sampling_params(*, temperature: float, top_p: float, top_k: int, max_new_tokens: int,
                    stop_token_ids: list[int]) -> dict[str, Any]:
    return {"temperature": temperature, "top_p": top_p, "top_k": top_k, "max_new_tokens": max_new_tokens,
            "stop_token_ids": stop_token_ids}


def episodes_of(cfg: Config, task: Task, runner: SampleRunner, endpoint: ChatEndpoint | None) -> Episodes | None:
    """``--custom-generate-function-path``: every sample run as a multi-turn episode of it."""
    r = cfg.rollout
    if not r.custom_generate_function_path:
        return None
    fn = load_function(r.custom_generate_function_path, flag="--custom-generate-function-path")
    if not inspect.iscoroutinefunction(fn):
        raise ConfigError("--custom-generate-function-path", f"{r.custom_generate_function_path} must be an async "
                          "function: async def generate(conv: Conversation) -> float | None")
    context = r.rollout_max_context_len or (0 if cfg.ckpt.hf_checkpoint else cfg.model.max_position_embeddings)
    limits = EpisodeLimits(max_turns=r.max_turns, turn_max_tokens=runner.max_new_tokens, max_context_len=context,
                           tool_timeout_s=r.tool_timeout, episode_timeout_s=r.generate_timeout)
    return Episodes(fn, runner=runner, tokenizer=task.tokenizer, limits=limits, endpoint=endpoint)


def weights_dir() -> Path:
    """Where the learner hands weights to CPU engines: shared memory when the host has it."""
    base = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None
    return Path(tempfile.mkdtemp(prefix="asyncrl-weights-", dir=base))


def build(cfg: Config, run_dir: Path, weights: Path, progress: Progress, hosts: Hosts | None = None) -> Scheduler:
    """The run's actors, wired. ``hosts``: where engines and the trainer run on another backend
    (Ray: ``runtime.ray_actors.RayHosts``); None: subprocesses of this process."""
    r, a, e = cfg.rollout, cfg.async_, cfg.eval
    task = run_task.make_task(cfg)
    reward_fn = load_function(run_task.reward_path(cfg, task), flag="--custom-rm-path")
    held_out = run_task.held_out(cfg, task)
    context = preflight.model_context(cfg)
    eval_max_new = e.eval_max_response_len or r.rollout_max_response_len
    preflight.check_lengths(context=context, train_lengths=[len(p.input_ids) for p in task.train_prompts],
                            eval_lengths=[len(p.input_ids) for ps in held_out.values() for p in ps],
                            max_response_len=r.rollout_max_response_len, eval_max_response_len=eval_max_new)
    sinks = open_sinks(cfg.log, run_dir=run_dir, config=to_toml_dict(cfg))  # user code: before any process starts
    resume = checkpoint.load(cfg.ckpt.load) if cfg.ckpt.load else None
    initial = initial_checkpoint(cfg, task, run_dir) if not resume or cfg.grpo.use_kl_loss else None
    model_path = str(resume.model_dir) if resume else initial
    lora = lora_spec(cfg.lora)
    adapter = None
    if lora is not None and resume:  # engines and trainer adapt the base; the adapter is version v's
        model_path, adapter = str(Path(resume.path) / "base"), str(Path(resume.path) / "adapter")
    version = resume.state.version if resume else 0
    decode = task.decode
    sft = cfg.grpo.loss_type == "sft_loss"  # no engine: the data is the sample (actors/sft_samples.py)

    p = cfg.placement
    learner_gpus, engine_gpus = gpus_asked(p)
    if hosts is None and (learner_gpus or engine_gpus):  # GPUs of this host
        hosts = LocalHosts(placement.plan(p, num_engines=r.rollout_num_engines, learner_threads=1, engine_threads=1), p)
    engine_dtype = cfg.perf.engine_dtype if cfg.perf.engine_dtype != "auto" else (
        "bfloat16" if engine_gpus else "float32")
    engines = EngineSet(model_path=model_path, n=0 if sft else r.rollout_num_engines, log_dir=run_dir / "logs",
                        threads=cfg.perf.engine_threads, max_running_requests=cfg.perf.engine_max_running_requests,
                        timeout_s=a.engine_timeout, start_timeout_s=a.engine_start_timeout, fault=cfg.fault,
                        weight_version=version, dtype=engine_dtype, adapters=lora is not None, adapter=adapter,
                        process_factory=with_engine(
        hosts.engine if hosts else None, engine=cfg.engine.engine, host=cfg.engine.engine_host,
        passthrough=(adapters.sglang_flags(lora) if lora else {}) | cfg.engine.sglang_args))
    buffer = StalenessBuffer(groups_per_step=r.groups_per_step, max_staleness=a.max_staleness,
                             capacity=a.capacity(r.groups_per_step),
                             extra=(a.over_sampling_batch_size or r.rollout_batch_size) - r.rollout_batch_size,
                             mask_stale=a.partial_expiry == "mask")
    ledger = Ledger.restore(resume.state.ledger) if resume else Ledger()
    if resume:
        buffer.restore(resume.state.buffer, served_version=version)
        for g in resume.state.live:
            ledger.restart(g.group_id)
        checkpoint.restore_driver_rng(resume.state)
    budget = FailureBudget(limit=cfg.fault.max_consecutive_failures)
    scorer = RewardScorer(reward_fn, timeout_s=r.reward_timeout, group=r.group_rm, reward_key=r.reward_key,
                          budget=budget)
    group_filter = (load_function(r.dynamic_sampling_filter_path, flag="--dynamic-sampling-filter-path")
                    if r.dynamic_sampling_filter_path else None)
    exact = a.partial_rollout_mode == "recompute"
    rollout = SampleRunner(engines=engines, decode=decode, seed=r.rollout_seed, exact_answer_versions=exact,
                           max_context=context, budget=budget, sampling_params=sampling_params(
        temperature=r.rollout_temperature, top_p=r.rollout_top_p, top_k=r.rollout_top_k,
        max_new_tokens=r.rollout_max_response_len, stop_token_ids=task.stop_token_ids))
    endpoint = ChatEndpoint(model=cfg.run.recipe) if r.custom_generate_function_path else None
    generator = Generator(prompts=task.train_prompt, buffer=buffer, ledger=ledger, runner=rollout,
                          scorer=scorer, n_samples=r.n_samples_per_prompt,
                          cursor=resume.state.cursor if resume else 0, resume=resume.state.live if resume else (),
                          redo=resume.state.redo if resume else (), expiry=a.partial_expiry,
                          episodes=SftSamples(task.example) if sft else episodes_of(cfg, task, rollout, endpoint),
                          group_filter=group_filter, max_prompt_len=context - r.rollout_max_response_len)
    new_trainer = hosts.trainer if hosts else functools.partial(local_trainer, ranks=p.learner_ranks)
    optim = msgspec.structs.replace(cfg.optimizer, lr_decay_iters=cfg.optimizer.lr_decay_iters or r.num_steps)
    # the KL reference: --ref-load, else the policy the run started from (also after a resume)
    trainer = new_trainer(model_path, grpo=cfg.grpo, optim=optim, temperature=1.0 if sft else r.rollout_temperature,
                          pad_id=task.tokenizer.pad_token_id, threads=cfg.perf.learner_threads, version=version,
                          ref_path=cfg.ckpt.ref_load or initial, lora=lora, **cfg.perf.trainer_kwargs,
                          **train_config.trainer_kwargs(cfg.train, cfg.perf.recompute_granularity))
    if resume:
        trainer.load_checkpoint(resume.path)
    transport = weight_transport.choose("shm" if lora else p.weight_transport, learner_gpus=learner_gpus, engine_gpus=engine_gpus,
                                        colocate=p.colocate)
    if transport in ("nccl", "gloo"):
        engines.collective = weight_transport.CollectiveWeights(
            trainer, backend=transport, dtype=engine_dtype, bucket_bytes=p.weight_bucket_mb << 20,
            timeout_s=a.weight_sync_timeout)
    elif transport == "ipc":
        engines.collective = IpcWeights(trainer, dtype=engine_dtype, timeout_s=a.weight_sync_timeout)
    broadcaster = WeightBroadcaster(engines=engines, buffer=buffer, timeout_s=a.weight_sync_timeout,
                                    pause_mode=a.pause_mode, served_version=version,
                                    collective=engines.collective is not None or sft)  # SFT: no files to write
    learner = Learner(trainer=trainer, buffer=buffer, ledger=ledger, publisher=broadcaster,
                      num_steps=r.num_steps, max_staleness=a.max_staleness, weights_dir=weights, version=version)
    if cfg.ckpt.save:
        learner.after_step = checkpoint.Checkpointer(
            save_dir=Path(cfg.ckpt.save), interval=cfg.ckpt.save_interval, num_steps=r.num_steps, learner=learner,
            buffer=buffer, ledger=ledger, generator=generator, announce=progress.message,
            tokenizer_dir=run_task.model_source(cfg) or None).after_step
    if p.colocate:
        time_slice(learner, engines)
    eval_runner = SampleRunner(engines=engines, decode=decode, seed=r.rollout_seed + 1, exact_answer_versions=exact,
                               max_context=context, budget=budget, sampling_params=sampling_params(
        temperature=e.eval_temperature, top_p=e.eval_top_p, top_k=-1 if e.eval_temperature == 0 else r.rollout_top_k,
        max_new_tokens=eval_max_new, stop_token_ids=task.stop_token_ids))
    evaluator = Evaluator(sets=held_out, runner=eval_runner, scorer=RewardScorer(
        reward_fn, timeout_s=r.reward_timeout, group=r.group_rm, reward_key=r.reward_key, budget=budget),
        n_samples=e.n_samples_per_eval_prompt, episodes=episodes_of(cfg, task, eval_runner, endpoint))
    chaos = Chaos(engines, kill_interval_s=cfg.fault.chaos_kill_interval, hang_at_s=cfg.fault.chaos_hang_at,
                  seed=cfg.fault.chaos_seed)
    actors = Actors(engines=engines, buffer=buffer, ledger=ledger, generator=generator, learner=learner,
                    broadcaster=broadcaster, evaluator=evaluator, chaos=chaos, endpoint=endpoint, budget=budget)
    tracer = trace.Tracer(run_dir / "trace.json", max_events=cfg.log.trace_max_events) if cfg.log.trace else None
    scheduler = Scheduler(actors, run_dir=run_dir, eval_interval=e.eval_interval, stall_timeout_s=a.stall_timeout,
                          progress=progress, metrics=MetricsLog(run_dir / "metrics.jsonl", sinks), tracer=tracer)
    learner.on_step = scheduler.on_step
    return scheduler


def with_epochs(cfg: Config) -> Config:
    """``--num-epoch``: --num-rollout from the prompt file's rows (Miles: rows x epochs / rollout batch)."""
    r = cfg.rollout
    if r.num_epoch is None:
        return cfg
    rows = len(read_rows(r.prompt_data, input_key=r.input_key))
    rollouts = max(1, rows * r.num_epoch // r.rollout_batch_size)
    return msgspec.structs.replace(cfg, rollout=msgspec.structs.replace(r, num_rollout=rollouts))


async def train(cfg: Config, run_dir: Path, hosts: Hosts | None = None) -> dict[str, Any]:
    progress = Progress(total_steps=cfg.rollout.num_steps, mode=cfg.run.progress)
    return await run_and_record(
        run_dir, lambda weights: build(cfg, run_dir, weights, progress, hosts),
        lambda scheduler, status, error: summarize(scheduler, status=status, error=error))


async def run_and_record(run_dir: Path, make: Callable[[Path], Any],
                         summarize_run: Callable[[Any, str, str], dict[str, Any]]) -> dict[str, Any]:
    """Build a scheduler on a fresh weights directory (``make``), run it, and write ``summary.json``
    however it ends (completed, interrupted, failed); shared by the one- and multi-agent launchers."""
    weights = weights_dir()
    log.info("weights directory: %s (removed at the end)", weights)
    scheduler = None
    status, error = "failed", ""
    guard = run_guard.active()
    if guard is not None:  # a forced end (the loop blocked, a second signal) still leaves a record
        guard.remove_on_force.append(weights)
        guard.on_force.append(lambda forced, line: write_json(run_dir / "summary.json", _forced_summary(
            scheduler, forced, line, summarize_run)))
    try:
        scheduler = make(weights)
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
        summary = summarize_run(scheduler, status, error) if scheduler else {"status": status}
        write_json(run_dir / "summary.json", summary)
    return summary


_terminated = signal.SIGINT  # the signal that interrupted a Ray run


def _sigterm_as_interrupt(signum: int, frame: Any) -> None:
    global _terminated
    _terminated = signal.SIGTERM
    raise KeyboardInterrupt


def _signal_name(signum: int) -> str:
    return signal.Signals(signum).name


def _forced_summary(scheduler: Any, status: str, error: str,
                    summarize_run: Callable[[Any, str, str], dict[str, Any]]) -> dict[str, Any]:
    """The summary a forced end writes, from outside the blocked loop: the full one if its state
    reads, else status and error alone."""
    try:
        return summarize_run(scheduler, status, error) if scheduler else {"status": status, "error": error}
    except Exception:  # noqa: BLE001 - read mid-update from another thread: keep what is certain
        return {"status": status, "error": error}


def main(argv: list[str] | None = None) -> int:
    from runtime import multi_launch  # several agents: [agents.NAME] tables or a multi-agent recipe

    if multi_launch.requested(sys.argv[1:] if argv is None else argv):
        return multi_launch.main(argv)
    prog = "python -m runtime.launch"
    cfg = cli.resolve(argv, prog=prog)
    try:
        cfg = with_epochs(cfg)
    except ConfigError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    run_dir = default_run_dir(cfg)
    try:
        preflight.check_start(cfg, run_dir, overwrite=cfg.run.overwrite)
    except ConfigError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    import transformers

    transformers.utils.logging.disable_progress_bar()
    try:
        prepare_recipe(cfg)
    except ConfigError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    run_dir = prepare_run_dir(cfg, run_dir)
    setup_logging(run_dir)
    print(f"run directory: {run_dir}", file=sys.stderr)
    try:
        if cfg.run.backend == "ray":
            from runtime import backend_ray  # the only importer of ray

            signal.signal(signal.SIGTERM, _sigterm_as_interrupt)  # the driver's Ctrl-C path stops the actors
            summary = backend_ray.run(cfg, run_dir)
        else:
            guard = run_guard.RunGuard(stall_timeout_s=cfg.async_.stall_timeout, run_dir=run_dir)
            summary = guard.run(train(cfg, run_dir))
    except run_guard.Interrupted as e:
        print(f"interrupted ({e}); partial record in {run_dir}", file=sys.stderr)
        return e.code
    except KeyboardInterrupt:
        print(f"interrupted ({_signal_name(_terminated)}); partial record in {run_dir}", file=sys.stderr)
        return 128 + _terminated
    except RunFailed as e:
        print(f"run failed: {e}", file=sys.stderr)
        return 1
    except checkpoint.CheckpointError as e:
        print(f"--load: {e}", file=sys.stderr)
        return 2
    except ConfigError as e:  # found while building (a plug-in that does not import): still one line
        if not cfg.ckpt.load:  # nothing ran: leave the directory as it was, for the corrected command
            logging.shutdown()
            preflight.clear_run_files(run_dir)
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    evals = (f"eval reward {summary['first_eval_reward']:.3f} -> {summary['final_eval_reward']:.3f}"
             if summary["final_eval_reward"] is not None else "no evaluation")
    print(f"done: {summary['steps']} steps in {summary['wall_s']:.0f}s, {evals}; {run_dir}/summary.json",
          file=sys.stderr)
    return 0


def setup_logging(run_dir: Path) -> None:
    """Everything to ``run.log``; warnings also to the terminal, which otherwise gets progress."""
    terminal = logging.StreamHandler()
    terminal.setLevel(logging.WARNING)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        handlers=[logging.FileHandler(run_dir / "run.log"), terminal], force=True)


def run_event_loop(coro: Any) -> Any:
    """Run ``coro`` to completion on uvloop (asyncio's own loop where uvloop is missing)."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux/macOS
        return asyncio.run(coro)
    return uvloop.run(coro)


if __name__ == "__main__":
    sys.exit(main())
