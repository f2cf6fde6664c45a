"""Continuous batching for the embedded engine.

Dataflow (all state here belongs to the event-loop thread; only the runner's `step`,
`drop_cache` and `apply_weights` run, one at a time, on the single decode thread):

    POST /generate ─submit()─► waiting (FIFO; a batched body enqueues all its members at once)
                                  │ admitted between steps while len(running) < max_running,
                                  │ not paused, and no weight update is pending
                                  ▼
                               running ─run_in_executor(step)─► decode thread: one token per row
                                  ▲                              (prefill of rows new to the KV
                                  │                               cache, decode of the others)
                                  └──── _apply(): append tokens ◄─────┘
                                        finished / aborted requests leave; their futures resolve
                                        and their HTTP handlers answer. A request that left loses
                                        its KV-cache row at the next step (the runner keeps rows
                                        only for the requests it is given).

The loop sleeps on `_wake` when there is nothing to decode (first dropping the KV cache if no
request is left to use it); submit, abort, pause/continue and the end of a weight update set it
(`_notify`). Coroutines that wait for a state (pause waiting for the
step to end, an update waiting for the batch to drain) register a watcher future that `_notify`
resolves, then re-check their predicate.

The waiting queue has no bound of its own: HTTP callers bound it (the runtime admits a bounded
number of in-flight requests per engine), and refusing requests during a pause would turn a
weight update into errors.

Pause modes across a weight update (SGLang's): `in_place` freezes running requests with their
KV cache; after the update they continue on it, so their next tokens attend to keys/values the
old weights computed (the "keep" partial rollout). `retract` freezes them and drops their KV
cache; on resume each re-prefills prompt + generated tokens under the new weights ("recompute").
`abort` ends them with their partial output. Either way each token keeps the version and logprob
it was generated with (`Request.versions`, reported as SGLang's weight_versions spans).

Invariants:
- At most one step, cache drop or weight copy runs at a time (one decode thread); weights
  change only between steps.
- Every token of a request comes from one weight version unless the request was frozen by an
  in_place/retract pause across an update; its answer's weight_version is then the version
  current at its end. An unpaused update waits for the running batch to drain while admission
  is closed (like the model-update writer lock in SGLang's tokenizer manager).
- Every accepted request's future resolves exactly once (finished, aborted, engine error or
  shutdown), so no HTTP handler waits forever.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import torch

from policies.engine.request import Completion, FinishReason, Request, build_request, new_future
from policies.engine.runner import ModelRunner
from policies.engine.sampling import RowParams, Sampled
from policies.engine.wire import PAUSE_MODES, BadRequest, GenerateItem, Unavailable

log = logging.getLogger("engine.scheduler")

ENGINE_ERROR = "engine error"  # prefix of the abort message when a decode step raised


class Scheduler:
    """Owns the request queues and the decode loop (`run`, a task owned by the server)."""

    def __init__(self, runner: ModelRunner, *, max_running: int, weight_version: str) -> None:
        if max_running < 1:
            raise ValueError(f"max_running must be >= 1, got {max_running}")
        self.runner = runner
        self.max_running = max_running
        self.weight_version = weight_version
        self.decode_steps = 0
        self._waiting: dict[str, Request] = {}
        self._running: dict[str, Request] = {}
        self._paused = False
        self._updating = 0
        self._swap_pending = False  # a weight swap waits for the step in flight; no new one starts
        self._stepping = False
        self._closed = False
        self._watchers: list[asyncio.Future[None]] = []
        self._wake = asyncio.Event()
        self._update_lock = asyncio.Lock()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="engine-decode")

    @property
    def paused(self) -> bool:
        return self._paused

    def stats(self) -> dict[str, object]:
        return {
            "num_running_reqs": len(self._running),
            "num_waiting_reqs": len(self._waiting),
            "paused": self._paused,
            "decode_steps": self.decode_steps,
            "weight_version": self.weight_version,
        }

    # ---- requests -------------------------------------------------------------------------

    async def submit(self, items: list[GenerateItem]) -> list[Request]:
        """Queue every item or none (BadRequest if any is invalid); each Request's future
        resolves when it finishes or aborts.

        Requests that ask for prompt logprobs get them first, from one forward of the prompt on
        the decode thread, once admission is open (not during a pause or a weight update, so they
        come from the weights the request starts decoding with unless an update lands before it
        is admitted)."""
        self._check_rids(items)
        requests = [build_request(item, self.runner) for item in items]
        loop = asyncio.get_running_loop()
        for r in requests:
            if r.logprob_start is not None:
                await self._wait_for(lambda: self._closed or not (self._paused or self._updating))
                if self._closed:
                    raise Unavailable("server shutting down")
                r.prompt_logprobs = await loop.run_in_executor(
                    self._executor, self.runner.score, r.prompt, r.logprob_start, r.params
                )
        self._check_rids(items)  # again: another body may have taken a rid while this one was scored
        return [self._enqueue(r) for r in requests]

    def _check_rids(self, items: list[GenerateItem]) -> None:
        for item in items:
            if item.rid in self._running or item.rid in self._waiting:
                raise BadRequest(f"rid {item.rid!r} is already in flight")

    def submit_probe(self) -> Request:
        """A one-token greedy request for /health_generate; any pause aborts it."""
        params = RowParams(0.0, 1.0, -1, None)
        rid = f"HEALTH_CHECK_{uuid.uuid4().hex}"
        return self._enqueue(Request(rid, [0], 1, frozenset(), params, new_future(), probe=True))

    def _enqueue(self, request: Request) -> Request:
        if self._closed:
            raise Unavailable("server shutting down")
        if request.max_new_tokens == 0:
            self._finish(request, FinishReason("length", length=0))
            return request
        self._waiting[request.rid] = request
        self._notify()
        return request

    def abort(self, rid: str, message: str = "aborted by request") -> bool:
        request = self._running.get(rid) or self._waiting.get(rid)
        if request is None:
            return False
        self._finish(request, FinishReason("abort", message=message))
        self._notify()
        return True

    def abort_all(self, message: str, *, only: Callable[[Request], bool] = lambda r: True) -> int:
        victims = [r for r in (*self._running.values(), *self._waiting.values()) if only(r)]
        for request in victims:
            self._finish(request, FinishReason("abort", message=message))
        self._notify()
        return len(victims)

    # ---- control --------------------------------------------------------------------------

    async def pause(self, mode: str) -> None:
        """Stop decoding; return once no step is in flight.

        abort: every request in flight returns its partial output (finish_reason abort).
        in_place: running requests stay frozen with their KV cache and resume on `resume`.
        retract: the same, but their KV cache is dropped: they re-prefill on resume.
        Probes are always aborted, so a health probe never waits for a pause to end.
        """
        if mode not in PAUSE_MODES:
            raise BadRequest(f"mode must be one of {PAUSE_MODES}, got {mode!r}")
        self._paused = True
        if mode == "abort":
            self.abort_all("generation paused (abort)")
        else:
            self.abort_all("generation paused", only=lambda r: r.probe)
        await self._wait_for(lambda: not self._stepping)
        if mode == "retract":
            await asyncio.get_running_loop().run_in_executor(self._executor, self.runner.drop_cache)

    async def release_memory(self) -> None:
        """Free the runner's KV buffers and decode graphs; call while paused (``retract``)."""
        if not self._paused:
            raise BadRequest("release the memory of a paused engine only")
        await asyncio.get_running_loop().run_in_executor(self._executor, self.runner.release_memory)

    def resume(self) -> None:
        self._paused = False
        self._notify()

    async def update_weights(
        self, pairs: list[tuple[torch.Tensor, torch.Tensor]], *, version: str | None, abort_all: bool
    ) -> int:
        """Copy checked tensors into the model between steps; returns how many requests are frozen.

        Admission is closed while this waits for the running batch to drain (or for a pause),
        so an unfrozen request never sees two weight versions.
        """
        async with self._update_lock:
            self._updating += 1
            try:
                if abort_all:
                    self.abort_all("aborted for a weight update")
                await self._wait_for(lambda: not self._stepping and (self._paused or not self._running))
                loop = asyncio.get_running_loop()
                await loop.run_in_executor(self._executor, self.runner.apply_weights, pairs)
                if version is not None:
                    self.weight_version = version
                return len(self._running)
            finally:
                self._updating -= 1
                self._notify()

    async def swap_weights(self, pairs: list[tuple[torch.Tensor, torch.Tensor]], *, version: str | None) -> float:
        """Copy checked tensors into the model between two decode steps, without a pause: running
        requests continue under the new weights (in_place semantics; each later token is dated
        ``version``). Returns the seconds decoding was held for the copy."""
        async with self._update_lock:
            self._swap_pending = True  # the decode loop holds before its next step
            try:
                await self._wait_for(lambda: not self._stepping)
                held = time.monotonic()
                await asyncio.get_running_loop().run_in_executor(self._executor, self.runner.apply_weights, pairs)
                if version is not None:
                    self.weight_version = version
                return time.monotonic() - held
            finally:
                self._swap_pending = False
                self._notify()

    def set_version(self, version: str, *, abort_all: bool) -> None:
        if abort_all:
            self.abort_all("aborted for a weight version update")
        self.weight_version = version

    def close(self) -> None:
        """Fail every request in flight (shutdown) and stop the decode thread after its step."""
        self._closed = True
        self.abort_all("server shutting down")
        self._executor.shutdown(wait=False, cancel_futures=True)

    # ---- the decode loop ------------------------------------------------------------------

    async def run(self) -> None:
        # The model and every module are loaded and live as long as the engine: exempt them from
        # the cyclic collector, whose full passes over ~370k objects otherwise stopped decoding
        # for ~0.2 s every few seconds. (Until the loop ends: the host process gets its GC back.)
        gc.collect()
        gc.freeze()
        try:
            await self._decode_loop()
        finally:
            gc.unfreeze()

    async def _decode_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while not self._closed:
            self._admit()
            batch = [] if self._paused or self._swap_pending else list(self._running.values())
            if not batch:
                if not self._running and self.runner.cached_rows:  # idle: free the finished rows' KV
                    await loop.run_in_executor(self._executor, self.runner.drop_cache)
                    continue
                self._wake.clear()
                await self._wake.wait()
                continue
            self._stepping = True
            try:
                sampled = await loop.run_in_executor(self._executor, self.runner.step, [r.row() for r in batch])
            except Exception as exc:  # a failed step must not strand its requests
                log.exception("decode step failed")
                for request in batch:
                    self._finish(request, FinishReason("abort", message=f"{ENGINE_ERROR}: {exc!r}"))
            else:
                self._apply(batch, sampled)
            finally:
                self._stepping = False
                self._notify()

    def _admit(self) -> None:
        if self._paused or self._updating:
            return
        while self._waiting and len(self._running) < self.max_running:
            rid = next(iter(self._waiting))
            self._running[rid] = self._waiting.pop(rid)

    def _apply(self, batch: list[Request], sampled: Sampled) -> None:
        self.decode_steps += 1
        version = self.weight_version
        for request, token, logprob, top in zip(batch, *sampled, strict=True):
            if request.future.done():  # aborted while the step ran: it already answered
                self._finish(request, FinishReason("abort"))
                continue
            output = request.output_ids
            output.append(token)
            request.context.append(token)
            request.logprobs.append(logprob)
            request.versions.append(version)
            if top is not None:
                request.top_logprobs.append(top)
            if token in request.stop_ids:
                self._finish(request, FinishReason("stop", matched=token))
            elif len(output) >= request.max_new_tokens:
                self._finish(request, FinishReason("length", length=len(output)))

    def _finish(self, request: Request, reason: FinishReason) -> None:
        """Remove the request from the queues and resolve its future (first call wins)."""
        for queue in (self._running, self._waiting):
            if queue.get(request.rid) is request:
                del queue[request.rid]
        if request.future.done():
            return
        # the request's own lists, not copies: a finished request is never appended to again
        # (``_apply`` skips it), so the answer cannot change under its handler
        completion = Completion(
            rid=request.rid,
            output_ids=request.output_ids,
            logprobs=request.logprobs,
            finish=reason,
            prompt_tokens=len(request.prompt),
            weight_version=self.weight_version,
            latency_s=time.perf_counter() - request.started,
            token_versions=request.versions,
            top_logprobs=request.top_logprobs,
            prompt_logprobs=request.prompt_logprobs,
        )
        request.future.set_result(completion)

    # ---- waiting for a state --------------------------------------------------------------

    def _notify(self) -> None:
        self._wake.set()
        watchers, self._watchers = self._watchers, []
        for watcher in watchers:
            if not watcher.done():
                watcher.set_result(None)

    async def _wait_for(self, predicate: Callable[[], bool]) -> None:
        while not predicate():
            watcher = asyncio.get_running_loop().create_future()
            self._watchers.append(watcher)
            await watcher
