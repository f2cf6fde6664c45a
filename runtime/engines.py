"""The engine set: N engine server subprocesses behind one routing surface.

Routing sends each request to the serving engine with the fewest requests in flight; every call
carries a timeout (the client's). The set's other two jobs are parts of their own, over the same
``Members`` (runtime/engine_members.py): weight syncs (``WeightSyncs``, runtime/engine_sync.py)
and health checks with restarts (``HealthChecks``, runtime/engine_health.py). A request in
flight on an engine that fails raises ``EngineLost``; the caller re-sends it with the tokens it
already holds (failover).
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Callable
from pathlib import Path

from policies.engine.client import EngineClient, EngineError, EngineLost, GenerateOutput
from policies.engine.process import EngineProcess
from runtime.config import FaultConfig
from runtime.core import trace
from runtime.engine_health import HealthChecks
from runtime.engine_members import Members, RestartRecord, Slot, adapter_name
from runtime.engine_sync import WeightSyncs

DEATH_GRACE_S = 1.0  # a dying process closes its sockets a moment before it can be reaped

__all__ = ["EngineSet", "RestartRecord", "Slot"]


class EngineSet(Members):
    def __init__(self, *, model_path: str | Path, n: int, log_dir: Path, threads: int = 1,
                 max_running_requests: int = 512, timeout_s: float = 120.0, start_timeout_s: float = 180.0,
                 fault: FaultConfig | None = None, weight_version: int = 0, dtype: str = "float32",
                 process_factory: Callable[..., EngineProcess] | None = None, adapters: bool = False,
                 adapter: str | None = None):
        super().__init__(model_path=model_path, n=n, log_dir=log_dir, threads=threads,
                         max_running_requests=max_running_requests, timeout_s=timeout_s,
                         start_timeout_s=start_timeout_s, weight_version=weight_version, dtype=dtype,
                         process_factory=process_factory, adapters=adapters, adapter=adapter)
        self.checks = HealthChecks(self, fault or FaultConfig())
        self.syncs = WeightSyncs(self, self.checks.fail)
        self.generated_tokens = 0
        self._rids = itertools.count()

    # the parts' entry points, as the scheduler, broadcaster and time slice call them
    @property
    def restart_records(self) -> list[RestartRecord]:
        return self.checks.records

    def monitor(self):  # noqa: ANN201 - the coroutine of HealthChecks.monitor
        return self.checks.monitor()

    def fail(self, slot: Slot, reason: str) -> None:
        self.checks.fail(slot, reason)

    def sync_weights(self, path: str | Path | None, version: int, pause_mode: str,
                     sent: asyncio.Event | None = None):  # noqa: ANN201 - WeightSyncs.sync_weights
        return self.syncs.sync_weights(path, version, pause_mode, sent)

    def release_memory(self):  # noqa: ANN201
        return self.syncs.release_memory()

    def resume_memory(self):  # noqa: ANN201
        return self.syncs.resume_memory()

    # -- lifecycle -------------------------------------------------------------------------------
    async def start(self) -> None:
        """Start every engine and wait until each can generate (in parallel)."""
        for s in self.slots:
            s.process.start()
        urls = await asyncio.gather(*(s.process.wait_ready(self.start_timeout_s) for s in self.slots))
        now = time.monotonic()
        for s, url in zip(self.slots, urls, strict=True):
            s.client = EngineClient(url, timeout_s=self.timeout_s)
        version, path = self.current
        if path != self.model_path:  # refit before serve: a resumed LoRA run's adapter
            await asyncio.gather(*(self.load(s.client, path, version, unload=[]) for s in self.slots))
            self.adapter_names = [adapter_name(version)]
        for s in self.slots:
            s.state, s.last_progress = "serving", now

    async def stop(self) -> None:
        """Stop restarts, close clients and stop every process (SIGTERM, then SIGKILL); idempotent."""
        for s in self.slots:  # an engine ending from here on was stopped, not failed: no restart, no warning
            s.state = "stopped"
        await self.cancel_tasks()
        await asyncio.gather(*(s.client.close() for s in self.slots if s.client), return_exceptions=True)
        await asyncio.gather(*(s.process.stop() for s in self.slots), return_exceptions=True)

    # -- requests --------------------------------------------------------------------------------
    async def _pick(self) -> Slot:
        """The least-loaded serving engine; waits (bounded) while every engine is restarting."""
        if not self.serving():
            limit = self.start_timeout_s + self.timeout_s
            try:
                async with asyncio.timeout(limit), self.changed:
                    await self.changed.wait_for(lambda: bool(self.serving()) or self.fatal is not None)
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
                lora = self.lora_path
                if len(input_ids) == 1:  # the plain form: what every SGLang version takes
                    outs = [await client.generate(input_ids[0], sampling_params[0], rid=rids[0], lora_path=lora)]
                else:
                    outs = await client.generate_batch(input_ids, sampling_params, rids=rids, lora_path=lora)
                req.set(weight_version=outs[0].weight_version, tokens=sum(len(o.output_ids) for o in outs))
        except EngineError as e:
            if slot.incarnation == incarnation and slot.state == "serving" and e.status is None \
                    and await slot.process.exited_within(DEATH_GRACE_S):
                self.fail(slot, f"process exited (code {slot.process.returncode}) under a request")
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
