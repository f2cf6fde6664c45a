"""The staleness-bounded group buffer: admission on one side, batches for the learner on the other.

Admission (AReaL's rule, DESIGN.md invariant 2). With ``G`` groups per optimizer step, ``s`` the
staleness bound and ``v`` the version every engine serves, a new group may start only while

    live = admitted - dropped  <  (v + s + 1) * G            (freshness)
    untrained live             <  capacity <= (s + 1) * G     (memory; the buffer's bound)

Every token of a group admitted at served version ``v`` has version >= v, so the group may be
trained by any learner version up to its *deadline* ``v + s``. Deadlines never decrease in
admission order, and at most ``(d + 1) * G`` live groups ever have deadline <= d.

Batches: the learner at version ``v`` takes ``G`` groups in earliest-deadline-first order over
*all* untrained groups, ready or still generating. Among groups with the same deadline it takes
ready ones first (any order is equally fresh), and it waits only for a still-generating group
that EDF says must be in this batch. EDF meets every deadline whenever any order could, and the
admission count above says one exists, so no trained token is ever staler than ``s`` — by
construction, not by dropping. ``max_staleness = 0`` makes each batch exactly the groups admitted
at the current version: synchronous on-policy training.

Over-provisioning (APRIL, ``extra`` > 0): up to ``extra`` more groups may be live than the rule
above allows, admitted only while the learner waits for a batch and at most ``G / 4`` groups are
still generating (a long tail holds the batch while the engines run short of work), and only if
the new group's deadline is still ahead of the batches handed out (else it would be born expired).
Batches are formed by EDF as
above while the over-sampled slack lasts; once ``G + extra`` groups are ready and EDF still waits
on a generating group (the long tail), the learner takes the ``G`` ready groups with the earliest
deadlines instead of idling the engines. A group (ready or generating) whose deadline passes
untrained *expires*: it leaves the buffer (its slot freed, counted in ``expired``) and
``on_expire(group_id, prompt)`` tells its owner (the prompt is the ready group's; None for one
still generating, which its owner holds), who regenerates it through admission (a new ticket, so
every new token is fresh) or drops it. A ready group's deadline is its oldest token's version +
``s`` (at least its ticket's), so a group whose tokens all came after its admission may wait
longer. No token is trained past the bound either way.

Carrying stale partials (``mask_stale``, ``--partial-expiry mask``; Miles's
``--mask-offpolicy-in-partial-rollout``, made per token): the batch goes as soon as ``G`` groups are
ready (APRIL: "once a batch is full") while only a tail of at most ``G / 4`` groups is still
generating (more than that and they are mostly about to finish: waiting for them costs less than
masking them), and a group whose deadline passes is not thrown away. One
still generating keeps generating (its requests are never aborted) under a new deadline, the later
of the learner's version and ``served + s``; a ready one is kept while its newest trained token is
within the bound (deadline: newest + ``s``), and only one with no such token expires as above.
When a batch is handed out at version ``v``, every token older than ``v - s`` gets loss mask 0:
it stays in the answer as context (the later tokens were generated after it) and is not trained.
So the bound holds on every trained token, no generated token is discarded, and the learner does
not wait on a tail; what it costs is the masked tokens (counted in ``masked_tokens``; each carried
deadline in ``carried``), which are the long answers' early ones.

Nothing is dropped here except on the caller's word (``cancel``) or by expiry, both counted.
``close()`` wakes every waiter with ``Closed``.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Callable

import msgspec

from buffers.types import Group, Prompt
from runtime.core.waits import WaitClock, waiting


class Closed(Exception):
    """The buffer was closed: no more groups will be admitted or handed out."""


TAIL_FRACTION = 4  # over-sampling opens when at most G / this many groups are still generating


class BufferState(msgspec.Struct):
    """A checkpoint of the buffer: admission counts, the deadlines of groups still generating,
    and the groups ready for training (with every token's version and logprob)."""

    admitted: int
    dropped: int
    pending: dict[int, int]
    ready: list[Group]


class BufferStats(msgspec.Struct):
    """The buffer's figures on a metrics line (``buffer/*``)."""

    groups: int  # ready for training
    pending: int  # reserved, still generating
    capacity: int
    expired: int  # over-provisioned groups past their deadline
    carried: int  # deadlines passed and extended (the mask rule)
    masked_tokens: int  # tokens handed out with loss mask 0 for being too stale
    served_version: int


@dataclasses.dataclass(frozen=True)
class Ticket:
    """A reserved admission slot: the group's id, served version at admission, and deadline."""

    group_id: int
    admitted_version: int
    deadline_version: int


class StalenessBuffer:
    def __init__(self, *, groups_per_step: int, max_staleness: int, capacity: int | None = None, extra: int = 0,
                 on_expire: Callable[[int, Prompt | None], None] = lambda gid, prompt: None,
                 mask_stale: bool = False):
        bound = (max_staleness + 1) * groups_per_step
        if capacity is not None and capacity < groups_per_step:
            raise ValueError(f"capacity {capacity} < groups per step {groups_per_step}")
        self.groups_per_step = groups_per_step
        self.max_staleness = max_staleness
        self.capacity = bound if capacity is None else min(capacity, bound)
        self.extra = extra
        self.on_expire = on_expire
        self.served_version = 0
        self.admitted = 0
        self.dropped = 0
        self.expired = 0
        self.oversampled = 0  # groups admitted beyond the bound, as over-sampling
        self.mask_stale = mask_stale and extra > 0
        self.carried = 0  # deadlines passed and extended (mask_stale)
        self.masked_tokens = 0  # tokens handed out with loss mask 0 for being too stale (mask_stale)
        self._taken = -1  # the version of the last batch handed out
        self._learner_waiting = False
        self._pending: dict[int, int] = {}  # group id -> deadline, still generating
        self._ready: dict[int, Group] = {}
        self._changed = asyncio.Condition()
        self._closed = False

    # -- introspection ---------------------------------------------------------------------------
    @property
    def n_ready(self) -> int:
        return len(self._ready)

    @property
    def n_pending(self) -> int:
        return len(self._pending)

    @property
    def untrained(self) -> int:
        return len(self._pending) + len(self._ready)

    def can_admit(self) -> bool:
        return self._in_bound() or self._oversample()

    def _in_bound(self) -> bool:
        return self.free_slots() > 0

    def free_slots(self) -> int:
        """Groups the admission rule (over-sampling aside) would admit right now."""
        live = self.admitted - self.dropped
        bound = (self.served_version + self.max_staleness + 1) * self.groups_per_step
        return max(0, min(bound - live, self.capacity - self.untrained))

    def _oversample(self) -> bool:
        if not self.extra:
            return False
        live = self.admitted - self.dropped
        bound = (self.served_version + self.max_staleness + 1) * self.groups_per_step
        # over-sampled: only while the engines run short of work (the rest is waiting on a tail)
        # and only if the new group's deadline is still ahead of the batches handed out
        tail = self._learner_waiting and self._only_tail_generating()
        return (tail and live < bound + self.extra and self.untrained < self.capacity + self.extra
                and self.served_version + self.max_staleness > self._taken)

    # -- producer side ---------------------------------------------------------------------------
    async def reserve(self, admit: Callable[[], int], *, clock: WaitClock | None = None) -> Ticket:
        """Wait for an admission slot, then call ``admit()`` for the new group's id (the ledger's
        admission, at the very moment the slot is taken). The group counts as live until it is
        trained or cancelled."""
        async with self._changed:
            if not self.can_admit() and not self._closed:
                with waiting(clock, "buffer.reserve"):
                    await self._changed.wait_for(lambda: self.can_admit() or self._closed)
            if self._closed:
                raise Closed("buffer")
            self.oversampled += not self._in_bound()
            return self._take(admit)

    async def reserve_many(self, admit: Callable[[], int], count: int, *, clock: WaitClock | None = None
                           ) -> list[Ticket]:
        """``count`` slots at once, or none (no over-sampling): for a producer whose unit of work is
        several groups (a multi-agent episode). Taking them one by one could leave it holding some
        while it waits for the rest, and the learner waiting on those: a deadlock. All at once, it
        holds none while it waits, so the learner can always be fed when ``count - 1 <=
        capacity - groups_per_step`` (the caller's rule to check)."""
        if not 1 <= count <= self.capacity:
            raise ValueError(f"count {count} outside 1..capacity {self.capacity}")
        async with self._changed:
            if self.free_slots() < count and not self._closed:
                with waiting(clock, "buffer.reserve"):
                    await self._changed.wait_for(lambda: self.free_slots() >= count or self._closed)
            if self._closed:
                raise Closed("buffer")
            return [self._take(admit) for _ in range(count)]

    def _take(self, admit: Callable[[], int]) -> Ticket:
        group_id = admit()
        ticket = Ticket(group_id, self.served_version, self.served_version + self.max_staleness)
        self.admitted += 1
        self._pending[group_id] = ticket.deadline_version
        return ticket

    async def put(self, group: Group) -> None:
        """A reserved group is scored and ready. Never blocks: its slot was reserved."""
        async with self._changed:
            if group.group_id not in self._pending:
                raise KeyError(f"group {group.group_id} has no reservation (or was already put)")
            deadline = self._pending.pop(group.group_id)
            if deadline != group.deadline_version and not self.mask_stale:  # (there: carried, module doc)
                raise ValueError(f"group {group.group_id}: deadline changed after admission")
            group.deadline_version = deadline
            if self.extra:  # the tokens themselves say how long the group may wait (module doc)
                oldest = min((v for smp in group.samples for v in smp.token_versions), default=None)
                if oldest is not None:
                    group.deadline_version = max(group.deadline_version, oldest + self.max_staleness)
            self._ready[group.group_id] = group
            self._changed.notify_all()

    async def cancel(self, group_id: int) -> None:
        """A reserved group will never be trained (the caller records why); frees its slot."""
        async with self._changed:
            if self._pending.pop(group_id, None) is None and self._ready.pop(group_id, None) is None:
                raise KeyError(f"group {group_id} is not in the buffer")
            self.dropped += 1
            self._changed.notify_all()

    async def set_served_version(self, version: int) -> None:
        """Every engine now serves ``version``: admits the groups the freshness rule allows."""
        async with self._changed:
            if version < self.served_version:
                raise ValueError(f"served version went back from {self.served_version} to {version}")
            self.served_version = version
            self._changed.notify_all()

    # -- consumer side ---------------------------------------------------------------------------
    async def get_batch(self, version: int, *, clock: WaitClock | None = None, busy: bool = False) -> list[Group]:
        """The next ``groups_per_step`` groups for the learner at ``version`` (EDF, see module doc).
        ``busy``: asked ahead, while the learner still trains the step before (it queues the next
        step behind it): a wait then is not the learner waiting, so it is not counted and does not
        open over-sampled admission."""
        async with self._changed:
            batch = self._pick(version)
            if batch is None:
                self._learner_waiting = not busy
                if not busy:
                    self._changed.notify_all()  # over-sampled admission may open (module doc)
                try:
                    with waiting(None if busy else clock, "buffer.get_batch"):
                        while batch is None:
                            await self._changed.wait()
                            batch = self._pick(version)
                finally:
                    self._learner_waiting = False
            for g in batch:
                del self._ready[g.group_id]
                if self.mask_stale:
                    self._mask_stale_tokens(g, version)
            self._taken = max(self._taken, version)
            self._changed.notify_all()
            return batch

    def _pick(self, version: int) -> list[Group] | None:
        if self._closed:
            raise Closed("buffer")
        if self.extra:
            self._expire_late(version)
        batch = self._pick_edf(version)
        if batch is None and self.extra and self._skip_tail():
            batch = sorted(self._ready.values(), key=lambda grp: (grp.deadline_version, grp.group_id))
            batch = batch[: self.groups_per_step]
        return batch

    def _skip_tail(self) -> bool:
        """May the learner take ready groups out of EDF order instead of waiting on the tail?"""
        if self.mask_stale:  # a batch's worth is ready and the rest is a tail: it goes on, carried
            return len(self._ready) >= self.groups_per_step and self._only_tail_generating()
        # the over-sampled slack is all ready: waiting longer on the tail would idle the engines
        return len(self._ready) >= self.groups_per_step + self.extra

    def _only_tail_generating(self) -> bool:
        return len(self._pending) <= max(1, self.groups_per_step // TAIL_FRACTION)

    def _pick_edf(self, version: int) -> list[Group] | None:
        g = self.groups_per_step
        entries = sorted(
            [(d, gid, False) for gid, d in self._pending.items()]
            + [(grp.deadline_version, gid, True) for gid, grp in self._ready.items()]
        )
        if len(entries) < g:
            return None
        if entries[0][0] < version:
            raise AssertionError(f"group {entries[0][1]} missed its deadline {entries[0][0]} (at {version})")
        cut = entries[g - 1][0]
        must = [e for e in entries if e[0] < cut]
        if not all(ready for _, _, ready in must):
            return None
        ties = [e for e in entries if e[0] == cut and e[2]]
        if len(must) + len(ties) < g:
            return None
        chosen = must + ties[: g - len(must)]
        return [self._ready[gid] for _, gid, _ in chosen]

    # -- checkpoints -----------------------------------------------------------------------------
    def stats(self) -> BufferStats:
        return BufferStats(groups=self.n_ready, pending=self.n_pending, capacity=self.capacity, expired=self.expired,
                           carried=self.carried, masked_tokens=self.masked_tokens, served_version=self.served_version)

    def snapshot(self) -> BufferState:
        """Synchronous, so it is one consistent instant of the event loop."""
        return BufferState(admitted=self.admitted, dropped=self.dropped, pending=dict(self._pending),
                           ready=list(self._ready.values()))

    def restore(self, state: BufferState, *, served_version: int) -> None:
        """Load a snapshot into this (new, empty) buffer; pending groups will be put again."""
        if self.admitted or self._ready or self._pending:
            raise RuntimeError("restore() into a buffer that is already in use")
        self.admitted, self.dropped, self.served_version = state.admitted, state.dropped, served_version
        self._pending = dict(state.pending)
        self._ready = {g.group_id: g for g in state.ready}

    def _expire_late(self, version: int) -> None:
        """Over-provisioned: groups the learner at ``version`` may no longer train leave the buffer
        (or, ``mask_stale``, are carried under a later deadline while they can still train a token)."""
        if self.mask_stale:
            self._carry_late(version)
        late = [gid for gid, d in self._pending.items() if d < version]
        late += [gid for gid, grp in self._ready.items() if grp.deadline_version < version]
        for gid in late:
            ready = self._ready.pop(gid, None)
            self._pending.pop(gid, None)
            self.dropped += 1
            self.expired += 1
            self.on_expire(gid, ready.prompt if ready is not None else None)
        if late:
            self._changed.notify_all()  # freed slots: admission may go on

    def _carry_late(self, version: int) -> None:
        for gid, d in self._pending.items():
            if d < version:  # still generating: its next tokens are at least at the served version
                self._pending[gid] = max(version, self.served_version + self.max_staleness)
                self.carried += 1
        for grp in self._ready.values():
            if grp.deadline_version < version:
                newest = max((v for s in grp.samples for v, m in zip(s.token_versions, s.loss_mask) if m),
                             default=-1)
                if newest + self.max_staleness >= version:
                    grp.deadline_version = newest + self.max_staleness
                    self.carried += 1

    def _mask_stale_tokens(self, group: Group, version: int) -> None:
        """Tokens the learner at ``version`` may not train stay as context, with loss mask 0."""
        oldest = version - self.max_staleness
        for s in group.samples:
            for i, (v, m) in enumerate(zip(s.token_versions, s.loss_mask)):
                if m and v < oldest:
                    s.loss_mask[i] = 0
                    self.masked_tokens += 1

    async def close(self) -> None:
        async with self._changed:
            self._closed = True
            self._changed.notify_all()
