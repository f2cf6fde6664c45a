"""The policy trainer in a child process, behind the same ``step`` / ``save_weights`` interface.

Why a process and not a thread: a small model's training step is mostly Python (module calls,
autograd bookkeeping), so a trainer thread holds the GIL and starves the event loop that drives
the engines; generation and training would not overlap. In its own process the step runs on its
own core while this process keeps serving HTTP. (On the Ray backend the learner is its own actor
process for the same reason.)

Calls are synchronous and one at a time (the learner makes them from its compute thread). The
child dies with its parent (PR_SET_PDEATHSIG on Linux) and a child that dies turns into a
``TrainerDied`` error on the next call, never a hang.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import msgspec

from buffers.types import Group
from policies.engine.process import PROJECT_ROOT, die_with_parent_preexec
from policies.trainer import StepStats

PASSTHROUGH = frozenset({"weight_group_endpoint", "init_weight_group", "broadcast_weights", "destroy_weight_group",
                         "ipc_weights"})


class TrainerDied(RuntimeError):
    pass


class TrainerProcess:
    """``python -m policies.trainer_process`` over a socket pair: a plain subprocess rather than
    multiprocessing's spawn, which would re-import the caller's ``__main__`` (a user's script)."""

    def __init__(self, model_path: str | Path, *, threads: int = 1, gpus: str | None = None, **trainer_kwargs: Any):
        """``gpus``: CUDA_VISIBLE_DEVICES for the child (its ``cuda`` device is the first of them)."""
        ours, theirs = socket.socketpair()
        env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
        if gpus is not None:
            env["CUDA_VISIBLE_DEVICES"] = gpus
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(PROJECT_ROOT), env.get("PYTHONPATH")) if p)
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "policies.trainer_process", str(theirs.fileno())],
            pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL, env=env, preexec_fn=die_with_parent_preexec(),
        )
        theirs.close()
        self._conn = Connection(ours.detach())
        self._lock = threading.Lock()
        self._call("init", (str(model_path), dict(trainer_kwargs, threads=threads)))

    def step(self, batch: list[Group], version: int) -> StepStats:
        return msgspec.msgpack.decode(self._call("step", (msgspec.msgpack.encode(batch), version)), type=StepStats)

    def save_weights(self, out_dir: Path) -> Path:
        return Path(self._call("save_weights", str(out_dir)))

    def save_checkpoint(self, out_dir: Path) -> None:
        self._call("save_checkpoint", str(out_dir))

    def load_checkpoint(self, ckpt_dir: str | Path) -> None:
        self._call("load_checkpoint", str(ckpt_dir))

    # the collective weight transport (PolicyTrainer's methods of the same names)
    def weight_group_endpoint(self, host: str = "127.0.0.1") -> tuple[str, int]:
        return tuple(self._call("call", ("weight_group_endpoint", (host,))))

    def init_weight_group(self, *args: Any) -> list[bytes]:
        return self._call("call", ("init_weight_group", args))

    def broadcast_weights(self) -> int:
        return self._call("call", ("broadcast_weights", ()))

    def destroy_weight_group(self) -> None:
        self._call("call", ("destroy_weight_group", ()))

    # the same-GPU transport
    def ipc_weights(self, dtype: str) -> bytes:
        return self._call("call", ("ipc_weights", (dtype,)))

    @property
    def pid(self) -> int:
        return self._proc.pid

    def close(self) -> None:
        if self._proc.poll() is None:
            self._proc.kill()
        self._proc.wait(timeout=10)
        self._conn.close()

    def _call(self, method: str, arg: Any = None) -> Any:
        with self._lock:
            try:
                self._conn.send((method, arg))
                ok, value = self._conn.recv()
            except (EOFError, OSError):
                code = self._proc.poll()
                raise TrainerDied(f"trainer process {self._proc.pid} died (exit code {code})") from None
        if not ok:
            raise RuntimeError(f"trainer {method} failed in the trainer process:\n{value}")
        return value


def _serve(conn: Connection) -> None:
    import traceback

    from policies.trainer import PolicyTrainer

    trainer: PolicyTrainer | None = None
    while True:
        try:
            method, arg = conn.recv()
        except EOFError:
            return
        try:
            if method == "init":
                model_path, kwargs = arg
                trainer = PolicyTrainer(model_path, **kwargs)
                result: Any = True
            elif trainer is None:
                raise RuntimeError("trainer used before init")
            elif method == "step":
                batch, version = arg
                result = msgspec.msgpack.encode(trainer.step(msgspec.msgpack.decode(batch, type=list[Group]), version))
            elif method == "save_weights":
                result = str(trainer.save_weights(Path(arg)))
            elif method == "save_checkpoint":
                result = trainer.save_checkpoint(Path(arg))
            elif method == "load_checkpoint":
                result = trainer.load_checkpoint(Path(arg))
            elif method == "call" and arg[0] in PASSTHROUGH:
                name, args = arg
                result = getattr(trainer, name)(*args)
            else:
                raise ValueError(f"unknown method {method!r}")
            conn.send((True, result))
        except Exception:  # noqa: BLE001 - reported to the caller with the child's traceback
            conn.send((False, traceback.format_exc()))


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    _serve(Connection(int(sys.argv[1])))
