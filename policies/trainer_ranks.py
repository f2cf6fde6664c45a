"""N data-parallel ranks of the trainer on this host, each a ``TrainerProcess``: one ``Trainer``.

    learner (compute thread) ──Request──► rank 0 ┐
                             ──Request──► rank 1 ├─ one torch.distributed group (gloo on CPU,
                             ──Request──► ...    ┘  NCCL on GPU; policies/fsdp.py)
                             ◄──Reply── every rank: rank 0's result, or the first failure

Every request goes to every rank: each receives the whole step's batch and trains its share of the
micro-batches, and every rank takes part in gathering the weights that rank 0 sends or writes.
Rank 0 hosts the group's rendezvous on a free local port. ``gpus``: one GPU per rank (each process
sees only its own, so its device is ``cuda``), or None on CPU.

A rank that fails or dies takes the group down: the others may be waiting in a collective for it,
so every rank is killed at once and the call (and every later one) raises, never hangs.
"""

from __future__ import annotations

import shutil
import tempfile
import threading
from multiprocessing.connection import wait
from pathlib import Path
from typing import Any

import msgspec

from policies import trainer_api
from policies.trainer_process import TrainerDied, TrainerProcess


class TrainerRanks(trainer_api.RemoteTrainer):
    where = "a trainer rank"

    def __init__(self, model_path: str | Path, *, world_size: int, gpus: list[str] | None = None,
                 **trainer_kwargs: Any):
        if world_size < 2:
            raise ValueError(f"TrainerRanks is for 2 or more ranks, got {world_size} (use TrainerProcess)")
        if gpus is not None and len(gpus) != world_size:
            raise ValueError(f"{world_size} ranks need {world_size} GPUs, got {gpus}")
        # the ranks meet through a file, not a TCP port picked here: another process could take a
        # free port before rank 0 binds it (EADDRINUSE, seen with parallel test workers)
        self._rendezvous = tempfile.mkdtemp(prefix="asyncrl-ranks-")
        url = f"file://{self._rendezvous}/store"
        self._ranks: list[TrainerProcess] = []
        self._lock = threading.Lock()
        self._dead: str | None = None
        try:
            for r in range(world_size):
                self._ranks.append(TrainerProcess(
                    model_path, gpus=gpus[r] if gpus else None, wait=False, rank=r, world_size=world_size,
                    dist_url=url, **trainer_kwargs))
            # each waits in the rendezvous until all have joined, so a rank that fails to start
            # would hold the others there: the first failure stops them all
            failure = trainer_api.first_failure(self._receive_all())
            if trainer_api.failed(failure):
                error = msgspec.msgpack.decode(failure, type=trainer_api.Reply).error
                raise trainer_api.RemoteFailure(f"the trainer failed to start in {self.where}:\n{error}")
        except BaseException:
            self.close()
            raise

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self._ranks]

    def _exchange(self, raw: bytes, request: trainer_api.Request) -> bytes:
        with self._lock:
            if self._dead is not None:
                raise TrainerDied(f"the trainer ranks were stopped: {self._dead}")
            try:
                for p in self._ranks:
                    p.send(raw)
                replies = self._receive_all()
            except TrainerDied as e:
                self._stop(str(e))
                raise
            reply = trainer_api.first_failure(replies)
            if trainer_api.failed(reply):
                self._stop(f"{type(request).__name__} failed on a rank")
            return reply

    def _receive_all(self) -> list[bytes]:
        """Every rank's reply; as soon as one rank fails or dies, what it said (the others may
        be stuck in a collective waiting for it)."""
        pending = {p.connection: i for i, p in enumerate(self._ranks)}
        replies: list[bytes | None] = [None] * len(self._ranks)
        while pending:
            for conn in wait(list(pending)):
                i = pending.pop(conn)
                replies[i] = self._ranks[i].receive()
                if trainer_api.failed(replies[i]):
                    return [replies[i]]
        return [r for r in replies if r is not None]

    def _stop(self, why: str) -> None:
        self._dead = why
        for p in self._ranks:
            p.close()

    def close(self) -> None:
        for p in self._ranks:
            p.close()
        shutil.rmtree(self._rendezvous, ignore_errors=True)
