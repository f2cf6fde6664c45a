"""Typed run configuration: one small msgspec Struct per concern, grouped like Miles's arguments.

Each component receives only its own section (or a few fields of it), never the whole ``Config``.
Values resolve in this order, later winning: field defaults < recipe < ``--config FILE`` (TOML,
one table per section) < command-line flags. Every flag is the field name with dashes
(``rollout_batch_size`` -> ``--rollout-batch-size``), so a field name is unique across sections.
Invalid values raise ``ConfigError`` naming the flag; ``runtime.cli`` turns that into exit 2.
"""

from __future__ import annotations

import importlib.util
import re
from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta

from runtime.core.errors import ConfigError
from runtime.train_config import TrainConfig, check_train

Pos = Annotated[int, Meta(ge=1)]
NonNeg = Annotated[int, Meta(ge=0)]
PosF = Annotated[float, Meta(gt=0)]
NonNegF = Annotated[float, Meta(ge=0)]
Prob = Annotated[float, Meta(gt=0, le=1)]


class Section(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    pass


class RunConfig(Section):
    """RUN: what to run and where it writes."""

    recipe: str = "default"  # a built-in recipe (launchers.recipes)
    run_dir: str = ""  # default: runs/<recipe>-<timestamp>
    overwrite: bool = False  # replace the run recorded in a non-empty --run-dir (refused without it, or --load)
    backend: Literal["local", "ray"] = "local"  # ray: every long-lived part a Ray actor (pip install -e '.[ray]')
    ray_address: str = ""  # an existing Ray cluster (host:port); empty: $RAY_ADDRESS, else start a local one
    seed: int = 1234
    progress: Literal["auto", "rich", "bar", "lines", "off"] = "auto"  # auto: rich (or bar) on a terminal, else lines


class ModelConfig(Section):
    """MODEL: the shape of the random-init model built when no ``--hf-checkpoint`` is given."""

    num_layers: Pos = 2
    hidden_size: Pos = 64
    num_attention_heads: Pos = 4
    num_query_groups: Pos = 2  # key/value heads
    ffn_hidden_size: Pos = 128
    max_position_embeddings: Pos = 64
    vocab_size: NonNeg = 0  # 0: the tokenizer's; larger pads the embedding (e.g. 151936, Qwen3's)


class CkptConfig(Section):
    """CKPT: model and tokenizer source."""

    hf_checkpoint: str = ""  # a local HF directory; empty: build the recipe's model from MODEL
    save: str = ""  # directory for resumable checkpoints; empty: none
    save_interval: NonNeg = 0  # learner steps between checkpoints; 0: only at the end
    load: str = ""  # resume from the latest checkpoint in this directory
    ref_load: str = ""  # HF directory of the KL reference (--use-kl-loss); default: the initial policy


class RolloutConfig(Section):
    """ROLLOUT: prompts, sampling, reward, and the four batch knobs."""

    rollout_batch_size: Pos = 16  # prompts per rollout
    n_samples_per_prompt: Pos = 8
    global_batch_size: Pos = 128  # samples per optimizer step
    num_steps_per_rollout: Pos | None = None  # derived when unset
    num_rollout: Pos = 200
    num_epoch: Pos | None = None  # passes over --prompt-data; sets --num-rollout from the file's rows
    rollout_temperature: NonNegF = 1.0
    rollout_top_p: Prob = 1.0
    rollout_top_k: int = -1
    rollout_max_response_len: Pos = 8
    rollout_num_engines: Pos = 1
    # prompts from a file instead of the recipe's: JSONL or Parquet, one prompt per row (Miles's flags)
    prompt_data: str = ""  # JSONL or .parquet file of prompts; needs --hf-checkpoint (its tokenizer)
    input_key: str = "input"  # the row's prompt: a string, or a list of {role, content} messages
    label_key: str = ""  # the row's label (what the reward checks); empty: none
    metadata_key: str = "metadata"  # the row's metadata object, handed to the reward (optional per row)
    apply_chat_template: bool = False  # render prompts with the model's chat template
    apply_chat_template_kwargs: str = ""  # JSON object for the template, e.g. {"enable_thinking": false}
    rollout_shuffle: bool = False  # shuffle the prompts, anew each epoch (seeded by --rollout-seed)
    rm_type: Literal["", "math", "gsm8k", "exact", "f1"] = ""  # a built-in verifier (launchers/rewards.py)
    custom_rm_path: str = ""  # module:function; empty: --rm-type, else the recipe's reward
    group_rm: bool = False  # the reward scores a whole group in one call: fn(prompt, samples) -> list
    reward_key: str = ""  # the reward returns a dict of components: train on this one, log them all
    # fn(group) -> bool or (keep, reason); a dropped group is counted as filter_<reason> and replaced
    dynamic_sampling_filter_path: str = ""  # module:function; DAPO's: buffers.filters:check_reward_nonzero_std
    reward_timeout: PosF = 10.0  # seconds per sample before the reward counts as failed
    rollout_seed: int = 42
    # multi-turn episodes (actors/generate_fn.py): with one, --rollout-max-response-len bounds one
    # policy turn and the four fields below bound the episode
    custom_generate_function_path: str = ""  # module:function, async (Conversation) -> reward | None, run per sample
    max_turns: Pos = 8  # policy turns per episode
    rollout_max_context_len: NonNeg = 0  # prompt + every turn, in tokens; 0: --max-position-embeddings
    tool_timeout: PosF = 10.0  # seconds for one tool call (Conversation.call_tool)
    generate_timeout: PosF = 120.0  # seconds for one sample's whole episode

    @property
    def steps_per_rollout(self) -> int:
        if self.num_steps_per_rollout is not None:
            return self.num_steps_per_rollout
        return max(1, self.rollout_batch_size * self.n_samples_per_prompt // self.global_batch_size)

    @property
    def groups_per_step(self) -> int:
        """Prompt groups one optimizer step consumes: the unit of staleness admission."""
        return self.global_batch_size // self.n_samples_per_prompt

    @property
    def num_steps(self) -> int:
        return self.num_rollout * self.steps_per_rollout


class EvalConfig(Section):
    """EVAL: periodic evaluation on held-out prompts; flags left unset inherit ROLLOUT's."""

    eval_interval: NonNeg = 25  # learner steps between evaluations; 0: only first and final
    eval_temperature: NonNegF = 0.0  # greedy by default
    eval_top_p: Prob = 1.0
    eval_max_response_len: Pos | None = None
    n_samples_per_eval_prompt: Pos = 1
    eval_num_prompts: Pos = 200
    # held-out prompt files read like --prompt-data; they replace the recipe's held-out prompts
    eval_prompt_data: list[str] = []  # NAME PATH [NAME PATH ...]: each set logged as eval/NAME


class PlacementConfig(Section):
    """PLACEMENT: GPUs for the learner and the engines (Miles's flags; --backend ray); see runtime/placement.py."""

    actor_num_nodes: Pos = 1  # nodes for the learner (more than 1: --backend ray, on GPUs)
    actor_num_gpus_per_node: NonNeg = 0  # learner GPUs per node, one data-parallel rank each; 0: CPU (Miles: 8)
    # a CPU learner's data-parallel ranks (gloo), on one node; Miles has no CPU learner, hence a flag
    # of our own: a GPU count that meant CPUs would mislead, and --learner-threads is each rank's threads
    actor_num_cpu_ranks: Pos = 1
    rollout_num_gpus: NonNeg = 0  # GPUs for all engines: --rollout-num-engines x per engine; 0: CPU
    rollout_num_gpus_per_engine: Pos = 1  # GPUs per engine (its tensor-parallel size)
    colocate: bool = False  # engines share the learner's GPUs (time-sliced) instead of their own
    # how weights reach the engines (runtime/weight_transport.py): shm = a file in shared memory;
    # nccl / gloo = a broadcast from the trainer's GPU / CPU memory; ipc = engines on the learner's
    # GPU map its weights (CUDA IPC); auto = nccl when the learner and the engines have GPUs of
    # their own, ipc when they share the learner's, else shm
    weight_transport: Literal["auto", "shm", "nccl", "gloo", "ipc"] = "auto"
    weight_bucket_mb: Pos = 512  # largest broadcast bucket (the engine holds one beside its weights)

    @property
    def learner_gpus(self) -> int:
        return self.actor_num_nodes * self.actor_num_gpus_per_node

    @property
    def learner_ranks(self) -> int:
        """Data-parallel learner ranks: one per learner GPU, else ``--actor-num-cpu-ranks``."""
        return self.learner_gpus or self.actor_num_cpu_ranks


class PerfConfig(Section):
    """PERF: threads, engine capacity, and the learner's micro-batches and recompute (policies/microbatch.py)."""

    learner_threads: Pos = 1
    engine_threads: Pos = 1
    engine_dtype: Literal["auto", "float32", "bfloat16"] = "auto"  # auto: bfloat16 on a GPU, float32 on CPUs
    engine_max_running_requests: Pos = 512
    micro_batch_size: Pos | None = None  # samples per micro-batch; default: the whole step in one (Miles: 1)
    use_dynamic_batch_size: bool = False  # micro-batches packed up to --max-tokens-per-gpu tokens instead
    max_tokens_per_gpu: Pos | None = None  # tokens per micro-batch, with --use-dynamic-batch-size
    recompute_granularity: Literal["full", "selective"] | None = None  # full: recompute every decoder layer

    @property
    def trainer_kwargs(self) -> dict[str, Any]:
        """What ``PolicyTrainer`` takes of this section besides threads."""
        return {"micro_batch_size": self.micro_batch_size,
                "max_tokens_per_gpu": self.max_tokens_per_gpu if self.use_dynamic_batch_size else None,
                "recompute_activations": self.recompute_granularity == "full"}


class EngineConfig(Section):
    """ENGINE: which inference server runs each engine. --sglang-X [VALUE]: any SGLang server flag,
    passed to it as --X (--sglang-mem-fraction-static 0.8, --sglang-enable-metrics); in TOML,
    [engine] sglang_args = {mem-fraction-static = 0.8}."""

    engine: Literal["embedded", "sglang"] = "embedded"  # embedded: policies.engine.server; sglang: real SGLang
    engine_host: str = "127.0.0.1"  # address the engine servers bind (they have no authentication)
    sglang_args: dict[str, str | bool | int | float] = {}  # the --sglang-X flags, without the prefix


def engine_defaults(data: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Defaults that depend on ``--engine`` (values given explicitly are kept, and checked in
    ``_check_engine``). SGLang: --partial-rollout-mode recompute (its pause mode ``abort``)."""
    if not isinstance(data.get("engine"), dict) or data["engine"].get("engine") != "sglang":
        return data
    out = {section: dict(values) for section, values in data.items()}
    out.setdefault("async", {}).setdefault("partial_rollout_mode", "recompute")
    return out


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


class GrpoConfig(Section):
    """GRPO: the RL objective."""

    # sft_loss: supervised fine-tuning on --prompt-data messages (assistant tokens only); no engines
    loss_type: Literal["policy_loss", "sft_loss"] = "policy_loss"
    calculate_per_token_loss: bool = False  # sft_loss: mean over the step's tokens; off: each sample's mean, averaged
    advantage_estimator: Literal["grpo"] = "grpo"
    normalize_advantage_std: bool = True  # divide by the group's std (Dr.GRPO turns this off)
    eps_clip: PosF = 0.2
    eps_clip_high: PosF | None = None  # default: eps_clip
    use_tis: bool = False  # weight each token's loss by pi_prox / pi_behavior, bounded (decoupled PPO)
    tis_clip: PosF = 2.0  # upper bound of the weight
    tis_clip_low: NonNegF = 0.0  # lower bound of the weight
    tis_level: Literal["token", "sequence", "geometric"] = "token"  # per token; product per sequence; its geo mean
    tis_mode: Literal["truncate", "mask"] = "truncate"  # out of bounds: clamp (TIS) or weight 0 (MIS/icepop)
    # Non-increasing (checked): staler tokens are further off-policy, so they get the tighter cap.
    tis_clip_by_staleness: list[float] = []  # cap by staleness 0,1,.. (last: older) e.g. 2,1.5,1.2; replaces --tis-clip
    use_kl_loss: bool = False
    kl_loss_coef: NonNegF = 0.0
    kl_loss_type: Literal["k1", "k2", "low_var_kl"] = "low_var_kl"
    entropy_coef: NonNegF = 0.0


class OptimizerConfig(Section):
    """OPTIMIZER."""

    optimizer: Literal["adam"] = "adam"
    lr: PosF = 1e-3  # the peak learning rate
    min_lr: NonNegF = 0.0  # where --lr-decay-style linear/cosine ends
    lr_decay_style: Literal["constant", "linear", "cosine"] = "constant"  # after the warm-up (policies/lr_schedule.py)
    lr_warmup_iters: NonNeg = 0  # optimizer steps of linear warm-up from 0
    lr_decay_iters: Pos | None = None  # the step the decay ends at; default: the run's last step
    weight_decay: NonNegF = 0.0
    adam_beta1: Annotated[float, Meta(ge=0, lt=1)] = 0.9
    adam_beta2: Annotated[float, Meta(ge=0, lt=1)] = 0.999
    adam_eps: PosF = 1e-8
    clip_grad: NonNegF = 1.0  # 0: off


class LoraConfig(Section):
    """LORA: train a LoRA adapter (peft) instead of every weight; engines load only the adapter."""

    lora_rank: NonNeg = 0  # 0: full fine-tuning
    lora_alpha: PosF = 32.0  # the adapter's scale is alpha / rank
    lora_dropout: Annotated[float, Meta(ge=0, lt=1)] = 0.0
    target_modules: list[str] = []  # module names to adapt, e.g. q_proj,v_proj; empty: every linear layer

    @property
    def enabled(self) -> bool:
        return self.lora_rank > 0


class AsyncConfig(Section):
    """ASYNC: freshness against throughput, and the timeouts that keep the loop from hanging."""

    max_staleness: NonNeg = 1  # policy versions; 0 = synchronous on-policy
    # what a weight update does to requests in flight. keep: frozen between decode steps, they
    # continue on their KV cache (needs an engine that dates each token, as the embedded one does);
    # recompute: they end, and are re-sent with the tokens so far, re-prefilled under the new weights
    partial_rollout_mode: Literal["keep", "recompute"] = "keep"
    over_sampling_batch_size: Pos | None = None  # prompts in flight per rollout batch (APRIL); default: no extra
    # recompute: generated again from its prompt; drop: dropped; mask: carried on, its tokens past the
    # bound kept as context but masked from the loss (Miles's --mask-offpolicy-in-partial-rollout, per token)
    partial_expiry: Literal["recompute", "drop", "mask"] = "recompute"  # over-sampled groups past their deadline
    buffer_capacity: Pos | None = None  # groups; default (max_staleness + 1) * groups per step
    engine_timeout: PosF = 120.0  # seconds for one engine call
    engine_start_timeout: PosF = 180.0  # seconds for an engine to load and answer /health_generate
    weight_sync_timeout: PosF = 120.0  # seconds for pause + load + continue on every engine
    stall_timeout: PosF = 600.0  # no learner step for this long ends the run with a dump

    @property
    def pause_mode(self) -> str:
        """The engines' /pause_generation mode for ``partial_rollout_mode``."""
        return "in_place" if self.partial_rollout_mode == "keep" else "abort"

    def capacity(self, groups_per_step: int) -> int:
        """Groups that may be admitted and not yet trained (the buffer's bound).

        AReaL's rule: admitted - dropped <= (version + max_staleness + 1) * groups_per_step, so at
        most ``(max_staleness + 1) * groups_per_step`` groups are outstanding; a smaller explicit
        capacity trades throughput for memory and freshness.
        """
        bound = (self.max_staleness + 1) * groups_per_step
        return bound if self.buffer_capacity is None else min(bound, self.buffer_capacity)


class FaultConfig(Section):
    """FAULT: engine health checks, restarts, and fault injection (chaos) for testing them."""

    health_check_interval: NonNegF = 2.0  # seconds between probes of every engine; 0: no probes
    health_check_timeout: PosF = 10.0  # a probe slower than this marks the engine hung
    engine_progress_timeout: PosF = 60.0  # requests in flight and none finished for this long: hung
    max_engine_restarts: NonNeg = 5  # per engine within --engine-restart-window; one more ends the run
    engine_restart_window: PosF = 300.0  # seconds
    # samples failing in a row on one cause (engine errors, reward errors or timeouts) that end the
    # run with the first error, instead of spinning until --stall-timeout; 0: never
    max_consecutive_failures: NonNeg = 256
    chaos_kill_interval: NonNegF = 0.0  # fault injection: SIGKILL a random engine every N seconds; 0: off
    chaos_hang_at: NonNegF = 0.0  # fault injection: SIGSTOP one engine once, N seconds in; 0: off
    chaos_seed: int = 0


class LogConfig(Section):
    """LOGGING: where metrics and the timeline go (metrics.jsonl is always written)."""

    trace: bool = True  # write trace.json, a timeline of every actor (open it in ui.perfetto.dev)
    trace_max_events: Pos = 2_000_000  # events past this are counted, not written
    use_tensorboard: bool = False  # also write TensorBoard event files to <run-dir>/tensorboard
    use_wandb: bool = False  # also log to Weights & Biases
    wandb_project: str = "asyncrl"
    wandb_group: str = ""
    wandb_mode: Literal["auto", "online", "offline", "disabled"] = "auto"  # auto: $WANDB_MODE, else online
    metrics_sink: str = ""  # module:function returning an extra sink (write(step, metrics), close())


class Config(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    run: RunConfig = msgspec.field(default_factory=RunConfig)
    model: ModelConfig = msgspec.field(default_factory=ModelConfig)
    ckpt: CkptConfig = msgspec.field(default_factory=CkptConfig)
    rollout: RolloutConfig = msgspec.field(default_factory=RolloutConfig)
    eval: EvalConfig = msgspec.field(default_factory=EvalConfig)
    perf: PerfConfig = msgspec.field(default_factory=PerfConfig)
    engine: EngineConfig = msgspec.field(default_factory=EngineConfig)
    placement: PlacementConfig = msgspec.field(default_factory=PlacementConfig)
    grpo: GrpoConfig = msgspec.field(default_factory=GrpoConfig)
    optimizer: OptimizerConfig = msgspec.field(default_factory=OptimizerConfig)
    lora: LoraConfig = msgspec.field(default_factory=LoraConfig)
    train: TrainConfig = msgspec.field(default_factory=TrainConfig)
    async_: AsyncConfig = msgspec.field(default_factory=AsyncConfig, name="async")
    fault: FaultConfig = msgspec.field(default_factory=FaultConfig)
    log: LogConfig = msgspec.field(default_factory=LogConfig)


SECTIONS: dict[str, type[Section]] = {
    f.encode_name: f.type for f in msgspec.structs.fields(Config)  # type: ignore[misc]
}
GROUP_TITLES = {
    "run": "RUN", "model": "MODEL", "ckpt": "CKPT", "rollout": "ROLLOUT", "eval": "EVAL",
    "perf": "PERF", "placement": "PLACEMENT", "grpo": "GRPO", "optimizer": "OPTIMIZER", "lora": "LORA",
    "async": "ASYNC", "fault": "FAULT", "log": "LOGGING", "engine": "ENGINE", "train": "TRAIN",
}


def flag(field_name: str) -> str:
    return "--" + field_name.replace("_", "-")


def merge(base: dict[str, dict[str, Any]], over: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Section-wise overlay of plain dicts; unknown sections raise with the section's name."""
    out = {k: dict(v) for k, v in base.items()}
    for section, values in over.items():
        if section not in SECTIONS:
            raise ConfigError(f"[{section}]", f"unknown section (known: {', '.join(SECTIONS)})")
        if not isinstance(values, dict):
            raise ConfigError(f"[{section}]", "must be a table")
        out.setdefault(section, {}).update(values)
    return out


def build(data: dict[str, dict[str, Any]]) -> Config:
    """Validate plain values into a ``Config``; the first problem raises ``ConfigError``."""
    try:
        cfg = msgspec.convert(engine_defaults(data), Config, strict=False)
    except msgspec.ValidationError as e:
        raise _as_config_error(e) from None
    check(cfg)
    return cfg


def _as_config_error(e: msgspec.ValidationError) -> ConfigError:
    """Turn msgspec's ``reason - at `$.section.field``` into the flag a user would type."""
    reason, _, where = str(e).rpartition(" - at `")
    if not reason:
        reason, where = str(e), "$"
    parts = where.rstrip("`").split(".")[1:]
    unknown = re.search(r"unknown field `([^`]+)`", reason)
    if unknown and len(parts) == 0:
        return ConfigError(f"[{unknown.group(1)}]", f"unknown section (known: {', '.join(SECTIONS)})")
    if unknown and len(parts) == 1:
        return ConfigError(f"[{parts[0]}] {unknown.group(1)}", "unknown field")
    if len(parts) >= 2:
        return ConfigError(flag(parts[1].split("[")[0]), reason)  # sglang_args[...]: the table's flag
    return ConfigError(f"[{parts[0]}]" if parts else "config", reason)


def check(cfg: Config) -> None:
    """Cross-field rules, each naming the flag a user would change."""
    r = cfg.rollout
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
    if r.custom_generate_function_path and ":" not in r.custom_generate_function_path:
        raise ConfigError("--custom-generate-function-path", f"must be module:function, got "
                          f"{r.custom_generate_function_path!r}")
    if r.custom_rm_path and ":" not in r.custom_rm_path:
        raise ConfigError("--custom-rm-path", f"must be module:function, got {r.custom_rm_path!r}")
    if r.custom_rm_path and r.rm_type:
        raise ConfigError("--rm-type", f"give --rm-type or --custom-rm-path, not both (got {r.rm_type!r} and "
                          f"{r.custom_rm_path!r})")
    if r.group_rm and not r.custom_rm_path:
        raise ConfigError("--group-rm", "needs --custom-rm-path (a function scoring a whole group)")
    if r.dynamic_sampling_filter_path and ":" not in r.dynamic_sampling_filter_path:
        raise ConfigError("--dynamic-sampling-filter-path",
                          f"must be module:function, got {r.dynamic_sampling_filter_path!r}")
    if r.prompt_data and not (cfg.ckpt.hf_checkpoint or cfg.ckpt.ref_load):
        raise ConfigError("--prompt-data", "needs --hf-checkpoint DIR (its tokenizer and chat template "
                          "turn the prompts into tokens)")
    _check_sft(cfg)
    if len(cfg.eval.eval_prompt_data) % 2:
        raise ConfigError("--eval-prompt-data", f"takes NAME PATH pairs, got {len(cfg.eval.eval_prompt_data)} "
                          "values")
    a = cfg.async_
    if a.over_sampling_batch_size is not None and a.over_sampling_batch_size < r.rollout_batch_size:
        raise ConfigError("--over-sampling-batch-size",
                          f"{a.over_sampling_batch_size} is below --rollout-batch-size {r.rollout_batch_size}")
    if a.buffer_capacity is not None and a.buffer_capacity < r.groups_per_step:
        raise ConfigError(
            "--buffer-capacity",
            f"{a.buffer_capacity} groups cannot hold one step's {r.groups_per_step} groups",
        )
    c = cfg.ckpt
    if c.save_interval and not c.save:
        raise ConfigError("--save-interval", "needs --save DIR")
    m = cfg.model
    if m.hidden_size % m.num_attention_heads:
        raise ConfigError("--hidden-size", f"{m.hidden_size} is not divisible by {m.num_attention_heads} heads")
    if m.num_attention_heads % m.num_query_groups:
        raise ConfigError("--num-query-groups", "must divide --num-attention-heads")
    g = cfg.grpo
    if g.tis_clip_low >= g.tis_clip:
        raise ConfigError("--tis-clip-low", f"must be below --tis-clip {g.tis_clip}")
    caps = g.tis_clip_by_staleness
    if any(c <= g.tis_clip_low for c in caps):
        raise ConfigError("--tis-clip-by-staleness", f"every cap must be above --tis-clip-low {g.tis_clip_low}")
    if any(b > a for a, b in zip(caps, caps[1:])):
        raise ConfigError("--tis-clip-by-staleness", f"must not increase with staleness, got {caps}")
    o = cfg.optimizer
    if o.min_lr > o.lr:
        raise ConfigError("--min-lr", f"{o.min_lr} is above --lr {o.lr}")
    if o.lr_decay_style != "constant" and o.lr_warmup_iters >= (o.lr_decay_iters or r.num_steps):
        raise ConfigError("--lr-warmup-iters", f"{o.lr_warmup_iters} leaves no steps to decay over before step "
                          f"{o.lr_decay_iters or r.num_steps} (--lr-decay-iters, default the run's last step)")
    if cfg.lora.enabled and cfg.placement.weight_transport not in ("auto", "shm"):
        raise ConfigError("--weight-transport", f"{cfg.placement.weight_transport} sends every weight; with "
                          "--lora-rank the adapter travels as files (auto or shm)")
    if cfg.lora.enabled and cfg.placement.learner_ranks > 1:
        raise ConfigError("--lora-rank", f"an adapter trains on one learner rank for now; got "
                          f"{cfg.placement.learner_ranks} ranks")
    _check_perf(cfg.perf, backend=cfg.train.train_backend)
    _check_placement(cfg)
    p = cfg.placement
    check_train(cfg.train, learner_ranks=p.learner_ranks,
                lora_rank=cfg.lora.lora_rank, loss_type=cfg.grpo.loss_type)
    _check_engine(cfg)
    lg = cfg.log
    for wanted, package, name in ((lg.use_tensorboard, "tensorboard", "--use-tensorboard"),
                                  (lg.use_wandb, "wandb", "--use-wandb"),
                                  (cfg.run.progress == "rich", "rich", "--progress"),
                                  (cfg.lora.enabled, "peft", "--lora-rank")):
        if wanted and importlib.util.find_spec(package) is None:
            raise ConfigError(name, f"needs the {package} package, which is not installed (pip install {package})")
    if lg.metrics_sink and ":" not in lg.metrics_sink:
        raise ConfigError("--metrics-sink", f"must be module:function, got {lg.metrics_sink!r}")


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


def _check_perf(p: PerfConfig, *, backend: str) -> None:
    if p.use_dynamic_batch_size and p.max_tokens_per_gpu is None:
        raise ConfigError("--max-tokens-per-gpu", "--use-dynamic-batch-size needs a token budget per micro-batch")
    if p.max_tokens_per_gpu is not None and not p.use_dynamic_batch_size:
        raise ConfigError("--max-tokens-per-gpu", "takes effect only with --use-dynamic-batch-size (as in Miles)")
    if p.recompute_granularity == "selective" and backend == "fsdp":
        raise ConfigError("--recompute-granularity", "selective (attention only) needs --train-backend megatron; "
                          "the fsdp learner recomputes whole decoder layers: use full")


def _check_placement(cfg: Config) -> None:
    p, engines = cfg.placement, cfg.rollout.rollout_num_engines
    learner_gpus = p.learner_gpus
    if p.actor_num_nodes != 1 and (cfg.run.backend != "ray" or not learner_gpus):
        raise ConfigError("--actor-num-nodes", f"a learner on more than one node needs --backend ray and GPUs "
                          f"(--actor-num-gpus-per-node), got {p.actor_num_nodes} nodes")
    if p.actor_num_cpu_ranks > 1 and learner_gpus:
        raise ConfigError("--actor-num-cpu-ranks", "is for a CPU learner; on GPUs the learner has one rank per GPU "
                          "(--actor-num-gpus-per-node)")
    if p.colocate and p.learner_ranks > 1:
        raise ConfigError("--colocate", f"colocated engines share one learner GPU for now; got {p.learner_ranks} "
                          "learner ranks")
    per_engine = p.rollout_num_gpus_per_engine
    if p.rollout_num_gpus % per_engine:
        raise ConfigError("--rollout-num-gpus", f"{p.rollout_num_gpus} is not a multiple of "
                          f"--rollout-num-gpus-per-engine {per_engine}")
    if p.rollout_num_gpus and p.rollout_num_gpus // per_engine != engines:
        raise ConfigError("--rollout-num-gpus", f"{p.rollout_num_gpus} GPUs at {per_engine} per engine make "
                          f"{p.rollout_num_gpus // per_engine} engines, but --rollout-num-engines is {engines}")
    if p.colocate and p.rollout_num_gpus not in (0, learner_gpus):
        raise ConfigError("--colocate", f"colocated engines use the learner's {learner_gpus} GPU(s); "
                          f"--rollout-num-gpus must be 0 or {learner_gpus}, got {p.rollout_num_gpus}")
    if p.weight_transport == "nccl" and not (learner_gpus and (p.rollout_num_gpus or p.colocate)):
        raise ConfigError("--weight-transport", "nccl needs the learner and the engines on GPUs "
                          "(--actor-num-gpus-per-node 1 --rollout-num-gpus N)")
    if p.weight_transport == "ipc" and not (learner_gpus and p.colocate):
        raise ConfigError("--weight-transport", "ipc needs the engines on the learner's GPU "
                          "(--colocate --actor-num-gpus-per-node 1)")


def to_toml_dict(cfg: Config) -> dict[str, Any]:
    """The resolved config as plain tables (None values left out: TOML has no null)."""
    raw = msgspec.to_builtins(cfg)
    return {s: {k: v for k, v in t.items() if v is not None} for s, t in raw.items()}
