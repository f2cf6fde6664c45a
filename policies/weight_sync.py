"""Weights over a collective: the bucket plan, flat buckets, and the weight-update process group.

    learner (rank 0) ──broadcast(flat bucket k)──► engine ranks 1..N      NCCL on GPUs, gloo on CPUs
           ▲                                          ▲
           └──────── driver: for each bucket k, at once on every engine:
                     POST /update_weights_from_distributed {names, dtypes, shapes of bucket k,
                          load_format "flattened_bucket", weight_version on the last bucket}

This is SGLang's ``init_weights_update_group`` / ``update_weights_from_distributed`` contract; the
embedded engine implements the receiving side with these same functions. A bucket is the bytes of
its tensors, concatenated as uint8 in plan order (SGLang's "flattened_bucket" format), so one
collective moves many small tensors. Buckets are bounded by ``bucket_bytes``: the receiver holds
one bucket beside the live weights, never a second copy of the model.

Every tensor of a plan is sent in one dtype (the engines' serving dtype): the learner's fp32 master
weights are cast on its side, halving the bytes on the wire for bf16 engines, and a one-dtype
bucket keeps every tensor's offset aligned, which SGLang's receiver requires.

The group is built the way SGLang's ``init_custom_process_group`` builds it (a TCP rendezvous at
``master_address:master_port`` hosted by rank 0, a store prefixed with the group name, torch's
process-group helper), so the learner can feed real SGLang servers and our engine alike. It is not
torch.distributed's default group: a learner with its own ranks (Megatron) keeps them untouched.
"""

from __future__ import annotations

import datetime
import socket
from collections.abc import Iterable

import msgspec
import torch

DEFAULT_BUCKET_BYTES = 512 << 20


class BucketMeta(msgspec.Struct, frozen=True):
    """One bucket's tensors, as /update_weights_from_distributed names them."""

    names: list[str]
    dtypes: list[str]  # torch dtype names without the "torch." prefix, e.g. "bfloat16"
    shapes: list[list[int]]

    @property
    def nbytes(self) -> int:
        return sum(_numel(s) * dtype_of(d).itemsize for d, s in zip(self.dtypes, self.shapes))


def dtype_of(name: str) -> torch.dtype:
    dtype = getattr(torch, name.removeprefix("torch."), None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype {name!r}")
    return dtype


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def plan_buckets(named: Iterable[tuple[str, torch.Tensor]], *, dtype: torch.dtype,
                 bucket_bytes: int = DEFAULT_BUCKET_BYTES) -> list[BucketMeta]:
    """Split ``named`` tensors, in order, into buckets of at most ``bucket_bytes`` when sent as
    ``dtype`` (a tensor larger than a bucket gets a bucket of its own)."""
    if bucket_bytes <= 0:
        raise ValueError(f"bucket_bytes must be positive, got {bucket_bytes}")
    buckets: list[BucketMeta] = []
    names: list[str] = []
    shapes: list[list[int]] = []
    size = 0
    for name, tensor in named:
        nbytes = tensor.numel() * dtype.itemsize
        if names and size + nbytes > bucket_bytes:
            buckets.append(BucketMeta(names, [dtype_name(dtype)] * len(names), shapes))
            names, shapes, size = [], [], 0
        names.append(name)
        shapes.append(list(tensor.shape))
        size += nbytes
    if names:
        buckets.append(BucketMeta(names, [dtype_name(dtype)] * len(names), shapes))
    return buckets


def flatten(tensors: list[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    """One uint8 tensor holding ``tensors`` cast to ``dtype``, back to back (on their device)."""
    return torch.cat([t.detach().to(dtype).contiguous().reshape(-1).view(torch.uint8) for t in tensors])


def empty_bucket(meta: BucketMeta, device: torch.device | str) -> torch.Tensor:
    return torch.empty(meta.nbytes, dtype=torch.uint8, device=device)


def unflatten(flat: torch.Tensor, meta: BucketMeta) -> list[tuple[str, torch.Tensor]]:
    """Views of ``flat`` as the bucket's named tensors (no copy)."""
    if flat.numel() != meta.nbytes:
        raise ValueError(f"bucket holds {flat.numel()} bytes, its plan says {meta.nbytes}")
    out, offset = [], 0
    for name, dtype_s, shape in zip(meta.names, meta.dtypes, meta.shapes, strict=True):
        dtype = dtype_of(dtype_s)
        if offset % dtype.itemsize:
            raise ValueError(f"tensor {name} starts at byte {offset}, not aligned for {dtype_s}")
        end = offset + _numel(shape) * dtype.itemsize
        out.append((name, flat[offset:end].view(dtype).view(shape)))
        offset = end
    return out


def free_port(host: str = "127.0.0.1") -> int:
    """A port free now on ``host``, for rendezvous that another process binds a moment later (a
    race: something else may bind it first; the weight-update group avoids it with HostedStore)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class HostedStore:
    """Rank 0's side of the weight-update group's rendezvous, bound before anyone is told its port.

    Why: picking a free port and binding it later (what SGLang's callers do) lets another process
    take the port in between, and the group then fails with EADDRINUSE. Here the OS picks the port
    while the store binds it, and the engines are given the port of a store already listening.
    `endpoint` binds a new store (dropping an unused one); `take` hands it to `new_group` once."""

    def __init__(self) -> None:
        self._store: torch.distributed.TCPStore | None = None

    def endpoint(self, host: str) -> tuple[str, int]:
        self._store = torch.distributed.TCPStore(host, 0, is_master=True, wait_for_workers=False)
        return host, self._store.port

    def take(self, port: int) -> torch.distributed.TCPStore | None:
        """The store bound at `port` (None when the group was given another port: then it is joined
        as a plain rendezvous)."""
        store, self._store = self._store, None
        return store if store is not None and store.port == port else None


def new_group(*, backend: str, master_address: str, master_port: int, rank: int, world_size: int,
              group_name: str, timeout_s: float,
              store: torch.distributed.Store | None = None) -> torch.distributed.ProcessGroup:
    """Join (rank 0: host) the weight-update group; blocks until every rank has joined, then runs
    one tiny broadcast so NCCL builds its communicator now rather than inside the first sync.
    Rank 0 passes its HostedStore's store, already listening at ``master_port``."""
    from torch.distributed import distributed_c10d as c10d

    if backend not in ("nccl", "gloo"):
        raise ValueError(f"backend must be nccl or gloo, got {backend!r}")
    timeout = datetime.timedelta(seconds=timeout_s)
    if store is None:
        store, rank, world_size = next(c10d.rendezvous(f"tcp://{master_address}:{master_port}", rank, world_size,
                                                       timeout=timeout))
    store.set_timeout(timeout)
    store = c10d.PrefixStore(group_name, store)
    # torch's helper rather than a ProcessGroup constructor: its store keys are what SGLang's
    # init_custom_process_group uses, so either side can be real SGLang
    pg, _ = c10d._new_process_group_helper(world_size, rank, [], c10d.Backend(backend), store,
                                           group_name=group_name, timeout=timeout)
    broadcast(torch.zeros(1, device="cuda" if backend == "nccl" else "cpu"), pg)
    return pg


def destroy_group(pg: torch.distributed.ProcessGroup) -> None:
    """Release the group's communicator (its peers may already be gone)."""
    try:
        pg.shutdown()
    except (RuntimeError, AttributeError):  # gone with its peers, or a backend without shutdown
        pass


def broadcast(flat: torch.Tensor, pg: torch.distributed.ProcessGroup) -> None:
    """Send (rank 0) or receive (others) one flat bucket; returns when it has arrived, in the
    sense that later work on any stream of this device sees it."""
    # the group's own collective: the group is not registered with torch.distributed's world
    # (there may be no default group), so the module-level API would refuse it
    pg.broadcast(flat, 0).wait()
    if flat.is_cuda:
        torch.cuda.current_stream(flat.device).synchronize()


class Sender:
    """Rank 0's side: the plan over live tensors (views of the learner's weights, so each send
    reads the current values), and one send = every bucket, flattened and broadcast in order."""

    def __init__(self, pg: torch.distributed.ProcessGroup, tensors: list[tuple[str, torch.Tensor]], *,
                 dtype: torch.dtype, bucket_bytes: int = DEFAULT_BUCKET_BYTES):
        self.pg, self.dtype = pg, dtype
        self.plan = plan_buckets(tensors, dtype=dtype, bucket_bytes=bucket_bytes)
        by_name = dict(tensors)
        self._buckets = [[by_name[n] for n in meta.names] for meta in self.plan]
        # one send buffer per bucket, kept: each send is a single cast-and-copy pass into it (no
        # allocation, no concatenation), then the collective
        device = tensors[0][1].device if tensors else torch.device("cpu")
        self._flat = [empty_bucket(meta, device) for meta in self.plan]
        self._views = [[t for _, t in unflatten(flat, meta)] for flat, meta in zip(self._flat, self.plan)]

    @torch.no_grad()
    def send(self) -> None:
        for tensors, flat, views in zip(self._buckets, self._flat, self._views):
            torch._foreach_copy_(views, [t.detach() for t in tensors])
            broadcast(flat, self.pg)

    def close(self) -> None:
        destroy_group(self.pg)


def _numel(shape: list[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n
