"""PLACEMENT, PERF and ENGINE: where the learner and the engines run, and with what capacity."""

from __future__ import annotations

from typing import Any, Literal

from runtime.config.fields import NonNeg, Pos, Section


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
    ``checks._check_engine``). SGLang: --partial-rollout-mode recompute (its pause mode ``abort``)."""
    if not isinstance(data.get("engine"), dict) or data["engine"].get("engine") != "sglang":
        return data
    out = {section: dict(values) for section, values in data.items()}
    out.setdefault("async", {}).setdefault("partial_rollout_mode", "recompute")
    return out
