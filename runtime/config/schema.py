"""The whole run's configuration: one field per section, and the flag name derived from a field."""

from __future__ import annotations

import msgspec

from runtime.config.asynchrony import AsyncConfig, FaultConfig
from runtime.config.compute import EngineConfig, PerfConfig, PlacementConfig
from runtime.config.fields import Section
from runtime.config.objective import GrpoConfig, LoraConfig, OptimizerConfig
from runtime.config.rollout import EvalConfig, RolloutConfig
from runtime.config.run import CkptConfig, LogConfig, ModelConfig, RunConfig
from runtime.train_config import TrainConfig


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
