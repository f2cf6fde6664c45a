"""Generating one sample through the engines, resuming it across weight-update aborts.

Shared by the generator (training groups) and the evaluator (held-out prompts).
"""

from __future__ import annotations

import collections
import itertools
import time
from collections.abc import Callable, Hashable
from typing import Any, Protocol

from actors.shared_calls import SharedCalls
from buffers.types import Sample, Status
from policies.engine.client import EngineError, EngineLost, GenerateOutput
from runtime.core.failures import FailureBudget, RateLog

MAX_FAILOVERS = 50  # per sample: beyond this something is wrong beyond an engine dying


class VersionsUnknown(RuntimeError):
    """A misconfiguration, not a fault: it ends the run instead of being retried."""


class Engines(Protocol):
    async def generate_batch(self, input_ids: list[list[int]], sampling_params: list[dict], *,
                             rids: list[str] | None = None) -> list[GenerateOutput]: ...


class SampleRunner:
    """Drives one sample to completion: a loop of /generate calls.

    An answer that ends in "abort" (engines paused to swap weights) is resumed with prompt +
    tokens so far and the remaining budget. Tokens get the per-token versions the engine reports,
    or, when ``exact_answer_versions`` (the broadcaster aborts before every swap, so weights never
    change under a running request), the answer's one version. An answer with neither is an
    error: guessing would break the staleness accounting. An engine error is retried (the engine
    set routes to the least-loaded engine) up to ``retries`` times, then the sample fails with the
    reason. An engine that *failed* under the request (``EngineLost``) is failover, not an error:
    the request is re-sent at once with the tokens already received (their versions and logprobs
    kept), or from the prompt when none came back. Counts go to ``counters``.
    A sample whose prompt + ``max_new_tokens`` exceeds ``max_context`` (the model's context) is
    failed without a request, counted as ``prompts_too_long``: the engine would refuse it.
    Rounds that callers send in the same tick under one ``share`` key go in one call per serving
    engine (``actors.shared_calls``); errors stay per caller.
    """

    def __init__(self, *, engines: Engines, sampling_params: dict[str, Any], decode: Callable[[list[int]], str],
                 seed: int = 0, retries: int = 3, exact_answer_versions: bool = True, max_context: int | None = None,
                 budget: FailureBudget | None = None):
        self.engines = engines
        self.sampling_params = sampling_params
        self.max_new_tokens = int(sampling_params["max_new_tokens"])
        self.decode = decode
        self.seed = seed
        self.retries = retries
        self.exact_answer_versions = exact_answer_versions
        self.max_context = max_context  # None: unknown, the engine decides
        self.counters: collections.Counter[str] = collections.Counter()
        self.budget = budget or FailureBudget(limit=0)
        self._log = RateLog()
        self._rids = itertools.count()
        self._shared = SharedCalls(lambda ids, params, rids: engines.generate_batch(ids, params, rids=rids),
                                   width=lambda: _engine_count(engines))

    def fits(self, prompt_ids: list[int], limit: int | None = None) -> bool:
        """Whether a prompt leaves room in the model's context for a whole response (``limit`` tokens)."""
        limit = self.max_new_tokens if limit is None else limit
        return self.max_context is None or len(prompt_ids) + limit <= self.max_context

    async def run(self, sample: Sample) -> None:
        await self.run_group([sample])

    async def run_group(self, samples: list[Sample], *, attempt: int = 0, share: Hashable | None = None,
                        limit: int | None = None) -> None:
        """Drive ``samples`` (a group's, or any few) to completion, one batched /generate per round.

        Each round sends every still-pending sample as one member of a batch request (SGLang's
        batch form: one HTTP call for the group, not one per sample); members that come back
        aborted are resumed in the next round. Errors and failovers are per round, for the round's
        members, with the counts and limits of the class docstring. Sampling seeds are a function
        of (seed, group, sample, segment) and, for a group generated again from its prompt, of
        ``attempt``: the same seeds would replay the first attempt's answers.
        ``share``: a key under which this caller's rounds may ride in one call with other callers'
        (None: its own calls). Only for callers never cancelled apart from the others, and none
        of use before all of them are (``actors.shared_calls``).
        ``limit``: the response length at which generation stops (default ``max_new_tokens``); one
        turn of a multi-turn episode (``actors.conversation``) passes its own.
        """
        limit = self.max_new_tokens if limit is None else limit
        start = time.monotonic()
        for s in samples:
            s.timing.submitted = start
            self._refuse_if_too_long(s, limit)
        errors = failovers = 0
        while todo := self._pending(samples, limit):
            inputs, params, rids = self._round(todo, limit, attempt)
            try:
                if share is not None:
                    outs = await self._shared.generate_batch(share, inputs, params, rids)
                else:
                    outs = await self.engines.generate_batch(inputs, params, rids=rids)
            except EngineLost as e:
                failovers += 1
                for s in todo:
                    self.counters["failovers_resumed" if s.response_ids else "failovers_restarted"] += 1
                if failovers > MAX_FAILOVERS:
                    self._fail(todo, f"engines failed under these samples {failovers} times: {e}")
                continue
            except EngineError as e:
                errors += 1
                self.counters["engine_errors"] += 1
                self._log("engine_error", str(e))
                if errors > self.retries:
                    self._fail(todo, f"engine failed {errors} times: {e}")
                continue
            for s, out in zip(todo, outs, strict=True):
                self._apply(s, out)
        done = time.monotonic()
        for s in samples:
            s.timing.generated = done
            if s.status != Status.FAILED:
                s.response_text = self.decode(s.response_ids)
                self.budget.ok("engine")

    def _refuse_if_too_long(self, s: Sample, limit: int) -> None:
        """A new sample whose prompt leaves no room for ``limit`` tokens fails (counted), unsent."""
        if s.status == Status.PENDING and not s.response_ids and not self.fits(s.prompt_ids, limit):
            s.fail(f"prompt of {len(s.prompt_ids)} tokens + {limit} new tokens exceeds the "
                   f"model's context of {self.max_context}")
            self.counters["prompts_too_long"] += 1

    def _round(self, todo: list[Sample], limit: int, attempt: int) -> tuple[list[list[int]], list[dict], list[str]]:
        """One round's batch: each pending sample's tokens so far, its sampling parameters (the rest of
        its budget, its seed) and a readable rid (engine logs and the trace name the sample)."""
        inputs, params, rids = [], [], []
        for s in todo:
            key = (self.seed, s.group_id, s.index, s.n_segments) + ((attempt,) if attempt else ())
            params.append(dict(self.sampling_params, max_new_tokens=limit - len(s.response_ids),
                               sampling_seed=hash(key) % 2**31))
            inputs.append(s.prompt_ids + s.response_ids)
            kind = "g" if s.group_id >= 0 else "eval"  # the evaluator's ids are < 0
            rids.append(f"{kind}{s.group_id}-{s.index}-{s.n_segments}-{next(self._rids)}")
        return inputs, params, rids

    def _pending(self, samples: list[Sample], limit: int) -> list[Sample]:
        for s in samples:
            if s.status == Status.PENDING and len(s.response_ids) >= limit:
                s.status = Status.TRUNCATED
        return [s for s in samples if s.status == Status.PENDING]

    def _fail(self, samples: list[Sample], reason: str) -> None:
        for s in samples:
            s.fail(reason)
            self.counters["samples_failed_engine"] += 1
            self.budget.failed("engine", reason, what="samples failed on the engines")

    def _apply(self, sample: Sample, out: GenerateOutput) -> None:
        if out.token_versions is not None:
            versions: int | list[int] = [int(v) for v in out.token_versions]
        elif self.exact_answer_versions:
            versions = int(out.weight_version)
        else:
            raise VersionsUnknown("the engine reports no per-token weight versions, so tokens of a request "
                                  "frozen across an update cannot be dated: use --partial-rollout-mode recompute")
        sample.add_segment(list(out.output_ids), list(out.logprobs), versions)
        if out.finish_reason == "abort":
            self.counters["resumed_after_abort"] += 1
        else:
            sample.status = Status.COMPLETED if out.finish_reason == "stop" else Status.TRUNCATED


def _engine_count(engines: Engines) -> int:
    """Engines serving now (the engine set's); one for anything else (a client, a fake)."""
    serving = getattr(engines, "serving", None)
    return len(serving()) if callable(serving) else 1
