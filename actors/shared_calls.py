"""Shared /generate calls: rounds of several groups, sent in one event-loop tick under one key, as one call.

Why: a served version frees a batch's worth of admission slots at once, so the generator starts
that many groups together, and each group's round used to be its own HTTP call. Sent one by one
(~0.1 ms of client CPU each), 16 calls reached the engine over ~1.6 ms: its first decode step
prefilled the first group alone and the others joined in later steps, so a batch cost one or two
decode steps more than if it had arrived at once, plus 15 more HTTP exchanges on both sides.
Sharing one call took ~8 ms of CPU off each learner step of the default recipe's async loop
(BENCHMARKS.md, "Does rollout block training?").

Contract:
- Each caller gets exactly its own outputs, in its order, or the call's exception.
- The calls queued in one tick under one key are sent as one call per serving engine
  (``width``), so the engine set's least-loaded routing still spreads them.
- A shared call returns when its last member ends, so callers share only when none of them is of
  use before all are: the generator's key is a group's deadline, the learner step that needs the
  group; the groups due at one step are trained together anyway. Groups due at different steps
  never wait on each other, so training overlaps generation as before.
- A refused call (``EngineError`` other than ``EngineLost``: say one member's prompt is too long)
  is sent again per caller, so the error reaches the caller whose request it is, as unshared.
- Cancelling a caller does not end a call others still wait on: its members run on to their length
  limit on the engine. A call ends early only once all its callers are cancelled. So only callers
  that are never cancelled apart from the rest (their owner's whole task set ends together) may
  share (``SampleRunner.run_group(share=key)``).
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
from collections.abc import Awaitable, Callable, Hashable

from policies.engine.client import EngineError, EngineLost, GenerateOutput

# (input_ids, sampling_params, rids) -> one output per member: the engine set's generate_batch
Send = Callable[[list[list[int]], list[dict], list[str]], Awaitable[list[GenerateOutput]]]


@dataclasses.dataclass(eq=False)
class _Caller:
    input_ids: list[list[int]]
    sampling_params: list[dict]
    rids: list[str]
    future: asyncio.Future[list[GenerateOutput]]


class SharedCalls:
    """Owns the tasks that send shared calls (named ``shared-generate-N``); each ends when its
    call does and hands every outcome to its callers, so none raises."""

    def __init__(self, send: Send, *, width: Callable[[], int] = lambda: 1):
        self._send = send
        self._width = width
        self._queued: dict[Hashable, list[_Caller]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._names = itertools.count()

    async def generate_batch(self, key: Hashable, input_ids: list[list[int]], sampling_params: list[dict],
                             rids: list[str]) -> list[GenerateOutput]:
        """``key``: callers queued under the same key in this tick share a call."""
        loop = asyncio.get_running_loop()
        caller = _Caller(input_ids, sampling_params, rids, loop.create_future())
        if not self._queued:
            # runs after every task already ready in this tick: the batch's other groups queue first
            loop.call_soon(self._flush)
        self._queued.setdefault(key, []).append(caller)
        return await caller.future

    def _flush(self) -> None:
        queued, self._queued = self._queued, {}
        for callers in queued.values():
            callers = [c for c in callers if not c.future.done()]  # cancelled before the send
            width = max(1, min(self._width(), len(callers)))
            for chunk in (callers[i::width] for i in range(width)):
                if chunk:
                    self._start(chunk)

    def _start(self, chunk: list[_Caller]) -> None:
        task = asyncio.get_running_loop().create_task(self._call(chunk), name=f"shared-generate-{next(self._names)}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

        def cancel_if_abandoned(_: asyncio.Future[list[GenerateOutput]]) -> None:
            if all(c.future.cancelled() for c in chunk):
                task.cancel()  # nobody waits: end the call (the engine aborts its members)

        for c in chunk:
            c.future.add_done_callback(cancel_if_abandoned)

    async def _call(self, chunk: list[_Caller]) -> None:
        try:
            outs = await self._send([ids for c in chunk for ids in c.input_ids],
                                    [p for c in chunk for p in c.sampling_params], [r for c in chunk for r in c.rids])
        except EngineError as e:
            if len(chunk) > 1 and not isinstance(e, EngineLost):  # whose request was refused?
                await asyncio.gather(*(self._call([c]) for c in chunk))
                return
            _fail(chunk, e)
            return
        except Exception as e:  # noqa: BLE001 - a bug below: every caller raises it
            _fail(chunk, e)
            return
        start = 0
        for c in chunk:
            end = start + len(c.input_ids)
            if not c.future.done():
                c.future.set_result(outs[start:end])
            start = end


def _fail(chunk: list[_Caller], error: Exception) -> None:
    for c in chunk:
        if not c.future.done():
            c.future.set_exception(error)
