"""What an engine answers, decoded: SGLang's response shapes and the typed results the client returns.

The response structs ignore unknown fields, so SGLang's richer answers decode too; fields SGLang
sends only sometimes default to None. ``to_output`` turns one /generate answer into a
``GenerateOutput`` and refuses one whose logprobs or weight-version spans do not fit its tokens.
"""

from __future__ import annotations

from typing import Any

import msgspec

from policies.engine.errors import EngineError


class GenerateOutput(msgspec.Struct, frozen=True):
    """One finished (or aborted) generation.

    logprobs[i] is the behaviour logprob of output_ids[i] (empty if logprobs were not asked for).
    weight_version is the engine's version when the response was produced; finish_reason is
    "stop", "length" or "abort" (an aborted request returns the tokens generated so far).
    token_versions is the version of each token when the engine reports it (SGLang >= 0.5.23's
    ``meta_info.weight_versions`` spans, which the embedded engine also sends), None otherwise.
    """

    output_ids: list[int]
    logprobs: list[float]
    finish_reason: str
    weight_version: str
    prompt_tokens: int
    completion_tokens: int
    latency_s: float
    token_versions: list[str] | None = None


class WeightUpdateResult(msgspec.Struct, frozen=True):
    success: bool
    message: str = ""
    num_paused_requests: int = 0


class LoRAUpdateOutput(msgspec.Struct, frozen=True):
    """SGLang's answer to /load_lora_adapter and /unload_lora_adapter."""

    success: bool
    error_message: str | None = None


# ---- response shapes (SGLang's; unknown fields ignored) -----------------------------------


class CollectiveResult(msgspec.Struct):
    success: bool
    message: str = ""
    paused_s: float | None = None  # the embedded engine's pause-less swap


class FinishReason(msgspec.Struct):
    type: str


class VersionSpan(msgspec.Struct):
    """Output tokens [start, end) were produced by weights at ``version``."""

    version: str
    start: int
    end: int


class MetaInfo(msgspec.Struct):
    finish_reason: FinishReason | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    e2e_latency: float = 0.0
    weight_version: str = ""
    output_token_logprobs: list[tuple[float, int, Any]] | None = None
    weight_versions: list[VersionSpan] | None = None


class GenerateResponse(msgspec.Struct):
    output_ids: list[int]
    meta_info: MetaInfo


class WeightVersion(msgspec.Struct):
    weight_version: str


def to_output(resp: GenerateResponse, return_logprob: bool, *, url: str) -> GenerateOutput:
    """One /generate answer of the engine at ``url`` as a ``GenerateOutput``; EngineError if it
    does not hold together."""
    meta = resp.meta_info
    if meta.finish_reason is None:
        raise EngineError(url, "/generate", "response has no finish_reason")
    logprobs = [entry[0] for entry in meta.output_token_logprobs or ()]
    if return_logprob and len(logprobs) != len(resp.output_ids):
        raise EngineError(url, "/generate", f"{len(logprobs)} logprobs for {len(resp.output_ids)} output tokens")
    versions = None if meta.weight_versions is None else _expand(meta.weight_versions)
    if meta.weight_versions is not None and (versions is None or len(versions) != len(resp.output_ids)):
        raise EngineError(
            url, "/generate", f"weight_versions spans {msgspec.to_builtins(meta.weight_versions)} "
            f"do not cover the {len(resp.output_ids)} output tokens contiguously from 0"
        )
    return GenerateOutput(
        output_ids=resp.output_ids,
        logprobs=logprobs,
        finish_reason=meta.finish_reason.type,
        weight_version=meta.weight_version,
        prompt_tokens=meta.prompt_tokens,
        completion_tokens=meta.completion_tokens or len(resp.output_ids),
        latency_s=meta.e2e_latency,
        token_versions=versions,
    )


def _expand(spans: list[VersionSpan]) -> list[str] | None:
    """Per-token versions from contiguous spans; None when the spans have a gap or overlap."""
    out: list[str] = []
    for span in spans:
        if span.start != len(out) or span.end < span.start:
            return None
        out += [span.version] * (span.end - span.start)
    return out
