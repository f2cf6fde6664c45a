"""Engine health and restart on real engine subprocesses: real SIGKILL and SIGSTOP, real HTTP."""

from __future__ import annotations

import asyncio
import os
import signal

import pytest

from policies.engine.client import EngineLost
from runtime.config import FaultConfig
from runtime.core.errors import RunFailed
from runtime.engines import EngineSet
from tests.conftest import run

PARAMS = {"temperature": 1.0, "max_new_tokens": 40, "ignore_eos": True}


@pytest.fixture(scope="module")
def two_checkpoints(checkpoints):
    return checkpoints[0]  # (tests/runtime/conftest.py)


def engine_set(ckpt, tmp_path, n, **fault) -> EngineSet:
    fault = FaultConfig(**{"health_check_interval": 0.2, "health_check_timeout": 2.0, **fault})
    return EngineSet(model_path=ckpt, n=n, log_dir=tmp_path, timeout_s=20, start_timeout_s=90, fault=fault)


def test_a_killed_engine_loses_its_requests_then_serves_again_refitted_to_the_current_version(
        two_checkpoints, tmp_path):
    v0, v1 = two_checkpoints

    async def scenario():
        engines = engine_set(v0, tmp_path, n=2)
        await engines.start()
        monitor = asyncio.create_task(engines.monitor(), name="monitor")
        try:
            await engines.sync_weights(v1, 1, "in_place")
            victim = engines.slots[0]
            await victim.client.pause("in_place")  # hold its requests in flight while we kill it
            requests = [asyncio.create_task(engines.generate([1, 5, 6], PARAMS)) for _ in range(4)]
            await asyncio.sleep(0)  # one turn: each task has picked its engine and counted itself
            assert victim.in_flight == 2  # least-loaded routing alternates between the two
            os.kill(victim.process.pid, signal.SIGKILL)
            results = await asyncio.gather(*requests, return_exceptions=True)
            lost = [r for r in results if isinstance(r, EngineLost)]
            assert len(lost) == 2, results
            assert all(r.finish_reason == "length" for r in results if not isinstance(r, Exception))

            await engines.wait_all_serving()
            record = engines.restart_records[0]
            assert record.engine == 0 and record.refit_version == 1
            # the replacement's first answer is at the version current when it was sent
            outs = await asyncio.gather(*(engines.generate([1, 5, 6], PARAMS) for _ in range(4)))
            assert {o.weight_version for o in outs} == {"1"}
            assert record.first_version == "1" and record.current_at_first == 1
            assert engines.counters["engine_restarts"] == 1
        finally:
            monitor.cancel()
            await engines.stop()
        assert not any(p.alive for p in engines.processes)

    run(scenario(), timeout=180)


def test_a_hung_engine_is_restarted_and_a_crash_loop_ends_the_run_with_one_line(two_checkpoints, tmp_path):
    v0, _ = two_checkpoints

    async def scenario():
        engines = engine_set(v0, tmp_path, n=1, max_engine_restarts=1)
        await engines.start()
        monitor = asyncio.create_task(engines.monitor(), name="monitor")
        try:
            os.kill(engines.slots[0].process.pid, signal.SIGSTOP)
            await engines.wait_until(lambda: engines.counters["engine_restarts"] >= 1)
            assert "health probe" in engines.restart_records[0].reason
            out = await engines.generate([1, 5, 6], PARAMS)
            assert out.finish_reason == "length"

            os.kill(engines.slots[0].process.pid, signal.SIGKILL)  # second failure: over budget
            with pytest.raises(RunFailed, match=r"engine 0 failed 2 times .*--max-engine-restarts 1"):
                await asyncio.wait_for(monitor, 30)
        finally:
            monitor.cancel()
            await engines.stop()
        assert not any(p.alive for p in engines.processes)

    run(scenario(), timeout=180)
