"""TRAIN: which learner backend trains the policy, and Megatron's parallel layout (Miles's flags).

``--train-backend`` is Miles's flag and its values are Miles's: ``fsdp`` is this runtime's
transformers learner (``policies/trainer.py``; one rank or FSDP2 data parallelism), ``megatron``
the Megatron-core learner (``policies/megatron/``, the ``megatron`` extra). Miles defaults to
megatron; here the default stays the learner that needs no extra package.

The parallel sizes apply to the megatron backend only: the learner's ranks (``--actor-num-nodes``
x ``--actor-num-gpus-per-node``, or one CPU rank) split into TP x PP x CP x DP, so TP x PP x CP
must divide them. ``--recompute-granularity`` is in PERF (both backends read it); the method and
layer count beside it here are Megatron's.
"""

from __future__ import annotations

import importlib.util
from typing import Annotated, Literal

import msgspec
from msgspec import Meta

from runtime.core.errors import ConfigError

Pos = Annotated[int, Meta(ge=1)]


class TrainConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """TRAIN: the learner backend (Miles's --train-backend) and Megatron's parallelism."""

    train_backend: Literal["fsdp", "megatron"] = "fsdp"  # megatron: Megatron-core (pip install '.[megatron]')
    tensor_model_parallel_size: Pos = 1  # megatron: TP
    pipeline_model_parallel_size: Pos = 1  # megatron: PP (GPU only)
    context_parallel_size: Pos = 1  # megatron: CP (needs transformer-engine)
    expert_model_parallel_size: Pos = 1  # megatron: EP (MoE models only)
    sequence_parallel: bool = False  # megatron: with TP > 1 (needs transformer-engine)
    recompute_method: Literal["uniform", "block"] | None = None  # megatron, with --recompute-granularity full
    recompute_num_layers: Pos | None = None  # megatron: layers per recompute chunk (uniform) or recomputed (block)

    @property
    def parallel_sizes(self) -> dict[str, int]:
        return {"--tensor-model-parallel-size": self.tensor_model_parallel_size,
                "--pipeline-model-parallel-size": self.pipeline_model_parallel_size,
                "--context-parallel-size": self.context_parallel_size,
                "--expert-model-parallel-size": self.expert_model_parallel_size}


def check_train(t: TrainConfig, *, learner_ranks: int, lora_rank: int = 0, loss_type: str = "policy_loss") -> None:
    """Rules a user can break from the command line, each naming the flag to change."""
    if t.train_backend != "megatron":
        for flag, size in t.parallel_sizes.items():
            if size > 1:
                raise ConfigError(flag, "needs --train-backend megatron")
        for flag, on in (("--sequence-parallel", t.sequence_parallel), ("--recompute-method", t.recompute_method),
                         ("--recompute-num-layers", t.recompute_num_layers)):
            if on:
                raise ConfigError(flag, "needs --train-backend megatron")
        return
    if lora_rank:
        raise ConfigError("--lora-rank", "LoRA trains on --train-backend fsdp; the megatron backend trains every "
                          "weight")
    if loss_type != "policy_loss":
        raise ConfigError("--loss-type", f"{loss_type} trains on --train-backend fsdp; the megatron backend "
                          "implements the RL policy loss")
    if importlib.util.find_spec("megatron") is None or importlib.util.find_spec("megatron.core") is None:
        raise ConfigError("--train-backend", "megatron needs megatron-core, which is not installed "
                          "(pip install -e '.[megatron]')")
    model_parallel = t.tensor_model_parallel_size * t.pipeline_model_parallel_size * t.context_parallel_size
    if learner_ranks % model_parallel:
        raise ConfigError("--tensor-model-parallel-size", f"TP x PP x CP = {model_parallel} must divide the "
                          f"learner's {learner_ranks} rank(s) (--actor-num-gpus-per-node)")
    if t.sequence_parallel and t.tensor_model_parallel_size == 1:
        raise ConfigError("--sequence-parallel", "needs --tensor-model-parallel-size > 1")


def megatron_parallelism(t: TrainConfig, recompute_granularity: str | None) -> dict:
    """The keyword arguments of ``policies.megatron.model.Parallelism`` (plain values: they cross a
    process boundary before megatron-core is imported)."""
    return {"tensor_model_parallel_size": t.tensor_model_parallel_size,
            "pipeline_model_parallel_size": t.pipeline_model_parallel_size,
            "context_parallel_size": t.context_parallel_size,
            "expert_model_parallel_size": t.expert_model_parallel_size,
            "sequence_parallel": t.sequence_parallel, "recompute_granularity": recompute_granularity,
            "recompute_method": t.recompute_method, "recompute_num_layers": t.recompute_num_layers}


def trainer_kwargs(t: TrainConfig, recompute_granularity: str | None = None) -> dict:
    """What a trainer host passes on for the backend (nothing for the default one)."""
    if t.train_backend == "fsdp":
        return {}
    return {"train_backend": t.train_backend, "megatron": megatron_parallelism(t, recompute_granularity)}
