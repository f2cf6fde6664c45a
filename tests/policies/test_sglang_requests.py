"""What the engine client sends is what SGLang's real API takes: checked against the source of the
newest sglang release, without running SGLang (it needs a GPU).

Why a source check: SGLang parses request bodies into dataclasses/Structs that *ignore* unknown
fields, so a misspelled field (`max_new_token`) or a renamed one is silently dropped by a real
server, and the embedded engine, written to the same protocol, cannot catch that. Here the
client is run against a recording fake server (sglang_client_record.py) to learn exactly which
routes, methods and JSON fields it sends; each is then looked up in the sglang wheel (downloaded
once, read as a zip, parsed with `ast`; see sglang_source.py): routes and methods in
http_server.py, body fields in the request model each route's handler declares (io_struct.py),
`sampling_params` keys in SamplingParams (and in the generated JSON contract gate of newer
releases, which rejects unknown keys with HTTP 400). Where the release ships its generated JSON
contract codec (sglang/api/v1/api_types.py, which SGLang runs on every /generate body), the
client's bodies are run through it; that pure-msgspec module is the only sglang code executed.
Routes SGLang marks deprecated must not be used (or be listed with a reason). The mutation tests
show that the same checks fail on a one-letter drift.

What the client reads back: test_sglang_replies.py; the embedded server and ``--engine sglang``
against SGLang: test_sglang_parity.py; the launch command: test_sglang_command.py. Without network
and without a cached wheel the sglang-dependent tests skip, naming the pip command that failed;
with a cached wheel (~/.cache/asyncrl/sglang/) they always run.
"""

from __future__ import annotations

import ast
import inspect
from typing import Any

import pytest
import sglang_api
from sglang_checks import (
    CLIENT_FILE,
    DEPRECATED_IN_USE,
    control_body_problems,
    gate_problems,
    generate_body_problems,
    route_problems,
)
from sglang_client_record import EXERCISES, NOT_EXERCISED, Sent

from policies.engine.client import PAUSE_MODES, SGLANG_SAMPLING_KEYS, EngineClient

pytestmark = pytest.mark.timeout(120)


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


def test_routes_and_methods_exist(src, sent):
    problems = route_problems(sent, sglang_api.routes(src))
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
    routes = sglang_api.routes(src)
    posted = {s.path for s in sent if s.body}
    models = {path: sglang_api.request_model(src, routes[path][0]) for path in posted if path in routes}
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
    fields = sglang_api.class_fields(src, "sglang/srt/weight_sync/tensor_bucket.py", "FlattenedTensorMetadata")
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


def test_pause_modes_are_sglang_modes(src):
    model = sglang_api.request_model(src, sglang_api.routes(src)["/pause_generation"][0])
    modes = sglang_api.literal_values(src, *model, "mode")
    assert set(PAUSE_MODES) <= modes, f"{model[1]}.mode allows {sorted(modes)}; client allows {PAUSE_MODES}"


def test_deprecated_routes_are_not_used(src, sent):
    """A route SGLang deprecates (its handler's docstring says so) will be removed: the client must
    move off it, or it is listed in DEPRECATED_IN_USE with the reason it stays."""
    deprecated = sglang_api.deprecated_routes(src)
    used = {s.path for s in sent} & set(deprecated)
    assert used == set(DEPRECATED_IN_USE), "\n".join(f"{r}: {deprecated[r]}" for r in sorted(used))


# ---- SGLang's own JSON contract codec (newer releases): the bodies, run through it ---------------


def test_generate_bodies_pass_sglangs_gate(contract, sent):
    bodies = [s.body for s in sent if s.path == "/generate"]
    assert any(isinstance(b["input_ids"][0], list) for b in bodies), "no batched /generate exercised"
    problems = gate_problems(contract, bodies)
    assert not problems, "\n".join(problems)


def test_mutation_gate_catches_drift(contract, sent):
    body = _generate_body(sent)
    assert not gate_problems(contract, [body])
    drifted = {**body, "sampling_params": {**body["sampling_params"], "max_new_token": 8}}
    assert gate_problems(contract, [drifted])
    assert gate_problems(contract, [{**body, "input_ids": "1 2 3"}])


# ---- mutation checks: the same functions catch a drifted name ------------------------------------


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


def test_mutation_route_is_caught(src, sent):
    drifted = [Sent("pause", "POST", "/pause_generations", {"mode": "abort"}), Sent("x", "GET", "/abort_request", None)]
    problems = route_problems(drifted, sglang_api.routes(src))
    assert len(problems) == 2
    assert any("no route /pause_generations" in p for p in problems)
    assert any("GET /abort_request; SGLang accepts only ['POST']" in p for p in problems)
