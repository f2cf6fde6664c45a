"""Multi-turn episodes (actors/conversation.py, actors/generate_fn.py): token-exact transcripts on a
real engine, versions per turn across weight updates, replay after a resume, limits and faults."""

from __future__ import annotations

import asyncio
import copy
import random

import pytest

from actors.conversation import Conversation, EpisodeLimits
from actors.generate_fn import Episodes
from actors.rollout import SampleRunner
from buffers.types import Sample, Status
from launchers.recipes import calculator
from policies.engine import EngineClient, EngineProcess
from policies.engine.client import EngineLost
from policies.model import qwen3_config, write_random_checkpoint
from policies.trainer import collate
from tests.actors.fakes import TOKEN_BASE, FakeEngines
from tests.conftest import run


class Draws(random.Random):
    """Sets ``event`` at the ``after``-th draw: a step of the fake engine to act on."""

    def __init__(self, *, after: int, event: asyncio.Event):
        super().__init__(0)
        self.after, self.event, self.n = after, event, 0

    def random(self) -> float:
        self.n += 1
        if self.n == self.after:
            self.event.set()
        return super().random()


TASK = calculator.make_task(seed=0, eval_num_prompts=8)
TOK = TASK.tokenizer


class Recording:
    """The engines, with every /generate call's inputs and outputs kept (a spy, not a fake)."""

    def __init__(self, engines):
        self.engines = engines
        self.calls: list[tuple[list[int], list[int], list[float]]] = []
        self.by_sample: dict[int, list[tuple[list[int], list[int], list[float]]]] = {}

    async def generate_batch(self, input_ids, sampling_params, *, rids=None):
        outs = await self.engines.generate_batch(input_ids, sampling_params, rids=rids)
        for ids, out, rid in zip(input_ids, outs, rids):
            call = (list(ids), list(out.output_ids), list(out.logprobs))
            self.calls.append(call)
            self.by_sample.setdefault(int(rid.split("-")[1]), []).append(call)  # rid: g{group}-{index}-...
        return outs


def runner_on(engines, *, max_new_tokens=6, seed=0) -> SampleRunner:
    return SampleRunner(engines=engines, decode=lambda ids: TOK.decode(ids), seed=seed,
                        sampling_params={"temperature": 1.0, "max_new_tokens": max_new_tokens,
                                         "stop_token_ids": TASK.stop_token_ids})


def episodes(fn, engines, **limits) -> Episodes:
    limits = {"turn_max_tokens": 6, "max_context_len": 64} | limits
    return Episodes(fn, runner=runner_on(engines, max_new_tokens=limits["turn_max_tokens"]), tokenizer=TOK,
                    limits=EpisodeLimits(**limits))


def group(n=1, index=0):
    p = TASK.train_prompt(index)
    return p, [Sample(group_id=index, index=i, prompt_ids=list(p.input_ids)) for i in range(n)]


ENV_1 = [calculator.RESPONSE, "4", "2", calculator.END_RESPONSE]


async def three_turns(conv: Conversation) -> float:
    """Three policy turns with two environment turns between: raw tokens, then a chat message."""
    await conv.generate()
    conv.append(TOK.convert_tokens_to_ids(ENV_1))
    await conv.generate()
    conv.append_messages([{"role": "tool", "content": "7 7"}])
    await conv.generate()
    return 0.5


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    cfg = qwen3_config(vocab_size=len(TOK), num_layers=2, hidden_size=32, num_attention_heads=2, num_query_groups=1,
                       ffn_hidden_size=64, max_position_embeddings=64, pad_token_id=TOK.pad_token_id,
                       bos_token_id=TOK.bos_token_id, eos_token_id=TOK.eos_token_id)
    path = write_random_checkpoint(tmp_path_factory.mktemp("calc") / "model", cfg, TOK, seed=0)
    proc = EngineProcess(path, log_path=tmp_path_factory.mktemp("log") / "engine.log")
    proc.start()
    try:
        asyncio.run(proc.wait_ready(timeout_s=120))
        yield proc
    finally:
        asyncio.run(proc.stop())


def test_trained_tokens_are_the_engine_tokens_and_environment_tokens_are_masked(engine):
    async def main():
        async with EngineClient(engine.url) as client:
            spy = Recording(client)
            prompt, samples = group(n=2)
            assert await episodes(three_turns, spy).run_group(prompt, samples, base_version=0) == []
            return spy, samples

    spy, samples = run(main(), timeout=90)
    for s in samples:
        calls = spy.by_sample[s.index]
        assert len(calls) == 3 and s.reward == 0.5 and s.trainable
        # token in: each request is exactly the transcript so far; token out: appended as returned
        expected, mask, logprobs = [], [], []
        for i, (ids, out, lps) in enumerate(calls):
            assert ids == s.prompt_ids + expected
            expected += out
            mask += [1] * len(out)
            logprobs += lps
            # the tool message's template text; after a turn cut by its bound, the end-of-turn first
            ended = out[-1] in TASK.stop_token_ids
            env_2 = TOK.encode(("" if ended else " <eos>") + " <tool_response> 7 7 </tool_response> ")
            env = [TOK.convert_tokens_to_ids(ENV_1), env_2][i] if i < 2 else []
            expected += env
            mask += [0] * len(env)
            logprobs += [0.0] * len(env)
        assert s.response_ids == expected and s.loss_mask == mask and s.behavior_logprobs == logprobs
        assert [t.env for t in s.turns] == [False, True, False, True, False]
    # what the learner trains on: the same tokens, the loss on the engine's tokens only
    batch = collate(samples, [1.0, -1.0], TOK.pad_token_id, version=0)
    for row, s in enumerate(samples):
        n = len(s.prompt_ids) + len(s.response_ids)
        assert batch.input_ids[row, :n].tolist() == s.prompt_ids + s.response_ids
        trained = [s.response_ids[k] for k in range(len(s.response_ids))
                   if batch.mask[row, len(s.prompt_ids) - 1 + k] == 1]
        assert trained == [t for _, out, _ in spy.by_sample[s.index] for t in out]
        assert batch.mask[row].sum() == sum(s.loss_mask)


def test_a_weight_update_between_and_during_turns_dates_each_token_with_its_own_version():
    eng = FakeEngines(stop_prob=0.0)  # named fake: token id = 100 + the version that produced it

    async def fn(conv: Conversation) -> float:
        await conv.generate()
        await eng.sync_weights("w1", 1, "abort")
        conv.append([5, 6])
        await conv.generate()
        # an update while the third turn runs, after its second token (the fake draws two numbers
        # per token: the 5th draw is the third token's tick): 2 tokens from v1, the rest from v2
        two_tokens = asyncio.Event()
        eng.rng = Draws(after=5, event=two_tokens)
        turn = asyncio.create_task(conv.generate())
        await two_tokens.wait()
        await eng.sync_weights("w2", 2, "in_place")
        await turn
        return 1.0

    async def main():
        prompt, (s,) = group()
        await episodes(fn, eng).run_group(prompt, [s], base_version=0)
        return s

    s = run(main())
    versions = s.token_versions
    assert versions[:6] == [0] * 6 and versions[6:8] == [0, 0]  # environment tokens: the turn before's version
    assert versions[8:14] == [1] * 6
    assert versions[14:] == [1, 1, 2, 2, 2, 2]
    policy = [(t, v) for t, v, m in zip(s.response_ids, versions, s.loss_mask) if m]
    assert all(t == TOKEN_BASE + v for t, v in policy)  # each token's recorded version is the one that made it
    assert s.loss_mask[6:8] == [0, 0]


def test_a_resumed_episode_replays_its_transcript_and_generates_only_what_is_missing():
    async def finished_and_cut():
        eng = FakeEngines(stop_prob=0.0)
        prompt, (s,) = group()
        await episodes(three_turns, eng).run_group(prompt, [s], base_version=0)
        return s

    full = run(finished_and_cut())
    cut = copy.deepcopy(full)  # as a checkpoint caught it: 2 tokens into the second policy turn
    second = cut.turns[2].start
    cut.truncate(second + 2)
    cut.status = Status.PENDING

    eng = Recording(FakeEngines(stop_prob=0.0))
    prompt, _ = group()
    run(episodes(three_turns, eng).run_group(prompt, [cut], base_version=0))
    # one request finishes the second turn from its 2 tokens, one makes the third: nothing twice
    assert [len(ids) - len(cut.prompt_ids) for ids, _, _ in eng.calls] == [second + 2, full.turns[4].start]
    assert [len(out) for _, out, _ in eng.calls] == [4, 6]
    assert cut.response_ids[:second + 2] == full.response_ids[:second + 2]
    assert len(cut.response_ids) == len(full.response_ids) and cut.loss_mask == full.loss_mask
    assert [t.env for t in cut.turns] == [t.env for t in full.turns] and cut.reward == 0.5


def test_a_replay_whose_environment_answers_differently_goes_on_live_from_there():
    calls = []

    async def fn(conv):
        await conv.generate()
        conv.append([5] if not calls else [7])  # the environment is not deterministic
        calls.append(1)
        await conv.generate()
        return 1.0

    eng = FakeEngines(stop_prob=0.0)
    prompt, (s,) = group()
    ep = episodes(fn, eng)
    run(ep.run_group(prompt, [s], base_version=0))
    first_turn = s.response_ids[:6]
    run(ep.run_group(prompt, [s], base_version=0))
    assert s.response_ids[:6] == first_turn and s.response_ids[6] == 7 and len(s.response_ids) == 13
    assert ep.counters["replay_diverged"] == 1


def test_a_hung_tool_and_a_malformed_return_fail_their_sample_counted_and_the_group_goes_on():
    release = asyncio.Event()

    async def fn(conv: Conversation):
        await conv.generate()
        if conv.sample.index == 0:
            await conv.call_tool(release.wait)  # hangs
        if conv.sample.index == 1:
            return "1.0"
        if conv.sample.index == 2:
            await conv.generate()  # a turn beyond max_turns
        return 1.0

    eng = FakeEngines()
    prompt, samples = group(n=4)
    ep = episodes(fn, eng, tool_timeout_s=0.2, max_turns=1)
    run(ep.run_group(prompt, samples, base_version=0))
    assert [s.status == Status.FAILED for s in samples] == [True, True, True, False]
    assert samples[0].failure.startswith("episode_tool_timeout") and not any(samples[0].loss_mask)
    assert "returned str '1.0'" in samples[1].failure and "episode_bad_return" in samples[1].failure
    assert samples[2].failure.startswith("episode_max_turns")
    assert samples[3].trainable and samples[3].reward == 1.0
    assert ep.counters["tool_timeouts"] == 1 and ep.counters["episode_tool_timeout"] == 1
    assert ep.counters["episode_bad_return"] == 1 and ep.counters["episode_max_turns"] == 1


def test_the_context_bound_ends_an_episode_and_no_turn_passes_it():
    async def fn(conv: Conversation):
        while True:
            await conv.generate()
            conv.append([5, 5, 5])

    eng = FakeEngines(stop_prob=0.0)
    prompt, (s,) = group()
    ep = episodes(fn, eng, max_context_len=30, max_turns=100)
    run(ep.run_group(prompt, [s], base_version=0))
    assert len(s.prompt_ids) + len(s.response_ids) <= 30
    assert s.status == Status.FAILED and ep.counters["episode_max_context_len"] == 1


def test_an_engine_lost_under_a_turn_fails_over_and_the_transcript_keeps_every_token():
    class LosesOnce(FakeEngines):
        """Named fake: the second request of the episode dies with its engine (EngineLost)."""

        calls = 0

        async def generate_batch(self, input_ids, sampling_params, *, rids=None):
            LosesOnce.calls += 1
            if LosesOnce.calls == 2:
                raise EngineLost("fake", "/generate", "engine died")
            return await super().generate_batch(input_ids, sampling_params, rids=rids)

    eng = Recording(LosesOnce(stop_prob=0.0))
    prompt, (s,) = group()
    ep = episodes(three_turns, eng)
    run(ep.run_group(prompt, [s], base_version=0))
    assert s.trainable and ep.counters["failovers_resumed"] == 1
    assert len(eng.calls) == 3  # the lost request was sent again, from the same transcript
    assert [t.env for t in s.turns] == [False, True, False, True, False]
    assert sum(s.loss_mask) == 18 and eng.calls[1][0] == s.prompt_ids + s.response_ids[:s.turns[2].start]
