"""Generator: admits prompt groups under the staleness bound, generates, scores, hands them on.

Lifecycle of one group (each a named task owned by the generator's task set):
    reserve a slot (waits: the admission rule) -> ledger ADMITTED -> GENERATING
    -> n samples in parallel (``SampleRunner``: resumed across weight-update aborts, every token
       stamped with the version that produced it)
    -> SCORED -> buffer.put (BUFFERED), or dropped with a reason when no sample is trainable.
A prompt longer than ``max_prompt_len`` (the model's context less the response budget) is
dropped at admission (``prompt_too_long``, counted): the engine would refuse every sample.
Over-provisioned runs (``buffer.extra`` > 0): a group the buffer expires (its deadline passed
untrained) has its task cancelled (its engine requests end with the connection) and is, by
``expiry``, regenerated from its prompt under the same id through admission ("recompute", before
any new prompt) or dropped ("drop"); both are counted in ``expired``. A regenerated group samples
with new seeds (its attempt number): the old ones would replay the answers it expired on.
With "mask" the buffer carries late groups itself (its stale tokens are masked, not discarded), and
only a ready group with no token left that the bound lets train comes here: it is regenerated.
A scored group may be dropped by ``group_filter`` (``--dynamic-sampling-filter-path``, e.g. DAPO's
zero-variance rule): recorded in the ledger as ``filter_<reason>``, its slot freed and refilled
through admission, like a group with no trainable sample.
The generator only ever waits on admission: rollout runs ahead of training by up to
``max_staleness`` versions. Its ``clock`` counts the time rollout is *idle*: admission is closed
and no admitted group is still generating (a closed admission while groups generate is not
lost time: the engines are busy).
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
from collections.abc import Callable, Coroutine, Hashable, Sequence
from typing import Any

import msgspec

from actors.generate_fn import Episodes
from actors.reward import RewardScorer
from actors.rollout import SampleRunner
from buffers.buffer import StalenessBuffer, Ticket
from buffers.filters import as_result
from buffers.types import Group, Prompt, Sample, Status
from runtime.core import trace
from runtime.core.failures import RateLog
from runtime.core.ledger import Ledger, State
from runtime.core.waits import WaitClock

log = logging.getLogger(__name__)


class LiveGroupState(msgspec.Struct):
    """A group admitted and not yet buffered, as a checkpoint keeps it: its samples hold every
    token received so far (with versions and logprobs), so a resume continues them."""

    group_id: int
    admitted_version: int
    deadline_version: int
    prompt: Prompt
    samples: list[Sample]


@dataclasses.dataclass
class _Live:
    ticket: Ticket
    prompt: Prompt
    samples: list[Sample]


class RedoGroup(msgspec.Struct):
    """An expired group waiting to be regenerated (kept by checkpoints)."""

    group_id: int
    prompt: Prompt


class GeneratorStats(msgspec.Struct):
    """The generator's figures on a metrics line (``generator/wait_frac``, ``data/cursor``)."""

    wait_frac: float  # share of the time since the last stats() blocked on admission with nothing generating
    cursor: int  # index of the next prompt to admit


class Generator:
    def __init__(self, *, prompts: Callable[[int], Prompt], buffer: StalenessBuffer, ledger: Ledger,
                 runner: SampleRunner, scorer: RewardScorer, n_samples: int, cursor: int = 0,
                 resume: Sequence[LiveGroupState] = (), redo: Sequence[RedoGroup] = (),
                 expiry: str = "recompute", episodes: Episodes | None = None,
                 group_filter: Callable[[Group], Any] | None = None, max_prompt_len: int | None = None):
        if expiry not in ("recompute", "drop", "mask"):
            raise ValueError(f"expiry must be recompute, drop or mask, got {expiry!r}")
        if buffer.extra and (expiry == "mask") != buffer.mask_stale:  # the buffer carries, or expires, late groups
            raise ValueError(f"expiry {expiry!r} needs a buffer built with mask_stale={expiry == 'mask'}")
        self.prompts, self.buffer, self.ledger = prompts, buffer, ledger
        self.runner, self.scorer = runner, scorer
        self.episodes = episodes  # --custom-generate-function-path: each sample is an episode of it
        self.n_samples = n_samples
        self.cursor = cursor  # index of the next prompt to admit: the data cursor
        self.max_prompt_len = max_prompt_len  # longer prompts leave no room for a response: dropped
        self.prompts_too_long = 0
        self._log = RateLog(logging.getLogger(__name__))
        self.clock = WaitClock("generator")
        self._active = 0  # groups generating or scoring
        self._blocked = False  # the admission loop is waiting for a slot
        self._idle = False  # blocked with nothing generating: counted on ``clock``
        self._live: dict[int, _Live] = {}  # admitted, not yet buffered or dropped
        self._resume = list(resume)
        self.expiry = expiry
        self.expired: collections.Counter[str] = collections.Counter()
        self.group_filter = group_filter  # --dynamic-sampling-filter-path (buffers/filters.py)
        self.filtered: collections.Counter[str] = collections.Counter()  # ledger reason -> groups
        self._redo: collections.deque[RedoGroup] = collections.deque(redo)
        # group id -> its expiries so far (a checkpoint's redo groups expired at least once)
        self._attempts: collections.Counter[int] = collections.Counter(g.group_id for g in redo)
        self._tasks: dict[int, asyncio.Task[None]] = {}
        self._due: tuple[int | None, int] = (None, 0)  # the last admitted deadline, and groups admitted with it - 1
        buffer.on_expire = self._expire

    def stats(self) -> GeneratorStats:
        """Figures since the last call (the wait share is a lap of the clock)."""
        return GeneratorStats(wait_frac=self.clock.lap(), cursor=self.cursor)

    async def run(self) -> None:
        """Admit groups until cancelled. A crashing group task is a bug: it ends the run loudly
        (the TaskGroup cancels the loop and its siblings and re-raises)."""
        async with asyncio.TaskGroup() as groups:
            for g in self._resume:  # a checkpoint's live groups go first: they hold the oldest slots
                ticket = Ticket(g.group_id, g.admitted_version, g.deadline_version)
                groups.create_task(self._run_group(ticket, g.prompt, g.samples, share=self._share_key(ticket)),
                                   name=f"group-{g.group_id}")
            self._resume.clear()
            while True:
                self._set_blocked(True)
                try:
                    with trace.span("generator", "wait admission"):
                        ticket = await self.buffer.reserve(self._admit)
                finally:
                    self._set_blocked(False)
                if self._redo and self._redo[0].group_id == ticket.group_id:
                    prompt = self._redo.popleft().prompt
                else:
                    prompt = self.prompts(self.cursor)
                    self.cursor += 1
                task = groups.create_task(self._run_group(ticket, prompt, share=self._share_key(ticket)),
                                          name=f"group-{ticket.group_id}")
                self._tasks[ticket.group_id] = task
                task.add_done_callback(lambda t, gid=ticket.group_id: self._tasks.get(gid) is t
                                       and self._tasks.pop(gid))

    def _admit(self) -> int:
        """The id for the slot just reserved: an expired group to regenerate first, else a new one."""
        if self._redo:
            gid = self._redo[0].group_id
            self.ledger.restart(gid)
            return gid
        return self.ledger.admit()

    def _expire(self, gid: int, prompt: Prompt | None) -> None:
        """The buffer expired ``gid`` (called synchronously from inside the buffer)."""
        live = self._live.pop(gid, None)
        task = self._tasks.pop(gid, None)
        if task is not None:
            task.cancel()
        if prompt is None:
            assert live is not None, f"expired group {gid} is neither ready nor generating"
            prompt = live.prompt
        self.expired[f"expired_{self.expiry}"] += 1
        self._attempts[gid] += 1
        if self.expiry != "drop":
            self._redo.append(RedoGroup(gid, prompt))
        else:
            self.ledger.dropped(gid, "expired")

    def _filter(self, group: Group) -> str:
        """The ledger reason to drop ``group`` for, or "" to keep it. A filter that fails keeps
        the group (counted as ``filter_error``, logged): a broken plug-in must not starve training."""
        if self.group_filter is None:
            return ""
        try:
            verdict = as_result(self.group_filter(group))
        except Exception as e:  # noqa: BLE001 - a user plug-in's error is counted, not fatal
            self.filtered["filter_error"] += 1
            if self.filtered["filter_error"] in (1, 10, 100, 1000):
                log.warning("group filter failed (%d so far): %s: %s", self.filtered["filter_error"],
                            type(e).__name__, e)
            return ""
        if verdict.keep:
            return ""
        reason = f"filter_{verdict.reason or 'dropped'}"
        self.filtered[reason] += 1
        return reason

    def _set_blocked(self, blocked: bool) -> None:
        self._blocked = blocked
        self._sync_idle()

    def _add_active(self, n: int) -> None:
        self._active += n
        self._sync_idle()

    def _sync_idle(self) -> None:
        idle = self._blocked and self._active == 0
        if idle and not self._idle:
            self.clock.enter("admission (no group generating)")
        elif self._idle and not idle:
            self.clock.exit()
        self._idle = idle

    def snapshot(self) -> tuple[list[LiveGroupState], list[RedoGroup]]:
        """The live groups and those waiting to be regenerated, for a checkpoint (synchronous:
        one instant of the event loop)."""
        live = [
            LiveGroupState(gid, g.ticket.admitted_version, g.ticket.deadline_version, g.prompt, g.samples)
            for gid, g in self._live.items() if self.ledger.state(gid) < State.BUFFERED
        ]
        return live, list(self._redo)

    def _share_key(self, ticket: Ticket) -> tuple[int, int] | None:
        """Call at admission. Groups admitted in turn with one deadline, a batch's worth at a time,
        send their rounds in shared calls (actors.shared_calls): one learner step needs them all
        anyway. Not when over-sampling: the buffer then expires, so cancels, groups one by one."""
        if self.buffer.extra:
            return None
        deadline, n = self._due
        n = n + 1 if deadline == ticket.deadline_version else 0  # deadlines never fall in admission order
        self._due = (ticket.deadline_version, n)
        return ticket.deadline_version, n // self.buffer.groups_per_step

    def _run_group(self, ticket: Ticket, prompt: Prompt, samples: list[Sample] | None = None, *,
                   share: Hashable | None = None) -> Coroutine[Any, Any, None]:
        """The group's coroutine; it is live (in a checkpoint's snapshot) from this call on, not
        from when its task first runs: a checkpoint may come in between."""
        gid = ticket.group_id
        samples = samples or [Sample(group_id=gid, index=i, prompt_ids=prompt.input_ids)
                              for i in range(self.n_samples)]
        live = self._live[gid] = _Live(ticket, prompt, samples)
        return self._group(live, share)

    async def _group(self, live: _Live, share: Hashable | None) -> None:
        self._add_active(1)
        ticket, prompt, samples, gid = live.ticket, live.prompt, live.samples, live.ticket.group_id
        try:
            await self._generate_group(ticket, prompt, samples, share)
        finally:
            if self._live.get(gid) is live:  # not expired and regenerated meanwhile
                del self._live[gid]
            self._add_active(-1)

    async def _generate_group(self, ticket: Ticket, prompt: Prompt, samples: list[Sample], share: Hashable | None
                              ) -> None:
        gid = ticket.group_id
        if self.max_prompt_len is not None and len(prompt.input_ids) > self.max_prompt_len:
            self.prompts_too_long += 1  # the engine would refuse every sample: a counted drop
            self._log("prompt_too_long", f"prompt {prompt.index} has {len(prompt.input_ids)} tokens; at most "
                      f"{self.max_prompt_len} leave room for a whole response in the model's context: dropped")
            self.ledger.dropped(gid, "prompt_too_long")
            await self.buffer.cancel(gid)
            return
        self.ledger.advance(gid, State.GENERATING)
        with trace.lane("groups") as lane:  # one row per group: its generation, then its scoring
            with lane.span("generate", group=gid, admitted_version=ticket.admitted_version):
                if self.episodes is not None:
                    unscored = await self.episodes.run_group(prompt, samples, base_version=ticket.admitted_version)
                else:
                    await self.runner.run_group(samples, attempt=self._attempts[gid], share=share)
                    unscored = [s for s in samples if s.status != Status.FAILED]
            with lane.span("score", group=gid):
                await self.scorer.score_many([(prompt, s) for s in unscored])
        self.ledger.advance(gid, State.SCORED)
        group = Group(group_id=gid, prompt=prompt, samples=samples, admitted_version=ticket.admitted_version,
                      deadline_version=ticket.deadline_version)
        drop = "no_trainable_sample" if group.n_trainable == 0 else self._filter(group)
        if drop:  # its slot is freed: admission takes another group in its place
            self.ledger.dropped(gid, drop)
            await self.buffer.cancel(gid)
            return
        self.ledger.advance(gid, State.BUFFERED)
        await self.buffer.put(group)
