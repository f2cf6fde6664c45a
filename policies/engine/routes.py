"""HTTP routes of the embedded engine: SGLang's route names and body shapes over a Scheduler.

Error contract: a body or request the engine refuses is HTTP 400 with `{"error": "<one line>"}`
(a failed weight update answers SGLang's `{"success": false, "message": ...}` with 400); an
unexpected fault is 500 with a one-line error, its traceback going to the server log only.

Choices where SGLang leaves room (see also the Scheduler docstring):
- /health_generate while paused answers 200 at once without generating: a pause is a planned
  state (a weight update is in progress), so a liveness probe must not fail or wait for it.
  When not paused it runs a one-token request through the batching loop (timeout 503).
- /abort_request and a client that disconnects both end the request; a disconnect frees its slot.
- /flush_cache is a no-op: there is no prefix cache.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import msgspec
from aiohttp import web

from policies.engine import colocated, distributed, lora_routes
from policies.engine.app_state import ENGINE_KEY, Engine
from policies.engine.request import Completion
from policies.engine.scheduler import ENGINE_ERROR
from policies.engine.wire import (
    AbortReq,
    BadRequest,
    GenerateItem,
    GenerateReqInput,
    PauseReq,
    Unavailable,
    UpdateWeightsFromDiskReq,
    UpdateWeightVersionReq,
    decode,
    split_generate,
)

log = logging.getLogger("engine.routes")

HEALTH_GENERATE_TIMEOUT_S = 20.0
LOAD_FORMATS = (None, "auto", "safetensors")
# /get_server_info's "version": the SGLang release whose HTTP API this server follows (clients gate
# features on it); "engine" in the same answer names this server
SGLANG_API_VERSION = "0.5.23"


def build_app(engine: Engine) -> web.Application:
    app = web.Application(middlewares=[_errors])
    app[ENGINE_KEY] = engine
    app.add_routes(
        [
            web.post("/generate", generate),
            web.post("/abort_request", abort_request),
            web.post("/pause_generation", pause_generation),
            web.post("/continue_generation", continue_generation),
            web.get("/health", health),
            web.get("/health_generate", health_generate),
            web.get("/get_server_info", get_server_info),
            web.get("/server_info", get_server_info),  # SGLang 0.5.23's name; get_* is deprecated there
            web.get("/get_model_info", get_model_info),
            web.get("/model_info", get_model_info),
            web.get("/get_weight_version", get_weight_version),
            web.post("/update_weight_version", update_weight_version),
            web.post("/update_weights_from_disk", update_weights_from_disk),
            web.route("*", "/flush_cache", flush_cache),
        ]
    )
    distributed.add_routes(app, engine.scheduler.runner.device)
    colocated.add_routes(app)
    lora_routes.add_routes(app)
    return app


def _json(payload: Any, status: int = 200) -> web.Response:
    return web.Response(body=msgspec.json.encode(payload), status=status, content_type="application/json")


def _engine(request: web.Request) -> Engine:
    return request.app[ENGINE_KEY]


@web.middleware
async def _errors(request: web.Request, handler: Any) -> web.StreamResponse:
    try:
        return await handler(request)
    except BadRequest as exc:
        return _json({"error": str(exc)}, 400)
    except Unavailable as exc:
        return _json({"error": str(exc)}, 503)
    except web.HTTPException:
        raise
    except Exception as exc:
        log.exception("%s %s failed", request.method, request.path)
        return _json({"error": f"internal error: {exc!r}"}, 500)


# ---- generation ---------------------------------------------------------------------------


async def generate(request: web.Request) -> web.Response:
    """One prompt answers one object; a batch (or n > 1) answers a list, one per output, in order.
    Members of a batch are independent requests (each abortable by its rid); the answer is sent
    when the last one ends."""
    req = decode(await request.read(), GenerateReqInput)
    lora_routes.check_request(request.app, req.lora_path)
    single, items = split_generate(req)
    scheduler = _engine(request).scheduler
    pending = await scheduler.submit(items)
    try:
        done = [await p.future for p in pending]
    except asyncio.CancelledError:  # the client went away: free its slots in the batch
        for p in pending:
            scheduler.abort(p.rid, "client disconnected")
        raise
    answers = [_generate_response(d, i) for d, i in zip(done, items, strict=True)]
    return _json(answers[0] if single else answers)


def _version_spans(versions: list[str], current: str) -> list[dict[str, Any]]:
    """SGLang's spans; an answer with no token gets one empty span of the version current at its
    end, as SGLang's compute_weight_version_spans writes it."""
    spans: list[dict[str, Any]] = []
    for i, v in enumerate(versions):
        if spans and spans[-1]["version"] == v:
            spans[-1]["end"] = i + 1
        else:
            spans.append({"version": v, "start": i, "end": i + 1})
    return spans or [{"version": current, "start": 0, "end": 0}]


def _logprob_meta(done: Completion, item: GenerateItem) -> dict[str, Any]:
    """SGLang's logprob fields: [logprob, token id, text] triples (text is always None here: no
    tokenizer); the prompt's list starts at logprob_start_len, its first entry without a logprob."""
    start = item.logprob_start_len if item.logprob_start_len >= 0 else len(item.input_ids) - 1
    prompt = done.prompt_logprobs
    meta: dict[str, Any] = {
        "input_token_logprobs": [[None, item.input_ids[start], None]]
        + ([] if prompt is None else [[lp, tok, None] for lp, tok in zip(prompt.logprobs, prompt.tokens, strict=True)]),
        "output_token_logprobs": [[lp, tok, None] for lp, tok in zip(done.logprobs, done.output_ids, strict=True)],
    }
    if item.top_logprobs_num > 0:
        prompt_top = [] if prompt is None else prompt.top
        meta["input_top_logprobs"] = [None] + [_top_triples(t) for t in prompt_top]
        meta["output_top_logprobs"] = [_top_triples(t) for t in done.top_logprobs]
    return meta


def _top_triples(top: list[tuple[float, int]] | None) -> list[list[Any]]:
    return [[lp, tok, None] for lp, tok in top or ()]


def _generate_response(done: Completion, item: GenerateItem) -> dict[str, Any]:
    meta: dict[str, Any] = {
        "id": done.rid,
        "finish_reason": msgspec.to_builtins(done.finish),
        "prompt_tokens": done.prompt_tokens,
        "completion_tokens": len(done.output_ids),
        "cached_tokens": 0,
        "e2e_latency": done.latency_s,
        "weight_version": done.weight_version,
        # SGLang's spans (0.5.23, utils/weight_versions.py): which version produced output tokens
        # [start, end), exact even for a request frozen by an in_place pause across an update.
        "weight_versions": _version_spans(done.token_versions, done.weight_version),
    }
    if item.return_logprob:
        meta |= _logprob_meta(done, item)
    return {"text": "", "output_ids": done.output_ids, "meta_info": meta}


async def abort_request(request: web.Request) -> web.Response:
    req = decode(await request.read(), AbortReq)
    scheduler = _engine(request).scheduler
    if req.abort_all:
        count = scheduler.abort_all("aborted by request")
    else:
        count = int(scheduler.abort(req.rid))
    return _json({"num_aborted": count})


async def pause_generation(request: web.Request) -> web.Response:
    req = decode(await request.read(), PauseReq)
    await _engine(request).scheduler.pause(req.mode)
    return _json({"message": "Generation paused successfully.", "status": "ok"})


async def continue_generation(request: web.Request) -> web.Response:
    _engine(request).scheduler.resume()
    return _json({"message": "Generation continued successfully.", "status": "ok"})


# ---- health and info ----------------------------------------------------------------------


async def health(request: web.Request) -> web.Response:
    return web.Response(status=200)


async def health_generate(request: web.Request) -> web.Response:
    scheduler = _engine(request).scheduler
    if scheduler.paused:  # planned state: see the module docstring
        return web.Response(status=200)
    probe = scheduler.submit_probe()
    try:
        done = await asyncio.wait_for(probe.future, HEALTH_GENERATE_TIMEOUT_S)
    except TimeoutError:
        scheduler.abort(probe.rid)
        return _json({"error": f"health_generate timed out after {HEALTH_GENERATE_TIMEOUT_S:.0f}s"}, 503)
    except asyncio.CancelledError:
        scheduler.abort(probe.rid)
        raise
    if done.finish.message and done.finish.message.startswith(ENGINE_ERROR):
        return _json({"error": done.finish.message}, 503)
    return web.Response(status=200)


async def get_server_info(request: web.Request) -> web.Response:
    engine = _engine(request)
    info = {**engine.server_info, "model_path": engine.model_path, "version": SGLANG_API_VERSION}
    info["weight_version"] = engine.scheduler.weight_version
    info["internal_states"] = [engine.scheduler.stats()]
    return _json(info)


async def get_model_info(request: web.Request) -> web.Response:
    engine = _engine(request)
    return _json(
        {
            "model_path": engine.model_path,
            "tokenizer_path": None,
            "is_generation": True,
            "weight_version": engine.scheduler.weight_version,
        }
    )


async def get_weight_version(request: web.Request) -> web.Response:
    return _json({"weight_version": _engine(request).scheduler.weight_version})


async def flush_cache(request: web.Request) -> web.Response:
    return web.Response(text="Cache flushed (the embedded engine keeps no prefix cache).")


# ---- weights ------------------------------------------------------------------------------


async def update_weight_version(request: web.Request) -> web.Response:
    req = decode(await request.read(), UpdateWeightVersionReq)
    _engine(request).scheduler.set_version(req.new_version, abort_all=req.abort_all_requests)
    return _json({"success": True, "message": "Weight version updated.", "new_version": req.new_version})


async def update_weights_from_disk(request: web.Request) -> web.Response:
    """Read and check the checkpoint off the decode thread, then copy it in between steps."""
    req = decode(await request.read(), UpdateWeightsFromDiskReq)
    engine = _engine(request)
    if req.load_format not in LOAD_FORMATS:
        return _update_failed(f"unsupported load_format {req.load_format!r}")
    try:
        pairs = await asyncio.to_thread(engine.scheduler.runner.read_checkpoint, req.model_path)
    except Exception as exc:  # any unreadable or mismatched checkpoint is the caller's error
        return _update_failed(f"{type(exc).__name__}: {exc}")
    frozen = await engine.scheduler.update_weights(
        pairs, version=req.weight_version, abort_all=req.abort_all_requests
    )
    engine.model_path = req.model_path
    lora_routes.forget_base(request.app)
    log.info("loaded weights from %s (version %s)", req.model_path, engine.scheduler.weight_version)
    return _json(
        {"success": True, "message": "Succeeded to update model weights.", "num_paused_requests": frozen}
    )


def _update_failed(message: str) -> web.Response:
    log.warning("update_weights_from_disk refused: %s", message)
    return _json({"success": False, "message": message, "num_paused_requests": 0}, 400)
