"""One generation request inside the embedded engine, from validated body to Completion."""

from __future__ import annotations

import asyncio
import itertools
import random
import time
from dataclasses import dataclass, field

import msgspec

from policies.engine.runner import ModelRunner, Row
from policies.engine.sampling import RowParams, Sampled, TopLogprobs
from policies.engine.wire import BadRequest, GenerateItem

_keys = itertools.count()  # Request.key: unique for the process's lifetime, unlike a client's rid


class FinishReason(msgspec.Struct, frozen=True, omit_defaults=True):
    """SGLang's finish_reason: stop (matched token), length (n tokens) or abort (message)."""

    type: str
    matched: int | None = None
    length: int | None = None
    message: str | None = None


class Completion(msgspec.Struct, frozen=True):
    """What a finished request returns. logprobs and token_versions are row-aligned with
    output_ids; weight_version is the version current when it finished (the only one it saw
    unless it was frozen across an update: token_versions then tells which token came from which)."""

    rid: str
    output_ids: list[int]
    logprobs: list[float]
    finish: FinishReason
    prompt_tokens: int
    weight_version: str
    latency_s: float
    token_versions: list[str] = msgspec.field(default_factory=list)
    top_logprobs: list[TopLogprobs | None] = msgspec.field(default_factory=list)
    prompt_logprobs: Sampled | None = None  # of prompt[logprob_start + 1:], when asked for


@dataclass(eq=False)
class Request:
    """One generation in flight. output_ids/logprobs/versions/context are mutated only by
    `Scheduler._apply` (between decode steps), and never once the request has finished.

    `key` names the request's row in the runner's KV cache; it is never reused, so a finished
    request's stale row can never be mistaken for a new request that reuses its rid.
    """

    rid: str
    prompt: list[int]
    max_new_tokens: int
    stop_ids: frozenset[int]
    params: RowParams
    future: asyncio.Future[Completion]
    probe: bool = False
    started: float = field(default_factory=time.perf_counter)
    output_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    versions: list[str] = field(default_factory=list)  # weight version that produced each token
    top_logprobs: list[TopLogprobs | None] = field(default_factory=list)  # when params.top_logprobs > 0
    # prompt logprobs from this position on (SGLang's logprob_start_len), or None when not asked
    logprob_start: int | None = None
    prompt_logprobs: Sampled | None = None  # filled by Scheduler.submit before the request queues
    key: int = field(default_factory=lambda: next(_keys))
    # prompt + output_ids, grown token by token: each step hands the runner this list rather than
    # a new concatenation per row (the runner only reads it, during the step)
    context: list[int] = field(init=False)

    def __post_init__(self) -> None:
        self.context = self.prompt + self.output_ids

    def row(self) -> Row:
        return Row(self.key, self.context, self.params)


def build_request(item: GenerateItem, runner: ModelRunner) -> Request:
    """Check `item` against the model and build its Request; raises BadRequest with one line."""
    _check(item, vocab_size=runner.vocab_size, max_context=runner.max_context)
    sp = item.sampling_params
    stop = set(sp.stop_token_ids or ())
    if not sp.ignore_eos:
        stop |= runner.eos_token_ids
    top = item.top_logprobs_num if item.return_logprob else 0
    generator = make_generator(sp.temperature, sp.sampling_seed)
    params = RowParams(sp.temperature, sp.top_p, sp.top_k, generator, sp.bias(runner.vocab_size), top)
    # prompt logprobs cost a forward of the prompt: only when asked for more than SGLang's default
    # (the last prompt token alone, whose entry is always None)
    wanted = item.return_logprob and 0 <= item.logprob_start_len < len(item.input_ids) - 1
    start = item.logprob_start_len if wanted else None
    # the decoded body's list is this request's own: no copy
    return Request(
        item.rid, item.input_ids, sp.max_new_tokens, frozenset(stop), params, new_future(), logprob_start=start
    )


def _check(item: GenerateItem, *, vocab_size: int, max_context: int) -> None:
    if min(item.input_ids) < 0 or max(item.input_ids) >= vocab_size:  # (never empty: wire.py refuses that)
        raise BadRequest(f"input_ids contain a token id outside [0, {vocab_size})")
    max_new = item.sampling_params.max_new_tokens
    if len(item.input_ids) + max_new > max_context:
        raise BadRequest(
            f"prompt of {len(item.input_ids)} tokens + max_new_tokens {max_new}"
            f" exceeds the context length (max_position_embeddings={max_context})"
        )


def new_future() -> asyncio.Future[Completion]:
    return asyncio.get_running_loop().create_future()


def make_generator(temperature: float, seed: int | None) -> random.Random | None:
    """A private RNG per sampled request (None when greedy), seeded for reproducibility if asked."""
    if temperature <= 0:
        return None
    return random.Random(seed % 2**63 if seed is not None else random.getrandbits(63))
