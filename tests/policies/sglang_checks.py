"""The checks of the SGLang contract: pure functions over client-side names and SGLang-side facts
(sglang_source.py), each returning the problems it finds as lines, so a test asserts none and a
mutation test shows the same function catches a drifted name."""

from __future__ import annotations

import ast
from pathlib import Path

import msgspec
import sglang_api
import sglang_source as sgl
from sglang_client_record import Sent

from policies.engine import client as client_module

CLIENT_FILE = Path(client_module.__file__)


# Response fields the client reads that SGLang does not produce, on purpose: none today.
KNOWN_EXTENSIONS: dict[str, set[str]] = {"meta_info": set()}


# Fields SGLang sends only sometimes (weight_versions: when the scheduler recorded spans): the
# client must treat them as optional (default None).
SOMETIMES_SENT = {"weight_versions"}


# Routes SGLang marks deprecated that the client still calls, each with why it is kept: a new one
# fails test_no_deprecated_routes.
DEPRECATED_IN_USE = {"/get_server_info": "debugging only (tests); the embedded engine also serves /server_info"}


# Response fields of the embedded engine's own that SGLang never sends, read as optional.
COLLECTIVE_EXTENSIONS = {"paused_s"}


def route_problems(sent: list[Sent], routes: dict[str, list[sglang_api.Route]]) -> list[str]:
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
    req_model = next(sglang_api.request_model(src, r) for r in sglang_api.routes(src)["/generate"])
    top = sglang_api.class_fields(src, *req_model)
    sampling = sglang_api.class_fields(src, sgl.SAMPLING_PARAMS, "SamplingParams")
    problems = []
    for body in bodies:
        problems += field_problems("/generate body field", set(body), top, source=f"{req_model[1]} ({req_model[0]})")
        params = body.get("sampling_params") or {}
        keys = set().union(*params) if isinstance(params, list) else set(params)  # a batch: one dict per prompt
        problems += field_problems(
            "/generate sampling_params key", keys, sampling, source=f"SamplingParams ({sgl.SAMPLING_PARAMS})"
        )
        if src.has(sgl.API_CONTRACT):
            gate = sglang_api.class_fields(src, sgl.API_CONTRACT, "SamplingParams")
            problems += field_problems(
                "/generate sampling_params key",
                keys,
                gate,
                source=f"the /generate contract gate's SamplingParams ({sgl.API_CONTRACT}; unknown keys → HTTP 400)",
            )
    return sorted(set(problems))


def control_body_problems(src: sgl.SglangSource, sent: list[Sent]) -> list[str]:
    """Each non-/generate JSON body vs the request model its SGLang handler declares."""
    routes = sglang_api.routes(src)
    problems = []
    for s in sent:
        if s.path == "/generate" or s.path not in routes:
            continue  # /generate: generate_body_problems; a missing route: route_problems
        models = {m for r in routes[s.path] if s.method in r.methods and (m := sglang_api.request_model(src, r))}
        if not models:
            if s.body:
                problems.append(f"{s.method} {s.path} sends {sorted(s.body)}, but its handler declares no body model")
            continue
        available = {}
        for model in models:
            available.update(sglang_api.class_fields(src, *model))
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
    routes = sglang_api.routes(src)
    if route not in routes:
        # say where SGLang does report the missing fields, so the fix is obvious
        hints = []
        for name in sorted(struct_names(struct)):
            for path, declared in sorted(routes.items()):
                for r in declared:
                    if name in (keys := sglang_api.handler_dict_keys(src, r)):
                        hints.append(f"{name!r} is returned by {sorted(r.methods)} {path} ({keys[name]})")
        return [
            f"response of {route} ({struct.__name__}): SGLang has no route {route} in {sgl.HTTP_SERVER}"
            + ("; " + "; ".join(hints) if hints else "")
        ]
    produced: dict[str, str] = {}
    for r in routes[route]:
        produced.update(sglang_api.handler_dict_keys(src, r))
    return response_problems(f"response of {route}", struct, produced, source=f"the {route} handler's answer")


def default_problems(src, path: str, cls: str, table: dict[str, object]) -> list[str]:  # noqa: ANN001
    """A refused field is accepted at its default: that default must be SGLang's (None always is)."""
    problems = []
    for name, default in table.items():
        try:
            theirs = sglang_api.field_default(src, path, cls, name)
        except LookupError:
            continue  # no literal default (a field() call): only None and `default` are accepted
        if theirs not in (None, default):
            problems.append(f"{cls}.{name}: SGLang's default is {theirs!r}, the engine accepts {default!r}")
    return problems


def gate_problems(contract, bodies: list[dict]) -> list[str]:
    """What SGLang's /generate contract gate (HTTP 400) says about each body."""
    problems = []
    for body in bodies:
        try:
            contract.GenerateRequest.from_json_value(body)
        except contract.JsonContractError as exc:
            problems.append(f"/generate body {body} is refused by SGLang's contract gate: {exc}")
    return problems
