"""Whole runs of ``python -m runtime.launch``: real engine subprocesses, real HTTP, real signals."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from runtime.metrics import read_metrics

ROOT = Path(__file__).resolve().parents[2]
SHORT = ["--num-rollout", "10", "--eval-interval", "5", "--eval-num-prompts", "50", "--progress", "lines"]
STEP_KEYS = {"step", "version", "time_s", "reward/mean", "staleness/max", "staleness/mean", "learner/wait_frac",
             "generator/wait_frac", "buffer/groups", "throughput/tokens_per_s", "ledger/admitted"}


def launch(run_dir: Path, *flags: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "runtime.launch", "--run-dir", str(run_dir), *SHORT, *flags],
                          cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def engines_of(run_dir: Path) -> list[psutil.Process]:
    """Live engine server processes started for ``run_dir`` (their model path is inside it)."""
    found = []
    for p in psutil.process_iter(["cmdline"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if "policies.engine.server" in cmd and str(run_dir) in cmd:
            found.append(p)
    return found


@pytest.mark.parametrize("max_staleness", [0, 1, 3])
def test_run_respects_staleness_and_balances_ledger(max_staleness, tmp_path):
    run_dir = tmp_path / f"s{max_staleness}"
    proc = launch(run_dir, "--max-staleness", str(max_staleness), "--use-tis")
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
    assert ledger["trained"] == 10 * 16 and ledger["duplicates"] == 0
    assert summary["first_eval_reward"] is not None and summary["final_eval_reward"] is not None
    assert (run_dir / "config.toml").read_text().count("max_staleness = %d" % max_staleness) == 1
    assert not engines_of(run_dir)


def test_reward_that_raises_or_hangs_is_counted_and_run_completes(tmp_path):
    proc = launch(tmp_path / "r", "--custom-rm-path", "tests.integration.bad_rewards:raises_or_hangs",
                  "--reward-timeout", "0.5")
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert summary["steps"] == 10
    assert summary["counters"]["reward_error"] >= 10 * 16
    assert summary["counters"]["reward_timeout"] >= 1


def test_ctrl_c_stops_cleanly_without_orphans(tmp_path):
    run_dir = tmp_path / "int"
    # SIGINT as a terminal delivers it, even if this test runs in a background job (which ignores it)
    proc = subprocess.Popen([sys.executable, "-m", "runtime.launch", "--run-dir", str(run_dir),
                             "--num-rollout", "100000", "--progress", "off"], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.default_int_handler))
    try:
        metrics = run_dir / "metrics.jsonl"
        deadline = time.monotonic() + 120
        while not (metrics.exists() and metrics.read_text().count("\n") >= 2):  # two steps taken
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()[-2000:]
            time.sleep(0.2)
        assert engines_of(run_dir)
        children = psutil.Process(proc.pid).children(recursive=True)  # engines and the trainer
        assert any("policies.trainer_process" in " ".join(c.cmdline()) for c in children)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 130
    finally:
        proc.kill()
    gone, alive = psutil.wait_procs(children, timeout=10)
    assert not alive, [p.cmdline() for p in alive]
    assert not engines_of(run_dir)
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "interrupted"


def test_actor_crash_is_reported_with_traceback_and_engines_stop(tmp_path):
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

    scheduler.a.learner.trainer.step = broken_step
    with pytest.raises(RunFailed) as e:
        asyncio.run(asyncio.wait_for(scheduler.run(), 120))
    text = str(e.value)
    assert "actor 'learner' crashed" in text and "ZeroDivisionError: learner bug" in text
    assert "Traceback" in text
    assert all(not p.alive for p in scheduler.a.engines.processes)
    assert os.path.exists(run_dir / "metrics.jsonl")


def test_a_hung_engine_trips_the_watchdog_with_a_dump_instead_of_hanging(tmp_path):
    """SIGSTOP the (real) engine after the first step: no step can follow, and the run must end
    with a clear error naming the dump, within the stall timeout, not hang."""
    import asyncio

    from runtime import cli
    from runtime.launch import build, prepare_run_dir
    from runtime.progress import Progress
    from runtime.scheduler import RunFailed

    # health checks off: with them on, the hung engine would be restarted (tests/integration/test_faults.py)
    cfg = cli.resolve(["--run-dir", str(tmp_path / "hang"), *SHORT, "--stall-timeout", "4",
                       "--health-check-interval", "0"])
    run_dir = prepare_run_dir(cfg)
    scheduler = build(cfg, run_dir, tmp_path / "w", Progress(total_steps=10, mode="off"))
    on_step = scheduler.a.learner.on_step

    def stop_engine_after_first_step(rec):
        on_step(rec)
        if rec.step == 1:
            os.kill(scheduler.a.engines.processes[0].pid, signal.SIGSTOP)

    scheduler.a.learner.on_step = stop_engine_after_first_step
    started = time.monotonic()
    with pytest.raises(RunFailed, match=r"no learner step for \d+s .*stall_dump\.txt"):
        asyncio.run(asyncio.wait_for(scheduler.run(), 90))
    assert time.monotonic() - started < 60
    dump = (run_dir / "stall_dump.txt").read_text()
    assert "learner: version" in dump and "waiting on buffer.get_batch" in dump
    assert scheduler.counters["watchdog_trips"] == 1
    assert all(not p.alive for p in scheduler.a.engines.processes)
