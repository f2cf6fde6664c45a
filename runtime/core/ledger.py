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
    """What a checkpoint keeps of the ledger: live groups' states, which ids have ended, counts."""

    live: dict[int, int]
    ended: bytes  # bitmap: bit g set once group g was trained or dropped
    dropped: dict[str, int]
    trained: int
    duplicates: int
    next_id: int


class Ledger:
    """Memory stays flat over a long run: only live groups keep a state; an ended group is one bit
    (ids are dense), enough to refuse a second ending."""

    def __init__(self) -> None:
        self._live: dict[int, State] = {}
        self._ended = bytearray()
        self._dropped: collections.Counter[str] = collections.Counter()
        self._trained = 0
        self._duplicates = 0
        self._next_id = 0

    def admit(self) -> int:
        """Record a new group; returns its id."""
        gid = self._next_id
        self._next_id += 1
        self._live[gid] = State.ADMITTED
        if len(self._ended) * 8 <= gid:
            self._ended.extend(bytes(max(64, len(self._ended))))  # doubling: amortised O(1)
        return gid

    def advance(self, gid: int, to: State) -> None:
        if to in TERMINAL:
            raise ValueError("use trained() or dropped() for terminal states")
        now = self._get(gid)
        if to <= now:
            raise LedgerError(f"group {gid}: cannot go from {now.name} to {to.name}")
        self._live[gid] = to

    def trained(self, gid: int) -> None:
        self._finish(gid)
        self._trained += 1

    def dropped(self, gid: int, reason: str) -> None:
        self._finish(gid)
        self._dropped[reason] += 1

    def restart(self, gid: int) -> None:
        """A live group's work was lost (the run was killed, or it expired): it goes back to
        ADMITTED to be generated again, keeping its id, so it still ends exactly once."""
        self._get(gid)
        self._live[gid] = State.ADMITTED

    def state(self, gid: int) -> State:
        """A live group's state (LedgerError for one that ended or never was)."""
        return self._get(gid)

    def is_live(self, gid: int) -> bool:
        """Admitted and not ended."""
        return gid in self._live

    def snapshot(self) -> LedgerState:
        return LedgerState(live={g: int(s) for g, s in self._live.items()}, ended=bytes(self._ended),
                           dropped=dict(self._dropped), trained=self._trained, duplicates=self._duplicates,
                           next_id=self._next_id)

    @classmethod
    def restore(cls, snap: LedgerState) -> Ledger:
        ledger = cls()
        ledger._live = {g: State(s) for g, s in snap.live.items()}
        ledger._ended = bytearray(snap.ended)
        ledger._dropped = collections.Counter(snap.dropped)
        ledger._trained, ledger._duplicates, ledger._next_id = snap.trained, snap.duplicates, snap.next_id
        return ledger

    def counts(self) -> LedgerCounts:
        return LedgerCounts(
            admitted=self._next_id,
            trained=self._trained,
            dropped=dict(self._dropped),
            in_flight=len(self._live),
            duplicates=self._duplicates,
        )

    def _has_ended(self, gid: int) -> bool:
        return 0 <= gid < self._next_id and bool(self._ended[gid >> 3] & (1 << (gid & 7)))

    def _get(self, gid: int) -> State:
        if gid in self._live:
            return self._live[gid]
        if self._has_ended(gid):
            raise LedgerError(f"group {gid} already ended")
        raise LedgerError(f"group {gid} was never admitted")

    def _finish(self, gid: int) -> None:
        if self._has_ended(gid):
            self._duplicates += 1
            raise LedgerError(f"group {gid} already ended; refusing to end it twice")
        self._get(gid)
        del self._live[gid]
        self._ended[gid >> 3] |= 1 << (gid & 7)
