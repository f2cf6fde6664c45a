"""Several agents in one run, under controlled timing: the real episode driver, buffers, learners,
broadcasters and the scheduler, with a fake engine set per agent and fake trainers
(tests/actors/fakes.py). Every fake token's id is 100 + the version of the engine weights that
produced it, so each agent's recorded token versions can be checked against ground truth."""

import asyncio
import collections
import types
from pathlib import Path

import pytest

from actors.episode_driver import EpisodeDriver
from actors.rollout import SampleRunner
from runtime.agent_config import AgentConfig
from runtime.agents import Agent
from runtime.producers import EpisodeEvals, EpisodeFeed
from runtime.progress import Progress
from runtime.scheduler import Scheduler
from runtime.summary import summarize
from tests.actors.fakes import TOKEN_BASE, FakeEngines, FakeTrainer
from tests.conftest import run


class FakeEngineSet(FakeEngines):
    """``FakeEngines`` with the lifecycle the scheduler drives; records every weight update it receives."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.updates: list[tuple[str, int]] = []
        self.counters: collections.Counter[str] = collections.Counter()

    async def start(self):
        pass

    async def stop(self):
        pass

    async def monitor(self):
        await asyncio.get_running_loop().create_future()  # healthy until cancelled

    def health(self):
        return ["serving"]

    def serving(self):
        return [types.SimpleNamespace(client=self)]

    async def get_weight_version(self) -> str:
        return str(self.version)

    async def update_weights_from_disk(self, path, version):
        self.updates.append((str(path), version))
        await super().update_weights_from_disk(path, version)


def make_agent(name, tmp, *, frozen=False, max_staleness=1, steps=8, groups_per_step=2, groups_per_episode=1,
               tick_s=0.0005, learner_delay_s=0.0, seed=0):
    engines = FakeEngineSet(tick_s=tick_s, seed=seed)
    cfg = AgentConfig(frozen=frozen, max_staleness=max_staleness, num_steps=steps, groups_per_step=groups_per_step,
                      groups_per_episode=groups_per_episode, n_samples_per_prompt=3)

    def runner(temperature):
        return SampleRunner(engines=engines, decode=lambda ids: " ".join(map(str, ids)), seed=seed,
                            sampling_params={"max_new_tokens": 8, "temperature": temperature})

    (tmp / name).mkdir()
    return Agent.assemble(name, cfg, engines=engines, trainer=None if frozen else FakeTrainer(delay_s=learner_delay_s),
                          tokenizer=None, runner=runner(1.0), eval_runner=runner(0.0), weights_dir=tmp / name,
                          weight_sync_timeout_s=10)


async def talk(ep):
    """A and B take turns: B answers A's output; both rewarded by length (any numbers would do)."""
    a, b = ep.agents["a"], ep.agents["b"]
    first = await a.generate([1, 2, 3])
    second = await b.generate(first[0].response_ids or [1])
    for s in first + second:
        s.reward = float(len(s.response_ids) % 3)
    return {"a": [first], "b": [second]}


def run_agents(agents, episode_fn, tmp, *, timeout_s=10.0, eval_episodes=2):
    driver = EpisodeDriver(agents=agents, episode_fn=episode_fn, timeout_s=timeout_s)
    scheduler = Scheduler(agents, EpisodeFeed(driver), EpisodeEvals(driver, eval_episodes), run_dir=tmp,
                          eval_interval=5, stall_timeout_s=30, progress=Progress(total_steps=1, mode="off"))
    run(scheduler.run(), timeout=60)
    return scheduler


def trained_lags(agent):
    """Per trained token of ``agent``: learner version at the step - token version; and checks each
    token's recorded version against the engine's ground truth."""
    lags = []
    for version, batch in enumerate(agent.learner.trainer.batches):
        for g in batch:
            for s in g.samples:
                assert s.token_versions == [t - TOKEN_BASE for t in s.response_ids]
                lags += [version - v for v in s.token_versions]
    return lags


def test_weight_updates_reach_only_their_own_agents_engines(tmp_path):
    a = make_agent("a", tmp_path, steps=6, seed=1)
    b = make_agent("b", tmp_path, steps=10, seed=2)
    s = run_agents([a, b], talk, tmp_path)
    for agent, steps in ((a, 6), (b, 10)):
        assert agent.version == steps and agent.engines.version == steps
        updates = agent.engines.updates
        assert updates and all(Path(p).parent == tmp_path / agent.name for p, _ in updates)
        assert [v for _, v in updates] == sorted(v for _, v in updates) and updates[-1][1] == steps
        assert s.engine_versions[agent.name] == [str(steps)]
        trained_lags(agent)  # every token dated by its own agent's engines
    assert summarize(s, status="completed")["agents"]["a"]["version"] == 6


@pytest.mark.parametrize("slow", ["a", "b"])
def test_each_agents_staleness_bound_holds_against_its_own_version(slow, tmp_path):
    a = make_agent("a", tmp_path, max_staleness=0, steps=8, learner_delay_s=0.02 if slow == "a" else 0.0)
    b = make_agent("b", tmp_path, max_staleness=2, steps=12, groups_per_episode=1,
                   learner_delay_s=0.02 if slow == "b" else 0.0, tick_s=0.002)
    s = run_agents([a, b], talk, tmp_path)
    lags_a, lags_b = trained_lags(a), trained_lags(b)
    assert set(lags_a) == {0}  # max_staleness 0: synchronous, whatever b does
    assert max(lags_b) <= 2
    for agent in (a, b):
        counts = agent.ledger.counts()
        assert counts.balanced and counts.duplicates == 0
        assert summarize(s, status="completed")["agents"][agent.name]["staleness_max_observed"] <= \
            agent.config.max_staleness


def test_a_frozen_agents_version_never_changes(tmp_path):
    a = make_agent("a", tmp_path, steps=8)
    b = make_agent("b", tmp_path, frozen=True)
    served = []

    async def episode(ep):
        served.append(ep.agents["b"].version)
        return await talk(ep)

    s = run_agents([a, b], episode, tmp_path)
    assert a.version == 8 and b.version == 0 and b.learner is None and b.buffer is None
    assert b.engines.updates == [] and b.engines.version == 0 and set(served) == {0}
    assert b.ledger.counts().admitted == 0  # served, never admitted for training
    assert s.engine_versions == {"a": ["8"], "b": ["0"]}
    assert summarize(s, status="completed")["agents"]["b"]["frozen"] is True


def test_an_exception_in_the_episode_is_counted_and_the_run_goes_on(tmp_path):
    a = make_agent("a", tmp_path, steps=6)
    b = make_agent("b", tmp_path, steps=6)

    async def flaky(ep):
        if ep.index % 4 == 1:
            raise ValueError("boom")
        if ep.index == 2:
            await asyncio.Event().wait()  # hangs: the episode timeout ends it
        if ep.index % 4 == 3:
            return {"a": [["not a sample"]]}  # malformed
        return await talk(ep)

    s = run_agents([a, b], flaky, tmp_path, timeout_s=0.5)
    counters = s.lines.fault_counts(s.counters)
    assert counters["episode_errors"] >= 2 and counters["episode_timeouts"] == 1
    for agent in (a, b):
        assert agent.version == 6
        counts = agent.ledger.counts()
        assert counts.balanced and counts.dropped["episode_error"] >= 3
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 12 and '"faults/episode_errors"' in lines[-1]


def test_slots_an_episode_leaves_unused_or_unreturned_are_dropped_with_a_reason(tmp_path):
    a = make_agent("a", tmp_path, steps=5)
    b = make_agent("b", tmp_path, steps=5, groups_per_step=2, groups_per_episode=3)

    async def episode(ep):
        a_, b_ = ep.agents["a"], ep.agents["b"]
        first = await a_.generate([1])
        kept, left = await asyncio.gather(b_.generate([2]), b_.generate([3]))  # the third slot stays unused
        for s in first + kept + left:
            s.reward = float(s.index)
        return {"a": [first], "b": [kept]}

    run_agents([a, b], episode, tmp_path)
    counts = b.ledger.counts()
    assert b.version == 5 and counts.balanced
    assert counts.dropped["unused"] >= 5 and counts.dropped["not_returned"] >= 5


def test_a_multi_agent_episode_runs_multi_turn_samples_through_the_same_generate_function(tmp_path):
    """``generate(..., turns=fn)``: each of agent a's samples is a multi-turn episode of ``fn`` (the
    --custom-generate-function-path mechanism), trained with its environment tokens masked."""
    a = make_agent("a", tmp_path, steps=6, max_staleness=1)
    b = make_agent("b", tmp_path, steps=6)
    env = [7, 7]

    async def two_turns(conv):
        first = await conv.generate()
        conv.append(env)
        await conv.generate()
        return float(len(first.token_ids) % 3)

    async def episode(ep):
        group = await ep.agents["a"].generate([1, 2, 3], turns=two_turns)
        answer = await ep.agents["b"].generate(group[0].response_ids)  # b reads a's whole transcript
        for s in answer:
            s.reward = float(len(s.response_ids) % 3)
        return {"a": [group], "b": [answer]}

    run_agents([a, b], episode, tmp_path)
    assert a.version == 6 and a.ledger.counts().balanced
    trained = [(version, s) for version, batch in enumerate(a.learner.trainer.batches) for g in batch
               for s in g.samples if s.trainable]
    assert trained
    for version, s in trained:
        assert [t.env for t in s.turns] == [False, True, False]
        at = s.turns[1].start
        assert s.response_ids[at:at + 2] == env and s.loss_mask[at:at + 2] == [0, 0]
        policy = [(t, v) for t, v, m in zip(s.response_ids, s.token_versions, s.loss_mask) if m]
        assert len(policy) == len(s.response_ids) - 2
        assert all(t == TOKEN_BASE + v and 0 <= version - v <= 1 for t, v in policy)
