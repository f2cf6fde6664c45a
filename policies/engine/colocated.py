"""The embedded engine's side of SGLang's same-GPU weight update and memory release.

    POST /update_weights_from_tensor   map the trainer's weights (a CUDA IPC handle, policies/weight_ipc.py)
                                       and copy them into the live weights
    POST /release_memory_occupation    {"tags": ["kv_cache", "weights"] | null}: pause, drop the KV
                                       cache, return the allocator's free blocks to the GPU
    POST /resume_memory_occupation     {"tags": ...}: nothing to reallocate (the cache regrows per step)

Bodies are SGLang's (io_struct.py: UpdateWeightsFromTensorReqInput, Release/ResumeMemoryOccupationReqInput);
a load answers ``{"success", "message"}``, 400 when refused. A load follows the collective path
(distributed.py): paused (or ``abort_all_requests``), the copy is a plain update; live, it is
swapped in between two decode steps (``Scheduler.swap_weights``) and the answer reports how long
decoding stopped (``paused_s``, ours). Either way the engine answers only once its GPU has finished
the copy: the trainer's buffer may be rewritten by the next sync as soon as every engine answered.
"""

from __future__ import annotations

import asyncio
import logging

import msgspec
import torch
from aiohttp import web

from policies import weight_ipc
from policies.engine.app_state import ENGINE_KEY
from policies.engine.wire import BadRequest, decode

log = logging.getLogger("engine.colocated")

LOAD_FORMATS = (None, weight_ipc.LOAD_FORMAT)
MEMORY_TAGS = ("kv_cache", "weights", "cuda_graph")  # SGLang's GPU_MEMORY_ALL_TYPES


class UpdateWeightsFromTensorReq(msgspec.Struct, kw_only=True):
    serialized_named_tensors: list[bytes]  # one payload per TP rank, base64 in JSON; we are rank 0
    load_format: str | None = None
    flush_cache: bool = True  # no prefix cache here: nothing to flush
    abort_all_requests: bool = False
    weight_version: str | None = None


class MemoryOccupationReq(msgspec.Struct, kw_only=True):
    tags: list[str] | None = None  # None or empty: every tag


def add_routes(app: web.Application) -> None:
    app.add_routes([
        web.post("/update_weights_from_tensor", update_from_tensor),
        web.route("*", "/release_memory_occupation", release_memory),  # SGLang takes GET and POST
        web.route("*", "/resume_memory_occupation", resume_memory),
    ])


def _answer(success: bool, message: str, **extra: object) -> web.Response:
    if not success:
        log.warning("update_weights_from_tensor refused: %s", message)
    body = msgspec.json.encode({"success": success, "message": message, **extra})
    return web.Response(body=body, status=200 if success else 400, content_type="application/json")


async def update_from_tensor(request: web.Request) -> web.Response:

    req = decode(await request.read(), UpdateWeightsFromTensorReq)
    scheduler = request.app[ENGINE_KEY].scheduler
    device = scheduler.runner.device
    if req.load_format not in LOAD_FORMATS:
        return _answer(False, f"unsupported load_format {req.load_format!r}")
    if not req.serialized_named_tensors:
        return _answer(False, "serialized_named_tensors is empty (one entry per TP rank)")
    try:
        # off the loop: mapping an IPC handle (cudaIpcOpenMemHandle) takes milliseconds
        named = await asyncio.to_thread(_open, req.serialized_named_tensors[0], req.load_format, device)
        pairs = scheduler.runner.pair_with_live(named)
    except Exception as exc:  # noqa: BLE001 - an unreadable or mismatched payload is the caller's error
        return _answer(False, f"{type(exc).__name__}: {exc}")
    if scheduler.paused or req.abort_all_requests:
        frozen = await scheduler.update_weights(pairs, version=req.weight_version, abort_all=req.abort_all_requests)
        held = None
    else:  # not paused: swap between two decode steps; requests go on under the new weights
        frozen, held = 0, await scheduler.swap_weights(pairs, version=req.weight_version)
    if device.type == "cuda":
        # the copy is queued on the decode thread's stream; the trainer may rewrite its buffer
        # once we answer, so answer only when the copy has run
        await asyncio.to_thread(torch.cuda.synchronize, device)
    del named, pairs  # unmaps the trainer's memory (the handle's mapping lives with its views)
    log.info("weights updated from tensor (version %s)", req.weight_version)
    extra = {} if held is None else {"paused_s": held}  # ours, as in distributed.py
    return _answer(True, "Succeeded to update model weights.", num_paused_requests=frozen, **extra)


def _open(data: bytes, load_format: str | None, device: torch.device) -> list[tuple[str, torch.Tensor]]:
    payload = weight_ipc.loads(data)
    if load_format == weight_ipc.LOAD_FORMAT:
        named = weight_ipc.named_tensors(payload)
    elif isinstance(payload, list) and all(isinstance(p, tuple) and len(p) == 2 for p in payload):
        named = payload  # SGLang's default format: the (name, tensor) pairs themselves
    else:
        raise ValueError("payload is not a list of (name, tensor) pairs")
    # a tensor from another device (a CPU payload to a GPU engine) is copied over, as SGLang does
    return [(name, t if t.device == device else t.to(device)) for name, t in named]


def _tags(req: MemoryOccupationReq) -> list[str]:
    tags = req.tags or list(MEMORY_TAGS)
    unknown = set(tags) - set(MEMORY_TAGS)
    if unknown:
        raise BadRequest(f"unknown memory tags {sorted(unknown)} (known: {', '.join(MEMORY_TAGS)})")
    return tags


async def release_memory(request: web.Request) -> web.Response:
    """SGLang releases only an idle engine; here a release makes it idle: a ``retract`` pause
    (requests stay queued, their KV cache dropped) until /continue_generation. The weights stay
    resident whatever the tags say: SGLang can offload them (torch_memory_saver), and at 0.6B
    (1.2 GB in bf16) the learner does not need that room."""

    tags = _tags(decode(await request.read(), MemoryOccupationReq))
    scheduler = request.app[ENGINE_KEY].scheduler
    if "kv_cache" in tags:
        await scheduler.pause("retract")  # drops the cache (ModelRunner.drop_cache) once no step runs
        # and frees its buffers and the decode graphs, on the decode thread like every runner call
        await scheduler.release_memory()
    else:
        await scheduler.pause("in_place")
    if scheduler.runner.device.type == "cuda":
        torch.cuda.empty_cache()  # the freed cache goes back to the GPU, for the learner to use
    log.info("memory released (%s); weights stay resident", ", ".join(tags))
    return web.json_response({"success": True, "message": f"released {', '.join(tags)}"})


async def resume_memory(request: web.Request) -> web.Response:
    """Nothing to bring back: the weights never left, the KV cache regrows at the next step.
    Generation resumes at /continue_generation, as on SGLang."""
    tags = _tags(decode(await request.read(), MemoryOccupationReq))
    return web.json_response({"success": True, "message": f"resumed {', '.join(tags)}"})
