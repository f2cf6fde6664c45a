"""Colocated runs are time-sliced (DESIGN.md, placement): engines and the learner share a GPU, so
the engines hand their KV memory over for every learner step and take it back after.

    learner: get batch -> [engines: pause (retract) + release KV] -> step -> publish -> [resume + continue]

Requests in flight stay queued through the step and re-prefill on continue, every token keeping
its version. Generation therefore runs only between steps: colocation trades the overlap of the
disaggregated layout for GPUs; the staleness bound and partial rollouts still let a batch be
generated while the learner waits for the next one. Tested in tests/integration/test_time_slice.py.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Protocol

from actors.learner import Learner


class Sliced(Protocol):
    async def release_memory(self) -> None: ...
    async def resume_memory(self) -> None: ...


def time_slice(learner: Learner, engines: Sliced) -> None:
    """Wrap every learner step in a release and a resume of ``engines``; an ``after_step`` hook
    already set (a checkpoint) runs after the resume, so generation does not wait on it."""
    after: Callable[[int], Awaitable[None]] | None = learner.after_step

    async def before_step(version: int) -> None:
        await engines.release_memory()

    async def after_step(version: int) -> None:
        await engines.resume_memory()
        if after is not None:
            await after(version)

    learner.before_step, learner.after_step = before_step, after_step
