"""The OpenAI-compatible endpoint (actors/chat_endpoint.py) driven by the official ``openai`` client:
tool calls out, tool results in, every turn recorded token for token into the episode.

The engine is a named fake (``ScriptedEngines``) that answers scripted tokens: a random-init model
never writes a well-formed tool call, and the point here is what the endpoint does with one."""

from __future__ import annotations

import json

import openai
import pytest

from actors.chat_endpoint import ChatEndpoint
from actors.conversation import EpisodeLimits
from actors.generate_fn import Episodes
from actors.rollout import SampleRunner
from buffers.types import Sample, Status
from examples import openai_agent
from launchers.recipes import calculator
from policies.engine.client import GenerateOutput
from policies.tool_calls import parse_hermes
from tests.conftest import run

TASK = calculator.make_task(seed=0, eval_num_prompts=8)
TOK = TASK.tokenizer
CALL = [calculator.CALL_HEAD, "4", "7", "*", "8", "3", calculator.CALL_TAIL]


def words(*ws: str) -> list[int]:
    return TOK.convert_tokens_to_ids(list(ws))


class ScriptedEngines:
    """Named fake: answers each request with the next scripted tokens (logprob -0.5, version 3)."""

    def __init__(self, *scripts: list[int]):
        self.scripts = list(scripts)
        self.inputs: list[list[int]] = []

    async def generate_batch(self, input_ids, sampling_params, *, rids=None):
        outs = []
        for ids in input_ids:
            self.inputs.append(list(ids))
            out = self.scripts.pop(0)
            outs.append(GenerateOutput(output_ids=out, logprobs=[-0.5] * len(out), finish_reason="stop",
                                       weight_version="3", prompt_tokens=len(ids), completion_tokens=len(out),
                                       latency_s=0.0, token_versions=["3"] * len(out)))
        return outs


def run_episode(fn, engines, **limits):
    """``fn`` as one sample's episode with the endpoint served; (sample, episodes, endpoint)."""
    prompt = TASK.train_prompt(0)  # 4 7 * 8 3 is not this prompt's problem: the agent's messages make the prompt
    sample = Sample(group_id=0, index=0, prompt_ids=list(prompt.input_ids))

    async def main():
        endpoint = ChatEndpoint(model="calculator")
        await endpoint.start()
        runner = SampleRunner(engines=engines, decode=TOK.decode, sampling_params={
            "max_new_tokens": 8, "stop_token_ids": TASK.stop_token_ids})
        eps = Episodes(fn, runner=runner, tokenizer=TOK, endpoint=endpoint,
                       limits=EpisodeLimits(**{"turn_max_tokens": 8, "max_context_len": 64} | limits))
        try:
            unscored = await eps.run_group(prompt, [sample], base_version=3)
        finally:
            await endpoint.stop()
        return unscored, eps, endpoint

    unscored, eps, endpoint = run(main())
    return sample, unscored, eps, endpoint


async def tool_agent(conv) -> float:
    """The OpenAI tool loop, by hand, checking what the client sees."""
    client = openai.AsyncOpenAI(base_url=conv.base_url, api_key=conv.api_key, max_retries=0)
    messages = [{"role": "user", "content": "4 7 * 8 3"}]
    first = await client.chat.completions.create(model="policy", messages=messages, tools=[calculator.TOOL])
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.function.name == "calculator"
    assert json.loads(call.function.arguments) == {"expression": " 4 7 * 8 3 "}
    messages += [choice.message.model_dump(exclude_none=True),
                 {"role": "tool", "tool_call_id": call.id, "content": calculator.calculate("4 7 * 8 3")}]
    second = await client.chat.completions.create(model="policy", messages=messages, tools=[calculator.TOOL])
    assert second.choices[0].message.content == "3 9 0 1" and second.choices[0].finish_reason == "stop"
    assert second.usage.completion_tokens == 5
    await client.close()
    return 1.0


def test_the_openai_client_gets_tool_calls_and_every_turn_is_recorded_token_for_token():
    engines = ScriptedEngines(words(*CALL), words("3", "9", "0", "1", "<eos>"))
    sample, _, _, endpoint = run_episode(tool_agent, engines)
    assert sample.reward == 1.0 and sample.status == Status.COMPLETED
    assert sample.prompt_ids == TOK.encode("<bos> 4 7 * 8 3 =")  # the agent's first messages, templated
    env = words(calculator.RESPONSE, "3", "9", "0", "1", calculator.END_RESPONSE)
    assert sample.response_ids == words(*CALL) + env + words("3", "9", "0", "1", "<eos>")
    assert sample.loss_mask == [1] * 7 + [0] * 6 + [1] * 5
    assert sample.behavior_logprobs == [-0.5] * 7 + [0.0] * 6 + [-0.5] * 5
    assert sample.token_versions == [3] * 18
    # token in: the second request is the first's tokens, its answer and the tool message, untouched
    assert engines.inputs[1] == sample.prompt_ids + words(*CALL) + env
    assert endpoint.counters["tool_calls"] == 1 and endpoint.counters["tool_calls_malformed"] == 0


@pytest.mark.parametrize("call", [[calculator.CALL], CALL], ids=["no-arguments", "expression"])
def test_the_example_agent_records_the_transcript_the_recipe_writes_itself(call):
    prompt = TASK.train_prompt(0)
    a, b = (int("".join(f.split())) for f in prompt.label.split("=")[0].split("*"))
    product = calculator.calculate(prompt.label.split("=")[0]).split()
    scripts = (words(*call), words(*product, "<eos>"))
    through_endpoint, unscored, _, _ = run_episode(openai_agent.generate, ScriptedEngines(*scripts))
    assert unscored == [through_endpoint]  # it returns None: the recipe's reward function scores it
    direct, _, _, _ = run_episode(calculator.generate, ScriptedEngines(*scripts))
    assert through_endpoint.response_ids == direct.response_ids and through_endpoint.loss_mask == direct.loss_mask
    assert through_endpoint.prompt_ids == direct.prompt_ids == prompt.input_ids
    assert calculator.transcript_reward(prompt, through_endpoint) == direct.reward
    if call == [calculator.CALL]:  # the calculator evaluated the user's problem: the answer copied is right
        assert product == list(str(a * b)) and direct.reward == 1.0


def test_a_malformed_call_is_counted_and_left_as_content():
    async def agent(conv):
        client = openai.AsyncOpenAI(base_url=conv.base_url, api_key=conv.api_key, max_retries=0)
        reply = await client.chat.completions.create(model="policy", messages=[{"role": "user", "content": "1 * 2"}])
        assert reply.choices[0].message.tool_calls is None and reply.choices[0].finish_reason == "stop"
        assert reply.choices[0].message.content.startswith(calculator.CALL_HEAD)
        return 0.0

    unclosed = words(calculator.CALL_HEAD, "4", "*", "<eos>")
    sample, _, _, endpoint = run_episode(agent, ScriptedEngines(unclosed))
    assert endpoint.counters["tool_calls_malformed"] == 1 and sample.trainable


def test_bad_requests_answer_one_clear_error_and_a_limit_ends_the_episode_with_its_reason():
    async def agent(conv):
        bad_key = openai.AsyncOpenAI(base_url=conv.base_url, api_key="nope", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            await bad_key.chat.completions.create(model="policy", messages=[{"role": "user", "content": "1"}])
        client = openai.AsyncOpenAI(base_url=conv.base_url, api_key=conv.api_key, max_retries=0)
        with pytest.raises(openai.BadRequestError, match="streaming"):
            await client.chat.completions.create(model="policy", messages=[{"role": "user", "content": "1"}],
                                                 stream=True)
        messages = [{"role": "user", "content": "1 * 2"}]
        reply = await client.chat.completions.create(model="policy", messages=messages)
        messages += [reply.choices[0].message.model_dump(exclude_none=True), {"role": "user", "content": "2"}]
        with pytest.raises(openai.BadRequestError, match="max_turns"):  # one turn allowed
            await client.chat.completions.create(model="policy", messages=messages)
        raise RuntimeError("the agent gives up")

    sample, _, eps, endpoint = run_episode(agent, ScriptedEngines(words("2", "<eos>")), max_turns=1)
    assert sample.status == Status.FAILED and sample.failure.startswith("episode_max_turns")
    assert eps.counters["episode_max_turns"] == 1 and endpoint.counters["chat_bad_requests"] == 1


def test_hermes_parsing_reads_well_formed_calls_and_counts_the_rest():
    text = ('Let me compute. <tool_call>{"name": "calculator", "arguments": {"expression": "2*3"}}</tool_call>'
            '<tool_call>{"name": "calculator", "arguments": "{\\"expression\\": \\"4\\"}"}</tool_call>'
            "<tool_call>{not json}</tool_call><tool_call>[1]</tool_call><tool_call>{\"name\": \"x\"")
    parsed = parse_hermes(text)
    assert [(c.name, json.loads(c.arguments)) for c in parsed.calls] == [
        ("calculator", {"expression": "2*3"}), ("calculator", {"expression": "4"})]
    assert parsed.malformed == 3 and parsed.content.startswith("Let me compute.") and "{not json}" in parsed.content
