"""Request bodies the embedded server accepts, as msgspec structs (SGLang's field names).

Decoding is the validation edge: a body that does not fit these types is a 400. Unknown fields are
ignored (msgspec's default), so a client written for real SGLang may send more than we use.
Semantic checks that need the model (vocab size, context length) live in `request.build_request`.
"""

from __future__ import annotations

import msgspec

PAUSE_MODES = ("abort", "retract", "in_place")


class BadRequest(ValueError):
    """A request the server refuses with HTTP 400; the message is the one-line reason."""


class Unavailable(RuntimeError):
    """The server cannot take the request now (shutting down): HTTP 503."""


class SamplingParams(msgspec.Struct, kw_only=True):
    """SGLang sampling parameters; the subset the embedded engine honours.

    temperature 0 means greedy; top_k <= 0 means off. sampling_seed, when given, seeds a
    per-request generator so the sampled tokens do not depend on batch composition.
    """

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    max_new_tokens: int = 128
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    sampling_seed: int | None = None

    def check(self) -> None:
        if self.temperature < 0:
            raise BadRequest(f"temperature must be >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise BadRequest(f"top_p must be in (0, 1], got {self.top_p}")
        if self.max_new_tokens < 0:
            raise BadRequest(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")


class GenerateReqInput(msgspec.Struct, kw_only=True):
    """Body of POST /generate. `text` is declared only to refuse it with a clear message."""

    input_ids: list[int] | None = None
    text: str | None = None
    sampling_params: SamplingParams = msgspec.field(default_factory=SamplingParams)
    return_logprob: bool = False
    rid: str | None = None
    stream: bool = False


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
