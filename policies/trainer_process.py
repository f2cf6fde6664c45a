"""The policy trainer in a child process: ``Trainer`` over a socket pair (policies/trainer_api.py).

Why a process and not a thread: a small model's training step is mostly Python (module calls,
autograd bookkeeping), so a trainer thread holds the GIL and starves the event loop that drives
the engines; generation and training would not overlap. In its own process the step runs on its
own core while this process keeps serving HTTP. (On the Ray backend the learner is its own actor
process for the same reason.)

Wire: the constructor's arguments once (pickled: the config sections are the caller's own
objects), then one ``trainer_api.Request`` after another as msgpack bytes, each answered by a
``Reply``. Calls are synchronous and one at a time (the learner makes them from its compute
thread). The child dies with its parent (PR_SET_PDEATHSIG on Linux) and a child that dies turns
into a ``TrainerDied`` error on the next call, never a hang.
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

from policies import trainer_api
from policies.engine.process import PROJECT_ROOT, die_with_parent_preexec


class TrainerDied(RuntimeError):
    pass


class TrainerProcess(trainer_api.RemoteTrainer):
    """``python -m policies.trainer_process`` over a socket pair: a plain subprocess rather than
    multiprocessing's spawn, which would re-import the caller's ``__main__`` (a user's script)."""

    def __init__(self, model_path: str | Path, *, threads: int = 1, gpus: str | None = None,
                 env: dict[str, str] | None = None, wait: bool = True, **trainer_kwargs: Any):
        """``gpus``: CUDA_VISIBLE_DEVICES for the child (its ``cuda`` device is the first of them).
        ``env``: more of the child's environment. ``wait``: return once the trainer is built (else
        call ``started``: the ranks of one group are built together, each waiting for the others)."""
        ours, theirs = socket.socketpair()
        child_env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), **(env or {}))
        if gpus is not None:
            child_env["CUDA_VISIBLE_DEVICES"] = gpus
        child_env["PYTHONPATH"] = os.pathsep.join(p for p in (str(PROJECT_ROOT), child_env.get("PYTHONPATH")) if p)
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "policies.trainer_process", str(theirs.fileno())],
            pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL, env=child_env, preexec_fn=die_with_parent_preexec(),
        )
        theirs.close()
        self._conn = Connection(ours.detach())
        self._lock = threading.Lock()
        self.where = f"the trainer process {self._proc.pid}"
        self._conn.send((str(model_path), dict(trainer_kwargs, threads=threads)))
        self._building = True
        if wait:
            self.started()

    def started(self) -> None:
        """Until the child has built its trainer; its construction error, if it failed. With
        ``wait=False`` the first call waits for it, so the child builds while the caller goes on
        (a run starts its engines meanwhile)."""
        self._building = False
        reply = msgspec.msgpack.decode(self.receive(), type=trainer_api.Reply)
        if reply.error is not None:
            raise trainer_api.RemoteFailure(f"the trainer failed to start in {self.where}:\n{reply.error}")

    def _exchange(self, raw: bytes, request: trainer_api.Request) -> bytes:
        with self._lock:
            if self._building:
                self.started()
            self.send(raw)
            return self.receive()

    def send(self, raw: bytes) -> None:
        try:
            self._conn.send_bytes(raw)
        except OSError:
            raise self._died() from None

    def receive(self) -> bytes:
        try:
            return self._conn.recv_bytes()
        except (EOFError, OSError):
            raise self._died() from None

    @property
    def connection(self) -> Connection:
        return self._conn

    def _died(self) -> TrainerDied:
        try:
            code = self._proc.wait(timeout=5)  # (it closed its end as it died: reap it for the code)
        except subprocess.TimeoutExpired:
            code = None
        return TrainerDied(f"trainer process {self._proc.pid} died (exit code {code})")

    @property
    def pid(self) -> int:
        return self._proc.pid

    def close(self) -> None:
        if self._proc.poll() is None:
            self._proc.kill()
        self._proc.wait(timeout=10)
        self._conn.close()


def _serve(conn: Connection) -> None:
    from policies.train_backend import build_trainer

    model_path, kwargs = conn.recv()
    try:
        trainer = build_trainer(model_path, **kwargs)
    except Exception:  # noqa: BLE001 - reported to the parent with our traceback
        import traceback

        conn.send_bytes(msgspec.msgpack.encode(trainer_api.Reply(error=traceback.format_exc())))
        return
    conn.send_bytes(msgspec.msgpack.encode(trainer_api.Reply()))
    while True:
        try:
            raw = conn.recv_bytes()
        except EOFError:
            return
        conn.send_bytes(trainer_api.serve(trainer, raw))


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    _serve(Connection(int(sys.argv[1])))
