"""What the engine client sends: every EngineClient method run against a recording fake server
that answers as SGLang's handlers do (http_server.py). The SGLang checks (test_sglang_requests.py)
read the recorded routes, methods and bodies."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import msgspec
from aiohttp import web

from policies.engine.client import PAUSE_MODES, EngineClient

# What the runtime actually sends (runtime/launch.py sampling_params + the rollout's seed).
RUNTIME_SAMPLING = {
    "temperature": 1.0, "top_p": 1.0, "top_k": -1, "max_new_tokens": 8, "stop_token_ids": [2], "sampling_seed": 7,
}  # fmt: skip


GENERATE_ANSWER = {
    "text": "ab",
    "output_ids": [5, 6],
    "meta_info": {
        "id": "r1",
        "finish_reason": {"type": "stop", "matched": 2},
        "prompt_tokens": 3,
        "completion_tokens": 2,
        "cached_tokens": 0,
        "e2e_latency": 0.25,
        "weight_version": "3",
        "output_token_logprobs": [[-0.5, 5, None], [-1.5, 6, None]],
        "weight_versions": [{"version": "2", "start": 0, "end": 1}, {"version": "3", "start": 1, "end": 2}],
    },
}


ANSWERS: dict[str, Any] = {  # SGLang-shaped answers (http_server.py handlers); None = empty 200
    "/generate": GENERATE_ANSWER,
    "/model_info": {"model_path": "m", "weight_version": "3"},
    "/get_server_info": {"version": "0.5", "internal_states": [{}]},
    "/update_weights_from_disk": {"success": True, "message": "Succeeded", "num_paused_requests": 0},
    "/update_weight_version": {"success": True, "message": "updated", "new_version": "3"},
    "/pause_generation": {"message": "Generation paused successfully.", "status": "ok"},
    "/continue_generation": {"message": "Generation continued successfully.", "status": "ok"},
    "/flush_cache": "Cache flushed.\n",
    "/abort_request": None,
    "/health": None,
    "/health_generate": None,
    "/init_weights_update_group": {"success": True, "message": "Succeeded to initialize custom process group."},
    "/update_weights_from_distributed": {"success": True, "message": "Succeeded to update parameter online."},
    "/destroy_weights_update_group": {"success": True, "message": "Succeeded to destroy custom process group."},
    "/begin_weight_update": {"success": True, "message": "ok"},
    "/end_weight_update": {"success": True, "message": "ok"},
    "/update_weights_from_tensor": {"success": True, "message": "Success"},
    "/load_lora_adapter": {"success": True, "error_message": None, "loaded_adapters": {"policy-v3": "/dev/shm/a"}},
    "/unload_lora_adapter": {"success": True, "error_message": None, "loaded_adapters": {}},
    "/release_memory_occupation": None,  # SGLang's handler returns nothing: an empty 200
    "/resume_memory_occupation": None,
}


@dataclass(frozen=True)
class Sent:
    client_method: str
    method: str
    path: str
    body: Any  # decoded JSON, None when the request had no body


async def _exercise_generate(c: EngineClient) -> None:
    out = await c.generate([1, 2, 3], RUNTIME_SAMPLING, rid="r1")
    assert out.output_ids == [5, 6] and out.weight_version == "3"
    await c.generate([1, 2, 3], {"max_new_tokens": 4}, return_logprob=False)
    await c.generate([1, 2, 3], RUNTIME_SAMPLING, rid="r3", lora_path="policy-v3")  # a LoRA run's requests


async def _exercise_generate_batch(c: EngineClient) -> None:
    outs = await c.generate_batch([[1, 2, 3], [4, 5]], [RUNTIME_SAMPLING, {**RUNTIME_SAMPLING, "sampling_seed": 8}],
                                  rids=["r1", "r2"])
    assert [o.output_ids for o in outs] == [[5, 6], [5, 6]]
    outs = await c.generate_batch([[1, 2, 3]], {"max_new_tokens": 4, "n": 2}, return_logprob=False)
    assert len(outs) == 2
    await c.generate_batch([[1, 2, 3], [4, 5]], RUNTIME_SAMPLING, rids=["r1", "r2"], lora_path="policy-v3")


async def _exercise_pause(c: EngineClient) -> None:
    for mode in PAUSE_MODES:
        await c.pause(mode)


async def _exercise_update_weights_from_disk(c: EngineClient) -> None:
    await c.update_weights_from_disk("/dev/shm/w", weight_version="3", abort_all_requests=True)
    await c.update_weights_from_disk("/dev/shm/w", weight_version=None)


async def _exercise_collective(c: EngineClient) -> None:
    await c.init_weights_update_group(master_address="127.0.0.1", master_port=29500, rank_offset=1, world_size=2,
                                      group_name="g", backend="nccl")
    await c.update_weights_from_distributed(names=["w"], dtypes=["bfloat16"], shapes=[[2, 2]], group_name="g",
                                            weight_version="3")
    await c.update_weights_from_distributed(names=["w"], dtypes=["bfloat16"], shapes=[[2, 2]], group_name="g",
                                            weight_version=None, load_format=None)


async def _exercise_update_weights_from_tensor(c: EngineClient) -> None:
    await c.update_weights_from_tensor([b"\x80\x05payload"], weight_version="3")
    await c.update_weights_from_tensor([b"\x80\x05payload"], weight_version=None, load_format=None)


async def _exercise_memory(c: EngineClient) -> None:
    await c.release_memory_occupation(["kv_cache"])
    await c.release_memory_occupation()
    await c.resume_memory_occupation(["kv_cache", "weights"])


async def _assert_true(result: Awaitable[bool]) -> None:
    assert await result, "probe answered False: the fake server did not know the route"


# One entry per public coroutine method of EngineClient (test_every_client_method_is_exercised).
EXERCISES: dict[str, Callable[[EngineClient], Awaitable[Any]]] = {
    "generate": _exercise_generate,
    "generate_batch": _exercise_generate_batch,
    "abort": lambda c: c.abort("r1"),
    "abort_all": lambda c: c.abort_all(),
    "pause": _exercise_pause,
    "resume": lambda c: c.resume(),
    "health": lambda c: _assert_true(c.health()),
    "health_generate": lambda c: _assert_true(c.health_generate()),
    "get_weight_version": lambda c: c.get_weight_version(),
    "get_server_info": lambda c: c.get_server_info(),
    "flush_cache": lambda c: c.flush_cache(),
    "update_weights_from_disk": _exercise_update_weights_from_disk,
    "update_weight_version": lambda c: c.update_weight_version("3"),
    "init_weights_update_group": _exercise_collective,  # and update_weights_from_distributed
    "update_weights_from_distributed": _exercise_collective,
    "destroy_weights_update_group": lambda c: c.destroy_weights_update_group("g"),
    "begin_weight_update": lambda c: c.begin_weight_update(),
    "end_weight_update": lambda c: c.end_weight_update(),
    "update_weights_from_tensor": _exercise_update_weights_from_tensor,
    "release_memory_occupation": _exercise_memory,
    "resume_memory_occupation": _exercise_memory,
    "load_lora_adapter": lambda c: c.load_lora_adapter("policy-v3", "/dev/shm/a"),
    "unload_lora_adapter": lambda c: c.unload_lora_adapter("policy-v2"),
}


NOT_EXERCISED = {"close"}  # closes the session; sends nothing


def record_client_requests() -> list[Sent]:
    """Run every EngineClient method against a recording server; returns what was sent."""
    sent: list[Sent] = []
    current = [""]

    async def handler(request: web.Request) -> web.Response:
        raw = await request.read()
        body = msgspec.json.decode(raw) if raw else None
        sent.append(Sent(current[0], request.method, request.path, body))
        if request.path not in ANSWERS:
            return web.json_response({"detail": "Not Found"}, status=404)
        answer = ANSWERS[request.path]
        if request.path == "/generate" and isinstance(body["input_ids"][0], list):  # a batch: one answer per output
            params = body["sampling_params"]
            n = (params[0] if isinstance(params, list) else params).get("n", 1)
            answer = [answer] * (len(body["input_ids"]) * n)
        if answer is None:
            return web.Response(status=200)
        if isinstance(answer, str):
            return web.Response(text=answer)
        return web.json_response(answer)

    async def main() -> None:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", handler)
        runner = web.AppRunner(app, shutdown_timeout=0.1)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        try:
            url = f"http://127.0.0.1:{runner.addresses[0][1]}"
            async with EngineClient(url, timeout_s=10) as c:
                for name, exercise in EXERCISES.items():
                    current[0] = name
                    await exercise(c)
        finally:
            await runner.cleanup()

    asyncio.run(asyncio.wait_for(main(), 60))
    return sent
