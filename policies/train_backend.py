"""The trainer a host builds for ``--train-backend``: the transformers learner or Megatron-core's.

Hosts (``TrainerProcess``, the Ray trainer actor) call ``build_trainer`` with the launch's keyword
arguments; megatron-core is imported only here and only when ``megatron`` is chosen, so a run
without the extra never loads it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def build_trainer(model_path: str | Path, *, train_backend: str = "fsdp", megatron: dict | None = None,
                  **kwargs: Any):
    """``megatron``: ``Parallelism``'s fields (runtime.train_config.megatron_parallelism), for the
    megatron backend; ``kwargs``: ``PolicyTrainer``'s."""
    if train_backend == "megatron":
        from policies.megatron.model import Parallelism
        from policies.megatron.trainer import MegatronTrainer

        kwargs.pop("recompute_activations", None)  # megatron's recompute is in ``megatron``
        if kwargs.pop("lora", None) is not None:
            raise ValueError("LoRA trains on the fsdp backend; the megatron backend trains every weight")
        return MegatronTrainer(model_path, parallelism=Parallelism(**(megatron or {})), **kwargs)
    if train_backend != "fsdp":
        raise ValueError(f"unknown train backend {train_backend!r} (fsdp or megatron)")
    from policies.trainer import PolicyTrainer

    return PolicyTrainer(model_path, **kwargs)
