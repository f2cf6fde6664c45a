"""The embedded engine's side of SGLang's LoRA routes: adapters merged into the weights.

    POST /load_lora_adapter    {"lora_name", "lora_path", "pinned"}: merge the peft adapter at
                               lora_path into the weights (W = W_base + scaling * B @ A,
                               policies/lora.py), replacing the adapter merged before
    POST /unload_lora_adapter  {"lora_name"}: forget it; if it is the merged one, restore W_base

Bodies and answers are SGLang's (io_struct.py: LoadLoRAAdapterReqInput, UnloadLoRAAdapterReqInput,
LoRAUpdateOutput ``{"success", "error_message", "loaded_adapters"}``, 400 when refused).

Where this differs from SGLang, by design: SGLang applies each request's adapter (``lora_path`` in
/generate) per request, beside the base model; this engine holds one policy, so it serves the
merged adapter to every request, and a request may name any adapter it has loaded and not
unloaded (the runtime keeps the previous one loaded while a sync completes, so a request sent
just before it is never refused). An unknown name is refused with 400. The weights the adapter is
merged into are those the engine was launched with or last loaded from disk: the targeted ones are
kept aside (a copy) at the first merge, and forgotten when a disk load replaces the weights.
A load is a plain weight update (``Scheduler.update_weights``): the runtime pauses first and dates
the new tokens with /update_weight_version, as for any other load.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging

import msgspec
import torch
from aiohttp import web

from policies import lora
from policies.engine.app_state import ENGINE_KEY
from policies.engine.runner import WeightLoadError
from policies.engine.wire import BadRequest, decode

log = logging.getLogger("engine.lora")


class LoadLoRAAdapterReq(msgspec.Struct, kw_only=True):
    lora_name: str
    lora_path: str
    pinned: bool = False  # SGLang keeps a pinned adapter in GPU memory; here every adapter is merged


class UnloadLoRAAdapterReq(msgspec.Struct, kw_only=True):
    lora_name: str


@dataclasses.dataclass
class Adapters:
    """The engine's adapters: which are loaded (name -> path), which one is merged, and the base
    values of the weights it changed."""

    loaded: dict[str, str] = dataclasses.field(default_factory=dict)
    merged: str | None = None
    base: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)


ADAPTERS_KEY = web.AppKey("lora_adapters", Adapters)


def add_routes(app: web.Application) -> None:
    app[ADAPTERS_KEY] = Adapters()
    app.add_routes([web.post("/load_lora_adapter", load_lora_adapter),
                    web.post("/unload_lora_adapter", unload_lora_adapter)])


def check_request(app: web.Application, lora_path: str | list[str | None] | None) -> None:
    """A /generate body may name only adapters this engine has loaded (SGLang's rule too)."""
    names = [lora_path] if isinstance(lora_path, str) or lora_path is None else lora_path
    unknown = sorted({n for n in names if n is not None and n not in app[ADAPTERS_KEY].loaded})
    if unknown:
        raise BadRequest(f"lora_path names adapters this engine has not loaded: {unknown}")


def forget_base(app: web.Application) -> None:
    """The weights were replaced whole (a disk load): no adapter is merged in them any more."""
    adapters = app[ADAPTERS_KEY]
    adapters.merged, adapters.base = None, {}


async def load_lora_adapter(request: web.Request) -> web.Response:
    req = decode(await request.read(), LoadLoRAAdapterReq)
    adapters, scheduler = request.app[ADAPTERS_KEY], request.app[ENGINE_KEY].scheduler
    try:
        pairs = await asyncio.to_thread(_merge, adapters, scheduler.runner, req.lora_path)
    except (lora.AdapterError, WeightLoadError, OSError) as exc:
        return _answer(adapters, f"{type(exc).__name__}: {exc}")
    await scheduler.update_weights(pairs, version=None, abort_all=False)
    adapters.loaded[req.lora_name], adapters.merged = req.lora_path, req.lora_name
    log.info("merged LoRA adapter %s from %s", req.lora_name, req.lora_path)
    return _answer(adapters)


async def unload_lora_adapter(request: web.Request) -> web.Response:
    req = decode(await request.read(), UnloadLoRAAdapterReq)
    adapters, scheduler = request.app[ADAPTERS_KEY], request.app[ENGINE_KEY].scheduler
    if req.lora_name not in adapters.loaded:
        return _answer(adapters, f"LoRA adapter {req.lora_name!r} is not loaded")
    if adapters.merged == req.lora_name:  # back to the base weights
        pairs = scheduler.runner.pair_with_live(list(adapters.base.items()))
        await scheduler.update_weights(pairs, version=None, abort_all=False)
        adapters.merged = None
    del adapters.loaded[req.lora_name]
    return _answer(adapters)


def _merge(adapters: Adapters, runner, path: str) -> list[tuple[torch.Tensor, torch.Tensor]]:  # noqa: ANN001
    """(live parameter, new value) pairs that make the weights base + this adapter: its targets
    merged, and any weight an earlier adapter changed and this one does not, restored."""
    tensors, scaling = lora.read_adapter(path)
    live = runner.model.state_dict()
    targets = {k.removeprefix(lora.PEFT_PREFIX).removesuffix(".lora_A.weight") + ".weight"
               for k in tensors if k.endswith(".lora_A.weight")}
    missing = sorted(t for t in targets if t not in live)
    if missing:
        raise lora.AdapterError(f"adapter targets weights the model does not have: {missing[:3]}")
    for name in targets - adapters.base.keys():
        adapters.base[name] = live[name].detach().clone()
    merged = dict(lora.merged_weights({t: adapters.base[t] for t in targets}, tensors, scaling))
    restore = {k: v for k, v in adapters.base.items() if k not in merged}
    return runner.pair_with_live(list((merged | restore).items()))


def _answer(adapters: Adapters, error: str | None = None) -> web.Response:
    if error is not None:
        log.warning("LoRA adapter route refused: %s", error)
    body = {"success": error is None, "error_message": error, "loaded_adapters": dict(adapters.loaded)}
    return web.json_response(body, status=400 if error else 200)
