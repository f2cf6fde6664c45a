"""What the engine client reads back is what SGLang answers: every response field the client
decodes (its msgspec structs, policies/engine/replies.py) is in the dict keys SGLang writes, and
the canned /generate answer decodes and re-encodes through SGLang's own JSON contract codec where
the release ships one. The rationale and the skip rule: test_sglang_requests.py."""

from __future__ import annotations

import ast
from typing import Any

import msgspec
import pytest
import sglang_answers
import sglang_api
import sglang_ast
import sglang_source as sgl
from sglang_checks import (
    COLLECTIVE_EXTENSIONS,
    KNOWN_EXTENSIONS,
    SOMETIMES_SENT,
    client_decodes,
    response_problems,
    route_response_problems,
    struct_names,
)
from sglang_client_record import GENERATE_ANSWER

from policies.engine import replies

pytestmark = pytest.mark.timeout(120)


def test_generate_response_fields_are_produced(src):
    meta_type = msgspec.structs.fields(replies.GenerateResponse)
    assert {f.name: f.type for f in meta_type}["meta_info"] is replies.MetaInfo
    problems = response_problems(
        "/generate response",
        replies.GenerateResponse,
        sglang_answers.generate_top_level_keys(src),
        source=f"the dicts {sgl.TOKENIZER_MANAGER} returns",
    )
    problems += response_problems(
        "meta_info",
        replies.MetaInfo,
        sglang_answers.meta_info_keys(src),
        source="the meta_info keys written in " + ", ".join(sglang_answers.meta_info_sources(src)),
        allowed=KNOWN_EXTENSIONS["meta_info"],
    )
    finish_keys, finish_types = sglang_answers.finish_reason_keys(src)
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


def test_collective_responses_are_produced(src):
    """The {"success", "message"} answers of the collective routes (decoded through a variable
    route in `_weights_call`, so client_decodes() does not see them)."""
    routes = sglang_api.routes(src)
    problems = []
    for route in ("/init_weights_update_group", "/update_weights_from_distributed", "/destroy_weights_update_group",
                  "/begin_weight_update", "/end_weight_update", "/update_weights_from_tensor"):
        produced = {k: v for r in routes[route] for k, v in sglang_api.handler_dict_keys(src, r).items()}
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

    fields = sglang_api.class_fields(src, sgl.IO_STRUCT, "LoRAUpdateOutput")
    read = {f.encode_name for f in msgspec.structs.fields(replies.LoRAUpdateOutput)}
    assert read <= set(fields), f"sglang {src.version}: LoRAUpdateOutput has {sorted(fields)}, client reads {read}"
    server = sglang_api.server_flags(src)
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
                    sglang_ast.add_dict_keys(written, inner, path)
    problems = response_problems("meta_info.weight_versions[]", replies.VersionSpan, written,
                                 source=f"add_weight_versions_to_meta_info ({path})")
    assert written and not problems, f"sglang {src.version}:\n" + "\n".join(problems)


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


def test_mutation_response_field_is_caught(src):
    drifted = msgspec.defstruct(
        "MetaInfo",
        [(n if n != "weight_version" else "weights_version", Any) for n in struct_names(replies.MetaInfo)],
    )
    problems = response_problems(
        "meta_info", drifted, sglang_answers.meta_info_keys(src), source="meta_info",
        allowed=KNOWN_EXTENSIONS["meta_info"],
    )
    assert problems == ["meta_info (MetaInfo): 'weights_version' is not in meta_info"]
    update = msgspec.defstruct("WeightUpdateResult", [("succes", bool)])
    assert route_response_problems(src, "/update_weights_from_disk", update)
