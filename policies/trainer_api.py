"""The one trainer interface: a Protocol every host implements, and its calls as typed messages.

Hosts of a trainer, all interchangeable behind ``Trainer``:

    PolicyTrainer      the trainer itself, in this process: one rank (policies/trainer.py)
    TrainerProcess     one rank in a child process (policies/trainer_process.py)
    TrainerRanks       N ranks of one data-parallel group, each a child process (policies/trainer_ranks.py)
    RayTrainer         one or N ranks, each a Ray actor in the run's placement group (runtime/ray_actors.py)

A remote host is a ``RemoteTrainer``: each method builds a ``Request`` (a tagged msgspec struct
with the call's typed fields), the host moves its msgpack bytes to the serving side, which runs
``serve(trainer, raw)`` and answers a ``Reply`` holding the method's result, encoded as the
request's ``returns`` type. So the wire has no method names and no pickles after the trainer is
built, and a new method is one Request class plus one ``RemoteTrainer`` line.

A multi-rank host sends every request to every rank (each rank takes part in the step's and the
weights' collectives) and answers with rank 0's reply; a failure on any rank fails the call.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

import msgspec

from buffers.types import Group

if TYPE_CHECKING:  # not at run time: a Ray engine host imports this module and needs no torch
    from policies.trainer import StepStats


class Trainer(Protocol):
    """What the learner and the weight transports call; every host implements all of it."""

    def step(self, batch: list[Group], version: int) -> StepStats:
        """One optimizer step on ``batch`` by the policy at ``version``; the policy is then at version + 1."""
        ...

    def save_weights(self, out_dir: Path) -> Path:
        """The current weights as one safetensors file in ``out_dir`` (returned) that engines load in place."""
        ...

    def save_checkpoint(self, out_dir: Path) -> None: ...
    def load_checkpoint(self, ckpt_dir: Path) -> None: ...

    # the collective weight transport (policies/weight_sync.py): rank 0 of the update group
    def weight_group_endpoint(self, host: str = "127.0.0.1") -> tuple[str, int]: ...
    def init_weight_group(self, master_address: str, master_port: int, world_size: int, backend: str,
                          group_name: str, timeout_s: float, dtype: str, bucket_bytes: int) -> list[bytes]: ...
    def broadcast_weights(self) -> int: ...
    def destroy_weight_group(self) -> None: ...

    # the same-GPU transport (policies/weight_ipc.py)
    def ipc_weights(self, dtype: str) -> bytes: ...

    def close(self) -> None: ...


class Request(msgspec.Struct, frozen=True, tag=True):
    """One call; ``run`` makes it on the trainer it is served to, ``returns`` types its result."""

    returns: ClassVar[Any] = None

    @classmethod
    def result_type(cls) -> Any:
        return cls.returns

    def run(self, trainer: Trainer) -> Any:
        raise NotImplementedError


class Step(Request, frozen=True):
    batch: list[Group]
    version: int

    @classmethod
    def result_type(cls) -> Any:
        from policies.trainer import StepStats

        return StepStats

    def run(self, trainer: Trainer) -> StepStats:
        return trainer.step(self.batch, self.version)


class SaveWeights(Request, frozen=True):
    returns: ClassVar[Any] = str
    out_dir: str

    def run(self, trainer: Trainer) -> str:
        return str(trainer.save_weights(Path(self.out_dir)))


class SaveCheckpoint(Request, frozen=True):
    out_dir: str

    def run(self, trainer: Trainer) -> None:
        trainer.save_checkpoint(Path(self.out_dir))


class LoadCheckpoint(Request, frozen=True):
    ckpt_dir: str

    def run(self, trainer: Trainer) -> None:
        trainer.load_checkpoint(Path(self.ckpt_dir))


class WeightGroupEndpoint(Request, frozen=True):
    returns: ClassVar[Any] = tuple[str, int]
    host: str

    def run(self, trainer: Trainer) -> tuple[str, int]:
        return trainer.weight_group_endpoint(self.host)


class InitWeightGroup(Request, frozen=True):
    returns: ClassVar[Any] = list[bytes]
    master_address: str
    master_port: int
    world_size: int
    backend: str
    group_name: str
    timeout_s: float
    dtype: str
    bucket_bytes: int

    def run(self, trainer: Trainer) -> list[bytes]:
        return trainer.init_weight_group(self.master_address, self.master_port, self.world_size, self.backend,
                                         self.group_name, self.timeout_s, self.dtype, self.bucket_bytes)


class BroadcastWeights(Request, frozen=True):
    returns: ClassVar[Any] = int

    def run(self, trainer: Trainer) -> int:
        return trainer.broadcast_weights()


class DestroyWeightGroup(Request, frozen=True):
    def run(self, trainer: Trainer) -> None:
        trainer.destroy_weight_group()


class IpcWeights(Request, frozen=True):
    returns: ClassVar[Any] = bytes
    dtype: str

    def run(self, trainer: Trainer) -> bytes:
        return trainer.ipc_weights(self.dtype)


AnyRequest = (Step | SaveWeights | SaveCheckpoint | LoadCheckpoint | WeightGroupEndpoint | InitWeightGroup
              | BroadcastWeights | DestroyWeightGroup | IpcWeights)


class Reply(msgspec.Struct, frozen=True):
    """The serving side's answer: the result (msgpack of the request's ``returns``) or the error."""

    value: msgspec.Raw = msgspec.Raw(b"\xc0")  # msgpack nil
    error: str | None = None  # the serving side's traceback


def serve(trainer: Trainer, raw: bytes) -> bytes:
    """Run one encoded request on ``trainer``; the encoded ``Reply`` (an error is a reply too)."""
    import traceback

    try:
        request = msgspec.msgpack.decode(raw, type=AnyRequest)
        return msgspec.msgpack.encode(Reply(msgspec.Raw(msgspec.msgpack.encode(request.run(trainer)))))
    except Exception:  # noqa: BLE001 - reported to the caller with the serving side's traceback
        return msgspec.msgpack.encode(Reply(error=traceback.format_exc()))


class RemoteFailure(RuntimeError):
    """A call raised on the serving side (the message carries its traceback)."""


class RemoteTrainer:
    """``Trainer`` for a host that serves it elsewhere: each method is one ``Request``. A host
    implements ``_exchange`` (encoded request in, encoded ``Reply`` out) and ``close``; ``where``
    names the serving side in errors."""

    where = "the trainer"

    def _exchange(self, raw: bytes, request: Request) -> bytes:
        raise NotImplementedError

    def call(self, request: Request) -> Any:
        reply = msgspec.msgpack.decode(self._exchange(msgspec.msgpack.encode(request), request), type=Reply)
        if reply.error is not None:
            raise RemoteFailure(f"trainer {type(request).__name__} failed in {self.where}:\n{reply.error}")
        result_type = request.result_type()
        return None if result_type is None else msgspec.msgpack.decode(reply.value, type=result_type)

    def step(self, batch: list[Group], version: int) -> StepStats:
        return self.call(Step(batch, version))

    def save_weights(self, out_dir: Path) -> Path:
        return Path(self.call(SaveWeights(str(out_dir))))

    def save_checkpoint(self, out_dir: Path) -> None:
        self.call(SaveCheckpoint(str(out_dir)))

    def load_checkpoint(self, ckpt_dir: Path) -> None:
        self.call(LoadCheckpoint(str(ckpt_dir)))

    def weight_group_endpoint(self, host: str = "127.0.0.1") -> tuple[str, int]:
        return self.call(WeightGroupEndpoint(host))

    def init_weight_group(self, master_address: str, master_port: int, world_size: int, backend: str,
                          group_name: str, timeout_s: float, dtype: str, bucket_bytes: int) -> list[bytes]:
        return self.call(InitWeightGroup(master_address, master_port, world_size, backend, group_name, timeout_s,
                                         dtype, bucket_bytes))

    def broadcast_weights(self) -> int:
        return self.call(BroadcastWeights())

    def destroy_weight_group(self) -> None:
        self.call(DestroyWeightGroup())

    def ipc_weights(self, dtype: str) -> bytes:
        return self.call(IpcWeights(dtype))

    def close(self) -> None:
        raise NotImplementedError


def failed(raw: bytes) -> bool:
    return msgspec.msgpack.decode(raw, type=Reply).error is not None


def first_failure(replies: list[bytes]) -> bytes:
    """Of every rank's encoded ``Reply``, the first that is an error, else rank 0's (the ranks'
    results agree: stats are all-reduced, and rank 0 is the one that writes and sends weights)."""
    return next((raw for raw in replies if failed(raw)), replies[0])
