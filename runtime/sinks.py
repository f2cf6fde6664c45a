"""Metrics sinks besides ``metrics.jsonl``: TensorBoard, Weights & Biases, or a user's own.

A sink is any object with ``write(step: int, metrics: dict[str, float])`` and ``close()``;
``MetricsLog`` hands each one every learner step's numeric values. A user sink comes from an
explicit ``--metrics-sink module:function`` path: the function is called as
``function(run_dir=Path, config=dict)`` (the resolved config as plain tables) and returns the sink.
The optional packages are imported only when their flag is set; ``config.check`` has already
turned a missing one into a one-line error at start.

A sink is a plug-in and may misbehave, so each runs on a thread of its own (``SinkThread``) behind
a bounded queue: one whose ``write`` blocks only skips lines (counted, warned once), never the
event loop that trains; one that raises is disabled with a warning; its ``close`` is bounded.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

from runtime.config import ConfigError, LogConfig
from runtime.plugins import load_function


class Sink(Protocol):
    def write(self, step: int, metrics: dict[str, float]) -> None: ...
    def close(self) -> None: ...


class TensorBoardSink:
    """Event files under ``<run-dir>/tensorboard`` (``tensorboard --logdir <run-dir>``)."""

    def __init__(self, log_dir: Path):
        from torch.utils.tensorboard import SummaryWriter  # needs the tensorboard package

        self.writer = SummaryWriter(log_dir=str(log_dir), flush_secs=10)

    def write(self, step: int, metrics: dict[str, float]) -> None:
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, step)

    def close(self) -> None:
        self.writer.close()


class WandbSink:
    """One W&B run per run directory; ``--wandb-mode offline`` (or WANDB_MODE) needs no network."""

    def __init__(self, *, run_dir: Path, project: str, group: str, mode: str, config: dict[str, Any]):
        import wandb

        self.run = wandb.init(project=project, group=group or None, name=run_dir.name, dir=str(run_dir),
                              mode=None if mode == "auto" else mode, config=config)

    def write(self, step: int, metrics: dict[str, float]) -> None:
        self.run.log(metrics, step=step)

    def close(self) -> None:
        self.run.finish()


def open_sinks(cfg: LogConfig, *, run_dir: Path, config: dict[str, Any]) -> list[Sink]:
    """The sinks the flags ask for; a bad ``--metrics-sink`` raises ``ConfigError``."""
    sinks: list[Sink] = []
    if cfg.use_tensorboard:
        sinks.append(TensorBoardSink(run_dir / "tensorboard"))
    if cfg.use_wandb:
        sinks.append(WandbSink(run_dir=run_dir, project=cfg.wandb_project, group=cfg.wandb_group,
                               mode=cfg.wandb_mode, config=config))
    if cfg.metrics_sink:
        factory = load_function(cfg.metrics_sink, flag="--metrics-sink")
        try:
            sinks.append(factory(run_dir=run_dir, config=config))
        except Exception as e:  # noqa: BLE001 - the user's factory: one line at start
            raise ConfigError("--metrics-sink", f"{cfg.metrics_sink} raised {type(e).__name__}: {e}") from None
    return sinks
