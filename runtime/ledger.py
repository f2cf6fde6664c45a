"""The ledger: every admitted prompt group ends exactly once, trained or dropped with a reason.

States move forward only: admitted -> generating -> scored -> buffered -> trained, or to
dropped(reason) from any live state. A second terminal transition of the same group is counted
as a duplicate and raises: the caller has a bug that would train a group twice.
Invariant: admitted == trained + sum(dropped) + in_flight, at every moment.
"""

from __future__ import annotations

import collections
import enum

import msgspec


class State(enum.IntEnum):
    ADMITTED = 0
    GENERATING = 1
    SCORED = 2
    BUFFERED = 3
    TRAINED = 4
    DROPPED = 5


TERMINAL = (State.TRAINED, State.DROPPED)


class LedgerError(RuntimeError):
    pass


class LedgerCounts(msgspec.Struct):
    admitted: int
    trained: int
    dropped: dict[str, int]
    in_flight: int
    duplicates: int

    @property
    def balanced(self) -> bool:
        return self.admitted == self.trained + sum(self.dropped.values()) + self.in_flight


class LedgerState(msgspec.Struct):
    """What a checkpoint keeps of the ledger: every group's state and the counts."""

    states: dict[int, int]
    dropped: dict[str, int]
    trained: int
    duplicates: int
    next_id: int


class Ledger:
    def __init__(self) -> None:
        self._state: dict[int, State] = {}
        self._dropped: collections.Counter[str] = collections.Counter()
        self._trained = 0
        self._duplicates = 0
        self._next_id = 0

    def admit(self) -> int:
        """Record a new group; returns its id."""
        gid = self._next_id
        self._next_id += 1
        self._state[gid] = State.ADMITTED
        return gid

    def advance(self, gid: int, to: State) -> None:
        if to in TERMINAL:
            raise ValueError("use trained() or dropped() for terminal states")
        now = self._get(gid)
        if now in TERMINAL or to <= now:
            raise LedgerError(f"group {gid}: cannot go from {now.name} to {to.name}")
        self._state[gid] = to

    def trained(self, gid: int) -> None:
        self._finish(gid, State.TRAINED)
        self._trained += 1

    def dropped(self, gid: int, reason: str) -> None:
        self._finish(gid, State.DROPPED)
        self._dropped[reason] += 1

    def restart(self, gid: int) -> None:
        """A live group's work was lost (the run was killed): it goes back to ADMITTED to be
        generated again, keeping its id, so it still ends exactly once."""
        if self._get(gid) in TERMINAL:
            raise LedgerError(f"group {gid} already {self._state[gid].name}; cannot regenerate it")
        self._state[gid] = State.ADMITTED

    def state(self, gid: int) -> State:
        return self._get(gid)

    def snapshot(self) -> LedgerState:
        return LedgerState(states={g: int(s) for g, s in self._state.items()}, dropped=dict(self._dropped),
                           trained=self._trained, duplicates=self._duplicates, next_id=self._next_id)

    @classmethod
    def restore(cls, snap: LedgerState) -> Ledger:
        ledger = cls()
        ledger._state = {g: State(s) for g, s in snap.states.items()}
        ledger._dropped = collections.Counter(snap.dropped)
        ledger._trained, ledger._duplicates, ledger._next_id = snap.trained, snap.duplicates, snap.next_id
        return ledger

    def counts(self) -> LedgerCounts:
        return LedgerCounts(
            admitted=self._next_id,
            trained=self._trained,
            dropped=dict(self._dropped),
            in_flight=sum(1 for s in self._state.values() if s not in TERMINAL),
            duplicates=self._duplicates,
        )

    def _get(self, gid: int) -> State:
        if gid not in self._state:
            raise LedgerError(f"group {gid} was never admitted")
        return self._state[gid]

    def _finish(self, gid: int, to: State) -> None:
        if self._get(gid) in TERMINAL:
            self._duplicates += 1
            raise LedgerError(f"group {gid} already {self._state[gid].name}; refusing {to.name}")
        self._state[gid] = to
