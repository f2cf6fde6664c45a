"""Agents' configuration: one ``[agents.NAME]`` table per agent, and how a run becomes one or many.

An agent is one policy with actors of its own (runtime/agents.py). Configuration: one
``[agents.NAME]`` table per agent (``AgentConfig``); a field it leaves unset inherits the run's
shared sections ([model] shape, [optimizer] lr, [async] max_staleness, [rollout] engines, samples,
temperature, response length, steps). Layers, later winning: the shared sections < the recipe's
agent tables < the ``--config`` file's < ``--agent NAME.FIELD=VALUE``. The ``[episodes]`` table
(``EpisodesConfig``) names the episode function that drives them all.

A run without agent tables is a run of one agent whose table is the shared sections
(``single``): both are a ``RunSpec``, built and supervised the same way.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import tomllib
from pathlib import Path
from typing import Any

import msgspec

from launchers.recipes import get_recipe
from runtime import cli
from runtime import config as C
from runtime.config import Config, ConfigError, NonNeg, NonNegF, Pos, PosF
from runtime.config.checks import shape_problem

PROG = "python -m runtime.launch"

NAME = re.compile(r"[A-Za-z][A-Za-z0-9_-]*")


class AgentConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """One ``[agents.NAME]`` table. The defaults shown are used only where the run's shared
    sections give none (module docstring)."""

    frozen: bool = False  # served, never trained: its version never changes
    hf_checkpoint: str = ""  # a local HF directory; empty: a random-init model of the shape below
    num_layers: Pos = 2
    hidden_size: Pos = 64
    num_attention_heads: Pos = 4
    num_query_groups: Pos = 2
    kv_channels: NonNeg = 0  # the head size; 0: hidden_size / num_attention_heads
    ffn_hidden_size: Pos = 128
    max_position_embeddings: Pos = 64
    vocab_size: NonNeg = 0  # 0: the tokenizer's
    lr: PosF = 1e-3
    entropy_coef: NonNegF = 0.0  # [grpo]'s, for this agent
    max_staleness: NonNeg = 1  # in this agent's own versions
    rollout_num_engines: Pos = 1  # engines of its own
    n_samples_per_prompt: Pos = 8  # generate()'s default n
    rollout_temperature: NonNegF = 1.0
    rollout_max_response_len: Pos = 8
    groups_per_step: Pos = 4  # groups one optimizer step trains
    groups_per_episode: Pos = 1  # trained groups one episode may produce (its slots, reserved at admission)
    num_steps: Pos = 100  # optimizer steps; the run ends when every trained agent has taken its own


class EpisodesConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """The ``[episodes]`` table."""

    episode_fn: str = ""  # module:function: async (actors.episodes.Episode) -> {agent: [group, ...]}
    episode_timeout: PosF = 120.0  # seconds for one episode; past it, it counts as failed
    eval_episodes: NonNeg = 16  # evaluation episodes (greedy, untrained) per evaluation; 0: none


def inherited(cfg: Config) -> dict[str, Any]:
    """What an agent table leaves unset, from the run's shared sections."""
    m, r = cfg.model, cfg.rollout
    return {
        **{f: getattr(m, f) for f in m.__struct_fields__}, "hf_checkpoint": cfg.ckpt.hf_checkpoint,
        "lr": cfg.optimizer.lr, "entropy_coef": cfg.grpo.entropy_coef, "max_staleness": cfg.async_.max_staleness,
        "rollout_num_engines": r.rollout_num_engines,
        "n_samples_per_prompt": r.n_samples_per_prompt, "rollout_temperature": r.rollout_temperature,
        "rollout_max_response_len": r.rollout_max_response_len, "groups_per_step": r.groups_per_step,
        "num_steps": r.num_steps,
    }


def agent_configs(cfg: Config, tables: dict[str, Any]) -> dict[str, AgentConfig]:
    """Validate the ``[agents.NAME]`` tables; the first problem raises ``ConfigError`` naming it."""
    if not tables:
        raise ConfigError("[agents]", "a multi-agent run needs at least one [agents.NAME] table")
    out = {}
    for name, table in tables.items():
        where = f"[agents.{name}]"
        if not NAME.fullmatch(name):
            raise ConfigError(where, "an agent name is a letter then letters, digits, _ or -")
        if not isinstance(table, dict):
            raise ConfigError(where, "must be a table")
        try:
            a = msgspec.convert(inherited(cfg) | table, AgentConfig, strict=False)
        except msgspec.ValidationError as e:
            raise _field_error(where, e) from None
        _check(where, a)
        out[name] = a
    if all(a.frozen for a in out.values()):
        raise ConfigError("[agents]", "every agent is frozen: nothing to train")
    return out


def _check(where: str, a: AgentConfig) -> None:
    problem = shape_problem(a.hidden_size, a.num_attention_heads, a.num_query_groups, a.kv_channels)
    if problem is not None:
        raise ConfigError(f"{where} {problem[0]}", problem[1])
    # the episode driver's no-deadlock rule (actors/episodes.py): the buffer, (s + 1) x G groups,
    # holds one step's G groups beside one episode's share less one
    room = a.max_staleness * a.groups_per_step + 1
    if not a.frozen and a.groups_per_episode > room:
        raise ConfigError(f"{where} groups_per_episode", f"{a.groups_per_episode} exceeds max_staleness x "
                          f"groups_per_step + 1 = {room}: the learner could wait for slots that cannot open")


def _field_error(where: str, e: msgspec.ValidationError) -> ConfigError:
    reason, _, at = str(e).rpartition(" - at `")
    field = at.rstrip("`").removeprefix("$.")
    unknown = re.search(r"unknown field `([^`]+)`", str(e))
    if unknown:
        return ConfigError(f"{where} {unknown.group(1)}", "unknown field")
    return ConfigError(f"{where} {field}" if reason else where, reason or str(e))


@dataclasses.dataclass(frozen=True)
class RunSpec:
    base: C.Config  # the shared sections
    agents: dict[str, AgentConfig]
    episodes: EpisodesConfig | None  # None: one agent, fed by the generator from the recipe's prompts

    @property
    def multi(self) -> bool:
        return self.episodes is not None


def single(cfg: Config) -> RunSpec:
    """A run of one agent whose table is the shared sections."""
    return RunSpec(cfg, {"policy": msgspec.convert(inherited(cfg), AgentConfig)}, None)


def as_spec(run: Config | RunSpec) -> RunSpec:
    """A ``Config`` is a run of one agent (``single``)."""
    return run if isinstance(run, RunSpec) else single(run)


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


def resolve_multi(argv: list[str] | None, prog: str = PROG) -> RunSpec:
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
        return RunSpec(base, agent_configs(base, agents), _episodes(episodes, base))
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
    p = base.placement
    if p.actor_num_gpus_per_node or p.rollout_num_gpus:
        raise C.ConfigError("--actor-num-gpus-per-node" if p.actor_num_gpus_per_node else "--rollout-num-gpus",
                            "multi-agent runs are CPU-only for now (no per-agent GPU placement)")
    return ep


def config_tables(spec: RunSpec) -> dict[str, Any]:
    """The resolved config as TOML tables (``config.toml``): the shared sections, plus the agent
    and episode tables of a multi-agent run."""
    tables = C.to_toml_dict(spec.base)
    if spec.multi:
        tables |= {"episodes": msgspec.to_builtins(spec.episodes)}
        tables |= {f"agents.{name}": msgspec.to_builtins(ac) for name, ac in spec.agents.items()}
    return tables
