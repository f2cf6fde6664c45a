"""EngineClient against fake servers (failures, SGLang-shaped bodies) and EngineProcess lifecycle.

Fake servers run in the test's own event loop; the process tests use real subprocesses and
check with psutil that nothing is left behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator

import psutil
import pytest
from aiohttp import web

from policies.engine import EngineClient, EngineError, EngineProcess, EngineStartError
from policies.engine.process import PROJECT_ROOT

pytestmark = pytest.mark.timeout(60)

SGLANG_RESPONSE = {
    "text": "ab",
    "output_ids": [5, 6],
    "meta_info": {
        "id": "r1",
        "finish_reason": {"type": "stop", "matched": "</s>"},
        "prompt_tokens": 3,
        "completion_tokens": 2,
        "cached_tokens": 0,
        "e2e_latency": 0.25,
        "weight_version": "4",
        "output_token_logprobs": [[-0.5, 5, None], [-1.5, 6, None]],
        "spec_verify_ct": 0,
        "completion_tokens_wo_jump_forward": 2,
    },
}


@contextlib.asynccontextmanager
async def fake_engine(handler) -> AsyncIterator[str]:  # noqa: ANN001
    """Serve `handler` for every route on a free 127.0.0.1 port; yields the base url."""
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handler)
    runner = web.AppRunner(app, handler_cancellation=True, shutdown_timeout=0.1)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_decodes_an_sglang_response_and_sends_only_sglang_fields():
    seen: list[dict] = []

    async def handler(request: web.Request) -> web.Response:
        seen.append(await request.json())
        return web.json_response(SGLANG_RESPONSE)

    async def main() -> None:
        async with fake_engine(handler) as url, EngineClient(url) as c:
            out = await c.generate([1, 2, 3], {"temperature": 0.5, "max_new_tokens": 2}, rid="r1")
            with pytest.raises(ValueError, match="does not accept"):
                await c.generate([1], {"temprature": 1.0})
        assert out.output_ids == [5, 6] and out.logprobs == [-0.5, -1.5]
        assert (out.finish_reason, out.weight_version, out.completion_tokens) == ("stop", "4", 2)
        assert seen == [
            {
                "input_ids": [1, 2, 3],
                "sampling_params": {"temperature": 0.5, "max_new_tokens": 2},
                "return_logprob": True,
                "rid": "r1",
            }
        ]

    asyncio.run(main())


def test_generate_batch_sends_sglang_batch_form_and_checks_the_answer():
    seen: list[dict] = []
    outputs = [3]  # how many answers the fake sends

    async def handler(request: web.Request) -> web.Response:
        seen.append(await request.json())
        return web.json_response([SGLANG_RESPONSE] * outputs[0])

    async def main() -> None:
        async with fake_engine(handler) as url, EngineClient(url, timeout_s=2) as c:
            params = [{"max_new_tokens": 2, "sampling_seed": s} for s in range(3)]
            outs = await c.generate_batch([[1], [2, 3], [4]], params, rids=["a", "b", "c"])
            assert [o.output_ids for o in outs] == [[5, 6]] * 3 and outs[1].logprobs == [-0.5, -1.5]
            outputs[0] = 4
            assert len(await c.generate_batch([[1], [2]], {"max_new_tokens": 2, "n": 2}, return_logprob=False)) == 4
            with pytest.raises(EngineError, match="4 outputs for 1 prompts x n=1") as info:
                await c.generate_batch([[1]], {"max_new_tokens": 2})
            assert info.value.route == "/generate"
            for bad, match in [
                (([], {}), "at least one prompt"),
                (([[1], [2]], [{}]), "1 sampling_params for 2 prompts"),
                (([[1], [2]], [{"n": 2}, {}]), "one value"),
                (([[1]], {"temprature": 1.0}), "does not accept"),
            ]:
                with pytest.raises(ValueError, match=match):
                    await c.generate_batch(*bad)
            with pytest.raises(ValueError, match="1 rids for 2 prompts"):
                await c.generate_batch([[1], [2]], {}, rids=["a"])
        assert seen[0] == {
            "input_ids": [[1], [2, 3], [4]],
            "sampling_params": params,
            "return_logprob": True,
            "rid": ["a", "b", "c"],
        }
        assert seen[1]["sampling_params"] == {"max_new_tokens": 2, "n": 2} and "rid" not in seen[1]
        assert len(seen) == 3  # the refused calls sent nothing

    asyncio.run(main())


def test_dead_port_raises_engine_error_and_probes_say_false():
    async def main() -> None:
        async with EngineClient(f"http://127.0.0.1:{free_port()}", timeout_s=2) as c:
            with pytest.raises(EngineError, match="connection failed") as info:
                await c.generate([1], {"max_new_tokens": 1})
            assert info.value.route == "/generate" and info.value.status is None
            assert not await c.health()
            with pytest.raises(EngineError):
                await c.pause()

    asyncio.run(main())


def test_a_hanging_engine_times_out_within_the_timeout():
    release = asyncio.Event()

    async def hang(request: web.Request) -> web.Response:
        await release.wait()
        return web.json_response({})

    async def main() -> None:
        async with fake_engine(hang) as url, EngineClient(url, timeout_s=0.3) as c:
            start = time.perf_counter()
            with pytest.raises(EngineError, match=r"timed out after 0.3s"):
                await c.generate([1], {"max_new_tokens": 1})
            with pytest.raises(EngineError, match=r"timed out after 0.1s"):
                await c.generate([1], {}, timeout_s=0.1)
            with pytest.raises(EngineError, match=r"timed out after 0.1s"):
                await c.generate_batch([[1], [2]], {}, timeout_s=0.1)
            assert not await c.health_generate(timeout_s=0.1)
            assert time.perf_counter() - start < 2.0
            release.set()

    asyncio.run(main())


@pytest.mark.parametrize(
    ("status", "body", "reason"),
    [
        (500, b'{"error": "boom"}', "HTTP 500: boom"),
        (400, b'{"success": false, "message": "bad shape"}', "HTTP 400: bad shape"),
        (200, b"not json", "undecodable"),
        (200, b'{"output_ids": [1]}', "undecodable"),
        (200, b'{"output_ids": [1], "meta_info": {"output_token_logprobs": []}}', "no finish_reason"),
    ],
)
def test_bad_answers_raise_engine_error(status, body, reason):
    async def handler(request: web.Request) -> web.Response:
        return web.Response(status=status, body=body, content_type="application/json")

    async def main() -> None:
        async with fake_engine(handler) as url, EngineClient(url, timeout_s=2) as c:
            with pytest.raises(EngineError, match=reason):
                await c.generate([1], {"max_new_tokens": 1})

    asyncio.run(main())


def _engine_pids(root: psutil.Process) -> list[int]:
    return [p.pid for p in root.children(recursive=True) if "policies.engine.server" in " ".join(_cmdline(p))]


def _cmdline(proc: psutil.Process) -> list[str]:
    with contextlib.suppress(psutil.Error):
        return proc.cmdline()
    return []


def test_process_lifecycle_leaves_nothing_behind(tiny_model_dir, tmp_path, kit):
    proc = EngineProcess(tiny_model_dir, log_path=tmp_path / "engine.log", torch_threads=1)

    async def main() -> None:
        proc.start()
        try:
            url = await proc.wait_ready(timeout_s=60)
            assert proc.alive and url == proc.url and url.startswith("http://127.0.0.1:")
            async with EngineClient(url) as c:
                out = await c.generate([1, 2], {"temperature": 0, "max_new_tokens": 3})
                assert out.completion_tokens == 3 and out.weight_version == "0"
                # SIGTERM aborts what is in flight: the caller gets its partial output
                steps0 = (await kit.stats(c))["decode_steps"]
                long = asyncio.create_task(c.generate([1, 2], {"max_new_tokens": 60, "ignore_eos": True}))
                await kit.wait_until(c, lambda s: s["decode_steps"] > steps0)
                await proc.stop(grace_s=5)
                out = await long
                assert out.finish_reason == "abort" and 0 < out.completion_tokens < 60
        finally:
            await proc.stop(grace_s=5)
        await proc.stop()  # idempotent
        proc.kill()

    asyncio.run(main())
    assert not proc.alive and not psutil.pid_exists(proc.pid)
    assert _engine_pids(psutil.Process()) == []
    assert "serving" in (tmp_path / "engine.log").read_text()


def test_wait_ready_fails_clearly_on_a_bogus_model_path(tmp_path):
    proc = EngineProcess(tmp_path / "no-such-model", log_path=tmp_path / "engine.log")

    async def main() -> None:
        proc.start()
        try:
            with pytest.raises(EngineStartError, match="exited with code 1 before it was ready") as info:
                await proc.wait_ready(timeout_s=60)
        finally:
            await proc.stop()
        assert "no-such-model has no config.json" in str(info.value)  # the log tail

    asyncio.run(main())
    assert not psutil.pid_exists(proc.pid)


PARENT_SCRIPT = """
import sys, time
from policies.engine import EngineProcess
p = EngineProcess(sys.argv[1], log_path=sys.argv[2])
p.start()
print(p.pid, flush=True)
time.sleep(60)
"""


def test_engine_dies_with_its_parent(tiny_model_dir, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT)}
    parent = subprocess.Popen(
        [sys.executable, "-c", PARENT_SCRIPT, str(tiny_model_dir), str(tmp_path / "engine.log")],
        stdout=subprocess.PIPE,
        env=env,
    )
    engine_pid = None
    try:
        engine_pid = int(parent.stdout.readline())
        assert psutil.pid_exists(engine_pid)
        parent.send_signal(signal.SIGKILL)
        parent.wait(timeout=10)
        deadline = time.monotonic() + 10
        while _running(engine_pid):
            assert time.monotonic() < deadline, "engine outlived its parent"
            time.sleep(0.02)  # polling another process with a deadline
    finally:
        parent.kill()
        parent.wait()
        if engine_pid is not None and _running(engine_pid):
            os.kill(engine_pid, signal.SIGKILL)


def _running(pid: int) -> bool:
    """True while pid exists and is not a zombie (an orphan is reaped by init, not by us)."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
