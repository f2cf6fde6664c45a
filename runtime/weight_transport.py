"""How the learner's weights reach the engines: the choice, and the collective transport's driver.

    shared memory (``shm``)   the trainer writes one safetensors file under /dev/shm; each engine
                              loads it (/update_weights_from_disk). Same host, any device.
    NCCL / gloo (``nccl``,    the trainer broadcasts flat buckets from GPU (NCCL) or CPU (gloo)
    ``gloo``)                 memory as rank 0 of a group the engines joined; the driver tells each
                              engine what bucket comes next (/update_weights_from_distributed).
                              No file, no copy through the driver or Ray's object store.

    CUDA IPC (``ipc``)        colocated on GPUs: each engine maps the trainer's weights (one
                              flat bucket) in place and copies them in (/update_weights_from_tensor;
                              its driver is runtime/ipc_weights.py).

``auto`` picks NCCL when the learner and the engines have GPUs of their own (disaggregated), CUDA
IPC when they share the learner's GPU (colocated), and shared memory otherwise (CPU runs: CUDA IPC
needs CUDA, and a collective would only copy what a file in /dev/shm already shares).

The collective sync holds the learner only until the trainer has sent its weights (they are
flattened into send buffers first, so the next step may change them once the sends are done); the
engines' loads finish while the learner steps on. With ``in_place`` semantics and the model in one
bucket the engines are not paused at all: each swaps the new weights in between two decode steps.

The group is rebuilt whenever its membership changes (an engine restarted): a replacement is refit
alone in a group of two, and the next sync regroups every serving engine.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import logging
import time
from collections.abc import Hashable
from typing import Any, Protocol

import msgspec

from policies.engine.client import EngineClient
from policies.weight_sync import BucketMeta

log = logging.getLogger(__name__)

TRANSPORTS = ("auto", "shm", "nccl", "gloo", "ipc")


def choose(asked: str, *, learner_gpus: int, engine_gpus: int, colocate: bool) -> str:
    """The transport for a run: ``asked``, or for ``auto`` the one its placement calls for."""
    if asked != "auto":
        return asked
    if learner_gpus and engine_gpus:
        return "ipc" if colocate else "nccl"
    return "shm"


class CollectiveTrainer(Protocol):
    """The trainer's side (PolicyTrainer's methods, through its process or actor)."""

    def weight_group_endpoint(self, host: str = ...) -> tuple[str, int]: ...
    def init_weight_group(self, master_address: str, master_port: int, world_size: int, backend: str,
                          group_name: str, timeout_s: float, dtype: str, bucket_bytes: int) -> list[bytes]: ...
    def broadcast_weights(self) -> int: ...
    def destroy_weight_group(self) -> None: ...


class CollectiveWeights:
    """Driver of the collective transport. ``send`` runs with the engines paused (the engine
    set's control lock held); trainer calls run on a thread of their own, so the event loop keeps
    serving the engines' HTTP while the trainer broadcasts."""

    def __init__(self, trainer: CollectiveTrainer, *, backend: str, dtype: str, bucket_bytes: int, timeout_s: float,
                 host: str = "127.0.0.1"):
        if backend not in ("nccl", "gloo"):
            raise ValueError(f"collective backend must be nccl or gloo, got {backend!r}")
        self.trainer, self.backend, self.dtype = trainer, backend, dtype
        self.bucket_bytes, self.timeout_s, self.host = bucket_bytes, timeout_s, host
        self.members: tuple[Hashable, ...] = ()  # the engines in the current group, in rank order
        self.plan: list[BucketMeta] = []
        self.regroups = 0
        # syncs, and their seconds: until the trainer's sends are done (the bytes are on the wire:
        # flatten + broadcast), and until every engine has them loaded (no regroup in either)
        self.sends, self.broadcast_s, self.send_s = 0, 0.0, 0.0
        self._names = (f"asyncrl-weights-{i}" for i in itertools.count())
        self._group = ""
        self._clients: list[EngineClient] = []  # of the current members
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="weight-broadcast")

    async def join(self, targets: list[tuple[Hashable, EngineClient]]) -> None:
        """Make ``targets`` the group (a new one when its membership changed)."""
        if tuple(key for key, _ in targets) != self.members:
            await self._regroup(targets)

    def pauseless(self, pause_mode: str) -> bool:
        """Can a sync skip the pause? With ``in_place`` semantics and the whole model in one
        bucket, an engine swaps it in between two decode steps (see policies/engine/distributed.py);
        with several buckets, tokens between two of them would mix versions: pause."""
        return pause_mode == "in_place" and len(self.plan) == 1

    async def send(self, targets: list[tuple[Hashable, EngineClient]], version: int | None,
                   sent: asyncio.Event | None = None) -> tuple[int, float]:
        """Broadcast the trainer's weights to ``targets``, labelled ``version`` on the engines (None:
        the trainer's own version, set after). ``sent`` is set as soon as the trainer's part is done
        (its weights may change from then on). Returns the version sent and the longest pause-less
        swap any engine reported (0 when they were paused)."""
        await self.join(targets)
        last = len(self.plan) - 1
        await asyncio.gather(*(c.begin_weight_update() for _, c in targets))  # SGLang's session
        start = time.monotonic()

        async def broadcast() -> int:
            v = await self._on_trainer(self.trainer.broadcast_weights)
            self.broadcast_s += time.monotonic() - start
            if sent is not None:
                sent.set()
            return v

        async def receive(client: EngineClient) -> float:
            held = 0.0
            for i, meta in enumerate(self.plan):  # in plan order: the trainer broadcasts in this order
                held += await client.update_weights_from_distributed(
                    names=meta.names, dtypes=meta.dtypes, shapes=meta.shapes, group_name=self._group,
                    weight_version=str(version) if version is not None and i == last else None,
                    timeout_s=self.timeout_s) or 0.0
            await client.end_weight_update()
            return held

        try:
            sent_version, *held = await asyncio.gather(broadcast(), *(receive(c) for _, c in targets))
        except BaseException:
            self.members = ()  # a collective that failed half-way leaves the group unusable
            raise
        self.sends, self.send_s = self.sends + 1, self.send_s + time.monotonic() - start
        if version is None:
            await asyncio.gather(*(c.update_weight_version(str(sent_version)) for _, c in targets))
        elif sent_version != version:
            raise RuntimeError(f"the trainer sent version {sent_version} for version {version}: "
                               "it stepped during a sync")
        return sent_version, max(held, default=0.0)

    async def _regroup(self, targets: list[tuple[Hashable, EngineClient]]) -> None:
        """A new group of the trainer (rank 0) and ``targets`` (ranks 1..n); the old one is dropped."""
        await self._on_trainer(self.trainer.destroy_weight_group)
        # members still serving leave the old group (a dead one took its end with it)
        staying = {key for key, _ in targets}
        await asyncio.gather(*(c.destroy_weights_update_group(self._group)
                               for key, c in zip(self.members, self._clients) if key in staying),
                             return_exceptions=True)
        self.members, self._clients, self._group = (), [], next(self._names)
        address, port = await self._on_trainer(self.trainer.weight_group_endpoint, self.host)
        world = 1 + len(targets)
        plan, *_ = await asyncio.gather(
            self._on_trainer(self.trainer.init_weight_group, address, port, world, self.backend, self._group,
                             self.timeout_s, self.dtype, self.bucket_bytes),
            *(c.init_weights_update_group(master_address=address, master_port=port, rank_offset=1 + i,
                                          world_size=world, group_name=self._group, backend=self.backend,
                                          timeout_s=self.timeout_s) for i, (_, c) in enumerate(targets)))
        self.plan = [msgspec.msgpack.decode(b, type=BucketMeta) for b in plan]
        self.members, self._clients = tuple(key for key, _ in targets), [c for _, c in targets]
        self.regroups += 1
        log.info("weight update group %s: trainer + %d engine(s) over %s, %d bucket(s) of %.0f MB",
                 self._group, len(targets), self.backend, len(self.plan),
                 sum(m.nbytes for m in self.plan) / len(self.plan) / 2**20)

    async def _on_trainer(self, fn: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    def close(self) -> None:
        """The run's end: engines and trainer are stopped with their groups; free the thread."""
        self.members, self._clients = (), []
        self._pool.shutdown(wait=False, cancel_futures=True)

