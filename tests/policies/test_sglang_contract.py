"""The SGLang HTTP client speaks SGLang's real API: checked against the source of the newest
sglang release, without running SGLang (it needs a GPU).

Why a source check: SGLang parses request bodies into dataclasses/Structs that *ignore* unknown
fields, so a misspelled field (`max_new_token`) or a renamed one is silently dropped by a real
server, and the embedded engine, written to the same protocol, cannot catch that. Here the
client is run against a recording fake server to learn exactly which routes, methods and JSON
fields it sends; each is then looked up in the sglang wheel (downloaded once, read as a zip,
parsed with `ast`; see sglang_source.py): routes and methods in http_server.py, body fields in
the request model each route's handler declares (io_struct.py), `sampling_params` keys in
SamplingParams (and in the generated JSON contract gate of newer releases, which rejects
unknown keys with HTTP 400), and every response field the client decodes (its msgspec structs)
in the dict keys SGLang writes. Where the release ships its generated JSON contract codec
(sglang/api/v1/api_types.py, which SGLang runs on every /generate body), the client's bodies are
run through it and the canned answer is decoded and re-encoded by it; that pure-msgspec module is
the only sglang code executed. Routes SGLang marks deprecated must not be used (or be listed with a
reason), and what `--engine sglang` refuses (keep mode, collective weight transport) is tied to the
source facts that force it, so lifting a limit on either side fails a test until both agree. The
mutation tests show that the same checks fail on a one-letter drift. The second half tests the
SGLang launch command builder and its flags.

Without network and without a cached wheel the sglang-dependent tests skip, naming the pip
command that failed; with a cached wheel (~/.cache/asyncrl/sglang/) they always run.
"""

from __future__ import annotations

import ast
import asyncio
import inspect
import subprocess
import sys
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
import pytest
import sglang_source as sgl
from aiohttp import web

from policies.engine import client as client_module
from policies.engine import replies, wire
from policies.engine.client import PAUSE_MODES, SGLANG_SAMPLING_KEYS, EngineClient
from policies.engine.sglang_launch import RUNTIME_OWNED_FLAGS, parse_sglang_passthrough, sglang_command

pytestmark = pytest.mark.timeout(120)

CLIENT_FILE = Path(client_module.__file__)

# Response fields the client reads that SGLang does not produce, on purpose: none today.
KNOWN_EXTENSIONS: dict[str, set[str]] = {"meta_info": set()}
# Fields SGLang sends only sometimes (weight_versions: when the scheduler recorded spans): the
# client must treat them as optional (default None).
SOMETIMES_SENT = {"weight_versions"}

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
# Routes SGLang marks deprecated that the client still calls, each with why it is kept: a new one
# fails test_no_deprecated_routes.
DEPRECATED_IN_USE = {"/get_server_info": "debugging only (tests); the embedded engine also serves /server_info"}
# Response fields of the embedded engine's own that SGLang never sends, read as optional.
COLLECTIVE_EXTENSIONS = {"paused_s"}


# ---- what the client sends: recorded from a fake server ---------------------------------


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


@pytest.fixture(scope="module")
def sent() -> list[Sent]:
    return record_client_requests()


@pytest.fixture(scope="module")
def src() -> Iterator[sgl.SglangSource]:
    try:
        wheel = sgl.ensure_wheel()
    except sgl.SglangUnavailable as exc:
        pytest.skip(f"sglang source unavailable (no cached wheel in {sgl.CACHE_DIR}): {exc}")
    source = sgl.SglangSource(wheel)
    print(f"checking against sglang {source.version} ({wheel})")
    yield source
    source.close()


def test_every_client_method_is_exercised(sent):
    """A new client method must be added to EXERCISES, or its requests would go unchecked."""
    public = {
        name for name, fn in inspect.getmembers(EngineClient, inspect.iscoroutinefunction) if not name.startswith("_")
    }
    assert public - NOT_EXERCISED == set(EXERCISES), "EXERCISES out of date with EngineClient's methods"
    # and every route literal in client.py was actually requested
    literals = {
        node.value
        for node in ast.walk(ast.parse(CLIENT_FILE.read_text()))
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.startswith("/")
        and node.value[1:].replace("_", "").replace("/", "").isalnum()
    }  # fmt: skip
    assert literals <= {s.path for s in sent}, (
        f"routes in client.py never requested: {literals - {s.path for s in sent}}"
    )


# ---- the checks (pure functions over client-side names and SGLang-side facts) -----------


def route_problems(sent: list[Sent], routes: dict[str, list[sgl.Route]]) -> list[str]:
    problems = []
    for method, path, client_method in sorted({(s.method, s.path, s.client_method) for s in sent}):
        declared = routes.get(path)
        if not declared:
            problems.append(
                f"EngineClient.{client_method} sends {method} {path}, but {sgl.HTTP_SERVER} declares no route {path}"
            )
        elif not any(method in r.methods for r in declared):
            have = ", ".join(f"{sorted(r.methods)} at {r.location}" for r in declared)
            problems.append(f"EngineClient.{client_method} sends {method} {path}; SGLang accepts only {have}")
    return problems


def field_problems(what: str, used: set[str], available: dict[str, str], *, source: str) -> list[str]:
    """Names the client uses that SGLang does not have (`available`: name → file:line)."""
    return [f"{what}: {name!r} is not in {source}" for name in sorted(used - set(available))]


def generate_body_problems(src: sgl.SglangSource, bodies: list[dict]) -> list[str]:
    """Top-level /generate fields vs GenerateReqInput; sampling_params keys vs SamplingParams and
    (newer releases) the JSON contract gate's SamplingParams, which rejects unknown keys."""
    req_model = next(sgl.request_model(src, r) for r in sgl.routes(src)["/generate"])
    top = sgl.class_fields(src, *req_model)
    sampling = sgl.class_fields(src, sgl.SAMPLING_PARAMS, "SamplingParams")
    problems = []
    for body in bodies:
        problems += field_problems("/generate body field", set(body), top, source=f"{req_model[1]} ({req_model[0]})")
        params = body.get("sampling_params") or {}
        keys = set().union(*params) if isinstance(params, list) else set(params)  # a batch: one dict per prompt
        problems += field_problems(
            "/generate sampling_params key", keys, sampling, source=f"SamplingParams ({sgl.SAMPLING_PARAMS})"
        )
        if src.has(sgl.API_CONTRACT):
            gate = sgl.class_fields(src, sgl.API_CONTRACT, "SamplingParams")
            problems += field_problems(
                "/generate sampling_params key",
                keys,
                gate,
                source=f"the /generate contract gate's SamplingParams ({sgl.API_CONTRACT}; unknown keys → HTTP 400)",
            )
    return sorted(set(problems))


def control_body_problems(src: sgl.SglangSource, sent: list[Sent]) -> list[str]:
    """Each non-/generate JSON body vs the request model its SGLang handler declares."""
    routes = sgl.routes(src)
    problems = []
    for s in sent:
        if s.path == "/generate" or s.path not in routes:
            continue  # /generate: generate_body_problems; a missing route: route_problems
        models = {m for r in routes[s.path] if s.method in r.methods and (m := sgl.request_model(src, r))}
        if not models:
            if s.body:
                problems.append(f"{s.method} {s.path} sends {sorted(s.body)}, but its handler declares no body model")
            continue
        available = {}
        for model in models:
            available.update(sgl.class_fields(src, *model))
        names = " / ".join(f"{name} ({file})" for file, name in sorted(models))
        problems += field_problems(f"{s.path} body field", set(s.body or {}), available, source=names)
    return sorted(set(problems))


def struct_names(struct: type[msgspec.Struct]) -> set[str]:
    """The JSON names of a msgspec struct's fields (encode_name honours renames)."""
    return {f.encode_name for f in msgspec.structs.fields(struct)}


def response_problems(
    what: str, struct: type[msgspec.Struct], produced: dict[str, str], *, source: str, allowed: set[str] = frozenset()
) -> list[str]:
    return field_problems(f"{what} ({struct.__name__})", struct_names(struct) - allowed, produced, source=source)


def client_decodes() -> dict[str, str]:
    """{route: struct name} for every `self._decode("/route", raw, Struct)` in client.py."""
    found = {}
    for node in ast.walk(ast.parse(CLIENT_FILE.read_text())):
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr == "_decode"
            and len(node.args) == 3
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[2], ast.Name)
        ):
            found[node.args[0].value] = node.args[2].id
    return found


def route_response_problems(src: sgl.SglangSource, route: str, struct: type[msgspec.Struct]) -> list[str]:
    routes = sgl.routes(src)
    if route not in routes:
        # say where SGLang does report the missing fields, so the fix is obvious
        hints = []
        for name in sorted(struct_names(struct)):
            for path, declared in sorted(routes.items()):
                for r in declared:
                    if name in (keys := sgl.handler_dict_keys(src, r)):
                        hints.append(f"{name!r} is returned by {sorted(r.methods)} {path} ({keys[name]})")
        return [
            f"response of {route} ({struct.__name__}): SGLang has no route {route} in {sgl.HTTP_SERVER}"
            + ("; " + "; ".join(hints) if hints else "")
        ]
    produced: dict[str, str] = {}
    for r in routes[route]:
        produced.update(sgl.handler_dict_keys(src, r))
    return response_problems(f"response of {route}", struct, produced, source=f"the {route} handler's answer")


# ---- the contract ------------------------------------------------------------------------


def test_routes_and_methods_exist(src, sent):
    problems = route_problems(sent, sgl.routes(src))
    assert not problems, f"sglang {src.version}:\n" + "\n".join(problems)


def test_generate_body_fields_exist(src, sent):
    bodies = [s.body for s in sent if s.path == "/generate"]
    assert bodies and all("sampling_params" in b for b in bodies)
    problems = generate_body_problems(src, bodies)
    assert not problems, f"sglang {src.version}:\n" + "\n".join(problems)


def test_every_allowed_sampling_key_exists(src):
    problems = generate_body_problems(src, [{"sampling_params": dict.fromkeys(SGLANG_SAMPLING_KEYS)}])
    assert not problems, f"SGLANG_SAMPLING_KEYS vs sglang {src.version}:\n" + "\n".join(problems)


def test_control_body_fields_exist(src, sent):
    problems = control_body_problems(src, sent)
    assert not problems, f"sglang {src.version}:\n" + "\n".join(problems)
    # the request models the bodies were checked against, found from the handlers' signatures
    routes = sgl.routes(src)
    models = {
        path: sgl.request_model(src, routes[path][0]) for path in {s.path for s in sent if s.body} if path in routes
    }
    assert models["/pause_generation"][1] == "PauseGenerationReqInput"
    assert models["/abort_request"][1] == "AbortReq"
    assert models["/update_weights_from_disk"][1] == "UpdateWeightFromDiskReqInput"
    assert models["/update_weight_version"][1] == "UpdateWeightVersionReqInput"
    assert models["/update_weights_from_tensor"][1] == "UpdateWeightsFromTensorReqInput"
    assert models["/release_memory_occupation"][1] == "ReleaseMemoryOccupationReqInput"
    assert models["/resume_memory_occupation"][1] == "ResumeMemoryOccupationReqInput"


def test_tensor_payload_is_what_sglangs_flattened_bucket_loader_reads(src, sent):
    """/update_weights_from_tensor: the payload entries are base64 strings (JSON has no bytes);
    "flattened_bucket" is a format that route's loader takes; our metadata entries carry exactly
    FlattenedTensorMetadata's fields; and every global our payload pickles is one SGLang's safe
    unpickler admits (a CPU payload here; a CUDA one differs only by rebuild_cuda_tensor, checked too)."""
    import base64
    import io
    import pickle

    import torch

    from policies import weight_ipc

    body = next(s.body for s in sent if s.path == "/update_weights_from_tensor" and s.body["load_format"])
    assert base64.b64decode(body["serialized_named_tensors"][0]) == b"\x80\x05payload"
    assert body["load_format"] == weight_ipc.LOAD_FORMAT
    updater = "sglang/srt/model_executor/model_runner_components/weight_updater.py"
    loader = next(n for n in ast.walk(src.tree(updater))
                  if isinstance(n, ast.FunctionDef) and n.name == "update_weights_from_tensor")
    assert weight_ipc.LOAD_FORMAT in {c.value for c in ast.walk(loader) if isinstance(c, ast.Constant)}
    fields = sgl.class_fields(src, "sglang/srt/weight_sync/tensor_bucket.py", "FlattenedTensorMetadata")
    ours = weight_ipc.metadata(weight_ipc.weight_sync.BucketMeta(["w"], ["bfloat16"], [[2, 3]]))
    assert set(vars(ours[0])) == set(fields)

    unpickler = next(n for n in ast.walk(src.tree("sglang/srt/utils/common.py"))
                     if isinstance(n, ast.ClassDef) and n.name == "SafeUnpickler")
    allowed = {(e.elts[0].value, e.elts[1].value) for e in ast.walk(unpickler)
               if isinstance(e, ast.Tuple) and len(e.elts) == 2
               and all(isinstance(x, ast.Constant) and isinstance(x.value, str) for x in e.elts)}
    used = {("torch.multiprocessing.reductions", "rebuild_cuda_tensor")}

    class Recording(pickle.Unpickler):
        def find_class(self, module: str, name: str) -> Any:
            used.add((module, name))
            return super().find_class(module, name)

    data = weight_ipc.Exporter([("w", torch.zeros(2, 3))], dtype=torch.bfloat16).serialize()
    Recording(io.BytesIO(data)).load()
    assert ("types", "SimpleNamespace") in used and used <= allowed, sorted(used - allowed)


def test_every_sglang_sampling_param_is_honoured_refused_or_text_only(src):
    """The embedded server's side: each SamplingParams field of SGLang is implemented, refused with
    a 400 when set (at SGLang's own default it is accepted), or changes only text."""
    sglang = sgl.class_fields(src, sgl.SAMPLING_PARAMS, "SamplingParams")
    honoured = {f.encode_name for f in msgspec.structs.fields(wire.SamplingParams)} - set(wire.REFUSED_SAMPLING)
    unaccounted = set(sglang) - honoured - set(wire.REFUSED_SAMPLING) - set(wire.IGNORED_SAMPLING)
    problems = [f"SamplingParams.{n} ({sglang[n]}) is not honoured, refused or text-only" for n in sorted(unaccounted)]
    problems += _default_problems(src, sgl.SAMPLING_PARAMS, "SamplingParams", wire.REFUSED_SAMPLING)
    problems += [f"honoured {n} is not an SGLang field" for n in sorted(honoured - set(sglang))]
    assert not problems, f"sglang {src.version}:\n" + "\n".join(problems)


def test_refused_and_logprob_generate_fields_are_sglangs(src):
    sglang = sgl.class_fields(src, sgl.IO_STRUCT, "GenerateReqInput")
    honoured = {"input_ids", "text", "sampling_params", "return_logprob", "logprob_start_len", "top_logprobs_num",
                "rid", "stream", "lora_path"}  # fmt: skip
    assert honoured | {f.encode_name for f in msgspec.structs.fields(wire.GenerateReqInput)} == honoured | set(
        wire.REFUSED_GENERATE
    )
    declared = honoured | set(wire.REFUSED_GENERATE)
    problems = [f"{n} is not a GenerateReqInput field" for n in sorted(declared - set(sglang))]
    problems += _default_problems(src, sgl.IO_STRUCT, "GenerateReqInput", wire.REFUSED_GENERATE)
    assert not problems, f"sglang {src.version}:\n" + "\n".join(problems)


def test_logprob_meta_keys_are_sglangs(src):
    written = sgl.meta_info_keys(src)
    for key in ("input_token_logprobs", "output_token_logprobs", "input_top_logprobs", "output_top_logprobs"):
        assert key in written, f"sglang {src.version} writes no meta_info[{key!r}]"


def _default_problems(src, path: str, cls: str, table: dict[str, object]) -> list[str]:  # noqa: ANN001
    """A refused field is accepted at its default: that default must be SGLang's (None always is)."""
    problems = []
    for name, default in table.items():
        try:
            theirs = sgl.field_default(src, path, cls, name)
        except LookupError:
            continue  # no literal default (a field() call): only None and `default` are accepted
        if theirs not in (None, default):
            problems.append(f"{cls}.{name}: SGLang's default is {theirs!r}, the engine accepts {default!r}")
    return problems


def test_pause_modes_are_sglang_modes(src):
    model = sgl.request_model(src, sgl.routes(src)["/pause_generation"][0])
    modes = sgl.literal_values(src, *model, "mode")
    assert set(PAUSE_MODES) <= modes, f"{model[1]}.mode allows {sorted(modes)}; client allows {PAUSE_MODES}"


def test_generate_response_fields_are_produced(src):
    meta_type = msgspec.structs.fields(replies.GenerateResponse)
    assert {f.name: f.type for f in meta_type}["meta_info"] is replies.MetaInfo
    problems = response_problems(
        "/generate response",
        replies.GenerateResponse,
        sgl.generate_top_level_keys(src),
        source=f"the dicts {sgl.TOKENIZER_MANAGER} returns",
    )
    problems += response_problems(
        "meta_info",
        replies.MetaInfo,
        sgl.meta_info_keys(src),
        source="the meta_info keys written in " + ", ".join(sgl.meta_info_sources(src)),
        allowed=KNOWN_EXTENSIONS["meta_info"],
    )
    finish_keys, finish_types = sgl.finish_reason_keys(src)
    problems += response_problems(
        "meta_info.finish_reason", replies.FinishReason, finish_keys, source=f"to_json() in {sgl.SCHEDULE_BATCH}"
    )
    if not {"stop", "length", "abort"} <= finish_types:
        problems.append(f"finish_reason types in {sgl.SCHEDULE_BATCH} are {sorted(finish_types)}")
    assert not problems, f"sglang {src.version}:\n" + "\n".join(problems)


def test_other_response_fields_are_produced(src):
    decodes = client_decodes()
    assert decodes.get("/generate") == "GenerateResponse"  # checked above
    checked = {route: getattr(replies, name) for route, name in decodes.items() if route != "/generate"}
    assert checked, "client.py decodes no typed response besides /generate: is client_decodes() out of date?"
    problems = [p for route, struct in sorted(checked.items()) for p in route_response_problems(src, route, struct)]
    assert not problems, f"sglang {src.version}:\n" + "\n".join(problems)


def test_sometimes_sent_fields_are_optional_in_the_client():
    fields = {f.encode_name: f for f in msgspec.structs.fields(replies.MetaInfo)}
    for name in KNOWN_EXTENSIONS["meta_info"] | SOMETIMES_SENT:
        assert not fields[name].required and fields[name].default is None, f"{name} must default to None"


def test_deprecated_routes_are_not_used(src, sent):
    """A route SGLang deprecates (its handler's docstring says so) will be removed: the client must
    move off it, or it is listed in DEPRECATED_IN_USE with the reason it stays."""
    deprecated = sgl.deprecated_routes(src)
    used = {s.path for s in sent} & set(deprecated)
    assert used == set(DEPRECATED_IN_USE), "\n".join(f"{r}: {deprecated[r]}" for r in sorted(used))


def test_collective_responses_are_produced(src):
    """The {"success", "message"} answers of the collective routes (decoded through a variable
    route in `_weights_call`, so client_decodes() does not see them)."""
    routes = sgl.routes(src)
    problems = []
    for route in ("/init_weights_update_group", "/update_weights_from_distributed", "/destroy_weights_update_group",
                  "/begin_weight_update", "/end_weight_update", "/update_weights_from_tensor"):
        produced = {k: v for r in routes[route] for k, v in sgl.handler_dict_keys(src, r).items()}
        problems += response_problems(f"response of {route}", replies.CollectiveResult, produced,
                                      source=f"the {route} handler's answer", allowed=COLLECTIVE_EXTENSIONS)
    assert not problems, f"sglang {src.version}:\n" + "\n".join(problems)
    fields = {f.encode_name: f for f in msgspec.structs.fields(replies.CollectiveResult)}
    assert all(not fields[name].required for name in COLLECTIVE_EXTENSIONS)


def test_lora_responses_are_sglangs_and_its_launch_flags_exist(src):
    """/load_lora_adapter and /unload_lora_adapter answer a LoRAUpdateOutput (decoded through a
    variable route in `_lora_call`): the client reads only its fields. A LoRA run launches SGLang
    with policies.lora.sglang_flags: each must be a server flag, the target "all" one it accepts."""
    from policies import lora

    fields = sgl.class_fields(src, sgl.IO_STRUCT, "LoRAUpdateOutput")
    read = {f.encode_name for f in msgspec.structs.fields(replies.LoRAUpdateOutput)}
    assert read <= set(fields), f"sglang {src.version}: LoRAUpdateOutput has {sorted(fields)}, client reads {read}"
    server = sgl.server_flags(src)
    flags = lora.sglang_flags(lora.LoraSpec(rank=8, alpha=16.0))
    missing = [f"--{name}" for name in flags if f"--{name}" not in server]
    assert not missing, f"sglang {src.version} has no server flags {missing}"
    assert server["--enable-lora"][0] in (False, None)  # a bare flag: sglang_command writes True as one
    lora_fields = src.read(sgl.ARG_FIELDS_DIR + "lora.py") if src.has(sgl.ARG_FIELDS_DIR + "lora.py") else ""
    assert "LORA_TARGET_ALL_MODULES" in lora_fields or '"all"' in src.read(sgl.SERVER_ARGS)


def test_version_spans_match_what_sglang_writes(src):
    """meta_info.weight_versions entries (per-token versions, SGLang >= 0.5.23) as its
    tokenizer-side helper writes them."""
    path = "sglang/srt/utils/weight_versions.py"
    if not src.has(path):
        pytest.skip(f"sglang {src.version} reports no per-token weight versions")
    written: dict[str, str] = {}
    for node in ast.walk(src.tree(path)):
        if isinstance(node, ast.FunctionDef) and node.name == "add_weight_versions_to_meta_info":
            for inner in ast.walk(node):
                if isinstance(inner, ast.Dict):
                    sgl._add_dict_keys(written, inner, path)
    problems = response_problems("meta_info.weight_versions[]", replies.VersionSpan, written,
                                 source=f"add_weight_versions_to_meta_info ({path})")
    assert written and not problems, f"sglang {src.version}:\n" + "\n".join(problems)


# ---- SGLang's own JSON contract codec (newer releases): the bodies and answers, run through it --


@pytest.fixture(scope="module")
def contract(src):
    module = sgl.load_api_contract(src)
    if module is None:
        pytest.skip(f"sglang {src.version} has no {sgl.API_CONTRACT}")
    return module


def gate_problems(contract, bodies: list[dict]) -> list[str]:
    """What SGLang's /generate contract gate (HTTP 400) says about each body."""
    problems = []
    for body in bodies:
        try:
            contract.GenerateRequest.from_json_value(body)
        except contract.JsonContractError as exc:
            problems.append(f"/generate body {body} is refused by SGLang's contract gate: {exc}")
    return problems


def test_generate_bodies_pass_sglangs_gate(contract, sent):
    bodies = [s.body for s in sent if s.path == "/generate"]
    assert any(isinstance(b["input_ids"][0], list) for b in bodies), "no batched /generate exercised"
    problems = gate_problems(contract, bodies)
    assert not problems, "\n".join(problems)


def test_generate_answer_is_sglang_shaped_and_read_as_encoded(contract):
    """The canned answer is what SGLang's schema describes, the client's response structs name
    only schema fields, and the client reads the answer as SGLang's encoder writes it."""
    schema = {"response": contract.GenerateResponse, "meta_info": contract.GenerateMetaInfo,
              "span": contract.WeightVersionSpan}
    client_side = {"response": replies.GenerateResponse, "meta_info": replies.MetaInfo,
                   "span": replies.VersionSpan}
    problems = [
        p for key in schema for p in response_problems(
            f"{key}", client_side[key], dict.fromkeys(schema[key].__struct_fields__, sgl.API_CONTRACT),
            source=f"{schema[key].__name__} ({sgl.API_CONTRACT})")
    ]
    assert not problems, "\n".join(problems)
    encoded = contract.GenerateResponse.from_json_value(GENERATE_ANSWER).to_json_value()
    out = replies.to_output(msgspec.convert(encoded, replies.GenerateResponse), True, url="http://sglang")
    assert (out.output_ids, out.logprobs, out.finish_reason, out.weight_version, out.token_versions) == (
        [5, 6], [-0.5, -1.5], "stop", "3", ["2", "3"])


def test_mutation_gate_catches_drift(contract, sent):
    body = _generate_body(sent)
    assert not gate_problems(contract, [body])
    drifted = {**body, "sampling_params": {**body["sampling_params"], "max_new_token": 8}}
    assert gate_problems(contract, [drifted])
    assert gate_problems(contract, [{**body, "input_ids": "1 2 3"}])


# ---- what --engine sglang refuses, tied to the SGLang source that makes it necessary ----------


def _config_error(**sections: dict) -> str | None:
    """The ConfigError a config of these sections (plus --engine sglang) raises, or None."""
    from runtime.config import ConfigError, build

    try:
        build({"engine": {"engine": "sglang"}, **sections})
    except ConfigError as exc:
        return str(exc)
    return None


def test_keep_mode_is_refused_while_sglang_flushes_under_held_requests(src):
    """An in_place pause holds requests; SGLang's weight load then flushes the prefix cache by
    default, which it refuses while requests are held, so the load fails. Until the client sends
    flush_cache false, --partial-rollout-mode keep must be refused on SGLang (and recompute,
    pause mode abort, is its default)."""
    flushes = sgl.field_default(src, sgl.IO_STRUCT, "UpdateWeightFromDiskReqInput", "flush_cache") is True
    sent_flag = "flush_cache" in inspect.getsource(EngineClient.update_weights_from_disk)
    refused = _config_error(**{"async": {"partial_rollout_mode": "keep"}})
    assert (refused is not None) == (flushes and not sent_flag), (
        f"flush_cache default {flushes}, client sends it: {sent_flag}, config says: {refused}")
    assert refused is None or refused.startswith("--partial-rollout-mode: ")
    assert _config_error() is None


def test_collective_transport_is_refused_while_sglang_needs_a_session(src):
    """SGLang 0.5.23 loads /update_weights_from_distributed buckets only between
    /begin_weight_update and /end_weight_update: --engine sglang refuses nccl and gloo unless the
    client opens that session (it does: runtime.weight_transport calls it around every load)."""
    needs_session = src.has(sgl.WEIGHT_UPDATER) and "begin_weight_update()" in src.read(sgl.WEIGHT_UPDATER)
    opens_session = hasattr(EngineClient, "begin_weight_update")
    gpus = {"actor_num_gpus_per_node": 1, "rollout_num_gpus": 1}  # what nccl needs besides
    for transport in ("nccl", "gloo"):
        refused = _config_error(placement={**gpus, "weight_transport": transport})
        assert (refused is not None) == (needs_session and not opens_session), refused
        assert refused is None or refused.startswith("--weight-transport: ")
    assert _config_error(placement={**gpus, "weight_transport": "auto"}) is None  # auto: shm


# ---- mutation checks: the same functions catch a drifted name -----------------------------


def _generate_body(sent: list[Sent]) -> dict:
    return next(s.body for s in sent if s.path == "/generate" and "rid" in s.body)


def test_mutation_sampling_key_is_caught(src, sent):
    body = _generate_body(sent)
    assert not generate_body_problems(src, [body])
    sampling = dict(body["sampling_params"])
    sampling["max_new_token"] = sampling.pop("max_new_tokens")
    problems = generate_body_problems(src, [{**body, "sampling_params": sampling}])
    assert problems and all("'max_new_token'" in p for p in problems), problems


def test_mutation_body_field_is_caught(src, sent):
    body = dict(_generate_body(sent))
    body["return_logprobs"] = body.pop("return_logprob")
    assert any("'return_logprobs'" in p for p in generate_body_problems(src, [body]))
    pause = next(s for s in sent if s.path == "/pause_generation")
    drifted = Sent(pause.client_method, pause.method, pause.path, {"pause_mode": "abort"})
    assert any("'pause_mode'" in p for p in control_body_problems(src, [drifted]))


def test_mutation_response_field_is_caught(src):
    drifted = msgspec.defstruct(
        "MetaInfo",
        [(n if n != "weight_version" else "weights_version", Any) for n in struct_names(replies.MetaInfo)],
    )
    problems = response_problems(
        "meta_info", drifted, sgl.meta_info_keys(src), source="meta_info", allowed=KNOWN_EXTENSIONS["meta_info"]
    )
    assert problems == ["meta_info (MetaInfo): 'weights_version' is not in meta_info"]
    update = msgspec.defstruct("WeightUpdateResult", [("succes", bool)])
    assert route_response_problems(src, "/update_weights_from_disk", update)


def test_mutation_route_is_caught(src, sent):
    drifted = [Sent("pause", "POST", "/pause_generations", {"mode": "abort"}), Sent("x", "GET", "/abort_request", None)]
    problems = route_problems(drifted, sgl.routes(src))
    assert len(problems) == 2
    assert any("no route /pause_generations" in p for p in problems)
    assert any("GET /abort_request; SGLang accepts only ['POST']" in p for p in problems)


# ---- the wheel cache -----------------------------------------------------------------------


def test_a_cached_wheel_is_reused_without_pip(tmp_path, monkeypatch):
    (tmp_path / "sglang-0.5.1-py3-none-any.whl").write_bytes(b"")
    (tmp_path / "sglang-0.5.10-py3-none-any.whl").write_bytes(b"")

    def no_pip(*args, **kwargs):
        raise AssertionError("pip must not run when a wheel is cached")

    monkeypatch.setattr(sgl.subprocess, "run", no_pip)
    assert sgl.ensure_wheel(tmp_path).name == "sglang-0.5.10-py3-none-any.whl"


def test_a_failed_download_names_the_command(tmp_path, monkeypatch):
    def offline(cmd, **kwargs):
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: Could not find a version that satisfies sglang")

    monkeypatch.setattr(sgl.subprocess, "run", offline)
    with pytest.raises(
        sgl.SglangUnavailable, match=r"pip download sglang --no-deps --only-binary=:all:.*exited with 1"
    ):
        sgl.ensure_wheel(tmp_path)
    assert not list(tmp_path.iterdir()), "a failed download must leave nothing behind"


# ---- launching real SGLang ------------------------------------------------------------------


def test_sglang_command_defaults():
    assert sglang_command(model_path="/m", port=30000, python="py") == [
        "py", "-m", "sglang.launch_server", "--model-path", "/m", "--host", "127.0.0.1", "--port", "30000",
        "--tp-size", "1",
    ]  # fmt: skip
    assert sglang_command(model_path="/m", port=1)[0] == sys.executable


def test_sglang_command_passthrough_and_api_key():
    cmd = sglang_command(
        model_path="/m",
        port=30001,
        host="0.0.0.0",
        tp_size=2,
        api_key="k",
        passthrough={
            "mem-fraction-static": "0.7",
            "skip-server-warmup": True,
            "enable-foo": False,
            "chunked_prefill_size": 512,
        },
        python="py",
    )
    assert cmd == [
        "py", "-m", "sglang.launch_server", "--model-path", "/m", "--host", "0.0.0.0", "--port", "30001",
        "--tp-size", "2", "--api-key", "k", "--mem-fraction-static", "0.7", "--skip-server-warmup",
        "--chunked-prefill-size", "512",
    ]  # fmt: skip


@pytest.mark.parametrize("key", sorted(RUNTIME_OWNED_FLAGS | {"model_path", "api_key", "tp_size"}))
def test_sglang_command_refuses_runtime_owned_flags(key):
    with pytest.raises(ValueError, match="set by the runtime"):
        sglang_command(model_path="/m", port=1, passthrough={key: "x"})


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        (dict(port=0), ValueError),
        (dict(port=70000), ValueError),
        (dict(tp_size=0), ValueError),
        (dict(api_key=""), ValueError),
        (dict(passthrough={"--mem-fraction-static": "0.7"}), ValueError),
        (dict(passthrough={"": "x"}), ValueError),
        (dict(passthrough={"mem_fraction_static": "0.7", "mem-fraction-static": "0.8"}), ValueError),
        (dict(passthrough={"mem-fraction-static": ["0.7"]}), TypeError),
    ],
)
def test_sglang_command_rejects_bad_input(kwargs, error):
    with pytest.raises(error):
        sglang_command(**{"model_path": "/m", "port": 1, **kwargs})


def test_parse_sglang_passthrough():
    argv = [
        "--steps", "3", "--sglang-mem-fraction-static", "0.7", "--sglang-skip-server-warmup", "--out", "x",
        "--sglang-weight-version=0", "--sglang-random-seed", "-1", "--sglang-json-model-override-args=-x",
        "--sglang-enable-metrics",
    ]  # fmt: skip
    options, rest = parse_sglang_passthrough(argv)
    assert options == {
        "mem-fraction-static": "0.7",
        "skip-server-warmup": True,
        "weight-version": "0",
        "random-seed": "-1",
        "json-model-override-args": "-x",
        "enable-metrics": True,
    }
    assert rest == ["--steps", "3", "--out", "x"]
    assert parse_sglang_passthrough(["a", "--sglang-x", "--", "--sglang-y", "1"]) == (
        {"x": True},
        ["a", "--", "--sglang-y", "1"],
    )
    assert parse_sglang_passthrough(["--sglang-x="]) == ({"x": ""}, [])
    assert parse_sglang_passthrough([]) == ({}, [])
    for bad in (["--sglang-", "1"], ["--sglang-=1"], ["--sglang-x", "1", "--sglang-x=2"]):
        with pytest.raises(ValueError):
            parse_sglang_passthrough(bad)


def test_passthrough_round_trip():
    options, rest = parse_sglang_passthrough(
        ["run", "--sglang-mem-fraction-static", "0.7", "--sglang-skip-server-warmup"]
    )
    cmd = sglang_command(model_path="/m", port=5, passthrough=options, python="py")
    assert cmd[-3:] == ["--mem-fraction-static", "0.7", "--skip-server-warmup"] and rest == ["run"]
    # a bare flag followed by a positional argument takes it as its value: documented, so tested
    assert parse_sglang_passthrough(["--sglang-skip-server-warmup", "run"]) == ({"skip-server-warmup": "run"}, [])
    with pytest.raises(ValueError, match="--port"):
        sglang_command(model_path="/m", port=5, passthrough=parse_sglang_passthrough(["--sglang-port=1"])[0])


def test_emitted_flags_are_sglang_server_flags(src):
    """Every flag sglang_command emits (its own and the PROTOCOL.md passthrough examples) is a
    `sglang.launch_server` argument, taking a value exactly when SGLang's takes one."""
    assert src.has("sglang/launch_server.py"), "python -m sglang.launch_server would not exist"
    cmd = sglang_command(
        model_path="/m",
        port=30000,
        api_key="k",
        device="cuda",
        dtype="bfloat16",
        max_running_requests=512,
        weight_version="0",
        passthrough={"mem-fraction-static": "0.7", "skip-server-warmup": True, "enable-metrics": True},
        python="py",
    )
    flags = sgl.server_flags(src)
    args = cmd[3:]
    emitted = [
        (a, i + 1 < len(args) and not args[i + 1].startswith("--")) for i, a in enumerate(args) if a.startswith("--")
    ]
    assert {a for a, _ in emitted} == {
        "--model-path", "--host", "--port", "--tp-size", "--api-key", "--mem-fraction-static", "--skip-server-warmup",
        "--weight-version", "--device", "--dtype", "--max-running-requests", "--enable-metrics",
    }  # fmt: skip
    problems = []
    for flag, has_value in emitted:
        if flag not in flags:
            problems.append(f"{flag} is not a server flag of sglang {src.version}")
        elif flags[flag][0] is not None and flags[flag][0] != has_value:
            kind = "takes a value" if flags[flag][0] else "is a bare flag"
            problems.append(f"{flag} {kind} in SGLang ({flags[flag][1]})")
    assert not problems, "\n".join(problems)
    # the runtime-owned names that SGLang knows are refused; the rest are defensive spellings
    assert {f"--{n}" for n in RUNTIME_OWNED_FLAGS} & set(flags) >= {
        "--model-path", "--model", "--host", "--port", "--tp-size", "--tensor-parallel-size", "--api-key",
        "--device", "--dtype", "--max-running-requests", "--weight-version",
    }  # fmt: skip
