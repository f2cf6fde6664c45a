"""Generating one sample through the engines, resuming it across weight-update aborts.

Shared by the generator (training groups) and the evaluator (held-out prompts).
"""

from __future__ import annotations

import collections
import itertools
import time
from collections.abc import Callable
from typing import Any, Protocol

from buffers.types import Sample, Status
from policies.engine.client import EngineError, GenerateOutput
from runtime.engines import EngineLost

MAX_FAILOVERS = 50  # per sample: beyond this something is wrong beyond an engine dying


class VersionsUnknown(RuntimeError):
    """A misconfiguration, not a fault: it ends the run instead of being retried."""


class Engines(Protocol):
    async def generate(self, input_ids: list[int], sampling_params: dict, *, rid: str | None = None
                       ) -> GenerateOutput: ...


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
    """

    def __init__(self, *, engines: Engines, sampling_params: dict[str, Any], decode: Callable[[list[int]], str],
                 seed: int = 0, retries: int = 3, exact_answer_versions: bool = True):
        self.engines = engines
        self.sampling_params = sampling_params
        self.max_new_tokens = int(sampling_params["max_new_tokens"])
        self.decode = decode
        self.seed = seed
        self.retries = retries
        self.exact_answer_versions = exact_answer_versions
        self.counters: collections.Counter[str] = collections.Counter()
        self._rids = itertools.count()

    async def run(self, sample: Sample) -> None:
        sample.timing.submitted = time.monotonic()
        errors = failovers = 0
        kind = "g" if sample.group_id >= 0 else "eval"  # the evaluator's ids are < 0
        while sample.status == Status.PENDING:
            budget = self.max_new_tokens - len(sample.response_ids)
            if budget <= 0:
                sample.status = Status.TRUNCATED
                break
            seed = hash((self.seed, sample.group_id, sample.index, sample.n_segments)) % 2**31
            params = dict(self.sampling_params, max_new_tokens=budget, sampling_seed=seed)
            try:
                # a readable rid: engine logs and the trace's per-engine tracks name the sample
                rid = f"{kind}{sample.group_id}-{sample.index}-{sample.n_segments}-{next(self._rids)}"
                out = await self.engines.generate(sample.prompt_ids + sample.response_ids, params, rid=rid)
            except EngineLost as e:
                failovers += 1
                self.counters["failovers_resumed" if sample.response_ids else "failovers_restarted"] += 1
                if failovers > MAX_FAILOVERS:
                    sample.fail(f"engines failed under this sample {failovers} times: {e}")
                    self.counters["samples_failed_engine"] += 1
                continue
            except EngineError as e:
                errors += 1
                self.counters["engine_errors"] += 1
                if errors > self.retries:
                    sample.fail(f"engine failed {errors} times: {e}")
                    self.counters["samples_failed_engine"] += 1
                continue
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
        sample.timing.generated = time.monotonic()
        if sample.status != Status.FAILED:
            sample.response_text = self.decode(sample.response_ids)
