"""Health of an engine set: probes, failures, restarts (``HealthChecks.monitor``, a task the
scheduler owns).

Each serving engine is probed in parallel every ``health_check_interval``: its process must be
alive, ``/health_generate`` must answer within ``health_check_timeout`` (``/health`` while a weight
sync holds the engines paused, since a pause aborts generation probes), and requests in flight
must keep finishing (``engine_progress_timeout``). Start-up is not probed: an engine serves only
after ``wait_ready`` (bounded by the start timeout).

A failed engine (dead, hung, or lost under a request) leaves routing at once, is SIGKILLed (which
also ends every HTTP call in flight to it, so nothing waits on a frozen process), and is restarted:

    serving --fail--> failed --restart task--> starting --wait_ready--> refit --> serving
                                                            (under the control lock)

Refit before serve: the replacement loads the current weights and must report their version
before it is routed a single request. The refit holds the control lock, as a sync does, so no
sync can slip between the refit and the first request. A restart budget
(``max_engine_restarts`` per engine per ``engine_restart_window``) turns a crash loop into a clear
error instead of an endless cycle.
"""

from __future__ import annotations

import asyncio
import logging
import time

from policies.engine.client import EngineClient, EngineError
from policies.engine.process import EngineStartError
from runtime.config import FaultConfig
from runtime.core.errors import RunFailed
from runtime.engine_members import Members, RestartRecord, Slot

log = logging.getLogger("runtime.engines")


class HealthChecks:
    def __init__(self, members: Members, fault: FaultConfig):
        self.m = members
        self.fault = fault
        self.records: list[RestartRecord] = []

    async def monitor(self) -> None:
        """Probe every serving engine forever; raises ``RunFailed`` when the restart budget is spent."""
        interval = self.fault.health_check_interval
        while True:
            if self.m.fatal is not None:
                raise RunFailed(self.m.fatal)
            if interval:
                await asyncio.gather(*(self._probe(s) for s in self.m.serving()))
            try:
                async with asyncio.timeout(interval or None), self.m.changed:
                    await self.m.changed.wait_for(lambda: self.m.fatal is not None)
            except TimeoutError:
                pass

    async def _probe(self, slot: Slot) -> None:
        m = self.m
        if not slot.process.alive:
            self.fail(slot, f"process exited (code {slot.process.returncode})")
            return
        client, incarnation = slot.client, slot.incarnation
        assert client is not None
        paused, epoch = m.syncing or m.released, m.sync_epoch
        timeout = self.fault.health_check_timeout
        ok = await (client.health(timeout_s=timeout) if paused else client.health_generate(timeout_s=timeout))
        if slot.incarnation != incarnation or slot.state != "serving":
            return
        if not slot.process.alive:
            self.fail(slot, f"process exited (code {slot.process.returncode})")
        elif not ok and (paused or (epoch == m.sync_epoch and not m.syncing)):
            # a generation probe that overlapped a pause was aborted by it: not evidence
            self.fail(slot, f"health probe failed or took over {timeout:g}s")
        elif (slot.in_flight and not m.syncing and not m.released
              and time.monotonic() - slot.last_progress > self.fault.engine_progress_timeout):
            self.fail(slot, f"no request finished in {self.fault.engine_progress_timeout:g}s")

    def fail(self, slot: Slot, reason: str) -> None:
        """Take ``slot`` out of routing, kill its process, and start its replacement (or give up)."""
        if slot.state != "serving":
            return
        now = time.monotonic()
        slot.state, slot.incarnation = "failed", slot.incarnation + 1
        self.m.counters["engine_failures"] += 1
        log.warning("engine %d failed: %s; restarting it", slot.index, reason)
        slot.process.kill()  # also ends every HTTP call in flight to it at once
        if slot.client is not None:
            self.m.own(slot.client.close(), f"engine{slot.index}-close")
            slot.client = None
        record = RestartRecord(engine=slot.index, reason=reason, failed_at=now, injected_at=slot.injected_at)
        slot.injected_at = None
        self.records.append(record)
        self.m.own(self._restart(slot, record), f"engine{slot.index}-restart")
        self.m.own(self.m.notify(), "engine-set-notify")

    def _spend_budget(self, slot: Slot) -> bool:
        window, now = self.fault.engine_restart_window, time.monotonic()
        while slot.restarts and now - slot.restarts[0] > window:
            slot.restarts.popleft()
        if len(slot.restarts) >= self.fault.max_engine_restarts:
            self.m.set_fatal(f"engine {slot.index} failed {len(slot.restarts) + 1} times within {window:g}s "
                             f"(--max-engine-restarts {self.fault.max_engine_restarts}); see "
                             f"{self.m.log_dir / f'engine{slot.index}.log'}")
            return False
        slot.restarts.append(now)
        return True

    async def _restart(self, slot: Slot, record: RestartRecord) -> None:
        m = self.m
        while self._spend_budget(slot):
            slot.state = "starting"
            slot.process = m.new_process(slot.index)
            slot.process.start()
            client: EngineClient | None = None
            try:
                url = await slot.process.wait_ready(m.start_timeout_s)
                client = EngineClient(url, timeout_s=m.timeout_s)
                async with m.control:
                    version = await self._refit(slot, client)
                    slot.client, slot.state = client, "serving"
                    slot.last_progress = record.serving_at = time.monotonic()
                    record.refit_version, slot.pending_first = version, record
                    m.counters["engine_restarts"] += 1
            except (EngineStartError, EngineError) as e:
                log.warning("engine %d replacement failed: %s", slot.index, e)
                slot.process.kill()
                if client is not None:
                    await client.close()
                continue
            log.warning("engine %d serving again at version %d, %.1fs after the fault",
                        slot.index, version, record.recovery_s)
            await m.notify()
            return
        slot.state = "failed"

    async def _refit(self, slot: Slot, client: EngineClient) -> int:
        """Load the current weights into a replacement (under the control lock); its version."""
        m = self.m
        version, path = m.current
        if path is None and version != m.initial_version:  # refit alone by broadcast
            assert m.collective is not None
            version, _ = await m.collective.send([((slot.index, slot.incarnation), client)], None)
        elif (version, path) != (m.initial_version, m.model_path):  # (a resumed LoRA run: its adapter)
            await m.load(client, path, version, unload=[])
        reported = await client.get_weight_version()
        if reported != str(version):
            raise EngineError(client.base_url, "/model_info", f"reports version {reported} after refit to {version}")
        return version
