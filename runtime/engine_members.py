"""What an engine set's parts share: its engines (slots), who serves, and the locks between them.

``EngineSet`` (routing), ``WeightSyncs`` (pause -> load -> continue) and ``HealthChecks`` (probes,
failures, restarts) each work on one ``Members``. Membership changes — an engine failing, serving
again, or the set giving up (``fatal``) — notify ``changed``, which routing and waiters wait on.
``control`` orders a weight sync against a replacement's refit: never both at once.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

from policies.engine.client import EngineClient, EngineError
from policies.engine.process import EngineProcess
from runtime.ipc_weights import IpcWeights
from runtime.weight_transport import CollectiveWeights


@dataclasses.dataclass
class RestartRecord:
    engine: int
    reason: str
    failed_at: float  # monotonic: the failure was detected
    injected_at: float | None = None  # monotonic: when chaos injected the fault, if it did
    serving_at: float | None = None  # the replacement was refitted and routable
    refit_version: int | None = None  # the version it loaded before serving
    first_version: str | None = None  # the weight version of its first answered request
    current_at_first: int | None = None  # the set's current version when that request was sent

    @property
    def recovery_s(self) -> float | None:
        """Fault to serving again: from the injection when known, else from detection."""
        if self.serving_at is None:
            return None
        return self.serving_at - (self.injected_at if self.injected_at is not None else self.failed_at)


@dataclasses.dataclass(eq=False)
class Slot:
    index: int
    process: EngineProcess
    client: EngineClient | None = None
    state: str = "starting"  # starting | serving | failed | stopped
    incarnation: int = 0
    in_flight: int = 0
    last_progress: float = 0.0
    restarts: collections.deque[float] = dataclasses.field(default_factory=collections.deque)
    injected_at: float | None = None  # set by fault injection just before it strikes
    pending_first: RestartRecord | None = None  # a replacement whose first answer is not in yet


class Members:
    def __init__(self, *, model_path: str | Path, n: int, log_dir: Path, threads: int, max_running_requests: int,
                 timeout_s: float, start_timeout_s: float, weight_version: int, dtype: str,
                 process_factory: Callable[..., EngineProcess] | None, adapters: bool = False,
                 adapter: str | None = None):
        """``adapters``: weights arrive as LoRA adapters (peft directories) for the base at
        ``model_path``, loaded through /load_lora_adapter; ``adapter``: the one version
        ``weight_version`` needs, loaded before the engines serve (a resumed LoRA run)."""
        self.model_path = str(model_path)
        self.adapters = adapters
        # the adapters every serving engine has loaded, newest (the one requests name) last; the one
        # before it stays loaded until the next sync, so a request named just before a sync is served
        self.adapter_names: list[str] = []
        # (index, model_path, **EngineProcess's keywords) -> engine ``index``'s process, for another
        # backend's host with EngineProcess's interface (the Ray backend's RayHosts.engine);
        # None: an EngineProcess, a subprocess of this process
        self.process_factory = process_factory
        self.log_dir = log_dir
        self.threads, self.dtype = threads, dtype
        self.max_running_requests = max_running_requests
        self.timeout_s = timeout_s
        self.start_timeout_s = start_timeout_s
        self.initial_version = weight_version
        # what a replacement must load before it serves: (version, weights dir)
        self.current: tuple[int, str | None] = (weight_version, adapter or self.model_path)  # None: broadcast
        # the trainer's own transport when it is one (no files): a broadcast, or CUDA IPC (colocated)
        self.collective: CollectiveWeights | IpcWeights | None = None
        self.slots = [Slot(i, self.new_process(i)) for i in range(n)]
        self.counters: collections.Counter[str] = collections.Counter()
        self.fatal: str | None = None
        self.control = asyncio.Lock()  # a weight sync or a refit: never both
        # read by health probes: while engines are paused for a sync or released for a learner
        # step (runtime/time_slice.py) a generation probe is aborted by the pause, not a failure
        self.syncing = False
        self.released = False
        self.sync_epoch = 0  # bumped by every pause; a probe that spans one is not evidence
        self.changed = asyncio.Condition()  # routing membership or ``fatal`` changed
        self._tasks: set[asyncio.Task[None]] = set()

    def new_process(self, i: int) -> EngineProcess:
        kwargs = dict(log_path=self.log_dir / f"engine{i}.log", torch_threads=self.threads,
                      max_running_requests=self.max_running_requests, weight_version=str(self.initial_version),
                      dtype=self.dtype)
        if self.process_factory is None:
            return EngineProcess(self.model_path, **kwargs)
        return self.process_factory(i, self.model_path, **kwargs)

    async def load(self, client: EngineClient, path: str, version: int, *, unload: list[str]) -> None:
        """Bring one engine to ``version`` from the files at ``path``: a checkpoint, or with
        ``adapters`` a LoRA adapter (loaded under its version's name, dated with
        /update_weight_version, then the adapters in ``unload`` unloaded)."""
        if not self.adapters:
            await client.update_weights_from_disk(path, weight_version=str(version))
            return
        await client.load_lora_adapter(adapter_name(version), path)
        await client.update_weight_version(str(version))
        for name in unload:
            try:
                await client.unload_lora_adapter(name)
            except EngineError as e:
                if e.status != 400:  # 400: not loaded there (an engine restarted since): nothing to free
                    raise

    @property
    def lora_path(self) -> str | None:
        """The adapter requests name (None: no adapter loaded)."""
        return self.adapter_names[-1] if self.adapter_names else None

    # -- views -----------------------------------------------------------------------------------
    @property
    def processes(self) -> list[EngineProcess]:
        return [s.process for s in self.slots]

    @property
    def in_flight(self) -> list[int]:
        return [s.in_flight for s in self.slots]

    def serving(self) -> list[Slot]:
        return [s for s in self.slots if s.state == "serving"]

    def health(self) -> list[str]:
        return [s.state for s in self.slots]

    # -- membership changes ----------------------------------------------------------------------
    async def wait_until(self, predicate: Callable[[], bool]) -> None:
        """Until ``predicate()`` holds; re-checked whenever an engine fails, serves again, or the
        set gives up (``fatal``)."""
        async with self.changed:
            await self.changed.wait_for(predicate)

    async def wait_all_serving(self) -> None:
        await self.wait_until(lambda: len(self.serving()) == len(self.slots) or self.fatal is not None)

    def set_fatal(self, message: str) -> None:
        self.fatal = self.fatal or message
        self.own(self.notify(), "engine-set-notify")

    async def notify(self) -> None:
        async with self.changed:
            self.changed.notify_all()

    def own(self, coro: Coroutine[Any, Any, None], name: str) -> None:
        """A background task of the set (a restart, a close): kept until done, cancelled by ``stop``."""
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def cancel_tasks(self) -> None:
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


def adapter_name(version: int) -> str:
    """The name a policy version's LoRA adapter is loaded under on every engine."""
    return f"policy-v{version}"
