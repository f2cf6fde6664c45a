"""The embedded engine's side of SGLang's collective weight update (see policies/weight_sync.py).

    POST /init_weights_update_group      join the learner's group as rank ``rank_offset``
    POST /update_weights_from_distributed receive one bucket (or one tensor per name), then copy it
                                          into the live weights between decode steps
    POST /destroy_weights_update_group   leave it
    POST /begin_weight_update, /end_weight_update   SGLang's session around a load (no-ops here)

Bodies and answers are SGLang's (``{"success": ..., "message": ...}``, 400 when refused). The
receive runs on a thread and CUDA stream of its own. Paused (an ``abort`` or ``retract`` sync),
the copy into the model is a plain update. Not paused, decoding goes on while the bytes arrive and
the copy happens between two decode steps (``Scheduler.swap_weights``): running requests continue
under the new weights with every token dated, as after an ``in_place`` pause, but generation
stops only for the copy, whose seconds the answer reports (``paused_s``, our addition). A bucket
therefore must hold the whole model for a pause-less sync (``--weight-bucket-mb``), or tokens
between two buckets would come from a mix of versions: the driver pauses when it has several.
A bucket that does not match the model is still received in full before it is refused: the
sender's collective must complete, or it would hang.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from typing import Any

import msgspec
import torch
from aiohttp import web

from policies import weight_sync
from policies.engine.app_state import ENGINE_KEY
from policies.engine.wire import decode

log = logging.getLogger("engine.distributed")

GROUP_TIMEOUT_S = 600.0  # one collective's bound; the driver bounds each sync more tightly
LOAD_FORMATS = (None, "flattened_bucket")


class InitWeightsUpdateGroupReq(msgspec.Struct, kw_only=True):
    master_address: str
    master_port: int
    rank_offset: int
    world_size: int
    group_name: str = "weight_update_group"
    backend: str = "nccl"


class UpdateWeightsFromDistributedReq(msgspec.Struct, kw_only=True):
    names: list[str]
    dtypes: list[str]
    shapes: list[list[int]]
    group_name: str = "weight_update_group"
    flush_cache: bool = True
    abort_all_requests: bool = False
    weight_version: str | None = None
    load_format: str | None = None


class DestroyWeightsUpdateGroupReq(msgspec.Struct, kw_only=True):
    group_name: str = "weight_update_group"


class Groups:
    """The engine's weight-update groups by name. One collective at a time per engine (a lock):
    buckets must be received in the order they are sent."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.groups: dict[str, torch.distributed.ProcessGroup] = {}
        self.lock = asyncio.Lock()
        # one receive stream for the engine's life: the caching allocator keeps a freed bucket for
        # its stream, so the next sync reuses it instead of a cudaMalloc (which stalls decoding)
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None

    def on_device(self, fn: Any, *args: Any) -> Any:
        """Run ``fn`` on this thread with the engine's CUDA device current (NCCL binds to it)."""
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device.index or 0)
        return fn(*args)


GROUPS_KEY = web.AppKey("weight_groups", Groups)


def add_routes(app: web.Application, device: torch.device) -> None:
    app[GROUPS_KEY] = Groups(device)
    app.add_routes([
        web.post("/init_weights_update_group", init_group),
        web.post("/update_weights_from_distributed", update_from_distributed),
        web.post("/destroy_weights_update_group", destroy_group),
        # SGLang's session around a collective load (it unpacks in-place-quantized weights); the
        # embedded engine loads plain tensors, so both ends are accepted and do nothing
        web.post("/begin_weight_update", _session),
        web.post("/end_weight_update", _session),
    ])


def _answer(success: bool, message: str) -> web.Response:
    if not success:
        log.warning("weight update group: %s", message)
    body = msgspec.json.encode({"success": success, "message": message})
    return web.Response(body=body, status=200 if success else 400, content_type="application/json")


async def _session(request: web.Request) -> web.Response:
    return _answer(True, "Succeeded.")


async def init_group(request: web.Request) -> web.Response:
    req = decode(await request.read(), InitWeightsUpdateGroupReq)
    groups = request.app[GROUPS_KEY]
    if req.backend == "nccl" and groups.device.type != "cuda":
        return _answer(False, f"backend nccl needs a CUDA engine; this one runs on {groups.device}")
    if not 0 < req.rank_offset < req.world_size:
        return _answer(False, f"rank_offset {req.rank_offset} is not an engine rank of world_size {req.world_size}")
    async with groups.lock:
        if req.group_name in groups.groups:
            return _answer(False, f"group {req.group_name!r} exists; destroy it first")
        try:
            pg = await _in_thread(groups.on_device, lambda: weight_sync.new_group(
                backend=req.backend, master_address=req.master_address, master_port=req.master_port,
                rank=req.rank_offset, world_size=req.world_size, group_name=req.group_name,
                timeout_s=GROUP_TIMEOUT_S))
        except Exception as exc:  # noqa: BLE001 - a rendezvous that failed is the caller's to see
            return _answer(False, f"joining {req.group_name!r} failed: {type(exc).__name__}: {exc}")
        groups.groups[req.group_name] = pg
    log.info("joined weight update group %r as rank %d of %d (%s)", req.group_name, req.rank_offset,
             req.world_size, req.backend)
    return _answer(True, "Succeeded to initialize custom process group.")


async def update_from_distributed(request: web.Request) -> web.Response:

    req = decode(await request.read(), UpdateWeightsFromDistributedReq)
    groups, engine = request.app[GROUPS_KEY], request.app[ENGINE_KEY]
    if not len(req.names) == len(req.dtypes) == len(req.shapes) or not req.names:
        return _answer(False, "names, dtypes and shapes must be non-empty and of one length")
    if req.load_format not in LOAD_FORMATS:
        return _answer(False, f"unsupported load_format {req.load_format!r}")
    try:
        metas = _plan(req)
    except ValueError as exc:  # unknown dtype or a negative shape: nothing can be received
        return _answer(False, str(exc))
    async with groups.lock:
        pg = groups.groups.get(req.group_name)
        if pg is None:
            return _answer(False, f"group {req.group_name!r} not initialized; call /init_weights_update_group first")
        try:
            named = await _in_thread(groups.on_device, _receive, metas, pg, groups.device, groups.stream)
        except Exception as exc:  # noqa: BLE001 - the group is broken (a peer died, a timeout)
            groups.groups.pop(req.group_name, None)
            return _answer(False, f"receiving from {req.group_name!r} failed: {type(exc).__name__}: {exc}")
    try:
        pairs = engine.scheduler.runner.pair_with_live(named)
    except ValueError as exc:  # received in full, refused: the sender's collective has completed
        return _answer(False, str(exc))
    scheduler = engine.scheduler
    if scheduler.paused or req.abort_all_requests:
        frozen = await scheduler.update_weights(pairs, version=req.weight_version, abort_all=req.abort_all_requests)
        held = None
    else:  # not paused: swap between two decode steps; requests go on under the new weights
        frozen, held = 0, await scheduler.swap_weights(
            pairs, version=req.weight_version)
    if req.weight_version is not None:
        log.info("weights updated from group %r (version %s)", req.group_name, req.weight_version)
    body = {"success": True, "message": "Succeeded to update model weights.", "num_paused_requests": frozen}
    if held is not None:
        body["paused_s"] = held  # ours, not SGLang's: how long decoding stopped for the swap
    return web.Response(body=msgspec.json.encode(body), content_type="application/json")


async def destroy_group(request: web.Request) -> web.Response:
    req = decode(await request.read(), DestroyWeightsUpdateGroupReq)
    groups = request.app[GROUPS_KEY]
    async with groups.lock:
        pg = groups.groups.pop(req.group_name, None)
    if pg is None:
        return _answer(False, f"group {req.group_name!r} does not exist")
    weight_sync.destroy_group(pg)
    return _answer(True, "Succeeded to destroy custom process group.")


def _plan(req: UpdateWeightsFromDistributedReq) -> list[weight_sync.BucketMeta]:
    """One bucket for "flattened_bucket", else one per tensor (SGLang's per-name broadcasts)."""
    meta = weight_sync.BucketMeta(req.names, req.dtypes, req.shapes)
    for shape in req.shapes:
        if any(d < 0 for d in shape):
            raise ValueError(f"negative dimension in shape {shape}")
    for d in req.dtypes:
        weight_sync.dtype_of(d)
    if req.load_format == "flattened_bucket":
        return [meta]
    return [weight_sync.BucketMeta([n], [d], [s]) for n, d, s in zip(req.names, req.dtypes, req.shapes)]


def _receive(metas: list[weight_sync.BucketMeta], pg: torch.distributed.ProcessGroup, device: torch.device,
             stream: torch.cuda.Stream | None) -> list[tuple[str, torch.Tensor]]:
    """Into fresh buffers, on a stream of its own: decoding (on the default stream) goes on while
    the bytes arrive; the copy into the model waits for a step boundary."""
    named = []
    with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
        for meta in metas:
            flat = weight_sync.empty_bucket(meta, device)
            weight_sync.broadcast(flat, pg)
            named += weight_sync.unflatten(flat, meta)
    return named


async def _in_thread(fn: Any, *args: Any) -> Any:
    """``asyncio.to_thread`` on a fresh thread: a collective blocks its thread until every peer
    arrives, and must not hold one of the default executor's few workers meanwhile."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[Any] = loop.create_future()

    def run() -> None:
        try:
            result = fn(*args)
        except BaseException as exc:  # noqa: BLE001 - handed to the awaiting coroutine
            loop.call_soon_threadsafe(_settle, done, None, exc)
        else:
            loop.call_soon_threadsafe(_settle, done, result, None)

    threading.Thread(target=run, name="engine-collective", daemon=True).start()
    return await done


def _settle(fut: asyncio.Future[Any], result: Any, exc: BaseException | None) -> None:
    if fut.done():
        return
    if exc is not None:
        fut.set_exception(exc)
    else:
        fut.set_result(result)
