"""The engine set: N engine server subprocesses behind one routing, control and health surface.

Routing sends each request to the serving engine with the fewest requests in flight. Control
calls (pause, weight update, continue) go to every serving engine directly and concurrently:
routers in front of SGLang do not forward them. Every call carries a timeout (the client's).

Health (``monitor``, a task the scheduler owns). Each serving engine is probed in parallel every
``health_check_interval``: its process must be alive, ``/health_generate`` must answer within
``health_check_timeout`` (``/health`` while a weight sync holds the engines paused, since a pause
aborts generation probes), and requests in flight must keep finishing (``engine_progress_timeout``).
Start-up is not probed: an engine serves only after ``wait_ready`` (bounded by the start timeout).

A failed engine (dead, hung, or lost under a request) leaves routing at once, is SIGKILLed (which
also ends every HTTP call in flight to it, so nothing waits on a frozen process), and is restarted:

    serving --fail--> failed --restart task--> starting --wait_ready--> refit --> serving
                                                            (under the control lock)

Refit before serve: the replacement loads the current weights and must report their version
before it is routed a single request. The refit holds the control lock, as a sync does, so no
sync can slip between the refit and the first request. Requests in flight on the failed engine
raise ``EngineLost``; the caller re-sends them with the tokens it already holds (failover).
A restart budget (``max_engine_restarts`` per engine per ``engine_restart_window``) turns a crash
loop into a clear error instead of an endless cycle.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import itertools
import logging
import time
from collections.abc import Callable
from pathlib import Path

from policies.engine.client import EngineClient, EngineError, EngineLost, GenerateOutput
from policies.engine.process import EngineProcess, EngineStartError
from runtime.config import FaultConfig
from runtime.core import trace
from runtime.core.errors import RunFailed
from runtime.ipc_weights import IpcWeights
from runtime.weight_transport import CollectiveWeights

log = logging.getLogger(__name__)


DEATH_GRACE_S = 1.0  # a dying process closes its sockets a moment before it can be reaped


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
    state: str = "starting"  # starting | serving | failed
    incarnation: int = 0
    in_flight: int = 0
    last_progress: float = 0.0
    restarts: collections.deque[float] = dataclasses.field(default_factory=collections.deque)
    injected_at: float | None = None  # set by fault injection just before it strikes
    pending_first: RestartRecord | None = None  # a replacement whose first answer is not in yet


class EngineSet:
    def __init__(self, *, model_path: str | Path, n: int, log_dir: Path, threads: int = 1,
                 max_running_requests: int = 512, timeout_s: float = 120.0, start_timeout_s: float = 180.0,
                 fault: FaultConfig | None = None, weight_version: int = 0, dtype: str = "float32",
                 process_factory: Callable[..., EngineProcess] | None = None):
        self.model_path = str(model_path)
        # (index, model_path, **EngineProcess's keywords) -> engine ``index``'s process, for another
        # backend's host with EngineProcess's interface (the Ray backend's RayHosts.engine);
        # None: an EngineProcess, a subprocess of this process
        self.process_factory = process_factory
        self.log_dir = log_dir
        self.threads, self.dtype = threads, dtype
        self.max_running_requests = max_running_requests
        self.timeout_s = timeout_s
        self.start_timeout_s = start_timeout_s
        self.fault = fault or FaultConfig()
        self.initial_version = weight_version
        # what a replacement must load before it serves: (version, weights dir)
        self.current: tuple[int, str | None] = (weight_version, self.model_path)  # None: broadcast
        # the trainer's own transport when it is one (no files): a broadcast, or CUDA IPC (colocated)
        self.collective: CollectiveWeights | IpcWeights | None = None
        self.slots = [Slot(i, self._new_process(i)) for i in range(n)]
        self.generated_tokens = 0
        self.counters: collections.Counter[str] = collections.Counter()
        self.restart_records: list[RestartRecord] = []
        self.fatal: str | None = None
        self._rids = itertools.count()
        self._control = asyncio.Lock()  # a weight sync or a refit: never both
        self._syncing = False
        self._sync_epoch = 0
        self._released = False  # time-sliced (runtime/time_slice.py): engines paused for a learner step
        self._changed = asyncio.Condition()  # routing membership or ``fatal`` changed
        self._restart_tasks: set[asyncio.Task[None]] = set()

    def _new_process(self, i: int) -> EngineProcess:
        kwargs = dict(log_path=self.log_dir / f"engine{i}.log", torch_threads=self.threads,
                      max_running_requests=self.max_running_requests, weight_version=str(self.initial_version),
                      dtype=self.dtype)
        if self.process_factory is None:
            return EngineProcess(self.model_path, **kwargs)
        return self.process_factory(i, self.model_path, **kwargs)

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

    async def wait_until(self, predicate: Callable[[], bool]) -> None:
        """Until ``predicate()`` holds; re-checked whenever an engine fails, serves again, or the
        set gives up (``fatal``)."""
        async with self._changed:
            await self._changed.wait_for(predicate)

    async def wait_all_serving(self) -> None:
        await self.wait_until(lambda: len(self.serving()) == len(self.slots) or self.fatal is not None)

    # -- lifecycle -------------------------------------------------------------------------------
    async def start(self) -> None:
        """Start every engine and wait until each can generate (in parallel)."""
        for s in self.slots:
            s.process.start()
        urls = await asyncio.gather(*(s.process.wait_ready(self.start_timeout_s) for s in self.slots))
        now = time.monotonic()
        for s, url in zip(self.slots, urls, strict=True):
            s.client = EngineClient(url, timeout_s=self.timeout_s)
            s.state, s.last_progress = "serving", now

    async def stop(self) -> None:
        """Stop restarts, close clients and stop every process (SIGTERM, then SIGKILL); idempotent."""
        for t in list(self._restart_tasks):
            t.cancel()
        await asyncio.gather(*self._restart_tasks, return_exceptions=True)
        await asyncio.gather(*(s.client.close() for s in self.slots if s.client), return_exceptions=True)
        await asyncio.gather(*(s.process.stop() for s in self.slots), return_exceptions=True)

    # -- requests --------------------------------------------------------------------------------
    async def _pick(self) -> Slot:
        """The least-loaded serving engine; waits (bounded) while every engine is restarting."""
        if not self.serving():
            limit = self.start_timeout_s + self.timeout_s
            try:
                async with asyncio.timeout(limit), self._changed:
                    await self._changed.wait_for(lambda: bool(self.serving()) or self.fatal is not None)
            except TimeoutError:
                raise EngineError("engine set", "", f"no engine serving for {limit:g}s") from None
            if self.fatal is not None:
                raise EngineError("engine set", "", self.fatal)
        return min(self.serving(), key=lambda s: s.in_flight)

    async def generate(self, input_ids: list[int], sampling_params: dict, *, rid: str | None = None
                       ) -> GenerateOutput:
        """One /generate on the least-loaded engine (see ``generate_batch``)."""
        (out,) = await self.generate_batch([input_ids], [sampling_params], rids=[rid] if rid else None)
        return out

    async def generate_batch(self, input_ids: list[list[int]], sampling_params: list[dict], *,
                             rids: list[str] | None = None) -> list[GenerateOutput]:
        """One batched /generate (one member per prompt) on the least-loaded engine. ``EngineLost``
        when that engine failed under the call (re-send it), ``EngineError`` for any other failure."""
        slot = await self._pick()
        client, incarnation, first = slot.client, slot.incarnation, slot.pending_first
        assert client is not None
        sent_at_version = self.current[0]
        rids = rids or [f"r{next(self._rids)}" for _ in input_ids]
        slot.in_flight += len(input_ids)
        try:
            with trace.span(f"engine{slot.index}", "request", rids=len(rids), first_rid=rids[0]) as req:
                if len(input_ids) == 1:  # the plain form: what every SGLang version takes
                    outs = [await client.generate(input_ids[0], sampling_params[0], rid=rids[0])]
                else:
                    outs = await client.generate_batch(input_ids, sampling_params, rids=rids)
                req.set(weight_version=outs[0].weight_version, tokens=sum(len(o.output_ids) for o in outs))
        except EngineError as e:
            if slot.incarnation == incarnation and slot.state == "serving" and e.status is None \
                    and await slot.process.exited_within(DEATH_GRACE_S):
                self._fail(slot, f"process exited (code {slot.process.returncode}) under a request")
            if slot.incarnation != incarnation or slot.state != "serving":
                raise EngineLost(e.url, e.route, f"engine {slot.index} failed: {e.reason}") from e
            raise
        finally:
            slot.in_flight -= len(input_ids)
        if slot.incarnation == incarnation:
            slot.last_progress = time.monotonic()
            if first is not None and slot.pending_first is first:
                slot.pending_first = None
                # the version of its first token: an answer frozen across a sync ends at a newer one
                out = outs[0]
                first.first_version = out.token_versions[0] if out.token_versions else out.weight_version
                first.current_at_first = sent_at_version
        self.generated_tokens += sum(len(o.output_ids) for o in outs)
        return outs

    # -- weight syncs ----------------------------------------------------------------------------
    async def sync_weights(self, path: str | Path | None, version: int, pause_mode: str,
                           sent: asyncio.Event | None = None) -> float:
        """Pause -> load ``version`` -> continue, on every serving engine; returns the seconds
        generation was paused. ``path``: the weights' files (shared memory); None: the trainer
        sends them (``self.collective``: a broadcast, or CUDA IPC handles), and ``sent`` is set once
        the trainer's part is done.
        An engine failing here is failed and restarted (it will refit to this version); the sync
        goes on with the others."""
        async with self._control:
            self._syncing, self._sync_epoch = True, self._sync_epoch + 1
            try:
                if path is None:
                    return await self._broadcast(version, pause_mode, sent)
                await self._on_each("pause", lambda c: c.pause(pause_mode))
                paused = time.monotonic()
                await self._on_each("weight update", lambda c: c.update_weights_from_disk(
                    str(path), weight_version=str(version)))
                self.current = (version, str(path))
                await self._on_each("continue", lambda c: c.resume())
                return time.monotonic() - paused
            finally:
                if sent is not None:
                    sent.set()  # also when no engine took part, or it failed: the learner goes on
                self._syncing = False
                now = time.monotonic()
                for s in self.serving():
                    s.last_progress = max(s.last_progress, now)  # a pause is not a stall

    async def _broadcast(self, version: int, pause_mode: str, sent: asyncio.Event | None) -> float:
        """One collective sync over the serving engines, paused unless they can swap the weights
        in between decode steps (``CollectiveWeights.pauseless``); returns the seconds generation
        stopped. An engine failing in it breaks the group for everyone: it is failed, and the sync
        is retried once over the others (new group)."""
        assert self.collective is not None, "a sync without files needs the collective transport"
        for attempt in (1, 2):
            targets = [((s.index, s.incarnation), s) for s in self.serving()]
            if not targets:
                self.current = (version, None)  # replacements refit to it when they start
                return 0.0
            try:
                clients = [(key, s.client) for key, s in targets]
                await self.collective.join(clients)
                pauseless = self.collective.pauseless(pause_mode)
                if not pauseless:
                    await self._on_each("pause", lambda c: c.pause(pause_mode))
                paused = time.monotonic()
                _, held = await self.collective.send(clients, version, sent)
                self.current = (version, None)
                if pauseless:
                    return held
                await self._on_each("continue", lambda c: c.resume())
                return time.monotonic() - paused
            except Exception as e:  # noqa: BLE001 - whoever broke it is found below, else re-raised
                broken = [s for _, s in targets if not s.process.alive
                          or (isinstance(e, EngineError) and s.client is not None and s.client.base_url == e.url)]
                if not broken or attempt == 2:
                    raise
                for s in broken:
                    self._fail(s, f"weight broadcast failed: {e}")
                if not self.collective.pauseless(pause_mode):
                    await self._on_each("continue", lambda c: c.resume())  # the others, paused above
        raise AssertionError("unreachable")

    async def _on_each(self, what: str, call) -> None:  # noqa: ANN001 - call: EngineClient -> awaitable
        async def one(slot: Slot) -> None:
            assert slot.client is not None
            try:
                await call(slot.client)
            except EngineError as e:
                self._fail(slot, f"{what} failed: {e.reason}")

        await asyncio.gather(*(one(s) for s in self.serving()))

    async def release_memory(self) -> None:
        """Colocated time slice: stop every engine (``retract``: requests stay queued, their KV cache
        dropped) and free its KV memory for the learner's step. Waits for a sync in progress, so a
        sync's own continue cannot undo the release. Probes treat released engines as paused."""
        async with self._control:
            # (a new epoch: a generation probe the pause aborts is not evidence, as for a sync)
            self._released, self._sync_epoch = True, self._sync_epoch + 1
            await self._on_each("pause", lambda c: c.pause("retract"))
            await self._on_each("memory release", lambda c: c.release_memory_occupation(["kv_cache"]))

    async def resume_memory(self) -> None:
        """End the time slice: KV memory back, generation continues (after any sync in progress)."""
        async with self._control:
            await self._on_each("memory resume", lambda c: c.resume_memory_occupation(["kv_cache"]))
            await self._on_each("continue", lambda c: c.resume())
            self._released = False
            now = time.monotonic()
            for s in self.serving():
                s.last_progress = max(s.last_progress, now)  # a released engine was not stalled

    # backwards-compatible control surface (benchmarks and the broadcaster's protocol)
    async def pause(self, mode: str = "abort") -> None:
        await self._on_each("pause", lambda c: c.pause(mode))

    async def resume(self) -> None:
        await self._on_each("continue", lambda c: c.resume())

    async def update_weights_from_disk(self, path: str | Path, version: int) -> None:
        await self._on_each("weight update", lambda c: c.update_weights_from_disk(
            str(path), weight_version=str(version)))
        self.current = (version, str(path))

    # -- health ----------------------------------------------------------------------------------
    async def monitor(self) -> None:
        """Probe every serving engine forever; raises ``RunFailed`` when the restart budget is spent."""
        interval = self.fault.health_check_interval
        while True:
            if self.fatal is not None:
                raise RunFailed(self.fatal)
            if interval:
                await asyncio.gather(*(self._probe(s) for s in self.serving()))
            try:
                async with asyncio.timeout(interval or None), self._changed:
                    await self._changed.wait_for(lambda: self.fatal is not None)
            except TimeoutError:
                pass

    async def _probe(self, slot: Slot) -> None:
        if not slot.process.alive:
            self._fail(slot, f"process exited (code {slot.process.returncode})")
            return
        client, incarnation = slot.client, slot.incarnation
        assert client is not None
        syncing, epoch = self._syncing or self._released, self._sync_epoch
        timeout = self.fault.health_check_timeout
        ok = await (client.health(timeout_s=timeout) if syncing else client.health_generate(timeout_s=timeout))
        if slot.incarnation != incarnation or slot.state != "serving":
            return
        if not slot.process.alive:
            self._fail(slot, f"process exited (code {slot.process.returncode})")
        elif not ok and (syncing or (epoch == self._sync_epoch and not self._syncing)):
            # a generation probe that overlapped a pause was aborted by it: not evidence
            self._fail(slot, f"health probe failed or took over {timeout:g}s")
        elif (slot.in_flight and not self._syncing and not self._released
              and time.monotonic() - slot.last_progress > self.fault.engine_progress_timeout):
            self._fail(slot, f"no request finished in {self.fault.engine_progress_timeout:g}s")

    def _fail(self, slot: Slot, reason: str) -> None:
        """Take ``slot`` out of routing, kill its process, and start its replacement (or give up)."""
        if slot.state != "serving":
            return
        now = time.monotonic()
        slot.state, slot.incarnation = "failed", slot.incarnation + 1
        self.counters["engine_failures"] += 1
        log.warning("engine %d failed: %s; restarting it", slot.index, reason)
        slot.process.kill()  # also ends every HTTP call in flight to it at once
        if slot.client is not None:
            self._own(slot.client.close(), f"engine{slot.index}-close")
            slot.client = None
        record = RestartRecord(engine=slot.index, reason=reason, failed_at=now, injected_at=slot.injected_at)
        slot.injected_at = None
        self.restart_records.append(record)
        self._own(self._restart(slot, record), f"engine{slot.index}-restart")
        self._own(self._notify(), "engine-set-notify")

    def _own(self, coro, name: str) -> None:  # noqa: ANN001
        task = asyncio.create_task(coro, name=name)
        self._restart_tasks.add(task)
        task.add_done_callback(self._restart_tasks.discard)

    def _spend_budget(self, slot: Slot) -> bool:
        window, now = self.fault.engine_restart_window, time.monotonic()
        while slot.restarts and now - slot.restarts[0] > window:
            slot.restarts.popleft()
        if len(slot.restarts) >= self.fault.max_engine_restarts:
            self._set_fatal(f"engine {slot.index} failed {len(slot.restarts) + 1} times within {window:g}s "
                            f"(--max-engine-restarts {self.fault.max_engine_restarts}); see "
                            f"{self.log_dir / f'engine{slot.index}.log'}")
            return False
        slot.restarts.append(now)
        return True

    def _set_fatal(self, message: str) -> None:
        self.fatal = self.fatal or message
        self._own(self._notify(), "engine-set-notify")

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    async def _restart(self, slot: Slot, record: RestartRecord) -> None:
        while self._spend_budget(slot):
            slot.state = "starting"
            slot.process = self._new_process(slot.index)
            slot.process.start()
            client: EngineClient | None = None
            try:
                url = await slot.process.wait_ready(self.start_timeout_s)
                client = EngineClient(url, timeout_s=self.timeout_s)
                async with self._control:
                    version, path = self.current
                    if path is None and version != self.initial_version:  # refit alone by broadcast
                        assert self.collective is not None
                        version, _ = await self.collective.send([((slot.index, slot.incarnation), client)], None)
                    elif version != self.initial_version:
                        await client.update_weights_from_disk(path, weight_version=str(version))
                    reported = await client.get_weight_version()
                    if reported != str(version):
                        raise EngineError(url, "/model_info", f"reports version {reported} after refit to {version}")
                    slot.client, slot.state = client, "serving"
                    slot.last_progress = record.serving_at = time.monotonic()
                    record.refit_version, slot.pending_first = version, record
                    self.counters["engine_restarts"] += 1
            except (EngineStartError, EngineError) as e:
                log.warning("engine %d replacement failed: %s", slot.index, e)
                slot.process.kill()
                if client is not None:
                    await client.close()
                continue
            log.warning("engine %d serving again at version %d, %.1fs after the fault",
                        slot.index, version, record.recovery_s)
            await self._notify()
            return
        slot.state = "failed"
