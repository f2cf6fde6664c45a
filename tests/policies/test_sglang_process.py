"""SGLangProcess and the whole `--engine sglang` path, on a FAKE `sglang.launch_server`.

Real SGLang needs a GPU, so `tests/fakes/sglang` (put on PYTHONPATH here) stands in for it: it takes
SGLang's command line, logs it, and serves the embedded engine (tests/fakes/README.md). Everything
else is real: the subprocess, its process group, the port retry, the health wait, and HTTP through
the same client as the embedded engine. Waits are on events the engine reports, never sleeps.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from policies.engine import EngineClient, EngineStartError
from policies.engine import sglang_process as sp
from policies.engine.sglang_process import SGLangProcess, free_port, with_engine
from runtime.config import PlacementConfig
from runtime.local_hosts import LocalHosts
from runtime.placement import plan

pytestmark = pytest.mark.timeout(120)

ROOT = Path(__file__).resolve().parents[2]
FAKES = ROOT / "tests" / "fakes"
BANNER = "FAKE sglang.launch_server (tests/fakes, not SGLang)"
COMMON = dict(torch_threads=1, max_running_requests=16, weight_version="0", dtype="float32")


@pytest.fixture
def fake_sglang(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """`python -m sglang.launch_server` resolves to the fake in every child of this process."""
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(p for p in (str(FAKES), os.environ.get("PYTHONPATH")) if p))
    monkeypatch.delenv("FAKE_SGLANG_FAIL", raising=False)
    return monkeypatch


def start_error(proc: SGLangProcess, timeout_s: float) -> str:
    proc.start()
    try:
        with pytest.raises(EngineStartError) as err:
            asyncio.run(proc.wait_ready(timeout_s))
    finally:
        asyncio.run(proc.stop(grace_s=2))
    return str(err.value)


def assert_group_gone(proc: SGLangProcess) -> None:
    assert not proc.alive and not psutil.pid_exists(proc.pid)
    assert not [p for p in psutil.process_iter() if _pgid(p.pid) == proc.pid], "a child of the server outlived it"


def _pgid(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except ProcessLookupError:
        return None


def test_launch_command_carries_the_runtime_and_passthrough_flags(fake_sglang, tmp_path):
    fake_sglang.setenv("FAKE_SGLANG_FAIL", "exit")
    passthrough = {"mem-fraction-static": "0.8", "enable-metrics": True, "chunked-prefill-size": 512}
    factory = with_engine(None, engine="sglang", host="127.0.0.1", passthrough=passthrough)
    proc = factory(0, "/models/m", log_path=tmp_path / "engine0.log", **{**COMMON, "weight_version": "7"})
    start_error(proc, 30)
    port = proc.url.rsplit(":", 1)[1]
    assert proc.command == [
        sys.executable, "-m", "sglang.launch_server", "--model-path", "/models/m", "--host", "127.0.0.1",
        "--port", port, "--tp-size", "1", "--device", "cpu", "--dtype", "float32", "--max-running-requests", "16",
        "--weight-version", "7", "--mem-fraction-static", "0.8", "--enable-metrics", "--chunked-prefill-size", "512",
    ]  # fmt: skip
    assert f"argv: {' '.join(proc.command[3:])}" in proc.log_tail()  # what the server process received


def test_gpu_placement_sets_visible_devices_and_tp_size(fake_sglang, tmp_path):
    """The local backend's GPU layout (learner GPU 0, an engine on GPUs 1 and 2), on a host said to
    have 4: the engine sees only its GPUs and shards over both."""
    fake_sglang.setenv("FAKE_SGLANG_FAIL", "exit")
    p = PlacementConfig(actor_num_gpus_per_node=1, rollout_num_gpus=2, rollout_num_gpus_per_engine=2)
    hosts = LocalHosts(plan(p, num_engines=1, learner_threads=1, engine_threads=1), p, have=4)
    proc = with_engine(hosts.engine, engine="sglang")(0, "/m", log_path=tmp_path / "e.log", **COMMON)
    start_error(proc, 30)
    assert proc.command[proc.command.index("--tp-size") + 1] == "2"
    assert proc.command[proc.command.index("--device") + 1] == "cuda"
    assert "CUDA_VISIBLE_DEVICES=1,2," in proc.log_tail()


def test_exit_at_start_is_a_start_error_with_the_log_tail(fake_sglang, tmp_path):
    fake_sglang.setenv("FAKE_SGLANG_FAIL", "exit")
    proc = SGLangProcess("/m", log_path=tmp_path / "e.log", **COMMON)
    message = start_error(proc, 30)
    assert "exited with code 1 before it was ready" in message
    assert "simulated start failure (FAKE_SGLANG_FAIL=exit)" in message and BANNER in message
    assert_group_gone(proc)


def test_never_healthy_is_a_timeout_and_stop_leaves_nothing(fake_sglang, tmp_path):
    fake_sglang.setenv("FAKE_SGLANG_FAIL", "unhealthy")  # listens, answers 503 (SGLang while loading)
    proc = SGLangProcess("/m", log_path=tmp_path / "e.log", **COMMON)
    message = start_error(proc, 1.5)
    assert "was not ready after 1.5s" in message and BANNER in message
    assert_group_gone(proc)


def test_a_fixed_port_that_is_taken_is_not_retried(fake_sglang, tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        port = busy.getsockname()[1]
        proc = SGLangProcess("/m", log_path=tmp_path / "e.log", port=port, **COMMON)
        message = start_error(proc, 30)
    assert "exited with code 1" in message and "address already in use" in message


def test_serves_the_protocol_after_a_port_retry(fake_sglang, tmp_path, tiny_model_dir, tiny_model_dir_b, kit,
                                                 monkeypatch):
    """A port taken between the check and the bind is retried on another; then the server speaks
    the protocol through the client: generate (one and batched), abort one request, pause
    (abort) with requests in flight, load new weights with their version, continue."""
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        ports = iter([busy.getsockname()[1], free_port()])
        monkeypatch.setattr(sp, "free_port", lambda host="127.0.0.1": next(ports))
        proc = SGLangProcess(tiny_model_dir, log_path=tmp_path / "e.log", **COMMON)
        proc.start()
        try:
            url = asyncio.run(proc.wait_ready(60))
            log = proc.log_path.read_text()
            assert log.count("asyncrl: starting") == 2 and "address already in use" in log
            kit.run_with_client(url, lambda c: _protocol(c, kit, tiny_model_dir_b), timeout_s=60)
        finally:
            asyncio.run(proc.stop())
    assert proc.returncode == 0  # SIGTERM: the server aborted its requests and exited cleanly
    assert_group_gone(proc)


async def _protocol(c: EngineClient, kit, new_weights: Path) -> None:  # noqa: ANN001
    params = {"temperature": 1.0, "max_new_tokens": 4, "sampling_seed": 1}
    out = await c.generate([1, 2, 3], params, rid="one")
    assert out.finish_reason in ("stop", "length") and out.weight_version == "0"
    assert len(out.logprobs) == len(out.output_ids) and out.token_versions == ["0"] * len(out.output_ids)
    outs = await c.generate_batch([[1, 2], [3, 4, 5]], [params, {**params, "sampling_seed": 2}], rids=["b0", "b1"])
    assert len(outs) == 2
    long = {"temperature": 1.0, "max_new_tokens": 55, "ignore_eos": True}
    steps0 = (await kit.stats(c))["decode_steps"]
    victim = asyncio.create_task(c.generate([1, 2], long, rid="victim"))
    others = [asyncio.create_task(c.generate([4, 4, i], long, rid=f"o{i}")) for i in range(2)]
    await kit.wait_until(c, lambda s: s["num_running_reqs"] == 3 and s["decode_steps"] > steps0 + 1)
    await c.abort("victim")  # routers do not forward this: it goes to the engine itself
    assert (await victim).finish_reason == "abort"
    await c.pause("abort")  # the runtime's mode for SGLang: in-flight requests end with their tokens
    assert {o.finish_reason for o in await asyncio.gather(*others)} == {"abort"}
    result = await c.update_weights_from_disk(str(new_weights), weight_version="1")
    assert result.success and await c.get_weight_version() == "1"
    await c.resume()
    after = await c.generate([1, 2, 3], params)
    assert after.weight_version == "1" and set(after.token_versions) == {"1"}


def test_a_launch_run_with_engine_sglang(fake_sglang, tmp_path):
    """`python -m runtime.launch --engine sglang` with passthrough flags: the engine is started
    through SGLang's command line, and the run syncs weights (pause abort, load, continue) and
    trains to the end; nothing of it is left running."""
    run_dir = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "runtime.launch", "--run-dir", str(run_dir), "--engine", "sglang",
         "--sglang-mem-fraction-static", "0.8", "--sglang-enable-metrics", "--num-rollout", "3", "--max-staleness", "1",
         "--eval-interval", "0", "--eval-num-prompts", "20", "--progress", "lines"],
        cwd=ROOT, capture_output=True, text=True, timeout=110)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["steps"] == 3
    assert summary["weight_sync"]["count"] == 3 and summary["weight_sync"]["transport"] == "shm"
    config = (run_dir / "config.toml").read_text()
    assert 'engine = "sglang"' in config and 'partial_rollout_mode = "recompute"' in config
    log = (run_dir / "logs" / "engine0.log").read_text()
    assert BANNER in log and "--weight-version 0 --mem-fraction-static 0.8 --enable-metrics" in log
    assert "(version 3)" in log  # the last weights it loaded
    leftovers = [p for p in psutil.process_iter(["cmdline"])
                 if "sglang.launch_server" in " ".join(p.info["cmdline"] or []) and str(run_dir) in
                 " ".join(p.info["cmdline"] or [])]
    assert not leftovers
