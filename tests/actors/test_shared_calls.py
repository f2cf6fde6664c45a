"""Shared /generate calls: who shares a call, what each caller gets back, errors and cancellation."""

import asyncio

from actors.shared_calls import SharedCalls
from policies.engine.client import EngineError, EngineLost, GenerateOutput
from tests.conftest import run


def out(token: int) -> GenerateOutput:
    return GenerateOutput(output_ids=[token], logprobs=[-1.0], finish_reason="stop", weight_version="0",
                          prompt_tokens=1, completion_tokens=1, latency_s=0.0)


class Engine:
    """Answers each member with its prompt's first token; records every call; ``refuse`` tokens
    make a call that holds one answer 400; ``lose`` fails every call as a lost engine; ``hold``
    keeps calls open until set (or cancelled)."""

    def __init__(self, refuse=(), lose=False):
        self.calls: list[list[str]] = []
        self.cancelled = 0
        self.refuse, self.lose = set(refuse), lose
        self.hold = asyncio.Event()
        self.hold.set()
        self.entered = asyncio.Event()

    async def send(self, input_ids, params, rids):
        self.calls.append(list(rids))
        self.entered.set()
        try:
            await self.hold.wait()
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        if self.lose:
            raise EngineLost("u", "/generate", "engine died")
        if self.refuse & {ids[0] for ids in input_ids}:
            raise EngineError("u", "/generate", "HTTP 400: prompt too long", status=400)
        return [out(ids[0]) for ids in input_ids]


def test_one_tick_one_key_is_one_call_and_each_caller_gets_its_own_outputs():
    async def scenario():
        engine = Engine()
        shared = SharedCalls(engine.send)
        a, b, c = await asyncio.gather(shared.generate_batch("k", [[1], [2]], [{}, {}], ["a1", "a2"]),
                                       shared.generate_batch("k", [[3]], [{}], ["b1"]),
                                       shared.generate_batch("other", [[4]], [{}], ["c1"]))
        assert [o.output_ids for o in a] == [[1], [2]] and [o.output_ids for o in b] == [[3]]
        assert [o.output_ids for o in c] == [[4]]
        assert sorted(engine.calls) == [["a1", "a2", "b1"], ["c1"]]  # keys never mix
        await shared.generate_batch("k", [[5]], [{}], ["d1"])  # a later tick: a call of its own
        assert engine.calls[-1] == ["d1"]

    run(scenario())


def test_a_call_per_serving_engine():
    async def scenario():
        engine = Engine()
        shared = SharedCalls(engine.send, width=lambda: 2)
        await asyncio.gather(*(shared.generate_batch("k", [[i]], [{}], [f"r{i}"]) for i in range(5)))
        assert sorted(len(c) for c in engine.calls) == [2, 3]

    run(scenario())


def test_a_refused_call_is_resent_per_caller_so_only_the_bad_caller_fails():
    async def scenario():
        engine = Engine(refuse={2})
        shared = SharedCalls(engine.send)
        good, bad = await asyncio.gather(shared.generate_batch("k", [[1]], [{}], ["a"]),
                                         shared.generate_batch("k", [[2]], [{}], ["b"]), return_exceptions=True)
        assert [o.output_ids for o in good] == [[1]]
        assert isinstance(bad, EngineError) and bad.status == 400
        assert engine.calls == [["a", "b"], ["a"], ["b"]]

    run(scenario())


def test_a_lost_engine_reaches_every_caller_once():
    async def scenario():
        engine = Engine(lose=True)
        shared = SharedCalls(engine.send)
        errors = await asyncio.gather(shared.generate_batch("k", [[1]], [{}], ["a"]),
                                      shared.generate_batch("k", [[2]], [{}], ["b"]), return_exceptions=True)
        assert all(isinstance(e, EngineLost) for e in errors)
        assert engine.calls == [["a", "b"]]  # the callers re-send (failover), not the shared call

    run(scenario())


def test_a_call_ends_only_when_every_caller_is_cancelled():
    async def scenario():
        engine = Engine()
        engine.hold.clear()
        shared = SharedCalls(engine.send)
        a = asyncio.create_task(shared.generate_batch("k", [[1]], [{}], ["a"]))
        b = asyncio.create_task(shared.generate_batch("k", [[2]], [{}], ["b"]))
        await engine.entered.wait()
        (call,) = shared._tasks
        a.cancel()
        await asyncio.gather(a, return_exceptions=True)
        assert not call.done() and engine.cancelled == 0  # b still waits on it
        b.cancel()
        await asyncio.gather(b, call, return_exceptions=True)
        assert call.cancelled() and engine.cancelled == 1
        assert not shared._tasks

    run(scenario())
