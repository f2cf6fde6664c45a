"""A run's timeline: ``trace.json`` in Chrome trace-event format (open it in https://ui.perfetto.dev).

Every span is a complete ("X") event on a *track* (learner, generator, groups, requests,
broadcaster, evaluator, scheduler). Spans on one track may overlap (32 groups generate at once), and
a viewer demands that the spans of one thread nest, so each track is split into *lanes*: a span
takes the lowest lane that is free for its whole life, and each (track, lane) is one tid, named
``track`` or ``track #lane``. Args of every span carry ``v``, the learner's policy version when the
span began, plus whatever the call site adds (the engine's ``weight_version`` of a request, ...).

Cost: a span is two clock reads, a heap push/pop and a tuple append (about a microsecond; see
``benchmarks/trace_overhead.py``), so tracing is on by default. Memory is bounded: events are
encoded and appended to the file every ``flush_every`` events, and past ``max_events`` they are
counted, not written. The file is a JSON array whose closing ``]`` is written by ``close()`` (the
scheduler's shutdown, which also runs on a crash); a killed process leaves the array unclosed,
which Perfetto and ``load_events`` still read. A resumed run writing into the same directory
keeps the earlier trace as ``trace.1.json`` (then ``.2``, ...).

Call sites reach the tracer of the run they belong to through a context variable, which asyncio
copies into every task: ``trace.span("learner", "train")`` is a no-op outside a traced run (unit
tests, benchmarks). Spans must be opened and closed on the event loop's thread.
"""

from __future__ import annotations

import contextvars
import heapq
import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import msgspec

PID = 1
FLUSH_EVERY = 4096  # events per write: bounds memory and keeps each write short on the event loop
MAX_EVENTS = 2_000_000  # about 280 MB of JSON; a default 400-step run writes some 90k
LANES_PER_TRACK = 1_000_000  # tid = this * (track's order + 1) + lane: no two tracks ever share a tid

now = time.monotonic  # the clock of every span (and of the scheduler's ``started_at``)


class Tracer:
    def __init__(self, path: Path, *, max_events: int = MAX_EVENTS, flush_every: int = FLUSH_EVERY):
        self.path = path
        self.max_events = max_events
        self.flush_every = flush_every
        self.origin = now()
        self.version_of: Callable[[], int | None] = lambda: None  # the scheduler points it at the learner
        self.recorded = 0  # events accepted (metadata aside); past max_events they are dropped
        self.written = 0  # of those, on disk
        self.dropped = 0
        self._pending: list[tuple[Any, ...]] = []  # (ph, name, tid, ts_s, dur_s, args)
        self._tracks: dict[str, _Track] = {}
        self._tids: dict[tuple[str, int], int] = {}
        self._encoder = msgspec.json.Encoder()
        if path.exists():  # a resumed run in the same directory: keep the earlier segment's trace
            path.replace(_free_name(path))
        self._file = open(path, "wb")
        self._file.write(b"[\n")
        self._closed = False

    # -- recording -------------------------------------------------------------------------------
    def lane(self, track: str, since: float | None = None) -> Lane:
        """Hold one lane of ``track`` for several spans (sequential steps of one group, a sync and
        its pause); ``since``: the lane must have been free since then (for spans recorded late)."""
        return Lane(self, track, self._track(track).acquire(now() if since is None else since))

    def complete(self, track: str, lane: int, name: str, t0: float, t1: float, args: dict[str, Any]) -> None:
        self._emit("X", name, self._tid(track, lane), t0, max(0.0, t1 - t0), args)

    def counter(self, name: str, **values: float) -> None:
        """A counter track (Perfetto draws it as a graph): e.g. buffer depths at each step."""
        self._emit("C", name, 0, now(), None, values)

    def _emit(self, ph: str, name: str, tid: int, t0: float, dur: float | None, args: dict[str, Any]) -> None:
        if self._closed:
            return
        if self.recorded >= self.max_events:
            self.dropped += 1
            return
        self.recorded += 1
        self._pending.append((ph, name, tid, t0, dur, args))
        if len(self._pending) >= self.flush_every:
            self.flush()

    def _track(self, track: str) -> _Track:
        t = self._tracks.get(track)
        if t is None:
            t = self._tracks[track] = _Track(len(self._tracks))
        return t

    def _tid(self, track: str, lane: int) -> int:
        tid = self._tids.get((track, lane))
        if tid is None:
            # tids sort tracks in first-use order and lanes within a track
            tid = self._tids[(track, lane)] = LANES_PER_TRACK * (self._track(track).order + 1) + lane
            label = track if lane == 0 else f"{track} #{lane}"
            meta = {"name": label, "track": track, "lane": lane}
            self._pending.append(("M", "thread_name", tid, self.origin, None, meta))
            self._pending.append(("M", "thread_sort_index", tid, self.origin, None, {"sort_index": tid}))
        return tid

    # -- output ----------------------------------------------------------------------------------
    def flush(self) -> None:
        if not self._pending or self._closed:
            return
        events = [self._event(*e) for e in self._pending]
        self._file.write(b"".join(self._encoder.encode(e) + b",\n" for e in events))
        self._file.flush()
        self.written += sum(1 for e in self._pending if e[0] != "M")
        self._pending.clear()

    def _event(self, ph: str, name: str, tid: int, t0: float, dur: float | None, args: dict[str, Any]
               ) -> dict[str, Any]:
        ev: dict[str, Any] = {"ph": ph, "name": name, "pid": PID, "tid": tid,
                              "ts": round((t0 - self.origin) * 1e6, 1), "args": args}
        if dur is not None:
            ev["dur"] = round(dur * 1e6, 1)
        return ev

    def close(self) -> None:
        """Write what is pending and close the JSON array; idempotent."""
        if self._closed:
            return
        self._pending.append(("M", "process_name", 0, self.origin, None, {"name": "asyncrl run"}))
        self.flush()
        info = {"name": "trace_info", "ph": "M", "pid": PID, "tid": 0, "ts": 0,
                "args": {"events": self.written, "dropped_over_max_events": self.dropped,
                         "max_events": self.max_events, "clock": "time.monotonic", "origin_s": self.origin}}
        self._file.write(self._encoder.encode(info) + b"\n]\n")
        self._file.close()
        self._closed = True


def _free_name(path: Path) -> Path:
    """``trace.1.json``, ``trace.2.json``, ...: the first that does not exist."""
    n = 1
    while (candidate := path.with_name(f"{path.stem}.{n}{path.suffix}")).exists():
        n += 1
    return candidate


class _Track:
    """The lanes of one track: which are held, and when each was last released."""

    __slots__ = ("free", "last_end", "order")

    def __init__(self, order: int):
        self.order = order
        self.free: list[int] = []  # heap of released lanes
        self.last_end: list[float] = []  # per lane; +inf while held

    def acquire(self, t0: float) -> int:
        if self.free and self.last_end[self.free[0]] <= t0:
            lane = heapq.heappop(self.free)
        else:  # the lowest free lane may have been busy after t0 (a late recording): scan, else add
            lane = next((i for i in sorted(self.free) if self.last_end[i] <= t0), len(self.last_end))
            if lane == len(self.last_end):
                self.last_end.append(0.0)
            else:
                self.free.remove(lane)
                heapq.heapify(self.free)
        self.last_end[lane] = float("inf")
        return lane

    def release(self, lane: int, t1: float) -> None:
        self.last_end[lane] = t1
        heapq.heappush(self.free, lane)


class Span:
    """A span that takes a lane on enter and records itself on exit (also when cancelled)."""

    __slots__ = ("tracer", "track", "name", "args", "lane", "t0")

    def __init__(self, tracer: Tracer, track: str, name: str, args: dict[str, Any]):
        self.tracer, self.track, self.name, self.args = tracer, track, name, args

    def __enter__(self) -> Span:
        self.t0 = now()
        self.lane = self.tracer._track(self.track).acquire(self.t0)
        self.args.setdefault("v", self.tracer.version_of())
        return self

    def __exit__(self, *exc: object) -> None:
        t1 = now()
        self.tracer.complete(self.track, self.lane, self.name, self.t0, t1, self.args)
        self.tracer._track(self.track).release(self.lane, t1)

    def set(self, **args: Any) -> None:
        """Add args known only at the end (a request's weight version, an eval's reward)."""
        self.args.update(args)


class Lane:
    __slots__ = ("tracer", "track", "lane")

    def __init__(self, tracer: Tracer, track: str, lane: int):
        self.tracer, self.track, self.lane = tracer, track, lane

    def __enter__(self) -> Lane:
        return self

    def __exit__(self, *exc: object) -> None:
        self.tracer._track(self.track).release(self.lane, now())

    def span(self, name: str, **args: Any) -> _LaneSpan:
        return _LaneSpan(self, name, args)

    def record(self, name: str, t0: float, t1: float, **args: Any) -> None:
        args.setdefault("v", self.tracer.version_of())
        self.tracer.complete(self.track, self.lane, name, t0, t1, args)


class _LaneSpan:
    __slots__ = ("lane", "name", "args", "t0")

    def __init__(self, lane: Lane, name: str, args: dict[str, Any]):
        self.lane, self.name, self.args = lane, name, args

    def __enter__(self) -> _LaneSpan:
        self.t0 = now()
        self.args.setdefault("v", self.lane.tracer.version_of())
        return self

    def __exit__(self, *exc: object) -> None:
        self.lane.tracer.complete(self.lane.track, self.lane.lane, self.name, self.t0, now(), self.args)


class NoSpan:
    """What call sites get outside a traced run: every operation does nothing."""

    __slots__ = ()

    def __enter__(self) -> NoSpan:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def set(self, **args: Any) -> None:
        pass

    def span(self, name: str, **args: Any) -> NoSpan:
        return self

    def record(self, name: str, t0: float, t1: float, **args: Any) -> None:
        pass


OFF = NoSpan()
_current: contextvars.ContextVar[Tracer | None] = contextvars.ContextVar("asyncrl_tracer", default=None)


def activate(tracer: Tracer | None) -> None:
    """Make ``tracer`` the one spans in this task, and the tasks it creates from now on, go to."""
    _current.set(tracer)


def span(track: str, name: str, **args: Any) -> Span | NoSpan:
    """``with trace.span("learner", "train"):`` -- a span on ``track`` in the active run, if any."""
    tracer = _current.get()
    return OFF if tracer is None else Span(tracer, track, name, args)


def lane(track: str, since: float | None = None) -> Lane | NoSpan:
    tracer = _current.get()
    return OFF if tracer is None else tracer.lane(track, since)


def counter(name: str, **values: float) -> None:
    tracer = _current.get()
    if tracer is not None:
        tracer.counter(name, **values)


def load_events(path: Path) -> list[dict[str, Any]]:
    """The events of a trace file, also of one a killed run left without its closing bracket."""
    text = path.read_text()
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return json.loads(text.rstrip().rstrip(",") + "]")


def iter_spans(events: list[dict[str, Any]]) -> Iterator[tuple[str, int, dict[str, Any]]]:
    """(track, lane, event) for every complete event, using the thread names the tracer wrote."""
    where = {e["tid"]: (e["args"]["track"], e["args"]["lane"]) for e in events
             if e["ph"] == "M" and e["name"] == "thread_name" and "track" in e.get("args", {})}
    for e in events:
        if e["ph"] == "X" and e["tid"] in where:
            track, lane_ = where[e["tid"]]
            yield track, lane_, e
