"""Data parallelism over N ranks with FSDP2 (``torch.distributed.fsdp.fully_shard``).

Each rank is one process (a child process on the local backend, a Ray actor on Ray) with its own
``PolicyTrainer``; this module is what the trainer does differently when ``world_size > 1``:

    join      the ranks' default process group: gloo on CPU, NCCL on GPU (one GPU per rank: the
              process sees only its own, so its device is ``cuda``)
    shard     ``fully_shard`` per decoder layer, then the root (embeddings, final norm, output
              head); on GPU bf16 parameters in compute with fp32 gradient reduction over the fp32
              master shards (``MixedPrecisionPolicy``); AdamW built on the shards keeps its
              state sharded. Gradients are reduce-scattered by SUM (divide factor 1): the
              trainer normalises every rank's loss by the whole step's token count, so the sum
              over ranks is the single-rank gradient (policies/trainer.py, module doc)
    trunk     the module to call for hidden states: the FSDP root, so its hooks run (they gather
              the root's parameters and keep them for the output head, which the trainer
              applies in chunks outside any module's forward)
    gather    full tensors one bucket at a time for the weight transports: every rank takes part
              in each all-gather, rank 0 sends; no rank holds more than one bucket of full
              tensors beside its shards
    save/load the optimizer's shards with ``torch.distributed.checkpoint`` (one file per rank
              plus metadata, resharded on load by DCP); the policy itself is saved as an HF
              directory from full tensors gathered to rank 0's CPU

Not run here (no multi-GPU machine was lent): the NCCL path. CI runs the same code on gloo.
"""

from __future__ import annotations

import datetime
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

from policies import weight_sync


def join(*, rank: int, world_size: int, url: str, device: torch.device, timeout_s: float = 1800.0) -> None:
    """Join the ranks' default group at ``url`` (``tcp://host:port``, hosted by rank 0)."""
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, init_method=url, rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=timeout_s),
                            device_id=torch.device("cuda", device.index or 0) if device.type == "cuda" else None)


class _Trunk(nn.Module):
    """The FSDP root: the causal LM, called for its final hidden states (the output head is
    applied by the trainer, in chunks)."""

    def __init__(self, lm: nn.Module):
        super().__init__()
        self.lm = lm

    def forward(self, **kwargs: object) -> object:
        return self.lm.base_model(**kwargs)


def shard(model: nn.Module, device: torch.device) -> nn.Module:
    """Shard ``model`` (a transformers causal LM, on ``device``) over the default group, in place;
    returns it. ``trunk(model)`` is then its root."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) \
        if device.type == "cuda" else MixedPrecisionPolicy()
    for layer in model.base_model.layers:
        fully_shard(layer, mp_policy=mp)
    root = fully_shard(_Trunk(model), mp_policy=mp)
    for module in (*model.base_model.layers, root):
        module.set_gradient_divide_factor(1.0)  # sums (module doc)
        module.set_force_sum_reduction_for_comms(True)  # plain SUM: gloo has no pre-multiplied sum
    model.__dict__["_fsdp_root"] = root  # not a submodule: the LM's names and state dict stay its own
    return model


def trunk(model: nn.Module) -> nn.Module:
    """What to call for ``model``'s final hidden states: its FSDP root when sharded."""
    return model.__dict__.get("_fsdp_root") or model.base_model


def is_sharded(model: nn.Module) -> bool:
    return "_fsdp_root" in model.__dict__


def all_reduce_sum(t: torch.Tensor) -> None:
    dist.all_reduce(t, op=dist.ReduceOp.SUM)


def local(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's full value (a collective); a plain tensor as it is."""
    return t.full_tensor() if isinstance(t, DTensor) else t


def full_tensors(named: list[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
    """Each tensor in full, one at a time (every rank must iterate the same list: each is an
    all-gather); the caller drops each before the next to hold one at a time."""
    for name, t in named:
        yield name, local(t.detach())


def full_cpu(named: list[tuple[str, torch.Tensor]], *, keep: bool) -> dict[str, torch.Tensor]:
    """``named`` in full on the CPU (``keep``; else gathered with the other ranks and dropped)."""
    out = {}
    for name, t in full_tensors(named):
        if keep:
            out[name] = t.contiguous().cpu()
    return out


class GatheringSender:
    """``weight_sync.Sender``'s role for sharded weights: one send = for each bucket, gather its
    tensors in full on every rank, and on rank 0 cast-copy them into the one send buffer and
    broadcast it. ``pg``: the weight-update group on rank 0, None on the other ranks (they only
    take part in the gathers)."""

    def __init__(self, pg: dist.ProcessGroup | None, tensors: list[tuple[str, torch.Tensor]], *,
                 dtype: torch.dtype, bucket_bytes: int):
        self.pg, self.dtype = pg, dtype
        self.plan = weight_sync.plan_buckets(tensors, dtype=dtype, bucket_bytes=bucket_bytes)
        by_name = dict(tensors)
        self._buckets = [[(n, by_name[n]) for n in meta.names] for meta in self.plan]
        size = max((m.nbytes for m in self.plan), default=0)
        device = tensors[0][1].device if tensors else torch.device("cpu")
        self._buffer = torch.empty(size, dtype=torch.uint8, device=device) if pg is not None else None

    @torch.no_grad()
    def send(self) -> None:
        for meta, named in zip(self.plan, self._buckets):
            full = [t for _, t in full_tensors(named)]
            if self._buffer is not None and self.pg is not None:
                flat = self._buffer[: meta.nbytes]
                views = [t for _, t in weight_sync.unflatten(flat, meta)]
                torch._foreach_copy_(views, full)
                weight_sync.broadcast(flat, self.pg)
            del full

    def close(self) -> None:
        if self.pg is not None:
            weight_sync.destroy_group(self.pg)


def save_optimizer(model: nn.Module, optimizer: torch.optim.Optimizer, out_dir: Path) -> None:
    """Every rank writes its shards of the optimizer state under ``out_dir`` (DCP's layout)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    dcp.save({"optimizer": get_optimizer_state_dict(model, optimizer)}, checkpoint_id=str(out_dir))


def load_optimizer(model: nn.Module, optimizer: torch.optim.Optimizer, ckpt_dir: Path) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    state = {"optimizer": get_optimizer_state_dict(model, optimizer)}
    dcp.load(state, checkpoint_id=str(ckpt_dir))
    set_optimizer_state_dict(model, optimizer, state["optimizer"])


def save_pretrained(model: nn.Module, out_dir: Path, *, rank: int) -> None:
    """The policy as an HF directory (transformers loads it), from full tensors gathered to rank
    0's CPU (a collective: every rank calls it; only rank 0 holds the full state and writes)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank == 0:
        model.save_pretrained(out_dir, state_dict=state)
