"""Start, probe and stop one embedded engine server as a child process.

Lifecycle: EngineProcess(...) → start() (spawn; with port 0 the server picks a free port and
writes it to `port_file`, next to the log) → await wait_ready() (port file, then a 200 from
/health_generate) → use `url` → await stop() (SIGTERM, then SIGKILL after grace_s) or kill().
stop and kill are idempotent and reap the child, so no zombie or orphan is left.

No orphans: on Linux the child gets PR_SET_PDEATHSIG=SIGKILL, so it dies when the parent dies,
however the parent dies. The kernel ties this to the *thread* that forked, so call start() from
a long-lived thread (the event loop's), not from a short-lived worker thread.
"""

from __future__ import annotations

import asyncio
import ctypes
import os
import signal
import subprocess
import sys
from pathlib import Path

from policies.engine.client import EngineClient

PR_SET_PDEATHSIG = 1
PROJECT_ROOT = Path(__file__).resolve().parents[2]  # so the child can import `policies`
LOG_TAIL_LINES = 30


class EngineStartError(RuntimeError):
    """The engine exited or did not become ready in time; the message ends with its log tail."""


class EngineProcess:
    """One engine server subprocess. Not thread-safe; owned by one event loop."""

    def __init__(
        self,
        model_path: str | os.PathLike[str],
        *,
        log_path: str | os.PathLike[str],
        host: str = "127.0.0.1",
        port: int = 0,
        torch_threads: int = 1,
        device: str = "cpu",
        dtype: str = "float32",
        max_running_requests: int = 256,
        weight_version: str = "0",
        gpus: str | None = None,
    ) -> None:
        """``gpus``: CUDA_VISIBLE_DEVICES for the server (its ``cuda`` device is the first of them)."""
        if torch_threads < 1:
            raise ValueError(f"torch_threads must be >= 1, got {torch_threads}")
        self.model_path = str(model_path)
        self.log_path = Path(log_path)
        self.host = host
        self._torch_threads = torch_threads
        self._gpus = gpus
        self._options = {
            "--host": host,
            "--port": port,
            "--device": device,
            "--dtype": dtype,
            "--torch-threads": torch_threads,
            "--max-running-requests": max_running_requests,
            "--weight-version": weight_version,
        }
        self._proc: subprocess.Popen[bytes] | None = None
        self._bound_port: int | None = None

    # ---- properties ---------------------------------------------------------------------

    @property
    def pid(self) -> int | None:
        return None if self._proc is None else self._proc.pid

    @property
    def alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def returncode(self) -> int | None:
        """The exit status once the process has ended (negative: killed by that signal)."""
        return None if self._proc is None else self._proc.poll()

    @property
    def url(self) -> str:
        """Base URL; known once wait_ready has returned."""
        if self._bound_port is None:
            raise RuntimeError("engine url is unknown until wait_ready() returns")
        return f"http://{self.host}:{self._bound_port}"

    @property
    def port_file(self) -> Path:
        """Where the server writes its bound port: next to the log, so the caller's directory
        holds every file of this engine and nothing leaks into /tmp if this process is killed."""
        return self.log_path.with_name(self.log_path.name + ".port")

    # ---- lifecycle ----------------------------------------------------------------------

    def start(self) -> None:
        if self._proc is not None:
            raise RuntimeError("EngineProcess.start() called twice")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self.port_file.unlink(missing_ok=True)  # a stale file would point at a dead server
        options = {"--model-path": self.model_path, **self._options, "--port-file": self.port_file}
        cmd = [sys.executable, "-m", "policies.engine.server"]
        cmd += [part for flag, value in options.items() for part in (flag, str(value))]
        with open(self.log_path, "ab") as log:  # the child keeps its own copy of the descriptor
            self._proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self._child_env(),
                preexec_fn=die_with_parent_preexec(),
            )

    def _child_env(self) -> dict[str, str]:
        env = dict(os.environ)
        threads = str(self._torch_threads)
        env.update(OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads, PYTHONUNBUFFERED="1")
        if self._gpus is not None:
            env["CUDA_VISIBLE_DEVICES"] = self._gpus
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(PROJECT_ROOT), env.get("PYTHONPATH")) if p)
        return env

    async def wait_ready(self, timeout_s: float = 120.0) -> str:
        """Wait for the port file, then for /health_generate to answer 200; returns the url."""
        if self._proc is None:
            raise RuntimeError("wait_ready() before start()")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        client: EngineClient | None = None
        try:
            while True:
                if self._proc.poll() is not None:
                    raise self._start_error(f"exited with code {self._proc.returncode} before it was ready")
                if client is None and (port := self._read_port()) is not None:
                    self._bound_port = port
                    client = EngineClient(f"http://{self.host}:{port}", timeout_s=5.0)
                remaining = deadline - loop.time()
                if client is not None and await client.health_generate(
                    timeout_s=max(0.1, min(5.0, remaining))
                ):
                    return self.url
                if loop.time() >= deadline:
                    raise self._start_error(f"was not ready after {timeout_s:g}s")
                await asyncio.sleep(0.05)  # polling a child process with a deadline
        finally:
            if client is not None:
                await client.close()

    def _read_port(self) -> int | None:
        try:
            return int(self.port_file.read_text())
        except (FileNotFoundError, ValueError):
            return None

    def _start_error(self, what: str) -> EngineStartError:
        return EngineStartError(
            f"engine (pid {self.pid}, model {self.model_path}) {what}; last lines of {self.log_path}:\n"
            + self.log_tail()
        )

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        try:
            with open(self.log_path, "rb") as f:
                f.seek(max(0, f.seek(0, os.SEEK_END) - 16384))
                text = f.read().decode("utf-8", "replace")
        except OSError as exc:
            return f"(log unreadable: {exc})"
        return "\n".join(text.splitlines()[-lines:])

    async def exited_within(self, timeout_s: float) -> bool:
        """Whether the process has ended or ends within ``timeout_s`` (waited on a thread)."""
        if self._proc is None:
            return False
        try:
            await asyncio.to_thread(self._proc.wait, timeout_s)
        except subprocess.TimeoutExpired:
            return False
        return True

    def kill(self) -> None:
        """SIGKILL and reap now. Idempotent."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait()
        self._cleanup()

    async def stop(self, grace_s: float = 5.0) -> None:
        """SIGTERM (the server aborts its requests and exits), SIGKILL after grace_s. Idempotent."""
        proc = self._proc
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.to_thread(proc.wait, grace_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                await asyncio.to_thread(proc.wait)
        self._cleanup()

    def _cleanup(self) -> None:
        self.port_file.unlink(missing_ok=True)


def die_with_parent_preexec():  # noqa: ANN202
    """A preexec_fn that makes the child get SIGKILL when this (forking) thread dies; Linux only."""
    if not sys.platform.startswith("linux"):
        return None
    libc = ctypes.CDLL("libc.so.6", use_errno=True)  # resolved before fork: the child only calls
    parent = os.getpid()

    def preexec() -> None:
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != parent:  # the parent died before prctl took effect
            os._exit(1)

    return preexec
