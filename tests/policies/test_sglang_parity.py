"""The embedded server and ``--engine sglang`` against SGLang's source: each SGLang sampling and
/generate field is honoured, refused with a 400 or text-only, at SGLang's own defaults; and what
``--engine sglang`` refuses (keep mode, collective weight transport) is tied to the source facts
that force it, so lifting a limit on either side fails a test until both agree. The rationale
and the skip rule: test_sglang_requests.py."""

from __future__ import annotations

import inspect

import msgspec
import pytest
import sglang_answers
import sglang_api
import sglang_source as sgl
from sglang_checks import default_problems

from policies.engine import wire
from policies.engine.client import EngineClient

pytestmark = pytest.mark.timeout(120)


def test_every_sglang_sampling_param_is_honoured_refused_or_text_only(src):
    """The embedded server's side: each SamplingParams field of SGLang is implemented, refused with
    a 400 when set (at SGLang's own default it is accepted), or changes only text."""
    sglang = sglang_api.class_fields(src, sgl.SAMPLING_PARAMS, "SamplingParams")
    honoured = {f.encode_name for f in msgspec.structs.fields(wire.SamplingParams)} - set(wire.REFUSED_SAMPLING)
    unaccounted = set(sglang) - honoured - set(wire.REFUSED_SAMPLING) - set(wire.IGNORED_SAMPLING)
    problems = [f"SamplingParams.{n} ({sglang[n]}) is not honoured, refused or text-only" for n in sorted(unaccounted)]
    problems += default_problems(src, sgl.SAMPLING_PARAMS, "SamplingParams", wire.REFUSED_SAMPLING)
    problems += [f"honoured {n} is not an SGLang field" for n in sorted(honoured - set(sglang))]
    assert not problems, f"sglang {src.version}:\n" + "\n".join(problems)


def test_refused_and_logprob_generate_fields_are_sglangs(src):
    sglang = sglang_api.class_fields(src, sgl.IO_STRUCT, "GenerateReqInput")
    honoured = {"input_ids", "text", "sampling_params", "return_logprob", "logprob_start_len", "top_logprobs_num",
                "rid", "stream", "lora_path"}  # fmt: skip
    assert honoured | {f.encode_name for f in msgspec.structs.fields(wire.GenerateReqInput)} == honoured | set(
        wire.REFUSED_GENERATE
    )
    declared = honoured | set(wire.REFUSED_GENERATE)
    problems = [f"{n} is not a GenerateReqInput field" for n in sorted(declared - set(sglang))]
    problems += default_problems(src, sgl.IO_STRUCT, "GenerateReqInput", wire.REFUSED_GENERATE)
    assert not problems, f"sglang {src.version}:\n" + "\n".join(problems)


def test_logprob_meta_keys_are_sglangs(src):
    written = sglang_answers.meta_info_keys(src)
    for key in ("input_token_logprobs", "output_token_logprobs", "input_top_logprobs", "output_top_logprobs"):
        assert key in written, f"sglang {src.version} writes no meta_info[{key!r}]"


# ---- what --engine sglang refuses, tied to the SGLang source that makes it necessary -------------


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
    flushes = sglang_api.field_default(src, sgl.IO_STRUCT, "UpdateWeightFromDiskReqInput", "flush_cache") is True
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
