"""Start, probe and stop one real SGLang server (`python -m sglang.launch_server`) as a child process.

SGLangProcess has EngineProcess's interface (start, wait_ready, url, pid, alive, returncode,
exited_within, kill, stop, log_tail), so the engine set drives either one the same way, over the
same HTTP client. What differs from the embedded engine:

- **Port.** SGLang writes no port file, so the port is chosen here: a free one on the bind host
  (127.0.0.1 unless told otherwise), passed as `--port`. Another process can take it between the
  check and SGLang's bind; an exit whose log says the address is in use is retried on a new port
  (``port_attempts`` in all), within the same start timeout.
- **Command.** `policies.engine.sglang_launch.sglang_command`: the model path, host, port,
  tensor-parallel size (the number of GPUs the server sees), device, dtype, request capacity and
  initial `--weight-version`, then every `--sglang-X` passthrough flag as `--X`.
- **Readiness.** A 200 from `/health_generate` (SGLang answers 503 until its warm-up is done).
- **Process group.** SGLang forks schedulers and a detokenizer. The server leads a process group of
  its own, and kill (and stop, after SIGTERM to the server and its grace) SIGKILLs the whole group,
  so no child keeps a GPU or a port after a restart. The server also gets PR_SET_PDEATHSIG (SGLang's
  children watch their parent in turn).

`engine_process` and `with_engine` pick the process class for `--engine embedded|sglang`; the
latter wraps a backend's process factory (LocalHosts.engine, RayHosts.engine) so that its hosts
start the chosen engine with their own placement (GPUs, device) unchanged.
"""

from __future__ import annotations

import asyncio
import inspect
import os
import re
import signal
import socket
import subprocess
import sys
from collections.abc import Callable
from typing import Any

from policies.engine.client import EngineClient
from policies.engine.process import EngineProcess, EngineStartError, die_with_parent_preexec
from policies.engine.sglang_launch import sglang_command

ENGINES = ("embedded", "sglang")
PORT_ATTEMPTS = 3
# asyncio's and uvicorn's message when the port is taken: "[Errno 98] error while attempting to
# bind on address ('127.0.0.1', 30000): address already in use"
BIND_FAILURE = re.compile(r"address already in use|errno 98\b", re.IGNORECASE)
PROBE_LIMIT_S = 25.0  # SGLang's /health_generate waits up to 20 s for one token when busy
EXIT_CHECK_S = 0.1  # how often a probe in flight checks that the server is still running
POLL_S = (0.05, 0.5)  # first and largest pause between probes while the server loads


class SGLangProcess(EngineProcess):
    """One `sglang.launch_server` subprocess. Not thread-safe; owned by one event loop."""

    def __init__(
        self,
        model_path: str | os.PathLike[str],
        *,
        passthrough: dict[str, str | bool] | None = None,
        tp_size: int | None = None,
        port_attempts: int = PORT_ATTEMPTS,
        python: str = sys.executable,
        **kwargs: Any,
    ) -> None:
        """EngineProcess's keywords (``kwargs``: log_path, host, port, device, dtype, ...), plus
        ``passthrough`` (SGLang flags without "--", as ``parse_sglang_passthrough`` returns them)
        and ``tp_size`` (default: the GPUs it sees: ``gpus``, else this process's
        CUDA_VISIBLE_DEVICES on a ``cuda`` device, else 1). ``port`` 0 picks a free one; a fixed
        port is tried once."""
        super().__init__(model_path, **kwargs)
        bound = inspect.signature(EngineProcess.__init__).bind(self, model_path, **kwargs)
        bound.apply_defaults()
        a = bound.arguments
        if port_attempts < 1:
            raise ValueError(f"port_attempts must be >= 1, got {port_attempts}")
        self._fixed_port = a["port"] or None
        self._attempts_left = 1 if a["port"] else port_attempts
        self._launch = dict(model_path=self.model_path, host=self.host,
                            tp_size=tp_size or _visible_gpus(a["gpus"], a["device"]), device=a["device"],
                            dtype=a["dtype"], max_running_requests=a["max_running_requests"],
                            weight_version=a["weight_version"], passthrough=dict(passthrough or {}), python=python)
        sglang_command(port=1, **self._launch)  # refuse a bad flag now, not in a restart much later
        self._log_offset = 0  # where this attempt's output starts in the log
        self._group_killed = False
        self.command: list[str] = []

    # ---- lifecycle ----------------------------------------------------------------------

    def start(self) -> None:
        if self._proc is not None:
            raise RuntimeError("SGLangProcess.start() called twice")
        self._spawn()

    def _spawn(self) -> None:
        self._attempts_left -= 1
        port = self._fixed_port or free_port(self.host)
        self.command = sglang_command(port=port, **self._launch)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:  # the child keeps its own copy of the descriptor
            self._log_offset = log.tell()
            log.write(f"asyncrl: starting {' '.join(self.command)}\n".encode())
            log.flush()
            self._proc = subprocess.Popen(
                self.command,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self._child_env(),
                preexec_fn=die_with_parent_preexec(),
                process_group=0,  # its own group: stop/kill reach SGLang's children too
            )
        self._bound_port, self._group_killed = port, False

    async def wait_ready(self, timeout_s: float = 120.0) -> str:
        """Until `/health_generate` answers 200 (``timeout_s`` in all, port retries included);
        returns the url. Raises EngineStartError with the log tail when the server exits or is
        not ready in time."""
        if self._proc is None:
            raise RuntimeError("wait_ready() before start()")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        pause = POLL_S[0]
        client = EngineClient(self.url, timeout_s=PROBE_LIMIT_S)
        try:
            while True:
                if self._proc.poll() is not None:
                    if not (self._bind_failed() and self._attempts_left > 0):
                        raise self._start_error(f"exited with code {self._proc.returncode} before it was ready")
                    self._kill_group()
                    self._spawn()  # on a new port
                    await client.close()
                    client = EngineClient(self.url, timeout_s=PROBE_LIMIT_S)
                remaining = deadline - loop.time()
                if await self._healthy(client, max(0.1, min(PROBE_LIMIT_S, remaining))):
                    return self.url
                if loop.time() >= deadline:
                    raise self._start_error(f"was not ready after {timeout_s:g}s")
                await asyncio.sleep(pause)  # polling a loading server with a deadline
                pause = min(POLL_S[1], pause * 2)
        finally:
            await client.close()

    async def _healthy(self, client: EngineClient, timeout_s: float) -> bool:
        """One /health_generate probe, given up as soon as the server exits (a probe of a port
        someone else holds may never be answered)."""
        assert self._proc is not None
        probe = asyncio.ensure_future(client.health_generate(timeout_s=timeout_s))
        try:
            while not probe.done() and self._proc.poll() is None:
                await asyncio.wait([probe], timeout=EXIT_CHECK_S)
            return probe.done() and probe.result()
        finally:
            probe.cancel()

    def _bind_failed(self) -> bool:
        try:
            with open(self.log_path, "rb") as f:
                f.seek(self._log_offset)
                return BIND_FAILURE.search(f.read().decode("utf-8", "replace")) is not None
        except OSError:
            return False

    def _start_error(self, what: str) -> EngineStartError:
        return EngineStartError(
            f"sglang server (pid {self.pid}, port {self._bound_port}, model {self.model_path}) {what}; "
            f"last lines of {self.log_path}:\n" + self.log_tail()
        )

    def kill(self) -> None:
        """SIGKILL the server and its children now, and reap it. Idempotent."""
        self._kill_group()
        super().kill()

    async def stop(self, grace_s: float = 5.0) -> None:
        """EngineProcess.stop (SIGTERM to the server, which shuts its children down; SIGKILL after
        ``grace_s``), then SIGKILL to whatever is left of its group. Idempotent."""
        await super().stop(grace_s)
        self._kill_group()

    def _kill_group(self) -> None:
        """SIGKILL the server's process group (children that outlive the server too) and reap the
        server; once per server, so a group id that may be reused later is never signalled."""
        proc = self._proc
        if proc is None or self._group_killed:
            return
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass  # the group is gone already
        proc.wait()
        self._group_killed = True


def free_port(host: str = "127.0.0.1") -> int:
    """A port free on ``host`` now (the OS's pick); someone may take it before the server binds."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _visible_gpus(gpus: str | None, device: str) -> int:
    if gpus:
        return len(gpus.split(","))
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "")
    if device.startswith("cuda") and visible:  # a Ray actor sees the GPUs of its bundle
        return len(visible.split(","))
    return 1


# ---- choosing the engine ------------------------------------------------------------------


def engine_process(model_path: str | os.PathLike[str], *, engine: str = "embedded", **kwargs: Any) -> EngineProcess:
    """The process for ``engine``: EngineProcess (embedded) or SGLangProcess, with ``kwargs``
    (``passthrough`` and ``tp_size`` are SGLang's only)."""
    if engine == "sglang":
        return SGLangProcess(model_path, **kwargs)
    if engine != "embedded":
        raise ValueError(f"engine must be one of {ENGINES}, got {engine!r}")
    kwargs.pop("passthrough", None)
    kwargs.pop("tp_size", None)
    return EngineProcess(model_path, **kwargs)


def with_engine(base: Callable[..., EngineProcess] | None, *, engine: str, host: str = "127.0.0.1",
                passthrough: dict[str, str | bool] | None = None) -> Callable[..., EngineProcess]:
    """An EngineSet ``process_factory`` that starts ``engine`` bound to ``host``: through ``base``
    (a backend's hosts, which add their placement and end in ``engine_process``), or as a
    subprocess of this process."""
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {ENGINES}, got {engine!r}")
    extra: dict[str, Any] = {"engine": engine, "host": host}
    if engine == "sglang":
        extra["passthrough"] = dict(passthrough or {})

    def factory(index: int, model_path: str, **kwargs: Any) -> EngineProcess:
        kwargs.update(extra)
        if base is not None:
            return base(index, model_path, **kwargs)
        kwargs.pop("engine")
        return engine_process(model_path, engine=engine, **kwargs)

    return factory
