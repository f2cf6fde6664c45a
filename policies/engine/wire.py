"""Request bodies the embedded server accepts, as msgspec structs (SGLang's field names).

Decoding is the validation edge: a body that does not fit these types is a 400. Unknown fields are
ignored (msgspec's default), so a client written for real SGLang may send more than we use.
`split_generate` turns a /generate body (one prompt, a batch, or `n` parallel samples) into one
`GenerateItem` per output, as SGLang's `GenerateReqInput.normalize_batch_and_arguments` does.
Semantic checks that need the model (vocab size, context length) live in `request.build_request`.
"""

from __future__ import annotations

import uuid
from typing import NamedTuple

import msgspec

PAUSE_MODES = ("abort", "retract", "in_place")


class BadRequest(ValueError):
    """A request the server refuses with HTTP 400; the message is the one-line reason."""


class Unavailable(RuntimeError):
    """The server cannot take the request now (shutting down): HTTP 503."""


class SamplingParams(msgspec.Struct, kw_only=True):
    """SGLang sampling parameters; the subset the embedded engine honours.

    temperature 0 means greedy; top_k <= 0 means off. sampling_seed, when given, seeds a
    per-request generator so the sampled tokens do not depend on batch composition. n > 1 asks
    for n samples of each prompt (see `split_generate`).
    """

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    max_new_tokens: int = 128
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    sampling_seed: int | None = None
    n: int = 1

    def check(self) -> None:
        if self.temperature < 0:
            raise BadRequest(f"temperature must be >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise BadRequest(f"top_p must be in (0, 1], got {self.top_p}")
        if self.max_new_tokens < 0:
            raise BadRequest(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")
        if self.n < 1:
            raise BadRequest(f"n must be >= 1, got {self.n}")


class GenerateReqInput(msgspec.Struct, kw_only=True):
    """Body of POST /generate: one prompt (`input_ids` a list of ints) or a batch (a list of lists,
    with `rid`, `sampling_params` and `return_logprob` either one value or one per prompt).
    `text` is declared only to refuse it with a clear message."""

    input_ids: list[int | list[int]] | None = None
    text: str | list[str] | None = None
    sampling_params: SamplingParams | list[SamplingParams] | None = None
    return_logprob: bool | list[bool] = False
    rid: str | list[str] | None = None
    stream: bool = False


class GenerateItem(NamedTuple):
    """One generation a /generate body asks for (a batch member or one of n parallel samples)."""

    rid: str
    input_ids: list[int]
    sampling_params: SamplingParams
    return_logprob: bool


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
    logprob = _per_prompt(req.return_logprob, len(prompts), "return_logprob")
    rids = _rids(req.rid, len(prompts), n, single=single)
    items = [
        GenerateItem(rids[i * n + j], prompt, _parallel_copy(params[i], j), logprob[i])
        for i, prompt in enumerate(prompts)
        for j in range(n)
    ]
    return single and n == 1, items


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
