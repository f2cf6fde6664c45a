"""The timeline trace: the tracer's own rules, then the trace of a real run."""

from __future__ import annotations

import asyncio
import json
from collections import defaultdict

import pytest

from runtime import cli
from runtime.core import trace
from tests.runtime.short_run import STEPS, short_run


def x_events(events):
    return [e for e in events if e["ph"] == "X"]


def assert_nested_per_tid(events):
    """Within one tid, spans are disjoint or nested: what a trace viewer needs to draw them."""
    by_tid = defaultdict(list)
    for e in x_events(events):
        by_tid[e["tid"]].append((e["ts"], e["ts"] + e["dur"]))
    for spans in by_tid.values():
        open_ends: list[float] = []
        for start, end in sorted(spans, key=lambda s: (s[0], -s[1])):
            while open_ends and open_ends[-1] <= start:
                open_ends.pop()
            assert not open_ends or end <= open_ends[-1] + 0.2, "spans of one tid overlap without nesting"
            open_ends.append(end)


def test_concurrent_spans_take_lanes_and_the_file_is_valid_json(tmp_path):
    tracer = trace.Tracer(tmp_path / "t.json", flush_every=3)
    tracer.version_of = lambda: 7

    async def group(i: int) -> None:
        with trace.lane("groups") as lane:
            with lane.span("generate", group=i):
                await asyncio.sleep(0)
            with lane.span("score", group=i):
                await asyncio.sleep(0)

    async def main() -> None:
        trace.activate(tracer)
        async with asyncio.TaskGroup() as tg:
            for i in range(5):
                tg.create_task(group(i))
        with trace.span("learner", "train") as s:
            s.set(loss=1.0)

    asyncio.run(main())
    tracer.close()
    tracer.close()  # idempotent
    events = json.loads((tmp_path / "t.json").read_text())
    spans = list(trace.iter_spans(events))
    assert {lane for track, lane, _ in spans if track == "groups"} == set(range(5))  # all five ran at once
    assert all(e["args"]["v"] == 7 for _, _, e in spans)
    assert [e["args"] for t, _, e in spans if t == "learner"] == [{"loss": 1.0, "v": 7}]
    assert_nested_per_tid(events)
    info = events[-1]
    assert info["name"] == "trace_info" and info["args"]["events"] == 11
    assert info["args"]["dropped_over_max_events"] == 0


def test_a_late_recorded_span_never_shares_a_lane_with_an_overlapping_one(tmp_path):
    tracer = trace.Tracer(tmp_path / "t.json")
    t0 = trace.now()
    with tracer.lane("broadcaster") as a:  # busy now, ends after t0
        a.record("x", t0, trace.now())
    with tracer.lane("broadcaster", since=t0) as b:  # lane 0 was busy after t0: must take another
        b.record("late", t0, trace.now())
    tracer.close()
    lanes = {e["name"]: lane for _, lane, e in trace.iter_spans(trace.load_events(tmp_path / "t.json"))}
    assert lanes == {"x": 0, "late": 1}


def test_past_max_events_spans_are_counted_not_written(tmp_path):
    tracer = trace.Tracer(tmp_path / "t.json", max_events=4, flush_every=2)
    lane = tracer.lane("x")
    for _ in range(10):
        lane.record("e", trace.now(), trace.now())
    tracer.close()
    events = trace.load_events(tmp_path / "t.json")
    assert len(x_events(events)) == 4 and events[-1]["args"]["dropped_over_max_events"] == 6


def test_a_killed_run_leaves_a_readable_prefix(tmp_path):
    tracer = trace.Tracer(tmp_path / "t.json", flush_every=2)
    lane = tracer.lane("learner")
    for _ in range(4):
        lane.record("train", trace.now(), trace.now())
    tracer._file.flush()  # no close(): the process died here
    with pytest.raises(json.JSONDecodeError):
        json.loads((tmp_path / "t.json").read_text())
    written = len(x_events(trace.load_events(tmp_path / "t.json")))
    assert written == tracer.written >= 4 - 1  # at most flush_every - 1 events are lost with the process


def test_a_resumed_run_keeps_the_earlier_trace(tmp_path):
    for _ in range(3):
        trace.Tracer(tmp_path / "trace.json").close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["trace.1.json", "trace.2.json", "trace.json"]


def test_outside_a_traced_run_spans_are_free_no_ops():
    async def main():
        assert trace.span("learner", "train") is trace.OFF
        with trace.lane("groups") as lane, lane.span("generate"):
            pass

    asyncio.run(main())


def test_trace_flag_spellings():
    assert cli.resolve([]).log.trace is True
    for argv in (["--trace", "false"], ["--no-trace"], ["--trace", "0"]):
        assert cli.resolve(argv).log.trace is False, argv


def test_a_real_run_traces_every_actor_with_versions_and_overlap():
    events = trace.load_events(short_run() / "trace.json")
    assert all({"ph", "ts", "pid", "tid", "name"} <= e.keys() for e in events)
    xs = x_events(events)
    assert xs and all(e["dur"] >= 0 for e in xs)
    assert all("v" in e["args"] for e in xs)  # every span knows the policy version
    assert_nested_per_tid(events)
    by = defaultdict(list)
    for track, _, e in trace.iter_spans(events):
        by[(track, e["name"])].append(e)
    train = by[("learner", "train")]
    assert len(train) == STEPS and [e["args"]["v"] for e in train] == list(range(STEPS))
    for key in [("groups", "generate"), ("groups", "score"), ("engine0", "request"),
                ("broadcaster", "weight sync"), ("broadcaster", "paused"), ("evaluator", "eval"),
                ("learner", "save weights"), ("generator", "wait admission")]:
        assert by[key], f"no {key} span"
    assert all(e["args"]["weight_version"] is not None for e in by[("engine0", "request")])
    # the point of async: the learner trains while groups are being generated
    gen = [(e["ts"], e["ts"] + e["dur"]) for e in by[("groups", "generate")]]
    overlapping = [t for t in train if any(s < t["ts"] + t["dur"] and t["ts"] < e for s, e in gen)]
    assert len(overlapping) >= STEPS // 2, f"only {len(overlapping)} of {STEPS} steps overlapped generation"
    assert events[-1]["name"] == "trace_info" and events[-1]["args"]["dropped_over_max_events"] == 0


def test_a_crashed_run_still_closes_its_trace(tmp_path):
    from runtime.launch import build, prepare_run_dir
    from runtime.progress import Progress
    from runtime.scheduler import RunFailed

    cfg = cli.resolve(["--run-dir", str(tmp_path / "crash"), "--num-rollout", "3", "--eval-num-prompts", "10"])
    run_dir = prepare_run_dir(cfg)
    scheduler = build(cfg, run_dir, tmp_path / "w", Progress(total_steps=3, mode="off"))

    def broken_step(batch, version):
        raise ZeroDivisionError("learner bug")

    scheduler.agent.learner.trainer.step = broken_step
    with pytest.raises(RunFailed, match="ZeroDivisionError"):
        asyncio.run(asyncio.wait_for(scheduler.run(), 120))
    events = json.loads((run_dir / "trace.json").read_text())  # closed: plain json.loads works
    names = {e["name"] for e in x_events(events)}
    assert {"start engines", "train", "wait admission"} <= names and events[-1]["name"] == "trace_info"
