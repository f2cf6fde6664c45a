"""Driver of the same-GPU transport (``ipc``): colocated engines map the trainer's weights.

    driver                         trainer (same GPU)                 every engine, at once
    begin_weight_update ──────────────────────────────────────────►   (SGLang's session)
    ipc_weights(dtype) ─────────►  cast-copy into its bf16 buffer,
                      ◄─────────   one CUDA IPC handle (+ version)
    sent.set(): the learner steps on (its step leaves that buffer alone)
    update_weights_from_tensor {serialized_named_tensors: [handle], "flattened_bucket",
                                weight_version} ─────────────────────►  map, copy in, synchronize
    end_weight_update ────────────────────────────────────────────►

No group and no wire: the engines read the trainer's memory in place (policies/weight_ipc.py). The
driver asks the trainer for the next handle only after every engine answered the last one (the
engine set's control lock makes syncs one at a time), which is what keeps the trainer's buffer
stable while an engine copies out of it. Same interface and timings as ``CollectiveWeights``
(runtime/weight_transport.py), so the engine set and the run's summary drive and report both.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import time
from collections.abc import Hashable
from typing import Protocol

import msgspec

from policies.engine.client import EngineClient
from policies.weight_ipc import Export
from policies.weight_sync import BucketMeta


class IpcTrainer(Protocol):
    """The trainer's side (PolicyTrainer.ipc_weights, through its process or actor)."""

    def ipc_weights(self, dtype: str) -> bytes: ...


class IpcWeights:
    backend = "ipc"  # what summary.json's weight_sync calls the transport
    regroups = 0  # no group to rebuild

    def __init__(self, trainer: IpcTrainer, *, dtype: str, timeout_s: float):
        self.trainer, self.dtype, self.timeout_s = trainer, dtype, timeout_s
        self.members: tuple[Hashable, ...] = ()
        self.plan: list[BucketMeta] = []  # the one bucket, once sent (its bytes go in the summary)
        # syncs, and their seconds: until the trainer's handle is out (cast-copy + serialize), and
        # until every engine has the weights loaded
        self.sends, self.broadcast_s, self.send_s = 0, 0.0, 0.0
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="weight-ipc")

    async def join(self, targets: list[tuple[Hashable, EngineClient]]) -> None:
        self.members = tuple(key for key, _ in targets)

    def pauseless(self, pause_mode: str) -> bool:
        """One bucket always: with ``in_place`` semantics an engine swaps it in between two decode
        steps (policies/engine/colocated.py), so no pause."""
        return pause_mode == "in_place"

    async def send(self, targets: list[tuple[Hashable, EngineClient]], version: int | None,
                   sent: asyncio.Event | None = None) -> tuple[int, float]:
        """Bring ``targets`` to the trainer's weights, labelled ``version`` (None: the trainer's
        own). ``sent`` is set once the trainer's handle is out. Returns the version loaded and the
        longest pause-less swap any engine reported (0 when they were paused)."""
        await self.join(targets)
        await asyncio.gather(*(c.begin_weight_update() for _, c in targets))
        start = time.monotonic()
        raw = await asyncio.get_running_loop().run_in_executor(self._pool, self.trainer.ipc_weights, self.dtype)
        export = msgspec.msgpack.decode(raw, type=Export)
        self.broadcast_s += time.monotonic() - start
        self.plan = [export.meta]
        if sent is not None:
            sent.set()
        if version is not None and export.version != version:
            raise RuntimeError(f"the trainer sent version {export.version} for version {version}: "
                               "it stepped during a sync")

        async def load(client: EngineClient) -> float:
            held = await client.update_weights_from_tensor(
                [export.serialized], weight_version=str(export.version), timeout_s=self.timeout_s)
            await client.end_weight_update()
            return held or 0.0

        held = await asyncio.gather(*(load(c) for _, c in targets))
        self.sends, self.send_s = self.sends + 1, self.send_s + time.monotonic() - start
        return export.version, max(held, default=0.0)

    def close(self) -> None:
        self.members = ()
        self._pool.shutdown(wait=False, cancel_futures=True)
