"""GPU placement on the local backend: the learner and engines as subprocesses on this host's GPUs.

The same flags and layouts as on Ray (``runtime.placement``), numbered on one node:

    disaggregated    learner rank r: GPU r (r < L)     engine i: the next --rollout-num-gpus-per-engine
    colocated        learner and every engine: GPU 0 (time-sliced; one learner rank)

Each process sees only its GPUs (CUDA_VISIBLE_DEVICES), so inside it the first one is ``cuda``.
More than one learner rank (GPUs, or ``--actor-num-cpu-ranks`` on CPU) is a ``TrainerRanks``.
A layout asking for more GPUs than the host has fails at start with one line.
"""

from __future__ import annotations

from typing import Any

from policies.engine.process import EngineProcess
from policies.engine.sglang_process import engine_process
from policies.trainer_api import Trainer
from policies.trainer_process import TrainerProcess
from policies.trainer_ranks import TrainerRanks
from runtime.config import ConfigError, PlacementConfig
from runtime.placement import Layout


def gpus_asked(p: PlacementConfig) -> tuple[int, int]:
    """(the learner's GPUs, the GPUs engines run on: their own, or the learner's when colocated)."""
    learner = p.learner_gpus
    return learner, learner if p.colocate else p.rollout_num_gpus


def local_trainer(model_path: str, *, ranks: int, gpus: list[int] | None = None, wait: bool = True,
                  **kwargs: Any) -> Trainer:
    """The trainer's host on this machine: one process, or ``ranks`` data-parallel processes (rank r
    on ``gpus[r]`` when given, else on CPU). ``wait=False``: one process builds its trainer while
    the caller goes on (its first call waits for it); ranks always start in step."""
    if gpus:
        kwargs["device"] = "cuda"
    if ranks == 1:
        return TrainerProcess(model_path, gpus=",".join(map(str, gpus)) if gpus else None, wait=wait, **kwargs)
    return TrainerRanks(model_path, world_size=ranks, gpus=[str(g) for g in gpus] if gpus else None, **kwargs)


def visible_gpus() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


class LocalHosts:
    """``runtime.launch.Hosts`` for one machine's GPUs (built only when the placement asks for GPUs)."""

    def __init__(self, layout: Layout, p: PlacementConfig, *, have: int | None = None):
        learner = p.learner_gpus
        per_engine = p.rollout_num_gpus_per_engine if p.rollout_num_gpus else 0
        if p.colocate:
            self.learner_gpus = list(range(learner))
            self.engine_gpus = [self.learner_gpus] * len(layout.engines)
        else:
            self.learner_gpus = list(range(learner))
            self.engine_gpus = [list(range(learner + i * per_engine, learner + (i + 1) * per_engine))
                                for i in range(len(layout.engines))]
        needed = 1 + max([*self.learner_gpus, *(g for gs in self.engine_gpus for g in gs)], default=-1)
        have = visible_gpus() if have is None else have
        if needed > have:
            raise ConfigError("--rollout-num-gpus", f"the {layout.name} layout ({layout.describe()}) needs {needed} "
                              f"GPU(s) on this host; it has {have}")

    def engine(self, index: int, model_path: str, **kwargs: Any) -> EngineProcess:
        gpus = self.engine_gpus[index]
        if gpus:
            kwargs.update(device="cuda", gpus=",".join(map(str, gpus)))
        return engine_process(model_path, **kwargs)  # kwargs["engine"]: embedded or sglang

    def trainer(self, model_path: str, **kwargs: Any) -> Trainer:
        return local_trainer(model_path, ranks=max(1, len(self.learner_gpus)), gpus=self.learner_gpus, **kwargs)
