"""Agents: one policy each, with actors of its own; a run is one agent or several.

An agent owns an engine set, and, unless it is frozen, a buffer, ledger, learner (its own trainer
process and optimizer), weight broadcaster, policy version and staleness bound. Nothing is shared
between agents but the event loop and the producer that feeds them (the generator of a one-agent
run, the episode driver of a multi-agent one): a weight update of one agent reaches only its own
engines, and each agent's staleness is counted against its own version. A frozen agent is served,
never trained: its version stays where it started.

``build_agent`` is the one build path for every agent of every run: the same buffer rule
(capacity, over-provisioning, the mask rule), weight transport, time slicing, checkpoint restore
and trainer host, whether the run has one agent or several (``runtime.agent_config``).
"""

from __future__ import annotations

import collections
import dataclasses
import functools
from pathlib import Path
from typing import Any, Protocol

import msgspec

from actors.broadcaster import WeightBroadcaster
from actors.learner import Learner
from actors.rollout import SampleRunner
from buffers.buffer import StalenessBuffer
from launchers.recipes.task import Task
from policies import lora as lora_flags
from policies.engine.process import EngineProcess
from policies.engine.sglang_process import with_engine
from policies.model import qwen3_config, write_random_checkpoint
from policies.trainer_api import Trainer
from runtime import checkpoint, preflight, run_task, train_config, weight_transport
from runtime.agent_config import AgentConfig
from runtime.config import Config, ConfigError, LoraConfig
from runtime.core.failures import FailureBudget
from runtime.core.ledger import Ledger
from runtime.engines import EngineSet
from runtime.ipc_weights import IpcWeights
from runtime.local_hosts import local_trainer
from runtime.time_slice import time_slice


class Hosts(Protocol):
    """Where another backend runs the heavy parts, behind the local classes' interfaces."""

    def engine(self, index: int, model_path: str, **kwargs: Any) -> EngineProcess: ...  # EngineProcess's kwargs
    def trainer(self, model_path: str, **kwargs: Any) -> Trainer: ...  # TrainerProcess's kwargs


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
                 runner: SampleRunner, eval_runner: SampleRunner, weights_dir: Path, weight_sync_timeout_s: float,
                 pause_mode: str = "in_place", buffer: StalenessBuffer | None = None, ledger: Ledger | None = None,
                 version: int = 0, publish_files: bool = True) -> Agent:
        """Wire an agent around its engines and (unless frozen) its trainer; ``buffer``/``ledger``:
        restored ones (a resume), else new ones under the agent's own staleness rule.
        ``publish_files``: False when nothing reads weight files (an SFT run has no engine)."""
        agent = cls(name, config, engines, ledger or Ledger(), runner, eval_runner, tokenizer)
        if config.frozen:
            return agent
        assert trainer is not None, f"agent {name} is trained: it needs a trainer"
        agent.buffer = buffer or StalenessBuffer(groups_per_step=config.groups_per_step,
                                                 max_staleness=config.max_staleness)
        agent.broadcaster = WeightBroadcaster(engines=engines, buffer=agent.buffer, timeout_s=weight_sync_timeout_s,
                                              pause_mode=pause_mode, served_version=version,
                                              collective=getattr(engines, "collective", None) is not None
                                              or not publish_files)
        agent.learner = Learner(trainer=trainer, buffer=agent.buffer, ledger=agent.ledger,
                                publisher=agent.broadcaster, num_steps=config.num_steps,
                                max_staleness=config.max_staleness, weights_dir=weights_dir, version=version)
        return agent

    @property
    def trained(self) -> bool:
        return self.learner is not None

    @property
    def version(self) -> int:
        """Its policy version: optimizer steps taken (a frozen agent's stays where it started)."""
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
        out: collections.Counter[str] = collections.Counter()
        for source in (self.runner.counters, self.eval_runner.counters, getattr(self.engines, "counters", {})):
            out.update(source)
        return dict(out)


def sampling_params(*, temperature: float, top_p: float, top_k: int, max_new_tokens: int,
                    stop_token_ids: list[int]) -> dict[str, Any]:
    return {"temperature": temperature, "top_p": top_p, "top_k": top_k, "max_new_tokens": max_new_tokens,
            "stop_token_ids": stop_token_ids}


def initial_checkpoint(cfg: Config, task: Task, out_dir: Path) -> str:
    """The HF directory the agent starts from: the run's model source, else a random-init model of
    the [model] shape written to ``out_dir/initial_model``."""
    if run_task.model_source(cfg):
        return run_task.model_source(cfg)
    m, tok = cfg.model, task.tokenizer
    if m.vocab_size and m.vocab_size < len(tok):
        raise ConfigError("--vocab-size", f"{m.vocab_size} is below the tokenizer's {len(tok)} tokens")
    config = qwen3_config(
        vocab_size=m.vocab_size or len(tok), num_layers=m.num_layers, hidden_size=m.hidden_size,
        num_attention_heads=m.num_attention_heads, num_query_groups=m.num_query_groups,
        ffn_hidden_size=m.ffn_hidden_size, max_position_embeddings=m.max_position_embeddings,
        kv_channels=m.kv_channels,
        pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
    )
    return str(write_random_checkpoint(out_dir / "initial_model", config, tok, seed=cfg.run.seed))


def is_sft(cfg: Config) -> bool:
    return cfg.grpo.loss_type == "sft_loss"


def lora_spec(c: LoraConfig) -> lora_flags.LoraSpec | None:
    """The adapter to train (--lora-rank > 0), else None: full fine-tuning."""
    if not c.enabled:
        return None
    return lora_flags.LoraSpec(rank=c.lora_rank, alpha=c.lora_alpha, dropout=c.lora_dropout,
                               target_modules=c.target_modules or "all-linear")


def own_config(cfg: Config, ac: AgentConfig, index: int) -> Config:
    """The shared sections as this agent sees them: its own model shape, model to start from and
    seed (its checkpoint to resume is the caller's: ``--load`` itself, or ``--load``/NAME)."""
    model = msgspec.convert({f: getattr(ac, f) for f in cfg.model.__struct_fields__}, type(cfg.model))
    replace = msgspec.structs.replace
    ckpt = replace(cfg.ckpt, hf_checkpoint=ac.hf_checkpoint or cfg.ckpt.hf_checkpoint, load="")
    return replace(cfg, model=model, ckpt=ckpt, run=replace(cfg.run, seed=cfg.run.seed + index))


def build_agent(cfg: Config, name: str, ac: AgentConfig, index: int, *, task: Task, home: Path, log_dir: Path,
                weights: Path, resume: checkpoint.Resume | None, hosts: Hosts | None, engine_dtype: str,
                transport: str, budget: FailureBudget | None = None) -> Agent:
    """One agent's actors: its checkpoint, engine set, samplers and (unless frozen) trainer, buffer,
    learner and broadcaster; restored from ``resume`` when given. ``home``: where its initial model
    goes; ``weights``: its weights directory for file transports; ``budget``: the run's failure
    budget its samplers report to."""
    r, a, e = cfg.rollout, cfg.async_, cfg.eval
    own = own_config(cfg, ac, index)
    initial = initial_checkpoint(own, task, home) if not resume or cfg.grpo.use_kl_loss else None
    model_path = str(resume.model_dir) if resume else initial
    lora, adapter = lora_spec(cfg.lora), None
    if lora is not None and resume:  # engines and trainer adapt the base; the adapter is version v's
        model_path, adapter = str(Path(resume.path) / "base"), str(Path(resume.path) / "adapter")
    version = resume.state.version if resume else 0
    sft = is_sft(cfg)  # no engine: the data is the sample (actors/sft_samples.py)
    engines = EngineSet(model_path=model_path, n=0 if sft else ac.rollout_num_engines, log_dir=log_dir,
                        threads=cfg.perf.engine_threads, max_running_requests=cfg.perf.engine_max_running_requests,
                        timeout_s=a.engine_timeout, start_timeout_s=a.engine_start_timeout, fault=cfg.fault,
                        weight_version=version, dtype=engine_dtype, adapters=lora is not None, adapter=adapter,
                        process_factory=with_engine(
        hosts.engine if hosts else None, engine=cfg.engine.engine, host=cfg.engine.engine_host,
        passthrough=(lora_flags.sglang_flags(lora) if lora else {}) | cfg.engine.sglang_args))
    exact, seed = a.partial_rollout_mode == "recompute", r.rollout_seed + 1000 * index
    context = preflight.model_context(own, str(resume.model_dir) if resume else None)
    runner = SampleRunner(engines=engines, decode=task.decode, seed=seed, exact_answer_versions=exact,
                          max_context=context, budget=budget, sampling_params=sampling_params(
        temperature=ac.rollout_temperature, top_p=r.rollout_top_p, top_k=r.rollout_top_k,
        max_new_tokens=ac.rollout_max_response_len, stop_token_ids=task.stop_token_ids))
    eval_runner = SampleRunner(engines=engines, decode=task.decode, seed=seed + 1, exact_answer_versions=exact,
                               max_context=context, budget=budget, sampling_params=sampling_params(
        temperature=e.eval_temperature, top_p=e.eval_top_p, top_k=-1 if e.eval_temperature == 0 else r.rollout_top_k,
        max_new_tokens=e.eval_max_response_len or ac.rollout_max_response_len, stop_token_ids=task.stop_token_ids))
    trainer, buffer, ledger = None, None, None
    if not ac.frozen:
        trainer = _trainer(cfg, ac, model_path, task, version=version, ref_path=cfg.ckpt.ref_load or initial,
                           hosts=hosts, lora=lora, temperature=1.0 if sft else ac.rollout_temperature)
        if resume:
            trainer.load_checkpoint(resume.path)
        # an adapter travels as files (only its own weights: small)
        _attach_transport(engines, trainer, transport="shm" if lora else transport, dtype=engine_dtype, cfg=cfg)
        buffer, ledger = _buffer(cfg, ac), Ledger()
        if resume:
            buffer.restore(resume.state.buffer, served_version=version)
            ledger = Ledger.restore(resume.state.ledger)
            for gid in resume.live_group_ids:
                ledger.restart(gid)
    weights.mkdir(parents=True, exist_ok=True)
    agent = Agent.assemble(name, ac, engines=engines, trainer=trainer, tokenizer=task.tokenizer, runner=runner,
                           eval_runner=eval_runner, weights_dir=weights, weight_sync_timeout_s=a.weight_sync_timeout,
                           pause_mode=a.pause_mode, buffer=buffer, ledger=ledger, version=version,
                           publish_files=not sft)
    if agent.learner is not None and cfg.placement.colocate:
        time_slice(agent.learner, engines)
    return agent


def _buffer(cfg: Config, ac: AgentConfig) -> StalenessBuffer:
    """The agent's buffer under the run's rule: capacity, over-provisioning, the mask rule."""
    r, a = cfg.rollout, cfg.async_
    return StalenessBuffer(groups_per_step=ac.groups_per_step, max_staleness=ac.max_staleness,
                           capacity=a.buffer_capacity,  # the buffer bounds it by (s + 1) x G
                           extra=(a.over_sampling_batch_size or r.rollout_batch_size) - r.rollout_batch_size,
                           mask_stale=a.partial_expiry == "mask")


def _trainer(cfg: Config, ac: AgentConfig, model_path: str, task: Task, *, version: int, ref_path: str | None,
             hosts: Hosts | None, lora: lora_flags.LoraSpec | None, temperature: float) -> Trainer:
    replace = msgspec.structs.replace
    optim = replace(cfg.optimizer, lr=ac.lr, lr_decay_iters=cfg.optimizer.lr_decay_iters or ac.num_steps)
    # a local trainer process builds while the engines start (its first call waits for it)
    new_trainer = hosts.trainer if hosts else functools.partial(local_trainer, ranks=cfg.placement.learner_ranks,
                                                                wait=False)
    # the KL reference: --ref-load, else the policy the run started from (also after a resume)
    return new_trainer(model_path, grpo=replace(cfg.grpo, entropy_coef=ac.entropy_coef), optim=optim,
                       temperature=temperature, pad_id=task.tokenizer.pad_token_id,
                       threads=cfg.perf.learner_threads, version=version, ref_path=ref_path, lora=lora,
                       **cfg.perf.trainer_kwargs,
                       **train_config.trainer_kwargs(cfg.train, cfg.perf.recompute_granularity))


def _attach_transport(engines: EngineSet, trainer: Trainer, *, transport: str, dtype: str, cfg: Config) -> None:
    """Weights from the trainer itself (no files): a broadcast group, or CUDA IPC when colocated."""
    a, p = cfg.async_, cfg.placement
    if transport in ("nccl", "gloo"):
        engines.collective = weight_transport.CollectiveWeights(
            trainer, backend=transport, dtype=dtype, bucket_bytes=p.weight_bucket_mb << 20,
            timeout_s=a.weight_sync_timeout)
    elif transport == "ipc":
        engines.collective = IpcWeights(trainer, dtype=dtype, timeout_s=a.weight_sync_timeout)
