"""Whole runs of ``python -m runtime.launch``: real engine subprocesses, real HTTP, real signals,
on both backends (``backend``: tests/integration/conftest.py)."""

from __future__ import annotations

import json
import os
import re
import signal
import time

import psutil
import pytest

from runtime.metrics import read_metrics
from tests.integration.runs import (
    GROUPS_PER_STEP,
    LOCAL_AND_SLOW_RAY,
    SHORT,
    STEP_KEYS,
    engines_of,
    launch,
    start,
    wait_for_steps,
)

SLOW = pytest.mark.slow  # the default suite keeps one bound per backend (CI's 10 minutes on 2 cores); the
# bound itself is tested at every setting, on both pause modes, in tests/actors/test_loop_staleness.py


@pytest.mark.parametrize("max_staleness, backend", [
    (1, "local"), (3, "ray"),
    pytest.param(0, "local", marks=SLOW), pytest.param(3, "local", marks=SLOW),
    pytest.param(0, "ray", marks=SLOW), pytest.param(1, "ray", marks=SLOW),
], indirect=["backend"])
def test_run_respects_staleness_and_balances_ledger(max_staleness, backend, tmp_path):
    run_dir = tmp_path / f"s{max_staleness}"
    proc = launch(run_dir, backend, "--max-staleness", str(max_staleness), "--use-tis")
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    lines = read_metrics(run_dir / "metrics.jsonl")
    assert summary["status"] == "completed" and summary["steps"] == 10 and len(lines) == 10
    assert all(STEP_KEYS <= line.keys() for line in lines)
    assert any("eval/reward" in line for line in lines)
    assert summary["staleness_max_observed"] <= max_staleness
    assert max(line["staleness/max"] for line in lines) == summary["staleness_max_observed"]
    if max_staleness == 0:
        assert summary["staleness_max_observed"] == 0
    ledger = summary["ledger"]
    assert ledger["admitted"] == ledger["trained"] + sum(ledger["dropped"].values()) + ledger["in_flight"]
    assert ledger["trained"] == 10 * GROUPS_PER_STEP and ledger["duplicates"] == 0
    assert summary["first_eval_reward"] is not None and summary["final_eval_reward"] is not None
    assert (run_dir / "config.toml").read_text().count("max_staleness = %d" % max_staleness) == 1
    # the same run directory on either backend, and progress on the terminal (on Ray: no actor prefix)
    assert {"config.toml", "metrics.jsonl", "summary.json", "groups.jsonl", "run.log", "trace.json",
            "logs"} <= {p.name for p in run_dir.iterdir()}
    assert (run_dir / "logs" / "engine0.log").stat().st_size > 0
    assert "step 10/10" in proc.stderr and "(Controller" not in proc.stderr
    assert not engines_of(run_dir)


@pytest.mark.parametrize("backend", LOCAL_AND_SLOW_RAY, indirect=True)
def test_reward_that_raises_or_hangs_is_counted_and_run_completes(backend, tmp_path):
    proc = launch(tmp_path / "r", backend, "--num-rollout", "4", "--eval-interval", "0",
                  "--custom-rm-path", "tests.integration.bad_rewards:raises_or_hangs", "--reward-timeout", "0.5")
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert summary["steps"] == 4
    assert summary["counters"]["reward_error"] >= 4 * GROUPS_PER_STEP
    assert summary["counters"]["reward_timeout"] >= 1
    assert not engines_of(tmp_path / "r")


@pytest.mark.parametrize("backend", LOCAL_AND_SLOW_RAY, indirect=True)
def test_ctrl_c_stops_cleanly_without_orphans(backend, tmp_path):
    """On either backend, SIGINT to the launcher ends the run with status 130, an ``interrupted``
    summary, and every process of the run gone: on local its child processes, on Ray the engine
    servers (children of engine-host actors), and the run's actors (checked by the fixture)."""
    run_dir = tmp_path / "int"
    # SIGINT as a terminal delivers it, even if this test runs in a background job (which ignores it)
    proc = start(run_dir, backend, "--num-rollout", "100000", "--progress", "off",
                 preexec_fn=lambda: signal.signal(signal.SIGINT, signal.default_int_handler))
    try:
        wait_for_steps(proc, run_dir, 2)
        if backend.name == "local":
            children = psutil.Process(proc.pid).children(recursive=True)  # engines and the trainer
            assert any("policies.trainer_process" in " ".join(c.cmdline()) for c in children)
        else:
            children = engines_of(run_dir)
        assert engines_of(run_dir)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 130, err[-3000:]
    finally:
        proc.kill()
    gone, alive = psutil.wait_procs(children, timeout=10)
    assert not alive, [p.cmdline() for p in alive]
    assert not engines_of(run_dir)
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "interrupted"


def test_actor_crash_is_reported_with_traceback_and_engines_stop(tmp_path):
    """Local only: the crash is a method of the in-process learner replaced by a broken one; on Ray
    the learner loop runs inside the controller actor, out of a test's reach (a real death of the
    trainer actor is test_ray_backend.py's)."""
    import asyncio

    from runtime import cli
    from runtime.launch import build, prepare_run_dir
    from runtime.progress import Progress
    from runtime.scheduler import RunFailed

    cfg = cli.resolve(["--run-dir", str(tmp_path / "crash"), *SHORT])
    run_dir = prepare_run_dir(cfg)
    scheduler = build(cfg, run_dir, tmp_path / "w", Progress(total_steps=10, mode="off"))

    def broken_step(batch, version):
        raise ZeroDivisionError("learner bug")

    scheduler.agent.learner.trainer.step = broken_step
    with pytest.raises(RunFailed) as e:
        asyncio.run(asyncio.wait_for(scheduler.run(), 120))
    text = str(e.value)
    assert "actor 'learner' crashed" in text and "ZeroDivisionError: learner bug" in text
    assert "Traceback" in text
    assert all(not p.alive for p in scheduler.agent.engines.processes)
    assert os.path.exists(run_dir / "metrics.jsonl")


# ~28 s; the default suite keeps the watchdog's dump (test_bad_inputs.py: a blocked loop) and hung
# engines restarted (test_faults.py)
@pytest.mark.slow
@pytest.mark.parametrize("backend", ["local", "ray"], indirect=True)
def test_a_hung_engine_trips_the_watchdog_with_a_dump_instead_of_hanging(backend, tmp_path):
    """SIGSTOP the (real) engine server once a step is taken: no step can follow, and the run must
    end with a clear error naming the dump, within the stall timeout, not hang."""
    run_dir = tmp_path / "hang"
    # health checks off: with them on, the hung engine would be restarted (tests/integration/test_faults.py)
    proc = start(run_dir, backend, "--num-rollout", "100000", "--stall-timeout", "4", "--health-check-interval", "0")
    try:
        wait_for_steps(proc, run_dir, 1)
        [engine] = engines_of(run_dir)
        engine.suspend()
        stopped_at = time.monotonic()
        _, err = proc.communicate(timeout=90)
    finally:
        proc.kill()
    assert time.monotonic() - stopped_at < 60
    assert proc.returncode == 1, err[-3000:]
    assert re.fullmatch(r"run failed: no learner step for \d+s .*stall_dump\.txt", err.strip().splitlines()[-1]), \
        err[-3000:]
    dump = (run_dir / "stall_dump.txt").read_text()
    assert "learner: version" in dump and "waiting on buffer.get_batch" in dump
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "failed" and summary["counters"]["watchdog_trips"] == 1
    psutil.wait_procs([engine], timeout=10)
    assert not engines_of(run_dir)
