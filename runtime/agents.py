"""Agents: several policies in one run, each a first-class set of actors.

An agent is one policy with actors of its own: an engine set, and, unless it is frozen, a buffer,
ledger, learner (its own trainer process and optimizer), weight broadcaster, policy version and
staleness bound. Nothing is shared between agents but the event loop and the episode driver:
a weight update of one agent reaches only its own engines, and each agent's staleness is counted
against its own version. A frozen agent is served, never trained: its version stays where it
started.

Configuration: one ``[agents.NAME]`` table per agent (``AgentConfig``); a field it leaves unset
inherits the run's shared sections ([model] shape, [optimizer] lr, [async] max_staleness,
[rollout] engines, samples, temperature, response length, steps). Layers, later winning: the
shared sections < the recipe's agent tables < the ``--config`` file's < ``--agent NAME.FIELD=VALUE``.
The ``[episodes]`` table (``EpisodesConfig``) names the episode function that drives them all.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any

import msgspec

from actors.broadcaster import WeightBroadcaster
from actors.learner import Learner
from actors.rollout import SampleRunner
from buffers.buffer import StalenessBuffer
from policies.trainer_api import Trainer
from runtime.config import Config, ConfigError, NonNeg, NonNegF, Pos, PosF
from runtime.core.ledger import Ledger

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
    if a.hidden_size % a.num_attention_heads:
        raise ConfigError(f"{where} hidden_size", f"{a.hidden_size} is not divisible by {a.num_attention_heads} heads")
    if a.num_attention_heads % a.num_query_groups:
        raise ConfigError(f"{where} num_query_groups", "must divide num_attention_heads")
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


@dataclasses.dataclass(eq=False)
class Agent:
    """One agent's actors (module docstring); the episode driver's ``Served``."""

    name: str
    config: AgentConfig
    engines: Any  # runtime.engines.EngineSet, or a fake with its interface
    ledger: Ledger
    runner: SampleRunner  # training sampling
    eval_runner: SampleRunner  # evaluation sampling
    tokenizer: Any
    buffer: StalenessBuffer | None = None  # None: frozen
    learner: Learner | None = None
    broadcaster: WeightBroadcaster | None = None

    @classmethod
    def assemble(cls, name: str, config: AgentConfig, *, engines: Any, trainer: Trainer | None, tokenizer: Any,
                 runner: SampleRunner, eval_runner: SampleRunner, weights_dir: Path,
                 weight_sync_timeout_s: float, pause_mode: str = "in_place") -> Agent:
        """Wire an agent around its engines and (unless frozen) its trainer."""
        agent = cls(name, config, engines, Ledger(), runner, eval_runner, tokenizer)
        if config.frozen:
            return agent
        assert trainer is not None, f"agent {name} is trained: it needs a trainer"
        agent.buffer = StalenessBuffer(groups_per_step=config.groups_per_step, max_staleness=config.max_staleness)
        agent.broadcaster = WeightBroadcaster(engines=engines, buffer=agent.buffer, timeout_s=weight_sync_timeout_s,
                                              pause_mode=pause_mode)
        agent.learner = Learner(trainer=trainer, buffer=agent.buffer, ledger=agent.ledger,
                                publisher=agent.broadcaster, num_steps=config.num_steps,
                                max_staleness=config.max_staleness, weights_dir=weights_dir)
        return agent

    @property
    def trained(self) -> bool:
        return self.learner is not None

    @property
    def version(self) -> int:
        """Its policy version: optimizer steps taken (a frozen agent's stays 0)."""
        return self.learner.version if self.learner is not None else 0

    @property
    def served_version(self) -> int:
        return self.broadcaster.served_version if self.broadcaster is not None else 0

    @property
    def n_samples(self) -> int:
        return self.config.n_samples_per_prompt

    @property
    def groups_per_episode(self) -> int:
        return self.config.groups_per_episode

    def counters(self) -> dict[str, int]:
        """Engine and rollout fault counts of this agent."""
        out: dict[str, int] = {}
        for source in (self.runner.counters, self.eval_runner.counters, getattr(self.engines, "counters", {})):
            for kind, n in source.items():
                out[kind] = out.get(kind, 0) + n
        return out
