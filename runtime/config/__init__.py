"""Typed run configuration: one small msgspec Struct per concern, grouped like Miles's arguments.

Each component receives only its own section (or a few fields of it), never the whole ``Config``.
Values resolve in this order, later winning: field defaults < recipe < ``--config FILE`` (TOML,
one table per section) < command-line flags. Every flag is the field name with dashes
(``rollout_batch_size`` -> ``--rollout-batch-size``), so a field name is unique across sections.
Invalid values raise ``ConfigError`` naming the flag; ``runtime.cli`` turns that into exit 2.

The modules, one noun each: ``fields`` (the value types and the ``Section`` base), the sections
(``run``, ``rollout``, ``compute``, ``objective``, ``asynchrony``; TRAIN is ``runtime.train_config``),
``schema`` (``Config``, its section table and the flag a field becomes), ``checks`` (the
cross-field rules, one function per section) and ``build`` (plain values to a checked ``Config``
and back). Importers use this package's names.
"""

from runtime.config.asynchrony import AsyncConfig, FaultConfig
from runtime.config.build import build, merge, to_toml_dict
from runtime.config.checks import check
from runtime.config.compute import EngineConfig, PerfConfig, PlacementConfig, engine_defaults
from runtime.config.fields import NonNeg, NonNegF, Pos, PosF, Prob, Section
from runtime.config.objective import GrpoConfig, LoraConfig, OptimizerConfig
from runtime.config.rollout import EvalConfig, RolloutConfig
from runtime.config.run import CkptConfig, LogConfig, ModelConfig, RunConfig
from runtime.config.schema import GROUP_TITLES, SECTIONS, Config, flag
from runtime.core.errors import ConfigError
from runtime.train_config import TrainConfig

__all__ = [
    "GROUP_TITLES", "SECTIONS", "AsyncConfig", "CkptConfig", "Config", "ConfigError", "EngineConfig",
    "EvalConfig", "FaultConfig", "GrpoConfig", "LogConfig", "LoraConfig", "ModelConfig", "NonNeg", "NonNegF",
    "OptimizerConfig", "PerfConfig", "PlacementConfig", "Pos", "PosF", "Prob", "RolloutConfig", "RunConfig",
    "Section", "TrainConfig", "build", "check", "engine_defaults", "flag", "merge", "to_toml_dict",
]
