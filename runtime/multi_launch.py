"""``python -m runtime.launch`` for several agents: a multi-agent recipe (``--recipe coevolve``) or a
``--config`` file with ``[agents.NAME]`` tables.

The algorithm, as wired below:
    1. resolve the shared sections as for one agent, then each agent's table (``runtime.agents``);
    2. per agent: a model checkpoint, an engine set at version 0, and unless frozen a trainer,
       buffer, ledger, learner and broadcaster of its own;
    3. the episode driver admits an episode when every training agent's buffer has room for its
       share, runs the user's episode function on the agents' handles, and hands each agent its
       groups; each learner trains its own batches and publishes to its own engines;
    4. evaluation episodes run on the side; the run ends when every trained agent has taken its
       ``num_steps`` steps, with a final evaluation and ``summary.json`` (a section per agent).

Flags: every single-agent flag (shared sections), plus ``--episode-fn``, ``--episode-timeout``,
``--eval-episodes`` and ``--agent NAME.FIELD=VALUE`` (repeatable). Local backend only for now;
no checkpoints (``--save``/``--load``) yet.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
import tomllib
from pathlib import Path
from typing import Any

import msgspec

from actors.episode_driver import EpisodeDriver
from actors.rollout import SampleRunner
from launchers.recipes import get_recipe
from launchers.recipes.task import Task
from policies.trainer_process import TrainerProcess
from runtime import cli, launch, run_guard
from runtime import config as C
from runtime.agents import Agent, AgentConfig, EpisodesConfig, agent_configs
from runtime.core.errors import RunFailed
from runtime.engines import EngineSet
from runtime.metrics import MetricsLog
from runtime.multi import MultiScheduler
from runtime.plugins import load_function
from runtime.progress import Progress

PROG = "python -m runtime.launch"


@dataclasses.dataclass(frozen=True)
class MultiConfig:
    base: C.Config  # the shared sections
    agents: dict[str, AgentConfig]
    episodes: EpisodesConfig


def requested(argv: list[str]) -> bool:
    """Whether ``argv`` asks for a multi-agent run (a multi-agent recipe, or [agents] in --config)."""
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--recipe")
    p.add_argument("--config")
    ns, _ = p.parse_known_args(argv)
    file: dict[str, Any] = {}
    if ns.config:
        try:
            file = tomllib.loads(Path(ns.config).read_text())
        except (OSError, tomllib.TOMLDecodeError):
            return False  # the single-agent path reports it
    name = ns.recipe or file.get("run", {}).get("recipe") or "default"
    try:
        return "agents" in file or bool(get_recipe(name).agents)
    except C.ConfigError:
        return False


def resolve(argv: list[str] | None, prog: str = PROG) -> MultiConfig:
    """Like ``cli.resolve``, plus the agent tables and the episodes section; exits 2 with one line."""
    parser = cli.build_parser(prog)
    g = parser.add_argument_group("AGENTS", "several policies in one run (runtime/agents.py)")
    g.add_argument("--episode-fn", dest="episodes.episode_fn", metavar="MODULE:FUNCTION", default=argparse.SUPPRESS,
                   help="async (Episode) -> {agent: [group, ...]}")
    g.add_argument("--episode-timeout", dest="episodes.episode_timeout", type=float, metavar="SECONDS",
                   default=argparse.SUPPRESS, help="one episode's limit; past it, it counts as failed")
    g.add_argument("--eval-episodes", dest="episodes.eval_episodes", type=int, metavar="INT",
                   default=argparse.SUPPRESS, help="evaluation episodes (greedy, untrained) per evaluation")
    g.add_argument("--agent", action="append", default=[], metavar="NAME.FIELD=VALUE",
                   help="set one field of one [agents.NAME] table (TOML value syntax)")
    ns = parser.parse_args(argv)
    try:
        flags = cli._cli_overrides(ns)
        file = cli._read_toml(ns.config) if ns.config else {}
        name = flags.get("run", {}).get("recipe") or file.get("run", {}).get("recipe") or "default"
        recipe = get_recipe(name)
        agents = _overlay(_overlay(recipe.agents, file.pop("agents", {})), _agent_flags(ns.agent))
        if not isinstance(file.get("episodes", {}), dict):
            raise C.ConfigError("[episodes]", "must be a table")
        episodes = {**recipe.episodes, **file.pop("episodes", {}), **flags.pop("episodes", {})}
        base = C.build(C.merge(C.merge(C.merge({}, recipe.defaults), file), flags))
        return MultiConfig(base, agent_configs(base, agents), _episodes(episodes, base))
    except C.ConfigError as e:
        parser.exit(2, f"{prog}: error: {e}\n")


def _overlay(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    if not isinstance(over, dict):
        raise C.ConfigError("[agents]", "must be a table of [agents.NAME] tables")
    out = {k: dict(v) for k, v in base.items()}
    for name, table in over.items():
        if not isinstance(table, dict):
            raise C.ConfigError(f"[agents.{name}]", "must be a table")
        out[name] = {**out.get(name, {}), **table}
    return out


def _agent_flags(items: list[str]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for item in items:
        key, eq, value = item.partition("=")
        name, dot, field = key.partition(".")
        if not (eq and dot and name and field):
            raise C.ConfigError("--agent", f"expected NAME.FIELD=VALUE, got {item!r}")
        try:
            parsed = tomllib.loads(f"v = {value}")["v"]
        except tomllib.TOMLDecodeError:
            parsed = value  # a bare string
        out.setdefault(name, {})[field] = parsed
    return out


def _episodes(table: dict[str, Any], base: C.Config) -> EpisodesConfig:
    try:
        ep = msgspec.convert(table, EpisodesConfig, strict=False)
    except msgspec.ValidationError as e:
        reason, _, at = str(e).rpartition(" - at `")
        raise C.ConfigError(f"[episodes] {at.rstrip('`').removeprefix('$.')}", reason or str(e)) from None
    if ":" not in ep.episode_fn:
        raise C.ConfigError("--episode-fn", f"must be module:function, got {ep.episode_fn!r}")
    if base.run.backend != "local":
        raise C.ConfigError("--backend", "multi-agent runs are local-only for now")
    if base.ckpt.save or base.ckpt.load:
        raise C.ConfigError("--save" if base.ckpt.save else "--load", "multi-agent runs have no checkpoints yet")
    return ep


# -- build -----------------------------------------------------------------------------------------
def build(mc: MultiConfig, run_dir: Path, weights: Path, progress: Progress) -> MultiScheduler:
    cfg, r, a = mc.base, mc.base.rollout, mc.base.async_
    recipe = get_recipe(cfg.run.recipe)
    task = recipe.make_task(seed=r.rollout_seed, eval_num_prompts=cfg.eval.eval_num_prompts)
    episode_fn = load_function(mc.episodes.episode_fn, flag="--episode-fn")
    agents = [build_agent(mc, name, ac, i, task=task, run_dir=run_dir, weights=weights)
              for i, (name, ac) in enumerate(mc.agents.items())]
    driver = EpisodeDriver(agents=agents, episode_fn=episode_fn, timeout_s=mc.episodes.episode_timeout,
                           seed=r.rollout_seed)
    return MultiScheduler(agents, driver, run_dir=run_dir, eval_interval=cfg.eval.eval_interval,
                          eval_episodes=mc.episodes.eval_episodes, stall_timeout_s=a.stall_timeout, progress=progress,
                          metrics=MetricsLog(run_dir / "metrics.jsonl"))


def build_agent(mc: MultiConfig, name: str, ac: AgentConfig, index: int, *, task: Task, run_dir: Path,
                weights: Path) -> Agent:
    """One agent's actors: its checkpoint, engine set, samplers and (unless frozen) trainer."""
    cfg, r, a, e = mc.base, mc.base.rollout, mc.base.async_, mc.base.eval
    model = C.ModelConfig(**{f: getattr(ac, f) for f in C.ModelConfig.__struct_fields__})
    replace = msgspec.structs.replace
    own = replace(cfg, model=model, ckpt=replace(cfg.ckpt, hf_checkpoint=ac.hf_checkpoint),
                  run=replace(cfg.run, seed=cfg.run.seed + index))
    model_path = launch.initial_checkpoint(own, task, run_dir / "agents" / name)
    engines = EngineSet(model_path=model_path, n=ac.rollout_num_engines, log_dir=run_dir / "logs" / name,
                        threads=cfg.perf.engine_threads, max_running_requests=cfg.perf.engine_max_running_requests,
                        timeout_s=a.engine_timeout, start_timeout_s=a.engine_start_timeout, fault=cfg.fault)
    tok = task.tokenizer

    def decode(ids: list[int]) -> str:
        return tok.decode(ids, skip_special_tokens=False)

    exact = a.partial_rollout_mode == "recompute"
    runner = SampleRunner(engines=engines, decode=decode, seed=r.rollout_seed + 1000 * index,
                          exact_answer_versions=exact, sampling_params=launch.sampling_params(
        temperature=ac.rollout_temperature, top_p=r.rollout_top_p, top_k=r.rollout_top_k,
        max_new_tokens=ac.rollout_max_response_len, stop_token_ids=task.stop_token_ids))
    eval_runner = SampleRunner(engines=engines, decode=decode, seed=r.rollout_seed + 1000 * index + 1,
                               exact_answer_versions=exact, sampling_params=launch.sampling_params(
        temperature=e.eval_temperature, top_p=e.eval_top_p, top_k=-1 if e.eval_temperature == 0 else r.rollout_top_k,
        max_new_tokens=ac.rollout_max_response_len, stop_token_ids=task.stop_token_ids))
    trainer = None if ac.frozen else TrainerProcess(
        model_path, grpo=replace(cfg.grpo, entropy_coef=ac.entropy_coef), optim=replace(
            cfg.optimizer, lr=ac.lr, lr_decay_iters=cfg.optimizer.lr_decay_iters or ac.num_steps),
        temperature=ac.rollout_temperature, pad_id=tok.pad_token_id, threads=cfg.perf.learner_threads,
        **cfg.perf.trainer_kwargs)
    (weights / name).mkdir()
    return Agent.assemble(name, ac, engines=engines, trainer=trainer, tokenizer=tok, runner=runner,
                          eval_runner=eval_runner, weights_dir=weights / name,
                          weight_sync_timeout_s=a.weight_sync_timeout, pause_mode=a.pause_mode)


# -- run -------------------------------------------------------------------------------------------
async def train(mc: MultiConfig, run_dir: Path) -> dict[str, Any]:
    mode = "off" if mc.base.run.progress == "off" else "lines"  # the dashboard shows one agent
    total = sum(ac.num_steps for ac in mc.agents.values() if not ac.frozen)
    progress = Progress(total_steps=total, mode=mode)
    return await launch.run_and_record(
        run_dir, lambda weights: build(mc, run_dir, weights, progress),
        lambda scheduler, status, error: scheduler.summary(status=status, error=error))


def prepare_run_dir(mc: MultiConfig) -> Path:
    cfg = mc.base
    run_dir = Path(cfg.run.run_dir or f"runs/{cfg.run.recipe}-{time.strftime('%Y%m%d-%H%M%S')}")
    run_dir.mkdir(parents=True, exist_ok=True)
    tables = C.to_toml_dict(cfg) | {"episodes": msgspec.to_builtins(mc.episodes)}
    tables |= {f"agents.{name}": msgspec.to_builtins(ac) for name, ac in mc.agents.items()}
    (run_dir / "config.toml").write_text(cli.dumps_toml(tables))
    return run_dir


def main(argv: list[str] | None = None) -> int:
    mc = resolve(argv)
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    import transformers

    transformers.utils.logging.disable_progress_bar()
    run_dir = prepare_run_dir(mc)
    launch.setup_logging(run_dir)
    print(f"run directory: {run_dir}", file=sys.stderr)
    try:
        guard = run_guard.RunGuard(stall_timeout_s=mc.base.async_.stall_timeout, run_dir=run_dir)
        summary = guard.run(train(mc, run_dir))
    except run_guard.Interrupted as e:
        print(f"interrupted ({e}); partial record in {run_dir}", file=sys.stderr)
        return e.code
    except KeyboardInterrupt:
        print(f"interrupted; partial record in {run_dir}", file=sys.stderr)
        return 130
    except RunFailed as e:
        print(f"run failed: {e}", file=sys.stderr)
        return 1
    except C.ConfigError as e:  # found while building (an episode function that does not import)
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    per_agent = "; ".join(f"{name} v{s['version']} eval {_r(s['first_eval_reward'])} -> {_r(s['final_eval_reward'])}"
                          for name, s in summary["agents"].items())
    print(f"done: {summary['steps']} steps, {summary['episodes']['started']} episodes in {summary['wall_s']:.0f}s; "
          f"{per_agent}; {run_dir}/summary.json", file=sys.stderr)
    return 0


def _r(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"
