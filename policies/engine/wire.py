"""Request bodies the embedded server accepts, as msgspec structs (SGLang's field names).

Decoding is the validation edge: a body that does not fit these types is a 400. Fields SGLang does
not define are ignored (msgspec's default). Fields SGLang defines that change what it answers but
that this engine does not implement (REFUSED_SAMPLING, REFUSED_GENERATE) are declared only to be
refused with a 400 naming them when set to anything but SGLang's default, so a client written for
SGLang never gets different sampling or a silently missing field.
`split_generate` turns a /generate body (one prompt, a batch, or `n` parallel samples) into one
`GenerateItem` per output, as SGLang's `GenerateReqInput.normalize_batch_and_arguments` does.
Semantic checks that need the model (vocab size, context length) live in `request.build_request`.
"""

from __future__ import annotations

import uuid
from typing import Any, NamedTuple

import msgspec

PAUSE_MODES = ("abort", "retract", "in_place")


class BadRequest(ValueError):
    """A request the server refuses with HTTP 400; the message is the one-line reason."""


class Unavailable(RuntimeError):
    """The server cannot take the request now (shutting down): HTTP 503."""


# SGLang sampling parameters (sampling/sampling_params.py) this engine does not implement, with
# SGLang's default: a body that sets one to anything else is refused. The text-only ones
# (skip_special_tokens, spaces_between_special_tokens, no_stop_trim, stream_interval) change no
# token and are accepted: this engine returns no text.
REFUSED_SAMPLING: dict[str, Any] = {
    "stop": None,
    "stop_regex": None,
    "min_p": 0.0,
    "frequency_penalty": 0.0,
    "presence_penalty": 0.0,
    "repetition_penalty": 1.0,
    "min_new_tokens": 0,
    "json_schema": None,
    "regex": None,
    "ebnf": None,
    "structural_tag": None,
    "custom_params": None,
    "beam_width": None,
    "watermark": None,
}

# SGLang sampling parameters accepted and ignored: they change only text, which this engine does not
# return, or are SGLang's internal fields.
IGNORED_SAMPLING = (
    "skip_special_tokens", "spaces_between_special_tokens", "no_stop_trim", "stream_interval",
    "stop_strs", "stop_regex_strs", "stop_str_max_len", "stop_regex_max_len", "is_normalized",
    "ebnf_full_assistant",
)  # fmt: skip

# GenerateReqInput fields (managers/io_struct.py) that change the answer and are not implemented.
# Routing, tracing and bookkeeping fields (priority, routing_key, log_metrics, ...) change nothing
# a client reads back and stay ignored.
REFUSED_GENERATE: dict[str, Any] = {
    "input_embeds": None,
    "image_data": None,
    "video_data": None,
    "audio_data": None,
    "token_ids_logprob": None,
    "return_text_in_logprobs": False,
    "return_sampling_mask": False,
    "sampling_logprobs_mode": None,
    "return_flat_raw_top_logprobs": False,
    "return_flat_raw_output_top_logprobs": False,
    "watermark": None,
    "return_hidden_states": False,
    "return_routed_experts": False,
    "return_entropy": False,
    "return_prompt_token_ids": False,
    "session_params": None,
    "custom_logit_processor": None,
    "positional_embed_overrides": None,
    "max_thinking_tokens": None,
}


def _refuse(struct: msgspec.Struct, table: dict[str, Any], where: str) -> None:
    for name, default in table.items():
        value = getattr(struct, name)
        if value is not None and value != default and value != []:
            raise BadRequest(f"{where}{name} is not supported by the embedded engine (got {value!r})")


def _refused_fields(name: str, table: dict[str, Any]) -> type[msgspec.Struct]:
    """A base struct declaring each field of ``table`` (Any, default None), so a body that sets one
    decodes and ``_refuse`` can name it, instead of the field being ignored as unknown."""
    return msgspec.defstruct(name, [(field, Any, None) for field in table], kw_only=True)


# Declared only so that setting one is refused (see REFUSED_SAMPLING): every name, typed Any, default None.
_RefusedSamplingFields = _refused_fields("_RefusedSamplingFields", REFUSED_SAMPLING)


class SamplingParams(_RefusedSamplingFields, kw_only=True):
    """SGLang sampling parameters; the subset the embedded engine honours.

    temperature 0 means greedy; top_k <= 0 means off (SGLang's "all" value 1 << 30 is off too).
    sampling_seed, when given, seeds a per-request generator so the sampled tokens do not depend
    on batch composition. n > 1 asks for n samples of each prompt (see `split_generate`).
    logit_bias maps token ids (JSON object keys, strings as in SGLang) to a value added to their
    logits before the temperature.
    """

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    max_new_tokens: int = 128
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    sampling_seed: int | None = None
    n: int = 1
    logit_bias: dict[str, float] | None = None

    def bias(self, vocab_size: int) -> tuple[tuple[int, float], ...]:
        """logit_bias as (token id, value) pairs; BadRequest for a key that is not a token id."""
        pairs = []
        for key, value in (self.logit_bias or {}).items():
            try:
                token = int(key)
            except ValueError:
                raise BadRequest(f"logit_bias key {key!r} is not a token id") from None
            if not 0 <= token < vocab_size:
                raise BadRequest(f"logit_bias key {token} is outside [0, {vocab_size})")
            pairs.append((token, float(value)))
        return tuple(pairs)

    def check(self) -> None:
        _refuse(self, REFUSED_SAMPLING, "sampling_params.")
        if self.temperature < 0:
            raise BadRequest(f"temperature must be >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise BadRequest(f"top_p must be in (0, 1], got {self.top_p}")
        if self.max_new_tokens < 0:
            raise BadRequest(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")
        if self.n < 1:
            raise BadRequest(f"n must be >= 1, got {self.n}")


# Declared only so that setting one is refused (see REFUSED_GENERATE).
_RefusedGenerateFields = _refused_fields("_RefusedGenerateFields", REFUSED_GENERATE)


class GenerateReqInput(_RefusedGenerateFields, kw_only=True):
    """Body of POST /generate: one prompt (`input_ids` a list of ints) or a batch (a list of lists,
    with `rid`, `sampling_params`, `return_logprob`, `logprob_start_len` and `top_logprobs_num`
    either one value or one per prompt). `text` is declared only to refuse it with a clear message.

    With return_logprob, logprob_start_len s >= 0 asks for the prompt's logprobs from position s
    (SGLang's input_token_logprobs; -1, the default, means the last prompt token only) and
    top_logprobs_num k > 0 for the k most likely tokens at each prompt and output position."""

    input_ids: list[int | list[int]] | None = None
    text: str | list[str] | None = None
    sampling_params: SamplingParams | list[SamplingParams] | None = None
    return_logprob: bool | list[bool] | None = False
    logprob_start_len: int | list[int] | None = None
    top_logprobs_num: int | list[int] | None = None
    rid: str | list[str] | None = None
    stream: bool = False
    lora_path: str | list[str | None] | None = None  # adapter names (policies/engine/lora_routes.py)


class GenerateItem(NamedTuple):
    """One generation a /generate body asks for (a batch member or one of n parallel samples).
    logprob_start_len is -1 (SGLang's default: the last prompt token) or a prompt position; it and
    top_logprobs_num matter only with return_logprob."""

    rid: str
    input_ids: list[int]
    sampling_params: SamplingParams
    return_logprob: bool
    logprob_start_len: int = -1
    top_logprobs_num: int = 0


# Added (times the copy index) to the sampling_seed of parallel sample j > 0: SGLang would give all
# n copies the same seed, hence the same tokens; copies here stay reproducible and differ.
PARALLEL_SEED_STRIDE = 0x9E3779B97F4A7C15


def split_generate(req: GenerateReqInput) -> tuple[bool, list[GenerateItem]]:
    """(single, items): `single` means answer one JSON object, else a list with one per item.

    SGLang's rules (io_struct.py): a list of lists is a batch; `n` > 1 makes even one prompt a
    batch, ordered prompt-major (prompt 0's n samples first) and must be equal across a list of
    sampling_params; a string rid becomes `{rid}_{k}` for output k, a list of rids names each
    prompt (its j-th parallel sample is then `{rid}_{j}`, where SGLang would draw fresh ids);
    rids must be unique. Raises BadRequest with one line.
    """
    if req.stream:
        raise BadRequest("stream not supported")
    if req.input_ids is None:
        raise BadRequest("input_ids is required (text input is not supported: token-in, token-out)")
    if not req.input_ids:
        raise BadRequest("input_ids is empty")
    _refuse(req, REFUSED_GENERATE, "")
    prompts = _prompts(req.input_ids)
    single = not isinstance(req.input_ids[0], list)
    params = _per_prompt(req.sampling_params or SamplingParams(), len(prompts), "sampling_params")
    for p in params:
        p.check()
    n = params[0].n
    if any(p.n != n for p in params):
        raise BadRequest("n must be the same in every sampling_params of a batch")
    if isinstance(req.return_logprob, list) and n > 1:
        raise BadRequest("return_logprob cannot be a list when n > 1")
    logprob = [bool(x) for x in _per_prompt(req.return_logprob, len(prompts), "return_logprob")]
    starts = _per_prompt(req.logprob_start_len, len(prompts), "logprob_start_len")
    tops = _per_prompt(req.top_logprobs_num, len(prompts), "top_logprobs_num")
    rids = _rids(req.rid, len(prompts), n, single=single)
    items = [
        GenerateItem(
            rids[i * n + j], prompt, _parallel_copy(params[i], j), logprob[i],
            _logprob_start(starts[i], len(prompt)), _top_count(tops[i]),
        )  # fmt: skip
        for i, prompt in enumerate(prompts)
        for j in range(n)
    ]
    return single and n == 1, items


def _logprob_start(start: int | None, prompt_len: int) -> int:
    """SGLang's rule: -1 (or unset) means the last prompt token; otherwise it must lie in the prompt."""
    if start is None or start == -1:
        return -1
    if not 0 <= start < prompt_len:
        raise BadRequest(
            f"logprob_start_len must be -1 or in [0, {prompt_len}) for a prompt of {prompt_len} tokens, got {start}"
        )
    return start


def _top_count(count: int | None) -> int:
    if count is not None and count < 0:
        raise BadRequest(f"top_logprobs_num must be >= 0, got {count}")
    return count or 0


def _prompts(input_ids: list[int | list[int]]) -> list[list[int]]:
    if all(isinstance(x, int) for x in input_ids):
        return [input_ids]
    if not all(isinstance(x, list) for x in input_ids):
        raise BadRequest("input_ids must be a list of token ids or a list of such lists, not a mix")
    if not all(input_ids):
        raise BadRequest("input_ids is empty for a member of the batch")
    return input_ids


def _per_prompt(value, count: int, name: str) -> list:  # noqa: ANN001 - one value or a list of them
    if not isinstance(value, list):
        return [value] * count
    if len(value) != count:
        raise BadRequest(f"{name} has {len(value)} entries for {count} prompts")
    return value


def _rids(rid: str | list[str] | None, prompts: int, n: int, *, single: bool) -> list[str]:
    if rid is None:
        return [uuid.uuid4().hex for _ in range(prompts * n)]
    if isinstance(rid, str):
        return [rid] if single and n == 1 else [f"{rid}_{k}" for k in range(prompts * n)]
    if len(rid) != prompts:
        raise BadRequest(f"rid has {len(rid)} entries for {prompts} prompts")
    rids = rid if n == 1 else [f"{r}_{j}" for r in rid for j in range(n)]
    if len(set(rids)) != len(rids):
        raise BadRequest("rids in a batch must be unique")
    return rids


def _parallel_copy(params: SamplingParams, j: int) -> SamplingParams:
    if j == 0 or params.sampling_seed is None:
        return params
    return msgspec.structs.replace(params, sampling_seed=(params.sampling_seed + j * PARALLEL_SEED_STRIDE) % 2**63)


class AbortReq(msgspec.Struct, kw_only=True):
    rid: str = ""
    abort_all: bool = False


class PauseReq(msgspec.Struct, kw_only=True):
    mode: str = "abort"


class UpdateWeightsFromDiskReq(msgspec.Struct, kw_only=True):
    model_path: str
    load_format: str | None = None
    abort_all_requests: bool = False
    weight_version: str | None = None


class UpdateWeightVersionReq(msgspec.Struct, kw_only=True):
    new_version: str
    abort_all_requests: bool = False


def decode(body: bytes, kind: type[msgspec.Struct]) -> msgspec.Struct:
    """Decode a JSON body into `kind`; an empty body means all defaults. Raises BadRequest."""
    try:
        return msgspec.json.decode(body or b"{}", type=kind)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise BadRequest(f"malformed {kind.__name__}: {exc}") from None
