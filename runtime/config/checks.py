"""Cross-field rules, one small function per section, each naming the flag a user would change.

``check`` runs them in a fixed order, so a config with several problems reports the same first one
every time.
"""

from __future__ import annotations

import importlib.util
from typing import TYPE_CHECKING, Any

from runtime.core.errors import ConfigError
from runtime.train_config import check_train

if TYPE_CHECKING:
    from runtime.config.asynchrony import AsyncConfig
    from runtime.config.compute import PerfConfig, PlacementConfig
    from runtime.config.objective import GrpoConfig, LoraConfig, OptimizerConfig
    from runtime.config.rollout import RolloutConfig
    from runtime.config.run import CkptConfig, ModelConfig
    from runtime.config.schema import Config


def check(cfg: Config) -> None:
    """Every cross-field rule; the first broken one raises ``ConfigError``."""
    _check_batches(cfg.rollout)
    _check_plugins(cfg.rollout)
    if cfg.rollout.prompt_data and not (cfg.ckpt.hf_checkpoint or cfg.ckpt.ref_load):
        raise ConfigError("--prompt-data", "needs --hf-checkpoint DIR (its tokenizer and chat template "
                          "turn the prompts into tokens)")
    _check_sft(cfg)
    if len(cfg.eval.eval_prompt_data) % 2:
        raise ConfigError("--eval-prompt-data", f"takes NAME PATH pairs, got {len(cfg.eval.eval_prompt_data)} "
                          "values")
    _check_async(cfg.async_, cfg.rollout)
    _check_ckpt(cfg.ckpt)
    _check_model(cfg.model)
    _check_grpo(cfg.grpo)
    _check_optimizer(cfg.optimizer, num_steps=cfg.rollout.num_steps)
    _check_lora(cfg.lora, cfg.placement)
    _check_perf(cfg.perf, backend=cfg.train.train_backend)
    _check_placement(cfg)
    check_train(cfg.train, learner_ranks=cfg.placement.learner_ranks,
                lora_rank=cfg.lora.lora_rank, loss_type=cfg.grpo.loss_type)
    _check_engine(cfg)
    _check_packages(cfg)
    _module_function("--metrics-sink", cfg.log.metrics_sink)


def _module_function(name: str, path: str) -> None:
    """Plug-ins load only from ``module:function`` paths."""
    if path and ":" not in path:
        raise ConfigError(name, f"must be module:function, got {path!r}")


def _check_batches(r: RolloutConfig) -> None:
    if r.global_batch_size % r.n_samples_per_prompt:
        raise ConfigError(
            "--global-batch-size",
            f"{r.global_batch_size} is not a multiple of --n-samples-per-prompt {r.n_samples_per_prompt}"
            " (a step trains whole groups)",
        )
    produced = r.rollout_batch_size * r.n_samples_per_prompt
    if produced != r.global_batch_size * r.steps_per_rollout:
        raise ConfigError(
            "--global-batch-size",
            f"rollout batch x samples per prompt = {r.rollout_batch_size} x {r.n_samples_per_prompt} = "
            f"{produced} must equal global batch x steps per rollout = "
            f"{r.global_batch_size} x {r.steps_per_rollout}",
        )
    if r.rollout_top_k == 0 or r.rollout_top_k < -1:
        raise ConfigError("--rollout-top-k", f"must be -1 (off) or >= 1, got {r.rollout_top_k}")


def _check_plugins(r: RolloutConfig) -> None:
    """The rollout's plug-in paths, and the reward flags that go with them."""
    _module_function("--custom-generate-function-path", r.custom_generate_function_path)
    _module_function("--custom-rm-path", r.custom_rm_path)
    if r.custom_rm_path and r.rm_type:
        raise ConfigError("--rm-type", f"give --rm-type or --custom-rm-path, not both (got {r.rm_type!r} and "
                          f"{r.custom_rm_path!r})")
    if r.group_rm and not r.custom_rm_path:
        raise ConfigError("--group-rm", "needs --custom-rm-path (a function scoring a whole group)")
    _module_function("--dynamic-sampling-filter-path", r.dynamic_sampling_filter_path)


def _check_sft(cfg: Config) -> None:
    """SFT trains on files, one target per input, with no engine to generate or evaluate on."""
    r = cfg.rollout
    if r.num_epoch is not None and not r.prompt_data:
        raise ConfigError("--num-epoch", "counts passes over --prompt-data, which is not given")
    if cfg.grpo.loss_type != "sft_loss":
        return
    if not r.prompt_data:
        raise ConfigError("--loss-type", "sft_loss trains on --prompt-data rows of messages")
    if r.n_samples_per_prompt != 1:
        raise ConfigError("--n-samples-per-prompt", f"SFT has one target per input: 1, got {r.n_samples_per_prompt}")
    for value, name in ((cfg.eval.eval_prompt_data, "--eval-prompt-data"), (r.custom_generate_function_path,
                        "--custom-generate-function-path"), (cfg.engine.sglang_args, "--sglang-*"),
                        (r.dynamic_sampling_filter_path, "--dynamic-sampling-filter-path")):
        if value:
            raise ConfigError(name, "an SFT run generates and scores nothing (--loss-type sft_loss)")


def _check_async(a: AsyncConfig, r: RolloutConfig) -> None:
    if a.over_sampling_batch_size is not None and a.over_sampling_batch_size < r.rollout_batch_size:
        raise ConfigError("--over-sampling-batch-size",
                          f"{a.over_sampling_batch_size} is below --rollout-batch-size {r.rollout_batch_size}")
    if a.buffer_capacity is not None and a.buffer_capacity < r.groups_per_step:
        raise ConfigError(
            "--buffer-capacity",
            f"{a.buffer_capacity} groups cannot hold one step's {r.groups_per_step} groups",
        )


def _check_ckpt(c: CkptConfig) -> None:
    if c.save_interval and not c.save:
        raise ConfigError("--save-interval", "needs --save DIR")


def shape_problem(hidden_size: int, num_attention_heads: int, num_query_groups: int, kv_channels: int
                  ) -> tuple[str, str] | None:
    """(field, problem) of a random-init model's attention shape, or None: the one rule for the run's
    [model] and each [agents.NAME] table."""
    if hidden_size % num_attention_heads and not kv_channels:
        return "hidden_size", f"{hidden_size} is not divisible by {num_attention_heads} heads (or set kv_channels)"
    if num_attention_heads % num_query_groups:
        return "num_query_groups", f"{num_query_groups} does not divide {num_attention_heads} attention heads"
    return None


def _check_model(m: ModelConfig) -> None:
    problem = shape_problem(m.hidden_size, m.num_attention_heads, m.num_query_groups, m.kv_channels)
    if problem is not None:
        raise ConfigError("--" + problem[0].replace("_", "-"), problem[1])


def _check_grpo(g: GrpoConfig) -> None:
    if g.tis_clip_low >= g.tis_clip:
        raise ConfigError("--tis-clip-low", f"must be below --tis-clip {g.tis_clip}")
    caps = g.tis_clip_by_staleness
    if any(c <= g.tis_clip_low for c in caps):
        raise ConfigError("--tis-clip-by-staleness", f"every cap must be above --tis-clip-low {g.tis_clip_low}")
    if any(b > a for a, b in zip(caps, caps[1:])):
        raise ConfigError("--tis-clip-by-staleness", f"must not increase with staleness, got {caps}")


def _check_optimizer(o: OptimizerConfig, *, num_steps: int) -> None:
    if o.min_lr > o.lr:
        raise ConfigError("--min-lr", f"{o.min_lr} is above --lr {o.lr}")
    if o.lr_decay_style != "constant" and o.lr_warmup_iters >= (o.lr_decay_iters or num_steps):
        raise ConfigError("--lr-warmup-iters", f"{o.lr_warmup_iters} leaves no steps to decay over before step "
                          f"{o.lr_decay_iters or num_steps} (--lr-decay-iters, default the run's last step)")


def _check_lora(lora: LoraConfig, p: PlacementConfig) -> None:
    if lora.enabled and p.weight_transport not in ("auto", "shm"):
        raise ConfigError("--weight-transport", f"{p.weight_transport} sends every weight; with "
                          "--lora-rank the adapter travels as files (auto or shm)")
    if lora.enabled and p.learner_ranks > 1:
        raise ConfigError("--lora-rank", f"an adapter trains on one learner rank for now; got "
                          f"{p.learner_ranks} ranks")


def _check_perf(p: PerfConfig, *, backend: str) -> None:
    if p.use_dynamic_batch_size and p.max_tokens_per_gpu is None:
        raise ConfigError("--max-tokens-per-gpu", "--use-dynamic-batch-size needs a token budget per micro-batch")
    if p.max_tokens_per_gpu is not None and not p.use_dynamic_batch_size:
        raise ConfigError("--max-tokens-per-gpu", "takes effect only with --use-dynamic-batch-size (as in Miles)")
    if p.recompute_granularity == "selective" and backend == "fsdp":
        raise ConfigError("--recompute-granularity", "selective (attention only) needs --train-backend megatron; "
                          "the fsdp learner recomputes whole decoder layers: use full")


def _check_placement(cfg: Config) -> None:
    _check_learner_placement(cfg.placement, backend=cfg.run.backend)
    _check_engine_placement(cfg.placement, engines=cfg.rollout.rollout_num_engines)
    _check_weight_transport(cfg.placement)


def _check_learner_placement(p: PlacementConfig, *, backend: str) -> None:
    if p.actor_num_nodes != 1 and (backend != "ray" or not p.learner_gpus):
        raise ConfigError("--actor-num-nodes", f"a learner on more than one node needs --backend ray and GPUs "
                          f"(--actor-num-gpus-per-node), got {p.actor_num_nodes} nodes")
    if p.actor_num_cpu_ranks > 1 and p.learner_gpus:
        raise ConfigError("--actor-num-cpu-ranks", "is for a CPU learner; on GPUs the learner has one rank per GPU "
                          "(--actor-num-gpus-per-node)")
    if p.colocate and p.learner_ranks > 1:
        raise ConfigError("--colocate", f"colocated engines share one learner GPU for now; got {p.learner_ranks} "
                          "learner ranks")


def _check_engine_placement(p: PlacementConfig, *, engines: int) -> None:
    per_engine, learner_gpus = p.rollout_num_gpus_per_engine, p.learner_gpus
    if p.rollout_num_gpus % per_engine:
        raise ConfigError("--rollout-num-gpus", f"{p.rollout_num_gpus} is not a multiple of "
                          f"--rollout-num-gpus-per-engine {per_engine}")
    if p.rollout_num_gpus and p.rollout_num_gpus // per_engine != engines:
        raise ConfigError("--rollout-num-gpus", f"{p.rollout_num_gpus} GPUs at {per_engine} per engine make "
                          f"{p.rollout_num_gpus // per_engine} engines, but --rollout-num-engines is {engines}")
    if p.colocate and p.rollout_num_gpus not in (0, learner_gpus):
        raise ConfigError("--colocate", f"colocated engines use the learner's {learner_gpus} GPU(s); "
                          f"--rollout-num-gpus must be 0 or {learner_gpus}, got {p.rollout_num_gpus}")


def _check_weight_transport(p: PlacementConfig) -> None:
    if p.weight_transport == "nccl" and not (p.learner_gpus and (p.rollout_num_gpus or p.colocate)):
        raise ConfigError("--weight-transport", "nccl needs the learner and the engines on GPUs "
                          "(--actor-num-gpus-per-node 1 --rollout-num-gpus N)")
    if p.weight_transport == "ipc" and not (p.learner_gpus and p.colocate):
        raise ConfigError("--weight-transport", "ipc needs the engines on the learner's GPU "
                          "(--colocate --actor-num-gpus-per-node 1)")


def _check_engine(cfg: Config) -> None:
    """What --engine allows: SGLang flags only with SGLang, and none the runtime sets itself."""
    from policies.engine.sglang_launch import PASSTHROUGH_PREFIX, sglang_command

    e = cfg.engine
    if not e.engine_host:
        raise ConfigError("--engine-host", "must be non-empty")
    if e.engine != "sglang":
        if e.sglang_args:
            raise ConfigError(PASSTHROUGH_PREFIX + next(iter(e.sglang_args)), "SGLang flags need --engine sglang")
        return
    if cfg.async_.partial_rollout_mode == "keep":
        # SGLang 0.5.23 does date tokens (meta_info.weight_versions), but its weight load flushes
        # the prefix cache (flush_cache defaults to true) and a flush is refused while requests are
        # held by an in_place pause, so the load fails
        raise ConfigError("--partial-rollout-mode", "keep holds requests in place across a weight load, which "
                          "SGLang refuses (the load's cache flush fails under held requests); use recompute with "
                          "--engine sglang")
    passthrough: dict[str, Any] = {}
    for key, value in e.sglang_args.items():  # refused here, not when an engine starts
        passthrough[key] = value
        try:
            sglang_command(model_path="m", port=1, passthrough=passthrough)
        except (ValueError, TypeError) as err:
            raise ConfigError(PASSTHROUGH_PREFIX + key, str(err)) from None


def _check_packages(cfg: Config) -> None:
    """Optional packages a flag needs, refused before any process starts."""
    lg = cfg.log
    for wanted, package, name in ((lg.use_tensorboard, "tensorboard", "--use-tensorboard"),
                                  (lg.use_wandb, "wandb", "--use-wandb"),
                                  (cfg.run.progress == "rich", "rich", "--progress"),
                                  (cfg.lora.enabled, "peft", "--lora-rank")):
        if wanted and importlib.util.find_spec(package) is None:
            raise ConfigError(name, f"needs the {package} package, which is not installed (pip install {package})")
