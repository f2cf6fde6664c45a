"""The /generate bodies the client sends, with only the fields and sampling keys SGLang accepts.

SGLang answers 400 for an unknown ``sampling_params`` key, so keys are checked here against its
list, before anything is sent.
"""

from __future__ import annotations

from typing import Any

# SamplingParams.__init__ keywords of SGLang 0.5.x; anything else would make SGLang reject the call.
SGLANG_SAMPLING_KEYS = frozenset(
    {
        "max_new_tokens", "stop", "stop_token_ids", "stop_regex", "temperature", "top_p", "top_k",
        "min_p", "frequency_penalty", "presence_penalty", "repetition_penalty", "min_new_tokens",
        "n", "json_schema", "regex", "ebnf", "structural_tag", "ignore_eos", "skip_special_tokens",
        "spaces_between_special_tokens", "no_stop_trim", "custom_params", "stream_interval",
        "logit_bias", "sampling_seed",
    }
)  # fmt: skip


def single(input_ids: list[int], sampling_params: dict[str, Any], *, rid: str | None, return_logprob: bool,
           lora_path: str | None) -> dict[str, Any]:
    """One prompt, one output (``n`` > 1 answers several: ``batch``)."""
    if _parallel(_checked([sampling_params])) != 1:
        raise ValueError("n > 1 answers several outputs: use generate_batch")
    return _body(list(input_ids), sampling_params, rid=rid, return_logprob=return_logprob, lora_path=lora_path)


def batch(input_ids: list[list[int]], sampling_params: dict[str, Any] | list[dict[str, Any]], *,
          rids: list[str] | None, return_logprob: bool, lora_path: str | None) -> tuple[dict[str, Any], int]:
    """SGLang's batch form, and the ``n`` outputs each prompt yields."""
    if not input_ids:
        raise ValueError("generate_batch needs at least one prompt")
    per_prompt = sampling_params if isinstance(sampling_params, list) else [sampling_params]
    if isinstance(sampling_params, list) and len(sampling_params) != len(input_ids):
        raise ValueError(f"{len(sampling_params)} sampling_params for {len(input_ids)} prompts")
    if rids is not None and len(rids) != len(input_ids):
        raise ValueError(f"{len(rids)} rids for {len(input_ids)} prompts")
    n = _parallel(_checked(per_prompt))
    body = _body([list(ids) for ids in input_ids], sampling_params, rid=None if rids is None else list(rids),
                 return_logprob=return_logprob, lora_path=lora_path)  # one adapter for the whole batch
    return body, n


def _body(input_ids: Any, sampling_params: Any, *, rid: Any, return_logprob: bool,
          lora_path: str | None) -> dict[str, Any]:
    body: dict[str, Any] = {"input_ids": input_ids, "sampling_params": sampling_params,
                            "return_logprob": return_logprob}
    if rid is not None:
        body["rid"] = rid
    if lora_path is not None:
        body["lora_path"] = lora_path
    return body


def _checked(sampling_params: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Refuse keys SGLang would reject (it answers 400 for unknown sampling_params keys)."""
    for params in sampling_params:
        unknown = set(params) - SGLANG_SAMPLING_KEYS
        if unknown:
            raise ValueError(f"sampling_params keys SGLang does not accept: {sorted(unknown)}")
    return sampling_params


def _parallel(sampling_params: list[dict[str, Any]]) -> int:
    """The n shared by every dict (SGLang refuses a batch whose dicts disagree)."""
    ns = {int(params.get("n", 1)) for params in sampling_params}
    if len(ns) != 1 or min(ns) < 1:
        raise ValueError(f"sampling_params n must be one value >= 1, got {sorted(ns)}")
    return ns.pop()
