"""Megatron's process groups for one trainer process, on CPU (gloo) or GPU (NCCL).

A trainer launched alone (no ``WORLD_SIZE`` in its environment) makes a one-rank default group on
a free local port; one launched by torchrun (or any launcher that sets the ``env://`` variables)
joins the job's group, and megatron splits it into TP x PP x CP x DP groups.

CPU workaround, documented here because megatron assumes CUDA: ``model_parallel_cuda_manual_seed``
seeds CUDA RNG streams, so on CPU it is skipped. Nothing on the CPU path draws from those streams:
dropout is off, weights come from the HF checkpoint (``perform_initialization=False``), and
megatron's activation recompute (which saves CUDA RNG states) is refused on CPU by the trainer.
"""

from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from megatron.core import tensor_parallel

from policies.megatron.model import Parallelism


def init(par: Parallelism, *, device: str, seed: int = 1234, timeout_s: float = 600.0, rank: int = 0,
         world_size: int = 1, dist_url: str | None = None) -> bool:
    """Set up torch.distributed (if nobody has) and megatron's groups. ``rank`` / ``world_size`` /
    ``dist_url``: this rank of a multi-rank host (the hosts' contract, as ``PolicyTrainer``'s);
    else ``env://`` when a launcher set ``WORLD_SIZE``, else one rank on a free local port.
    Returns whether this call created the default group (so ``destroy`` tears it down)."""
    created = False
    if not dist.is_initialized():
        backend = "nccl" if device == "cuda" else "gloo"
        timeout = timedelta(seconds=timeout_s)
        if dist_url is not None:
            dist.init_process_group(backend, init_method=dist_url, rank=rank, world_size=world_size, timeout=timeout)
        elif "WORLD_SIZE" in os.environ:
            dist.init_process_group(backend, timeout=timeout)
        else:
            # one rank: an in-process store, no port to race for
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
        created = True
    if device == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    ps.initialize_model_parallel(
        tensor_model_parallel_size=par.tensor_model_parallel_size,
        pipeline_model_parallel_size=par.pipeline_model_parallel_size,
        context_parallel_size=par.context_parallel_size,
        expert_model_parallel_size=par.expert_model_parallel_size,
    )
    if device == "cuda":
        tensor_parallel.model_parallel_cuda_manual_seed(seed)
    return created


def destroy(created: bool) -> None:
    ps.destroy_model_parallel()
    if created and dist.is_initialized():
        dist.destroy_process_group()


def sum_over_data_parallel(values: dict[str, float]) -> dict[str, float]:
    """Sums of per-rank figures over the data-parallel ranks (float64, one all-reduce)."""
    if ps.get_data_parallel_world_size() == 1:
        return values
    t = torch.tensor(list(values.values()), dtype=torch.float64,
                     device="cuda" if torch.cuda.is_available() and dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(t, group=ps.get_data_parallel_group())
    return dict(zip(values, t.tolist()))
