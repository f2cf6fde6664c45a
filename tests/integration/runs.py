"""Whole runs of ``python -m runtime.launch`` on either backend, for the integration tests.

A test that takes the ``backend`` fixture (tests/integration/conftest.py) runs once per backend:
``local`` (engines and the trainer are subprocesses of the launcher) and ``ray`` (the same loop
in Ray actors, on the one cluster the test session starts; the launcher connects with
``--ray-address``). ``LOCAL_AND_SLOW_RAY`` puts a test's Ray variant among the slow tests (``-m slow``).
"""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest

ROOT = Path(__file__).resolve().parents[2]
SHORT = ["--num-rollout", "10", "--eval-interval", "5", "--eval-num-prompts", "50", "--progress", "lines"]
STEP_KEYS = {"step", "version", "time_s", "reward/mean", "staleness/max", "staleness/mean", "learner/wait_frac",
             "generator/wait_frac", "buffer/groups", "throughput/tokens_per_s", "ledger/admitted", "train/lr"}
GROUPS_PER_STEP = 16  # default recipe: global batch 128 / 8 samples per prompt
CLUSTER_CPUS = 4  # of the session's Ray cluster: the largest layout placed is a trainer and two engines
RELEASE_S = 30.0  # a finished run's actors and placement group are gone from the cluster within this long

# ``@pytest.mark.parametrize("backend", LOCAL_AND_SLOW_RAY, indirect=True)``: the Ray variant of a
# long test runs with -m slow only (the default suite must stay under 10 minutes on 2 cores)
LOCAL_AND_SLOW_RAY = ["local", pytest.param("ray", marks=pytest.mark.slow, id="ray")]


@dataclasses.dataclass(frozen=True)
class Backend:
    name: str  # "local" or "ray"
    ray_address: str = ""  # the session cluster's GCS address, on ray

    @property
    def flags(self) -> list[str]:
        """What the launcher is given to run on this backend."""
        return ["--backend", "ray", "--ray-address", self.ray_address] if self.name == "ray" else []


def command(run_dir: Path, backend: Backend, *flags: str) -> list[str]:
    return [sys.executable, "-m", "runtime.launch", *backend.flags, "--run-dir", str(run_dir), *SHORT, *flags]


def launch(run_dir: Path, backend: Backend, *flags: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    """A short run (``SHORT``, then ``flags``) to its end."""
    return subprocess.run(command(run_dir, backend, *flags), cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


def start(run_dir: Path, backend: Backend, *flags: str, **popen: object) -> subprocess.Popen[str]:
    """The same run in the background (``communicate`` to wait)."""
    return subprocess.Popen(command(run_dir, backend, *flags), cwd=ROOT, text=True,
                            **{"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, **popen})


def wait_for_steps(proc: subprocess.Popen[str], run_dir: Path, steps: int, timeout: float = 120) -> None:
    """Until ``steps`` learner steps are in metrics.jsonl; fails with the run's stderr if it ends first."""
    metrics, deadline = run_dir / "metrics.jsonl", time.monotonic() + timeout
    while not (metrics.exists() and metrics.read_text().count("\n") >= steps):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            err = proc.communicate()[1] or ""
            raise AssertionError(f"no {steps} steps (exit {proc.returncode}):\n{err[-3000:]}")
        time.sleep(0.2)


def engines_of(run_dir: Path) -> list[psutil.Process]:
    """Live engine server processes started for ``run_dir`` (their model path is inside it), on
    either backend: on Ray they are children of engine-host actors, on this machine all the same."""
    found = []
    for p in psutil.process_iter(["cmdline"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if "policies.engine.server" in cmd and str(run_dir) in cmd:
            found.append(p)
    return found


def assert_ray_released() -> None:
    """The session's cluster is as the runs found it: every run's actors (all named
    ``<run-dir>:<role>``) and placement group ended with it, however it ended (after a killed
    launcher, within ``RELEASE_S``), or the next run waits on resources nobody frees."""
    import ray

    deadline = time.monotonic() + RELEASE_S
    while True:
        actors, free = ray.util.list_named_actors(), ray.available_resources()
        if not actors and free.get("CPU", 0) >= CLUSTER_CPUS:
            return
        assert time.monotonic() < deadline, f"a run left behind actors {actors} or resources (free: {free})"
        time.sleep(0.2)


def wait_for_checkpoint(proc: subprocess.Popen[str]) -> None:
    """Read ``proc``'s stderr until its first "checkpoint at step" line; fails if it ends first."""
    assert proc.stderr is not None
    seen = []
    for line in proc.stderr:
        seen.append(line)
        if line.startswith("checkpoint at step"):
            return
    raise AssertionError(f"the run ended without a checkpoint (exit {proc.wait()}):\n{''.join(seen[-30:])}")


def kill_run(proc: subprocess.Popen[str], run_dir: Path, before: Callable[[], None] = lambda: None) -> None:
    """SIGKILL a run started with ``start_new_session=True``, its whole process group at once (a crash:
    no handler runs), after ``before()`` (e.g. waiting for a checkpoint); then wait until its engines
    are gone."""
    try:
        before()
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    psutil.wait_procs(engines_of(run_dir), timeout=30)  # they die with their parent, or their host actor
    assert not engines_of(run_dir)
