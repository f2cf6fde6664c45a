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

Nothing is dropped here except on the caller's word (``cancel``), which is counted by reason.
``close()`` wakes every waiter with ``Closed``.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Callable

import msgspec

from buffers.types import Group
from runtime.waits import WaitClock, waiting


class Closed(Exception):
    """The buffer was closed: no more groups will be admitted or handed out."""


class BufferState(msgspec.Struct):
    """A checkpoint of the buffer: admission counts, the deadlines of groups still generating,
    and the groups ready for training (with every token's version and logprob)."""

    admitted: int
    dropped: int
    pending: dict[int, int]
    ready: list[Group]


@dataclasses.dataclass(frozen=True)
class Ticket:
    """A reserved admission slot: the group's id, served version at admission, and deadline."""

    group_id: int
    admitted_version: int
    deadline_version: int


class StalenessBuffer:
    def __init__(self, *, groups_per_step: int, max_staleness: int, capacity: int | None = None):
        bound = (max_staleness + 1) * groups_per_step
        if capacity is not None and capacity < groups_per_step:
            raise ValueError(f"capacity {capacity} < groups per step {groups_per_step}")
        self.groups_per_step = groups_per_step
        self.max_staleness = max_staleness
        self.capacity = bound if capacity is None else min(capacity, bound)
        self.served_version = 0
        self.admitted = 0
        self.dropped = 0
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
        live = self.admitted - self.dropped
        fresh = live < (self.served_version + self.max_staleness + 1) * self.groups_per_step
        return fresh and self.untrained < self.capacity

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
            if self._pending.pop(group.group_id) != group.deadline_version:
                raise ValueError(f"group {group.group_id}: deadline changed after admission")
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
    async def get_batch(self, version: int, *, clock: WaitClock | None = None) -> list[Group]:
        """The next ``groups_per_step`` groups for the learner at ``version`` (EDF, see module doc)."""
        async with self._changed:
            batch = self._pick(version)
            if batch is None:
                with waiting(clock, "buffer.get_batch"):
                    while batch is None:
                        await self._changed.wait()
                        batch = self._pick(version)
            for g in batch:
                del self._ready[g.group_id]
            self._changed.notify_all()
            return batch

    def _pick(self, version: int) -> list[Group] | None:
        if self._closed:
            raise Closed("buffer")
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

    async def close(self) -> None:
        async with self._changed:
            self._closed = True
            self._changed.notify_all()
