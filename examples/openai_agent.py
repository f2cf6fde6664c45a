"""An agent written against the OpenAI SDK, trained unchanged through the run's endpoint.

The agent below is plain ``openai`` client code: a chat completion with a ``tools`` list, the
tool calls it gets back executed and answered with ``tool`` messages, until the model answers.
To train it, the runtime hands each episode a base URL and a key (``conv.base_url``,
``conv.api_key``: its OpenAI-compatible ``/v1/chat/completions`` on 127.0.0.1); every request
made with that key is a turn of the episode, recorded token for token (the policy's tokens
trained with their versions and logprobs, the tool messages masked). It returns None, so the
recipe's reward function scores the finished transcript. On the calculator recipe:

    python -m runtime.launch --recipe calculator --custom-generate-function-path examples.openai_agent:generate

A synchronous ``openai.OpenAI`` agent works too, run on a thread (``asyncio.to_thread``): the
endpoint is served by the run's event loop, which a blocking call on it would stall.
"""

from __future__ import annotations

import json

import openai

from launchers.recipes.calculator import TOOL, calculate


async def generate(conv) -> None:  # noqa: ANN001 - actors.conversation.Conversation
    client = openai.AsyncOpenAI(base_url=conv.base_url, api_key=conv.api_key, max_retries=0)
    problem = conv.prompt.label.split("=")[0]  # "4 7 * 8"
    messages: list[dict] = [{"role": "user", "content": problem}]
    async with client:
        for _ in range(conv.limits.max_turns):
            reply = await client.chat.completions.create(model="policy", messages=messages, tools=[TOOL])
            message = reply.choices[0].message
            messages.append(message.model_dump(exclude_none=True))
            if not message.tool_calls:
                return None  # answered: the recipe's reward function reads the transcript
            for call in message.tool_calls:
                expression = json.loads(call.function.arguments).get("expression", problem)
                result = await conv.call_tool(calculate, expression)  # bounded by --tool-timeout
                messages.append({"role": "tool", "tool_call_id": call.id, "content": result})
    return None
