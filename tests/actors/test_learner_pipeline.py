"""The learner's pipelining: the batch for step v+1 is taken while step v runs and queued behind it,
and version v+1 is published while step v+1 runs; with an after_step hook (a checkpoint) every
step waits for the publish and the hook, as before. Ordering is checked on one event log that the
fakes write from both threads; gates (bounded waits) make a pipelined order the only one that
passes without a timeout."""

import asyncio
import threading
from pathlib import Path

import pytest

from actors.learner import Learner, StalenessViolation
from buffers.buffer import StalenessBuffer
from buffers.types import Group, Prompt, Sample, Status
from runtime.core.ledger import Ledger
from tests.actors.fakes import FakeTrainer
from tests.conftest import run

GATE_S = 5.0


class Events:
    """The log, and one threading.Event per (kind, version) for the gates."""

    def __init__(self):
        self.log: list[str] = []
        self._events: dict[str, threading.Event] = {}

    def mark(self, what: str) -> None:
        self.log.append(what)
        self._event(what).set()

    def wait(self, what: str) -> bool:
        return self._event(what).wait(GATE_S)

    def _event(self, what: str) -> threading.Event:
        return self._events.setdefault(what, threading.Event())

    def before(self, a: str, b: str) -> bool:
        return self.log.index(a) < self.log.index(b)


class Buffer(StalenessBuffer):
    def __init__(self, events: Events, **kw):
        super().__init__(**kw)
        self.events = events

    async def get_batch(self, version, **kw):
        batch = await super().get_batch(version, **kw)
        self.events.mark(f"take {version}")
        return batch


class Trainer(FakeTrainer):
    """With ``gates``: step v (v > 0) waits for publish v, and the save of version v (before the
    last) waits for the batch of step v to be taken: both hold only if the learner pipelines."""

    def __init__(self, events: Events, *, gates: bool, num_steps: int):
        super().__init__()
        self.events, self.gates, self.num_steps = events, gates, num_steps

    def step(self, batch, version):
        self.events.mark(f"step {version}")
        if self.gates and version > 0:
            assert self.events.wait(f"publish {version}"), "the publish waited for the step"
        return super().step(batch, version)

    def save_weights(self, out_dir: Path) -> Path:
        version = int(out_dir.name[1:])
        if self.gates and version < self.num_steps:
            assert self.events.wait(f"take {version}"), "the next batch was not taken during the step"
        self.events.mark(f"saved {version}")
        return out_dir


class Publisher:
    """With ``gates``: publishing version v (before the last) waits for step v to have started,
    which only happens before the publish if the step was queued behind the one before."""

    wants_files = True

    def __init__(self, events: Events, *, gates: bool, num_steps: int):
        self.events, self.gates, self.num_steps = events, gates, num_steps
        self.paths: list[str] = []

    async def publish(self, version, path):
        if self.gates and version < self.num_steps:
            assert await asyncio.to_thread(self.events.wait, f"step {version}"), "step not queued"
        self.paths.append(path.name)
        self.events.mark(f"publish {version}")


async def add_groups(buffer: StalenessBuffer, ledger: Ledger, n: int, token_version: int = 0) -> None:
    for _ in range(n):
        ticket = await buffer.reserve(ledger.admit)
        sample = Sample(group_id=ticket.group_id, index=0, prompt_ids=[1], status=Status.COMPLETED)
        sample.add_segment([5], [-1.0], token_version)
        await buffer.put(Group(ticket.group_id, Prompt(0, [1]), [sample], ticket.admitted_version,
                               ticket.deadline_version))


def learner_for(events: Events, tmp: Path, *, steps: int, gates: bool, max_staleness: int = 10**6,
                after_step=None) -> tuple[Learner, Buffer, Ledger, Trainer]:
    buffer = Buffer(events, groups_per_step=2, max_staleness=10**6)
    ledger, trainer = Ledger(), Trainer(events, gates=gates, num_steps=steps)
    publisher = Publisher(events, gates=gates, num_steps=steps)
    learner = Learner(trainer=trainer, buffer=buffer, ledger=ledger, publisher=publisher, num_steps=steps,
                      max_staleness=max_staleness, weights_dir=tmp, after_step=after_step)
    return learner, buffer, ledger, trainer


def test_each_next_batch_is_taken_during_the_step_and_each_version_published_during_the_next(tmp_path):
    async def scenario():
        events = Events()
        learner, buffer, ledger, trainer = learner_for(events, tmp_path, steps=4, gates=True)
        await add_groups(buffer, ledger, 8)
        await learner.run()
        for v in (1, 2, 3):
            assert events.before(f"take {v}", f"saved {v}") and events.before(f"step {v}", f"publish {v}")
        assert learner.publisher.paths == ["v1", "v2", "v3", "v4"]
        assert ledger.counts().trained == 8 and ledger.counts().balanced

    run(scenario())


def test_with_an_after_step_hook_each_step_waits_for_the_publish_and_the_hook(tmp_path):
    async def scenario():
        events = Events()

        async def checkpoint(version):
            events.mark(f"hook {version}")

        learner, buffer, ledger, _ = learner_for(events, tmp_path, steps=3, gates=False, after_step=checkpoint)
        await add_groups(buffer, ledger, 6)
        await learner.run()
        for v in (1, 2):
            assert events.before(f"saved {v}", f"publish {v}") and events.before(f"publish {v}", f"hook {v}")
            assert events.before(f"hook {v}", f"take {v}") and events.before(f"take {v}", f"step {v}")

    run(scenario())


def test_a_batch_that_arrives_during_a_step_is_queued_behind_it(tmp_path):
    async def scenario():
        events = Events()
        learner, buffer, ledger, trainer = learner_for(events, tmp_path, steps=2, gates=True)
        await add_groups(buffer, ledger, 2)
        running = asyncio.create_task(learner.run(), name="learner")
        await asyncio.to_thread(events.wait, "step 0")
        await add_groups(buffer, ledger, 2)  # while step 0 runs (its save waits for this batch)
        await running
        assert events.before("take 1", "saved 1") and events.before("step 1", "publish 1")

    run(scenario())


def test_a_queued_batch_is_checked_for_staleness_before_it_is_trained(tmp_path):
    async def scenario():
        events = Events()
        # every token is of version 0: the second batch, trained at version 1, breaks the bound 0
        learner, buffer, ledger, _ = learner_for(events, tmp_path, steps=2, gates=False, max_staleness=0)
        await add_groups(buffer, ledger, 4)
        with pytest.raises(StalenessViolation):
            await learner.run()
        assert "step 1" not in events.log  # the stale batch never reached the trainer

    run(scenario())


def test_a_before_step_hook_runs_after_the_take_and_before_each_step_unpipelined(tmp_path):
    async def scenario():
        events = Events()

        async def release(version):
            events.mark(f"release {version}")

        learner, buffer, ledger, _ = learner_for(events, tmp_path, steps=3, gates=False)
        learner.before_step = release
        await add_groups(buffer, ledger, 6)
        await learner.run()
        for v in (0, 1, 2):
            assert events.before(f"take {v}", f"release {v}") and events.before(f"release {v}", f"step {v}")
        for v in (1, 2):  # not pipelined: step v is taken only after version v is published
            assert events.before(f"publish {v}", f"take {v}")

    run(scenario())
