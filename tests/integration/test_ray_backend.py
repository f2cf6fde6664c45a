"""``--backend ray`` only: Ray actors killed mid-run, GPU layouts, and the start-up failures that
must end in one line within seconds. The core loop's tests run on Ray as well as locally
(test_launch.py, test_faults.py); every run here is a real ``python -m runtime.launch --backend ray
--ray-address ...`` on the session's cluster (tests/integration/conftest.py), so killing an actor by
name from this process is what an operator would do.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

ray = pytest.importorskip("ray", reason="the Ray backend needs ray: pip install -e '.[ray]'")

from runtime import backend_ray  # noqa: E402
from tests.integration.runs import ROOT, Backend, engines_of, start, wait_for_steps  # noqa: E402


def kill_actor_after_steps(proc: subprocess.Popen[str], run_dir: Path, name: str, steps: int) -> None:
    """``ray.kill`` the run's actor ``name`` once ``steps`` learner steps are in metrics.jsonl."""
    wait_for_steps(proc, run_dir, steps)
    ray.kill(ray.get_actor(f"{run_dir}:{name}", namespace=backend_ray.NAMESPACE), no_restart=True)


def assert_ledger_balanced(summary: dict) -> None:
    ledger = summary["ledger"]
    assert ledger["admitted"] == ledger["trained"] + sum(ledger["dropped"].values()) + ledger["in_flight"]
    assert ledger["duplicates"] == 0


@pytest.mark.slow  # ~32 s; engine restarts run in the default suite on local (tests/integration/test_faults.py)
def test_a_killed_engine_host_is_restarted_and_the_run_completes(ray_backend: Backend, tmp_path):
    run_dir = tmp_path / "engine-kill"
    proc = start(run_dir, ray_backend)
    try:
        kill_actor_after_steps(proc, run_dir, "engine0.0", steps=2)
        _, err = proc.communicate(timeout=240)
    finally:
        proc.kill()
    assert proc.returncode == 0, err[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 10 and summary["counters"]["engine_restarts"] >= 1
    assert summary["engine_restarts"][0]["refit_version"] is not None
    assert_ledger_balanced(summary)
    assert summary["staleness_max_observed"] <= 1
    assert not engines_of(run_dir)


@pytest.mark.slow  # ~24 s; a killed trainer ends a local run in one line in the default suite (test_bad_inputs.py)
def test_a_killed_trainer_actor_ends_the_run_with_one_line(ray_backend: Backend, tmp_path):
    run_dir = tmp_path / "trainer-kill"
    proc = start(run_dir, ray_backend, "--num-rollout", "1000")
    try:
        kill_actor_after_steps(proc, run_dir, "trainer", steps=1)
        killed_at = time.monotonic()
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 1, err[-3000:]
    assert time.monotonic() - killed_at < 45
    last = err.strip().splitlines()[-1]
    assert last.startswith("run failed: the trainer actor died"), err[-3000:]
    assert "Traceback" not in err
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "failed" and "trainer actor died" in summary["error"]
    assert not engines_of(run_dir)


def has_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


@pytest.mark.skipif(not has_gpu(), reason="needs a GPU (run it on a lent GPU machine): engine 0 is placed on it")
@pytest.mark.parametrize("flags", [["--rollout-num-gpus", "1"], ["--actor-num-gpus-per-node", "1", "--colocate"]],
                         ids=["disaggregated", "colocated"])
def test_a_gpu_layout_puts_the_engine_on_a_gpu(ray_backend: Backend, tmp_path, flags):
    run_dir = tmp_path / "gpu"
    proc = start(run_dir, ray_backend, *flags)
    port_file, deadline, info = run_dir / "logs" / "engine0.log.port", time.monotonic() + 120, None
    try:
        while info is None:  # the engine's own account of where it runs, asked while it serves
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-3000:]
            try:
                url = f"http://127.0.0.1:{int(port_file.read_text())}/get_server_info"
                info = json.loads(urllib.request.urlopen(url, timeout=5).read())
            except (OSError, ValueError):
                time.sleep(0.2)
        _, err = proc.communicate(timeout=240)
    finally:
        proc.kill()
    assert proc.returncode == 0, err[-3000:]
    assert info["device"] == "cuda"
    assert_ledger_balanced(json.loads((run_dir / "summary.json").read_text()))


FAST_S = 30  # Python start-up and imports, then at most 3 s of probing; a hang would be a minute or more


def fail_fast(run_dir: Path, *flags: str) -> tuple[str, float]:
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "runtime.launch", "--backend", "ray", "--run-dir", str(run_dir),
                           *flags], cwd=ROOT, capture_output=True, text=True, timeout=90)
    elapsed = time.monotonic() - t0
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1 and len(lines) == 2, proc.stderr[-3000:]  # "run directory: ..." and the error
    return lines[1], elapsed


def test_an_unreachable_ray_address_fails_fast_in_one_line(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed once the block ends: nothing listens there
    line, elapsed = fail_fast(tmp_path / "unreachable", "--ray-address", f"127.0.0.1:{port}")
    assert line.startswith(f"run failed: --ray-address 127.0.0.1:{port}: no Ray cluster reachable"), line
    assert elapsed < FAST_S


def test_a_placement_the_cluster_cannot_hold_fails_fast_saying_what_was_asked(ray_backend: Backend, tmp_path):
    have = int(ray.cluster_resources().get("GPU", 0))  # 0 here: one engine GPU more than there are
    cpus = int(ray.cluster_resources()["CPU"])
    n = str(have + 1)
    line, elapsed = fail_fast(tmp_path / "gpu", "--ray-address", ray_backend.ray_address, "--rollout-num-gpus", n,
                              "--rollout-num-engines", n)
    assert line.startswith("run failed: placement: the disaggregated layout (learner 1 CPU + 0 GPU, "), line
    assert f"needs {have + 2} CPU + {have + 1} GPU in all; the cluster has {cpus} CPU + {have} GPU" in line, line
    assert elapsed < FAST_S


def test_the_ray_temp_dir_is_under_the_run_dir_or_linked_from_it(tmp_path):
    short = Path(tempfile.mkdtemp(prefix="r", dir="/tmp"))
    try:
        assert backend_ray.temp_dir(short) == short / "ray"
    finally:
        shutil.rmtree(short)
    long = tmp_path / ("x" * 60)
    long.mkdir()
    temp = backend_ray.temp_dir(long)
    try:
        assert len(str(temp)) <= backend_ray.MAX_TEMP_DIR and (long / "ray").resolve() == temp.resolve()
    finally:
        shutil.rmtree(temp)
